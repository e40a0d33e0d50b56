"""The serial loop: a vCPU's one-at-a-time region accesses answered without trio.

Why a module of its own: it is the latency path a guest feels on every MMIO access, kept
flat on purpose (every object touched per message shows), and it is the one place a
session reads and replies outside trio's scheduler (`vfiouser_srv.idlewait` says when that
is allowed). `Session` binds `serve_serial` as its `_serve_serial` method; the read loop
(`Session._read_epoch`) calls it before it waits in trio.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, Protocol

from protocol import HEADER, HEADER_SIZE, Command, Connection, HeaderFlags

from . import access, dispatch
from .outbox import Outbox
from .transport import RECV_BUDGET, RECV_TRUNCATED, SEND_FLAGS, FdStream

#: reads `serve_serial` serves before trio gets a turn (with `FdStream`'s: one in 64 at least)
SERIAL_READS = 63
_NO_REPLY = int(HeaderFlags.NO_REPLY)
_DMA_MAP = int(Command.DMA_MAP)


class SerialContext(dispatch.HandlerContext, Protocol):
    """What the serial loop needs of its connection: the `Session`, seen from here (the
    session imports this module, never the other way round)."""

    conn: Connection
    stream: FdStream
    outbox: Outbox
    _close_requested: bool
    #: an unmap started here that waits for pinned DMA (the read loop awaits it)
    _deferred: Awaitable[bytes | None] | None

    @property
    def closing(self) -> bool: ...


def serve_serial(
    session: SerialContext, ready: bool = False
) -> tuple[memoryview, list[Any]] | None:
    """Serve one-access reads back to back, synchronously, while trio is otherwise idle.

    This is the serial round trip of a vCPU doing MMIO, the latency a guest feels. Per
    message: one poll(0) on trio's epoll descriptor (`IdleWaiter.must_yield`: does
    trio have anything to do?), one read that blocks for the next request for
    `idlewait.HOT_WAIT` at most (`FdStream.read_waiting`), `access.serve`, one send;
    no coroutine, scheduler round, EAGAIN exception or reassembly buffer (a blocking
    read wakes faster than poll(); every object touched per message shows with a peer
    on the same CPU evicting our caches, hence the flat style: benchmarks/README.md).

    Returns the first read that is not exactly one plain region access (for the read
    loop), or None when the caller must go through trio: not idle, trio has an event,
    a deadline is near, our handler woke a task, no request within HOT_WAIT, the reply
    not sent whole, or the reads due before a checkpoint went by. `ready`: a wait just
    saw our socket readable, so the first read needs no `must_yield`.
    """
    conn, stream, outbox = session.conn, session.stream, session.outbox
    waiter = stream.waiter
    if outbox.pending or session.closing or not conn.fast_ready():
        return None
    must_yield = waiter.must_yield
    if (deadline := waiter.idle_deadline()) is None:
        if not ready:  # (else trio has other work: serve the read announced, then go)
            return None
    elif not ready and must_yield(deadline):  # many connections: usually, before set-up
        return None
    read = stream.read_waiting
    buf = stream.buffer
    send = stream.send_nowait
    unpack = HEADER.unpack_from
    fast = access.SERIAL_COMMANDS
    plain = access.FAST_COMMANDS
    serve = access.serve
    serve_plain = dispatch.serve_plain
    truncated = RECV_TRUNCATED
    reads = nbytes = 0
    try:
        while True:
            reads += 1
            try:  # blocks for the peer's next request, HOT_WAIT at most
                n, anc, mflags, _addr = read()
            except OSError as exc:
                return stream.read_failed(exc)
            nbytes += n
            if anc or mflags & truncated:
                chunk = stream.chunk(n, anc, mflags)  # the fds are ours from here on
                fds = chunk[1]
                if n < HEADER_SIZE or len(fds) != 1:
                    return chunk
                msg_id, command, size, flags, error = unpack(buf)
                # one whole DMA_MAP and its one fd (which, alone in the read, is its own)
                if size != n or error or command != _DMA_MAP or command not in plain:
                    return chunk
                if flags and flags != _NO_REPLY:
                    return chunk
                reply = serve_plain(session, msg_id, command, flags, buf[HEADER_SIZE:n], (fds[0],))
                assert reply is None or isinstance(reply, bytes)  # a map never waits
            elif n < HEADER_SIZE:
                return buf[:n], []
            else:
                msg_id, command, size, flags, error = unpack(buf)
                # exactly one whole plain frame (the decoder's `take_plain` rule, inlined)
                if size != n or error or (flags and flags != _NO_REPLY):
                    return buf[:n], []
                if command in fast:
                    reply = serve(session, msg_id, command, flags, buf[HEADER_SIZE:n])
                elif command in plain:  # DMA_MAP without fd, DMA_UNMAP
                    got = serve_plain(session, msg_id, command, flags, buf[HEADER_SIZE:n])
                    if got is not None and not isinstance(got, bytes):
                        session._deferred = got  # an unmap waiting for pinned DMA
                        return None
                    reply = got
                else:
                    return buf[:n], []
            if reply is not None:
                if stream.sending:  # the writer is mid-message: queue behind it
                    outbox.send(reply)
                    return None
                try:
                    sent = send(reply, SEND_FLAGS)
                except OSError:  # full or broken: `Outbox.send` queues or records it
                    outbox.send(reply)
                    return None
                if sent != len(reply):
                    outbox.send(reply[sent:])
                    return None
            if session._close_requested or reads >= SERIAL_READS or nbytes >= RECV_BUDGET:
                return None
            if deadline is None:  # not idle: wait in trio, a request/reply peer's next
                waiter.empty = True  # request is not there yet (else: a round later)
                return None
            if must_yield(deadline):
                return None
    finally:
        stream.count_reads(reads, nbytes)


__all__ = ["SERIAL_READS", "SerialContext", "serve_serial"]

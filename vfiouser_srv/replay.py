"""`vfiouser-srv trace replay`: play a trace's client side against a fresh model.

The model is served in-process (a `Server` on a socket in a temporary folder) and a raw
socket plays the client: every recorded client message is sent as recorded (DMA_READ
replies from the recorded payloads, zeros where `--trace-dma` was off), every descriptor is
made locally from its description (a memfd of the recorded size and seals, an eventfd), and
every recorded server message is compared with the one the server sends now. The first
difference is the result, with both versions.

Determinism: before each client message the replay waits until every server task is
blocked, so device tasks a message started finish before the next one arrives (a fast
client); the session runs without its serial loop (a tracer writing to /dev/null, or to
`record`, is attached). Guest memory passed as memfds is not in a trace: the replay's is
zero-filled, so a model whose replies depend on what it reads from guest memory can
diverge where the recording did not.

Polling: a guest waiting for a device (nvme's CSTS.RDY) reads one register until it
changes, so how many reads see the old value depends on timing. A run of identical
REGION_READs whose recorded replies change is replayed as a loop: each reply may be any
value the recorded loop saw, and the loop must end on its last value (the last read is
repeated, 1 ms apart, while the model is slower than it was; `extra_polls` counts them).

See docs/trace.md.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import os
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import trio
import trio.testing

from devices.sdk.interface import DeviceModel
from protocol import HEADER_SIZE, Command

from .server import Server
from .trace import (
    CONNECT,
    DISCONNECT,
    FD_EVENTFD,
    FD_FILE,
    GARBAGE,
    IN,
    OUT,
    Record,
    Trace,
    Tracer,
    describe_fd,
    describe_fds,
    describe_message,
)

#: how long the replay waits for a message the trace says the server sent
REPLY_TIMEOUT = 5.0
_SIZE_AT = 4
_REGION_READ = int(Command.REGION_READ)
#: header + region access struct: the rest of a REGION_READ reply is the data
_ACCESS_END = HEADER_SIZE + 16


@dataclass
class Divergence:
    """The first recorded server message the replay did not get."""

    record: Record
    expected: str
    got: str
    why: str

    def report(self) -> str:
        r = self.record
        return (
            f"divergence at record #{r.index} (offset {r.offset}, connection #{r.conn}, "
            f"t={r.t_ns / 1e9:.6f}s): {self.why}\n"
            f"  recorded: {self.expected}\n"
            f"  replayed: {self.got}"
        )


@dataclass
class ReplayResult:
    messages_sent: int = 0
    messages_compared: int = 0
    connections: int = 0
    #: reads repeated because a polled register took longer than in the recording
    extra_polls: int = 0
    divergence: Divergence | None = None


def _connections(trace: Trace) -> Iterator[list[Record]]:
    """Each connection's records, in the order the connections started."""
    order: list[int] = []
    by_conn: dict[int, list[Record]] = {}
    for r in trace.records:
        if r.conn not in by_conn:
            order.append(r.conn)
            by_conn[r.conn] = []
        by_conn[r.conn].append(r)
    for conn in order:
        yield by_conn[conn]


def _local_fds(r: Record) -> list[int]:
    fds = []
    for kind, seals, size in r.fds:
        if kind == FD_FILE:
            fd = os.memfd_create("replay", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            os.ftruncate(fd, size)
            if seals:
                with contextlib.suppress(OSError):
                    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        elif kind == FD_EVENTFD:
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        else:
            fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        fds.append(fd)
    return fds


class _Peer:
    """The client end: sends recorded messages, frames what the server sends."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.fds: list[int] = []
        self.eof = False

    async def send(self, data: bytes, fds: list[int]) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        first = True
        try:
            while data:
                await trio.lowlevel.wait_writable(self.sock)
                try:
                    sent = self.sock.sendmsg([data], anc if fds and first else [])
                except BlockingIOError:
                    continue
                data, first = data[sent:], False
        finally:
            for fd in fds:
                os.close(fd)

    def _take(self) -> tuple[bytes, list[int]] | None:
        if len(self.buf) < HEADER_SIZE:
            return None
        size = max(int.from_bytes(self.buf[_SIZE_AT : _SIZE_AT + 4], "little"), HEADER_SIZE)
        if len(self.buf) < size:
            return None
        msg = bytes(self.buf[:size])
        del self.buf[:size]
        fds, self.fds = self.fds, []
        return msg, fds

    async def receive(self, timeout: float) -> tuple[bytes, list[int]] | None:
        with trio.move_on_after(timeout):
            while True:
                got = self._take()
                if got is not None or self.eof:
                    return got
                await self._read()
        return None

    def receive_nowait(self) -> tuple[bytes, list[int]] | None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._read_sync()
        return self._take()

    async def _read(self) -> None:
        await trio.lowlevel.wait_readable(self.sock)
        self._read_sync()

    def _read_sync(self) -> None:
        data, anc, _, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(64 * 4))
        for level, kind, blob in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(blob[: len(blob) - len(blob) % arr.itemsize])
                self.fds += list(arr)
        if not data:
            self.eof = True
        self.buf += data


def _compare(r: Record, data: bytes, fds: list[int]) -> str | None:
    """Why the replayed message `data` differs from the recorded `r` (None: it does not)."""
    try:
        got_fds = [describe_fd(fd) for fd in fds]
    finally:
        for fd in fds:
            os.close(fd)
    if len(data) != r.wire_len:
        return f"size {len(data)}, recorded {r.wire_len}"
    mine = data[: len(r.data)] if r.cut else data
    if mine != r.data:
        at = next(i for i, (a, b) in enumerate(zip(mine, r.data, strict=False)) if a != b)
        where = "header" if at < HEADER_SIZE else f"payload byte {at - HEADER_SIZE}"
        return f"bytes differ from offset {at} ({where})"
    if [k for k, _, _ in got_fds] != [k for k, _, _ in r.fds]:
        return f"descriptors{describe_fds(got_fds) or ' none'}, recorded{describe_fds(r.fds)}"
    return None


async def replay(
    trace: Trace,
    model: DeviceModel,
    *,
    record: str | None = None,
    timeout: float = REPLY_TIMEOUT,
) -> ReplayResult:
    """Replay `trace` against `model` (which the server closes at the end)."""
    result = ReplayResult()
    with tempfile.TemporaryDirectory(prefix="vfu-replay-") as tmp:
        path = os.path.join(tmp, "replay.sock")
        server = Server()
        dev = server.add_device("replay", model, socket_path=path)
        # a tracer keeps the session on its general path (no serial loop blocking the thread)
        tracer = Tracer(record or os.devnull, dma=True, meta={"device": "replay", "replay": True})
        dev.tracer = tracer
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve)
                for records in _connections(trace):
                    if records[0].kind != CONNECT or records[0].info().get("joined"):
                        continue  # joined mid-connection (trace-on): cannot be replayed
                    result.connections += 1
                    result.divergence = await _replay_connection(path, records, result, timeout)
                    if result.divergence is not None:
                        break
                nursery.cancel_scope.cancel()
        finally:
            server.close()
            tracer.close()
    return result


async def _replay_connection(
    path: str, records: list[Record], result: ReplayResult, timeout: float
) -> Divergence | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    peer = _Peer(sock)
    try:
        sock.connect(path)  # a listening Unix socket: immediate
        sock.setblocking(False)
        i = 0
        while i < len(records):
            r = records[i]
            run = _poll_run(records, i)
            if run:
                d = await _replay_poll(peer, run, result, timeout)
                if d is not None:
                    return d
                i += 2 * len(run)
                continue
            i += 1
            if r.kind in (IN, GARBAGE):
                await trio.testing.wait_all_tasks_blocked()
                data = r.data + bytes(r.wire_len - len(r.data))
                await peer.send(data, _local_fds(r))
                result.messages_sent += 1
            elif r.kind == OUT:
                d = await _expect(peer, r, result, timeout)
                if d is not None:
                    return d
            elif r.kind == DISCONNECT:
                break
        await trio.testing.wait_all_tasks_blocked()
        extra = peer.receive_nowait()
        if extra is not None:
            last = records[-1]
            for fd in extra[1]:
                os.close(fd)
            return Divergence(
                last,
                "(no further message)",
                describe_message(extra[0], len(extra[0])),
                "the server sent a message the trace does not have",
            )
        return None
    except OSError as exc:
        if exc.errno in (errno.EPIPE, errno.ECONNRESET):
            return Divergence(records[-1], "(connection open)", "(closed)", str(exc))
        raise
    finally:
        sock.close()
        for fd in peer.fds:
            os.close(fd)
        await trio.testing.wait_all_tasks_blocked()


async def _expect(
    peer: _Peer, r: Record, result: ReplayResult, timeout: float
) -> Divergence | None:
    got = await peer.receive(timeout)
    if got is None:
        why = "connection closed" if peer.eof else f"no message within {timeout}s"
        return Divergence(r, _recorded(r), "(nothing)", why)
    why_not = _compare(r, got[0], got[1])
    result.messages_compared += 1
    if why_not is not None:
        return Divergence(r, _recorded(r), describe_message(got[0], len(got[0])), why_not)
    return None


def _poll_run(records: list[Record], i: int) -> list[tuple[Record, Record]]:
    """A guest polling a register: at `i`, two or more identical REGION_READs, each followed
    at once by its reply, whose values change (else: [], replayed message by message)."""
    run: list[tuple[Record, Record]] = []
    first = records[i]
    while i + 1 < len(records):
        req, rep = records[i], records[i + 1]
        head, rhead = req.header(), rep.header()
        if (
            req.kind != IN
            or rep.kind != OUT
            or head is None
            or rhead is None
            or head[1] != _REGION_READ
            or head[3] != 0
            or req.data[HEADER_SIZE:] != first.data[HEADER_SIZE:]
            or req.fds
            or rhead[0] != head[0]
            or rhead[1] != _REGION_READ
            or rhead[4] != 0
            or len(rep.data) != rep.wire_len
        ):
            break
        run.append((req, rep))
        i += 2
    if len(run) < 2 or len({rep.data[_ACCESS_END:] for _, rep in run}) < 2:
        return []
    return run


async def _replay_poll(
    peer: _Peer, run: list[tuple[Record, Record]], result: ReplayResult, timeout: float
) -> Divergence | None:
    """Replay a polling loop: each reply may be any value the recording's loop saw, and the
    loop ends on the value it ended on; if the model is slower than it was, the last read
    is repeated (1 ms apart, up to `timeout`) until that value comes."""
    seen = {rep.data[_ACCESS_END:] for _, rep in run}
    final = run[-1][1].data[_ACCESS_END:]
    got = b""
    for req, rep in run:
        await trio.testing.wait_all_tasks_blocked()
        await peer.send(req.data, [])
        result.messages_sent += 1
        d, got = await _expect_poll(peer, rep, seen, result, timeout)
        if d is not None:
            return d
    req, rep = run[-1]
    deadline = trio.current_time() + timeout
    while got != final:
        if trio.current_time() > deadline:
            return Divergence(
                rep, _recorded(rep), f"still {got.hex()} after {timeout}s of polling", "poll"
            )
        await trio.sleep(0.001)
        await peer.send(req.data, [])
        result.messages_sent += 1
        result.extra_polls += 1
        d, got = await _expect_poll(peer, rep, seen, result, timeout)
        if d is not None:
            return d
    return None


async def _expect_poll(
    peer: _Peer, rep: Record, seen: set[bytes], result: ReplayResult, timeout: float
) -> tuple[Divergence | None, bytes]:
    got = await peer.receive(timeout)
    if got is None:
        why = "connection closed" if peer.eof else f"no message within {timeout}s"
        return Divergence(rep, _recorded(rep), "(nothing)", why), b""
    data, fds = got
    for fd in fds:
        os.close(fd)
    result.messages_compared += 1
    if data[:_ACCESS_END] != rep.data[:_ACCESS_END] or data[_ACCESS_END:] not in seen:
        values = ", ".join(sorted(v.hex() for v in seen))
        return (
            Divergence(
                rep,
                _recorded(rep),
                describe_message(data, len(data)),
                f"a polled register read a value the recorded loop never saw ({values})",
            ),
            b"",
        )
    return None, data[_ACCESS_END:]


def _recorded(r: Record) -> str:
    return describe_message(r.data, r.wire_len, r.cut) + describe_fds(r.fds)


__all__ = ["Divergence", "ReplayResult", "replay"]

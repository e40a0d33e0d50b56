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
from protocol import HEADER_SIZE

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
                    if records[0].kind != CONNECT:
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
        for r in records:
            if r.kind in (IN, GARBAGE):
                await trio.testing.wait_all_tasks_blocked()
                data = r.data + bytes(r.wire_len - len(r.data))
                await peer.send(data, _local_fds(r))
                result.messages_sent += 1
            elif r.kind == OUT:
                got = await peer.receive(timeout)
                if got is None:
                    why = "connection closed" if peer.eof else f"no message within {timeout}s"
                    return Divergence(r, _recorded(r), "(nothing)", why)
                why_not = _compare(r, got[0], got[1])
                result.messages_compared += 1
                if why_not is not None:
                    return Divergence(
                        r, _recorded(r), describe_message(got[0], len(got[0])), why_not
                    )
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


def _recorded(r: Record) -> str:
    return describe_message(r.data, r.wire_len, r.cut) + describe_fds(r.fds)


__all__ = ["Divergence", "ReplayResult", "replay"]

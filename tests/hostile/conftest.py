"""Fixtures for the hostile-client suite: the real server as a subprocess, and a raw client.

Why a subprocess rather than the in-process `Server` of tests/server: a hostile client must
be able to kill the server (SIGBUS through a shrunk DMA window), and the server's own
descriptor, mapping and memory accounting (/proc/PID/{fd,maps,status}) must not be mixed with
the test's. The server runs exactly as `vfiouser-srv serve --config` does, with the cyclic
garbage collector disabled, so anything that only the GC would free shows up as a leak.

* `spawn(devices, engine=...)`: start a server serving edu devices named `devices`.
* `Raw`: a vfio-user peer that sends whatever bytes and descriptors it is told to (no codec
  in the way), and reads frames back. The hostile sessions are written with it.
* `wait_for(predicate, timeout)`: a bounded poll, for state that only /proc can show.
* `python_engine_only(reason)`: as in tests/server (same marker, same deselection rule).
"""

from __future__ import annotations

import array
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
import trio

from protocol import HEADER, HEADER_SIZE, Capabilities, Command, HeaderFlags, Version, pack_header
from vfiouser_srv.client import Client, open_client
from vfiouser_srv.transport import FdStream

from ..conftest import python_engine_only

REPO = Path(__file__).resolve().parents[2]
#: the server's start-up line; `serve` prints one per device once every socket listens
READY_TIMEOUT = 20.0
#: how long a raw read waits for the server before the test fails instead of hanging
READ_TIMEOUT = 10.0
#: the line `OwnedFd`'s finalizer logs for a descriptor nobody closed (vfiouser_srv/fds.py)
GC_LEAK = "leaked and was closed by the garbage collector"
#: what `gc.disable()` in front of the CLI looks like (the hygiene rule: no GC needed)
_SERVER_MAIN = (
    "import gc, sys; gc.disable(); from vfiouser_srv.cli import main; sys.exit(main())"
)
VERSION_CAPS = Capabilities(max_msg_fds=8)
_INT = array.array("i").itemsize

ENGINE_ENV = "VFIOUSER_TEST_ENGINE"




# ------------------------------------------------------------------------ the server process


class ServerProcess:
    """One `vfiouser-srv serve --config` subprocess and what /proc says about it."""

    def __init__(self, tmp_path: Path, devices: Sequence[str], engine: str) -> None:
        self.sockets = {name: str(tmp_path / f"{name}.sock") for name in devices}
        for path in self.sockets.values():
            assert len(path) < 100, f"socket path too long for AF_UNIX: {path}"
        config = tmp_path / "devices.toml"
        lines = [f'[server]\nengine = "{engine}"\n']
        for name, path in self.sockets.items():
            lines.append(f'[[device]]\nname = "{name}"\nmodel = "edu"\nsocket = "{path}"\n')
        config.write_text("\n".join(lines))
        self.stderr_path = tmp_path / "server.stderr"
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER_MAIN, "serve", "--config", str(config)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            stdin=subprocess.DEVNULL,
        )
        self.pid = self.proc.pid
        self._await_ready(len(self.sockets))

    def _await_ready(self, count: int) -> None:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + READY_TIMEOUT
        seen = 0
        buf = b""
        while seen < count:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                self.stop()
                raise AssertionError(f"server did not start: {self.stderr()}")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                buf += chunk
                seen = buf.count(b"READY ")
                if not chunk:
                    continue

    # -------------------------------------------------------------- /proc

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def fds(self) -> list[str]:
        """What each open descriptor is (for a failure message)."""
        out = []
        for name in sorted(os.listdir(f"/proc/{self.pid}/fd"), key=int):
            with suppress(FileNotFoundError):
                out.append(f"{name}->{os.readlink(f'/proc/{self.pid}/fd/{name}')}")
        return out

    def maps(self) -> list[str]:
        with open(f"/proc/{self.pid}/maps") as f:
            return f.read().splitlines()

    def _status_kib(self, key: str) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise AssertionError(f"no {key} in /proc/{self.pid}/status")

    def rss_kib(self) -> int:
        return self._status_kib("VmRSS")

    def peak_rss_kib(self) -> int:
        """VmHWM: the highest RSS since the last `reset_peak()`: catches a transient buffer."""
        return self._status_kib("VmHWM")

    def reset_peak(self) -> None:
        """Make VmHWM start again from the current RSS (writing 5 to clear_refs)."""
        with open(f"/proc/{self.pid}/clear_refs", "w") as f:
            f.write("5")

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))

    # -------------------------------------------------------------- life

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr(self) -> str:
        if not self._stderr.closed:
            self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()


Spawn = Callable[..., ServerProcess]


@pytest.fixture
def engine() -> str:
    """The engine `spawn` uses unless a module parametrizes over engines."""
    return os.environ.get(ENGINE_ENV, "python")


@pytest.fixture
def spawn(tmp_path: Path, engine: str, request: pytest.FixtureRequest) -> Iterator[Spawn]:
    """`spawn(["d1", "d2"])`: a server process serving edu under each name; stopped at the
    end, and an unexpected death (a signal) fails the test even if the test did not look."""
    started: list[ServerProcess] = []
    if request.node.get_closest_marker("python_engine_only") is not None:
        engine = "python"

    def make(devices: Sequence[str] = ("d1", "d2")) -> ServerProcess:
        sub = tmp_path / f"srv{len(started)}"
        sub.mkdir()
        srv = ServerProcess(sub, devices, engine)
        started.append(srv)
        return srv

    yield make
    for srv in started:
        code = srv.proc.poll()
        srv.stop()
        assert code is None, f"server died with {code}: {srv.stderr()[-2000:]}"


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll `predicate` every 10 ms until it holds or `timeout` passes; returns the last
    result. Only for what nothing can be awaited on (the server's /proc entries)."""
    deadline = trio.current_time() + timeout
    while not predicate():
        if trio.current_time() > deadline:
            return predicate()
        await trio.sleep(0.01)
    return True


# ------------------------------------------------------------------------ raw peer


def frame(msg_id: int, command: int, payload: bytes = b"", flags: int = 0) -> bytes:
    return pack_header(msg_id, command, HEADER_SIZE + len(payload), flags) + payload


def version_frame(msg_id: int = 0, caps: Capabilities = VERSION_CAPS) -> bytes:
    return frame(msg_id, Command.VERSION, Version(0, 0, caps).encode())


def reply_frame(msg_id: int, command: int, payload: bytes = b"") -> bytes:
    return frame(msg_id, command, payload, HeaderFlags.TYPE_REPLY)


class Closed(Exception):
    """The server closed the connection."""


class Raw:
    """A raw vfio-user stream: bytes and fds out exactly as given, frames back."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self._buf = bytearray()
        self._eof = False

    async def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """All of `data` (fds ride with the first byte); BrokenResourceError if the server
        has gone (hostile sessions expect that)."""
        view = memoryview(data)
        anc = []
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        try:
            while view:
                sent = await self.sock.sendmsg([view], anc)
                view, anc = view[sent:], []
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise trio.BrokenResourceError(str(exc)) from exc

    async def _fill(self) -> None:
        try:
            anc_size = socket.CMSG_SPACE(64 * _INT)
            data, anc, _flags, _addr = await self.sock.recvmsg(1 << 20, anc_size)
        except ConnectionResetError:
            data, anc = b"", []
        for level, kind, raw in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(raw[: len(raw) - len(raw) % _INT])
                for fd in arr:
                    os.close(fd)
        if not data:
            self._eof = True
            raise Closed
        self._buf += data

    async def read_frame(self, timeout: float = READ_TIMEOUT) -> tuple[tuple[int, ...], bytes]:
        """The next frame as (header fields, payload); `Closed` at EOF. Received fds are
        closed at once: no raw session keeps any."""
        with trio.fail_after(timeout):
            while True:
                if len(self._buf) >= HEADER_SIZE:
                    head = HEADER.unpack_from(self._buf)
                    size = head[2]
                    if len(self._buf) >= size:
                        payload = bytes(self._buf[HEADER_SIZE:size])
                        del self._buf[:size]
                        return head, payload
                await self._fill()

    async def read_until(
        self, command: int, *, flags_type: int = 0, timeout: float = READ_TIMEOUT
    ) -> tuple[tuple[int, ...], bytes]:
        """Skip frames until one of `command` whose type (command/reply) is `flags_type`."""
        with trio.fail_after(timeout):
            while True:
                head, payload = await self.read_frame()
                if head[1] == command and head[3] & HeaderFlags.TYPE_MASK == flags_type:
                    return head, payload

    async def wait_closed(self, timeout: float = READ_TIMEOUT) -> None:
        """Read (and drop) whatever comes until the server closes; fails after `timeout`."""
        with trio.fail_after(timeout):
            try:
                while True:
                    await self._fill()
                    self._buf.clear()
            except Closed:
                return

    async def version(self) -> None:
        await self.send(version_frame())
        head, _ = await self.read_frame()
        assert head[1] == Command.VERSION and not head[3] & HeaderFlags.ERROR, head

    def close(self) -> None:
        self.sock.close()


async def connect(path: str, timeout: float = READ_TIMEOUT) -> socket.socket:
    """A connected AF_UNIX socket (blocking mode).

    Not `trio.socket.connect`: a non-blocking connect to a listener whose backlog is full
    (libvfio-user does not accept() while it serves a client) fails with EAGAIN, which trio
    takes for "in progress" and then reports as connected; the first send gets ENOTCONN. A
    blocking connect in a worker thread waits for the backlog instead, bounded by `timeout`.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # a blocking AF_UNIX connect waits at most SO_SNDTIMEO (a socket timeout would make
    # Python use a non-blocking connect, which fails at once with EAGAIN)
    sec = int(timeout)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", sec, 0))
    try:
        await trio.to_thread.run_sync(sock.connect, path)
    except BaseException:
        sock.close()
        raise
    return sock


@asynccontextmanager
async def good_client(path: str, **kwargs: Any) -> AsyncIterator[Client]:
    """The project's client, connected as `connect` does (VERSION done)."""
    stream = FdStream(await connect(path))
    async with open_client(stream, reply_timeout=READ_TIMEOUT, **kwargs) as c:
        yield c


@asynccontextmanager
async def raw_connection(path: str, *, version: bool = False) -> AsyncIterator[Raw]:
    std = await connect(path)
    sock = trio.socket.from_stdlib_socket(std)
    try:
        raw = Raw(sock)
        if version:
            await raw.version()
        yield raw
    finally:
        sock.close()


def u32(value: int) -> bytes:
    return value.to_bytes(4, "little")


def u64(value: int) -> bytes:
    return value.to_bytes(8, "little")


# ------------------------------------------------------------------------ edu over the wire

BAR0 = 0
CONFIG = 7
PCI_COMMAND = 0x04
#: PCI_COMMAND memory space + bus master: edu moves no data with bus master off
MEM_AND_MASTER = 0x0006
DMA_SRC, DMA_DST, DMA_CNT, DMA_CMD = 0x80, 0x88, 0x90, 0x98
DMA_RUN, DMA_TO_RAM = 0x1, 0x2
#: edu's DMA buffer, as the device sees it
EDU_BUFFER = 0x40000
EDU_BUFFER_SIZE = 4096


def region_write(msg_id: int, region: int, offset: int, data: bytes) -> bytes:
    """One REGION_WRITE frame."""
    payload = offset.to_bytes(8, "little") + u32(region) + u32(len(data)) + data
    return frame(msg_id, Command.REGION_WRITE, payload)


def region_read(msg_id: int, region: int, offset: int, count: int) -> bytes:
    payload = offset.to_bytes(8, "little") + u32(region) + u32(count)
    return frame(msg_id, Command.REGION_READ, payload)


def edu_dma_frames(first_id: int, src: int, dst: int, count: int, to_ram: bool) -> bytes:
    """Bus master on, then edu's DMA registers and command: pipelined REGION_WRITEs."""
    cmd = DMA_RUN | (DMA_TO_RAM if to_ram else 0)
    writes = [
        (CONFIG, PCI_COMMAND, MEM_AND_MASTER.to_bytes(2, "little")),
        (BAR0, DMA_SRC, u64(src)),
        (BAR0, DMA_DST, u64(dst)),
        (BAR0, DMA_CNT, u64(count)),
        (BAR0, DMA_CMD, u64(cmd)),
    ]
    return b"".join(
        region_write(first_id + i, region, off, data)
        for i, (region, off, data) in enumerate(writes)
    )


def percentile(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


__all__ = [
    "GC_LEAK",
    "Closed",
    "Raw",
    "ServerProcess",
    "Spawn",
    "frame",
    "percentile",
    "python_engine_only",
    "raw_connection",
    "reply_frame",
    "u32",
    "u64",
    "version_frame",
    "wait_for",
]

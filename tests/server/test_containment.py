"""What one hostile connection can do to the server it talks to (Python engine internals).

These check the server-side mechanisms behind docs/security.md: a session's memory is freed
when it ends without the cyclic collector, VERSION is bounded in size and time, a window
whose file may shrink is never mmap'd, and a bogus reply to the server's own DMA request
has its descriptors closed at once. The behaviour seen from outside (a subprocess server
under attack) is tested in tests/hostile/.
"""

from __future__ import annotations

import errno
import gc
import os
import socket
import struct
import weakref
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from devices.sdk.interface import DmaError
from protocol import (
    HEADER,
    Capabilities,
    Command,
    Connection,
    DmaMapFlags,
    HeaderFlags,
    Role,
    Version,
    pack_header,
)
from vfiouser_srv.client import VfioUserError, open_client
from vfiouser_srv.fds import OwnedFd
from vfiouser_srv.limits import Limits
from vfiouser_srv.server import Server
from vfiouser_srv.session import Session

from ._support import add_edu, fds_closed_by_gc, make_memfd, settle, unique, wait_detached


@pytest.fixture
def no_gc() -> Iterator[None]:
    """Run with the cyclic collector off: what these tests free must be freed by refcount."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _version_bytes() -> bytes:
    _id, data, _fds = Connection(Role.CLIENT).send_request(Version(0, 0, Capabilities()))
    return data


async def _raw(path: str) -> trio.SocketStream:
    return await trio.open_unix_socket(path)


async def _read_reply(stream: trio.SocketStream) -> tuple[int, int, int, int, int]:
    head = b""
    while len(head) < 16:
        chunk = await stream.receive_some(16 - len(head))
        assert chunk, "server closed instead of replying"
        head += chunk
    msg_id, command, size, flags, error = HEADER.unpack(head)
    rest = size - 16
    while rest > 0:
        rest -= len(await stream.receive_some(rest))
    return msg_id, command, size, flags, error


async def _eof(stream: trio.SocketStream) -> bool:
    with trio.move_on_after(5):
        while True:
            try:
                if not await stream.receive_some(65536):
                    return True
            except trio.BrokenResourceError:
                return True
    return False


@pytest.mark.usefixtures("no_gc")
async def test_a_closed_session_is_freed_without_the_collector(tmp_path: Path) -> None:
    """32 clients each leave a 1 MiB frame unfinished and go: every Session (and with it
    the partial frame) is gone once they have detached, with gc disabled."""
    server = Server()
    dev, path = add_edu(server, tmp_path)
    refs: list[weakref.ref[Session]] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        for _ in range(32):
            s = await _raw(path)
            await s.send_all(_version_bytes())
            assert (await _read_reply(s))[4] == 0
            await settle()
            refs.extend(weakref.ref(x) for x in server.sessions)
            frame = pack_header(7, Command.REGION_WRITE, 1 << 20, 0)
            await s.send_all(frame + b"\0" * ((1 << 20) - 17))
            await settle()
            await s.aclose()
            await wait_detached(dev)
            await settle()
        nursery.cancel_scope.cancel()
    assert len(refs) == 32
    alive = [r for r in refs if r() is not None]
    assert alive == []


async def test_version_must_come_within_the_deadline(tmp_path: Path) -> None:
    server = Server(limits=Limits(version_timeout=0.2))
    _dev, path = add_edu(server, tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        silent = await _raw(path)
        trickle = await _raw(path)
        await trickle.send_all(_version_bytes()[:5])  # half a header, then nothing
        start = trio.current_time()
        assert await _eof(silent)
        assert await _eof(trickle)
        assert trio.current_time() - start < 2
        # the deadline ends with VERSION: a client that negotiated stays connected
        async with open_client(path) as c:
            await trio.sleep(0.4)
            assert (await c.device_get_info()).num_regions > 0
        nursery.cancel_scope.cancel()


async def test_a_version_bigger_than_the_limit_is_refused_before_it_is_read(
    tmp_path: Path,
) -> None:
    """The header alone decides: 1 MiB of VERSION is never buffered or parsed."""
    server = Server()
    _dev, path = add_edu(server, tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        s = await _raw(path)
        await s.send_all(pack_header(0, Command.VERSION, (1 << 20) + 16, 0))
        assert await _eof(s)
        # 4 KiB is still a VERSION (JSON padded with spaces)
        s = await _raw(path)
        text = b'{"capabilities":{}}'
        body = struct.pack("<HH", 0, 0) + text + b" " * (4096 - 16 - 4 - len(text) - 1) + b"\0"
        assert 16 + len(body) == 4096
        await s.send_all(pack_header(0, Command.VERSION, 16 + len(body), 0) + body)
        assert (await _read_reply(s))[4] == 0
        await s.aclose()
        nursery.cancel_scope.cancel()


async def test_an_unsealed_window_is_never_mmapped_and_a_shrunk_file_is_a_dma_error(
    tmp_path: Path,
) -> None:
    """A file that can shrink is served with pread/pwrite: after ftruncate, an access past
    the new end is DmaError(EFAULT) for the model, never a SIGBUS of the server."""
    server = Server()
    dev, path = add_edu(server, tmp_path)
    name = unique("shrink", tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        async with open_client(path) as c:
            sealed = make_memfd(name + "-s", 0x10000, b"sealed")
            loose = make_memfd(name, 0x10000, b"hello", sealed=False)
            keep = OwnedFd(os.dup(loose.fileno()))
            rw = DmaMapFlags.READ | DmaMapFlags.WRITE
            await c.dma_map(0x100000, 0x10000, flags=rw, fd=sealed)
            await c.dma_map(0x200000, 0x10000, flags=rw, fd=loose)
            await settle()
            session = dev.session
            assert session is not None and session.container is not None
            modes = {w.address: w.mode for w in session.container}
            assert modes == {0x100000: "mmap", 0x200000: "file"}
            dma = session.dma
            assert dma.view(0x200000, 5) is None  # models take their copying path
            assert await dma.read(0x100000, 6) == b"sealed"
            assert await dma.read(0x200000, 5) == b"hello"
            await dma.write(0x200000 + 0x100, b"world")
            assert os.pread(keep.fileno(), 5, 0x100) == b"world"
            os.ftruncate(keep.fileno(), 0)
            with pytest.raises(DmaError) as got:
                await dma.read(0x200000, 4)
            assert got.value.errno == errno.EFAULT
            with pytest.raises(DmaError) as got:
                await dma.write(0x200000, b"x")
            assert got.value.errno == errno.EFAULT
            assert os.fstat(keep.fileno()).st_size == 0  # the write did not grow the file
            for fd in (keep, sealed, loose):
                fd.close()
        await wait_detached(dev)
        nursery.cancel_scope.cancel()


async def test_a_character_device_cannot_back_a_window(tmp_path: Path) -> None:
    server = Server()
    _dev, path = add_edu(server, tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        async with open_client(path) as c:
            fd = OwnedFd(os.open("/dev/zero", os.O_RDWR | os.O_CLOEXEC))
            with fd, pytest.raises(VfioUserError) as got:
                await c.dma_map(0x100000, 0x1000, fd=fd)
            assert got.value.errno == errno.EINVAL
        nursery.cancel_scope.cancel()


async def test_a_reply_of_another_command_with_an_fd_is_closed_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The server's DMA_READ answered by a REGION_INFO-typed reply carrying an fd: the fd
    is closed when the reply arrives (not by the garbage collector) and the device sees a
    DMA error (EPROTO)."""
    server = Server()
    dev, path = add_edu(server, tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        ours, passed = socket.socketpair()
        with ours, passed:
            s = await _raw(path)
            await s.send_all(_version_bytes())
            await _read_reply(s)
            # a window without fd: message mode, so a DMA read becomes a DMA_READ request
            body = struct.pack("<IIQQQ", 32, int(DmaMapFlags.READ), 0, 0x100000, 0x1000)
            await s.send_all(pack_header(1, Command.DMA_MAP, 16 + len(body), 0) + body)
            assert (await _read_reply(s))[4] == 0
            await settle()
            session = dev.session
            assert session is not None
            result: list[BaseException | bytes] = []

            async def dma() -> None:
                assert session is not None
                try:
                    result.append(await session.dma.read(0x100000, 8))
                except DmaError as exc:
                    result.append(exc)

            nursery.start_soon(dma)
            msg_id, command, *_ = await _read_reply(s)
            assert command == Command.DMA_READ
            bogus = pack_header(
                msg_id, Command.DEVICE_GET_REGION_INFO, 16 + 32, int(HeaderFlags.TYPE_REPLY)
            ) + struct.pack("<IIIIQQ", 32, 0, 0, 0, 0, 0)
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", passed.fileno()))]
            await s.socket.sendmsg([bogus], anc)
            passed.close()
            await settle()
            assert len(result) == 1 and isinstance(result[0], DmaError)
            assert result[0].errno == errno.EPROTO
            # EOF on our end means no copy of the passed end is open anywhere any more
            ours.settimeout(2)
            assert ours.recv(1) == b""
            await s.aclose()
            await wait_detached(dev)
        nursery.cancel_scope.cancel()
    assert fds_closed_by_gc(caplog) == []


def test_limits_from_config_keys() -> None:
    lim = Limits.from_mapping({"version_timeout": 2, "max_connections": 10})
    assert lim == replace(Limits(), version_timeout=2.0, max_connections=10)
    with pytest.raises(ValueError, match="unknown"):
        Limits.from_mapping({"nope": 1})
    with pytest.raises(ValueError, match="positive"):
        Limits.from_mapping({"max_version_size": 0})

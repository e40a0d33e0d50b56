"""Connecting, VERSION, raw frames, msg_id routing, cancellation, disconnect and fd hygiene."""

from __future__ import annotations

import errno
import struct
from collections.abc import AsyncIterator
from typing import ClassVar

import pytest
import trio
import trio.testing

from protocol import (
    HEADER_SIZE,
    Body,
    Command,
    DeviceGetRegionInfo,
    DeviceInfo,
    DeviceResetReply,
    ErrorReply,
    HeaderFlags,
    RegionInfo,
    RegionRead,
    RegionWrite,
    RemoteProtocolError,
    Reply,
    Request,
    Version,
    pack_header,
)
from vfiouser_srv.client import Client, open_client
from vfiouser_srv.transport import FdStream

from .fake_server import SERVER_CAPS, FakeServer


def no_reply(_req: Request) -> None:
    return None


# ------------------------------------------------------------------------------ connecting


@pytest.fixture
async def listening(
    nursery: trio.Nursery, tmp_path: object
) -> AsyncIterator[tuple[str, list[FakeServer]]]:
    """A fake server accepting on a real Unix socket path."""
    path = f"{tmp_path}/dev.sock"
    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await listener.bind(path)
    listener.listen()
    servers: list[FakeServer] = []

    async def accept() -> None:
        import socket

        sock, _ = await listener.accept()
        srv = FakeServer(FdStream(socket.socket(fileno=sock.detach())))
        servers.append(srv)
        await srv.run()

    nursery.start_soon(accept)
    yield path, servers
    listener.close()
    for s in servers:
        s.close()


async def test_connect_by_path(listening: tuple[str, list[FakeServer]]) -> None:
    path, servers = listening
    async with open_client(path) as c:
        assert c.server_caps.max_dma_maps == SERVER_CAPS.max_dma_maps
        assert await c.region_read(7, 1, 1) == b"\x01"
    await servers[0].closed.wait()  # the server saw us hang up


async def test_version_refused_raises_unwrapped(pair: tuple[FdStream, FakeServer]) -> None:
    stream, fake = pair
    fake.version_errno = errno.EPROTO
    with pytest.raises(OSError) as ei:
        async with open_client(stream):
            raise AssertionError("not reached")
    assert ei.value.errno == errno.EPROTO
    assert stream.closed


async def test_body_exception_is_not_wrapped(pair: tuple[FdStream, FakeServer]) -> None:
    with pytest.raises(KeyError):
        async with open_client(pair[0]):
            raise KeyError("mine")


async def test_commands_before_version_and_second_version(
    pair: tuple[FdStream, FakeServer],
) -> None:
    stream, fake = pair
    async with open_client(stream, version=False) as c:
        assert not c.negotiated
        with pytest.raises(OSError) as ei:
            await c.device_get_info()  # sent anyway; the server refuses it
        assert ei.value.errno == errno.EINVAL
        reply = await c.version()
        assert reply.capabilities.max_msg_fds == SERVER_CAPS.max_msg_fds
        with pytest.raises(OSError) as ei:
            await c.version()  # a second VERSION: refused, and we stay negotiated
        assert ei.value.errno == errno.EINVAL
        await c.memory.add_ram(0, 0x1000, shared=False)
        assert await fake.dma_read(0, 2) == b"\0\0"  # server requests still accepted


async def test_raw_version_then_commands(pair: tuple[FdStream, FakeServer]) -> None:
    stream, fake = pair
    async with open_client(stream, version=False) as c:
        bad = await c.request_raw(Command.VERSION, struct.pack("<HH", 0, 0) + b"{not json\0")
        assert isinstance(bad, ErrorReply) and bad.errno == errno.EINVAL
        good = await c.request_raw(Command.VERSION, Version(0, 0).encode())
        assert isinstance(good, Reply) and c.negotiated
        assert (await c.device_get_info()).num_regions == 9
        assert len(fake.requests(Version)) == 1  # the malformed one is a BadRequest


# ------------------------------------------------------------------------------ raw frames


async def test_request_raw(client: Client) -> None:
    ok = await client.request_raw(Command.DEVICE_GET_INFO, struct.pack("<IIII", 16, 0, 0, 0))
    assert isinstance(ok, Reply) and isinstance(ok.body, DeviceInfo)
    short = await client.request_raw(Command.REGION_READ, b"\0" * 8)
    assert isinstance(short, ErrorReply) and short.errno == errno.EINVAL
    unknown = await client.request_raw(99, b"")
    assert isinstance(unknown, ErrorReply) and unknown.errno == errno.ENOTSUP
    with pytest.raises(ValueError):
        await client.request_raw(Command.DEVICE_RESET, b"", flags=HeaderFlags.NO_REPLY)


async def test_post_raw_and_split_frame(client: Client, fake: FakeServer) -> None:
    await client.post_raw(Command.REGION_WRITE, RegionWrite(0, 7, b"\x42").encode())
    frame = pack_header(0x1234, Command.REGION_WRITE, HEADER_SIZE + 17, HeaderFlags.NO_REPLY)
    frame += RegionWrite(1, 7, b"\x43").encode()
    await client.send_bytes(frame[:5])
    await trio.testing.wait_all_tasks_blocked()
    await client.send_bytes(frame[5:])
    assert await client.region_read(7, 0, 2) == b"\x42\x43"
    assert client.unexpected == []


# ------------------------------------------------------------------------------ routing


async def test_msg_id_still_in_flight_is_not_reused(client: Client, fake: FakeServer) -> None:
    fake.hold = 2
    first = await client.submit(RegionRead(0, 7, 1))
    client._next_id = first.msg_id  # as if the counter had wrapped round
    second = await client.submit(RegionRead(1, 7, 1))
    assert second.msg_id != first.msg_id
    r2, r1 = await second.wait_reply(), await first.wait_reply()
    assert r1.body.data == b"\x00" and r2.body.data == b"\x01"  # type: ignore[union-attr]


async def test_ids_wrap_at_16_bits(client: Client) -> None:
    client._next_id = 0xFFFF
    a = await client.submit(RegionRead(0, 7, 1))
    b = await client.submit(RegionRead(1, 7, 1))
    assert (a.msg_id, b.msg_id) == (0xFFFF, 0)
    await a.wait_reply()
    await b.wait_reply()


async def test_cancelled_call_drops_its_late_reply(client: Client, fake: FakeServer) -> None:
    fake.hold = 2
    with trio.CancelScope() as scope:
        scope.cancel()
        await client.region_info(0, argsz=4096)  # the reply would carry an fd
    assert client.in_flight == 1  # its id stays reserved until the reply comes
    await client.device_reset()  # releases both replies, in reverse order
    assert client.in_flight == 0 and client.unexpected == []
    # no_fd_leak checks that the late reply's fd was closed


async def test_reply_timeout(pair: tuple[FdStream, FakeServer], autojump_clock: object) -> None:
    stream, fake = pair
    fake.override[Command.DEVICE_RESET] = no_reply
    async with open_client(stream, reply_timeout=2) as c:
        with pytest.raises(trio.TooSlowError):
            await c.device_reset()
        assert await c.region_read(7, 3, 1) == b"\x03"


async def test_undelivered_reply_fds_closed_on_exit(pair: tuple[FdStream, FakeServer]) -> None:
    async with open_client(pair[0]) as c:
        pending = await c.submit(DeviceGetRegionInfo(0, 4096))
        await c.submit_many([DeviceGetRegionInfo(0, 4096)] * 3)
        await c.device_reset()
        assert pending.done
    # no_fd_leak checks the four BAR fds nobody collected


async def test_malformed_reply_raises_in_caller(client: Client, fake: FakeServer) -> None:
    class BadReadReply(Body):
        COMMAND: ClassVar[Command] = Command.REGION_READ
        IS_REPLY: ClassVar[bool] = True

        def encode(self) -> bytes:
            return struct.pack("<QII", 0, 7, 100) + b"short"

    fake.override[Command.REGION_READ] = lambda _r: BadReadReply()
    with pytest.raises(RemoteProtocolError):
        await client.region_read(7, 0, 100)
    del fake.override[Command.REGION_READ]
    assert await client.region_read(7, 0, 1) == b"\0"


async def test_unexpected_replies_are_recorded_and_closed(client: Client, fake: FakeServer) -> None:
    await fake.stream.send(*fake.conn.send_reply(0x4444, DeviceResetReply()))
    info = RegionInfo(0, 7, 0x1000, fd=fake.bar_fd)
    await fake.stream.send(*fake.conn.send_reply(0x4445, info))
    await client.device_reset()
    assert [e.msg_id for e in client.unexpected] == [0x4444, 0x4445]
    assert client.unexpected[1].body.fd.closed  # type: ignore[union-attr]


async def test_bad_requests_from_server_get_error_replies(client: Client, fake: FakeServer) -> None:
    wrong_way = await fake.request_raw(Command.REGION_READ, RegionRead(0, 7, 1).encode())
    assert isinstance(wrong_way, ErrorReply) and wrong_way.errno == errno.EINVAL
    short = await fake.request_raw(Command.DMA_READ, b"\0" * 8)
    assert isinstance(short, ErrorReply) and short.errno == errno.EINVAL
    unknown = await fake.request_raw(77, b"")
    assert isinstance(unknown, ErrorReply) and unknown.errno == errno.ENOTSUP


# ------------------------------------------------------------------------------ endings


async def test_server_hangup_fails_pending_and_later_calls(
    client: Client, fake: FakeServer
) -> None:
    fake.override[Command.REGION_READ] = no_reply
    errors: list[BaseException] = []

    async def call() -> None:
        try:
            await client.region_read(7, 0, 1)
        except trio.BrokenResourceError as exc:
            errors.append(exc)

    async with trio.open_nursery() as n:
        n.start_soon(call)
        n.start_soon(call)
        await trio.testing.wait_all_tasks_blocked()
        assert client.in_flight == 2
        fake.stream.close()
    assert len(errors) == 2
    await client.wait_disconnected()
    assert client.closed
    with pytest.raises(trio.BrokenResourceError):
        await client.device_reset()
    await client.aclose()
    await client.aclose()  # idempotent


async def test_broken_framing_from_server(client: Client, fake: FakeServer) -> None:
    fake.override[Command.DEVICE_RESET] = no_reply
    async with trio.open_nursery() as n:

        async def call() -> None:
            with pytest.raises(trio.BrokenResourceError):
                await client.device_reset()

        n.start_soon(call)
        await trio.testing.wait_all_tasks_blocked()
        await fake.stream.send(pack_header(1, 1, 8, 1))  # size below the header
    await client.wait_disconnected()


async def test_own_close_fails_pending_with_closed(client: Client, fake: FakeServer) -> None:
    fake.override[Command.DEVICE_RESET] = no_reply
    async with trio.open_nursery() as n:

        async def call() -> None:
            with pytest.raises(trio.ClosedResourceError):
                await client.device_reset()

        n.start_soon(call)
        await trio.testing.wait_all_tasks_blocked()
        await client.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await client.region_read(7, 0, 1)
    await fake.closed.wait()


async def test_run_in_own_nursery(pair: tuple[FdStream, FakeServer], nursery: trio.Nursery) -> None:
    c = Client(pair[0])
    await nursery.start(c.run)
    await c.version()
    assert await c.region_read(7, 5, 1) == b"\x05"
    await c.aclose()
    await c.wait_disconnected()

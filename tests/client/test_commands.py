"""Every command method against the fake server: wire bodies out, typed replies back."""

from __future__ import annotations

import errno
import os

import pytest
import trio

from protocol import (
    REGION_INFO_SIZE,
    Command,
    DeviceFeature,
    DeviceFeatureReply,
    DeviceFlags,
    DeviceGetRegionInfo,
    DeviceGetRegionIoFds,
    DeviceSetIrqs,
    FeatureFlags,
    IrqSetFlags,
    MigDataRead,
    RegionFlags,
    RegionRead,
    RegionWrite,
    RegionWriteMulti,
    Request,
    SparseMmapCap,
    TypeCap,
    Version,
    WriteEntry,
)
from vfiouser_srv.client import (
    Client,
    VfioUserError,
    make_eventfd,
    read_eventfd_nowait,
    wait_eventfd,
)
from vfiouser_srv.fds import is_eventfd

from .fake_server import MIG_DATA, REGION_SIZES, SERVER_CAPS, FakeServer


async def test_version_negotiates_caps(client: Client, fake: FakeServer) -> None:
    assert client.negotiated
    assert client.server_caps.max_data_xfer_size == SERVER_CAPS.max_data_xfer_size
    assert client.server_caps.max_msg_fds == SERVER_CAPS.max_msg_fds
    (sent,) = fake.requests(Version)
    assert sent.capabilities == client.caps


async def test_device_get_info(client: Client) -> None:
    info = await client.device_get_info()
    assert info.flags & DeviceFlags.PCI
    assert (info.num_regions, info.num_irqs) == (9, 5)


async def test_region_info_argsz_retry_caps_and_fd(client: Client, fake: FakeServer) -> None:
    info = await client.region_info(0)
    asks = [b.argsz for b in fake.requests(DeviceGetRegionInfo)]
    assert asks == [REGION_INFO_SIZE, info.argsz]
    assert info.argsz > REGION_INFO_SIZE and info.complete
    assert info.flags & RegionFlags.MMAP and info.flags & RegionFlags.CAPS
    assert info.caps == (SparseMmapCap(((0, 0x800), (0x800, 0x800))),)
    assert info.fd is not None
    with info.fd:  # ours to close; it is the server's BAR memfd
        assert os.pread(info.fd.fileno(), 4, 0) == bytes(fake.regions[0][:4])


async def test_region_info_without_caps_asks_once(client: Client, fake: FakeServer) -> None:
    info = await client.region_info(7)
    assert (info.size, info.offset, info.caps, info.fd) == (0x100, 0x70000, (), None)
    assert [b.argsz for b in fake.requests(DeviceGetRegionInfo)] == [REGION_INFO_SIZE]
    typed = await client.region_info(1)
    assert typed.caps == (TypeCap(0x8086, 1),)


async def test_region_info_explicit_argsz_is_not_retried(client: Client) -> None:
    info = await client.region_info(0, argsz=REGION_INFO_SIZE)
    assert not info.complete and info.caps == () and info.fd is None


async def test_error_reply_raises_oserror(client: Client) -> None:
    with pytest.raises(VfioUserError) as ei:
        await client.region_info(42)
    assert isinstance(ei.value, OSError)
    assert ei.value.errno == errno.EINVAL
    assert ei.value.command is Command.DEVICE_GET_REGION_INFO
    assert "DEVICE_GET_REGION_INFO" in str(ei.value)
    # the connection is still fine
    assert await client.region_read(7, 0, 2) == b"\x00\x01"


async def test_region_io_fds_retry_hands_out_fds(client: Client, fake: FakeServer) -> None:
    reply = await client.region_io_fds(0)
    assert [b.argsz for b in fake.requests(DeviceGetRegionIoFds)] == [16, reply.argsz]
    assert len(reply.subregions) == 2 and len(reply.fd_list) == 2
    for fd in reply.fd_list:
        fd.close()


async def test_region_read_write(client: Client, fake: FakeServer) -> None:
    assert await client.region_read(0, 0x10, 4) == bytes([0x10, 0x11, 0x12, 0x13])
    await client.region_write(0, 0x10, b"\xaa\xbb")
    assert fake.regions[0][0x10:0x12] == b"\xaa\xbb"
    with pytest.raises(VfioUserError) as ei:
        await client.region_read(0, REGION_SIZES[0] - 2, 4)
    assert ei.value.errno == errno.EINVAL


async def test_posted_write_is_applied_before_later_reply(client: Client, fake: FakeServer) -> None:
    await client.region_write(0, 0, b"\x55\x66", posted=True)
    assert await client.region_read(0, 0, 2) == b"\x55\x66"
    (posted,) = [r for r in fake.log if isinstance(r, Request) and type(r.body) is RegionWrite]
    assert posted.no_reply
    assert client.unexpected == []


async def test_region_write_multi(client: Client, fake: FakeServer) -> None:
    n = await client.region_write_multi([(0, 0x20, b"\x01\x02"), WriteEntry(0x30, 0, b"\x03")])
    assert n == 2
    assert fake.regions[0][0x20:0x22] == b"\x01\x02" and fake.regions[0][0x30] == 3
    assert await client.region_write_multi([(7, 0, b"\x09")], posted=True) is None
    await client.device_reset()  # a synchronous command after the posted one
    assert fake.regions[7][0] == 9
    assert len(fake.requests(RegionWriteMulti)) == 2


async def test_irq_info_and_set_irqs(client: Client, fake: FakeServer) -> None:
    info = await client.irq_info(2)
    assert (info.index, info.count) == (2, 8)
    efds = [make_eventfd(), make_eventfd()]
    try:
        await client.set_irq_eventfds(2, 3, efds)
        (req,) = fake.requests(DeviceSetIrqs)
        assert req.flags == IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER
        assert (req.index, req.start, req.count) == (2, 3, 2)
        server_copy = fake.irq_fds[(2, 4)]
        assert is_eventfd(server_copy.fileno())
        assert read_eventfd_nowait(efds[1]) == 0
        os.eventfd_write(server_copy.fileno(), 1)  # the "device" raises vector 4
        assert await wait_eventfd(efds[1], timeout=5) == 1
        assert read_eventfd_nowait(efds[0]) == 0
        await client.disable_irqs(2)
        await client.unset_irq_eventfds(2, 3, 2)
        disable, unset = fake.requests(DeviceSetIrqs)[1:]
        assert disable.flags == IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER
        assert (disable.start, disable.count) == (0, 0)
        assert (unset.count, unset.fd_list) == (2, ())
    finally:
        for fd in efds:
            fd.close()


async def test_wait_eventfd_times_out(autojump_clock: trio.abc.Clock) -> None:
    with make_eventfd() as efd, pytest.raises(trio.TooSlowError):
        await wait_eventfd(efd, timeout=1)


async def test_device_feature_and_migration_data(client: Client, fake: FakeServer) -> None:
    flags = FeatureFlags.GET | 2
    reply = await client.device_feature(flags, b"\x01\x02\x03\x04")
    assert isinstance(reply, DeviceFeatureReply)
    assert (reply.flags, reply.data) == (flags, b"\x04\x03\x02\x01")
    assert fake.requests(DeviceFeature)[0].argsz == 12
    assert await client.mig_data_read(16) == MIG_DATA[:16]
    assert fake.requests(MigDataRead)[0].size == 16
    await client.mig_data_write(b"tail")
    assert await client.mig_data_read(1000) == MIG_DATA[16:] + b"tail"


async def test_concurrent_calls_are_routed_by_msg_id(client: Client, fake: FakeServer) -> None:
    fake.hold = 8  # the server answers in reverse order, 8 at a time
    results: dict[int, bytes] = {}

    async def reader(off: int) -> None:
        results[off] = await client.region_read(0, off, 2)

    async with trio.open_nursery() as n:
        for off in range(0, 16, 2):
            n.start_soon(reader, off)
    assert results == {off: bytes([off, off + 1]) for off in range(0, 16, 2)}
    assert client.in_flight == 0


async def test_pipeline(client: Client, fake: FakeServer) -> None:
    fake.hold = 50
    replies = await client.pipeline([RegionRead(i, 7, 1) for i in range(100)])
    assert [r.body.data for r in replies] == [bytes([i]) for i in range(100)]  # type: ignore[union-attr]
    assert len(fake.requests(RegionRead)) == 100

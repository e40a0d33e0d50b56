"""Guest RAM and the server->client DMA the client serves out of it."""

from __future__ import annotations

import errno

import pytest
import trio

from protocol import DmaMap, DmaMapFlags, DmaUnmap, DmaUnmapFlags
from vfiouser_srv.client import Client, MappedRange, VfioUserError

from .fake_server import FakeServer

PAGE = 0x1000


async def test_shared_ram_is_mapped_with_its_fd(client: Client, fake: FakeServer) -> None:
    win = await client.memory.add_ram(0x10000, 2 * PAGE)
    (req,) = fake.requests(DmaMap)
    assert (req.address, req.size, req.offset) == (0x10000, 2 * PAGE, 0)
    assert req.flags == DmaMapFlags.READ | DmaMapFlags.WRITE
    assert fake.windows[0x10000].map is not None  # it came with an fd
    client.memory.write(0x10000 + 5, b"hello")
    assert fake.shared_read(0x10000 + 5, 5) == b"hello"  # same memory, no message
    assert client.memory.mapped == [MappedRange(0x10000, 2 * PAGE, 3)]
    assert win.shared and win.end == 0x12000


async def test_message_mode_dma_read_and_write(client: Client, fake: FakeServer) -> None:
    await client.memory.add_ram(0x20000, PAGE, shared=False)
    (req,) = fake.requests(DmaMap)
    assert req.fd is None
    client.memory.write(0x20010, b"guest data")
    assert await fake.dma_read(0x20010, 10) == b"guest data"
    await fake.dma_write(0x20100, b"from the device")
    assert client.memory.read(0x20100, 15) == b"from the device"
    assert (client.memory.dma_reads, client.memory.dma_writes) == (1, 1)


async def test_dma_also_served_for_shared_windows(client: Client, fake: FakeServer) -> None:
    await client.memory.add_ram(0, PAGE)
    await fake.dma_write(8, b"\x01\x02")
    assert client.memory.read(8, 2) == b"\x01\x02" == fake.shared_read(8, 2)


async def test_dma_across_adjacent_windows(client: Client, fake: FakeServer) -> None:
    await client.memory.add_ram(0, PAGE, shared=False)
    await client.memory.add_ram(PAGE, PAGE, shared=False)
    await fake.dma_write(PAGE - 2, b"abcd")
    assert await fake.dma_read(PAGE - 2, 4) == b"abcd"
    assert client.memory.read(PAGE, 2) == b"cd"


async def test_dma_faults(client: Client, fake: FakeServer) -> None:
    await client.memory.add_ram(0x40000, PAGE, shared=False)
    # past the end of the only window, and nowhere near it
    for addr, n in ((0x40000 + PAGE - 2, 4), (0x90000, 1), (0x3FFFF, 2)):
        with pytest.raises(OSError) as ei:
            await fake.dma_read(addr, n)
        assert ei.value.errno == errno.EFAULT
    with pytest.raises(OSError) as ei:
        await fake.dma_write(0x90000, b"x")
    assert ei.value.errno == errno.EFAULT
    assert client.memory.dma_errors == 4
    # the connection survives faults
    assert await fake.dma_read(0x40000, 1) == b"\0"


async def test_ram_that_is_not_mapped_is_not_served(client: Client, fake: FakeServer) -> None:
    await client.memory.add_ram(0x50000, PAGE, dma_map=False)
    assert fake.requests(DmaMap) == []
    with pytest.raises(OSError) as ei:
        await fake.dma_read(0x50000, 4)
    assert ei.value.errno == errno.EFAULT
    # mapping it by hand (say, to test the server's checks) makes it served
    await client.dma_map(0x50000, PAGE, flags=DmaMapFlags.READ)
    assert await fake.dma_read(0x50000, 4) == bytes(4)
    with pytest.raises(OSError) as ei:
        await fake.dma_write(0x50000, b"ro")  # mapped read-only
    assert ei.value.errno == errno.EFAULT


async def test_unmap_stops_dma(client: Client, fake: FakeServer) -> None:
    await client.memory.add_ram(0, PAGE, shared=False)
    await client.memory.add_ram(PAGE, PAGE, shared=False)
    reply = await client.dma_unmap(0, PAGE)
    assert (reply.address, reply.size, reply.flags) == (0, PAGE, 0)
    with pytest.raises(OSError):
        await fake.dma_read(0, 1)
    assert await fake.dma_read(PAGE, 1) == b"\0"
    await client.dma_unmap_all()
    assert fake.requests(DmaUnmap)[-1] == DmaUnmap(DmaUnmapFlags.ALL, 0, 0)
    assert client.memory.mapped == [] and fake.windows == {}
    with pytest.raises(OSError):
        await fake.dma_read(PAGE, 1)
    assert client.memory.read(PAGE, 1) == b"\0"  # the RAM itself is still there


async def test_bus_master_off_gives_eio(client: Client, fake: FakeServer) -> None:
    await client.memory.add_ram(0, PAGE, shared=False)
    client.memory.bus_master = False
    with pytest.raises(OSError) as ei:
        await fake.dma_read(0, 4)
    assert ei.value.errno == errno.EIO
    client.memory.bus_master = True
    assert await fake.dma_read(0, 4) == bytes(4)


async def test_refused_map_releases_ram(client: Client, fake: FakeServer) -> None:
    await client.memory.add_ram(0, PAGE)
    await client.memory.remove_ram(0)
    assert client.memory.windows == [] and fake.windows == {}
    await client.dma_map(0x8000, PAGE)  # the server now has a map at 0x8000 ...
    with pytest.raises(VfioUserError) as ei:  # ... so it refuses this one with EEXIST
        await client.memory.add_ram(0x8000, PAGE)
    assert ei.value.errno == errno.EEXIST
    assert client.memory.windows == []


async def test_local_access_checks(client: Client) -> None:
    with pytest.raises(OSError) as ei:
        client.memory.read(0, 1)
    assert ei.value.errno == errno.EFAULT
    await client.memory.add_ram(0, PAGE, dma_map=False)
    with pytest.raises(OSError) as ei:
        client.memory.write(PAGE - 1, b"ab")
    assert ei.value.errno == errno.EFAULT


async def test_overlapping_ram_rejected_locally(client: Client) -> None:
    await client.memory.add_ram(0, 2 * PAGE)
    with pytest.raises(ValueError):
        await client.memory.add_ram(PAGE, PAGE)


async def test_many_large_dma_requests_in_flight(client: Client, fake: FakeServer) -> None:
    """Replies go through the writer task, so the reader keeps reading meanwhile."""
    size = 0x8000
    await client.memory.add_ram(0, 16 * size, shared=False)
    client.memory.write(0, bytes(range(256)) * (16 * size // 256))
    got: dict[int, bytes] = {}

    async def one(i: int) -> None:
        await fake.dma_write(i * size, bytes([i]) * size)
        got[i] = await fake.dma_read(i * size, size)

    async with trio.open_nursery() as n:
        for i in range(16):
            n.start_soon(one, i)
    assert got == {i: bytes([i]) * size for i in range(16)}

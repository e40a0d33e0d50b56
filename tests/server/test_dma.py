"""DMA through the real client: mmap'd windows (shared RAM) and DMA_READ/DMA_WRITE messages.

The Scratch device's DMA task moves data between guest RAM and its BAR2; the client's
`GuestMemory` counts the DMA messages it served, so each test can tell which path the
server really took.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct

import pytest
import trio

from devices.sdk.interface import RegionIndex
from protocol import (
    Capabilities,
    DmaMapFlags,
    DmaUnmap,
    DmaUnmapFlags,
    ErrorReply,
    RegionFlags,
    Reply,
    SparseMmapCap,
)
from vfiouser_srv.client import Client
from vfiouser_srv.server import Server

from ..engines.params import ENGINE_PARAMS
from . import models
from .conftest import MakeServer, container_of, open_client, python_engine_only, settle
from .models import Scratch

# Every test runs on both engines (tests/engines/params.py) unless marked python_engine_only;
# where the engines differ (vfiouser_srv/engines/libvfio_user/_parity.py) the test asserts
# what each engine does. `container_of` (the Python engine's window table) is checked on the
# Python engine only.
pytestmark = [
    pytest.mark.usefixtures("no_fd_leak"),
    pytest.mark.parametrize("engine", ENGINE_PARAMS),
]
PYTHON = "python"

BAR0 = int(RegionIndex.BAR0)
BAR2 = int(RegionIndex.BAR2)
CONFIG = int(RegionIndex.CONFIG)
PAGE = 4096
RAM = 0x100000
MODES = pytest.mark.parametrize("shared", [True, False], ids=["mmap", "messages"])


def u32(value: int) -> bytes:
    return struct.pack("<I", value)


def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


async def dma(
    c: Client, model: Scratch, address: int, length: int, off: int, ctrl: int
) -> tuple[int, int]:
    """Run one Scratch DMA and return (DMA_STATUS, DMA_ERRNO) as the client reads them."""
    await c.region_write(BAR0, models.DMA_ADDR, struct.pack("<Q", address))
    await c.region_write(BAR0, models.DMA_LEN, u32(length))
    await c.region_write(BAR0, models.DMA_OFF, u32(off))
    await c.region_write(BAR0, models.DMA_CTRL, u32(models.GO | ctrl))
    with trio.fail_after(5):
        await model.dma_done.wait()
    status = int.from_bytes(await c.region_read(BAR0, models.DMA_STATUS, 4), "little")
    err = int.from_bytes(await c.region_read(BAR0, models.DMA_ERRNO, 4), "little")
    # clear DONE/ERR (RW1C) for the next run
    await c.region_write(BAR0, models.DMA_STATUS, u32(models.DONE | models.ERR))
    return status, err


async def scratch(make_server: MakeServer, **kwargs: object) -> tuple[Server, Scratch]:
    model = Scratch()
    srv = await make_server({"s": model}, **kwargs)
    return srv, model


def memfd_mappings(name: str) -> int:
    """How many mappings of memfd `name` this process has (client and server alike)."""
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if f"/memfd:{name} " in line)


# ------------------------------------------------------------------ both directions


@MODES
async def test_dma_both_directions(make_server: MakeServer, shared: bool, engine: str) -> None:
    srv, model = await scratch(make_server)
    async with open_client(srv, "s") as c:
        await c.memory.add_ram(RAM, 4 * PAGE, shared=shared)
        if engine == PYTHON:
            window = next(iter(container_of(srv, "s")))
            assert window.mmapped is shared

        data = pattern(PAGE + 123)
        c.memory.write(RAM + 0x100, data)
        status, err = await dma(c, model, RAM + 0x100, len(data), 0x3000, 0)
        assert (status, err) == (models.DONE, 0)
        assert await c.region_read(BAR2, 0x3000, len(data)) == data
        assert bytes(model.mem.buf[0x3000 : 0x3000 + len(data)]) == data

        back = pattern(2 * PAGE, seed=99)
        await c.region_write(BAR2, 0x8000, back)
        status, err = await dma(c, model, RAM + PAGE, len(back), 0x8000, models.TO_RAM)
        assert (status, err) == (models.DONE, 0)
        assert c.memory.read(RAM + PAGE, len(back)) == back
        assert c.memory.read(RAM, 0x100) == bytes(0x100)  # nothing else was touched

        if shared:
            assert (c.memory.dma_reads, c.memory.dma_writes) == (0, 0)
        else:
            assert (c.memory.dma_reads, c.memory.dma_writes) == (1, 1)


async def test_message_dma_is_split_by_the_clients_max_data_xfer_size(
    make_server: MakeServer,
) -> None:
    srv, model = await scratch(make_server)
    caps = Capabilities(max_msg_fds=16, max_data_xfer_size=PAGE)
    async with open_client(srv, "s", caps=caps) as c:
        await c.memory.add_ram(RAM, 4 * PAGE, shared=False)
        data = pattern(3 * PAGE + 5)
        c.memory.write(RAM, data)
        assert await dma(c, model, RAM, len(data), 0x2000, 0) == (models.DONE, 0)
        assert bytes(model.mem.buf[0x2000 : 0x2000 + len(data)]) == data
        assert c.memory.dma_reads == 4
        assert await dma(c, model, RAM, len(data), 0x2000, models.TO_RAM) == (models.DONE, 0)
        assert c.memory.dma_writes == 4
        assert c.memory.dma_errors == 0


@pytest.mark.parametrize(
    ("first", "second"),
    [(True, True), (False, False), (True, False), (False, True)],
    ids=["mmap+mmap", "msg+msg", "mmap+msg", "msg+mmap"],
)
async def test_dma_spans_adjacent_windows(
    make_server: MakeServer, first: bool, second: bool
) -> None:
    srv, model = await scratch(make_server)
    async with open_client(srv, "s") as c:
        await c.memory.add_ram(RAM, PAGE, shared=first)
        await c.memory.add_ram(RAM + PAGE, PAGE, shared=second)
        data = pattern(PAGE, seed=3)
        c.memory.write(RAM + PAGE // 2, data)
        assert await dma(c, model, RAM + PAGE // 2, PAGE, 0x4000, 0) == (models.DONE, 0)
        assert bytes(model.mem.buf[0x4000 : 0x4000 + PAGE]) == data
        assert c.memory.dma_reads == (not first) + (not second)

        back = pattern(PAGE, seed=77)
        model.mem.buf[0x6000 : 0x6000 + PAGE] = back
        assert await dma(c, model, RAM + 16, PAGE, 0x6000, models.TO_RAM) == (models.DONE, 0)
        assert c.memory.read(RAM + 16, PAGE) == back
        assert c.memory.dma_writes == (not first) + (not second)

        # past the second window: nothing is moved at all in mmap mode, and it fails
        status, err = await dma(c, model, RAM + PAGE + 16, PAGE, 0x4000, 0)
        assert (status, err) == (models.ERR, errno.EFAULT)


# ------------------------------------------------------------------ permissions and faults


@MODES
async def test_device_write_to_read_only_window_fails_and_device_survives(
    make_server: MakeServer, shared: bool
) -> None:
    srv, model = await scratch(make_server)
    async with open_client(srv, "s") as c:
        await c.memory.add_ram(RAM, 2 * PAGE, shared=shared, flags=DmaMapFlags.READ)
        c.memory.write(RAM, pattern(2 * PAGE))
        model.mem.buf[0x2000 : 0x2000 + PAGE] = b"\xee" * PAGE
        status, err = await dma(c, model, RAM, PAGE, 0x2000, models.TO_RAM)
        assert (status, err) == (models.ERR, errno.EPERM)
        assert c.memory.read(RAM, 2 * PAGE) == pattern(2 * PAGE)
        assert c.memory.dma_writes == 0  # refused by the server, never asked for
        # reading the same window is allowed, and the device goes on working
        assert await dma(c, model, RAM, PAGE, 0x3000, 0) == (models.DONE, 0)
        assert bytes(model.mem.buf[0x3000 : 0x3000 + PAGE]) == pattern(2 * PAGE)[:PAGE]
        assert await c.region_read(BAR0, models.ID, 4) == u32(models.SCRATCH_ID)


async def test_write_only_window_cannot_be_read(make_server: MakeServer) -> None:
    srv, model = await scratch(make_server)
    async with open_client(srv, "s") as c:
        await c.memory.add_ram(RAM, PAGE, shared=True, flags=DmaMapFlags.WRITE)
        assert await dma(c, model, RAM, 16, 0x2000, 0) == (models.ERR, errno.EPERM)
        model.mem.buf[0x2000:0x2010] = b"w" * 16
        assert await dma(c, model, RAM, 16, 0x2000, models.TO_RAM) == (models.DONE, 0)
        assert c.memory.read(RAM, 16) == b"w" * 16


async def test_client_refusing_message_dma_fails_the_transfer(make_server: MakeServer) -> None:
    srv, model = await scratch(make_server)
    async with open_client(srv, "s") as c:
        await c.memory.add_ram(RAM, PAGE, shared=False)
        c.memory.bus_master = False  # QEMU answers DMA with an error while BM is off
        assert await dma(c, model, RAM, 64, 0x2000, 0) == (models.ERR, errno.EIO)
        assert await dma(c, model, RAM, 64, 0x2000, models.TO_RAM) == (models.ERR, errno.EIO)
        assert c.memory.dma_errors == 2
        c.memory.bus_master = True
        c.memory.write(RAM, b"ok" * 32)
        assert await dma(c, model, RAM, 64, 0x2000, 0) == (models.DONE, 0)
        assert bytes(model.mem.buf[0x2000:0x2040]) == b"ok" * 32


# ------------------------------------------------------------------ unmapping


async def test_unmap_all_removes_every_window(make_server: MakeServer, engine: str) -> None:
    srv, model = await scratch(make_server)
    async with open_client(srv, "s") as c:
        name = f"vfiouser-guest-ram-{RAM:#x}"
        assert memfd_mappings(name) == 0
        await c.memory.add_ram(RAM, PAGE, shared=True)
        await c.memory.add_ram(RAM + 0x10000, PAGE, shared=True)
        await c.memory.add_ram(RAM + 0x20000, PAGE, shared=False)
        container = container_of(srv, "s") if engine == PYTHON else None
        assert container is None or len(container) == 3
        assert memfd_mappings(name) == 2  # the client's and the server's

        reply = await c.dma_unmap_all()
        assert (reply.flags, reply.address, reply.size) == (DmaUnmapFlags.ALL, 0, 0)
        assert container is None or len(container) == 0
        assert memfd_mappings(name) == 1  # the server let go of its mapping
        for address in (RAM, RAM + 0x10000, RAM + 0x20000):
            assert await dma(c, model, address, 16, 0x2000, 0) == (models.ERR, errno.EFAULT)
        # unmap-all of nothing is fine; mapping again works
        await c.dma_unmap_all()
        await c.dma_map(RAM, PAGE, fd=c.memory.windows[0].fd)
        c.memory.write(RAM, b"again" + bytes(11))
        assert await dma(c, model, RAM, 16, 0x2000, 0) == (models.DONE, 0)
        assert bytes(model.mem.buf[0x2000:0x2005]) == b"again"


@python_engine_only("checks the Python engine's window table (container_of)")
async def test_unmap_waits_for_a_pinned_window(make_server: MakeServer) -> None:
    srv, model = await scratch(make_server)
    async with open_client(srv, "s") as c:
        await c.memory.add_ram(RAM, 2 * PAGE, shared=True)
        await c.memory.add_ram(RAM + 0x10000, PAGE, shared=True)
        model.mem.buf[0x2000:0x2010] = b"written-late-ok!"
        await c.region_write(BAR0, models.DMA_ADDR, struct.pack("<Q", RAM + 8))
        await c.region_write(BAR0, models.DMA_LEN, u32(16))
        await c.region_write(BAR0, models.DMA_OFF, u32(0x2000))
        await c.region_write(BAR0, models.DMA_CTRL, u32(models.GO | models.PIN | models.TO_RAM))
        with trio.fail_after(5):
            await model.pinned.wait()
        assert model.pinned_view

        unmap = await c.submit(DmaUnmap(0, RAM, 2 * PAGE))
        later = await c.submit(DmaUnmap(0, RAM + 0x10000, PAGE))  # strictly after it
        await settle()
        assert not unmap.done and not later.done, "unmap replied while DMA was in flight"
        container = container_of(srv, "s")
        assert container is not None

        model.unpin.set()
        with trio.fail_after(5):
            first = await unmap.wait_reply()
            second = await later.wait_reply()
        assert isinstance(first, Reply) and isinstance(second, Reply)
        assert (model.dma_cancelled, model.dma_runs) == (0, 1)  # released, not cancelled
        assert len(container) == 0
        # the device's last write through its pin landed before the window went
        assert c.memory.read(RAM + 8, 16) == b"written-late-ok!"
        status = await c.region_read(BAR0, models.DMA_STATUS, 4)
        assert int.from_bytes(status, "little") == models.DONE


@python_engine_only("checks the Python engine's window table (container_of)")
async def test_a_window_builds_no_event_until_an_unmap_waits(make_server: MakeServer) -> None:
    """A guest's IOMMU maps and unmaps windows back to back: a window is a slotted record
    with no trio.Event until an unmap has to wait for its pins (`Container.drain`), which
    the two tests around this one check still happens."""
    srv, _model = await scratch(make_server)
    async with open_client(srv, "s") as c:
        await c.memory.add_ram(RAM, PAGE, shared=True)
        await c.memory.add_ram(RAM + 0x10000, PAGE, shared=False)
        container = container_of(srv, "s")
        assert container is not None
        windows = list(container)
        assert [w.mode for w in windows] == ["mmap", "message"]
        assert [w.unpinned for w in windows] == [None, None]
        assert not any(hasattr(w, "__dict__") for w in windows)


async def test_unmap_all_waits_for_a_pinned_window(make_server: MakeServer) -> None:
    srv, model = await scratch(make_server)
    async with open_client(srv, "s") as c:
        await c.memory.add_ram(RAM, PAGE, shared=False)
        await c.memory.add_ram(RAM + PAGE, PAGE, shared=True)
        await c.region_write(BAR0, models.DMA_ADDR, struct.pack("<Q", RAM + PAGE))
        await c.region_write(BAR0, models.DMA_CTRL, u32(models.GO | models.PIN))
        with trio.fail_after(5):
            await model.pinned.wait()
        unmap = await c.submit(DmaUnmap(DmaUnmapFlags.ALL, 0, 0))
        await settle()
        assert not unmap.done
        model.unpin.set()
        with trio.fail_after(5):
            assert isinstance(await unmap.wait_reply(), Reply)
        assert model.dma_cancelled == 0


@python_engine_only(
    "libvfio-user quiesces before every DMA_UNMAP, so a waiting device task is waited for "
    "or cancelled (BEHAVIOUR_DIFFERENCES 'quiesce')"
)
async def test_message_windows_have_no_pins(make_server: MakeServer) -> None:
    """Nothing of a message-mode window is held by the device: unmap answers at once."""
    srv, model = await scratch(make_server)
    async with open_client(srv, "s") as c:
        await c.memory.add_ram(RAM, PAGE, shared=False)
        await c.region_write(BAR0, models.DMA_ADDR, struct.pack("<Q", RAM))
        await c.region_write(BAR0, models.DMA_CTRL, u32(models.GO | models.PIN))
        with trio.fail_after(5):
            await model.pinned.wait()
        assert not model.pinned_view
        with trio.fail_after(5):
            await c.dma_unmap(RAM, PAGE)
        assert model.dma_runs == 0  # the task is still waiting, untouched
        model.unpin.set()
        with trio.fail_after(5):
            await model.dma_done.wait()
        assert model.dma_cancelled == 0


@python_engine_only(
    "autojump_clock: the libvfio-user engine waits on worker threads (attach, message DMA), "
    "which the virtual clock jumps over, so its timeouts fire at once"
)
async def test_unmap_quiesces_a_device_that_never_lets_go(
    make_server: MakeServer, autojump_clock: trio.abc.Clock
) -> None:
    srv, model = await scratch(make_server)
    async with open_client(srv, "s") as c:
        await c.memory.add_ram(RAM, PAGE, shared=True)
        await c.region_write(BAR0, models.DMA_ADDR, struct.pack("<Q", RAM))
        await c.region_write(BAR0, models.DMA_CTRL, u32(models.GO | models.PIN))
        with trio.fail_after(5):
            await model.pinned.wait()
        start = trio.current_time()
        await c.dma_unmap(RAM, PAGE)  # the device task is cancelled, then the reply comes
        assert trio.current_time() - start >= 1.0
        assert model.dma_cancelled == 1
        assert await c.region_read(BAR0, models.DMA_STATUS, 4) == u32(0)  # not BUSY
        # the device's task group works again after the quiesce
        await c.memory.remove_ram(RAM, unmap=False)
        await c.memory.add_ram(RAM, PAGE, shared=True)
        c.memory.write(RAM, b"fresh" + bytes(11))
        assert await dma(c, model, RAM, 16, 0x2000, 0) == (models.DONE, 0)
        assert bytes(model.mem.buf[0x2000:0x2005]) == b"fresh"


# ------------------------------------------------------------------ big region accesses


@python_engine_only(
    "libvfio-user cannot read a 1 MiB body (BEHAVIOUR_DIFFERENCES 'large messages')"
)
async def test_one_mib_region_write_and_read_on_the_shared_bar(make_server: MakeServer) -> None:
    srv, model = await scratch(make_server)
    size = 1 << 20
    async with open_client(srv, "s") as c:
        assert c.server_caps.max_data_xfer_size == size
        info = await c.region_info(BAR2)
        try:
            assert info.size == models.BAR2_SIZE
            assert info.flags & RegionFlags.MMAP and info.flags & RegionFlags.READ
            assert info.flags & RegionFlags.WRITE
            assert info.caps == (SparseMmapCap(((0, 0x1000), (0x2000, models.BAR2_SIZE - 0x2000))),)
            assert info.fd is not None
            mm = mmap.mmap(info.fd.fileno(), info.size, offset=info.offset)
        finally:
            if info.fd is not None:
                info.fd.close()
        try:
            data = os.urandom(size)
            await c.region_write(BAR2, size, data)  # the whole upper half, in one message
            assert mm[size : 2 * size] == data  # the client's own mmap sees it
            assert bytes(model.mem.buf[size : 2 * size]) == data
            assert await c.region_read(BAR2, size, size) == data
            # and the other way: written through the mapping, read as one message
            other = os.urandom(size)
            mm[size : 2 * size] = other
            assert await c.region_read(BAR2, size, size) == other
            # a big access across the trapped MSI-X page is served piecewise
            chunk = await c.region_read(BAR2, 0, 0x3000)
            assert chunk[0x1000 + 12 : 0x1000 + 16] == u32(1)  # vector 0 masked at reset
        finally:
            mm.close()


@python_engine_only(
    "256 KiB bodies sent in pieces by a client in the same thread: libvfio-user's blocking "
    "body recv stalls it (BEHAVIOUR_DIFFERENCES 'large messages', 'split frames')"
)
async def test_big_messages_pipelined_in_both_directions(make_server: MakeServer) -> None:
    srv, model = await scratch(make_server)
    async with open_client(srv, "s") as c:
        blocks = [os.urandom(256 << 10) for _ in range(4)]
        async with trio.open_nursery() as n:
            for i, block in enumerate(blocks):
                n.start_soon(c.region_write, BAR2, 0x2000 + i * len(block), block)
        results: list[bytes] = [b""] * 4

        async def read(i: int) -> None:
            results[i] = await c.region_read(BAR2, 0x2000 + i * len(blocks[i]), len(blocks[i]))

        async with trio.open_nursery() as n:
            for i in range(4):
                n.start_soon(read, i)
        assert results == blocks
        assert bytes(model.mem.buf[0x2000 : 0x2000 + (1 << 20)]) == b"".join(blocks)


# ------------------------------------------------------------------ posted writes


async def test_posted_writes_are_applied_before_the_next_reply(make_server: MakeServer) -> None:
    srv, model = await scratch(make_server)
    async with open_client(srv, "s") as c:
        for value in range(1, 40):
            await c.region_write(BAR0, models.SCRATCH, u32(value), posted=True)
        assert await c.region_read(BAR0, models.SCRATCH, 4) == u32(39)
        await c.region_write(BAR2, 0x5000, b"posted!!", posted=True)
        assert await c.region_read(BAR2, 0x5000, 8) == b"posted!!"
        # a posted config write, then a non-region command: still in order
        await c.region_write(CONFIG, 4, struct.pack("<H", 0x0006), posted=True)
        info = await c.region_info(CONFIG)
        assert info.size == 256
        assert await c.region_read(CONFIG, 4, 2) == struct.pack("<H", 0x0006)
        # a posted write that starts a DMA: the task runs after it, data lands
        await c.memory.add_ram(RAM, PAGE, shared=False)
        c.memory.write(RAM, b"dma-posted")
        await c.region_write(BAR0, models.DMA_ADDR, struct.pack("<Q", RAM), posted=True)
        await c.region_write(BAR0, models.DMA_LEN, u32(10), posted=True)
        await c.region_write(BAR0, models.DMA_OFF, u32(0x7000), posted=True)
        await c.region_write(BAR0, models.DMA_CTRL, u32(models.GO), posted=True)
        assert await c.region_read(BAR0, models.DMA_LEN, 4) == u32(10)
        with trio.fail_after(5):
            await model.dma_done.wait()
        assert bytes(model.mem.buf[0x7000:0x700A]) == b"dma-posted"
        assert c.unexpected == []


async def test_edu_posted_write_then_read(server: Server) -> None:
    from devices.edu import Reg

    async with open_client(server) as c:
        for value in (0, 1, 0xDEADBEEF, 0xFFFFFFFF):
            await c.region_write(BAR0, Reg.LIVENESS, u32(value), posted=True)
            assert await c.region_read(BAR0, Reg.LIVENESS, 4) == u32(~value & 0xFFFFFFFF)


async def test_pipelined_maps_before_get_info_are_processed_in_order(
    make_server: MakeServer, engine: str
) -> None:
    """QEMU's burst (DESIGN 2.2): many DMA_MAPs pipelined, then DEVICE_GET_INFO."""
    from protocol import DeviceGetInfo, DmaMap

    srv, _model = await scratch(make_server)
    async with open_client(srv, "s") as c:
        rw = DmaMapFlags.READ | DmaMapFlags.WRITE
        bodies = [DmaMap(rw, 0, i * 0x10000, PAGE) for i in range(64)]
        bodies.append(DmaMap(DmaMapFlags.READ, 0, 0x10000, PAGE))  # overlaps #1: EEXIST
        replies = await c.pipeline([*bodies, DeviceGetInfo()])
        assert all(isinstance(r, Reply) for r in replies[:64])
        # PARITY_DIFFERENCES "dma_map.overlap": libvfio-user answers EINVAL
        overlap = errno.EEXIST if engine == PYTHON else errno.EINVAL
        assert isinstance(replies[64], ErrorReply) and replies[64].errno == overlap
        assert isinstance(replies[65], Reply)
        if engine == PYTHON:
            assert len(container_of(srv, "s")) == 64

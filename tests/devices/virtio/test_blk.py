"""virtio-blk against a fake DMA port: the transport's registers and negotiation, then I/O."""

from __future__ import annotations

import contextlib
import errno
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import trio

from devices.sdk import DmaError, IrqIndex
from devices.virtio import transport as t
from devices.virtio.blk import SECTOR, BlkFeature, ReqStatus, ReqType, VirtioBlk
from devices.virtio.transport import Feature, Status

from ..fakes import FakeContext
from ..helpers import cfg_read
from .driver import Driver

HDR = 0x40000
DATA = 0x41000
STATUS_BYTE = 0x50000
BASIC = int(Feature.VERSION_1 | Feature.RING_EVENT_IDX | Feature.RING_INDIRECT_DESC
            | BlkFeature.FLUSH | BlkFeature.DISCARD | BlkFeature.WRITE_ZEROES)


def attach(dev: VirtioBlk, ctx: FakeContext) -> Driver:
    dev.attach(ctx)
    return Driver(dev, ctx.dma.ram)


def test_identity_and_capabilities() -> None:
    dev = VirtioBlk(size=1 << 20)
    assert cfg_read(dev, 0, 2) == 0x1AF4 and cfg_read(dev, 2, 2) == 0x1042
    assert cfg_read(dev, 8, 1) == 1  # modern-only revision
    drv = Driver(dev, bytearray())
    assert set(drv.caps) == {t.CfgType.COMMON, t.CfgType.ISR, t.CfgType.DEVICE,
                             t.CfgType.NOTIFY}
    assert drv.notify_mult == 4
    assert drv.devcfg(0, 8) == (1 << 20) // SECTOR
    assert drv.devcfg(20, 4) == SECTOR


def test_features_offered_and_negotiation_rules() -> None:
    dev = VirtioBlk(size=1 << 20)
    drv = Driver(dev, bytearray())
    offered = drv.features()
    for bit in (Feature.VERSION_1, Feature.RING_EVENT_IDX, Feature.RING_INDIRECT_DESC,
                BlkFeature.FLUSH, BlkFeature.DISCARD, BlkFeature.WRITE_ZEROES):
        assert offered & bit
    assert not offered & BlkFeature.MQ
    assert not drv.negotiate(int(BlkFeature.FLUSH)), "VERSION_1 is mandatory"
    assert not drv.negotiate(int(Feature.VERSION_1) | 1 << 40), "unoffered bit"
    assert drv.negotiate(int(Feature.VERSION_1))
    # Frozen after FEATURES_OK.
    drv.wr(t.DRIVER_FEATURE_SELECT, 4, 0)
    drv.wr(t.DRIVER_FEATURE, 4, 0xFFFF_FFFF)
    assert drv.rd(t.DRIVER_FEATURE, 4) == 0


def test_queue_registers_and_reset() -> None:
    dev = VirtioBlk(size=1 << 20, queues=2, queue_size=64)
    drv = Driver(dev, bytearray())
    assert drv.rd(t.NUM_QUEUES, 2) == 2
    assert drv.features() & BlkFeature.MQ
    drv.wr(t.QUEUE_SELECT, 2, 1)
    assert drv.rd(t.QUEUE_SIZE, 2) == 64
    assert drv.rd(t.QUEUE_NOTIFY_OFF, 2) == 1
    drv.wr(t.QUEUE_SIZE, 2, 48)  # not a power of two: refused
    assert drv.rd(t.QUEUE_SIZE, 2) == 64
    drv.wr(t.QUEUE_SIZE, 2, 16)
    drv.wr(t.QUEUE_DESC, 4, 0x1234_5000)
    drv.wr(t.QUEUE_DESC + 4, 4, 0x1)
    assert drv.rd(t.QUEUE_DESC, 8) == 0x1_1234_5000
    drv.wr(t.QUEUE_MSIX_VECTOR, 2, 2)
    assert drv.rd(t.QUEUE_MSIX_VECTOR, 2) == 2
    drv.wr(t.QUEUE_MSIX_VECTOR, 2, 7)  # beyond the table: NO_VECTOR
    assert drv.rd(t.QUEUE_MSIX_VECTOR, 2) == t.NO_VECTOR
    drv.wr(t.QUEUE_ENABLE, 2, 1)
    drv.wr(t.QUEUE_SIZE, 2, 8)  # enabled queues are frozen
    assert drv.rd(t.QUEUE_SIZE, 2) == 16 and drv.rd(t.QUEUE_ENABLE, 2) == 1
    drv.wr(t.QUEUE_SELECT, 2, 5)  # no such queue: reads 0
    assert drv.rd(t.QUEUE_SIZE, 2) == 0
    drv.wr(t.DEVICE_STATUS, 1, 0)
    assert drv.status() == 0
    drv.wr(t.QUEUE_SELECT, 2, 1)
    assert drv.rd(t.QUEUE_SIZE, 2) == 64 and drv.rd(t.QUEUE_ENABLE, 2) == 0


def request(drv: Driver, q: int, rtype: int, sector: int, *, data: bytes = b"",
            read_len: int = 0, indirect: bool = False) -> int:
    ram = drv.ram
    struct.pack_into("<IIQ", ram, HDR, rtype, 0, sector)
    readable = [(HDR, 16)]
    if data:
        ram[DATA : DATA + len(data)] = data
        readable.append((DATA, len(data)))
    writable = [(DATA, read_len)] if read_len else []
    writable.append((STATUS_BYTE, 1))
    ram[STATUS_BYTE] = 0xFF
    head = drv.rings[q].add(readable, writable, indirect_at=0x60000 if indirect else None)
    drv.kick(q)
    return head


async def test_write_read_flush_getid_round_trip(ctx: FakeContext, tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    dev = VirtioBlk(path=str(img), size=1 << 20, serial="vfu-serial")
    drv = attach(dev, ctx)
    drv.setup(BASIC)
    payload = os.urandom(4 * SECTOR)
    head = request(drv, 0, ReqType.OUT, 8, data=payload)
    assert await drv.wait_used(0) == [(head, 1)]
    assert drv.ram[STATUS_BYTE] == ReqStatus.OK
    head = request(drv, 0, ReqType.FLUSH, 0)
    assert await drv.wait_used(0) == [(head, 1)]
    assert img.read_bytes()[8 * SECTOR : 12 * SECTOR] == payload
    drv.ram[DATA : DATA + len(payload)] = bytes(len(payload))
    head = request(drv, 0, ReqType.IN, 8, read_len=len(payload), indirect=True)
    assert await drv.wait_used(0) == [(head, len(payload) + 1)]
    assert bytes(drv.ram[DATA : DATA + len(payload)]) == payload
    head = request(drv, 0, ReqType.GET_ID, 0, read_len=20)
    assert await drv.wait_used(0) == [(head, 21)]
    assert bytes(drv.ram[DATA : DATA + 20]).rstrip(b"\0") == b"vfu-serial"
    # MSI-X vector 1 for queue 0
    assert (IrqIndex.MSIX, 1) in ctx.irq.triggers
    dev.close()


async def test_discard_write_zeroes_errors_and_unsupported(ctx: FakeContext) -> None:
    dev = VirtioBlk(size=1 << 20)
    drv = attach(dev, ctx)
    drv.setup(BASIC)
    request(drv, 0, ReqType.OUT, 0, data=b"\xaa" * (4 * SECTOR))
    await drv.wait_used(0)
    seg = struct.pack("<QII", 1, 2, 0)
    request(drv, 0, ReqType.WRITE_ZEROES, 0, data=seg)
    await drv.wait_used(0)
    assert drv.ram[STATUS_BYTE] == ReqStatus.OK
    request(drv, 0, ReqType.IN, 0, read_len=4 * SECTOR)
    await drv.wait_used(0)
    got = bytes(drv.ram[DATA : DATA + 4 * SECTOR])
    assert got == b"\xaa" * SECTOR + bytes(2 * SECTOR) + b"\xaa" * SECTOR
    request(drv, 0, ReqType.DISCARD, 0, data=struct.pack("<QII", 0, 1, 0))
    await drv.wait_used(0)
    assert drv.ram[STATUS_BYTE] == ReqStatus.OK
    request(drv, 0, ReqType.IN, (1 << 20) // SECTOR, read_len=SECTOR)  # past the end
    await drv.wait_used(0)
    assert drv.ram[STATUS_BYTE] == ReqStatus.IOERR
    request(drv, 0, 99, 0)
    await drv.wait_used(0)
    assert drv.ram[STATUS_BYTE] == ReqStatus.UNSUPP


async def test_readonly_refuses_writes(ctx: FakeContext) -> None:
    dev = VirtioBlk(size=1 << 20, readonly=True)
    drv = attach(dev, ctx)
    assert drv.features() & BlkFeature.RO
    drv.setup(BASIC | BlkFeature.RO)
    request(drv, 0, ReqType.OUT, 0, data=bytes(SECTOR))
    await drv.wait_used(0)
    assert drv.ram[STATUS_BYTE] == ReqStatus.IOERR


async def test_multiqueue(ctx: FakeContext) -> None:
    dev = VirtioBlk(size=1 << 20, queues=2)
    drv = attach(dev, ctx)
    drv.setup(BASIC | BlkFeature.MQ)
    head = request(drv, 1, ReqType.FLUSH, 0)
    assert await drv.wait_used(1) == [(head, 1)]
    assert (IrqIndex.MSIX, 2) in ctx.irq.triggers
    assert drv.rings[0].take_used() == []


async def test_intx_fallback_and_isr(ctx: FakeContext) -> None:
    dev = VirtioBlk(size=1 << 20)
    drv = attach(dev, ctx)
    drv.setup(BASIC, msix=False)
    request(drv, 0, ReqType.FLUSH, 0)
    await drv.wait_used(0)
    assert ctx.irq.intx
    assert drv.isr() == 1  # queue interrupt; reading acknowledges it
    assert not ctx.irq.intx
    assert drv.isr() == 0


async def test_malformed_chain_sets_needs_reset_and_reset_recovers(ctx: FakeContext) -> None:
    dev = VirtioBlk(size=1 << 20)
    drv = attach(dev, ctx)
    drv.setup(BASIC)
    ring = drv.rings[0]
    ring.write_desc(ring.desc, 0, HDR, 16, 1, 0)  # NEXT pointing at itself
    ring.publish(0)
    drv.kick(0)
    for _ in range(100):
        if drv.status() & Status.DEVICE_NEEDS_RESET:
            break
        await trio.sleep(0.001)
    assert drv.status() & Status.DEVICE_NEEDS_RESET
    assert (IrqIndex.MSIX, 0) in ctx.irq.triggers  # config-change vector
    await drv.reset()
    drv.setup(BASIC)
    head = request(drv, 0, ReqType.FLUSH, 0)
    assert await drv.wait_used(0) == [(head, 1)]


async def test_reset_waits_for_workers_then_reads_zero(ctx: FakeContext) -> None:
    dev = VirtioBlk(size=1 << 20)
    drv = attach(dev, ctx)
    drv.setup(BASIC)
    await drv.reset()
    assert drv.status() == 0 and dev._live_workers == 0


async def test_function_level_reset(ctx: FakeContext) -> None:
    dev = VirtioBlk(size=1 << 20)
    drv = attach(dev, ctx)
    drv.setup(BASIC)
    for scope in list(dev._workers):
        scope.cancel()
    await trio.sleep(0.01)
    dev.reset()
    assert drv.status() == 0
    assert cfg_read(dev, 4, 2) == 0


async def test_transient_unmapped_memory_is_retried(ctx: FakeContext) -> None:
    """QEMU unmaps and remaps guest RAM while firmware runs: a gap must not break the disk."""
    dev = VirtioBlk(size=1 << 20)
    drv = attach(dev, ctx)
    drv.setup(BASIC)
    real_view = ctx.dma.view
    gap = {"left": 5}

    def flaky_view(address: int, size: int, *, write: bool = False) -> memoryview | None:
        if gap["left"] > 0:
            gap["left"] -= 1
            raise DmaError(errno.EFAULT, "not mapped (remap in progress)")
        return real_view(address, size, write=write)

    ctx.dma.view = flaky_view  # type: ignore[method-assign]
    head = request(drv, 0, ReqType.FLUSH, 0)
    assert await drv.wait_used(0) == [(head, 1)]
    assert not drv.status() & Status.DEVICE_NEEDS_RESET


async def test_memory_that_never_gets_mapped_needs_reset(ctx: FakeContext,
                                                         autojump_clock: object) -> None:
    dev = VirtioBlk(size=1 << 20)
    drv = attach(dev, ctx)
    drv.setup(BASIC)
    ring = drv.rings[0]
    ring.write_desc(ring.desc, 0, 1 << 40, 16, 1, 1)
    ring.write_desc(ring.desc, 1, STATUS_BYTE, 1, 2, 0)
    ring.publish(0)
    drv.kick(0)
    with trio.fail_after(60):
        while not drv.status() & Status.DEVICE_NEEDS_RESET:
            await trio.sleep(0.5)


async def test_zero_copy_requests_leave_no_view_of_guest_memory(ctx: FakeContext,
                                                                 tmp_path: Path) -> None:
    """Writes go to the file straight from pinned guest memory and reads that miss the
    page cache land there directly; once a request completed, no view of guest memory may
    remain (the engine could not close a window's mmap on DMA_UNMAP otherwise). A
    bytearray with a live view refuses to resize, which is what this checks."""
    img = tmp_path / "disk.img"
    dev = VirtioBlk(path=str(img), size=1 << 20)
    dev.backend.readinto_nowait = lambda offset, bufs: 0  # type: ignore[method-assign]
    ram, real_pin, leaked = ctx.dma.ram, ctx.dma.pin, []

    @contextlib.contextmanager
    def checking_pin(address: int, size: int, *,
                     write: bool = False) -> Iterator[memoryview | None]:
        # When a pin goes, nothing derived from its view may be left (the engine's unmap
        # would fail to close the mmap): the fake's RAM must be resizable again.
        with real_pin(address, size, write=write) as view:
            try:
                yield view
            finally:
                assert view is not None
                view.release()
                try:
                    ram.append(0)
                    ram.pop()
                except BufferError:
                    leaked.append((address, size))

    ctx.dma.pin = checking_pin  # type: ignore[method-assign]
    drv = attach(dev, ctx)
    drv.setup(BASIC)
    payload = os.urandom(8 * SECTOR)
    head = request(drv, 0, ReqType.OUT, 16, data=payload)
    assert await drv.wait_used(0) == [(head, 1)]
    assert img.read_bytes()[16 * SECTOR : 24 * SECTOR] == payload
    drv.ram[DATA : DATA + len(payload)] = bytes(len(payload))
    head = request(drv, 0, ReqType.IN, 16, read_len=len(payload), indirect=True)
    assert await drv.wait_used(0) == [(head, len(payload) + 1)]
    assert bytes(drv.ram[DATA : DATA + len(payload)]) == payload
    assert leaked == [] and ctx.dma.pins == 0
    dev.close()

"""virtio-blk writes started from the notify handler (`devices/virtio/blkinline.py`): the
backend thread starts before the register write returns and the completion is posted from
its hand-back; ring order and FLUSH wait for it, a reset posts nothing after itself, the
payload stays pinned until the thread is back (also when the worker is cancelled, as at a
detach), a saved state lists the write in flight, and one notify starts a bounded share."""

from __future__ import annotations

import errno
import os
import struct
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio

from devices.sdk import DmaError, IrqIndex
from devices.sdk.bits import BytesLike
from devices.virtio import transport as t
from devices.virtio.blk import (
    INLINE_CHAINS,
    INLINE_WRITE_BYTES,
    SECTOR,
    BlkFeature,
    ReqStatus,
    ReqType,
    VirtioBlk,
)

from ..fakes import FakeContext
from .driver import Driver, count_batches
from .test_blk import BASIC, attach

HDRS, STATUSES, PAYLOAD = 0x100000, 0x110000, 0x200000


class Gate:
    """Wraps the backend: records calls in order; writes wait until `open()`."""

    def __init__(self, dev: VirtioBlk, *, fail: bool = False) -> None:
        self.calls: list[str] = []
        self.started = threading.Event()
        self._open = threading.Event()
        be = dev.backend
        write, flush = be.write, be.flush

        def gated_write(offset: int, bufs: Sequence[BytesLike]) -> None:
            self.calls.append("write")
            self.started.set()
            assert self._open.wait(10)
            if fail:
                raise OSError(errno.EIO, "disk on fire")
            write(offset, bufs)

        def counted_flush() -> None:
            self.calls.append("flush")
            flush()

        be.write = gated_write  # type: ignore[method-assign]
        be.flush = counted_flush  # type: ignore[method-assign]

    def open(self) -> None:
        self._open.set()


def add(drv: Driver, i: int, rtype: int, sector: int, nbytes: int = 0) -> int:
    """Request `i` (header and status byte of its own; any payload is the one buffer at
    PAYLOAD), made available without a kick."""
    hdr, status = HDRS + 16 * i, STATUSES + i
    struct.pack_into("<IIQ", drv.ram, hdr, rtype, 0, sector)
    readable = [(hdr, 16)] + ([(PAYLOAD, nbytes)] if nbytes else [])
    drv.ram[status] = 0xFF
    return drv.rings[0].add(readable, [(status, 1)])


async def parked(dev: VirtioBlk) -> None:
    with trio.fail_after(5):
        while not dev._parked[0]:
            await trio.sleep(0.001)


async def device(nursery: trio.Nursery, tmp_path: Path, features: int = BASIC,
                 ) -> tuple[VirtioBlk, Driver, FakeContext, Path]:
    ctx = FakeContext(nursery, ram_size=4 << 20)
    img = tmp_path / "disk.img"
    dev = VirtioBlk(path=str(img), size=8 << 20, poll_us=0)
    drv = attach(dev, ctx)
    drv.setup(features, size=256)
    await parked(dev)
    return dev, drv, ctx, img


async def test_a_write_completes_from_its_threads_hand_back(nursery: trio.Nursery,
                                                            tmp_path: Path) -> None:
    dev, drv, ctx, img = await device(nursery, tmp_path)
    batches = count_batches(dev)
    gate = Gate(dev)
    payload = os.urandom(64 * SECTOR)
    drv.ram[PAYLOAD : PAYLOAD + len(payload)] = payload
    drv.rings[0].set_used_event(0)
    head = add(drv, 0, ReqType.OUT, 16, len(payload))
    drv.kick(0)
    # no checkpoint since the kick, so no task ran: the handler started the thread itself
    assert gate.started.wait(5)
    assert ctx.dma.pins == 1  # the payload, read by the thread straight from guest memory
    await trio.sleep(0.02)
    assert drv.rings[0].take_used() == []  # not before the write returned
    assert drv.ram[STATUSES] == 0xFF
    before = len(ctx.irq.triggers)
    gate.open()
    assert await drv.wait_used(0) == [(head, 1)]
    assert drv.ram[STATUSES] == ReqStatus.OK
    assert ctx.irq.triggers[before:] == [(IrqIndex.MSIX, 1)]
    assert img.read_bytes()[16 * SECTOR : 80 * SECTOR] == payload
    assert batches == []  # never the worker's batch
    assert ctx.dma.pins == 0
    assert dev.queues[0].in_flight == 0
    dev.close()


async def test_flush_after_an_inline_write_waits_for_it(nursery: trio.Nursery,
                                                         tmp_path: Path) -> None:
    dev, drv, _, _ = await device(nursery, tmp_path)
    gate = Gate(dev)
    write = add(drv, 0, ReqType.OUT, 0, SECTOR)
    drv.kick(0)
    assert gate.started.wait(5)
    flush = add(drv, 1, ReqType.FLUSH, 0)
    read = add(drv, 2, ReqType.IN, 0)  # (no data buffer: an IOERR, in ring order too)
    drv.kick(0)
    await trio.sleep(0.05)  # the worker woke: it must not pop past the running write
    assert drv.rings[0].take_used() == []
    assert gate.calls == ["write"]
    gate.open()
    assert await drv.wait_used(0, 3) == [(write, 1), (flush, 1), (read, 1)]
    assert gate.calls == ["write", "flush"]
    assert drv.ram[STATUSES] == drv.ram[STATUSES + 1] == ReqStatus.OK
    dev.close()


async def test_write_through_is_flushed_before_the_hand_back_completes(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    dev, drv, _, _ = await device(nursery, tmp_path, BASIC & ~int(BlkFeature.FLUSH))
    gate = Gate(dev)
    gate.open()
    head = add(drv, 0, ReqType.OUT, 0, SECTOR)
    drv.kick(0)
    assert gate.started.wait(5)
    assert await drv.wait_used(0) == [(head, 1)]
    assert gate.calls == ["write", "flush"]
    dev.close()


async def test_a_failed_write_is_an_ioerr_and_fails_the_device(nursery: trio.Nursery,
                                                                tmp_path: Path) -> None:
    dev, drv, ctx, _ = await device(nursery, tmp_path)
    gate = Gate(dev, fail=True)
    gate.open()
    head = add(drv, 0, ReqType.OUT, 0, SECTOR)
    drv.kick(0)
    assert gate.started.wait(5)
    assert await drv.wait_used(0) == [(head, 1)]
    assert drv.ram[STATUSES] == ReqStatus.IOERR
    assert ctx.failures and "disk on fire" in ctx.failures[0]
    dev.close()


async def test_reset_during_an_inline_write_posts_nothing_after(nursery: trio.Nursery,
                                                                tmp_path: Path) -> None:
    dev, drv, ctx, _ = await device(nursery, tmp_path)
    gate = Gate(dev)
    add(drv, 0, ReqType.OUT, 0, SECTOR)
    drv.kick(0)
    assert gate.started.wait(5)
    drv.wr(t.DEVICE_STATUS, 1, 0)
    await trio.sleep(0.05)
    assert drv.status() != 0  # the write still runs: the driver must keep waiting
    triggers = len(ctx.irq.triggers)
    gate.open()
    with trio.fail_after(5):
        while drv.status():
            await trio.sleep(0.001)
    await trio.sleep(0.02)
    assert drv.rings[0].used_idx() == 0  # no used entry written after the reset ...
    assert drv.ram[STATUSES] == 0xFF  # ... nor a status byte ...
    assert ctx.irq.triggers[triggers:] == []  # ... nor an interrupt
    assert ctx.dma.pins == 0
    assert dev.queues[0].in_flight == 0
    # and the device works again after the driver set it up anew
    drv.rings.clear()
    drv.setup(BASIC, size=256)
    await parked(dev)
    head = add(drv, 1, ReqType.OUT, 0, SECTOR)
    drv.kick(0)
    assert await drv.wait_used(0) == [(head, 1)]
    dev.close()


async def test_a_cancelled_worker_waits_for_the_write_and_its_pins(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    """What an engine does at a detach, an FLR or a DMA_UNMAP that timed out: cancel the
    device's tasks and wait for them. The worker ends only after the thread is back, and
    the payload's pin (what keeps an unmap waiting) lasts until then."""
    dev, drv, ctx, _ = await device(nursery, tmp_path)
    gate = Gate(dev)
    head = add(drv, 0, ReqType.OUT, 0, SECTOR)
    for scope in list(dev._workers):
        scope.cancel()  # (delivered when the worker next runs: after this kick)
    drv.kick(0)
    assert gate.started.wait(5)
    await trio.sleep(0.05)
    assert dev._live_workers == 1
    assert ctx.dma.pins == 1
    gate.open()
    with trio.fail_after(5):
        while dev._live_workers:
            await trio.sleep(0.001)
    assert ctx.dma.pins == 0
    # the client is still attached: the write that was done is completed, not lost
    assert drv.rings[0].take_used() == [(head, 1)]
    dev.detach()
    dev.close()


async def test_state_saved_with_a_started_write_lists_it_in_flight(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    dev, drv, _, _ = await device(nursery, tmp_path)
    gate = Gate(dev)
    head = add(drv, 0, ReqType.OUT, 0, SECTOR)
    drv.kick(0)
    assert gate.started.wait(5)
    saved = dev.save_model_state()
    queue = saved["transport"]["queues"][0]  # type: ignore[index,call-overload]
    assert queue["in_flight"] == [{"head": head, "at": 0}]  # a load redoes it
    quiesced = trio.Event()

    async def quiesce() -> None:
        await dev.quiesce()
        quiesced.set()

    nursery.start_soon(quiesce)
    await trio.sleep(0.05)
    assert not quiesced.is_set()  # quiesce waits for the write
    gate.open()
    with trio.fail_after(5):
        await quiesced.wait()
    assert drv.rings[0].take_used() == [(head, 1)]
    saved = dev.save_model_state()
    assert saved["transport"]["queues"][0]["in_flight"] == []  # type: ignore[index,call-overload]
    dev.close()


async def test_one_notify_starts_a_bounded_share_of_writes(nursery: trio.Nursery,
                                                           tmp_path: Path) -> None:
    dev, drv, _, _ = await device(nursery, tmp_path)
    gate = Gate(dev)
    big = 1 << 20
    heads = [add(drv, i, ReqType.OUT, 0, big) for i in range(8)]
    drv.kick(0)
    assert gate.started.wait(5)
    started = dev._started[0]
    assert started is not None and len(started.reqs) == INLINE_WRITE_BYTES // big
    gate.open()
    assert [h for h, _ in await drv.wait_used(0, 8)] == heads
    await parked(dev)
    gate = Gate(dev)
    heads = [add(drv, i, ReqType.OUT, 0, SECTOR) for i in range(INLINE_CHAINS + 8)]
    drv.kick(0)
    assert gate.started.wait(5)
    started = dev._started[0]
    assert started is not None and len(started.reqs) == INLINE_CHAINS
    gate.open()
    assert [h for h, _ in await drv.wait_used(0, INLINE_CHAINS + 8)] == heads
    dev.close()


async def test_a_ring_unmapped_at_hand_back_gives_the_write_back(
        nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """QEMU remaps guest RAM (DMA_UNMAP then DMA_MAP) while the thread runs: the hand-back
    finds the used ring unmapped, writes nothing, and the worker redoes the write (block
    writes are idempotent) and completes it once."""
    dev, drv, ctx, img = await device(nursery, tmp_path)
    gate = Gate(dev)
    drv.ram[PAYLOAD : PAYLOAD + SECTOR] = b"\x77" * SECTOR
    head = add(drv, 0, ReqType.OUT, 3, SECTOR)
    drv.kick(0)
    assert gate.started.wait(5)
    job = dev._started[0]
    assert job is not None
    used = drv.rings[0].used
    view = ctx.dma.view
    unmapped = True

    def gapped(address: int, size: int, *, write: bool = False) -> memoryview | None:
        if unmapped and address == used:
            raise DmaError(errno.EFAULT, "remapping")
        return view(address, size, write=write)

    monkeypatch.setattr(ctx.dma, "view", gapped)
    gate.open()
    with trio.fail_after(5):
        await job.done.wait()
    assert not job.posted
    assert drv.ram[STATUSES] == 0xFF
    unmapped = False
    assert await drv.wait_used(0) == [(head, 1)]
    await trio.sleep(0.02)
    assert drv.rings[0].take_used() == []  # once
    assert gate.calls == ["write", "write"]
    assert drv.ram[STATUSES] == ReqStatus.OK
    assert img.read_bytes()[3 * SECTOR : 4 * SECTOR] == b"\x77" * SECTOR
    assert ctx.dma.pins == 0
    dev.close()

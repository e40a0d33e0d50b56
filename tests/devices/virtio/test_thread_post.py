"""A virtio-blk write group started from a notify completes from its own thread
(`blkinline.InlineBlk._post_from_thread`): status bytes, used entries and the queue's MSI-X
vector, raised from the thread when the driver wants it; a reset, a failed write or a
route changed under the thread leave it to the trio thread's hand-back as before."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import trio

from devices.sdk import IrqIndex
from devices.virtio import transport as t
from devices.virtio.blk import SECTOR, ReqStatus, ReqType, VirtioBlk

from ..fakes import FakeContext, ThreadIrqs
from .driver import Driver
from .test_inline_writes import PAYLOAD, STATUSES, Gate, add, device

MSIX_Q0 = (int(IrqIndex.MSIX), 1)  # queue 0's vector in the test driver


async def threaded(nursery: trio.Nursery, tmp_path: Path, *, same: bool = True,
                   ) -> tuple[VirtioBlk, Driver, FakeContext, Path, ThreadIrqs]:
    """`device` with an IRQ port that offers `thread_signal` (`same`: what settle says)."""
    dev, drv, ctx, img = await device(nursery, tmp_path)
    irqs = ThreadIrqs()
    irqs.same = same
    ctx._irq = irqs
    return dev, drv, ctx, img, irqs


async def write_and_settle(dev: VirtioBlk, drv: Driver, i: int) -> None:
    """One write of a sector, its used entry seen and its hand-back done."""
    head = add(drv, i, ReqType.OUT, 0, SECTOR)
    drv.kick(0)
    assert await drv.wait_used(0) == [(head, 1)]
    with trio.fail_after(5):
        while dev._started[0] is not None:
            await trio.sleep(0.001)


async def test_the_write_thread_completes_and_raises_the_interrupt(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    dev, drv, ctx, img, irqs = await threaded(nursery, tmp_path)
    gate = Gate(dev)
    payload = os.urandom(16 * SECTOR)
    drv.ram[PAYLOAD : PAYLOAD + len(payload)] = payload
    drv.rings[0].set_used_event(0)
    head = add(drv, 0, ReqType.OUT, 8, len(payload))
    drv.kick(0)
    assert gate.started.wait(5)
    assert not irqs.fired and drv.ram[STATUSES] == 0xFF
    gate.open()
    assert await drv.wait_used(0) == [(head, 1)]
    assert drv.ram[STATUSES] == ReqStatus.OK
    assert [v for v, _ in irqs.fired] == [1]
    assert irqs.fired[0][1] != threading.get_ident()  # from the write's thread
    with trio.fail_after(5):
        while dev._started[0] is not None:
            await trio.sleep(0.001)
    assert MSIX_Q0 not in irqs.triggers and irqs.settled == 1
    assert ctx.dma.pins == 0 and dev.queues[0].in_flight == 0
    assert img.read_bytes()[8 * SECTOR : 24 * SECTOR] == payload
    drv.rings[0].set_used_event(1)  # (what the driver does after each interrupt)
    await write_and_settle(dev, drv, 1)  # and the next (re-armed, the worker not woken)
    assert len(irqs.fired) == 2
    dev.close()


async def test_no_interrupt_from_the_thread_when_the_driver_wants_none(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    dev, drv, _, _, irqs = await threaded(nursery, tmp_path)
    Gate(dev).open()
    drv.rings[0].set_used_event(0)
    await write_and_settle(dev, drv, 0)
    drv.rings[0].set_used_event(100)  # EVENT_IDX: not before the 101st used entry
    await write_and_settle(dev, drv, 1)
    assert len(irqs.fired) == 1 and irqs.settled == 2 and MSIX_Q0 not in irqs.triggers
    dev.close()


async def test_a_changed_route_is_raised_again_on_the_trio_thread(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    dev, drv, _, _, irqs = await threaded(nursery, tmp_path, same=False)
    Gate(dev).open()
    drv.rings[0].set_used_event(0)
    await write_and_settle(dev, drv, 0)
    assert len(irqs.fired) == 1 and irqs.triggers.count(MSIX_Q0) == 1
    dev.close()


async def test_reset_or_a_failed_write_leaves_it_to_the_hand_back(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    dev, drv, ctx, _, irqs = await threaded(nursery, tmp_path)
    gate = Gate(dev)
    add(drv, 0, ReqType.OUT, 0, SECTOR)
    drv.kick(0)
    assert gate.started.wait(5)
    drv.wr(t.DEVICE_STATUS, 1, 0)  # reset while the thread writes
    await trio.sleep(0.05)
    gate.open()
    with trio.fail_after(5):
        while drv.status():
            await trio.sleep(0.001)
    assert drv.rings[0].used_idx() == 0 and drv.ram[STATUSES] == 0xFF
    assert not irqs.fired and irqs.settled == 1 and ctx.dma.pins == 0
    dev.close()
    (tmp_path / "again").mkdir()
    dev, drv, ctx, _, irqs = await threaded(nursery, tmp_path / "again")
    Gate(dev, fail=True).open()
    head = add(drv, 0, ReqType.OUT, 0, SECTOR)
    drv.kick(0)
    assert await drv.wait_used(0) == [(head, 1)]
    assert drv.ram[STATUSES] == ReqStatus.IOERR and ctx.failures
    assert not irqs.fired and MSIX_Q0 in irqs.triggers
    dev.close()

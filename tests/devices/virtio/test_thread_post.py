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
from devices.virtio.blk import SECTOR, ReqStatus, ReqType

from ..fakes import ThreadIrqs
from .test_inline_writes import PAYLOAD, STATUSES, Gate, add, device

MSIX_Q0 = (int(IrqIndex.MSIX), 1)  # queue 0's vector in the test driver


async def test_the_write_thread_completes_and_raises_the_interrupt(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    dev, drv, ctx, img = await device(nursery, tmp_path)
    irqs = ThreadIrqs()
    ctx._irq = irqs
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
    # the next write is served the same way (the worker was re-armed, not woken)
    head = add(drv, 1, ReqType.OUT, 0, SECTOR)
    drv.kick(0)
    assert await drv.wait_used(0) == [(head, 1)]
    dev.close()


async def test_no_interrupt_from_the_thread_when_the_driver_wants_none(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    dev, drv, ctx, _ = await device(nursery, tmp_path)
    irqs = ThreadIrqs()
    ctx._irq = irqs
    Gate(dev).open()
    drv.rings[0].set_used_event(0)
    first = add(drv, 0, ReqType.OUT, 0, SECTOR)
    drv.kick(0)
    assert await drv.wait_used(0) == [(first, 1)]
    drv.rings[0].set_used_event(100)  # EVENT_IDX: not before the 101st used entry
    second = add(drv, 1, ReqType.OUT, 0, SECTOR)
    drv.kick(0)
    assert await drv.wait_used(0) == [(second, 1)]
    with trio.fail_after(5):
        while dev._started[0] is not None:
            await trio.sleep(0.001)
    assert len(irqs.fired) == 1 and irqs.settled == 2 and MSIX_Q0 not in irqs.triggers
    dev.close()


async def test_a_changed_route_is_raised_again_on_the_trio_thread(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    dev, drv, ctx, _ = await device(nursery, tmp_path)
    irqs = ThreadIrqs()
    irqs.same = False
    ctx._irq = irqs
    Gate(dev).open()
    drv.rings[0].set_used_event(0)
    head = add(drv, 0, ReqType.OUT, 0, SECTOR)
    drv.kick(0)
    assert await drv.wait_used(0) == [(head, 1)]
    with trio.fail_after(5):
        while MSIX_Q0 not in irqs.triggers:
            await trio.sleep(0.001)
    assert len(irqs.fired) == 1
    dev.close()


async def test_reset_or_a_failed_write_leaves_it_to_the_hand_back(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    dev, drv, ctx, _ = await device(nursery, tmp_path)
    irqs = ThreadIrqs()
    ctx._irq = irqs
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
    dev, drv, ctx, _ = await device(nursery, tmp_path / "again")
    irqs = ThreadIrqs()
    ctx._irq = irqs
    Gate(dev, fail=True).open()
    head = add(drv, 0, ReqType.OUT, 0, SECTOR)
    drv.kick(0)
    assert await drv.wait_used(0) == [(head, 1)]
    assert drv.ram[STATUSES] == ReqStatus.IOERR and ctx.failures
    assert not irqs.fired and MSIX_Q0 in irqs.triggers
    dev.close()

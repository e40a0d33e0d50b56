"""Page-cache reads served in the notify handler while the queue's worker sleeps
(`VirtioBlk.serve_inline`): completed, with their interrupt, before the register write
returns; anything else (but writes, which start their thread there:
test_inline_writes.py) is left to the worker, in ring order; the worker re-arms
notifications afterwards, so the next request is kicked and served the same way."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import trio

from devices.sdk import IrqIndex
from devices.sdk.interface import DmaPort
from devices.virtio.blk import INLINE_CHAINS, SECTOR, ReqStatus, ReqType, VirtioBlk
from devices.virtio.transport import MAX_POLL_US
from devices.virtio.virtqueue import Chain

from ..fakes import FakeContext
from .driver import Driver, count_batches
from .test_blk import BASIC, DATA, HDR, STATUS_BYTE, attach

HDR2, DATA2, STATUS2 = HDR + 0x100, DATA + 0x4000, STATUS_BYTE + 0x10


def add(drv: Driver, rtype: int, sector: int, *, second: bool = False, data: bytes = b"",
        read_len: int = 0) -> int:
    """A request made available without a kick (two of them can coexist: `second`)."""
    hdr, buf, status = (HDR2, DATA2, STATUS2) if second else (HDR, DATA, STATUS_BYTE)
    struct.pack_into("<IIQ", drv.ram, hdr, rtype, 0, sector)
    readable = [(hdr, 16)]
    if data:
        drv.ram[buf : buf + len(data)] = data
        readable.append((buf, len(data)))
    writable = [(buf, read_len)] if read_len else []
    drv.ram[status] = 0xFF
    return drv.rings[0].add(readable, [*writable, (status, 1)])


async def parked(dev: VirtioBlk) -> None:
    """Until the queue's worker sleeps on its kick."""
    with trio.fail_after(5):
        while not dev._parked[0]:
            await trio.sleep(0.001)


async def device(ctx: FakeContext, tmp_path: Path) -> tuple[VirtioBlk, Driver, bytes]:
    payload = os.urandom(8 * SECTOR)
    img = tmp_path / "disk.img"
    img.write_bytes(payload + bytes((1 << 20) - len(payload)))  # in the page cache now
    dev = VirtioBlk(path=str(img), poll_us=0)
    drv = attach(dev, ctx)
    drv.setup(BASIC)
    await parked(dev)
    return dev, drv, payload


async def test_cached_read_completes_inside_the_notify(ctx: FakeContext,
                                                       tmp_path: Path) -> None:
    dev, drv, payload = await device(ctx, tmp_path)
    for round_ in range(3):
        sector = round_ * 2
        head = add(drv, ReqType.IN, sector, read_len=4 * SECTOR)
        drv.rings[0].set_used_event(round_)  # interrupt me for this one (EVENT_IDX)
        before = len(ctx.irq.triggers)
        drv.kick(0)
        # no checkpoint since the kick: the worker task cannot have run
        assert drv.rings[0].take_used() == [(head, 4 * SECTOR + 1)]
        assert drv.ram[STATUS_BYTE] == ReqStatus.OK
        got = bytes(drv.ram[DATA : DATA + 4 * SECTOR])
        assert got == payload[sector * SECTOR : (sector + 4) * SECTOR]
        assert ctx.irq.triggers[before:] == [(IrqIndex.MSIX, 1)]
        # the worker wakes, re-arms notifications and sleeps again: the next one is kicked
        await parked(dev)
        await trio.sleep(0.01)
    assert dev.queues[0].in_flight == 0
    dev.close()


async def test_what_follows_a_write_waits_for_it(ctx: FakeContext, tmp_path: Path) -> None:
    """A write's thread starts in the handler too (test_inline_writes.py); it completes
    later, and a read after it in the same kick is the worker's, after it (ring order)."""
    dev, drv, payload = await device(ctx, tmp_path)
    read = add(drv, ReqType.IN, 0, read_len=SECTOR)
    write = add(drv, ReqType.OUT, 4, second=True, data=b"\x5a" * SECTOR)
    drv.kick(0)
    assert drv.rings[0].take_used() == [(read, SECTOR + 1)]  # the read before it: inline
    assert bytes(drv.ram[DATA : DATA + SECTOR]) == payload[:SECTOR]
    assert drv.ram[STATUS2] == 0xFF  # the write not yet
    assert await drv.wait_used(0) == [(write, 1)]
    assert drv.ram[STATUS2] == ReqStatus.OK
    await parked(dev)
    # a read after a write in one kick waits for the worker too (ring order)
    write = add(drv, ReqType.OUT, 6, data=b"\xa5" * SECTOR)
    read = add(drv, ReqType.IN, 4, second=True, read_len=SECTOR)
    drv.kick(0)
    assert drv.rings[0].take_used() == []
    assert await drv.wait_used(0, 2) == [(write, 1), (read, SECTOR + 1)]
    assert bytes(drv.ram[DATA2 : DATA2 + SECTOR]) == b"\x5a" * SECTOR
    dev.close()


async def test_quiescing_or_busy_worker_is_not_served_inline(ctx: FakeContext,
                                                            tmp_path: Path) -> None:
    dev, drv, _ = await device(ctx, tmp_path)
    dev.quiescing = True
    head = add(drv, ReqType.IN, 0, read_len=SECTOR)
    drv.kick(0)
    assert drv.rings[0].take_used() == []
    assert dev.queues[0].in_flight == 0
    with trio.fail_after(5):
        while dev._live_workers:
            await trio.sleep(0.001)
    dev.resume()
    assert await drv.wait_used(0) == [(head, SECTOR + 1)]
    await parked(dev)
    dev._parked[0] = False  # as while the worker holds a batch
    head = add(drv, ReqType.IN, 0, read_len=SECTOR)
    drv.kick(0)
    assert drv.rings[0].take_used() == []
    assert await drv.wait_used(0) == [(head, SECTOR + 1)]
    dev.close()


async def test_worker_polls_after_requests_served_inline(ctx: FakeContext) -> None:
    """The worker, woken after the handler served the kick, polls for its window as after a
    batch of its own: a request the driver then adds without a kick (avail_event stayed
    behind, so a Linux driver would not kick) is still served, and the worker serves that
    cached read the same synchronous way as the handler (no `process_batch`)."""
    dev = VirtioBlk(size=1 << 20, poll_us=MAX_POLL_US)
    dev.poll_window = 5.0  # a limit no stall of a loaded host outlasts
    batches = count_batches(dev)
    drv = attach(dev, ctx)
    drv.setup(BASIC)
    for _ in range(16):  # kicks soon after each sleep: the window doubles to ~0.3 s
        await parked(dev)
        head = add(drv, ReqType.IN, 0, read_len=SECTOR)
        drv.kick(0)
        assert drv.rings[0].take_used() == [(head, SECTOR + 1)]
        await trio.sleep(0.002)  # the worker wakes (and polls, once its window grew)
    await trio.sleep(0.01)  # the worker woke and polls now
    head = add(drv, ReqType.IN, 0, read_len=SECTOR)
    assert await drv.wait_used(0) == [(head, SECTOR + 1)]
    # the polling worker served it the handler's way too, without a batch of requests
    assert batches == []
    dev.close()


async def test_the_handler_serves_a_bounded_share(ctx: FakeContext) -> None:
    """Many small cached reads in one kick: the handler serves `INLINE_CHAINS` of them (a
    register write must not keep other clients waiting), the worker the rest."""
    dev = VirtioBlk(size=1 << 20, poll_us=0)
    drv = attach(dev, ctx)
    drv.setup(BASIC, size=128)  # three descriptors per request
    await parked(dev)
    heads = [add(drv, ReqType.IN, 0, read_len=SECTOR) for _ in range(INLINE_CHAINS + 8)]
    drv.kick(0)
    assert [h for h, _ in drv.rings[0].take_used()] == heads[:INLINE_CHAINS]
    rest = await drv.wait_used(0, 8)
    assert [h for h, _ in rest] == heads[INLINE_CHAINS:]
    dev.close()


async def test_a_polling_worker_looks_at_an_empty_ring_once_per_probe(
        ctx: FakeContext) -> None:
    """`serve_inline` answers None for an empty ring, and the worker then does not pop as
    well: a poll probe views the rings once, not twice."""
    dev = VirtioBlk(size=1 << 20, poll_us=MAX_POLL_US)
    dev.poll_window = 5.0
    drv = attach(dev, ctx)
    drv.setup(BASIC)
    queue = dev.queues[0]
    pops: list[int] = []
    pop_all = queue.pop_all

    async def counted(dma: DmaPort) -> list[Chain]:
        pops.append(1)
        return await pop_all(dma)

    queue.pop_all = counted  # type: ignore[method-assign]
    for _ in range(16):  # grow the poll window (to ~0.3 s)
        await parked(dev)
        head = add(drv, ReqType.IN, 0, read_len=SECTOR)
        drv.kick(0)
        assert drv.rings[0].take_used() == [(head, SECTOR + 1)]
        await trio.sleep(0.002)
    head = add(drv, ReqType.IN, 0, read_len=SECTOR)  # found by a probe, served inline
    assert await drv.wait_used(0) == [(head, SECTOR + 1)]
    await trio.sleep(0.01)  # probes of the empty ring
    assert pops == []
    dev.close()


async def test_cached_read_wider_than_span_limit_is_read_piece_by_piece(tmp_path: Path) -> None:
    """Pieces further apart than SPAN_LIMIT: no write view wider than the limit is taken
    (it marks its whole span dirty while the client logs); the handler still serves the
    read, through `storage.read_cached` (a view per piece), not the worker."""
    from devices.sdk.storage import SPAN_LIMIT

    far = DATA + SPAN_LIMIT + 0x1000
    async with trio.open_nursery() as nursery:
        ctx = FakeContext(nursery, ram_size=far + 0x10000)
        dev, drv, payload = await device(ctx, tmp_path)
        widths: list[int] = []
        plain_view = ctx.dma.view

        def view(address: int, size: int, *, write: bool = False) -> memoryview | None:
            if write:
                widths.append(size)
            return plain_view(address, size, write=write)

        ctx.dma.view = view  # type: ignore[method-assign]
        batches = count_batches(dev)
        struct.pack_into("<IIQ", drv.ram, HDR, ReqType.IN, 0, 0)
        drv.ram[STATUS_BYTE] = 0xFF
        head = drv.rings[0].add([(HDR, 16)], [(DATA, SECTOR), (far, SECTOR), (STATUS_BYTE, 1)])
        drv.kick(0)
        with trio.fail_after(5):
            while not (used := drv.rings[0].take_used()):
                await trio.sleep(0.001)
        assert used == [(head, 2 * SECTOR + 1)]
        assert drv.ram[STATUS_BYTE] == ReqStatus.OK
        assert bytes(drv.ram[DATA : DATA + SECTOR]) == payload[:SECTOR]
        assert bytes(drv.ram[far : far + SECTOR]) == payload[SECTOR : 2 * SECTOR]
        assert max(widths) <= SPAN_LIMIT
        assert batches == []  # the synchronous way, not a worker's batch
        dev.close()
        nursery.cancel_scope.cancel()

"""Per-request work trimmed from virtio-blk's notify path (devices/virtio/README.md,
"Per-request instructions"): each test pins down one thing the path no longer does, and
checks that what it does instead gives the same answer."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import trio

from devices.virtio.blk import SECTOR, ReqType, VirtioBlk
from devices.virtio.transport import MAX_POLL_US
from devices.virtio.virtqueue import (
    DESC_F_NEXT,
    DESC_F_WRITE,
    _walk_linear,
)
from devices.virtio.worker import PollWindow

from ..fakes import FakeContext
from .test_blk import BASIC, DATA, attach
from .test_notify_inline import add, device, parked
from .test_virtqueue import make


def _table(readable: list[tuple[int, int]], writable: list[tuple[int, int]]) -> bytes:
    """An in-order indirect table as Linux builds it."""
    entries = [(a, n, DESC_F_NEXT) for a, n in readable] + \
        [(a, n, DESC_F_NEXT | DESC_F_WRITE) for a, n in writable]
    out = b""
    for i, (a, n, f) in enumerate(entries):
        last = i == len(entries) - 1
        out += struct.pack("<QIHH", a, n, f & ~DESC_F_NEXT if last else f,
                           0 if last else i + 1)
    return out


def test_linear_walk_knows_both_lengths() -> None:
    """`_walk_linear` hands its byte counts to the chain (no pass over ~256 pieces per
    `readable_len` / `writable_len`), and they are the sums of the pieces, for a read
    (header, many writable pages), a write (many readable pages, status) and the
    shapes in between."""
    rng = random.Random(7)
    for readable_count, writable_count in ((1, 257), (257, 1), (1, 1), (3, 2), (2, 3),
                                           (5, 0), (0, 4)):
        readable = [(rng.randrange(1 << 40), rng.randrange(1, 8192))
                    for _ in range(readable_count)]
        writable = [(rng.randrange(1 << 40), rng.randrange(1, 8192))
                    for _ in range(writable_count)]
        chain = _walk_linear(3, _table(readable, writable))
        assert chain is not None
        assert chain.readable == readable and chain.writable == writable
        assert chain.lengths == (sum(n for _, n in readable), sum(n for _, n in writable))
        assert chain.readable_len == chain.lengths[0]
        assert chain.writable_len == chain.lengths[1]


async def test_an_empty_probe_takes_no_used_ring_view(ctx: FakeContext) -> None:
    """A polling worker's probe of an empty ring (and the worker's look after a notify the
    handler served) views the avail ring and the descriptor table, not the used ring as
    well: it answers None before it needs that."""
    dev = VirtioBlk(size=1 << 20, poll_us=MAX_POLL_US)
    drv = attach(dev, ctx)
    drv.setup(BASIC)
    await parked(dev)
    head = add(drv, ReqType.IN, 0, read_len=512)
    drv.kick(0)
    assert drv.rings[0].take_used() == [(head, 513)]
    queue = dev.queues[0]
    seen: list[int] = []
    plain_view = ctx.dma.view

    def view(address: int, size: int, *, write: bool = False) -> memoryview | None:
        seen.append(address)
        return plain_view(address, size, write=write)

    ctx.dma.view = view  # type: ignore[method-assign]
    assert dev.serve_inline(queue) is None
    ctx.dma.view = plain_view  # type: ignore[method-assign]
    assert queue.used_addr not in seen
    assert sorted(seen) == sorted([queue.avail_addr, queue.desc_addr])
    with trio.fail_after(5):
        await parked(dev)
    dev.close()


async def test_a_served_notify_leaves_an_unpolled_worker_asleep(ctx: FakeContext,
                                                                tmp_path: Path) -> None:
    """A notify whose reads the handler served, on a queue that does not poll: the handler
    re-arms notifications itself (avail_event moves past the request) and the worker is
    not woken, since it would only have re-armed and slept again; the next request is
    kicked and served the same way. A write, started in a thread, needs no worker either:
    its hand-back completes it and lets go of it, so the next notify is served too."""
    dev, drv, payload = await device(ctx, tmp_path)
    ring, queue = drv.rings[0], dev.queues[0]
    for sector in range(3):
        kick = dev._kicks[0]
        head = add(drv, ReqType.IN, sector, read_len=SECTOR)
        drv.kick(0)
        assert ring.take_used() == [(head, SECTOR + 1)]
        assert ctx.dma.ram[DATA : DATA + SECTOR] == \
            payload[sector * SECTOR : (sector + 1) * SECTOR]
        assert not kick.is_set() and dev._kicks[0] is kick
        assert ring.avail_event() == queue.last_avail_idx  # re-armed
        assert dev._parked[0]
    kick = dev._kicks[0]
    head = add(drv, ReqType.OUT, 0, data=payload[SECTOR : 2 * SECTOR])
    drv.kick(0)
    assert dev._started[0] is not None
    assert await drv.wait_used(0) == [(head, 1)]
    assert dev._started[0] is None  # the hand-back let go of it
    assert not kick.is_set() and dev._kicks[0] is kick
    assert ring.avail_event() == queue.last_avail_idx
    head = add(drv, ReqType.IN, 0, read_len=SECTOR)
    drv.kick(0)
    assert ring.take_used() == [(head, SECTOR + 1)]  # served in the handler
    assert ctx.dma.ram[DATA : DATA + SECTOR] == payload[SECTOR : 2 * SECTOR]
    assert not kick.is_set() and dev._parked[0]
    dev.close()


async def test_a_quick_kick_still_wakes_a_polling_worker(ctx: FakeContext,
                                                         tmp_path: Path) -> None:
    """A kick soon after the worker slept would open its poll window: the handler serves
    the read but wakes the worker, which then polls."""
    dev, drv, _ = await device(ctx, tmp_path)
    dev.polls[0] = poll = PollWindow(10.0)  # every kick comes "soon"
    poll.since = trio.current_time()
    kick = dev._kicks[0]
    head = add(drv, ReqType.IN, 0, read_len=SECTOR)
    drv.kick(0)
    assert drv.rings[0].take_used() == [(head, SECTOR + 1)]
    assert kick.is_set()
    dev.close()


async def test_a_request_added_during_a_started_write_is_served(ctx: FakeContext,
                                                                 tmp_path: Path) -> None:
    """The worker sleeps through a write the handler started, and notifications are
    re-armed by the write's hand-back, not by the handler: a request the driver adds
    meanwhile (without a kick: avail_event was still behind it) is found by the
    hand-back's re-check, which wakes the worker to serve it."""
    dev, drv, payload = await device(ctx, tmp_path)
    ring, queue = drv.rings[0], dev.queues[0]
    before = ring.avail_event()
    write = add(drv, ReqType.OUT, 2, data=payload[:SECTOR])
    drv.kick(0)
    assert dev._started[0] is not None and dev._parked[0]
    assert ring.avail_event() == before  # not re-armed yet: the thread runs first
    old = ring.avail_idx
    read = add(drv, ReqType.IN, 2, read_len=SECTOR, second=True)
    # the driver kicks only as EVENT_IDX says (vring_need_event): here it does not
    event, new = ring.avail_event(), ring.avail_idx
    assert not (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF
    assert await drv.wait_used(0, 2) == [(write, 1), (read, SECTOR + 1)]
    await parked(dev)
    assert ring.avail_event() == queue.last_avail_idx
    dev.close()


def test_a_one_descriptor_chain_is_taken_without_the_walk_loop() -> None:
    """A receive buffer (one direct descriptor) comes back with its byte counts known,
    from the walk's shortcut; chains of several descriptors still take the full walk."""
    dma, ring, queue = make(size=8)
    heads = [ring.add([], [(0x8000, 4096)]), ring.add([(0x9000, 64)], []),
             ring.add([(0xA000, 16)], [(0xB000, 1)])]
    chains = queue.pop_upto(dma, 1 << 20)
    assert chains is not None
    assert [(c.head, c.readable, c.writable) for c in chains] == [
        (heads[0], [], [(0x8000, 4096)]), (heads[1], [(0x9000, 64)], []),
        (heads[2], [(0xA000, 16)], [(0xB000, 1)])]
    assert [c.lengths for c in chains[:2]] == [(0, 4096), (64, 0)]
    assert chains[2].lengths is None  # the loop's chain
    assert [(c.readable_len, c.writable_len) for c in chains] == [(0, 4096), (64, 0), (16, 1)]

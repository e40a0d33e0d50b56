"""Virtqueue walking against hand-built rings: chains, indirect tables, wrap-around, event
index, and every malformed shape a driver could produce."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devices.virtio.guestmem import DeviceBugError, VirtqueueError, gather, scatter
from devices.virtio.virtqueue import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, Virtqueue

from ..fakes import FakeDma
from .ring import DriverRing

BUF = 0x40000


class MessageDma(FakeDma):
    """Guest memory without an fd: no views, every access is a DMA_READ/WRITE message."""

    def view(self, address: int, size: int, *, write: bool = False) -> memoryview | None:
        self._range(address, size)
        return None


_dma_class: list[type[FakeDma]] = [FakeDma]


@pytest.fixture(autouse=True, params=["mmap", "messages"])
def dma_mode(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test runs over mmap'd guest memory (fast path) and message DMA (slow path)."""
    _dma_class[0] = FakeDma if request.param == "mmap" else MessageDma
    yield
    _dma_class[0] = FakeDma


def make(size: int = 8, *, event_idx: bool = False) -> tuple[FakeDma, DriverRing, Virtqueue]:
    dma = _dma_class[0](1 << 20)
    ring = DriverRing(dma.ram, 0x1000, size)
    q = Virtqueue(0, size)
    q.desc_addr, q.avail_addr, q.used_addr = ring.desc, ring.avail, ring.used
    q.enabled = True
    q.event_idx = event_idx
    q.indirect = True
    return dma, ring, q


async def test_empty_ring_pops_nothing() -> None:
    dma, _, q = make()
    assert await q.pop(dma) is None


async def test_pop_all_takes_every_available_chain_once() -> None:
    """A worker's batch: every chain available, in ring order, each held once; then none
    (an indirect table included, and the avail ring's slots wrap in the third lap)."""
    dma, ring, q = make(size=8)
    assert await q.pop_all(dma) == []
    for lap in range(3):
        heads = [ring.add([(BUF, 16)], [(BUF + 64 * i, 64), (BUF + 600, 1)]) for i in range(2)]
        heads.append(ring.add([(BUF, 16)], [(BUF + 700, 8), (BUF + 800, 1)],
                              indirect_at=0x8000))
        chains = await q.pop_all(dma)
        assert [c.head for c in chains] == heads, lap
        assert chains[2].writable == [(BUF + 700, 8), (BUF + 800, 1)]
        assert q.in_flight == 3
        assert await q.pop_all(dma) == []
        await q.push_many(dma, [(h, 0) for h in heads])
        assert q.in_flight == 0


async def test_chain_split_into_readable_and_writable() -> None:
    dma, ring, q = make()
    head = ring.add([(BUF, 16), (BUF + 16, 100)], [(BUF + 200, 50), (BUF + 300, 1)])
    chain = await q.pop(dma)
    assert chain is not None and chain.head == head
    assert chain.readable == [(BUF, 16), (BUF + 16, 100)]
    assert chain.writable == [(BUF + 200, 50), (BUF + 300, 1)]
    assert chain.readable_len == 116 and chain.writable_len == 51
    assert await q.pop(dma) is None


async def test_indirect_table() -> None:
    dma, ring, q = make()
    head = ring.add([(BUF, 16)], [(BUF + 64, 512), (BUF + 600, 1)], indirect_at=0x8000)
    chain = await q.pop(dma)
    assert chain is not None and chain.head == head
    assert chain.readable == [(BUF, 16)]
    assert chain.writable == [(BUF + 64, 512), (BUF + 600, 1)]


async def test_indirect_needs_the_feature() -> None:
    dma, ring, q = make()
    q.indirect = False
    ring.add([(BUF, 16)], [], indirect_at=0x8000)
    with pytest.raises(VirtqueueError, match="INDIRECT"):
        await q.pop(dma)


async def test_used_ring_and_wraparound_of_16_bit_indices() -> None:
    dma, ring, q = make(4)
    # Start both sides just below the 16-bit wrap.
    start = 0xFFFE
    ring.avail_idx = ring.last_used = start
    q.last_avail_idx = q.used_idx = start
    ring.put_u16(ring.used + 2, start)
    for i in range(6):  # crosses 0xffff -> 0 and wraps the 4-entry ring
        head = ring.add([(BUF + i, 1)], [])
        chain = await q.pop(dma)
        assert chain is not None and chain.head == head
        await q.push(dma, chain.head, i)
        assert ring.take_used() == [(head, i)]
    assert q.last_avail_idx == q.used_idx == (start + 6) & 0xFFFF == 4


async def test_gather_and_scatter_across_segments() -> None:
    dma, _, _ = make()
    dma.ram[BUF : BUF + 10] = b"0123456789"
    segs = [(BUF, 4), (BUF + 4, 6)]
    assert await gather(dma, segs, skip=2, limit=5) == b"23456"
    n = await scatter(dma, [(BUF + 100, 3), (BUF + 200, 3)], b"abcdefgh", skip=1)
    assert n == 5
    assert dma.ram[BUF + 101 : BUF + 103] == b"ab" and dma.ram[BUF + 200 : BUF + 203] == b"cde"


async def test_interrupt_suppression_without_event_idx() -> None:
    dma, ring, q = make()
    ring.add([(BUF, 1)], [])
    chain = await q.pop(dma)
    assert chain is not None
    await q.push(dma, chain.head, 0)
    assert await q.should_interrupt(dma)
    ring.put_u16(ring.avail, 1)  # VRING_AVAIL_F_NO_INTERRUPT
    assert not await q.should_interrupt(dma)


async def test_event_idx_interrupts_only_when_used_event_is_crossed() -> None:
    dma, ring, q = make(8, event_idx=True)
    heads = [ring.add([(BUF + i, 1)], []) for i in range(4)]
    ring.set_used_event(2)  # "interrupt me when used idx passes 2"
    for _ in heads:
        chain = await q.pop(dma)
        assert chain is not None
        await q.push(dma, chain.head, 0)
        if q.used_idx == 1:
            assert await q.should_interrupt(dma)  # the first one always signals
        elif q.used_idx == 2:
            assert not await q.should_interrupt(dma)  # 1 -> 2 does not pass event 2
        elif q.used_idx == 3:
            assert await q.should_interrupt(dma)  # 2 -> 3 passes it
        else:
            assert not await q.should_interrupt(dma)


async def test_event_idx_enable_notify_publishes_avail_event() -> None:
    dma, ring, q = make(8, event_idx=True)
    ring.add([(BUF, 1)], [])
    assert await q.pop(dma) is not None
    assert not await q.enable_notify(dma)
    assert ring.avail_event() == 1
    ring.add([(BUF, 1)], [])
    assert await q.enable_notify(dma)  # work arrived: the caller must not sleep


async def test_no_notify_flag_without_event_idx() -> None:
    dma, ring, q = make()
    await q.disable_notify(dma)
    assert ring.u16(ring.used) == 1
    assert not await q.enable_notify(dma)
    assert ring.u16(ring.used) == 0


# ---------------------------------------------------------------- malformed rings

async def test_loop_in_chain() -> None:
    dma, ring, q = make()
    ring.write_desc(ring.desc, 0, BUF, 1, DESC_F_NEXT, 1)
    ring.write_desc(ring.desc, 1, BUF, 1, DESC_F_NEXT, 0)
    ring.publish(0)
    with pytest.raises(VirtqueueError, match="loops"):
        await q.pop(dma)


async def test_self_loop_in_indirect_table() -> None:
    dma, ring, q = make()
    ring.write_desc(0x8000, 0, BUF, 1, DESC_F_NEXT, 0)
    ring.write_desc(ring.desc, 0, 0x8000, 16, DESC_F_INDIRECT)
    ring.publish(0)
    with pytest.raises(VirtqueueError, match="loops"):
        await q.pop(dma)


@pytest.mark.parametrize(("what", "setup", "match"), [
    ("head out of range", lambda r: r.publish(9), "head"),
    ("next out of range", lambda r: (r.write_desc(r.desc, 0, BUF, 1, DESC_F_NEXT, 8),
                                     r.publish(0)), "next"),
    ("nested indirect", lambda r: (r.write_desc(0x8000, 0, 0x9000, 16, DESC_F_INDIRECT),
                                   r.write_desc(r.desc, 0, 0x8000, 16, DESC_F_INDIRECT),
                                   r.publish(0)), "nested"),
    ("indirect with next", lambda r: (r.write_desc(r.desc, 0, 0x8000, 16,
                                                   DESC_F_INDIRECT | DESC_F_NEXT, 1),
                                      r.publish(0)), "NEXT"),
    ("indirect length", lambda r: (r.write_desc(r.desc, 0, 0x8000, 17, DESC_F_INDIRECT),
                                   r.publish(0)), "length"),
    ("indirect table unmapped", lambda r: (r.write_desc(r.desc, 0, 1 << 40, 16,
                                                        DESC_F_INDIRECT), r.publish(0)),
     "guest memory"),
    ("readable after writable", lambda r: (r.write_desc(r.desc, 0, BUF, 1,
                                                        DESC_F_WRITE | DESC_F_NEXT, 1),
                                           r.write_desc(r.desc, 1, BUF, 1, 0), r.publish(0)),
     "after a writable"),
    ("oversized chain", lambda r: (r.write_desc(r.desc, 0, BUF, 0xFFFF_FFFF, DESC_F_NEXT, 1),
                                   r.write_desc(r.desc, 1, BUF, 0xFFFF_FFFF, DESC_F_NEXT, 2),
                                   r.write_desc(r.desc, 2, BUF, 2, 0), r.publish(0)),
     "larger"),
])
async def test_malformed(what: str, setup: object, match: str) -> None:
    dma, ring, q = make()
    setup(ring)  # type: ignore[operator]
    with pytest.raises(VirtqueueError, match=match):
        await q.pop(dma)


async def test_avail_index_jumping_past_the_ring() -> None:
    dma, ring, q = make(4)
    ring.put_u16(ring.avail + 2, 5)
    with pytest.raises(VirtqueueError, match="avail idx"):
        await q.pop(dma)


async def test_unmapped_ring() -> None:
    dma, _, q = make()
    q.avail_addr = 1 << 40
    with pytest.raises(VirtqueueError, match="guest memory"):
        await q.pop(dma)


async def test_has_work_is_honest_after_a_long_run_of_pops() -> None:
    """The avail index `has_work` remembers must follow the pops: a stale value once
    claimed work after ~2**16 fast-path pops and made a worker spin without a checkpoint."""
    dma, ring, q = make(4)
    for i in range(0x10000 + 8):
        ring.add([(BUF, 1)], [])
        chain = await q.pop(dma)
        assert chain is not None, i
        await q.push(dma, chain.head, 0)
        if q.last_avail_idx == 0xFFFE:  # 2 behind the value remembered at the start
            assert not await q.has_work(dma), i


# ------------------------------------------------------------------ ownership of heads


async def test_a_head_offered_again_while_held_is_a_driver_error() -> None:
    dma, ring, q = make()
    head = ring.add([(BUF, 16)], [])
    assert (await q.pop(dma)) is not None
    ring.publish(head)  # the same head again, never returned by the device
    with pytest.raises(VirtqueueError, match=f"head {head} made available again"):
        await q.pop(dma)


async def test_pushing_a_head_the_device_does_not_hold_is_refused() -> None:
    dma, ring, q = make()
    head = ring.add([(BUF, 16)], [])
    chain = await q.pop(dma)
    assert chain is not None
    await q.push_many(dma, [(head, 0)])
    with pytest.raises(DeviceBugError, match=f"pushing head {head}"):
        await q.push_many(dma, [(head, 0)])  # twice: the driver would see "not a head"
    with pytest.raises(DeviceBugError):
        await q.push(dma, 5, 0)  # never popped
    assert ring.take_used() == [(head, 0)]  # nothing bogus reached the used ring


async def test_rewind_gives_back_only_the_chains_popped_since() -> None:
    dma, ring, q = make()
    heads = [ring.add([(BUF + i, 1)], []) for i in range(4)]
    first = await q.pop(dma)
    assert first is not None and first.head == heads[0]
    start = q.last_avail_idx
    for _ in range(3):
        assert await q.pop(dma) is not None
    assert q.in_flight == 4
    q.rewind(start)
    assert q.in_flight == 1 and q.last_avail_idx == start
    again = [await q.pop(dma) for _ in range(3)]  # the same chains, no "made available again"
    assert [c.head for c in again if c is not None] == heads[1:]
    await q.push_many(dma, [(c.head, 0) for c in [first, *again] if c is not None])
    assert q.in_flight == 0
    assert [h for h, _ in ring.take_used()] == heads


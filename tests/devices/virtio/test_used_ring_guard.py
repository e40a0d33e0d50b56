"""The used ring as a live driver sees it through shared memory (a module of its own: the
virtqueue tests run every case over both DMA modes, and these are mmap-path properties)."""

from __future__ import annotations

import mmap
import multiprocessing
import multiprocessing.connection
import os
import time

import pytest

from devices.virtio.guestmem import VirtqueueError
from devices.virtio.virtqueue import Virtqueue

from ..fakes import FakeDma
from .ring import DriverRing


async def test_a_used_index_changed_behind_the_device_is_reported() -> None:
    dma = FakeDma(1 << 20)
    ring = DriverRing(dma.ram, 0x1000, 8)
    q = Virtqueue(0, 8)
    q.desc_addr, q.avail_addr, q.used_addr = ring.desc, ring.avail, ring.used
    ring.add([(0x40000, 16)], [])
    chain = await q.pop(dma)
    assert chain is not None
    await q.push_many(dma, [(chain.head, 0)])
    head = ring.add([(0x40000, 16)], [])
    chain = await q.pop(dma)
    assert chain is not None and chain.head == head
    ring.put_u16(ring.used + 2, 7)  # a stray write into the device's used ring
    with pytest.raises(VirtqueueError, match="used idx in guest memory is 7, the device last "
                       "wrote 1"):
        await q.push_many(dma, [(chain.head, 0)])


# ------------------------------------------------------------------ what a polling driver sees


class SharedDma(FakeDma):
    """Guest RAM in a shared anonymous mapping, so another process can watch it live."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.ram = mmap.mmap(-1, size)  # type: ignore[assignment]


def _watch_used_idx(ram: mmap.mmap, offset: int, seconds: float,
                    conn: multiprocessing.connection.Connection) -> None:
    """A driver polling used.idx: count values behind the last one seen (a reader that was
    descheduled may see a big step forward, never one back)."""
    words = memoryview(ram).cast("H")
    index = offset // 2
    prev = words[index]
    bad = reads = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(1000):
            v = words[index]
            if 0 < (prev - v) & 0xFFFF < 0x4000:
                bad += 1
            prev = v
        reads += 1000
    conn.send((bad, reads))


@pytest.mark.skipif(os.cpu_count() == 1, reason="needs a second CPU for the watching process")
async def test_a_polling_driver_never_sees_used_idx_go_backwards() -> None:
    """The session-1 virtio-net TX bug: `Struct.pack_into` zeroes its target before it
    writes, so a driver reading used.idx at that moment saw 0, took a lap of stale entries
    as new and broke its queue ("id N is not a head!"). The index must change in one store."""
    dma = SharedDma(1 << 20)
    ring = DriverRing(dma.ram, 0x1000, 8)  # type: ignore[arg-type]
    q = Virtqueue(0, 8)
    q.desc_addr, q.avail_addr, q.used_addr = ring.desc, ring.avail, ring.used
    ring.put_u16(ring.used + 2, 0x00F0)  # near a carry of the low byte
    q.used_idx = ring.last_used = 0x00F0
    ctx = multiprocessing.get_context("fork")
    ours, theirs = ctx.Pipe(duplex=False)
    watcher = ctx.Process(target=_watch_used_idx,
                          args=(dma.ram, ring.used + 2, 1.5, theirs), daemon=True)
    watcher.start()
    deadline = time.monotonic() + 1.4
    pushes = 0
    while time.monotonic() < deadline:
        for _ in range(200):
            ring.add([(0x40000, 16)], [])
            chain = await q.pop(dma)
            assert chain is not None
            await q.push_many(dma, [(chain.head, 0)])
            ring.take_used()
            pushes += 1
    bad, reads = ours.recv()
    watcher.join(5)
    assert reads > 100_000 and pushes > 10_000
    assert bad == 0, f"the driver saw used.idx go backwards {bad} times in {reads} reads"

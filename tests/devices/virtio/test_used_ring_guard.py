"""The used-ring guard of the mmap fast path (a module of its own: the virtqueue tests run
every case over both DMA modes, and this check exists on the mmap path only, where it costs
one load instead of a DMA_READ message per batch)."""

from __future__ import annotations

import pytest

from devices.virtio.virtqueue import Virtqueue, VirtqueueError

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

"""Property tests: whatever a driver writes, the device answers with data or NEEDS_RESET.

Random ring contents must make `Virtqueue.pop` return a chain, return None or raise
`VirtqueueError`, and terminate; random register traffic must never raise out of a region
handler (an exception there would become an EIO reply to QEMU for a plain MMIO access).
"""

from __future__ import annotations

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.virtio import transport as t
from devices.virtio.blk import VirtioBlk
from devices.virtio.virtqueue import Virtqueue, VirtqueueError

from ..fakes import FakeDma

SIZE = 8
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000


@settings(max_examples=300, deadline=None)
@given(desc=st.binary(min_size=16 * SIZE, max_size=16 * SIZE),
       avail=st.binary(min_size=4 + 2 * SIZE + 2, max_size=4 + 2 * SIZE + 2),
       indirect=st.binary(min_size=256, max_size=256),
       last_avail=st.integers(0, 0xFFFF))
def test_random_rings_never_crash(desc: bytes, avail: bytes, indirect: bytes,
                                  last_avail: int) -> None:
    dma = FakeDma(1 << 16)
    dma.ram[DESC : DESC + len(desc)] = desc
    dma.ram[AVAIL : AVAIL + len(avail)] = avail
    dma.ram[0x4000 : 0x4000 + len(indirect)] = indirect
    q = Virtqueue(0, SIZE)
    q.desc_addr, q.avail_addr, q.used_addr = DESC, AVAIL, USED
    q.indirect = True
    q.last_avail_idx = last_avail

    async def drain() -> None:
        for _ in range(2 * SIZE):
            try:
                chain = await q.pop(dma)
            except VirtqueueError:
                return
            if chain is None:
                return
            assert chain.head < SIZE
            assert len(chain.readable) + len(chain.writable) <= 2 * 4096

    trio.run(drain)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, t.VIRTIO_BAR_SIZE - 8), st.sampled_from([1, 2, 4, 8]),
                          st.integers(0, (1 << 64) - 1), st.booleans()), max_size=40))
def test_random_register_traffic_never_raises(ops: list[tuple[int, int, int, bool]]) -> None:
    dev = VirtioBlk(size=1 << 20, queues=2)
    for offset, size, value, is_write in ops:
        offset -= offset % size
        if is_write:
            dev.region_write(t.VIRTIO_BAR, offset,
                             (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
        else:
            assert len(dev.region_read(t.VIRTIO_BAR, offset, size)) == size
    dev.close()

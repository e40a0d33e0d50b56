"""Property tests: whatever a driver writes, the device answers with data or NEEDS_RESET.

Random ring contents must make `Virtqueue.pop` return a chain, return None or raise
`VirtqueueError`, and terminate; random register traffic must never raise out of a region
handler (an exception there would become an EIO reply to QEMU for a plain MMIO access).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.sdk import storage
from devices.sdk.storage import FileBackend, consume
from devices.virtio import transport as t
from devices.virtio import virtqueue
from devices.virtio.blk import VirtioBlk
from devices.virtio.guestmem import VirtqueueError, clip
from devices.virtio.virtqueue import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, Chain, Virtqueue

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


def _table(entries: list[tuple[int, int, int, int]]) -> bytes:
    return b"".join(struct.pack("<QIHH", *e) for e in entries)


def _general_walk(table: bytes) -> Chain | str:
    """What the entry-by-entry walk makes of an indirect table (or its error)."""
    dma = FakeDma(1 << 16)
    dma.ram[0x4000 : 0x4000 + len(table)] = table
    struct.pack_into("<QIHH", dma.ram, DESC, 0x4000, len(table), DESC_F_INDIRECT, 0)
    q = Virtqueue(0, SIZE)
    q.desc_addr, q.indirect = DESC, True
    desc = dma.view(DESC, 16 * SIZE)
    assert desc is not None
    saved = virtqueue._walk_linear
    virtqueue._walk_linear = lambda head, table: None
    try:
        return q._walk(0, desc, dma, None)
    except VirtqueueError as exc:
        return str(exc)
    finally:
        virtqueue._walk_linear = saved


# Entries of a Linux-like table (linear links, readable first) with random perturbations.
_entry = st.tuples(st.integers(0, 1 << 40), st.integers(0, 1 << 31),
                   st.sampled_from([0, DESC_F_NEXT, DESC_F_WRITE, DESC_F_NEXT | DESC_F_WRITE,
                                    DESC_F_INDIRECT, DESC_F_NEXT | 8]),
                   st.integers(0, 40))


@settings(max_examples=500, deadline=None)
@given(readable=st.integers(0, 20), writable=st.integers(0, 20),
       tweaks=st.lists(st.tuples(st.integers(0, 39), _entry), max_size=3),
       lengths=st.lists(st.integers(0, 1 << 31), min_size=40, max_size=40))
def test_linear_fast_path_agrees_with_general_walk(readable: int, writable: int,
                                                   tweaks: list[tuple[int, tuple[int, int,
                                                                                 int, int]]],
                                                   lengths: list[int]) -> None:
    """`_walk_linear` returns exactly the general walk's chain, or None (never a chain the
    general walk would reject), for tables Linux builds and tables close to them."""
    n = readable + writable
    if n == 0:
        return
    entries = []
    for i in range(n):
        flags = (DESC_F_WRITE if i >= readable else 0) | (DESC_F_NEXT if i < n - 1 else 0)
        entries.append((0x10000 * i, lengths[i] % 8192, flags, i + 1 if i < n - 1 else 0))
    for index, entry in tweaks:
        if index < n:
            entries[index] = entry
    table = _table(entries)
    fast = virtqueue._walk_linear(0, table)
    general = _general_walk(table)
    if not tweaks:
        assert fast is not None, "a Linux-style table must take the fast path"
    if fast is not None:
        assert isinstance(general, Chain), general
        assert (fast.head, fast.readable, fast.writable) == \
            (general.head, general.readable, general.writable)


def test_linear_fast_path_used_and_limits() -> None:
    big = _table([(0, 1 << 31, DESC_F_NEXT, 1), (0, 1 << 31, DESC_F_NEXT, 2),
                  (0, 1, 0, 0)])
    assert virtqueue._walk_linear(0, big) is None  # over MAX_CHAIN_BYTES: general rejects
    assert isinstance(_general_walk(big), str)
    loop = _table([(0, 1, DESC_F_NEXT, 1), (0, 1, DESC_F_NEXT, 0)])
    assert virtqueue._walk_linear(0, loop) is None
    assert isinstance(_general_walk(loop), str)


def _clip_reference(segments: list[tuple[int, int]], skip: int,
                    limit: int | None) -> list[tuple[int, int]]:
    """`clip` as first written: one piece at a time (the specification of the fast one)."""
    pieces: list[tuple[int, int]] = []
    total = 0
    for addr, length in segments:
        if skip >= length:
            skip -= length
            continue
        take = length - skip
        if limit is not None:
            take = min(take, limit - total)
            if take <= 0:
                break
        pieces.append((addr + skip, take))
        total += take
        skip = 0
    return pieces


@settings(max_examples=500, deadline=None)
@given(segments=st.lists(st.tuples(st.integers(0, 1 << 40), st.integers(0, 64)), max_size=12),
       skip=st.integers(0, 300), limit=st.none() | st.integers(0, 300))
def test_clip_matches_reference(segments: list[tuple[int, int]], skip: int,
                                limit: int | None) -> None:
    assert clip(segments, skip, limit) == _clip_reference(segments, skip, limit)


@settings(max_examples=300, deadline=None)
@given(sizes=st.lists(st.integers(0, 50), max_size=10), n=st.integers(0, 600))
def test_consume_drops_n_bytes(sizes: list[int], n: int) -> None:
    data = bytes(range(256)) * 3
    bufs, pos = [], 0
    for size in sizes:
        bufs.append(memoryview(data)[pos : pos + size])
        pos += size
    n = min(n, pos)
    assert b"".join(consume(bufs, n)) == data[n:pos]


@settings(max_examples=100, deadline=None)
@given(sizes=st.lists(st.integers(1, 700), min_size=1, max_size=8),
       caps=st.lists(st.integers(1, 900), min_size=1, max_size=6),
       kinds=st.lists(st.sampled_from(["bytes", "bytearray", "memoryview"]), min_size=8,
                      max_size=8))
def test_file_backend_survives_short_transfers(tmp_path_factory: pytest.TempPathFactory,
                                               sizes: list[int], caps: list[int],
                                               kinds: list[str]) -> None:
    """`FileBackend` skips `consume` when a transfer is complete; a short pwritev/preadv
    (the kernel may stop early) must still move every byte, whatever buffer types came."""
    path = tmp_path_factory.mktemp("short") / "disk.img"
    backend = FileBackend(str(path), 8192, False)
    limits = iter(caps * 50)
    real_pwritev, real_preadv = os.pwritev, os.preadv

    def short(fn: Callable[..., int]) -> Callable[..., int]:
        def call(fd: int, bufs: Sequence[Any], offset: int, *flags: int) -> int:
            cap, out = next(limits, 1 << 20), []
            for b in bufs:  # the first `cap` bytes of the buffers
                view = memoryview(b)
                out.append(view[:cap])
                cap -= len(out[-1])
                if cap <= 0:
                    break
            return fn(fd, out, offset, *flags)
        return call

    data = os.urandom(sum(sizes))
    bufs: list[bytes | bytearray | memoryview] = []
    pos = 0
    for size, kind in zip(sizes, kinds, strict=False):
        piece = data[pos : pos + size]
        pos += size
        bufs.append(piece if kind == "bytes" else bytearray(piece) if kind == "bytearray"
                    else memoryview(bytearray(piece)))
    try:
        storage.os.pwritev = short(real_pwritev)  # type: ignore[attr-defined]
        storage.os.preadv = short(real_preadv)  # type: ignore[attr-defined]
        backend.write(100, bufs)
        out = [bytearray(n) for n in sizes]
        backend.readinto(100, [memoryview(b) for b in out])
        assert b"".join(out) == data
        back = [bytearray(n) for n in sizes]
        got = backend.readinto_nowait(100, [memoryview(b) for b in back])
        assert got in (0, len(data))  # 0: the file system has no RWF_NOWAIT
        if got:
            assert b"".join(back) == data
    finally:
        storage.os.pwritev = real_pwritev  # type: ignore[attr-defined]
        storage.os.preadv = real_preadv  # type: ignore[attr-defined]
        backend.close()

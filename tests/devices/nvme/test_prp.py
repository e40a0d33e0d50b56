"""PRP walking: single page, page crossing, PRP2 as page or list, chained lists, errors."""

from __future__ import annotations

import struct

import pytest

from devices.nvme.prp import PrpError, walk_prps
from devices.nvme.spec import Status

PAGE = 4096


class Lists:
    """PRP list pages in fake guest memory; records every read."""

    def __init__(self) -> None:
        self.mem: dict[int, bytes] = {}
        self.reads: list[tuple[int, int]] = []

    def put(self, address: int, entries: list[int]) -> None:
        self.mem[address] = struct.pack(f"<{len(entries)}Q", *entries)

    async def read(self, address: int, size: int) -> bytes:
        self.reads.append((address, size))
        for base, data in self.mem.items():
            if base <= address and address + size <= base + len(data):
                return data[address - base : address - base + size]
        raise AssertionError(f"unexpected list read {address:#x}+{size}")


async def test_zero_length_is_empty() -> None:
    assert await walk_prps(0x1000, 0, 0, PAGE, Lists().read) == []


async def test_within_one_page_uses_prp1_only() -> None:
    assert await walk_prps(0x5200, 0xDEAD, 512, PAGE, Lists().read) == [(0x5200, 512)]


async def test_page_crossing_uses_prp2_as_page() -> None:
    segs = await walk_prps(0x5E00, 0x9000, 1024, PAGE, Lists().read)
    assert segs == [(0x5E00, 512), (0x9000, 512)]


async def test_contiguous_pages_merge() -> None:
    segs = await walk_prps(0x5000, 0x6000, 2 * PAGE, PAGE, Lists().read)
    assert segs == [(0x5000, 2 * PAGE)]


async def test_prp_list_single_page() -> None:
    lists = Lists()
    lists.put(0x80000, [0x20000, 0x40000, 0x41000])
    segs = await walk_prps(0x10000, 0x80000, 4 * PAGE, PAGE, lists.read)
    assert segs == [(0x10000, PAGE), (0x20000, PAGE), (0x40000, 2 * PAGE)]
    assert lists.reads == [(0x80000, 24)]


async def test_prp_list_with_offset_and_partial_last_page() -> None:
    lists = Lists()
    lists.put(0x80010, [0x30000, 0x50000])
    segs = await walk_prps(0x10800, 0x80010, 2048 + PAGE + 100, PAGE, lists.read)
    assert segs == [(0x10800, 2048), (0x30000, PAGE), (0x50000, 100)]


async def test_chained_prp_lists() -> None:
    """512 entries per page: the last entry of a full list page points at the next list."""
    lists = Lists()
    first = [0x100000 + i * 2 * PAGE for i in range(511)] + [0x90000]
    lists.put(0x80000, first)
    lists.put(0x90000, [0x900000, 0x902000])
    total = PAGE + 513 * PAGE
    segs = await walk_prps(0x10000, 0x80000, total, PAGE, lists.read)
    assert len(segs) == 1 + 511 + 2
    assert segs[1] == (0x100000, PAGE) and segs[511] == (0x100000 + 510 * 2 * PAGE, PAGE)
    assert segs[-2:] == [(0x900000, PAGE), (0x902000, PAGE)]
    assert sum(n for _, n in segs) == total
    assert lists.reads == [(0x80000, PAGE), (0x90000, 16)]


async def test_list_exactly_filling_its_page_is_not_chained() -> None:
    lists = Lists()
    lists.put(0x80000, [0x200000 + i * 2 * PAGE for i in range(512)])
    segs = await walk_prps(0x10000, 0x80000, PAGE + 512 * PAGE, PAGE, lists.read)
    assert len(segs) == 513


@pytest.mark.parametrize(("prp1", "prp2", "length", "entries"), [
    (0x10002, 0, 16, None),                       # PRP1 not dword aligned
    (0x10000, 0x20010, 2 * PAGE, None),           # PRP2 page with an offset
    (0x10000, 0x80004, 3 * PAGE, None),           # list pointer not qword aligned
    (0x10000, 0x80000, 3 * PAGE, [0x20000, 0x30200]),  # list entry with an offset
])
async def test_invalid_offsets(prp1: int, prp2: int, length: int,
                               entries: list[int] | None) -> None:
    lists = Lists()
    if entries:
        lists.put(0x80000, entries)
    with pytest.raises(PrpError) as info:
        await walk_prps(prp1, prp2, length, PAGE, lists.read)
    assert info.value.status == Status.INVALID_PRP_OFFSET


async def test_chained_pointer_must_be_page_aligned() -> None:
    lists = Lists()
    lists.put(0x80FF0, [0x20000, 0x90008])
    with pytest.raises(PrpError):
        await walk_prps(0x10000, 0x80FF0, 4 * PAGE, PAGE, lists.read)


async def test_other_page_sizes() -> None:
    big = 65536
    assert await walk_prps(0x10000, 0x30000, 2 * big, big, Lists().read) == [
        (0x10000, big), (0x30000, big)]

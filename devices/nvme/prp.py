"""PRP (Physical Region Page) walking: a command's data pointer to guest memory segments.

Pure logic: the only outside access is `read_list`, the caller's way to fetch PRP list
entries, so the walker is tested with a dict of fake list pages (openvmm's `prp.rs` is
separated from its workers the same way).

Rules (NVMe 1.4 4.3), with `P` the memory page size (CC.MPS):

* PRP1 points at the first byte; it may carry an offset into its page (dword aligned).
* If the rest fits in one page, PRP2 is that page (offset must be 0).
* Otherwise PRP2 points at a PRP list (qword aligned, may start mid-page). Each entry names
  one page (offset 0). When the list needs more entries than its page holds, the last entry
  of the page points at the next list page instead.

Adjacent pages are merged into one segment, so a physically contiguous buffer becomes a
single (address, length) pair (one memoryview, one iovec). Violations raise `PrpError`
carrying the completion status, never an exception that could kill a worker.
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Awaitable, Callable, Sequence
from itertools import compress, repeat

from .spec import Status

ENTRY = 8

#: (guest address, length) pieces of a transfer, in order
Segments = list[tuple[int, int]]
ListReader = Callable[[int, int], Awaitable[bytes]]


class PrpError(Exception):
    """A malformed PRP; `status` is what the command completes with."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status


def _append(segs: Segments, address: int, length: int) -> None:
    if segs and segs[-1][0] + segs[-1][1] == address:
        segs[-1] = (segs[-1][0], segs[-1][1] + length)
    else:
        segs.append((address, length))


def _add_pages(segs: Segments, pages: Sequence[int], left: int, page_size: int) -> int:
    """Append one PRP list's worth of page entries (merging contiguous ones); returns the
    bytes still to cover. Why whole lists at a time, with `map`/`compress`: a 1 MiB
    transfer is 256 entries, and a Python statement per entry cost ~1 µs each, a quarter of
    the I/O's time in the guest benchmark; these keep the per-entry work in C."""
    n = len(pages)
    if not n:
        return left
    if any(map((page_size - 1).__and__, pages)):
        bad = next(e for e in pages if e & (page_size - 1))
        raise PrpError(Status.INVALID_PRP_OFFSET, f"PRP entry {bad:#x} has an offset")
    if segs and segs[-1][0] + segs[-1][1] == pages[0]:
        segs[-1] = (segs[-1][0], segs[-1][1] + page_size)  # continues PRP1's segment
        skip = 1
    else:
        skip = 0
    steps = list(map(operator.sub, pages[1:], pages[:-1]))
    if page_size not in steps:  # nothing to merge (scattered pages, the usual case)
        segs += zip(pages[skip:], repeat(page_size, n - skip), strict=True)
    else:
        # a new segment starts wherever an entry does not follow the one before it
        starts = [0, *compress(range(1, n), map(page_size.__ne__, steps))]
        ends = [*starts[1:], n]
        if skip:
            segs[-1] = (segs[-1][0], segs[-1][1] + (ends[0] - 1) * page_size)
            starts, ends = starts[1:], ends[1:]
        segs += [(pages[a], (b - a) * page_size) for a, b in zip(starts, ends, strict=True)]
    covered = n * page_size
    if covered > left:  # the last entry of the transfer covers only part of its page
        last_addr, last_len = segs[-1]
        segs[-1] = (last_addr, last_len - (covered - left))
        return 0
    return left - covered


def prp_head(prp1: int, prp2: int, length: int, page_size: int) -> tuple[Segments, int]:
    """The segments PRP1 (and PRP2 as a data page) cover, and the bytes left for a PRP
    list at PRP2 (0: none). Apart from `walk_list` so a transfer of one or two pages (a
    4 KiB I/O) is walked without a coroutine in the doorbell handler."""
    segs: Segments = []
    if length <= 0:
        return segs, 0
    mask = page_size - 1
    if prp1 & 0x3:
        raise PrpError(Status.INVALID_PRP_OFFSET, f"PRP1 {prp1:#x} is not dword aligned")
    first = min(length, page_size - (prp1 & mask))
    segs.append((prp1, first))
    left = length - first
    if 0 < left <= page_size:
        if prp2 & mask:
            raise PrpError(Status.INVALID_PRP_OFFSET, f"PRP2 {prp2:#x} has a page offset")
        _append(segs, prp2, left)
        return segs, 0
    return segs, left


async def walk_list(segs: Segments, list_addr: int, left: int, page_size: int,
                    read_list: ListReader) -> Segments:
    """`segs` (from `prp_head`) extended by the PRP list at `list_addr` for `left` bytes."""
    mask = page_size - 1
    if list_addr & (ENTRY - 1):
        raise PrpError(Status.INVALID_PRP_OFFSET, f"PRP list {list_addr:#x} not qword aligned")
    while left:
        room = (page_size - (list_addr & mask)) // ENTRY
        need = -(-left // page_size)
        chained = need > room
        count = room if chained else need
        raw = await read_list(list_addr, count * ENTRY)
        if len(raw) != count * ENTRY:
            raise PrpError(Status.DATA_TRANSFER_ERROR, "short PRP list read")
        entries = struct.unpack(f"<{count}Q", raw)
        pages = entries[:-1] if chained else entries
        left = _add_pages(segs, pages, left, page_size)
        if chained:
            list_addr = entries[-1]
            if list_addr & mask:
                raise PrpError(Status.INVALID_PRP_OFFSET,
                               f"chained PRP list {list_addr:#x} is not page aligned")
    return segs


async def walk_prps(
    prp1: int, prp2: int, length: int, page_size: int, read_list: ListReader
) -> Segments:
    """The segments that a transfer of `length` bytes described by PRP1/PRP2 covers."""
    segs, left = prp_head(prp1, prp2, length, page_size)
    if left:
        await walk_list(segs, prp2, left, page_size, read_list)
    return segs

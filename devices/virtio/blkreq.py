"""virtio-blk's request format (virtio 1.2, 5.2.6) and the helpers every way of serving one
shares: the worker's batches (`blk`) and the notify handler (`blkinline`).

Why a module of its own: both serving modules need the request types, the header layout
and the pinning rules, and `blk` imports `blkinline`; kept here, neither imports the other
the wrong way round (tests/test_architecture.py forbids cycles).
"""

from __future__ import annotations

import contextlib
import enum
import struct
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from devices.sdk.interface import DmaError, DmaPort, pinned_view, pinned_views

from .guestmem import MAX_SPAN, DeviceBugError, GuestMemoryError, bounds
from .virtqueue import Chain

_T = TypeVar("_T")

SECTOR = 512
#: struct virtio_blk_outhdr { le32 type; le32 reserved; le64 sector; }
OUTHDR = struct.Struct("<IIQ")


class ReqType(enum.IntEnum):
    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    DISCARD = 11
    WRITE_ZEROES = 13


class ReqStatus(enum.IntEnum):
    OK = 0
    IOERR = 1
    UNSUPP = 2


#: requests that change the disk's contents (made stable at once on a write-through disk)
WRITES = frozenset({ReqType.OUT, ReqType.DISCARD, ReqType.WRITE_ZEROES})


@dataclass
class Request:
    chain: Chain
    type: int
    sector: int
    #: OUT payload: pinned views of guest memory (zero copy) or one copied buffer
    data: Sequence[bytes | bytearray | memoryview] = ()
    #: IN without a page-cache hit: pinned views of the data buffers, read into directly
    views: Sequence[memoryview] = ()
    segments: tuple[tuple[int, int, int], ...] = ()
    status: int = ReqStatus.OK
    result: bytes | bytearray = b""
    inline_written: int | None = None


def pin(pins: contextlib.ExitStack, dma: DmaPort, pieces: list[tuple[int, int]], *,
        write: bool = False) -> list[memoryview] | None:
    """Zero-copy views of `pieces` valid until `pins` closes, or None (message mode, or an
    engine that cannot pin): the caller copies then."""
    if not pieces:
        return None
    try:
        if not write:
            # One pin of the pieces' span (guest RAM is normally one window), sliced:
            # pinning 256 pages one by one cost about as much as copying them. Writes
            # into the guest pin per piece, so dirty logging marks only those pages.
            lo, hi = bounds(pieces)
            if hi - lo <= MAX_SPAN:
                span = pins.enter_context(pinned_view(dma, lo, hi - lo))
                if span is not None:
                    views = [span[a - lo : a - lo + n] for a, n in pieces]
                    # released before the pin goes (LIFO), or the window's mmap could
                    # not be closed while the request objects still hold them
                    pins.callback(_release, views)
                    return views
        return pins.enter_context(pinned_views(dma, pieces, write=write))
    except DmaError as exc:
        raise GuestMemoryError(f"guest memory of a request: {exc}") from None


def run_now(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run a ring coroutine that cannot suspend here (every ring is mmap'd, checked first:
    `Virtqueue.push_many` / `should_interrupt` then only touch views)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return cast(_T, done.value)
    coro.close()
    raise DeviceBugError("a ring access waited in the notify handler")


def _release(views: list[memoryview]) -> None:
    for v in views:
        v.release()


def without_last_byte(segments: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The writable data segments of a request: everything but the final status byte."""
    if not segments:
        return []
    *head, (addr, length) = segments
    return [*head, (addr, length - 1)] if length > 1 else list(head)

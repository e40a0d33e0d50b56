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
from devices.sdk.storage import SPAN_LIMIT

from .guestmem import DeviceBugError, GuestMemoryError, bounds
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
        if not write and len(pieces) > 1:
            views = _pin_span(pins, dma, pieces)
            if views is not None:
                return views
        return pins.enter_context(pinned_views(dma, pieces, write=write))
    except DmaError as exc:
        raise GuestMemoryError(f"guest memory of a request: {exc}") from None


def _pin_span(pins: contextlib.ExitStack, dma: DmaPort,
              pieces: list[tuple[int, int]]) -> list[memoryview] | None:
    """One pin of the pieces' span (guest RAM is normally one window), sliced per piece;
    None when the span is wider than `SPAN_LIMIT`, crosses a window edge or a hole, or is
    not mmap'd: then `pin` pins piece by piece, so a request is never failed by memory
    between its pieces. Writes into the guest never come here: they pin per piece, so
    dirty logging marks only those pages.

    Why: a 1 MiB request is 256 scattered pages; one pin and 256 C-level slices cost less
    than a window lookup per page (a C-level `map(slice)` over precomputed offsets
    measured slower than this comprehension)."""
    lo, hi = bounds(pieces)
    if hi - lo > SPAN_LIMIT:
        return None
    try:
        span = pins.enter_context(pinned_view(dma, lo, hi - lo))
    except DmaError:
        return None  # a hole or a window edge inside the span, not in a piece
    if span is None:
        return None
    views = [span[a - lo : a - lo + n] for a, n in pieces]
    # released before the pin goes (LIFO): the window's mmap cannot be closed while the
    # request objects still hold them
    pins.callback(_release, views)
    return views


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

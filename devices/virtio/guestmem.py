"""Guest memory for virtqueues: copies in and out, zero-copy views, and the errors.

Why a module of its own: the ring logic (`virtqueue`) and the device models (blk, net) use
the same few ways to reach guest memory (an mmap'd view when the DMA window has one,
DMA_READ/DMA_WRITE messages otherwise), and the errors a driver can cause there. Views are
valid only until the next checkpoint (`DmaPort.view`); nothing here awaits while it holds
one.
"""

from __future__ import annotations

import operator

import trio

from devices.sdk.interface import DmaError, DmaPort

# the span helpers live in the SDK (storage.read_cached uses them too); re-exported so
# the ring and device modules keep importing them from here
from devices.sdk.storage import MAX_SPAN as MAX_SPAN
from devices.sdk.storage import bounds as bounds
from devices.sdk.storage import span_slices as span_slices
from devices.sdk.storage import span_view as span_view

_length = operator.itemgetter(1)


class VirtqueueError(Exception):
    """The driver put something malformed in the ring; the device must enter NEEDS_RESET."""


class DeviceBugError(VirtqueueError):
    """The device model broke the ring protocol itself (e.g. pushed a head it does not
    hold). Raised rather than written, so the guest never sees a corrupt used ring; the
    transport then sets NEEDS_RESET and logs the reason."""


class GuestMemoryError(VirtqueueError):
    """An address the rings point at is not mapped (DmaError).

    Possibly transient: QEMU unmaps and remaps all guest RAM while firmware changes the
    PAM registers, and a worker may run in that gap. Workers retry these for a while before
    treating them as a malformed ring.
    """


class MemoryRetry:
    """Back-off for `GuestMemoryError`: retry for up to `limit` seconds, then give up.

    A gap in the DMA mappings lasts a few milliseconds (QEMU remapping RAM for firmware);
    a ring that points at memory that never gets mapped is malformed after all.
    """

    def __init__(self, limit: float = 5.0) -> None:
        self.limit = limit
        self.reset()

    def reset(self) -> None:
        self.waited = 0.0
        self.delay = 0.001

    async def wait(self, exc: GuestMemoryError) -> None:
        if self.waited >= self.limit:
            raise exc
        await trio.sleep(self.delay)
        self.waited += self.delay
        self.delay = min(self.delay * 2, 0.1)


async def read_guest(dma: DmaPort, address: int, size: int) -> bytes:
    """Copy guest memory out: the mmap'd view when there is one, else DMA_READ messages."""
    try:
        view = dma.view(address, size)
        if view is not None:
            return bytes(view)
        return await dma.read(address, size)
    except DmaError as exc:
        raise GuestMemoryError(f"guest memory 0x{address:x}+{size}: {exc}") from None


async def write_guest(dma: DmaPort, address: int, data: bytes | bytearray | memoryview) -> None:
    """Copy into guest memory: the mmap'd view when there is one, else DMA_WRITE messages."""
    try:
        view = dma.view(address, len(data), write=True)
        if view is not None:
            view[:] = data
            return
        await dma.write(address, data)
    except DmaError as exc:
        raise GuestMemoryError(f"guest memory 0x{address:x}+{len(data)}: {exc}") from None


def piece_views(dma: DmaPort, pieces: list[tuple[int, int]],
                write: bool = False) -> list[memoryview] | None:
    """A zero-copy view per piece (valid until the next checkpoint), or None when the
    pieces are not in one mmap'd range (message mode): the caller copies then.

    For a consumer that hands guest buffers to a syscall at once (`os.writev` of a frame
    to the TAP) instead of gathering them into a new buffer first."""
    if len(pieces) == 1:
        addr, length = pieces[0]
        try:
            view = dma.view(addr, length, write=write)
        except DmaError as exc:
            raise GuestMemoryError(f"guest memory 0x{addr:x}+{length}: {exc}") from None
        return [view] if view is not None else None
    return span_slices(dma, pieces, write=write)


def clip(segments: list[tuple[int, int]], skip: int,
         limit: int | None) -> list[tuple[int, int]]:
    """The (address, length) pieces of `segments` after skipping `skip` bytes, up to
    `limit` bytes in total (zero-length pieces dropped)."""
    i, count = 0, len(segments)
    while i < count and skip >= segments[i][1]:
        skip -= segments[i][1]
        i += 1
    if i == count:
        return []
    addr, length = segments[i]
    if limit is None:
        # The payload after a request header: everything else, as one list slice.
        rest = segments[i + 1 :]
        if not all(map(_length, rest)):
            rest = [p for p in rest if p[1]]
        return [(addr + skip, length - skip), *rest]
    pieces: list[tuple[int, int]] = []
    total = 0
    for addr, length in segments[i:]:
        take = min(length - skip, limit - total)
        if take <= 0:
            if total >= limit:
                break
            continue
        pieces.append((addr + skip, take))
        total += take
        skip = 0
    return pieces


async def gather(dma: DmaPort, segments: list[tuple[int, int]], skip: int = 0,
                 limit: int | None = None) -> bytearray:
    """Concatenate the bytes of `segments`, starting `skip` bytes in, at most `limit` bytes.

    One preallocated buffer filled straight from mmap'd views (see `span_view`).
    """
    pieces = clip(segments, skip, limit)
    out = bytearray(sum(n for _, n in pieces))
    pos = 0
    span = span_view(dma, pieces) if len(pieces) > 1 else None
    if span is not None:
        base, view = span
        for addr, take in pieces:
            out[pos : pos + take] = view[addr - base : addr - base + take]
            pos += take
        return out
    for addr, take in pieces:
        out[pos : pos + take] = await read_guest(dma, addr, take)
        pos += take
    return out


async def scatter(dma: DmaPort, segments: list[tuple[int, int]],
                  data: bytes | bytearray | memoryview, skip: int = 0) -> int:
    """Spread `data` over `segments` starting `skip` bytes in; returns the bytes written."""
    mv = memoryview(data).cast("B")
    pieces = clip(segments, skip, len(mv))
    span = span_view(dma, pieces, write=True) if len(pieces) > 1 else None
    pos = 0
    if span is not None:
        base, view = span
        for addr, take in pieces:
            view[addr - base : addr - base + take] = mv[pos : pos + take]
            pos += take
        return pos
    for addr, take in pieces:
        await write_guest(dma, addr, mv[pos : pos + take])
        pos += take
    return pos


def store_u16(view: memoryview, offset: int, value: int) -> None:
    """Write a 16-bit ring field that the driver may read at any moment, in one store.

    Never `Struct.pack_into` on guest memory: it zeroes its target before writing the
    value, and a driver polling `used.idx` in that window reads 0, takes every entry of
    the last lap as new and reports "output.0:id N is not a head!" (Linux), breaking the
    queue. That was the virtio-net TX bug of session 1 (about one run in 14 of 120 MiB).
    A slice assignment could also be done in bytes; an item of an 'H' cast is one store.
    """
    view[offset : offset + 2].cast("H")[0] = value

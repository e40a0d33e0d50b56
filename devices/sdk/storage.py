"""Block storage for disk models (NVMe namespaces, virtio-blk): a raw image file or memory.

One backend for every disk model, so the durability rules of docs/durability.md live in one
place: a `write` returns only after `pwritev` handed every byte to the kernel (a completed
write survives the server being killed); `flush` returns only after the file reached stable
storage; a failed flush is remembered and fails every later one (the kernel reports a
writeback error once and then marks the lost pages clean, so a retried sync would succeed
without the data ever reaching the disk); an image we create or grow is synced with its
directory once, at open.

Backends are synchronous and blocking on purpose: a model calls a file backend through
`trio.to_thread.run_sync` (never on the trio thread) and a memory backend inline (a memcpy
is cheaper than a thread hop); `threaded` says which one it holds. The one exception is
`readinto_nowait`, which never blocks and serves page-cache hits on the caller's thread.

Data moves with vectored calls (`preadv`/`pwritev`) straight between the file and the
caller's buffers, which are memoryviews of guest memory when the DMA window is mmap'd, so a
1 MiB read is one syscall and no copy in Python.

Deallocation (NVMe Dataset Management and Write Zeroes, virtio-blk DISCARD and WRITE_ZEROES)
punches holes, so deallocated blocks read back as zeros and give the space back to the host
file system; where the file system cannot punch holes, zeros are written instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import operator
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from .bits import BytesLike
from .interface import DmaError, DmaPort, pinned_views

IOV_MAX = 1024
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_ZERO_CHUNK = 1 << 20
#: widest stretch of guest addresses `read_cached` takes one view of; scattered buffers
#: further apart get one pinned view per window instead. Why a bound: a write view marks
#: its whole span dirty while the client logs dirty pages (migration), a set entry per page
SPAN_LIMIT = 8 << 20

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


class BlockBackend(Protocol):
    """What a disk stores its blocks in (byte offsets, already bounds-checked by the model)."""

    size: int
    #: True when calls block on I/O and must run in a worker thread
    threaded: bool
    #: writes are refused by the model (the backend itself does not check)
    readonly: bool

    def readinto(self, offset: int, bufs: Sequence[memoryview]) -> None: ...

    def readinto_nowait(self, offset: int, bufs: Sequence[memoryview]) -> int:
        """Read as much as can be had without blocking (page cache hits); bytes done."""
        ...

    def write(self, offset: int, bufs: Sequence[BytesLike]) -> None: ...

    def flush(self) -> None: ...

    def deallocate(self, offset: int, length: int) -> None: ...

    def close(self) -> None: ...


class MemoryBackend:
    """Anonymous memory: pages are committed by the kernel only once written; lost on exit,
    so flush has nothing to do (docs/durability.md, "Memory backends")."""

    threaded = False

    def __init__(self, size: int, readonly: bool = False) -> None:
        self.size = size
        self.readonly = readonly
        self._map = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._buf = memoryview(self._map)

    def readinto(self, offset: int, bufs: Sequence[memoryview]) -> None:
        for buf in bufs:
            n = len(buf)
            buf[:] = self._buf[offset : offset + n]
            offset += n

    def readinto_nowait(self, offset: int, bufs: Sequence[memoryview]) -> int:
        self.readinto(offset, bufs)
        return sum(len(b) for b in bufs)

    def write(self, offset: int, bufs: Sequence[BytesLike]) -> None:
        for buf in bufs:
            n = len(buf)
            self._buf[offset : offset + n] = buf
            offset += n

    def flush(self) -> None:
        """Memory is as durable as it gets."""

    def deallocate(self, offset: int, length: int) -> None:
        self._buf[offset : offset + length] = bytes(length)

    def close(self) -> None:
        self._buf.release()
        self._map.close()


class FileBackend:
    """A raw image file, created and extended to `size` when needed (never truncated);
    `size` 0 takes the file's size. A read-only image is never created or grown.

    `flush_metadata` picks `fsync` over `fdatasync` for flushes: docs/durability.md promises
    fdatasync for NVMe and fsync for virtio-blk (both cover the data of a raw image whose
    size does not change; fsync also writes back timestamps).

    Resource handling: the file descriptor is opened here and closed by `close()`; a closed
    backend holds -1, so a stale number never reaches a reused descriptor.
    """

    threaded = True

    def __init__(self, path: str | os.PathLike[str], size: int = 0, readonly: bool = False,
                 *, flush_metadata: bool = False) -> None:
        self.path = Path(path)
        created = not self.path.exists()
        if readonly:
            flags = os.O_RDONLY
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            flags = os.O_RDWR | os.O_CREAT
        fd = os.open(self.path, flags | os.O_CLOEXEC, 0o644)
        try:
            current = os.fstat(fd).st_size
            if size == 0 or (readonly and size > current):
                size = current
            if size <= 0:
                raise ValueError(f"{self.path}: empty image and no size given")
            if current < size:
                os.ftruncate(fd, size)
            if created or current < size:
                sync_new_file(fd, self.path)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.size = size
        self.readonly = readonly
        self.flush_metadata = flush_metadata
        #: preadv(RWF_NOWAIT) works here (cleared on EOPNOTSUPP)
        self._nowait = hasattr(os, "RWF_NOWAIT")
        #: the first flush failure; every later flush raises it again (module docstring)
        self.flush_error: OSError | None = None

    def readinto(self, offset: int, bufs: Sequence[memoryview]) -> None:
        for start in range(0, len(bufs), IOV_MAX):
            chunk = list(bufs[start : start + IOV_MAX])
            left = sum(map(len, chunk))
            while chunk:
                n = os.preadv(self.fd, chunk, offset)
                if n == 0:  # past EOF (cannot happen for a sized image): zeros
                    for b in chunk:
                        b[:] = bytes(len(b))
                    break
                offset += n
                left -= n
                # consume walks the buffers in Python (~30-60 us for 256 pages): only
                # after a short transfer
                chunk = consume(chunk, n) if left else []

    def readinto_nowait(self, offset: int, bufs: Sequence[memoryview]) -> int:
        """`preadv(RWF_NOWAIT)`: served from the page cache on the caller's thread, so a
        cached read skips the worker-thread round trip (~130 us here); it never blocks,
        it stops short instead (EAGAIN), and the caller reads the rest in a thread.
        (Buffered `pwritev(RWF_NOWAIT)` gives EOPNOTSUPP on ext4, so writes have no twin.)"""
        if not self._nowait or len(bufs) > IOV_MAX:
            return 0
        done = 0
        chunk = list(bufs)
        total = sum(map(len, chunk))
        while chunk:
            try:
                n = os.preadv(self.fd, chunk, offset + done, os.RWF_NOWAIT)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                    self._nowait = False
                    break
                raise
            if n == 0:
                break
            done += n
            chunk = consume(chunk, n) if done < total else []
        return done

    def write(self, offset: int, bufs: Sequence[BytesLike]) -> None:
        for start in range(0, len(bufs), IOV_MAX):
            part = bufs[start : start + IOV_MAX]
            n = os.pwritev(self.fd, part, offset)
            offset += n
            if n == sum(map(len, part)):
                continue  # the usual case: no per-buffer work in Python
            # a short write: memoryviews, so consume can slice the first one left
            chunk = consume([memoryview(b) for b in part], n)
            while chunk:
                n = os.pwritev(self.fd, chunk, offset)
                offset += n
                chunk = consume(chunk, n)

    def flush(self) -> None:
        if self.flush_error is not None:
            raise OSError(self.flush_error.errno,
                          f"an earlier flush failed ({self.flush_error.strerror}); data "
                          "written before it may be lost") from self.flush_error
        try:
            if self.flush_metadata:
                os.fsync(self.fd)
            else:
                os.fdatasync(self.fd)
        except OSError as exc:
            self.flush_error = exc
            raise

    def deallocate(self, offset: int, length: int) -> None:
        if _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
            err = ctypes.get_errno()
            if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise OSError(err, os.strerror(err))
            zeros = memoryview(bytes(min(length, _ZERO_CHUNK)))
            while length:
                n = min(length, len(zeros))
                os.pwrite(self.fd, zeros[:n], offset)
                offset += n
                length -= n

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


def sync_new_file(fd: int, path: Path) -> None:
    """Make a file we created or grew durable as a whole: its size (fsync) and its name
    (fsync of the directory). Why: a flush on the guest's request covers the data, but on a
    host crash a never-synced directory entry may lose the whole image with it."""
    os.fsync(fd)
    dirfd = os.open(path.absolute().parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def consume(bufs: list[memoryview], n: int) -> list[memoryview]:
    """Drop the first `n` bytes of a buffer list (after a short vectored transfer).

    Linear in the buffers skipped: a 1 MiB transfer is 256 page buffers, and dropping
    them one list copy at a time cost ~150 us per request."""
    i, count = 0, len(bufs)
    while i < count and n >= len(bufs[i]):
        n -= len(bufs[i])
        i += 1
    rest = bufs[i:]
    if rest and n:
        rest[0] = rest[0][n:]
    return rest


def bounds(pieces: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The guest range [lo, hi) that `pieces` (non-empty) lie in.

    Why this way: it runs per request over ~200-256 pieces, before the data moves; two
    C-level passes over the columns take about half the time of `min(pieces)` plus
    `max(map(sum, pieces))` (one tuple comparison and one `sum` call per piece). Pieces
    of one length (a request's pages) skip the per-piece sums, which made an int each:
    the highest address plus that length is the end."""
    addrs, lengths = zip(*pieces, strict=True)
    first = lengths[0]
    if lengths.count(first) == len(lengths):
        return min(addrs), max(addrs) + first
    return min(addrs), max(map(operator.add, addrs, lengths))


#: largest guest range `span_view` asks for in one piece by default
MAX_SPAN = 1 << 30


def span_view(dma: DmaPort, pieces: Sequence[tuple[int, int]], write: bool = False,
              limit: int = MAX_SPAN) -> tuple[int, memoryview] | None:
    """One mmap'd view covering every piece, as (base address, view), or None when the
    pieces' span is wider than `limit`, crosses a hole or a window edge, or is not mmap'd.

    Why: a 1 MiB request is ~256 page-sized pieces, and asking the DMA port for each was
    the server's main cost. Guest RAM is normally one window, so one view of the pieces'
    bounding range serves them all; when it does not, the caller falls back to one view
    (or pin) per piece, so memory between the pieces never fails a request.
    """
    if not pieces:
        return None
    lo, hi = bounds(pieces)
    if hi - lo > limit:
        return None
    try:
        view = dma.view(lo, hi - lo, write=write)
    except DmaError:
        return None
    return (lo, view) if view is not None else None


def span_slices(dma: DmaPort, pieces: Sequence[tuple[int, int]], write: bool = False,
                limit: int = MAX_SPAN) -> list[memoryview] | None:
    """`span_view` cut into one slice per piece (C-level slices of one view: cheaper than
    a view per piece), or None as `span_view`. The slices are views: valid until the
    caller's next checkpoint."""
    span = span_view(dma, pieces, write, limit)
    if span is None:
        return None
    base, view = span
    return [view[a - base : a - base + n] for a, n in pieces]


def read_cached(backend: BlockBackend, dma: DmaPort, offset: int,
                ranges: Sequence[tuple[int, int]], length: int, *,
                span_first: bool = False) -> bool:
    """Read `length` bytes at `offset` from the page cache straight into the guest memory
    `ranges` ((address, size) pieces adding up to `length`), without blocking: True when
    all of it was served, False when the caller must take its usual path (a page-cache
    miss or short read, memory not mmap'd here, an unmapped address, an I/O error: that
    path meets the error again and reports it).

    Why one helper: a disk model's register or notify handler may serve a cached read
    before it returns (a doorbell to its interrupt without a task or a thread hop), which
    needs exactly this and nothing that waits. The views are used before the caller's next
    checkpoint. Cheapest first, measured with callgrind (nvme, 4 KiB / 1 MiB in 256
    pieces): one piece is one `view` (no pin: 240k -> 188k instructions per read with
    the rest of the doorbell); many pieces go to the engine's `pin_ranges` when it has one
    (one lookup per window, a C-level slice per piece: cheaper than any Python loop here),
    else one view of their whole span when that is one mmap'd stretch within
    `SPAN_LIMIT`, else `pinned_views` piece by piece. `span_first` tries the span view
    before `pin_ranges` (virtio-blk's notify handler, where the span measured cheaper:
    2.55M against 3.01M instructions per 1 MiB read, against the test fake's
    `pin_ranges`; devices/virtio/README.md). Either way the span's bounds are computed at
    most once. Anything left partly written is overwritten by the caller's
    usual path."""
    try:
        if len(ranges) == 1:
            address, size = ranges[0]
            view = dma.view(address, size, write=True)
            return view is not None and backend.readinto_nowait(offset, [view]) == length
        if span_first or not hasattr(dma, "pin_ranges"):
            span = span_slices(dma, ranges, write=True, limit=SPAN_LIMIT)
            if span is not None:
                return backend.readinto_nowait(offset, span) == length
        with pinned_views(dma, ranges, write=True) as pinned:
            return pinned is not None and backend.readinto_nowait(offset, pinned) == length
    except (DmaError, OSError):
        return False

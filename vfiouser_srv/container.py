"""Container: one client's DMA address space (the kernel's IOMMU container, in user space).

Concepts (after libvfio-user's `lib/dma.c`):

* A *window* is what one DMA_MAP added: [address, address + size) of the client's IOVA
  space, with read/write permission. Windows are sorted and never overlap.
* A window that came with a file descriptor of a file that *cannot shrink* (a memfd sealed
  with F_SEAL_SHRINK, as QEMU's `memory-backend-memfd` does by default) is mmap'd here
  (MAP_SHARED, protection from its permission) and served with zero-copy memoryviews. The
  descriptor the client sent is kept as the window's `fd` (a live upgrade hands it to the
  next process: docs/live-upgrade.md), and CPython's `mmap` keeps a duplicate of its own
  until the window is unmapped, so every mmap'd window costs two descriptors: the server
  raises its descriptor limit at start and advertises a `max_dma_maps` well below it.
* Guest memory is the client's file, and a file can shrink under a mapping: an access past
  the new end of file is a SIGBUS that kills the whole process (every device). So a window
  whose file is not sealed against shrinking (any other regular file: a memfd without
  seals, a file on tmpfs or hugetlbfs) is *never* mapped: it keeps the descriptor and is
  served with pread/pwrite at the window's file offset, which return short counts or
  errors instead of faulting (`DmaWindow.file`). Its `view` is None, as in message mode,
  so models take their copying path. An access past the end of file becomes
  `DmaError(EFAULT)` for the model (docs/security.md, "Guest memory").
* A window without an fd is served by DMA_READ / DMA_WRITE messages on the connection that
  mapped it.
* While DMA logging is on (migration, docs/migration.md) the container's `dirty` log records
  every page the device writes itself: through `view(write=True)`, a write pin and
  `write()` into an mmap'd or `file` window. Writes by DMA_WRITE message are the client's
  to log (it performs them), as the spec says.
* A *pin* is an access that spans awaits (e.g. file I/O in a worker thread straight into
  guest memory). DMA_UNMAP waits for the pins of the windows it removes before it replies,
  as the spec requires ("release all references ... including in-flight DMA").
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import logging
import mmap
import os
import stat
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import trio

from devices.sdk.interface import DmaError
from protocol import DmaMap, DmaMapFlags, RemoteProtocolError

from .fds import OwnedFd

log = logging.getLogger(__name__)

#: serves a message-mode piece: (window, offset in the window, length) -> the bytes read
MessageRead = Callable[["DmaWindow", int, int], Awaitable[bytes]]
#: serves a message-mode piece: (window, offset in the window, data to write)
MessageWrite = Callable[["DmaWindow", int, memoryview], Awaitable[None]]

_ADDRESS_LIMIT = 1 << 64
# Plain ints: IntFlag arithmetic costs microseconds per operation on Python 3.11.
_READ = int(DmaMapFlags.READ)
_WRITE = int(DmaMapFlags.WRITE)
_KNOWN = _READ | _WRITE
_UNKNOWN = ~_KNOWN
#: seals that make a mapping of the file safe: it can never get shorter
_SEAL_SHRINK = int(getattr(fcntl, "F_SEAL_SHRINK", 0x0002))
_F_GET_SEALS = int(getattr(fcntl, "F_GET_SEALS", 1034))
#: the smallest DMA_MAP flags value with a bit no flag has (valid flags: 1 to 3)
_NEXT_FLAG = _KNOWN + 1
_MAP_SHARED = mmap.MAP_SHARED
_mmap = mmap.mmap
_fcntl = fcntl.fcntl
_bisect_right = bisect.bisect_right
_bisect_left = bisect.bisect_left
_ACCESS_DEFAULT = mmap.ACCESS_DEFAULT
_PROT = (mmap.PROT_READ, mmap.PROT_READ | mmap.PROT_WRITE)


def _mmap_sealed(fileno: int, offset: int, size: int, writable: bool) -> mmap.mmap:
    """mmap a window of a file that can never shrink (`Container.map_window` checked).

    Only shmem and hugetlbfs files (regular files by construction) carry seals, so a
    sealed file needs no fstat of ours: CPython's mmap refuses a window past its end
    itself (it fstats a regular file), and the map QEMU makes costs one syscall fewer.
    The seals are asked of every descriptor: each DMA_MAP brings a new one, and an answer
    kept for another descriptor (even one with the same number) proves nothing.
    """
    try:  # positional: keyword parsing was a measurable part of a map
        return _mmap(fileno, size, _MAP_SHARED, _PROT[writable], _ACCESS_DEFAULT, offset)
    except (ValueError, OverflowError) as exc:  # past the end of the file
        raise RemoteProtocolError(
            f"DMA_MAP: the file cannot back {offset:#x}+{size:#x} ({exc})"
        ) from None
    except OSError as exc:
        raise RemoteProtocolError(
            f"DMA_MAP: mmap failed: {exc}", errno=exc.errno or errno.EINVAL
        ) from None


def _check_unsealed(fileno: int, offset: int, size: int) -> None:
    """A file that may shrink is served with pread/pwrite, never mapped; it must still be
    guest memory: only regular files back it (memfd, tmpfs, hugetlbfs, a plain file), a
    character device's mapping has semantics of its own and cannot be read safely."""
    st = os.fstat(fileno)
    if not stat.S_ISREG(st.st_mode):
        raise RemoteProtocolError("DMA_MAP: descriptor is not a regular file (guest memory)")
    if offset + size > st.st_size:
        raise RemoteProtocolError(
            f"DMA_MAP: file of {st.st_size:#x} bytes cannot back {offset:#x}+{size:#x}"
        )

class DmaWindow:
    """One DMA_MAP's window (the module docstring says what each way of reaching it means).

    A plain slotted class with `end` stored, not a dataclass: a guest's IOMMU maps and
    unmaps windows back to back, and building one (13 fields, a trio.Event each) was a
    tenth of what a map cost the server; the Event is made only when an unmap must wait
    for pins (`Container.drain`)."""

    __slots__ = (
        "address", "end", "fd", "file", "mapping", "offset", "owner", "pins", "readable", "size",
        "unpinned", "view", "writable",
    )

    def __init__(
        self,
        address: int,
        size: int,
        readable: bool,
        writable: bool,
        offset: int = 0,
        mapping: mmap.mmap | None = None,
        view: memoryview | None = None,
        file: OwnedFd | None = None,
        fd: OwnedFd | None = None,
        owner: Any = None,
    ) -> None:
        self.address = address
        self.size = size
        self.end = address + size
        self.readable = readable
        self.writable = writable
        #: file offset of `address` in the client's fd (0 in message mode)
        self.offset = offset
        self.mapping = mapping
        self.view = view
        #: the client's descriptor of a file that may shrink: accessed with pread/pwrite only
        self.file = file
        #: the client's descriptor of an mmap'd window: unused for access, kept so that a
        #: live upgrade can hand the window to the next process (`takeover_state`)
        self.fd = fd
        #: who mapped it: message-mode DMA goes back to this session
        self.owner = owner
        #: accesses that span awaits (`Container.pin`)
        self.pins = 0
        #: set when `pins` drops to 0, for an unmap waiting on it (made by `Container.drain`)
        self.unpinned: trio.Event | None = None

    def __repr__(self) -> str:
        return f"DmaWindow({self.address:#x}+{self.size:#x} {self.mode})"

    @property
    def mmapped(self) -> bool:
        return self.view is not None

    @property
    def mode(self) -> str:
        """How the server reaches this window: "mmap", "file" (pread/pwrite) or "message"."""
        return "mmap" if self.view is not None else "file" if self.file is not None else "message"

    def read_into(self, offset: int, out: memoryview) -> None:
        """Copy from a `file` window: pread at the window's file offset, never a fault."""
        assert self.file is not None
        fd, pos, want = self.file.fileno(), self.offset + offset, len(out)
        got = 0
        while got < want:
            try:
                n = os.preadv(fd, [out[got:]], pos + got)
            except OSError as exc:
                where = self.address + offset
                raise DmaError(exc.errno or errno.EIO, f"DMA read at {where:#x}: {exc}") from None
            if n == 0:
                raise DmaError(
                    errno.EFAULT,
                    f"DMA read {self.address + offset:#x}+{want:#x} is past the end of the "
                    "client's memory file (it shrank after DMA_MAP)",
                )
            got += n

    def write_from(self, offset: int, data: memoryview) -> None:
        """Copy into a `file` window with pwrite; refuses to write past the end of file
        (which would grow the client's file instead of failing like the memory it was)."""
        assert self.file is not None
        fd, pos, want = self.file.fileno(), self.offset + offset, len(data)
        if pos + want > os.fstat(fd).st_size:
            raise DmaError(
                errno.EFAULT,
                f"DMA write {self.address + offset:#x}+{want:#x} is past the end of the "
                "client's memory file (it shrank after DMA_MAP)",
            )
        done = 0
        while done < want:
            try:
                done += os.pwritev(fd, [data[done:]], pos + done)
            except OSError as exc:
                where = self.address + offset
                raise DmaError(exc.errno or errno.EIO, f"DMA write at {where:#x}: {exc}") from None

    def release(self) -> None:
        """Unmap. A device that kept a view past the unmap delays munmap until it drops it.
        A message-mode window holds nothing (the common early return)."""
        file, fd, mapping = self.file, self.fd, self.mapping
        if file is None and fd is None and mapping is None:
            return
        self.file = self.fd = self.mapping = None
        if file is not None:
            file.close()
        if fd is not None:
            fd.close()
        view, self.view = self.view, None
        if view is not None:
            view.release()
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:
                log.error(
                    "DMA window %#x+%#x still referenced by a device after unmap; "
                    "it is unmapped when the device drops its view",
                    self.address,
                    self.size,
                )


def unpin(window: DmaWindow) -> None:
    """Let go of one pin (`window.pins += 1` took it): an unmap waiting for the window's
    last pin goes on. A function, for a caller that pins many windows without a context
    manager per window (`SessionDma.pin_ranges`)."""
    window.pins -= 1
    if window.pins == 0 and (event := window.unpinned) is not None:
        window.unpinned = None
        event.set()


class DirtyLog:
    """Pages the device wrote while DMA logging is on (DEVICE_FEATURE DMA_LOGGING_*).

    A set of page numbers at the logging page size: marking costs one set update per write,
    and a report walks only the pages that are dirty, whatever the size of the range asked.
    """

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self._shift = page_size.bit_length() - 1
        self.pages: set[int] = set()

    def mark(self, address: int, size: int) -> None:
        if size > 0:
            shift = self._shift
            self.pages.update(range(address >> shift, ((address + size - 1) >> shift) + 1))

    def report(self, iova: int, length: int, page_size: int) -> bytes:
        """The bitmap of [iova, iova + length): bit i (of little-endian u64 words) for
        [iova + i * page_size, +page_size), set when a logged page in it was written.
        Reported pages that lie wholly in the range are cleared (read-and-clear, as
        VFIO's DMA_LOGGING_REPORT)."""
        nbits = -(-length // page_size)
        nbytes = -(-nbits // 64) * 8
        shift, end = self._shift, iova + length
        first, last = iova >> shift, (end - 1) >> shift
        bits = 0
        done = []
        for p in self.pages:
            if first <= p <= last:
                lo, hi = max(p << shift, iova), min((p + 1) << shift, end)
                b0, b1 = (lo - iova) // page_size, (hi - 1 - iova) // page_size
                bits |= ((1 << (b1 - b0 + 1)) - 1) << b0
                if p << shift >= iova and (p + 1) << shift <= end:
                    done.append(p)
        self.pages.difference_update(done)
        return bits.to_bytes(nbytes, "little")


class Container:
    """The sorted window set, with the limits negotiated at VERSION."""

    def __init__(self, *, page_size: int = 4096, max_maps: int = 65535) -> None:
        self.page_size = page_size
        self._mask = page_size - 1
        self.max_maps = max_maps
        self._starts: list[int] = []
        self._windows: list[DmaWindow] = []
        #: sessions attached to this container (a container may be shared within a group)
        self.users = 0
        #: pages the device wrote, while DMA logging is on (None: off)
        self.dirty: DirtyLog | None = None

    def __len__(self) -> int:
        return len(self._windows)

    def __iter__(self) -> Iterator[DmaWindow]:
        return iter(list(self._windows))

    # ----------------------------------------------------------------- map / unmap

    def map(self, req: DmaMap, owner: Any = None) -> DmaWindow:
        """Add a window. Consumes `req.fd`: closed if the map fails, else kept by the window
        (`DmaWindow.file` or `DmaWindow.fd`) until `release`."""
        return self.map_window(req.flags, req.offset, req.address, req.size, req.fd, owner)

    def map_window(
        self, flags: int, offset: int, address: int, size: int, fd: OwnedFd | None, owner: Any
    ) -> DmaWindow:
        """`map` from the body's values (`DmaMap.fields`, the server's DMA_MAP path).

        One frame for the whole map (the sealed file's mmap included), checks first and in
        one test (`_refuse` finds the reason of a refusal), positional calls only: this is
        what every map a guest's IOMMU makes runs, and each frame, keyword call and module
        attribute lookup was a measurable part of it (benchmarks/README.md)."""
        try:
            end = address + size
            mask = self._mask
            if (
                not 0 < flags < _NEXT_FLAG
                or not size
                or end > _ADDRESS_LIMIT
                or (address | size) & mask
                or (fd is not None and offset & mask)
            ):
                raise self._refuse(flags, offset, address, size)
            # `_overlapping`, inlined
            starts, windows = self._starts, self._windows
            i = _bisect_right(starts, address)
            if (i and windows[i - 1].end > address) or (i < len(starts) and starts[i] < end):
                raise RemoteProtocolError(
                    f"DMA_MAP: {address:#x}+{size:#x} overlaps a window", errno=errno.EEXIST
                )
            if len(starts) >= self.max_maps:
                raise RemoteProtocolError(
                    f"DMA_MAP: already {len(windows)} windows", errno=errno.ENOSPC
                )
            readable, writable = flags & _READ != 0, flags & _WRITE != 0
            if fd is None:
                window = DmaWindow(
                    address, size, readable, writable, 0, None, None, None, None, owner
                )
            else:
                # (`fd.fd`, not `fileno()`: a descriptor that just arrived is open)
                fileno = fd.fd
                try:
                    sealed = _fcntl(fileno, _F_GET_SEALS) & _SEAL_SHRINK
                except OSError:  # EINVAL: a file that supports no seals
                    sealed = 0
                if sealed:  # `_map_sealed` says why no fstat of ours
                    mapping = _mmap_sealed(fileno, offset, size, writable)
                    window = DmaWindow(
                        address, size, readable, writable, offset, mapping, memoryview(mapping),
                        None, fd, owner,
                    )
                else:
                    _check_unsealed(fileno, offset, size)
                    window = DmaWindow(
                        address, size, readable, writable, offset, None, None, fd, None, owner
                    )
        except BaseException:
            if fd is not None:  # consumed: a refused map closes it
                fd.close()
            raise
        # the overlap test said no above, and nothing ran since: insert at the same place
        starts.insert(i, address)
        windows.insert(i, window)
        return window

    def _refuse(self, flags: int, offset: int, address: int, size: int) -> RemoteProtocolError:
        """Why `map_window`'s first test refused a map."""
        if flags & _UNKNOWN:
            return RemoteProtocolError(f"DMA_MAP: unknown flags {flags:#x}")
        if not flags & _KNOWN:
            return RemoteProtocolError("DMA_MAP: neither read nor write")
        if size == 0:
            return RemoteProtocolError("DMA_MAP: size 0")
        if address + size > _ADDRESS_LIMIT:
            return RemoteProtocolError("DMA_MAP: address range wraps")
        return RemoteProtocolError(
            f"DMA_MAP: {address:#x}+{size:#x} (offset {offset:#x}) "
            f"not aligned to {self.page_size:#x}"
        )

    def add(self, window: DmaWindow) -> DmaWindow:
        """Insert a window that is already validated and reachable (its `view`, `file` or
        message-mode owner set). The libvfio-user engine calls this directly, because the
        library checks DMA_MAP and mmaps the client's file itself and hands us only the
        result. An overlap here is a caller's bug, hence ValueError."""
        if self._overlapping(window.address, window.size):
            raise ValueError(f"DMA window {window.address:#x}+{window.size:#x} overlaps one")
        return self._insert(window)

    def _insert(self, window: DmaWindow) -> DmaWindow:
        i = bisect.bisect_left(self._starts, window.address)
        self._starts.insert(i, window.address)
        self._windows.insert(i, window)
        return window

    def _overlapping(self, address: int, size: int) -> bool:
        i = bisect.bisect_right(self._starts, address)
        if i > 0 and self._windows[i - 1].end > address:
            return True
        return i < len(self._windows) and self._windows[i].address < address + size

    def take(self, address: int, size: int) -> DmaWindow:
        """Remove the window that exactly matches (ENOENT otherwise) and return it."""
        starts = self._starts
        i = _bisect_left(starts, address)
        if i < len(starts) and starts[i] == address:
            windows = self._windows
            w = windows[i]
            if w.size == size:
                del starts[i]
                del windows[i]
                return w
        raise RemoteProtocolError(
            f"DMA_UNMAP: no window {address:#x}+{size:#x}", errno=errno.ENOENT
        )

    def unmap(self, address: int, size: int) -> DmaWindow | None:
        """DMA_UNMAP of one window: `take` it (ENOENT) and `release` it, in one frame; a
        pinned window is returned instead, for the caller to release once the device lets
        go. A message-mode window holds nothing to release."""
        w = self.take(address, size)
        if w.pins:
            return w
        if w.mapping is not None or w.file is not None or w.fd is not None:
            w.release()
        return None

    def take_all(self, owner: Any = None) -> list[DmaWindow]:
        """Remove every window (of `owner` only, when given) and return them."""
        keep = [w for w in self._windows if owner is not None and w.owner is not owner]
        gone = [w for w in self._windows if w not in keep]
        self._windows = keep
        self._starts = [w.address for w in keep]
        return gone

    @staticmethod
    async def drain(windows: list[DmaWindow], timeout: float = 10.0) -> bool:
        """Wait until no access pins these windows. False if it timed out."""
        if not any(w.pins for w in windows):
            return True  # the usual case: no timer, no cancel scope
        with trio.move_on_after(timeout):
            for w in windows:
                if w.pins:
                    event = w.unpinned
                    if event is None:
                        event = w.unpinned = trio.Event()
                    await event.wait()
            return True
        return False

    def release_all(self) -> None:
        for w in self.take_all():
            w.release()

    # ----------------------------------------------------------------- lookup

    def find(self, address: int) -> DmaWindow:
        i = bisect.bisect_right(self._starts, address) - 1
        if i >= 0:
            w = self._windows[i]
            if address < w.end:
                return w
        raise DmaError(errno.EFAULT, f"DMA address {address:#x} is not mapped")

    def spans(self, address: int, size: int, write: bool) -> Iterator[tuple[DmaWindow, int, int]]:
        """(window, offset in window, length) pieces covering [address, address+size)."""
        if size < 0 or address < 0 or address + size > _ADDRESS_LIMIT:
            raise DmaError(errno.EINVAL, f"bad DMA range {address:#x}+{size:#x}")
        pos, end = address, address + size
        while pos < end:
            w = self.find(pos)
            if write and not w.writable:
                raise DmaError(errno.EPERM, f"DMA window at {w.address:#x} is not writable")
            if not write and not w.readable:
                raise DmaError(errno.EPERM, f"DMA window at {w.address:#x} is not readable")
            n = min(end, w.end) - pos
            yield w, pos - w.address, n
            pos += n

    # ----------------------------------------------------------------- access
    # The DmaPort of either engine over this table. Message-mode pieces (no view, no file)
    # go to the engine's callable: only the engine can send DMA_READ/DMA_WRITE.

    def view(self, address: int, size: int, *, write: bool = False) -> memoryview | None:
        """Zero-copy view of [address, address+size) when it lies in one mmap'd window;
        None when it spans windows or its window is not mmap'd (`file`, message mode).

        A range inside one window (nearly every call: a ring entry, a doorbell buffer, a
        request's data) is answered in this frame, without `spans`' generator and the
        list of its pieces; a device asks for several views per I/O (nvme: SQ entry, CQ
        entry, shadow tail, event index). Anything else takes `spans` and its rules."""
        i = _bisect_right(self._starts, address) - 1
        if i >= 0 and size > 0 and address + size <= (w := self._windows[i]).end:
            if not (w.writable if write else w.readable):
                what = "writable" if write else "readable"
                raise DmaError(errno.EPERM, f"DMA window at {w.address:#x} is not {what}")
            if (mapped := w.view) is None:
                return None
            if write and self.dirty is not None:
                self.dirty.mark(address, size)
            off = address - w.address
            return mapped[off : off + size]
        pieces = list(self.spans(address, size, write))
        if len(pieces) != 1:
            return None if pieces else memoryview(b"")
        w, off, n = pieces[0]
        if w.view is None:
            return None
        if write and self.dirty is not None:
            self.dirty.mark(address, size)
        return w.view[off : off + n]

    async def read(self, address: int, size: int, message: MessageRead) -> bytes:
        """Copy [address, address+size) out: mmap'd windows by memory copy, `file` windows
        with pread, the rest through `message(window, offset in window, length)`."""
        out = bytearray(size)
        dst = memoryview(out)
        pos = 0
        for w, off, n in self.spans(address, size, False):
            if w.view is not None:
                dst[pos : pos + n] = w.view[off : off + n]
            elif w.file is not None:
                w.read_into(off, dst[pos : pos + n])
            else:
                dst[pos : pos + n] = await message(w, off, n)
            pos += n
        dst.release()
        return bytes(out)

    async def write(
        self, address: int, data: bytes | bytearray | memoryview, message: MessageWrite
    ) -> None:
        """Copy `data` in at `address`, as `read` does out (`message(window, offset, data)`
        for the pieces of message-mode windows)."""
        mv = memoryview(data).cast("B")
        pos = 0
        dirty = self.dirty
        for w, off, n in self.spans(address, len(mv), True):
            if w.view is not None:
                w.view[off : off + n] = mv[pos : pos + n]
            elif w.file is not None:
                w.write_from(off, mv[pos : pos + n])
            else:
                await message(w, off, mv[pos : pos + n])
                pos += n
                continue
            if dirty is not None:
                dirty.mark(w.address + off, n)
            pos += n

    @contextlib.contextmanager
    def pin(self, window: DmaWindow) -> Iterator[None]:
        window.pins += 1
        try:
            yield
        finally:
            unpin(window)

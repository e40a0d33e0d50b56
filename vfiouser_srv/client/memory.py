"""Guest RAM on the client side, and the server's DMA_READ / DMA_WRITE answered from it.

Apart from the connection because it is the one part with a model of its own (what RAM
exists, what the server was told it may touch); the reader task only hands it each DMA
request. It calls *up* into the client to DMA_MAP / DMA_UNMAP windows, through the small
`MemoryOwner` protocol, so that this module never imports the client's.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import logging
import mmap
import os
from dataclasses import dataclass, field
from typing import Protocol

from protocol import (
    Body,
    Capabilities,
    DmaMapFlags,
    DmaRead,
    DmaReadReply,
    DmaUnmapFlags,
    DmaWrite,
    DmaWriteReply,
)

from ..fds import OwnedFd

log = logging.getLogger(__name__)


class MemoryOwner(Protocol):
    """The client as guest memory sees it: who maps windows, and the transfer size it offered."""

    @property
    def caps(self) -> Capabilities: ...

    async def dma_map(
        self, address: int, size: int, *, flags: int = ..., fd: OwnedFd | None = ...
    ) -> None: ...

    async def dma_unmap(self, address: int, size: int) -> object: ...


@dataclass(eq=False)
class RamWindow:
    """One piece of guest RAM: a memfd, mmap'd here, possibly also mmap'd by the server."""

    address: int
    size: int
    fd: OwnedFd
    shared: bool
    _map: mmap.mmap = field(repr=False)

    @property
    def end(self) -> int:
        return self.address + self.size


@dataclass(frozen=True, slots=True)
class MappedRange:
    """A window the server accepted with DMA_MAP (what it may access, and how)."""

    address: int
    size: int
    flags: int

    @property
    def end(self) -> int:
        return self.address + self.size


class _Fault(Exception):
    def __init__(self, err: int, why: str) -> None:
        super().__init__(why)
        self.errno = err


class GuestMemory:
    """The client's "guest RAM", and the server's DMA_READ/DMA_WRITE served from it.

    Two separate facts are kept, because tests need them to disagree: which RAM exists
    (`windows`, memfds created by `add_ram`) and what the server was told it may access
    (`mapped`, updated when a DMA_MAP / DMA_UNMAP *reply* arrives, whoever sent it). A DMA
    request is served only where both cover the whole range and the map's flags allow it:
    READ for DMA_READ, WRITE for DMA_WRITE; anything else gets EFAULT. With `bus_master`
    False every DMA request gets EIO (QEMU ignores DMA while the guest has Bus Master off).
    """

    def __init__(self, client: MemoryOwner) -> None:
        self._client = client
        self.windows: list[RamWindow] = []
        self.mapped: list[MappedRange] = []
        self.bus_master = True
        #: served requests, for tests that check which DMA path the server took
        self.dma_reads = 0
        self.dma_writes = 0
        self.dma_errors = 0

    # -------------------------------------------------------------- RAM

    async def add_ram(
        self,
        address: int,
        size: int,
        *,
        shared: bool = True,
        flags: int = DmaMapFlags.READ | DmaMapFlags.WRITE,
        dma_map: bool = True,
        sealed: bool = True,
    ) -> RamWindow:
        """Create `size` bytes of RAM at `address` and (unless `dma_map=False`) map it.

        `shared` sends the memfd with DMA_MAP, like `memory-backend-memfd,share=on`, so the
        server can mmap it; otherwise DMA_MAP carries no fd and the server must use DMA_READ
        / DMA_WRITE messages. `sealed` seals the memfd against shrinking and growing, as
        QEMU's memory-backend-memfd does by default: a server mmaps only a file that cannot
        shrink under it (an unsealed one it serves with pread/pwrite). If the server refuses
        the map, the RAM is released again and `VfioUserError` propagates.
        """
        if size <= 0 or address < 0:
            raise ValueError(f"bad RAM window {address:#x}+{size:#x}")
        for w in self.windows:
            if address < w.end and w.address < address + size:
                raise ValueError(f"RAM {address:#x}+{size:#x} overlaps {w.address:#x}+{w.size:#x}")
        fd = OwnedFd(
            os.memfd_create(
                f"vfiouser-guest-ram-{address:#x}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
            )
        )
        try:
            os.ftruncate(fd.fileno(), size)
            if sealed:
                seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                fcntl.fcntl(fd.fileno(), fcntl.F_ADD_SEALS, seals)
            mm = mmap.mmap(fd.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            fd.close()
            raise
        win = RamWindow(address, size, fd, shared, mm)
        bisect.insort(self.windows, win, key=lambda w: w.address)
        if dma_map:
            try:
                await self._client.dma_map(address, size, flags=flags, fd=fd if shared else None)
            except BaseException:
                self._release(win)
                raise
        return win

    async def remove_ram(self, window: RamWindow | int, *, unmap: bool = True) -> None:
        """Release a RAM window; first DMA_UNMAP it if the server has exactly that map."""
        win = self._find_window(window)
        if unmap and any(m.address == win.address and m.size == win.size for m in self.mapped):
            await self._client.dma_unmap(win.address, win.size)
        self._release(win)

    def _find_window(self, window: RamWindow | int) -> RamWindow:
        for w in self.windows:
            if w is window or (isinstance(window, int) and w.address == window):
                return w
        raise KeyError(f"no RAM window {window!r}")

    def _release(self, win: RamWindow) -> None:
        self.windows.remove(win)
        win._map.close()
        win.fd.close()

    def close(self) -> None:
        """Release all RAM (the server's own mmaps of the memfds stay valid until it unmaps)."""
        for w in list(self.windows):
            self._release(w)
        self.mapped.clear()

    # -------------------------------------------------------------- access

    def _pieces(self, address: int, count: int) -> list[tuple[RamWindow, int, int]]:
        """(window, offset in window, length) covering [address, address+count), or _Fault."""
        out: list[tuple[RamWindow, int, int]] = []
        pos, end = address, address + count
        starts = [w.address for w in self.windows]
        while pos < end:
            i = bisect.bisect_right(starts, pos) - 1
            if i < 0 or pos >= self.windows[i].end:
                raise _Fault(errno.EFAULT, f"no RAM at {pos:#x}")
            w = self.windows[i]
            n = min(end, w.end) - pos
            out.append((w, pos - w.address, n))
            pos += n
        return out

    def read(self, address: int, count: int) -> bytes:
        """Read RAM directly (whether or not the server has it mapped). EFAULT if absent."""
        try:
            return b"".join(w._map[o : o + n] for w, o, n in self._pieces(address, count))
        except _Fault as exc:
            raise OSError(exc.errno, str(exc)) from None

    def write(self, address: int, data: bytes | bytearray | memoryview) -> None:
        """Write RAM directly (the server sees it at once through a shared mapping)."""
        try:
            pieces = self._pieces(address, len(data))
        except _Fault as exc:
            raise OSError(exc.errno, str(exc)) from None
        src = memoryview(data).cast("B")
        pos = 0
        for w, o, n in pieces:
            w._map[o : o + n] = src[pos : pos + n]
            pos += n

    # -------------------------------------------------------------- the server's view

    def _note_map(self, address: int, size: int, flags: int) -> None:
        bisect.insort(self.mapped, MappedRange(address, size, flags), key=lambda m: m.address)

    def _note_unmap(self, address: int, size: int, flags: int) -> None:
        if flags & DmaUnmapFlags.ALL:
            self.mapped.clear()
        else:
            self.mapped = [m for m in self.mapped if (m.address, m.size) != (address, size)]

    def _check_mapped(self, address: int, count: int, need: int) -> None:
        pos, end = address, address + count
        while pos < end:
            for m in self.mapped:
                if m.address <= pos < m.end:
                    if m.flags & need != need:
                        raise _Fault(errno.EFAULT, f"{pos:#x} mapped without {need!r}")
                    pos = m.end
                    break
            else:
                raise _Fault(errno.EFAULT, f"{pos:#x} is not DMA-mapped")

    def _dma_check(self, address: int, count: int, need: int) -> list[tuple[RamWindow, int, int]]:
        if not self.bus_master:
            raise _Fault(errno.EIO, "bus master disabled")
        if count > self._client.caps.max_data_xfer_size:
            raise _Fault(errno.EINVAL, f"count {count} above max_data_xfer_size")
        if address + count > 1 << 64:
            raise _Fault(errno.EFAULT, "address wraps")
        self._check_mapped(address, count, need)
        return self._pieces(address, count)

    def _serve(self, body: Body) -> Body | int:
        """Answer one DMA request: a reply body, or an errno for an error reply."""
        try:
            if isinstance(body, DmaRead):
                pieces = self._dma_check(body.address, body.count, DmaMapFlags.READ)
                data = b"".join(w._map[o : o + n] for w, o, n in pieces)
                self.dma_reads += 1
                return DmaReadReply(body.address, data)
            if isinstance(body, DmaWrite):
                pieces = self._dma_check(body.address, len(body.data), DmaMapFlags.WRITE)
                src, pos = memoryview(body.data), 0
                for w, o, n in pieces:
                    w._map[o : o + n] = src[pos : pos + n]
                    pos += n
                self.dma_writes += 1
                return DmaWriteReply(body.address, len(body.data))
        except _Fault as exc:
            self.dma_errors += 1
            log.info("DMA %s refused: %s", body.COMMAND.name, exc)
            return exc.errno
        self.dma_errors += 1
        return errno.ENOTSUP


__all__ = ["GuestMemory", "MappedRange", "MemoryOwner", "RamWindow"]

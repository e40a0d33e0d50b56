"""BAR declarations and their backings.

A BAR is declared once (`Bar(index, size, kind, prefetchable, backing, traps)`) and the SDK
derives from it the config-space BAR register (type bits and sizing mask), the region that
GET_REGION_INFO reports (with an fd and sparse mmap areas when memory-backed) and the
dispatch of region accesses.

Backings:

* a `BarHandler` (anything with synchronous `read(offset, count)` / `write(offset, data)`,
  e.g. a `RegisterBank`): every access is trapped and served by the model;
* `SharedMemory`: a memfd the model maps for itself and offers to the client for mmap, so
  guest accesses never reach the server;
* None: reads 0, writes are ignored.

`traps` carve handler-served windows out of a BAR (registers in the first page of an
otherwise mmap-able BAR; the MSI-X table and PBA are added the same way). The mmap areas
of a memory-backed BAR are its size minus the pages any trap touches.
"""

from __future__ import annotations

import enum
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .bits import BytesLike, is_power_of_two
from .config import BAR_IO_MIN_SIZE, BAR_MEM_MIN_SIZE, NUM_BARS, ROM_MIN_SIZE
from .interface import MmapArea

PAGE_SIZE = mmap.PAGESIZE


class BarHandler(Protocol):
    """A trapped BAR area; accesses arrive already bounds-checked against the BAR."""

    def read(self, offset: int, count: int) -> bytes: ...

    def write(self, offset: int, data: BytesLike) -> None: ...


@dataclass(frozen=True)
class CallbackHandler:
    """A `BarHandler` made of two callables, for models that decode their BAR by hand."""

    read_fn: Callable[[int, int], bytes]
    write_fn: Callable[[int, bytes], None]

    def read(self, offset: int, count: int) -> bytes:
        return self.read_fn(offset, count)

    def write(self, offset: int, data: BytesLike) -> None:
        self.write_fn(offset, bytes(data))


class BarKind(enum.Enum):
    MEM32 = "mem32"
    MEM64 = "mem64"
    IO = "io"


class SharedMemory:
    """A memfd-backed BAR body: mmap-able by the client, mapped by the model.

    Resource handling: the memfd is created and sized when the owning `PciDevice` is built
    (`allocate`), and closed by `close()` (called from `PciDevice.close`); after that the fd
    attribute is -1 so a stale number can never reach a reused descriptor.
    """

    def __init__(self, name: str = "vfiouser-bar", *, clear_on_reset: bool = True) -> None:
        self.name = name
        self.clear_on_reset = clear_on_reset
        self.fd = -1
        self.size = 0
        self._map: mmap.mmap | None = None
        self._view: memoryview | None = None

    def allocate(self, size: int) -> None:
        if self.fd >= 0:
            raise RuntimeError("shared memory already allocated")
        fd = os.memfd_create(self.name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.size = size
        self._view = memoryview(self._map)

    @property
    def buf(self) -> memoryview:
        """The model's own mapping of the whole BAR (shared with the client's mmap)."""
        if self._view is None:
            raise RuntimeError("shared memory is not allocated (or already closed)")
        return self._view

    def read(self, offset: int, count: int) -> bytes:
        return bytes(self.buf[offset : offset + count])

    def write(self, offset: int, data: BytesLike) -> None:
        self.buf[offset : offset + len(data)] = data

    def clear(self) -> None:
        self.buf[:] = bytes(self.size)

    def close(self) -> None:
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._map is not None:
            self._map.close()
            self._map = None
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


@dataclass(frozen=True)
class Trap:
    """A window of a BAR served by `handler` (offsets passed to it are window-relative)."""

    offset: int
    size: int
    handler: BarHandler


@dataclass(frozen=True)
class Bar:
    """One BAR. A MEM64 BAR occupies slots `index` and `index + 1`."""

    index: int
    size: int
    kind: BarKind = BarKind.MEM32
    prefetchable: bool = False
    backing: BarHandler | SharedMemory | None = None
    traps: tuple[Trap, ...] = ()

    def __post_init__(self) -> None:
        last = NUM_BARS - (2 if self.kind is BarKind.MEM64 else 1)
        if not 0 <= self.index <= last:
            raise ValueError(f"BAR index {self.index} out of range for {self.kind.value}")
        minimum = BAR_IO_MIN_SIZE if self.kind is BarKind.IO else BAR_MEM_MIN_SIZE
        if not is_power_of_two(self.size) or self.size < minimum:
            raise ValueError(f"BAR{self.index} size {self.size:#x} must be a power of two "
                             f">= {minimum}")
        if self.kind is BarKind.MEM32 and self.size > 1 << 31:
            raise ValueError(f"BAR{self.index}: a 32-bit BAR cannot exceed 2 GiB")
        if self.kind is BarKind.IO and self.prefetchable:
            raise ValueError(f"BAR{self.index}: I/O BARs cannot be prefetchable")
        if self.kind is BarKind.IO and isinstance(self.backing, SharedMemory):
            raise ValueError(f"BAR{self.index}: I/O BARs cannot be mmap'd")
        for trap in self.traps:
            if trap.offset < 0 or trap.size <= 0 or trap.offset + trap.size > self.size:
                raise ValueError(f"BAR{self.index}: trap {trap.offset:#x}+{trap.size:#x} "
                                 "outside the BAR")

    @property
    def slots(self) -> int:
        return 2 if self.kind is BarKind.MEM64 else 1

    def mmap_areas(self, traps: tuple[Trap, ...]) -> tuple[MmapArea, ...]:
        """Page-aligned areas left mmap-able once `traps` are carved out."""
        holes = sorted(
            (t.offset // PAGE_SIZE * PAGE_SIZE, -(-(t.offset + t.size) // PAGE_SIZE) * PAGE_SIZE)
            for t in traps
        )
        areas: list[MmapArea] = []
        pos = 0
        for start, end in holes:
            if start > pos:
                areas.append(MmapArea(pos, start - pos))
            pos = max(pos, end)
        if pos < self.size:
            areas.append(MmapArea(pos, self.size - pos))
        return tuple(areas)


@dataclass(frozen=True)
class Rom:
    """An expansion ROM image (region 6), read-only, sized up to a power of two >= 2 KiB."""

    data: bytes
    size: int = 0

    def __post_init__(self) -> None:
        size = self.size or max(ROM_MIN_SIZE, 1 << max(0, (len(self.data) - 1).bit_length()))
        if not is_power_of_two(size) or size < ROM_MIN_SIZE or size < len(self.data):
            raise ValueError(f"ROM size {size:#x} invalid for {len(self.data)} bytes")
        object.__setattr__(self, "size", size)

    def read(self, offset: int, count: int) -> bytes:
        chunk = self.data[offset : offset + count]
        return chunk + bytes(count - len(chunk))

"""What every PCI capability is, and where it goes: the base classes and `place_capabilities`.

A capability knows its own register layout (drawn in its docstring), its power-on values and
its write masks; it does not know where it lives until it is placed. Standard capabilities
go after the 64-byte header on dword boundaries, in declaration order, linked through the
next pointers from 0x34; extended capabilities (PCI Express only) start at 0x100 and are
linked through the 12-bit next field of their headers. The Status register's capability-list
bit is set when there is at least one capability.

The capabilities themselves are in `caps` (the catalogue a model imports from) and `msi`.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import ClassVar

from .config import (
    CAPABILITY_LIST,
    HEADER_SIZE,
    PCI_CONFIG_SIZE,
    PCIE_CONFIG_SIZE,
    STATUS,
    ConfigSpace,
    Status,
)


class CapId(enum.IntEnum):
    PM = 0x01
    MSI = 0x05
    VENDOR = 0x09
    PCIE = 0x10
    MSIX = 0x11


class ExtCapId(enum.IntEnum):
    VENDOR = 0x000B


CAP_ID_OFFSET = 0
CAP_NEXT_OFFSET = 1
EXT_CAP_NEXT_SHIFT = 20
EXT_CAP_VERSION_SHIFT = 16
DWORD = 4


class _CapBase:
    """Common plumbing: a capability bound to a config space at a placed offset."""

    #: size in bytes including the header
    size: int = 0

    def __init__(self) -> None:
        self.offset = -1
        self._space: ConfigSpace | None = None

    @property
    def placed(self) -> bool:
        return self._space is not None

    @property
    def space(self) -> ConfigSpace:
        if self._space is None:
            raise RuntimeError(f"{type(self).__name__} has not been placed in config space")
        return self._space

    def _install(self, space: ConfigSpace, offset: int) -> None:
        self._space = space
        self.offset = offset
        self.build()

    def define(self, rel: int, size: int, value: int, wmask: int = 0, w1c: int = 0) -> None:
        """Declare a register at `rel` bytes into the capability (used by `build`)."""
        self.space.define(self.offset + rel, size, value, wmask, w1c)

    def get(self, rel: int, size: int) -> int:
        return self.space.get(self.offset + rel, size)

    def set(self, rel: int, size: int, value: int) -> None:
        self.space.set(self.offset + rel, size, value)

    def build(self) -> None:
        """Define the body registers (everything after the header)."""

    def after_write(self, old: bytes) -> None:
        """A guest write touched this capability; `old` is its bytes before the write.

        Override to undo writes the spec says to ignore (e.g. unsupported power states).
        """


class Capability(_CapBase):
    """A standard capability: 8-bit ID and next pointer, placed below 0x100."""

    cap_id: ClassVar[int]


class ExtendedCapability(_CapBase):
    """A PCI Express extended capability: 32-bit header with 16-bit ID and version."""

    cap_id: ClassVar[int]
    version: ClassVar[int] = 1


def align_up(value: int, to: int) -> int:
    """`value` rounded up to a multiple of `to` (a power of two)."""
    return (value + to - 1) & ~(to - 1)


def place_capabilities(
    space: ConfigSpace,
    caps: Sequence[Capability],
    ext_caps: Sequence[ExtendedCapability] = (),
) -> None:
    """Lay out and link capabilities; raises ValueError when they do not fit."""
    pos = HEADER_SIZE
    link = CAPABILITY_LIST
    for cap in caps:
        if cap.placed:
            raise ValueError(f"{type(cap).__name__} is already placed")
        pos = align_up(pos, DWORD)
        if pos + cap.size > PCI_CONFIG_SIZE:
            raise ValueError("capabilities do not fit in the 256-byte config space")
        space.set(link, 1, pos)
        space.define(pos + CAP_ID_OFFSET, 1, cap.cap_id)
        space.define(pos + CAP_NEXT_OFFSET, 1, 0)
        cap._install(space, pos)
        link = pos + CAP_NEXT_OFFSET
        pos += cap.size
    space.set_bits(STATUS, 2, Status.CAP_LIST, bool(caps))

    if not ext_caps:
        return
    if space.size < PCIE_CONFIG_SIZE:
        raise ValueError("extended capabilities need a PCI Express capability")
    pos = PCI_CONFIG_SIZE
    prev = -1
    for ecap in ext_caps:
        if ecap.placed:
            raise ValueError(f"{type(ecap).__name__} is already placed")
        pos = align_up(pos, DWORD)
        if pos + ecap.size > PCIE_CONFIG_SIZE:
            raise ValueError("extended capabilities do not fit in 4 KiB config space")
        if prev >= 0:
            header = space.get(prev, 4)
            space.set(prev, 4, header | (pos << EXT_CAP_NEXT_SHIFT))
        space.define(pos, 4, ecap.cap_id | (ecap.version << EXT_CAP_VERSION_SHIFT))
        ecap._install(space, pos)
        prev = pos
        pos += ecap.size


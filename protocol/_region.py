"""The two region replies whose layout depends on their contents, written by hand.

GET_REGION_INFO's reply carries a chain of capabilities (sparse mmap areas, a type) after
its 32-byte head, and the argsz handshake decides whether the chain and the fd are sent at
all. GET_REGION_IO_FDS's reply carries an array of sub-regions whose `fd_index` points into
the message's descriptors. The requests of both are fixed bodies (`_bodies`).

See docs/protocol.md.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from ._body import Body, Fds, need, reject
from ._constants import Command, RegionCapId, RegionFlags

_CAP_HEADER = struct.Struct("<HHI")  # id, version, next (offset from the start of the reply)
_SPARSE_HEAD = struct.Struct("<II")  # nr_areas, reserved
_SPARSE_AREA = struct.Struct("<QQ")  # offset, size
_CAP_TYPE = struct.Struct("<II")  # type, subtype
_IO_FD_SUB = struct.Struct("<QQIIIIQ")  # offset, size, fd_index, type, flags, pad, datamatch
#: a longer chain is a loop (the spec defines two capabilities)
_MAX_CAPS = 64
_CAPS = int(RegionFlags.CAPS)

# --------------------------------------------------------------------------- GET_REGION_INFO (5)


@dataclass(frozen=True, slots=True)
class SparseMmapCap:
    """VFIO_REGION_INFO_CAP_SPARSE_MMAP: the mmap-able (offset, size) areas of a region."""

    areas: tuple[tuple[int, int], ...]
    ID: ClassVar[int] = RegionCapId.SPARSE_MMAP
    VERSION: ClassVar[int] = 1

    def body(self) -> bytes:
        out = bytearray(_SPARSE_HEAD.pack(len(self.areas), 0))
        for off, size in self.areas:
            out += _SPARSE_AREA.pack(off, size)
        return bytes(out)


@dataclass(frozen=True, slots=True)
class TypeCap:
    """VFIO_REGION_INFO_CAP_TYPE: a device-specific region's type and subtype."""

    type: int
    subtype: int
    ID: ClassVar[int] = RegionCapId.TYPE
    VERSION: ClassVar[int] = 1

    def body(self) -> bytes:
        return _CAP_TYPE.pack(self.type, self.subtype)


RegionCap = SparseMmapCap | TypeCap


@dataclass(frozen=True, slots=True)
class RegionInfo(Body):
    """GET_REGION_INFO reply. Build it with `fit(argsz)` to honour the client's buffer size.

    argsz protocol: the reply's argsz is the size the full answer needs; when the client's
    argsz is smaller, the reply carries the 32-byte struct only, without caps and without the
    fd, and the client retries with a larger buffer (linux VFIO semantics; libvfio-user does
    the same).
    """

    COMMAND: ClassVar[Command] = Command.DEVICE_GET_REGION_INFO
    IS_REPLY: ClassVar[bool] = True
    FIELDS = (("argsz", "I"), ("flags", "I"), ("index", "I"), ("cap_offset", "I"),
              ("size", "Q"), ("offset", "Q"))
    TAIL_DOC = ("when flags has CAPS and argsz fits: a chain of capabilities from cap_offset, "
            "each `u16 id, u16 version, u32 next` then its body (sparse mmap: `u32 nr_areas, "
            "u32 reserved`, nr_areas x `u64 offset, u64 size`; type: `u32 type, u32 subtype`)")
    FDS_DOC = "0..1 (the region's fd, when mmap-able; never with a truncated reply)"
    index: int
    flags: int
    size: int
    offset: int = 0
    caps: tuple[RegionCap, ...] = ()
    fd: Any = None
    argsz: int = 0
    #: False when the reply was truncated to the client's argsz
    complete: bool = True

    @property
    def fds(self) -> Fds:
        return () if self.fd is None or not self.complete else (self.fd,)

    @property
    def full_size(self) -> int:
        return self.SIZE + sum(8 + len(c.body()) for c in self.caps)

    def fit(self, client_argsz: int) -> RegionInfo:
        full = self.full_size
        complete = client_argsz >= full
        return RegionInfo(
            self.index, self.flags, self.size, self.offset, self.caps, self.fd, full, complete
        )

    def encode(self) -> bytes:
        head = self.HEAD
        argsz = self.argsz or self.full_size
        if not self.complete or not self.caps:
            flags = self.flags & ~_CAPS if not self.caps else self.flags
            return head.pack(argsz, flags, self.index, 0, self.size, self.offset)
        out = bytearray(head.pack(
            argsz, self.flags | _CAPS, self.index, head.size, self.size, self.offset
        ))
        for i, cap in enumerate(self.caps):
            body = cap.body()
            nxt = len(out) + 8 + len(body) if i + 1 < len(self.caps) else 0
            out += _CAP_HEADER.pack(cap.ID, cap.VERSION, nxt) + body
        return bytes(out)

    @classmethod
    def decode(cls, payload: memoryview, fds: Fds) -> Self:
        need(cls, payload, cls.SIZE, fds)
        argsz, flags, index, cap_offset, size, offset = cls.HEAD.unpack_from(payload)
        if len(fds) > 1:
            raise reject(cls, "more than one fd", fds)
        complete = len(payload) >= argsz
        if fds and not complete:
            # `fds` of a truncated reply is empty, so a descriptor here would be lost
            raise reject(cls, "fd with a truncated reply", fds)
        caps = _cap_chain(cls, payload, cap_offset, fds) if flags & _CAPS and complete else ()
        return cls(index, flags, size, offset, caps, fds[0] if fds else None, argsz, complete)


def _cap_chain(
    cls: type[Body], payload: memoryview, pos: int, fds: Fds
) -> tuple[RegionCap, ...]:
    """The capabilities from `pos` on; unknown ids are skipped, as linux VFIO does."""
    caps: list[RegionCap] = []
    seen = 0  # unknown ids count too: a chain of them may loop
    while pos:
        if pos < cls.SIZE or pos + _CAP_HEADER.size > len(payload) or seen > _MAX_CAPS:
            raise reject(cls, "bad cap chain", fds)
        cid, _ver, nxt = _CAP_HEADER.unpack_from(payload, pos)
        body = pos + _CAP_HEADER.size
        if cid == RegionCapId.SPARSE_MMAP:
            need(cls, payload, body + _SPARSE_HEAD.size, fds)
            nr, _reserved = _SPARSE_HEAD.unpack_from(payload, body)
            base = body + _SPARSE_HEAD.size
            if base + nr * _SPARSE_AREA.size > len(payload):
                raise reject(cls, "sparse mmap cap past the end", fds)
            areas = tuple(
                _SPARSE_AREA.unpack_from(payload, base + i * _SPARSE_AREA.size)
                for i in range(nr)
            )
            caps.append(SparseMmapCap(areas))
        elif cid == RegionCapId.TYPE:
            need(cls, payload, body + _CAP_TYPE.size, fds)
            caps.append(TypeCap(*_CAP_TYPE.unpack_from(payload, body)))
        pos, seen = nxt, seen + 1
    return tuple(caps)


# --------------------------------------------------------------------- GET_REGION_IO_FDS (6)


@dataclass(frozen=True, slots=True)
class IoFdSubRegion:
    offset: int
    size: int
    fd_index: int
    type: int
    flags: int
    datamatch: int = 0


@dataclass(frozen=True, slots=True)
class RegionIoFds(Body):
    COMMAND: ClassVar[Command] = Command.DEVICE_GET_REGION_IO_FDS
    IS_REPLY: ClassVar[bool] = True
    FIELDS = (("argsz", "I"), ("flags", "I"), ("index", "I"), ("count", "I"))
    TAIL_DOC = ("count x 40-byte sub-regions: `u64 offset, u64 size, u32 fd_index, u32 type, "
            "u32 flags, u32 padding, u64 datamatch`")
    FDS_DOC = "any number; sub-regions point at them by fd_index"
    index: int
    subregions: tuple[IoFdSubRegion, ...] = ()
    fd_list: tuple[Any, ...] = ()
    argsz: int = 0

    @property
    def fds(self) -> Fds:
        return self.fd_list

    def encode(self) -> bytes:
        argsz = self.argsz or self.SIZE + _IO_FD_SUB.size * len(self.subregions)
        out = bytearray(self.HEAD.pack(argsz, 0, self.index, len(self.subregions)))
        for s in self.subregions:
            out += _IO_FD_SUB.pack(s.offset, s.size, s.fd_index, s.type, s.flags, 0, s.datamatch)
        return bytes(out)

    @classmethod
    def decode(cls, payload: memoryview, fds: Fds) -> Self:
        need(cls, payload, cls.SIZE, fds)
        argsz, _flags, index, count = cls.HEAD.unpack_from(payload)
        if cls.SIZE + count * _IO_FD_SUB.size > len(payload):
            raise reject(cls, "sub-regions past end", fds)
        subs = []
        for i in range(count):
            off, size, idx, typ, flags, _pad, dm = _IO_FD_SUB.unpack_from(
                payload, cls.SIZE + i * _IO_FD_SUB.size
            )
            subs.append(IoFdSubRegion(off, size, idx, typ, flags, dm))
        return cls(index, tuple(subs), tuple(fds), argsz)

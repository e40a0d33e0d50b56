"""Typed request and reply bodies of every vfio-user command, with their wire codecs.

Each body is a frozen dataclass that validates what the wire format itself requires (sizes,
argsz minimums, reserved bits) in `decode`. Semantic checks that need device or session state
(is this region index valid? does this window exist?) belong to the server.

`decode(payload, fds)` takes the payload after the 16-byte header and the descriptors that
came with the frame; `encode()` returns the payload bytes. Descriptors travel in `fds`
attributes and are opaque objects here (the server passes owned fd objects): this module
never opens, closes or duplicates anything.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from ._caps import Capabilities
from ._constants import (
    Command,
    DmaUnmapFlags,
    FeatureFlags,
    RegionCapId,
    RegionFlags,
)
from ._errors import RemoteProtocolError

Fds = tuple[Any, ...]

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_VERSION = struct.Struct("<HH")
_DMA_MAP = struct.Struct("<IIQQQ")
_DMA_UNMAP = struct.Struct("<IIQQ")
_BITMAP = struct.Struct("<QQ")
_INFO4 = struct.Struct("<IIII")
_REGION_INFO = struct.Struct("<IIIIQQ")
_CAP_HEADER = struct.Struct("<HHI")
_SPARSE_HEAD = struct.Struct("<II")
_SPARSE_AREA = struct.Struct("<QQ")
_CAP_TYPE = struct.Struct("<II")
_IO_FD_SUB = struct.Struct("<QQIIIIQ")
_SET_IRQS = struct.Struct("<IIIII")
_REGION_ACCESS = struct.Struct("<QII")
_DMA_ACCESS = struct.Struct("<QQ")
_WRITE_MULTI_ENTRY = struct.Struct("<QII8s")
_FEATURE = struct.Struct("<II")
_MIG_DATA = struct.Struct("<II")

# Plain ints: IntFlag arithmetic costs microseconds per operation on Python 3.11.
_UNMAP_DIRTY_BITMAP = int(DmaUnmapFlags.GET_DIRTY_BITMAP)
_FEATURE_KNOWN = int(FeatureFlags.MASK | FeatureFlags.GET | FeatureFlags.SET | FeatureFlags.PROBE)

REGION_INFO_SIZE = _REGION_INFO.size  # 32
INFO4_SIZE = _INFO4.size  # 16
DMA_MAP_SIZE = _DMA_MAP.size  # 32
DMA_UNMAP_SIZE = _DMA_UNMAP.size  # 24
SET_IRQS_SIZE = _SET_IRQS.size  # 20
REGION_ACCESS_SIZE = _REGION_ACCESS.size  # 16
DMA_ACCESS_SIZE = _DMA_ACCESS.size  # 16
WRITE_MULTI_ENTRY_SIZE = _WRITE_MULTI_ENTRY.size  # 24
#: the spec's limit on coalesced writes per REGION_WRITE_MULTI
WRITE_MULTI_MAX = 128


def _need(payload: memoryview, size: int, what: str) -> None:
    if len(payload) < size:
        raise RemoteProtocolError(f"{what}: payload of {len(payload)} bytes, need {size}")


def _no_fds(fds: Fds, what: str) -> None:
    if fds:
        raise RemoteProtocolError(f"{what} carries no file descriptors, got {len(fds)}", fds=fds)


class Body:
    """Base of every message body."""

    COMMAND: ClassVar[Command]
    IS_REPLY: ClassVar[bool] = False

    @property
    def fds(self) -> Fds:
        return ()

    def encode(self) -> bytes:
        raise NotImplementedError

    @classmethod
    def decode(cls, payload: memoryview, fds: Fds) -> Self:
        raise NotImplementedError


class _Empty(Body):
    """Bodies with no payload (DEVICE_RESET, the replies of DMA_MAP and SET_IRQS, ...)."""

    def encode(self) -> bytes:
        return b""

    @classmethod
    def decode(cls, payload: memoryview, fds: Fds) -> Self:
        _no_fds(fds, cls.__name__)
        # Trailing bytes are tolerated: replies of older peers sometimes echo a struct.
        return cls()

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other)

    def __hash__(self) -> int:
        return hash(type(self))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# --------------------------------------------------------------------------- VERSION (1)


@dataclass(frozen=True, slots=True)
class Version(Body):
    """VERSION request and reply: `u16 major, u16 minor`, then NUL-terminated JSON."""

    COMMAND: ClassVar[Command] = Command.VERSION
    major: int
    minor: int
    capabilities: Capabilities = field(default_factory=Capabilities)
    #: the raw JSON object as sent (unknown keys are kept for logging, never interpreted)
    raw: dict[str, Any] | None = field(default=None, compare=False)

    def encode(self) -> bytes:
        text = json.dumps({"capabilities": self.capabilities.to_json()}, separators=(",", ":"))
        return _VERSION.pack(self.major, self.minor) + text.encode() + b"\0"

    @classmethod
    def decode(cls, payload: memoryview, fds: Fds) -> Self:
        _no_fds(fds, "VERSION")
        _need(payload, _VERSION.size, "VERSION")
        major, minor = _VERSION.unpack_from(payload)
        data = bytes(payload[_VERSION.size :])
        if not data:
            return cls(major, minor, Capabilities(), None)
        end = data.find(b"\0")
        if end < 0:
            raise RemoteProtocolError("VERSION: JSON is not NUL-terminated")
        try:
            obj = json.loads(data[:end].decode("utf-8")) if end else {}
        except (ValueError, RecursionError) as exc:  # also int-digit limit, deep nesting
            raise RemoteProtocolError(f"VERSION: bad JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise RemoteProtocolError("VERSION: JSON is not an object")
        caps = obj.get("capabilities", {})
        if not isinstance(caps, dict):
            raise RemoteProtocolError("VERSION: capabilities is not an object")
        return cls(major, minor, Capabilities.from_json(caps), obj)


@dataclass(frozen=True, slots=True)
class VersionReply(Version):
    COMMAND: ClassVar[Command] = Command.VERSION
    IS_REPLY: ClassVar[bool] = True


# --------------------------------------------------------------------------- DMA_MAP (2)


@dataclass(frozen=True, slots=True)
class DmaMap(Body):
    """DMA_MAP: a window of client memory, with an fd when the server may mmap it."""

    COMMAND: ClassVar[Command] = Command.DMA_MAP
    flags: int
    offset: int
    address: int
    size: int
    fd: Any = None
    argsz: int = DMA_MAP_SIZE

    @property
    def fds(self) -> Fds:
        return () if self.fd is None else (self.fd,)

    def encode(self) -> bytes:
        return _DMA_MAP.pack(self.argsz, self.flags, self.offset, self.address, self.size)

    @classmethod
    def decode(cls, payload: memoryview, fds: Fds) -> Self:
        _need(payload, DMA_MAP_SIZE, "DMA_MAP")
        argsz, flags, offset, address, size = _DMA_MAP.unpack_from(payload)
        if argsz < DMA_MAP_SIZE:
            raise RemoteProtocolError(f"DMA_MAP: argsz {argsz} < {DMA_MAP_SIZE}", fds=fds)
        if len(fds) > 1:
            raise RemoteProtocolError(f"DMA_MAP: {len(fds)} fds, at most 1", fds=fds)
        return cls(flags, offset, address, size, fds[0] if fds else None, argsz)


class DmaMapReply(_Empty):
    COMMAND: ClassVar[Command] = Command.DMA_MAP
    IS_REPLY: ClassVar[bool] = True


# --------------------------------------------------------------------------- DMA_UNMAP (3)


@dataclass(frozen=True, slots=True)
class DmaBitmap:
    """`struct vfio_user_bitmap` header used by the legacy dirty-bitmap unmap."""

    pgsize: int
    size: int
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class DmaUnmap(Body):
    """DMA_UNMAP: exact-match window removal, or every window with flag ALL."""

    COMMAND: ClassVar[Command] = Command.DMA_UNMAP
    flags: int
    address: int
    size: int
    argsz: int = DMA_UNMAP_SIZE
    bitmap: DmaBitmap | None = None

    def encode(self) -> bytes:
        out = _DMA_UNMAP.pack(self.argsz, self.flags, self.address, self.size)
        if self.bitmap is not None:
            out += _BITMAP.pack(self.bitmap.pgsize, self.bitmap.size) + self.bitmap.data
        return out

    @classmethod
    def decode(cls, payload: memoryview, fds: Fds) -> Self:
        _no_fds(fds, "DMA_UNMAP")
        _need(payload, DMA_UNMAP_SIZE, "DMA_UNMAP")
        argsz, flags, address, size = _DMA_UNMAP.unpack_from(payload)
        if argsz < DMA_UNMAP_SIZE:
            raise RemoteProtocolError(f"DMA_UNMAP: argsz {argsz} < {DMA_UNMAP_SIZE}")
        bitmap = None
        if flags & _UNMAP_DIRTY_BITMAP:
            _need(payload, DMA_UNMAP_SIZE + _BITMAP.size, "DMA_UNMAP with bitmap")
            pgsize, bsize = _BITMAP.unpack_from(payload, DMA_UNMAP_SIZE)
            data = bytes(payload[DMA_UNMAP_SIZE + _BITMAP.size :])
            bitmap = DmaBitmap(pgsize, bsize, data)
        return cls(flags, address, size, argsz, bitmap)


@dataclass(frozen=True, slots=True)
class DmaUnmapReply(DmaUnmap):
    """The reply echoes the request's entry (spec: "responds with the original DMA entry")."""

    COMMAND: ClassVar[Command] = Command.DMA_UNMAP
    IS_REPLY: ClassVar[bool] = True


# --------------------------------------------------------------------------- DEVICE_GET_INFO (4)


@dataclass(frozen=True, slots=True)
class DeviceGetInfo(Body):
    COMMAND: ClassVar[Command] = Command.DEVICE_GET_INFO
    argsz: int = INFO4_SIZE

    def encode(self) -> bytes:
        return _INFO4.pack(self.argsz, 0, 0, 0)

    @classmethod
    def decode(cls, payload: memoryview, fds: Fds) -> Self:
        _no_fds(fds, "DEVICE_GET_INFO")
        _need(payload, INFO4_SIZE, "DEVICE_GET_INFO")
        argsz = _INFO4.unpack_from(payload)[0]
        if argsz < INFO4_SIZE:
            raise RemoteProtocolError(f"DEVICE_GET_INFO: argsz {argsz} < {INFO4_SIZE}")
        return cls(argsz)


@dataclass(frozen=True, slots=True)
class DeviceInfo(Body):
    COMMAND: ClassVar[Command] = Command.DEVICE_GET_INFO
    IS_REPLY: ClassVar[bool] = True
    flags: int
    num_regions: int
    num_irqs: int
    argsz: int = INFO4_SIZE

    def encode(self) -> bytes:
        return _INFO4.pack(self.argsz, self.flags, self.num_regions, self.num_irqs)

    @classmethod
    def decode(cls, payload: memoryview, fds: Fds) -> Self:
        _no_fds(fds, "DEVICE_GET_INFO reply")
        _need(payload, INFO4_SIZE, "DEVICE_GET_INFO reply")
        argsz, flags, nreg, nirq = _INFO4.unpack_from(payload)
        return cls(flags, nreg, nirq, argsz)


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
class DeviceGetRegionInfo(Body):
    COMMAND: ClassVar[Command] = Command.DEVICE_GET_REGION_INFO
    index: int
    argsz: int = REGION_INFO_SIZE

    def encode(self) -> bytes:
        return _REGION_INFO.pack(self.argsz, 0, self.index, 0, 0, 0)

    @classmethod
    def decode(cls, payload: memoryview, fds: Fds) -> Self:
        _no_fds(fds, "DEVICE_GET_REGION_INFO")
        _need(payload, REGION_INFO_SIZE, "DEVICE_GET_REGION_INFO")
        argsz, _flags, index, _cap, _size, _off = _REGION_INFO.unpack_from(payload)
        if argsz < REGION_INFO_SIZE:
            raise RemoteProtocolError(f"DEVICE_GET_REGION_INFO: argsz {argsz} < {REGION_INFO_SIZE}")
        return cls(index, argsz)


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
        return REGION_INFO_SIZE + sum(8 + len(c.body()) for c in self.caps)

    def fit(self, client_argsz: int) -> RegionInfo:
        full = self.full_size
        complete = client_argsz >= full
        return RegionInfo(
            self.index, self.flags, self.size, self.offset, self.caps, self.fd, full, complete
        )

    def encode(self) -> bytes:
        full = self.full_size
        argsz = self.argsz or full
        if not self.complete or not self.caps:
            flags = self.flags & ~int(RegionFlags.CAPS) if not self.caps else self.flags
            return _REGION_INFO.pack(argsz, flags, self.index, 0, self.size, self.offset)
        out = bytearray()
        pos = REGION_INFO_SIZE
        for i, cap in enumerate(self.caps):
            body = cap.body()
            nxt = pos + 8 + len(body) if i + 1 < len(self.caps) else 0
            out += _CAP_HEADER.pack(cap.ID, cap.VERSION, nxt) + body
            pos += 8 + len(body)
        head = _REGION_INFO.pack(
            argsz,
            self.flags | RegionFlags.CAPS,
            self.index,
            REGION_INFO_SIZE,
            self.size,
            self.offset,
        )
        return head + bytes(out)

    @classmethod
    def decode(cls, payload: memoryview, fds: Fds) -> Self:
        _need(payload, REGION_INFO_SIZE, "DEVICE_GET_REGION_INFO reply")
        argsz, flags, index, cap_offset, size, offset = _REGION_INFO.unpack_from(payload)
        if len(fds) > 1:
            raise RemoteProtocolError("GET_REGION_INFO reply: more than one fd", fds=fds)
        caps: list[RegionCap] = []
        complete = len(payload) >= argsz
        if fds and not complete:
            # `fds` of a truncated reply is empty, so a descriptor here would be lost
            raise RemoteProtocolError("GET_REGION_INFO reply: fd with a truncated reply", fds=fds)
        if flags & RegionFlags.CAPS and complete:
            pos, seen = cap_offset, 0
            while pos:
                if pos < REGION_INFO_SIZE or pos + 8 > len(payload) or seen > 64:
                    raise RemoteProtocolError("GET_REGION_INFO reply: bad cap chain", fds=fds)
                cid, _ver, nxt = _CAP_HEADER.unpack_from(payload, pos)
                if cid == RegionCapId.SPARSE_MMAP:
                    nr, _pad = _SPARSE_HEAD.unpack_from(payload, pos + 8)
                    base = pos + 8 + _SPARSE_HEAD.size
                    if base + nr * _SPARSE_AREA.size > len(payload):
                        raise RemoteProtocolError("sparse mmap cap past the end", fds=fds)
                    areas = tuple(
                        _SPARSE_AREA.unpack_from(payload, base + i * _SPARSE_AREA.size)
                        for i in range(nr)
                    )
                    caps.append(SparseMmapCap(areas))
                elif cid == RegionCapId.TYPE:
                    caps.append(TypeCap(*_CAP_TYPE.unpack_from(payload, pos + 8)))
                pos, seen = nxt, seen + 1
        return cls(
            index, flags, size, offset, tuple(caps), fds[0] if fds else None, argsz, complete
        )


# --------------------------------------------------------------------- GET_REGION_IO_FDS (6)


@dataclass(frozen=True, slots=True)
class DeviceGetRegionIoFds(Body):
    COMMAND: ClassVar[Command] = Command.DEVICE_GET_REGION_IO_FDS
    index: int
    argsz: int = INFO4_SIZE

    def encode(self) -> bytes:
        return _INFO4.pack(self.argsz, 0, self.index, 0)

    @classmethod
    def decode(cls, payload: memoryview, fds: Fds) -> Self:
        _no_fds(fds, "DEVICE_GET_REGION_IO_FDS")
        _need(payload, INFO4_SIZE, "DEVICE_GET_REGION_IO_FDS")
        argsz, flags, index, _count = _INFO4.unpack_from(payload)
        if argsz < INFO4_SIZE:
            raise RemoteProtocolError(f"DEVICE_GET_REGION_IO_FDS: argsz {argsz} < 16")
        if flags:
            raise RemoteProtocolError(f"DEVICE_GET_REGION_IO_FDS: flags {flags:#x} must be 0")
        return cls(index, argsz)


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
    index: int
    subregions: tuple[IoFdSubRegion, ...] = ()
    fd_list: tuple[Any, ...] = ()
    argsz: int = 0

    @property
    def fds(self) -> Fds:
        return self.fd_list

    def encode(self) -> bytes:
        argsz = self.argsz or INFO4_SIZE + _IO_FD_SUB.size * len(self.subregions)
        out = bytearray(_INFO4.pack(argsz, 0, self.index, len(self.subregions)))
        for s in self.subregions:
            out += _IO_FD_SUB.pack(s.offset, s.size, s.fd_index, s.type, s.flags, 0, s.datamatch)
        return bytes(out)

    @classmethod
    def decode(cls, payload: memoryview, fds: Fds) -> Self:
        _need(payload, INFO4_SIZE, "DEVICE_GET_REGION_IO_FDS reply")
        argsz, _flags, index, count = _INFO4.unpack_from(payload)
        if INFO4_SIZE + count * _IO_FD_SUB.size > len(payload):
            raise RemoteProtocolError("GET_REGION_IO_FDS reply: sub-regions past end", fds=fds)
        subs = []
        for i in range(count):
            off, size, idx, typ, flags, _pad, dm = _IO_FD_SUB.unpack_from(
                payload, INFO4_SIZE + i * _IO_FD_SUB.size
            )
            subs.append(IoFdSubRegion(off, size, idx, typ, flags, dm))
        return cls(index, tuple(subs), tuple(fds), argsz)


# ------------------------------------------------------------------------ GET_IRQ_INFO (7)


@dataclass(frozen=True, slots=True)
class DeviceGetIrqInfo(Body):
    COMMAND: ClassVar[Command] = Command.DEVICE_GET_IRQ_INFO
    index: int
    argsz: int = INFO4_SIZE

    def encode(self) -> bytes:
        return _INFO4.pack(self.argsz, 0, self.index, 0)

    @classmethod
    def decode(cls, payload: memoryview, fds: Fds) -> Self:
        _no_fds(fds, "DEVICE_GET_IRQ_INFO")
        _need(payload, INFO4_SIZE, "DEVICE_GET_IRQ_INFO")
        argsz, _flags, index, _count = _INFO4.unpack_from(payload)
        if argsz < INFO4_SIZE:
            raise RemoteProtocolError(f"DEVICE_GET_IRQ_INFO: argsz {argsz} < 16")
        return cls(index, argsz)


@dataclass(frozen=True, slots=True)
class IrqInfo(Body):
    COMMAND: ClassVar[Command] = Command.DEVICE_GET_IRQ_INFO
    IS_REPLY: ClassVar[bool] = True
    index: int
    flags: int
    count: int
    argsz: int = INFO4_SIZE

    def encode(self) -> bytes:
        return _INFO4.pack(self.argsz, self.flags, self.index, self.count)

    @classmethod
    def decode(cls, payload: memoryview, fds: Fds) -> Self:
        _no_fds(fds, "DEVICE_GET_IRQ_INFO reply")
        _need(payload, INFO4_SIZE, "DEVICE_GET_IRQ_INFO reply")
        argsz, flags, index, count = _INFO4.unpack_from(payload)
        return cls(index, flags, count, argsz)


# ------------------------------------------------------------------------- SET_IRQS (8)


@dataclass(frozen=True, slots=True)
class DeviceSetIrqs(Body):
    """SET_IRQS: argsz is the request's own size (header struct + bool data)."""

    COMMAND: ClassVar[Command] = Command.DEVICE_SET_IRQS
    flags: int
    index: int
    start: int
    count: int
    data: bytes = b""
    fd_list: tuple[Any, ...] = ()
    argsz: int = 0

    @property
    def fds(self) -> Fds:
        return self.fd_list

    def encode(self) -> bytes:
        argsz = self.argsz or SET_IRQS_SIZE + len(self.data)
        return _SET_IRQS.pack(argsz, self.flags, self.index, self.start, self.count) + self.data

    @classmethod
    def decode(cls, payload: memoryview, fds: Fds) -> Self:
        if len(payload) < SET_IRQS_SIZE:
            raise RemoteProtocolError(
                f"DEVICE_SET_IRQS: payload of {len(payload)} bytes, need 20", fds=fds
            )
        argsz, flags, index, start, count = _SET_IRQS.unpack_from(payload)
        if argsz < SET_IRQS_SIZE or argsz > len(payload):
            raise RemoteProtocolError(
                f"DEVICE_SET_IRQS: argsz {argsz} outside [20, {len(payload)}]", fds=fds
            )
        data = bytes(payload[SET_IRQS_SIZE:argsz])
        return cls(flags, index, start, count, data, tuple(fds), argsz)


class DeviceSetIrqsReply(_Empty):
    COMMAND: ClassVar[Command] = Command.DEVICE_SET_IRQS
    IS_REPLY: ClassVar[bool] = True


# ------------------------------------------------------------- REGION_READ / WRITE (9, 10)


@dataclass(frozen=True, slots=True)
class RegionRead(Body):
    COMMAND: ClassVar[Command] = Command.REGION_READ
    offset: int
    region: int
    count: int

    def encode(self) -> bytes:
        return _REGION_ACCESS.pack(self.offset, self.region, self.count)

    @classmethod
    def decode(cls, payload: memoryview, fds: Fds) -> Self:
        _no_fds(fds, "REGION_READ")
        _need(payload, REGION_ACCESS_SIZE, "REGION_READ")
        if len(payload) != REGION_ACCESS_SIZE:
            raise RemoteProtocolError(f"REGION_READ: payload of {len(payload)} bytes, not 16")
        return cls(*_REGION_ACCESS.unpack_from(payload))


@dataclass(frozen=True, slots=True)
class RegionReadReply(Body):
    COMMAND: ClassVar[Command] = Command.REGION_READ
    IS_REPLY: ClassVar[bool] = True
    offset: int
    region: int
    data: bytes

    def encode(self) -> bytes:
        return _REGION_ACCESS.pack(self.offset, self.region, len(self.data)) + self.data

    @classmethod
    def decode(cls, payload: memoryview, fds: Fds) -> Self:
        _no_fds(fds, "REGION_READ reply")
        _need(payload, REGION_ACCESS_SIZE, "REGION_READ reply")
        offset, region, count = _REGION_ACCESS.unpack_from(payload)
        if count != len(payload) - REGION_ACCESS_SIZE:
            raise RemoteProtocolError(f"REGION_READ reply: count {count} != data length")
        return cls(offset, region, bytes(payload[REGION_ACCESS_SIZE:]))


@dataclass(frozen=True, slots=True)
class RegionWrite(Body):
    COMMAND: ClassVar[Command] = Command.REGION_WRITE
    offset: int
    region: int
    data: bytes

    def encode(self) -> bytes:
        return _REGION_ACCESS.pack(self.offset, self.region, len(self.data)) + self.data

    @classmethod
    def decode(cls, payload: memoryview, fds: Fds) -> Self:
        _no_fds(fds, "REGION_WRITE")
        _need(payload, REGION_ACCESS_SIZE, "REGION_WRITE")
        offset, region, count = _REGION_ACCESS.unpack_from(payload)
        if count != len(payload) - REGION_ACCESS_SIZE:
            raise RemoteProtocolError(
                f"REGION_WRITE: count {count} but {len(payload) - REGION_ACCESS_SIZE} data bytes"
            )
        return cls(offset, region, bytes(payload[REGION_ACCESS_SIZE:]))


@dataclass(frozen=True, slots=True)
class RegionWriteReply(Body):
    COMMAND: ClassVar[Command] = Command.REGION_WRITE
    IS_REPLY: ClassVar[bool] = True
    offset: int
    region: int
    count: int

    def encode(self) -> bytes:
        return _REGION_ACCESS.pack(self.offset, self.region, self.count)

    @classmethod
    def decode(cls, payload: memoryview, fds: Fds) -> Self:
        _no_fds(fds, "REGION_WRITE reply")
        _need(payload, REGION_ACCESS_SIZE, "REGION_WRITE reply")
        return cls(*_REGION_ACCESS.unpack_from(payload))


# --------------------------------------------------------------- DMA_READ / WRITE (11, 12)


@dataclass(frozen=True, slots=True)
class DmaRead(Body):
    COMMAND: ClassVar[Command] = Command.DMA_READ
    address: int
    count: int

    def encode(self) -> bytes:
        return _DMA_ACCESS.pack(self.address, self.count)

    @classmethod
    def decode(cls, payload: memoryview, fds: Fds) -> Self:
        _no_fds(fds, "DMA_READ")
        _need(payload, DMA_ACCESS_SIZE, "DMA_READ")
        return cls(*_DMA_ACCESS.unpack_from(payload))


@dataclass(frozen=True, slots=True)
class DmaReadReply(Body):
    COMMAND: ClassVar[Command] = Command.DMA_READ
    IS_REPLY: ClassVar[bool] = True
    address: int
    data: bytes

    def encode(self) -> bytes:
        return _DMA_ACCESS.pack(self.address, len(self.data)) + self.data

    @classmethod
    def decode(cls, payload: memoryview, fds: Fds) -> Self:
        _no_fds(fds, "DMA_READ reply")
        _need(payload, DMA_ACCESS_SIZE, "DMA_READ reply")
        address, count = _DMA_ACCESS.unpack_from(payload)
        if count != len(payload) - DMA_ACCESS_SIZE:
            raise RemoteProtocolError(f"DMA_READ reply: count {count} != data length")
        return cls(address, bytes(payload[DMA_ACCESS_SIZE:]))


@dataclass(frozen=True, slots=True)
class DmaWrite(Body):
    COMMAND: ClassVar[Command] = Command.DMA_WRITE
    address: int
    data: bytes

    def encode(self) -> bytes:
        return _DMA_ACCESS.pack(self.address, len(self.data)) + self.data

    @classmethod
    def decode(cls, payload: memoryview, fds: Fds) -> Self:
        _no_fds(fds, "DMA_WRITE")
        _need(payload, DMA_ACCESS_SIZE, "DMA_WRITE")
        address, count = _DMA_ACCESS.unpack_from(payload)
        if count != len(payload) - DMA_ACCESS_SIZE:
            raise RemoteProtocolError(f"DMA_WRITE: count {count} != data length")
        return cls(address, bytes(payload[DMA_ACCESS_SIZE:]))


@dataclass(frozen=True, slots=True)
class DmaWriteReply(Body):
    """DMA_WRITE reply. QEMU sends the header only; the spec shows address+count."""

    COMMAND: ClassVar[Command] = Command.DMA_WRITE
    IS_REPLY: ClassVar[bool] = True
    address: int = 0
    count: int = 0

    def encode(self) -> bytes:
        return _DMA_ACCESS.pack(self.address, self.count)

    @classmethod
    def decode(cls, payload: memoryview, fds: Fds) -> Self:
        _no_fds(fds, "DMA_WRITE reply")
        if len(payload) >= DMA_ACCESS_SIZE:
            return cls(*_DMA_ACCESS.unpack_from(payload))
        return cls()


# ------------------------------------------------------------------------ DEVICE_RESET (13)


class DeviceReset(_Empty):
    COMMAND: ClassVar[Command] = Command.DEVICE_RESET


class DeviceResetReply(_Empty):
    COMMAND: ClassVar[Command] = Command.DEVICE_RESET
    IS_REPLY: ClassVar[bool] = True


# ------------------------------------------------------------------ REGION_WRITE_MULTI (15)


@dataclass(frozen=True, slots=True)
class WriteEntry:
    offset: int
    region: int
    data: bytes


@dataclass(frozen=True, slots=True)
class RegionWriteMulti(Body):
    """Coalesced posted writes of at most 8 bytes each."""

    COMMAND: ClassVar[Command] = Command.REGION_WRITE_MULTI
    writes: tuple[WriteEntry, ...]

    def encode(self) -> bytes:
        out = bytearray(_U64.pack(len(self.writes)))
        for w in self.writes:
            out += _WRITE_MULTI_ENTRY.pack(w.offset, w.region, len(w.data), w.data.ljust(8, b"\0"))
        return bytes(out)

    @classmethod
    def decode(cls, payload: memoryview, fds: Fds) -> Self:
        _no_fds(fds, "REGION_WRITE_MULTI")
        _need(payload, 8, "REGION_WRITE_MULTI")
        (n,) = _U64.unpack_from(payload)
        if n == 0 or n > WRITE_MULTI_MAX:
            raise RemoteProtocolError(f"REGION_WRITE_MULTI: wr_cnt {n} not in 1..128")
        if len(payload) != 8 + n * WRITE_MULTI_ENTRY_SIZE:
            raise RemoteProtocolError("REGION_WRITE_MULTI: size does not match wr_cnt")
        writes = []
        for i in range(n):
            off, region, count, data = _WRITE_MULTI_ENTRY.unpack_from(
                payload, 8 + i * WRITE_MULTI_ENTRY_SIZE
            )
            if not 0 < count <= 8:
                raise RemoteProtocolError(f"REGION_WRITE_MULTI: entry {i} count {count}")
            writes.append(WriteEntry(off, region, data[:count]))
        return cls(tuple(writes))


@dataclass(frozen=True, slots=True)
class RegionWriteMultiReply(Body):
    COMMAND: ClassVar[Command] = Command.REGION_WRITE_MULTI
    IS_REPLY: ClassVar[bool] = True
    count: int

    def encode(self) -> bytes:
        return _U64.pack(self.count)

    @classmethod
    def decode(cls, payload: memoryview, fds: Fds) -> Self:
        _no_fds(fds, "REGION_WRITE_MULTI reply")
        _need(payload, 8, "REGION_WRITE_MULTI reply")
        return cls(_U64.unpack_from(payload)[0])


# ---------------------------------------------------------------------- DEVICE_FEATURE (16)


@dataclass(frozen=True, slots=True)
class DeviceFeature(Body):
    """DEVICE_FEATURE request and reply: `argsz, flags (feature | GET/SET/PROBE), data`."""

    COMMAND: ClassVar[Command] = Command.DEVICE_FEATURE
    flags: int
    data: bytes = b""
    argsz: int = 0

    @property
    def feature(self) -> int:
        return self.flags & FeatureFlags.MASK

    def encode(self) -> bytes:
        argsz = self.argsz or _FEATURE.size + len(self.data)
        return _FEATURE.pack(argsz, self.flags) + self.data

    @classmethod
    def decode(cls, payload: memoryview, fds: Fds) -> Self:
        _no_fds(fds, "DEVICE_FEATURE")
        _need(payload, _FEATURE.size, "DEVICE_FEATURE")
        argsz, flags = _FEATURE.unpack_from(payload)
        if argsz < _FEATURE.size:
            raise RemoteProtocolError(f"DEVICE_FEATURE: argsz {argsz} < 8")
        known = _FEATURE_KNOWN
        if flags & ~int(known):
            raise RemoteProtocolError(f"DEVICE_FEATURE: unknown flags {flags:#x}")
        return cls(flags, bytes(payload[_FEATURE.size :]), argsz)


@dataclass(frozen=True, slots=True)
class DeviceFeatureReply(DeviceFeature):
    COMMAND: ClassVar[Command] = Command.DEVICE_FEATURE
    IS_REPLY: ClassVar[bool] = True


# ------------------------------------------------------------ MIG_DATA_READ / WRITE (17, 18)


@dataclass(frozen=True, slots=True)
class MigDataRead(Body):
    COMMAND: ClassVar[Command] = Command.MIG_DATA_READ
    size: int
    argsz: int = 0

    def encode(self) -> bytes:
        return _MIG_DATA.pack(self.argsz or _MIG_DATA.size + self.size, self.size)

    @classmethod
    def decode(cls, payload: memoryview, fds: Fds) -> Self:
        _no_fds(fds, "MIG_DATA_READ")
        _need(payload, _MIG_DATA.size, "MIG_DATA_READ")
        argsz, size = _MIG_DATA.unpack_from(payload)
        if argsz < _MIG_DATA.size:
            raise RemoteProtocolError(f"MIG_DATA_READ: argsz {argsz} < 8")
        return cls(size, argsz)


@dataclass(frozen=True, slots=True)
class MigDataReadReply(Body):
    COMMAND: ClassVar[Command] = Command.MIG_DATA_READ
    IS_REPLY: ClassVar[bool] = True
    data: bytes

    def encode(self) -> bytes:
        return _MIG_DATA.pack(_MIG_DATA.size + len(self.data), len(self.data)) + self.data

    @classmethod
    def decode(cls, payload: memoryview, fds: Fds) -> Self:
        _no_fds(fds, "MIG_DATA_READ reply")
        _need(payload, _MIG_DATA.size, "MIG_DATA_READ reply")
        _argsz, size = _MIG_DATA.unpack_from(payload)
        if size != len(payload) - _MIG_DATA.size:
            raise RemoteProtocolError("MIG_DATA_READ reply: size != data length")
        return cls(bytes(payload[_MIG_DATA.size :]))


@dataclass(frozen=True, slots=True)
class MigDataWrite(Body):
    COMMAND: ClassVar[Command] = Command.MIG_DATA_WRITE
    data: bytes
    argsz: int = 0

    def encode(self) -> bytes:
        argsz = self.argsz or _MIG_DATA.size + len(self.data)  # libvfio-user requires this
        return _MIG_DATA.pack(argsz, len(self.data)) + self.data

    @classmethod
    def decode(cls, payload: memoryview, fds: Fds) -> Self:
        _no_fds(fds, "MIG_DATA_WRITE")
        _need(payload, _MIG_DATA.size, "MIG_DATA_WRITE")
        argsz, size = _MIG_DATA.unpack_from(payload)
        if argsz < _MIG_DATA.size:
            raise RemoteProtocolError(f"MIG_DATA_WRITE: argsz {argsz} < 8")
        if size != len(payload) - _MIG_DATA.size:
            raise RemoteProtocolError("MIG_DATA_WRITE: size != data length")
        return cls(bytes(payload[_MIG_DATA.size :]), argsz)


class MigDataWriteReply(_Empty):
    COMMAND: ClassVar[Command] = Command.MIG_DATA_WRITE
    IS_REPLY: ClassVar[bool] = True


# --------------------------------------------------------------------------- registries

REQUESTS: dict[int, type[Body]] = {
    c.COMMAND: c
    for c in (
        Version,
        DmaMap,
        DmaUnmap,
        DeviceGetInfo,
        DeviceGetRegionInfo,
        DeviceGetRegionIoFds,
        DeviceGetIrqInfo,
        DeviceSetIrqs,
        RegionRead,
        RegionWrite,
        DmaRead,
        DmaWrite,
        DeviceReset,
        RegionWriteMulti,
        DeviceFeature,
        MigDataRead,
        MigDataWrite,
    )
}

REPLIES: dict[int, type[Body]] = {
    c.COMMAND: c
    for c in (
        VersionReply,
        DmaMapReply,
        DmaUnmapReply,
        DeviceInfo,
        RegionInfo,
        RegionIoFds,
        IrqInfo,
        DeviceSetIrqsReply,
        RegionReadReply,
        RegionWriteReply,
        DmaReadReply,
        DmaWriteReply,
        DeviceResetReply,
        RegionWriteMultiReply,
        DeviceFeatureReply,
        MigDataReadReply,
        MigDataWriteReply,
    )
}


def decode_body(command: int, is_reply: bool, payload: memoryview, fds: Sequence[Any]) -> Body:
    """Decode a payload by command number; unknown commands raise ENOTSUP."""
    import errno

    table = REPLIES if is_reply else REQUESTS
    cls = table.get(command)
    if cls is None:
        raise RemoteProtocolError(f"unknown command {command}", errno=errno.ENOTSUP, fds=fds)
    try:
        return cls.decode(payload, tuple(fds))
    except RemoteProtocolError as exc:
        if not exc.fds and fds:
            exc.fds = list(fds)
        raise
    except struct.error as exc:  # pragma: no cover - _need guards every unpack
        raise RemoteProtocolError(f"{cls.__name__}: {exc}", fds=fds) from None

"""Bodies whose layout depends on their contents, written by hand (regions are in `_region`).

VERSION carries JSON, DMA_UNMAP an optional dirty bitmap, SET_IRQS bool data bounded by its
argsz plus any number of eventfds, REGION_WRITE_MULTI an array of entries. Each still
declares its fixed head as `FIELDS`, so its struct and its row in docs/protocol.md come
from one place.
"""

from __future__ import annotations

import functools
import json
import struct
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from ._body import Body, Fds, need, no_fds, reject
from ._caps import Capabilities, remember_by_id
from ._constants import Command, DmaUnmapFlags

_BITMAP = struct.Struct("<QQ")  # struct vfio_user_bitmap: pgsize, size (then the bits)
_WRITE_MULTI_ENTRY = struct.Struct("<QII8s")  # offset, region, count, data (padded to 8)
WRITE_MULTI_ENTRY_SIZE = _WRITE_MULTI_ENTRY.size  # 24
#: the spec's limit on coalesced writes per REGION_WRITE_MULTI
WRITE_MULTI_MAX = 128
# Plain int: IntFlag arithmetic costs microseconds per operation on Python 3.11.
_UNMAP_DIRTY_BITMAP = int(DmaUnmapFlags.GET_DIRTY_BITMAP)

# --------------------------------------------------------------------------- VERSION (1)


def _caps_json(caps: Capabilities) -> bytes:
    """VERSION's NUL-terminated JSON for `caps`. A server answers every connection with
    the same few capability sets (the very objects `negotiate` keeps), so they are looked
    up by identity first (`remember_by_id`): hashing the frozen dataclass was a Python
    call per connect."""
    hit = _CAPS_JSON_BY_ID.get(id(caps))
    if hit is not None and hit[0] is caps:
        return hit[1]
    return remember_by_id(_CAPS_JSON_BY_ID, id(caps), caps, _caps_json_equal(caps))


_CAPS_JSON_BY_ID: dict[int, tuple[Capabilities, bytes]] = {}


@functools.lru_cache(maxsize=16)
def _caps_json_equal(caps: Capabilities) -> bytes:
    """`_caps_json` for equal capability sets that are other objects; encoding the JSON each
    time was a tenth of a connect."""
    text = json.dumps({"capabilities": caps.to_json()}, separators=(",", ":"))
    return text.encode() + b"\0"


class _BadVersionJson(Exception):
    """Why VERSION's JSON was refused (`Version.decode` raises it as the body's error)."""


@functools.lru_cache(maxsize=16)
def _version_json(text: bytes) -> tuple[Capabilities, dict[str, Any]]:
    """The capabilities in VERSION's JSON `text` (NUL excluded), and the object itself.

    A client sends the same JSON on every connection (QEMU's is fixed per build), and
    parsing it into capabilities was 7 µs of a connect: the result is immutable
    (`Capabilities` is frozen; `decode` hands each body its own copy of the object), so
    it is kept for the last few texts. A refused text raises and is not kept; the cache
    holds at most 16 texts of at most `limits.max_version_size` bytes each."""
    try:
        obj = json.loads(text.decode("utf-8")) if text else {}
    except (ValueError, RecursionError) as exc:  # also int-digit limit, deep nesting
        raise _BadVersionJson(f"bad JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise _BadVersionJson("JSON is not an object")
    caps = obj.get("capabilities", {})
    if not isinstance(caps, dict):
        raise _BadVersionJson("capabilities is not an object")
    return Capabilities.from_json(caps), obj


@dataclass(frozen=True, slots=True)
class Version(Body):
    """VERSION request and reply: `u16 major, u16 minor`, then NUL-terminated JSON."""

    COMMAND: ClassVar[Command] = Command.VERSION
    FIELDS = (("major", "H"), ("minor", "H"))
    TAIL_DOC = ("optional NUL-terminated JSON `{\"capabilities\": {...}}`; unknown keys are kept "
            "in `raw`, never interpreted")
    major: int
    minor: int
    capabilities: Capabilities = field(default_factory=Capabilities)
    #: the raw JSON object as sent (unknown keys are kept for logging, never interpreted)
    raw: dict[str, Any] | None = field(default=None, compare=False)

    def encode(self) -> bytes:
        return self.HEAD.pack(self.major, self.minor) + _caps_json(self.capabilities)

    @classmethod
    def decode(cls, payload: memoryview, fds: Fds) -> Self:
        no_fds(cls, fds)
        need(cls, payload, cls.SIZE, fds)
        major, minor = cls.HEAD.unpack_from(payload)
        data = bytes(payload[cls.SIZE :])
        if not data:
            return cls(major, minor, Capabilities(), None)
        end = data.find(b"\0")
        if end < 0:
            raise reject(cls, "JSON is not NUL-terminated", fds)
        try:
            caps, obj = _version_json(data[:end])
        except _BadVersionJson as exc:
            raise reject(cls, str(exc), fds) from None
        return cls(major, minor, caps, dict(obj))


@dataclass(frozen=True, slots=True)
class VersionReply(Version):
    COMMAND: ClassVar[Command] = Command.VERSION
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
    FIELDS = (("argsz", "I"), ("flags", "I"), ("address", "Q"), ("size", "Q"))
    TAIL_DOC = ("with flag GET_DIRTY_BITMAP: `u64 pgsize, u64 size` (struct vfio_user_bitmap), "
            "then the bitmap (in the reply)")
    flags: int
    address: int
    size: int
    argsz: int = 24
    bitmap: DmaBitmap | None = None

    def encode(self) -> bytes:
        out = _DMA_UNMAP.pack(self.argsz, self.flags, self.address, self.size)
        if self.bitmap is not None:
            out += _BITMAP.pack(self.bitmap.pgsize, self.bitmap.size) + self.bitmap.data
        return out

    @classmethod
    def decode(cls, payload: memoryview, fds: Fds) -> Self:
        return cls(*cls.fields(payload, fds))

    @classmethod
    def fields(
        cls, payload: memoryview, fds: Fds
    ) -> tuple[int, int, int, int, DmaBitmap | None]:
        """(flags, address, size, argsz, bitmap): what `decode` builds the body from, for
        a caller that needs only the values (`FixedBody.fields` says why)."""
        if fds:
            no_fds(cls, fds)
        size = DMA_UNMAP_SIZE
        if len(payload) < size:
            need(cls, payload, size, fds)
        argsz, flags, address, length = _DMA_UNMAP.unpack_from(payload)
        if argsz < size:
            raise reject(cls, f"argsz {argsz} < {size}", fds)
        bitmap = None
        if flags & _UNMAP_DIRTY_BITMAP:
            need(cls, payload, size + _BITMAP.size, fds)
            pgsize, bsize = _BITMAP.unpack_from(payload, size)
            bitmap = DmaBitmap(pgsize, bsize, bytes(payload[size + _BITMAP.size :]))
        return flags, address, length, argsz, bitmap


@dataclass(frozen=True, slots=True)
class DmaUnmapReply(DmaUnmap):
    """The reply echoes the request's entry (spec: "responds with the original DMA entry")."""

    COMMAND: ClassVar[Command] = Command.DMA_UNMAP
    IS_REPLY: ClassVar[bool] = True


# ------------------------------------------------------------------------- SET_IRQS (8)


@dataclass(frozen=True, slots=True)
class DeviceSetIrqs(Body):
    """SET_IRQS: argsz is the request's own size (header struct + bool data)."""

    COMMAND: ClassVar[Command] = Command.DEVICE_SET_IRQS
    FIELDS = (("argsz", "I"), ("flags", "I"), ("index", "I"), ("start", "I"), ("count", "I"))
    TAIL_DOC = "with DATA_BOOL: one byte per vector, up to argsz (bytes past argsz are ignored)"
    FDS_DOC = "any number (with DATA_EVENTFD: one eventfd per vector)"
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
        size = SET_IRQS_SIZE
        need(cls, payload, size, fds)
        argsz, flags, index, start, count = _SET_IRQS.unpack_from(payload)
        if argsz < size or argsz > len(payload):
            raise reject(cls, f"argsz {argsz} outside [{size}, {len(payload)}]", fds)
        return cls(flags, index, start, count, bytes(payload[size:argsz]), tuple(fds), argsz)


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
    FIELDS = (("wr_cnt", "Q"),)
    TAIL_DOC = (f"wr_cnt (1..{WRITE_MULTI_MAX}) x 24-byte entries: `u64 offset, u32 region, "
            "u32 count (1..8), u8 data[8]`; nothing after them")
    writes: tuple[WriteEntry, ...]

    def encode(self) -> bytes:
        out = bytearray(self.HEAD.pack(len(self.writes)))
        for w in self.writes:
            out += _WRITE_MULTI_ENTRY.pack(w.offset, w.region, len(w.data), w.data.ljust(8, b"\0"))
        return bytes(out)

    @classmethod
    def decode(cls, payload: memoryview, fds: Fds) -> Self:
        no_fds(cls, fds)
        need(cls, payload, cls.SIZE, fds)
        (n,) = cls.HEAD.unpack_from(payload)
        if n == 0 or n > WRITE_MULTI_MAX:
            raise reject(cls, f"wr_cnt {n} not in 1..{WRITE_MULTI_MAX}", fds)
        if len(payload) != cls.SIZE + n * WRITE_MULTI_ENTRY_SIZE:
            raise reject(cls, "size does not match wr_cnt", fds)
        writes = []
        for i in range(n):
            off, region, count, data = _WRITE_MULTI_ENTRY.unpack_from(
                payload, cls.SIZE + i * WRITE_MULTI_ENTRY_SIZE
            )
            if not 0 < count <= 8:
                raise reject(cls, f"entry {i} count {count}", fds)
            writes.append(WriteEntry(off, region, data[:count]))
        return cls(tuple(writes))


# Module globals for the codecs above: a global is cheaper than `self.HEAD` per message.
_DMA_UNMAP = DmaUnmap.HEAD
_SET_IRQS = DeviceSetIrqs.HEAD
DMA_UNMAP_SIZE = DmaUnmap.SIZE  # 24
SET_IRQS_SIZE = DeviceSetIrqs.SIZE  # 20

"""Device state as data: the container format, a strict reader, and field declarations.

Why a format of our own: state crosses process boundaries (a take-over hands it to a new
server, a migration streams it through a client), so it is untrusted input. pickle would
run code; JSON has no bytes. The encoding here is a tiny tagged format (none, bool, int,
bytes, str, list, str-keyed dict) that decodes without recursion bombs or huge
allocations, and every error names the offset or the field. docs/device-state.md is the
reference for the layout and the rules.

Loading is two-phase so that a bad state leaves the device untouched: every part first
*prepares* (reads and checks everything it needs, returns a closure that only assigns),
and only when all parts prepared and nothing was left unread do the closures run.
"""

from __future__ import annotations

import errno
import struct
import zlib
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

from .interface import StateError

#: what an encoded value can be
Value: TypeAlias = "bool | int | bytes | str | list[Value] | dict[str, Value] | None"
#: a prepared load step: assigns what was checked, cannot fail
Apply: TypeAlias = Callable[[], None]

MAGIC = b"VFUSTATE"
#: revision of the container layout below (not a model's state_version)
FORMAT_REVISION = 1
_HEAD = struct.Struct("<8sHH")  # magic, format revision, model-name length
_TAIL = struct.Struct("<IQI")  # state_version, payload length, CRC-32 of the payload
#: nesting deeper than this is refused (the models need 4)
MAX_DEPTH = 16
#: largest encoded int, in bytes (a u64 with its sign needs 9)
MAX_INT_BYTES = 16

_T_NONE, _T_TRUE, _T_FALSE = b"N"[0], b"T"[0], b"F"[0]
_T_INT, _T_BYTES, _T_STR, _T_LIST, _T_DICT = b"i"[0], b"b"[0], b"s"[0], b"l"[0], b"d"[0]
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


# --------------------------------------------------------------------------- encoding


def encode(value: Value) -> bytes:
    """The bytes of one value (see docs/device-state.md, "Values")."""
    out = bytearray()
    _encode(out, value, 0)
    return bytes(out)


def _encode(out: bytearray, value: Value, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ValueError("state nests too deeply")
    if value is None:
        out.append(_T_NONE)
    elif value is True:
        out.append(_T_TRUE)
    elif value is False:
        out.append(_T_FALSE)
    elif isinstance(value, int):
        size = max(1, (value.bit_length() + 8) // 8)
        if size > MAX_INT_BYTES:
            raise ValueError(f"integer {value} too large for the state format")
        out += bytes((_T_INT, size)) + value.to_bytes(size, "little", signed=True)
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        out += bytes((_T_BYTES,)) + _U32.pack(len(data)) + data
    elif isinstance(value, str):
        raw = value.encode()
        out += bytes((_T_STR,)) + _U32.pack(len(raw)) + raw
    elif isinstance(value, list):
        out += bytes((_T_LIST,)) + _U32.pack(len(value))
        for item in value:
            _encode(out, item, depth + 1)
    elif isinstance(value, dict):
        out += bytes((_T_DICT,)) + _U32.pack(len(value))
        for key, item in value.items():
            raw = key.encode()
            out += _U16.pack(len(raw)) + raw
            _encode(out, item, depth + 1)
    else:
        raise TypeError(f"cannot encode {type(value).__name__} in device state")


class _Decoder:
    """Reads one value; offsets in errors are from the start of the whole state."""

    def __init__(self, data: bytes, start: int, end: int) -> None:
        self.data = data
        self.pos = start
        self.end = end

    def take(self, n: int, what: str) -> bytes:
        if n > self.end - self.pos:
            raise StateError(errno.EINVAL, f"state truncated at offset {self.pos}: {what} "
                             f"needs {n} bytes, {self.end - self.pos} left")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def value(self, depth: int = 0) -> Value:
        if depth > MAX_DEPTH:
            raise StateError(errno.EINVAL, f"state nests deeper than {MAX_DEPTH} at offset "
                             f"{self.pos}")
        at = self.pos
        tag = self.take(1, "a type tag")[0]
        if tag == _T_NONE:
            return None
        if tag in (_T_TRUE, _T_FALSE):
            return tag == _T_TRUE
        if tag == _T_INT:
            size = self.take(1, "an integer size")[0]
            if not 1 <= size <= MAX_INT_BYTES:
                raise StateError(errno.EINVAL, f"bad integer size {size} at offset {at}")
            return int.from_bytes(self.take(size, "an integer"), "little", signed=True)
        if tag in (_T_BYTES, _T_STR):
            (n,) = _U32.unpack(self.take(4, "a length"))
            raw = self.take(n, "bytes" if tag == _T_BYTES else "a string")
            if tag == _T_BYTES:
                return raw
            return self.text(raw, at)
        if tag in (_T_LIST, _T_DICT):
            (count,) = _U32.unpack(self.take(4, "a count"))
            # Every element takes at least one byte: a count larger than what is left is a
            # truncated (or forged) state, refused before anything is allocated.
            if count > self.end - self.pos:
                raise StateError(errno.EINVAL, f"state truncated at offset {self.pos}: "
                                 f"{count} elements announced, {self.end - self.pos} bytes left")
            if tag == _T_LIST:
                return [self.value(depth + 1) for _ in range(count)]
            out: dict[str, Value] = {}
            for _ in range(count):
                key_at = self.pos
                (klen,) = _U16.unpack(self.take(2, "a key length"))
                key = self.text(self.take(klen, "a key"), key_at)
                if key in out:
                    raise StateError(errno.EINVAL, f"duplicate key {key!r} at offset {key_at}")
                out[key] = self.value(depth + 1)
            return out
        raise StateError(errno.EINVAL, f"unknown type tag {tag:#04x} at offset {at}")

    @staticmethod
    def text(raw: bytes, at: int) -> str:
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise StateError(errno.EINVAL, f"string at offset {at} is not UTF-8") from None


# --------------------------------------------------------------------------- container


def pack_state(model: str, version: int, payload: Value) -> bytes:
    """magic, format revision, model name, state_version, payload length, CRC, payload."""
    body = encode(payload)
    name = model.encode()
    return (_HEAD.pack(MAGIC, FORMAT_REVISION, len(name)) + name
            + _TAIL.pack(version, len(body), zlib.crc32(body)) + body)


def unpack_state(data: bytes | bytearray | memoryview, model: str, version: int) -> Value:
    """The payload of a state for `model` at `version`; StateError says what is wrong."""
    data = bytes(data)
    dec = _Decoder(data, 0, len(data))
    magic, revision, name_len = _HEAD.unpack(dec.take(_HEAD.size, "the header"))
    if magic != MAGIC:
        raise StateError(errno.EINVAL, f"not a device state: bad magic {magic!r} "
                         f"(expected {MAGIC!r})")
    if revision != FORMAT_REVISION:
        raise StateError(errno.EINVAL, f"state format revision {revision} is not supported "
                         f"(this server reads {FORMAT_REVISION})")
    name = dec.text(dec.take(name_len, "the model name"), _HEAD.size)
    if name != model:
        raise StateError(errno.EINVAL, f"state is for model {name!r}, this device is {model!r}")
    got, length, crc = _TAIL.unpack(dec.take(_TAIL.size, "the header"))
    if got != version:
        raise StateError(errno.EINVAL, f"{model}: state version {got} is not supported "
                         f"(this server saves and loads version {version})")
    start = dec.pos
    if length > len(data) - start:
        raise StateError(errno.EINVAL, f"state truncated at offset {len(data)}: the payload "
                         f"needs {length} bytes from offset {start}")
    if length < len(data) - start:
        raise StateError(errno.EINVAL, f"{len(data) - start - length} unexpected bytes after "
                         f"the payload at offset {start + length}")
    if zlib.crc32(data[start:]) != crc:
        raise StateError(errno.EINVAL, "state corrupt: payload checksum mismatch")
    body = _Decoder(data, start, len(data))
    payload = body.value()
    if body.pos != len(data):
        raise StateError(errno.EINVAL, f"unexpected bytes after the payload value at offset "
                         f"{body.pos}")
    return payload


# --------------------------------------------------------------------------- reading


class Record:
    """A decoded dict read field by field, with type and range checks.

    Every getter marks its key as read; `check_consumed` (called by the SDK after all
    parts prepared) refuses a state with fields nobody read, which is what an older or
    newer layout under the same version number would look like.
    """

    def __init__(self, data: Value, path: str) -> None:
        if not isinstance(data, dict):
            raise StateError(errno.EINVAL, f"field {path}: expected a record, got "
                             f"{type(data).__name__}")
        self.data = data
        self.path = path
        self._read: set[str] = set()
        self._children: list[Record] = []

    def fail(self, key: str, why: str) -> StateError:
        """A StateError naming field `key` of this record (for a model's own checks)."""
        return StateError(errno.EINVAL, f"field {self._name(key)}: {why}")

    def _name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str) -> Value:
        if key not in self.data:
            raise StateError(errno.EINVAL, f"field {self._name(key)} is missing")
        self._read.add(key)
        return self.data[key]

    def keys(self) -> list[str]:
        return list(self.data)

    def uint(self, key: str, bits: int) -> int:
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"expected an integer, got {type(value).__name__}")
        if not 0 <= value < 1 << bits:
            raise self.fail(key, f"{value} is not a {bits}-bit unsigned integer")
        return value

    def uint_in(self, key: str, lo: int, hi: int) -> int:
        """An integer in [lo, hi]."""
        value = self.uint(key, 64)
        if not lo <= value <= hi:
            raise self.fail(key, f"{value} is outside {lo}..{hi}")
        return value

    def opt_uint(self, key: str, bits: int) -> int | None:
        if self.get(key) is None:
            return None
        return self.uint(key, bits)

    def flag(self, key: str) -> bool:
        value = self.get(key)
        if not isinstance(value, bool):
            raise self.fail(key, f"expected a bool, got {type(value).__name__}")
        return value

    def blob(self, key: str, size: int | None = None) -> bytes:
        value = self.get(key)
        if not isinstance(value, bytes):
            raise self.fail(key, f"expected bytes, got {type(value).__name__}")
        if size is not None and len(value) != size:
            raise self.fail(key, f"{len(value)} bytes, expected {size}")
        return value

    def text(self, key: str) -> str:
        value = self.get(key)
        if not isinstance(value, str):
            raise self.fail(key, f"expected a string, got {type(value).__name__}")
        return value

    def uints(self, key: str, bits: int) -> list[int]:
        value = self.get(key)
        if not isinstance(value, list):
            raise self.fail(key, f"expected a list, got {type(value).__name__}")
        out = []
        for i, item in enumerate(value):
            if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item < 1 << bits:
                raise self.fail(f"{key}[{i}]", f"expected a {bits}-bit unsigned integer")
            out.append(item)
        return out

    def record(self, key: str) -> Record:
        child = Record(self.get(key), self._name(key))
        self._children.append(child)
        return child

    def records(self, key: str) -> list[Record]:
        value = self.get(key)
        if not isinstance(value, list):
            raise self.fail(key, f"expected a list, got {type(value).__name__}")
        out = [Record(item, f"{self._name(key)}[{i}]") for i, item in enumerate(value)]
        self._children += out
        return out

    def check_consumed(self) -> None:
        extra = sorted(set(self.data) - self._read)
        if extra:
            raise StateError(errno.EINVAL, f"unexpected field {self._name(extra[0])} (this "
                             "server does not know it)")
        for child in self._children:
            child.check_consumed()


def matches(rec: Record, key: str, expected: Value) -> None:
    """Refuse a state whose configuration item `key` differs from this device's (a disk
    size, a queue count: options the destination must be started with, not state)."""
    got = rec.get(key)
    if got != expected or type(got) is not type(expected):
        raise rec.fail(key, f"is {got!r} in the state but {expected!r} on this device "
                       "(start the device with the same options)")


def apply_all(steps: Sequence[Apply]) -> Apply:
    """One step that runs `steps` in order."""
    todo = list(steps)

    def run() -> None:
        for step in todo:
            step()

    return run


# --------------------------------------------------------------------------- declarations


def _resolve(obj: object, path: str) -> tuple[object, str]:
    *parents, last = path.split(".")
    for name in parents:
        obj = getattr(obj, name)
    return obj, last


class StateField:
    """One declared piece of model state: an attribute path (dots allowed, e.g.
    `worker.page_size`) saved under that name. Subclasses say how to save and check it."""

    def __init__(self, attr: str, *, match: bool = False) -> None:
        self.attr = attr
        #: configuration, not state: loading checks it is equal instead of assigning it
        self.match = match

    def get(self, obj: object) -> Any:
        owner, name = _resolve(obj, self.attr)
        return getattr(owner, name)

    def save(self, obj: object) -> Value:
        return self.get(obj)  # type: ignore[no-any-return]

    def check(self, rec: Record) -> Any:
        raise NotImplementedError

    def assign(self, obj: object, value: Any) -> None:
        owner, name = _resolve(obj, self.attr)
        setattr(owner, name, value)

    def prepare(self, obj: object, rec: Record) -> Apply:
        if self.match:
            matches(rec, self.attr, self.save(obj))
            return lambda: None
        value = self.check(rec)
        return lambda: self.assign(obj, value)


class UInt(StateField):
    """An unsigned integer of `bits` bits; `convert` rebuilds e.g. an IntFlag on load."""

    def __init__(self, attr: str, bits: int, *, match: bool = False,
                 convert: Callable[[int], Any] | None = None) -> None:
        super().__init__(attr, match=match)
        self.bits = bits
        self.convert = convert

    def save(self, obj: object) -> Value:
        return int(self.get(obj))

    def check(self, rec: Record) -> Any:
        value = rec.uint(self.attr, self.bits)
        return self.convert(value) if self.convert is not None else value


class Flag(StateField):
    """A bool."""

    def save(self, obj: object) -> Value:
        return bool(self.get(obj))

    def check(self, rec: Record) -> Any:
        return rec.flag(self.attr)


class Blob(StateField):
    """A fixed-size bytearray, restored in place (others may hold a view of it)."""

    def save(self, obj: object) -> Value:
        return bytes(self.get(obj))

    def prepare(self, obj: object, rec: Record) -> Apply:
        buf = self.get(obj)
        data = rec.blob(self.attr, len(buf))

        def apply() -> None:
            buf[:] = data

        return apply


class Bank(StateField):
    """A `RegisterBank`'s contents (for banks behind a model's own BAR handler; banks
    that back a BAR or a trap directly are saved by `PciDevice` without a declaration)."""

    def save(self, obj: object) -> Value:
        return self.get(obj).snapshot()  # type: ignore[no-any-return]

    def prepare(self, obj: object, rec: Record) -> Apply:
        bank = self.get(obj)
        data = rec.blob(self.attr, bank.size)
        return lambda: bank.restore(data)


def save_fields(obj: object, fields: Sequence[StateField]) -> dict[str, Value]:
    return {f.attr: f.save(obj) for f in fields}


def prepare_fields(obj: object, fields: Sequence[StateField], rec: Record) -> Apply:
    return apply_all([f.prepare(obj, rec) for f in fields])

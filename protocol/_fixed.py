"""One codec for every fixed-layout body, written from its declaration.

A fixed body is a frozen dataclass that declares its wire layout as data, like pyroute2's
`fields`: `FIELDS` lists (name, struct format) in wire order, and a handful of class
attributes state the spec's rules (see `FixedBody`). The `fixed` class decorator turns that
declaration into `decode` and `encode`.

Why generate source instead of one loop that interprets the rules on every call: a loop
over the rules measured about 30% slower than hand-written decoders (every command but the
hot MMIO ones pays it), while the generated functions are the hand-written ones, written
once per class at import. `source(cls)` shows what was generated; docs/protocol.md
("Message bodies") explains the rules.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, TypeVar

from ._body import Body, Fds, reject


class FixedBody(Body):
    """A body whose payload is its `FIELDS` (plus, optionally, trailing `data`).

    How each field travels:

    * a field named like a dataclass field carries that field;
    * a field the dataclass does not have is reserved: sent as zero, ignored when received
      (unless listed in `ZERO`);
    * `argsz` is sent as given; when the dataclass has no `argsz`, or its default is 0
      ("the size of this message"), 0 is replaced by `SIZE + len(data)`;
    * the count field `DATA` names is sent as `len(data)` and must equal it when received.
    """

    #: argsz (the first field) must be at least `SIZE` when received
    ARGSZ_MIN: ClassVar[bool] = False
    #: fields that must be zero when received ("the client must set flags to zero")
    ZERO: ClassVar[tuple[str, ...]] = ()
    #: the only bits `flags` may have when received; None: any
    FLAGS_MASK: ClassVar[int | None] = None
    #: at most this many descriptors; with 1, it is the dataclass field `fd`
    MAX_FDS: ClassVar[int] = 0
    #: the payload must be exactly `SIZE` bytes (otherwise trailing bytes are ignored)
    EXACT: ClassVar[bool] = False
    #: what follows the head: None (nothing), "rest" (all of it is `data`), or the name of
    #: the field that counts the bytes of `data`
    DATA: ClassVar[str | None] = None
    #: a payload shorter than the head decodes to the dataclass defaults (QEMU sends some
    #: replies as a bare header)
    MAY_BE_EMPTY: ClassVar[bool] = False

    @classmethod
    def fields(cls, payload: memoryview, fds: Fds) -> tuple[Any, ...]:
        """What `decode` would pass to the constructor, after the same checks (generated
        from the same declaration): for a caller that needs the values, not the object.
        A frozen dataclass costs about a microsecond to build, a third of what the server
        spends on a DMA_MAP beyond any message (`vfiouser_srv.dispatch.serve_plain`)."""
        raise NotImplementedError


B = TypeVar("B", bound=FixedBody)

_SOURCES: dict[type[FixedBody], str] = {}


def fixed(cls: type[B]) -> type[B]:
    """Give a `FixedBody` dataclass the `decode`/`encode` its declaration describes.

    Apply it over `@dataclass`; a codec the class writes itself is kept (MIG_DATA_READ
    computes its argsz differently).
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    wire = [name for name, _fmt in cls.FIELDS]
    _check_declaration(cls, fields, wire)
    parts = {
        "decode": _decode_source(cls, fields, wire),
        "encode": _encode_source(cls, fields, wire),
    }
    # (a short payload of MAY_BE_EMPTY is the constructor's defaults; a decode written by
    # hand has no generated twin)
    if not cls.MAY_BE_EMPTY and "decode" not in cls.__dict__:
        parts["fields"] = _decode_source(cls, fields, wire, fn="fields")
    namespace: dict[str, Any] = {
        "_unpack": cls.HEAD.unpack_from,
        "_pack": cls.HEAD.pack,
        "_reject": reject,
    }
    written = [name for name in parts if name not in cls.__dict__]
    source = "\n".join(parts[name] for name in written)
    exec(compile(source, f"<fixed codec of {cls.__name__}>", "exec"), namespace)
    if "decode" in written:
        cls.decode = classmethod(namespace["decode"])  # type: ignore[assignment]
    if "fields" in written:
        cls.fields = classmethod(namespace["fields"])  # type: ignore[assignment]
    if "encode" in written:
        cls.encode = namespace["encode"]  # type: ignore[method-assign]
    _SOURCES[cls] = source
    return cls


def source(cls: type[FixedBody]) -> str:
    """The generated codec of `cls`, as Python source (for reading and debugging)."""
    return _SOURCES[cls]


def is_reserved(cls: type[FixedBody], name: str) -> bool:
    """A wire field the dataclass does not carry (sent as zero)."""
    return name != "argsz" and name != cls.DATA and name not in _field_names(cls)


def _field_names(cls: type[Any]) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _check_declaration(
    cls: type[FixedBody], fields: dict[str, dataclasses.Field[Any]], wire: list[str]
) -> None:
    """Catch a declaration the generator would mistranslate, at import time."""

    def bad(why: str) -> TypeError:
        return TypeError(f"{cls.__name__}: {why}")

    if not cls.FIELDS:
        raise bad("a fixed body needs FIELDS")
    for name in fields:
        carried = name in wire or (name == "fd" and cls.MAX_FDS == 1) or (
            name == "data" and cls.DATA is not None
        )
        if not carried:
            raise bad(f"field {name!r} is not on the wire")
    if cls.MAX_FDS not in (0, 1):
        raise bad("MAX_FDS > 1 needs a hand-written codec (an fd list)")
    if cls.ARGSZ_MIN and wire[0] != "argsz":
        raise bad("ARGSZ_MIN needs argsz as the first field")
    if cls.FLAGS_MASK is not None and "flags" not in wire:
        raise bad("FLAGS_MASK needs a flags field")
    if not set(cls.ZERO) <= set(wire):
        raise bad(f"ZERO names fields not on the wire: {cls.ZERO}")
    if cls.DATA is not None and (cls.DATA != "rest" and cls.DATA not in wire):
        raise bad(f"DATA counter {cls.DATA!r} is not on the wire")
    if cls.DATA is not None and "data" not in fields:
        raise bad("DATA needs a dataclass field `data`")
    if cls.EXACT and cls.DATA:
        raise bad("EXACT and DATA contradict each other")


def _decode_source(
    cls: type[FixedBody],
    fields: dict[str, dataclasses.Field[Any]],
    wire: list[str],
    fn: str = "decode",
) -> str:
    """`decode`, or with `fn="fields"` its twin that returns the constructor arguments
    as a tuple instead of the body (the same checks, line for line: `FixedBody.fields`)."""
    size = cls.SIZE
    make = "cls" if fn == "decode" else ""
    out = [f"def {fn}(cls, payload, fds):"]
    if cls.MAX_FDS == 0:
        out += [
            "    if fds:",
            "        raise _reject(cls, f'carries no file descriptors, got {len(fds)}', fds)",
        ]
    else:
        out += [
            f"    if len(fds) > {cls.MAX_FDS}:",
            f"        raise _reject(cls, f'{{len(fds)}} fds, at most {cls.MAX_FDS}', fds)",
        ]
    if cls.MAY_BE_EMPTY:
        out += [f"    if len(payload) < {size}:", "        return cls()"]
    else:
        out += [
            f"    if len(payload) < {size}:",
            f"        raise _reject(cls, f'payload of {{len(payload)}} bytes, need {size}', fds)",
        ]
    names = [n if n in fields or n in ("argsz", cls.DATA, *cls.ZERO) else "_" for n in wire]
    out.append(f"    {', '.join(names)}{',' if len(names) == 1 else ''} = _unpack(payload)")
    if cls.ARGSZ_MIN:
        out += [
            f"    if argsz < {size}:",
            f"        raise _reject(cls, f'argsz {{argsz}} < {size}', fds)",
        ]
    for name in cls.ZERO:
        out += [
            f"    if {name}:",
            f"        raise _reject(cls, f'{name} {{{name}:#x}} must be 0', fds)",
        ]
    if cls.FLAGS_MASK is not None:
        out += [
            f"    if flags & {~cls.FLAGS_MASK & 0xFFFF_FFFF:#x}:",
            "        raise _reject(cls, f'unknown flags {flags:#x}', fds)",
        ]
    if cls.EXACT:
        out += [
            f"    if len(payload) != {size}:",
            f"        raise _reject(cls, f'payload of {{len(payload)}} bytes, not {size}', fds)",
        ]
    if cls.DATA not in (None, "rest"):
        count = cls.DATA
        out += [
            f"    if {count} != len(payload) - {size}:",
            f"        raise _reject(cls, f'{count} {{{count}}} but {{len(payload) - {size}}}"
            " data bytes', fds)",
        ]
    if cls.DATA is not None:
        out.append(f"    data = bytes(payload[{size}:])")
    args = []
    for field in fields:
        if field == "fd":
            args.append("fds[0] if fds else None")
        else:
            args.append(field)
    out.append(f"    return {make}({', '.join(args)}{',' if not make and len(args) == 1 else ''})")
    return "\n".join(out) + "\n"


def _encode_source(
    cls: type[FixedBody], fields: dict[str, dataclasses.Field[Any]], wire: list[str]
) -> str:
    data_len = "len(self.data)" if cls.DATA is not None else "0"
    values = []
    for name in wire:
        if name == cls.DATA:
            values.append("len(self.data)")
        elif name == "argsz" and (name not in fields or fields[name].default == 0):
            computed = f"{cls.SIZE} + {data_len}" if cls.DATA else str(cls.SIZE)
            values.append(f"(self.argsz or {computed})" if name in fields else computed)
        elif name in fields:
            values.append(f"self.{name}")
        else:
            values.append("0")
    tail = " + self.data" if cls.DATA is not None else ""
    return f"def encode(self):\n    return _pack({', '.join(values)}){tail}\n"

"""protocol/_fixed.py: the codec written from a fixed body's declaration.

test_messages.py checks every body against the spec's bytes; this checks the generator's own
rules (reserved fields, the declaration checks, the order of the fd and size checks) and
that every body's declared head matches the struct its codec uses.
"""

from __future__ import annotations

import dataclasses
import errno
import random
from typing import Any, ClassVar

import pytest

from protocol import (
    REPLIES,
    REQUESTS,
    Command,
    DeviceGetRegionInfo,
    DmaMap,
    DmaUnmap,
    DmaWriteReply,
    MigDataRead,
    RemoteProtocolError,
    decode_body,
)
from protocol._fixed import FixedBody, fixed, is_reserved, source

from .helpers import fds, layout

ALL_BODIES = [*REQUESTS.values(), *REPLIES.values()]
FIXED_BODIES = [c for c in ALL_BODIES if issubclass(c, FixedBody)]


@pytest.mark.parametrize("cls", ALL_BODIES, ids=lambda c: c.__name__)
def test_declared_head_is_the_struct(cls: type[Any]) -> None:
    fmt = "<" + "".join(f for _n, f in cls.FIELDS)
    assert cls.HEAD.format == fmt
    assert cls.HEAD.size == cls.SIZE


def test_most_bodies_are_declared_not_written() -> None:
    # the point of the generator: hand-written codecs only where the layout varies
    assert len(FIXED_BODIES) >= 17


@pytest.mark.parametrize("cls", FIXED_BODIES, ids=lambda c: c.__name__)
def test_generated_source_is_readable(cls: type[FixedBody]) -> None:
    owner = next(c for c in cls.__mro__ if "decode" in vars(c))  # a reply may inherit
    src = source(owner)
    assert src.startswith("def decode(cls, payload, fds):")
    # only what was generated: MIG_DATA_READ writes its own encode
    assert ("def encode(self):" in src) == (owner is not MigDataRead)


def test_reserved_fields_go_out_as_zero_and_are_ignored_on_receipt() -> None:
    assert is_reserved(DeviceGetRegionInfo, "cap_offset")
    assert not is_reserved(DeviceGetRegionInfo, "argsz")
    assert not is_reserved(DeviceGetRegionInfo, "index")
    assert DeviceGetRegionInfo(5).encode() == layout(
        32, (0, "I", 32), (4, "I", 0), (8, "I", 5), (12, "I", 0), (16, "Q", 0), (24, "Q", 0))
    junk = layout(32, (0, "I", 40), (4, "I", 0xFF), (8, "I", 5), (12, "I", 7),
                  (16, "Q", 1), (24, "Q", 2))
    got = decode_body(Command.DEVICE_GET_REGION_INFO, False, memoryview(junk), ())
    assert got == DeviceGetRegionInfo(5, argsz=40)


def test_a_hand_written_codec_is_kept() -> None:
    # MIG_DATA_READ's argsz is the reply size the client can take, not its own size
    assert MigDataRead(100).encode() == layout(8, (0, "I", 108), (4, "I", 100))


def test_may_be_empty_still_rejects_fds() -> None:
    carried = tuple(fds(1))
    with pytest.raises(RemoteProtocolError) as info:
        decode_body(Command.DMA_WRITE, True, memoryview(b""), carried)
    assert info.value.errno == errno.EINVAL and info.value.fds == list(carried)
    assert decode_body(Command.DMA_WRITE, True, memoryview(b""), ()) == DmaWriteReply()


def _declare(**rules: Any) -> type[FixedBody]:
    """A throwaway body `(argsz u32, flags u32)` with a `value` field and the given rules."""

    @dataclasses.dataclass(frozen=True, slots=True)
    class Probe(FixedBody):
        COMMAND: ClassVar[Command] = Command.DEVICE_FEATURE
        FIELDS = (("argsz", "I"), ("flags", "I"))
        flags: int
        value: int = 0

    for name, value in rules.items():
        setattr(Probe, name, value)
    return Probe


@pytest.mark.parametrize(
    "rules",
    [
        {},  # `value` is not on the wire
        {"FIELDS": (("flags", "I"), ("value", "I")), "ARGSZ_MIN": True},
        {"FIELDS": (("argsz", "I"), ("value", "I")), "FLAGS_MASK": 1},
        {"FIELDS": (("flags", "I"), ("value", "I")), "ZERO": ("nope",)},
        {"FIELDS": (("flags", "I"), ("value", "I")), "MAX_FDS": 2},
        {"FIELDS": (("flags", "I"), ("value", "I")), "DATA": "count"},
        {"FIELDS": (("flags", "I"), ("value", "I")), "DATA": "rest"},
    ],
    ids=["field-off-wire", "argsz-min-no-argsz", "mask-no-flags", "zero-unknown",
         "many-fds", "data-count-missing", "data-no-field"],
)
def test_bad_declarations_fail_at_import(rules: dict[str, Any]) -> None:
    probe = _declare(**rules)
    with pytest.raises(TypeError, match="Probe"):
        fixed(probe)


# `fields` (decode's twin that returns the constructor's arguments): the same checks, the
# same values. The server answers DMA_MAP and DMA_UNMAP from it (`dispatch.serve_plain`).
WITH_FIELDS = [
    c for c in ALL_BODIES if hasattr(c, "fields") and not getattr(c, "MAY_BE_EMPTY", False)
]


def _payloads(cls: type[Any]) -> list[bytes]:
    size = cls.SIZE
    rng = random.Random(cls.__name__)
    out = [b"", bytes(size - 1), bytes(size), bytes(size + 8)]
    for _ in range(40):
        n = rng.choice([size - 1, size, size, size + 3, size + 16])
        out.append(bytes(rng.choice([0, 1, 0xFF, rng.randrange(256)]) for _ in range(max(n, 0))))
    # plausible ones: argsz = the size, the other fields 0 or 1
    for v in (0, 1):
        out.append(cls.HEAD.pack(*[size if n == "argsz" else v for n, _f in cls.FIELDS]))
    return out


@pytest.mark.parametrize("cls", WITH_FIELDS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("nfds", [0, 1, 2])
def test_fields_are_what_decode_builds_from(cls: type[Any], nfds: int) -> None:
    descriptors = fds(nfds)
    for payload in _payloads(cls):
        try:
            body = cls.decode(memoryview(payload), descriptors)
        except RemoteProtocolError as exc:
            with pytest.raises(RemoteProtocolError) as got:
                cls.fields(memoryview(payload), descriptors)
            assert (got.value.errno, str(got.value), got.value.fds) == (
                exc.errno, str(exc), exc.fds)
            continue
        assert cls(*cls.fields(memoryview(payload), descriptors)) == body


def test_the_dma_bodies_have_fields() -> None:
    assert DmaMap in WITH_FIELDS and DmaUnmap in WITH_FIELDS

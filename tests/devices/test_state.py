"""Device state in the SDK: the container format, the strict reader, what PciDevice saves."""

from __future__ import annotations

import errno
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.sdk import (
    Access,
    Bar,
    DeviceError,
    DeviceModel,
    Flag,
    MsixCap,
    PciDevice,
    PciIdentity,
    Register,
    RegisterBank,
    SharedMemory,
    StateError,
    Trap,
    UInt,
    pack_state,
    unpack_state,
)
from devices.sdk.state import MAGIC, Record, Value, encode

from .fakes import FakeContext
from .helpers import cfg_read, cfg_write
from .state_helpers import check_refused, field

values: st.SearchStrategy[Value] = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 100), 1 << 100) | st.binary(max_size=64)
    | st.text(max_size=16),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=5),
    max_leaves=30,
)


@given(values)
def test_any_value_round_trips(value: Value) -> None:
    assert unpack_state(pack_state("m", 3, value), "m", 3) == value


@settings(max_examples=50)
@given(values, st.data())
def test_every_truncation_is_a_state_error_with_its_offset(value: Value, data: st.DataObject
                                                           ) -> None:
    state = pack_state("m", 1, value)
    cut = data.draw(st.integers(0, len(state) - 1))
    with pytest.raises(StateError, match=r"truncated at offset"):
        unpack_state(state[:cut], "m", 1)


@given(st.binary(max_size=64))
def test_garbage_payload_with_a_valid_checksum_never_escapes_as_another_error(body: bytes
                                                                              ) -> None:
    state = (MAGIC + struct.pack("<HH", 1, 1) + b"m"
             + struct.pack("<IQI", 1, len(body), zlib.crc32(body)) + body)
    try:
        unpack_state(state, "m", 1)
    except StateError as exc:
        assert exc.errno == errno.EINVAL


def test_counts_larger_than_the_data_are_refused_before_allocating() -> None:
    body = b"l" + struct.pack("<I", 0xFFFF_FFFF)
    state = (MAGIC + struct.pack("<HH", 1, 1) + b"m"
             + struct.pack("<IQI", 1, len(body), zlib.crc32(body)) + body)
    with pytest.raises(StateError, match=r"4294967295 elements announced"):
        unpack_state(state, "m", 1)


def test_nesting_is_bounded() -> None:
    deep: Value = 0
    for _ in range(40):
        deep = [deep]
    body = b"l\x01\x00\x00\x00" * 40 + encode(0)
    state = (MAGIC + struct.pack("<HH", 1, 1) + b"m"
             + struct.pack("<IQI", 1, len(body), zlib.crc32(body)) + body)
    with pytest.raises(StateError, match=r"nests deeper"):
        unpack_state(state, "m", 1)
    with pytest.raises(ValueError, match=r"nests too deeply"):
        encode(deep)


def test_record_checks_name_the_field() -> None:
    rec = Record({"a": {"b": -1, "c": "x", "d": [1, True]}}, "")
    inner = rec.record("a")
    with pytest.raises(StateError, match=r"field a.b: -1 is not a 8-bit"):
        inner.uint("b", 8)
    with pytest.raises(StateError, match=r"field a.c: expected bytes, got str"):
        inner.blob("c")
    with pytest.raises(StateError, match=r"field a.d\[1\]"):
        inner.uints("d", 8)
    with pytest.raises(StateError, match=r"field a.zz is missing"):
        inner.flag("zz")
    rest = Record({"x": 1, "y": 2}, "r")
    rest.uint("x", 8)
    with pytest.raises(StateError, match=r"unexpected field r.y"):
        rest.check_consumed()


def test_state_error_is_a_device_error_with_einval() -> None:
    assert issubclass(StateError, DeviceError)
    assert StateError("why").errno == errno.EINVAL and str(StateError("why")) == "why"
    assert StateError(errno.EINVAL, "why").errno == errno.EINVAL


def test_a_model_without_state_version_refuses_with_enotsup() -> None:
    class Plain(DeviceModel):
        name = "plain"

    assert Plain.state_version == 0
    with pytest.raises(DeviceError) as info:
        Plain().save_state()
    assert info.value.errno == errno.ENOTSUP and not isinstance(info.value, StateError)
    with pytest.raises(DeviceError) as info:
        Plain().load_state(b"")
    assert info.value.errno == errno.ENOTSUP


# --------------------------------------------------------------------------- PciDevice


class Gadget(PciDevice):
    """Every kind of declared memory: a bank BAR, shared memory with a trapped bank, MSI-X,
    plus declared fields."""

    name = "gadget"
    identity = PciIdentity(vendor_id=0x1234, device_id=0xBEEF)
    state_version = 2
    state_fields = (UInt("counter", 32), Flag("armed"), UInt("size", 32, match=True))

    def __init__(self, size: int = 7) -> None:
        self.regs = RegisterBank([Register("A", 0), Register("B", 4, access=Access.RW1C)])
        self.trap_regs = RegisterBank([Register("T", 0)])
        self.mem = SharedMemory("gadget")
        self.msix = MsixCap(4, table_bar=2)
        self.counter = 0
        self.armed = False
        self.size = size
        super().__init__(
            bars=[Bar(0, 0x100, backing=self.regs),
                  Bar(1, 0x2000, backing=self.mem, traps=(Trap(0x1000, 8, self.trap_regs),)),
                  Bar(2, 0x1000)],
            caps=[self.msix],
        )


GADGET_READS = [(0, 0, 8), (1, 0, 16), (1, 0x1000, 4), (2, 0, 64), (2, 0x800, 8)]


def touch(dev: Gadget, seed: int) -> None:
    dev.region_write(0, 0, (seed * 7 + 1).to_bytes(4, "little"))
    dev.regs["B"] = seed | 1
    dev.region_write(1, 8, bytes([seed & 0xFF]) * 8)
    dev.region_write(1, 0x1000, (seed + 3).to_bytes(4, "little"))
    dev.region_write(2, 16, (0xFEE0_0000 + seed * 16).to_bytes(4, "little"))
    cfg_write(dev, 4, 2, 0x6)
    dev.counter = seed * 11
    dev.armed = bool(seed & 1)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 255))
def test_pci_device_saves_config_banks_shared_memory_msix_and_fields(seed: int) -> None:
    src, dst = Gadget(), Gadget()
    try:
        touch(src, seed)
        dst.load_state(src.save_state())
        for region, off, size in GADGET_READS:
            assert dst.region_read(region, off, size) == src.region_read(region, off, size)
        assert cfg_read(dst, 4, 2) == 0x6
        assert (dst.counter, dst.armed) == (src.counter, src.armed)
        assert dst.save_state() == src.save_state()
    finally:
        src.close()
        dst.close()


def test_pci_device_refuses_broken_states_and_stays_as_it_was() -> None:
    dev, other = Gadget(), Gadget()
    touch(other, 5)
    touch(dev, 9)

    def wrong_type(p: dict[str, Value]) -> None:
        field(p, "fields")["counter"] = "many"

    def too_wide(p: dict[str, Value]) -> None:
        field(p, "fields")["counter"] = 1 << 32

    def bank_short(p: dict[str, Value]) -> None:
        field(p, "pci", "memories")["bar0"] = b"\0"

    def msix_pending_out_of_range(p: dict[str, Value]) -> None:
        field(p, "pci")["msix_pending"] = [9]

    check_refused(dev, other.save_state(), GADGET_READS, [
        ("wrong type", wrong_type, "field fields.counter: expected an integer, got str"),
        ("too wide", too_wide, "field fields.counter: 4294967296 is not a 32-bit"),
        ("bank size", bank_short, "field pci.memories.bar0: 1 bytes, expected 8"),
        ("pending", msix_pending_out_of_range, "field pci.msix_pending: vector 9 >= 4"),
    ])
    with pytest.raises(StateError, match=r"field fields.size: is 8 in the state but 7"):
        dev.load_state(Gadget(size=8).save_state())
    for d in (dev, other):
        d.close()


async def test_msix_pending_bits_are_replayed_on_attach(ctx: FakeContext) -> None:
    src = Gadget()
    src.attach(ctx)
    ctx.irq.pending_vectors.add((2, 3))
    state = src.save_state()
    dst = Gadget()
    dst.load_state(state)
    assert dst.save_state() == state  # detached: kept for the next attach
    dst.attach(ctx)
    assert ctx.irq.triggers == []  # the engine already has the bit: nothing to raise
    ctx.irq.pending_vectors.clear()
    dst.load_state(state)  # attached, and the engine lacks it: raised again
    assert ctx.irq.triggers == [(2, 3)]
    src.close()
    dst.close()


async def test_intx_level_is_restored_and_driven_on_attach(ctx: FakeContext) -> None:
    src = Gadget()
    src.raise_irq()
    dst = Gadget()
    dst.load_state(src.save_state())
    assert dst.intx_asserted()
    dst.attach(ctx)
    assert ctx.irq.intx
    src.close()
    dst.close()

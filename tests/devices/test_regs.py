"""Register banks: field kinds, hooks, any width/alignment, unknown offsets."""

from __future__ import annotations

import pytest

from devices.sdk import Access, Field, Register, RegisterBank


def make_bank(log: list[tuple[str, int]]) -> RegisterBank:
    return RegisterBank(
        [
            Register("CTRL", 0x00, fields=[
                Field("EN", 0),
                Field("MODE", 4, 4, reset=0x3),
                Field("GO", 8, access=Access.WO),
                Field("VER", 24, 8, access=Access.RO, reset=0x12),
            ], on_write=lambda v: log.append(("CTRL", v))),
            Register("STATUS", 0x04, fields=[
                Field("RDY", 0, access=Access.RO),
                Field("ERR", 1, 2, access=Access.RW1C),
            ]),
            Register("COUNTER", 0x08, access=Access.RO, on_read=lambda: 0xCAFE),
            Register("BIG", 0x10, size=8),
            Register("DOORBELL", 0x18, access=Access.WO,
                     on_write=lambda v: log.append(("DOORBELL", v))),
        ],
        size=0x100,
    )


def rd(bank: RegisterBank, offset: int, size: int) -> int:
    return int.from_bytes(bank.read(offset, size), "little")


def wr(bank: RegisterBank, offset: int, size: int, value: int) -> None:
    bank.write(offset, value.to_bytes(size, "little"))


def test_reset_values_and_ro() -> None:
    bank = make_bank([])
    assert rd(bank, 0, 4) == 0x1200_0030
    wr(bank, 0, 4, 0)
    assert rd(bank, 0, 4) == 0x1200_0000  # VER is RO
    assert bank.get_field("CTRL", "VER") == 0x12


def test_rw_field_and_reserved_bits() -> None:
    bank = make_bank([])
    wr(bank, 0, 4, 0x00FF_00F1)
    assert rd(bank, 0, 4) == 0x1200_00F1  # bits 16..23 reserved
    assert bank.get_field("CTRL", "MODE") == 0xF


def test_wo_bits_pulse_and_read_zero() -> None:
    log: list[tuple[str, int]] = []
    bank = make_bank(log)
    wr(bank, 0, 4, 0x101)
    assert log[-1] == ("CTRL", 0x1200_0101)  # the hook sees GO
    assert rd(bank, 0, 4) & 0x100 == 0
    wr(bank, 0, 1, 0x1)  # low byte only: GO must not fire again
    assert log[-1] == ("CTRL", 0x1200_0001)
    wr(bank, 0x18, 4, 0xDEAD)
    assert log[-1] == ("DOORBELL", 0xDEAD)
    assert rd(bank, 0x18, 4) == 0


def test_rw1c() -> None:
    bank = make_bank([])
    bank.set_field("STATUS", "ERR", 0x3)
    bank.set_field("STATUS", "RDY", 1)
    wr(bank, 4, 4, 0x2 | 0x1)  # clear ERR bit 1 (bit 0 is RDY: RO)
    assert rd(bank, 4, 4) == 0x1 | 0x4


def test_read_hook() -> None:
    bank = make_bank([])
    assert rd(bank, 8, 4) == 0xCAFE
    assert rd(bank, 9, 1) == 0xCA


def test_any_width_and_alignment() -> None:
    bank = make_bank([])
    wr(bank, 0x10, 8, 0x1122_3344_5566_7788)
    assert rd(bank, 0x10, 8) == 0x1122_3344_5566_7788
    assert rd(bank, 0x13, 2) == 0x4455
    wr(bank, 0x15, 2, 0xAABB)
    assert rd(bank, 0x10, 8) == 0x11AA_BB44_5566_7788
    # One access spanning two registers (CTRL..STATUS) calls each register's masks.
    wr(bank, 0x02, 4, 0xFFFF_FFFF)
    assert rd(bank, 0x00, 4) == 0x1200_0030


def test_unknown_offsets() -> None:
    bank = make_bank([])
    wr(bank, 0x40, 4, 0xFFFF_FFFF)
    assert rd(bank, 0x40, 4) == 0
    assert bank.read(0xFE, 4) == bytes(4)  # partly past the bank
    bank.write(0x200, b"\xff")  # wholly past: ignored


def test_reset() -> None:
    bank = make_bank([])
    wr(bank, 0x10, 8, 0xFFFF)
    bank.reset()
    assert rd(bank, 0x10, 8) == 0
    assert rd(bank, 0, 4) == 0x1200_0030


def test_bad_declarations() -> None:
    with pytest.raises(ValueError):
        Register("X", 0x2, size=4)
    with pytest.raises(ValueError):
        Register("X", 0, fields=[Field("A", 0, 4), Field("B", 3)])
    with pytest.raises(ValueError):
        RegisterBank([Register("A", 0), Register("B", 2, size=2)])

"""Type-0 header: identity, read-only fields, command/status masks, BAR and ROM sizing."""

from __future__ import annotations

import pytest

from devices.sdk import (
    Bar,
    BarKind,
    Command,
    PciDevice,
    PciIdentity,
    Register,
    RegisterBank,
    Rom,
    SharedMemory,
    Status,
)
from devices.sdk.bits import masked_write

from .fakes import FakeContext
from .helpers import cfg_read, cfg_write

IDENT = PciIdentity(vendor_id=0x1AF4, device_id=0x10F0, class_code=0x058000, revision=0x02,
                    subsystem_vendor_id=0x1B36, subsystem_id=0x0101)


class AllBars(PciDevice):
    name = "allbars"
    identity = IDENT

    def __init__(self) -> None:
        self.regs = RegisterBank([Register("SCRATCH", 0)], size=0x1000)
        self.mem = SharedMemory()
        super().__init__(
            bars=[
                Bar(0, 0x1000, backing=self.regs),
                Bar(2, 1 << 33, kind=BarKind.MEM64, prefetchable=True, backing=None),
                Bar(4, 0x20, kind=BarKind.IO, backing=self.regs),
            ],
            rom=Rom(b"\x55\xaa" + bytes(100), size=0x4000),
        )


class NoIntx(PciDevice):
    name = "nointx"
    identity = IDENT
    interrupt_pin = 0


@pytest.fixture
def dev() -> AllBars:
    return AllBars()


def test_identity(dev: AllBars) -> None:
    assert cfg_read(dev, 0x00, 2) == 0x1AF4
    assert cfg_read(dev, 0x02, 2) == 0x10F0
    assert cfg_read(dev, 0x08, 1) == 0x02
    assert cfg_read(dev, 0x09, 3) == 0x058000
    assert cfg_read(dev, 0x2C, 2) == 0x1B36
    assert cfg_read(dev, 0x2E, 2) == 0x0101
    assert cfg_read(dev, 0x0E, 1) == 0  # type 0, single function
    assert cfg_read(dev, 0x3D, 1) == 1  # INTA
    assert cfg_read(NoIntx(), 0x3D, 1) == 0


def test_whole_header_is_readable_in_one_go(dev: AllBars) -> None:
    image = dev.region_read(7, 0, 256)
    assert len(image) == 256
    assert image[0:4] == bytes([0xF4, 0x1A, 0xF0, 0x10])


@pytest.mark.parametrize(
    ("offset", "size"),
    [(0x00, 4), (0x08, 4), (0x0E, 1), (0x0F, 1), (0x28, 4), (0x2C, 4), (0x34, 1),
     (0x3D, 1), (0x3E, 2), (0x40, 4), (0xFC, 4)],
)
def test_read_only_fields_ignore_writes(dev: AllBars, offset: int, size: int) -> None:
    before = cfg_read(dev, offset, size)
    cfg_write(dev, offset, size, (1 << (8 * size)) - 1)
    assert cfg_read(dev, offset, size) == before


def test_command_writable_bits(dev: AllBars) -> None:
    cfg_write(dev, 0x04, 2, 0xFFFF)
    # QEMU's pci_init_wmask: Parity Error Response (bit 6) and the rest stay 0
    expected = Command.IO | Command.MEMORY | Command.MASTER | Command.SERR | Command.INTX_DISABLE
    assert cfg_read(dev, 0x04, 2) == expected == 0x0507
    cfg_write(dev, 0x04, 2, 0)
    assert cfg_read(dev, 0x04, 2) == 0


def test_command_io_bit_kept_without_io_bar() -> None:
    """QEMU makes I/O Space writable on every device (its edu reads back 0x0107 after the
    guest sets it), so a guest sees our device keep it too, I/O BAR or not."""

    class MemOnly(PciDevice):
        identity = IDENT

        def __init__(self) -> None:
            super().__init__(bars=[Bar(0, 0x1000)])

    dev = MemOnly()
    cfg_write(dev, 0x04, 2, Command.IO | Command.MEMORY | Command.MASTER | Command.SERR)
    assert cfg_read(dev, 0x04, 2) == 0x0107
    cfg_write(dev, 0x04, 2, Command.PARITY)
    assert cfg_read(dev, 0x04, 2) == 0


def test_status_rw1c_and_read_only_bits(dev: AllBars) -> None:
    errors = Status.DETECTED_PARITY | Status.SIG_SYSTEM_ERROR | Status.REC_MASTER_ABORT
    dev.config.set_bits(0x06, 2, errors | Status.INTERRUPT, True)
    # Writing 0 changes nothing; writing 1 clears only RW1C bits.
    cfg_write(dev, 0x06, 2, 0)
    assert cfg_read(dev, 0x06, 2) == errors | Status.INTERRUPT
    cfg_write(dev, 0x06, 2, Status.REC_MASTER_ABORT | Status.INTERRUPT | Status.CAP_LIST)
    assert cfg_read(dev, 0x06, 2) == (Status.DETECTED_PARITY | Status.SIG_SYSTEM_ERROR
                                      | Status.INTERRUPT)


def test_cap_list_bit_only_with_caps(dev: AllBars) -> None:
    assert not cfg_read(dev, 0x06, 2) & Status.CAP_LIST
    assert cfg_read(dev, 0x34, 1) == 0


def test_interrupt_line_rw_and_cache_line(dev: AllBars) -> None:
    cfg_write(dev, 0x3C, 1, 0x0B)
    assert cfg_read(dev, 0x3C, 1) == 0x0B
    cfg_write(dev, 0x0C, 1, 0x10)
    assert cfg_read(dev, 0x0C, 1) == 0x10


def test_mem32_bar_sizing(dev: AllBars) -> None:
    assert cfg_read(dev, 0x10, 4) == 0  # mem, 32-bit, non-prefetchable
    cfg_write(dev, 0x10, 4, 0xFFFF_FFFF)
    assert cfg_read(dev, 0x10, 4) == 0xFFFF_F000
    cfg_write(dev, 0x10, 4, 0xFEBF_1234)
    assert cfg_read(dev, 0x10, 4) == 0xFEBF_1000


def test_mem64_prefetchable_bar_pair_sizing(dev: AllBars) -> None:
    assert cfg_read(dev, 0x18, 4) == 0xC  # 64-bit | prefetchable
    cfg_write(dev, 0x18, 4, 0xFFFF_FFFF)
    cfg_write(dev, 0x1C, 4, 0xFFFF_FFFF)
    low, high = cfg_read(dev, 0x18, 4), cfg_read(dev, 0x1C, 4)
    size = ~((high << 32 | low) & ~0xF) + 1 & ((1 << 64) - 1)
    assert low == 0x0000_000C
    assert high == 0xFFFF_FFFE
    assert size == 1 << 33
    cfg_write(dev, 0x18, 4, 0)
    cfg_write(dev, 0x1C, 4, 0x4)
    assert cfg_read(dev, 0x18, 8) == (0x4 << 32) | 0xC


def test_io_bar_sizing(dev: AllBars) -> None:
    assert cfg_read(dev, 0x20, 4) == 0x1
    cfg_write(dev, 0x20, 4, 0xFFFF_FFFF)
    assert cfg_read(dev, 0x20, 4) == 0xFFFF_FFE1
    cfg_write(dev, 0x20, 4, 0xC040)
    assert cfg_read(dev, 0x20, 4) == 0xC041


@pytest.mark.parametrize("offset", [0x14, 0x24])
def test_unimplemented_bars_read_zero(dev: AllBars, offset: int) -> None:
    cfg_write(dev, offset, 4, 0xFFFF_FFFF)
    assert cfg_read(dev, offset, 4) == 0


def test_rom_bar_sizing_and_enable(dev: AllBars) -> None:
    cfg_write(dev, 0x30, 4, 0xFFFF_FFFE)
    assert cfg_read(dev, 0x30, 4) == 0xFFFF_C000
    cfg_write(dev, 0x30, 4, 0xFEB0_0001)
    assert cfg_read(dev, 0x30, 4) == 0xFEB0_0001
    assert dev.region_read(6, 0, 2) == b"\x55\xaa"


def test_partial_and_unaligned_writes_use_byte_masks(dev: AllBars) -> None:
    # A 2-byte write straddling Command/Status: high byte of Command + low byte of Status.
    dev.config.set_bits(0x06, 2, Status.MASTER_DATA_PARITY, True)
    cfg_write(dev, 0x05, 2, 0x0104)  # byte 5 = 0x04 (INTX_DISABLE), byte 6 = 0x01
    assert cfg_read(dev, 0x04, 2) == Command.INTX_DISABLE
    assert cfg_read(dev, 0x06, 2) & Status.MASTER_DATA_PARITY  # byte 6 bit 0 is RO
    cfg_write(dev, 0x07, 1, 0x01)  # high byte, bit 8 of status: RW1C
    assert not cfg_read(dev, 0x06, 2) & Status.MASTER_DATA_PARITY
    # A single byte into the middle of a BAR.
    cfg_write(dev, 0x11, 1, 0xFF)
    assert cfg_read(dev, 0x10, 4) == 0x0000_F000
    # A 4-byte write straddling the latency timer / header type / BIST and cache line.
    cfg_write(dev, 0x0C, 4, 0xFFFF_FF20)
    assert cfg_read(dev, 0x0C, 4) == 0x0000_0020


def test_masked_write_helper() -> None:
    cur = bytearray([0xF0, 0x0F])
    masked_write(cur, bytes([0x0F, 0x00]), bytes([0x00, 0x03]), 0, bytes([0xFF, 0x01]))
    assert cur == bytearray([0xFF, 0x0E])


async def test_reset_restores_header(dev: AllBars, ctx: FakeContext) -> None:
    dev.attach(ctx)
    cfg_write(dev, 0x04, 2, Command.MEMORY | Command.MASTER)
    cfg_write(dev, 0x10, 4, 0xFEBF_0000)
    cfg_write(dev, 0x3C, 1, 0x0A)
    dev.regs["SCRATCH"] = 0x1234
    dev.reset()
    assert cfg_read(dev, 0x04, 2) == 0
    assert cfg_read(dev, 0x10, 4) == 0
    assert cfg_read(dev, 0x3C, 1) == 0
    assert cfg_read(dev, 0x00, 4) == 0x10F0_1AF4
    assert dev.regs["SCRATCH"] == 0


def test_bad_declarations_rejected() -> None:
    with pytest.raises(ValueError):
        Bar(5, 0x1000, kind=BarKind.MEM64)
    with pytest.raises(ValueError):
        Bar(0, 0x1001)
    with pytest.raises(ValueError):
        Bar(0, 2, kind=BarKind.IO)
    with pytest.raises(ValueError):
        Bar(0, 0x100, kind=BarKind.IO, prefetchable=True)

    class Clash(PciDevice):
        identity = IDENT

        def __init__(self) -> None:
            super().__init__(bars=[Bar(0, 0x1000, kind=BarKind.MEM64), Bar(1, 0x1000)])

    with pytest.raises(ValueError, match="slot 1"):
        Clash()

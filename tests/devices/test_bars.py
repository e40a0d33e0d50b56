"""Shared-memory BARs, sparse mmap areas, trap dispatch, regions() and irqs()."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator

import pytest

from devices.sdk import (
    Bar,
    BarKind,
    IrqIndex,
    MsiCap,
    MsixCap,
    PciDevice,
    PciIdentity,
    Register,
    RegisterBank,
    Rom,
    SharedMemory,
    Trap,
)
from devices.sdk.interface import MmapArea, RegionIndex

IDENT = PciIdentity(vendor_id=0x1234, device_id=0x0003)
PAGE = mmap.PAGESIZE


class Mixed(PciDevice):
    name = "mixed"
    identity = IDENT

    def __init__(self) -> None:
        self.regs = RegisterBank([Register("A", 0), Register("B", 4)])
        self.ram = SharedMemory("ram")
        self.window = SharedMemory("window")
        self.msix_cap = MsixCap(4, table_bar=4, table_offset=0, pba_offset=0x800)
        super().__init__(
            bars=[
                Bar(0, 0x10000, kind=BarKind.MEM64, prefetchable=True, backing=self.ram),
                Bar(2, 4 * PAGE, backing=self.window, traps=(Trap(0, PAGE, self.regs),)),
                Bar(4, 0x1000),
            ],
            caps=[MsiCap(2), self.msix_cap],
            rom=Rom(b"ROM!"),
        )


@pytest.fixture
def dev() -> Iterator[Mixed]:
    d = Mixed()
    yield d
    d.close()


def test_regions_derived(dev: Mixed) -> None:
    regions = {r.index: r for r in dev.regions()}
    assert sorted(regions) == list(range(9))
    assert regions[0].size == 0x10000 and regions[0].fd == dev.ram.fd
    assert regions[0].mmappable and regions[0].mmap_areas == ()
    assert regions[1].size == 0  # upper half of the 64-bit BAR
    assert regions[2].mmap_areas == (MmapArea(PAGE, 3 * PAGE),)
    assert regions[3].size == 0 and regions[5].size == 0
    assert regions[4].size == 0x1000 and not regions[4].mmappable
    assert regions[RegionIndex.ROM].size == 0x800 and not regions[RegionIndex.ROM].writable
    assert regions[RegionIndex.CONFIG].size == 256
    assert regions[RegionIndex.VGA].size == 0


def test_irqs_derived(dev: Mixed) -> None:
    counts = {i.index: i.count for i in dev.irqs()}
    assert counts == {IrqIndex.INTX: 1, IrqIndex.MSI: 2, IrqIndex.MSIX: 4,
                      IrqIndex.ERR: 1, IrqIndex.REQ: 1}


def test_shared_memory_visible_through_independent_mmap(dev: Mixed) -> None:
    assert os.fstat(dev.ram.fd).st_size == 0x10000
    other = mmap.mmap(dev.ram.fd, 0x10000, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        dev.region_write(0, 0x100, b"hello")
        assert other[0x100:0x105] == b"hello"
        other[0x2000:0x2003] = b"abc"
        assert dev.region_read(0, 0x2000, 3) == b"abc"
        assert bytes(dev.ram.buf[0x2000:0x2003]) == b"abc"
    finally:
        other.close()


def test_trap_and_memory_split(dev: Mixed) -> None:
    dev.region_write(2, 0, (0x11223344).to_bytes(4, "little"))
    assert dev.regs["A"] == 0x11223344
    assert bytes(dev.window.buf[0:4]) == bytes(4)  # served by the bank, not memory
    # An access straddling the trap end: 4 bytes of (unknown) bank, 4 of memory.
    dev.window.buf[PAGE : PAGE + 4] = b"WXYZ"
    assert dev.region_read(2, PAGE - 4, 8) == bytes(4) + b"WXYZ"


def test_unbacked_bar_reads_zero_and_msix_trapped(dev: Mixed) -> None:
    assert dev.region_read(4, 0x900, 4) == bytes(4)
    assert dev.region_read(4, 0xC, 4) == (1).to_bytes(4, "little")  # vector 0 masked


def test_rom_region(dev: Mixed) -> None:
    assert dev.region_read(RegionIndex.ROM, 0, 6) == b"ROM!\0\0"


def test_out_of_range_access_is_einval(dev: Mixed) -> None:
    from devices.sdk import DeviceError

    with pytest.raises(DeviceError):
        dev.region_read(4, 0xFFE, 4)
    with pytest.raises(DeviceError):
        dev.region_read(1, 0, 4)
    with pytest.raises(DeviceError):
        dev.region_write(RegionIndex.VGA, 0, b"x")


def test_reset_clears_memory(dev: Mixed) -> None:
    dev.region_write(0, 0, b"data")
    dev.reset()
    assert dev.region_read(0, 0, 4) == bytes(4)


def test_close_releases_fds() -> None:
    dev = Mixed()
    fds = (dev.ram.fd, dev.window.fd)
    dev.close()
    assert dev.ram.fd == -1 and dev.window.fd == -1
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    dev.close()  # idempotent


def test_msix_must_fit_in_a_memory_bar() -> None:
    class Bad(PciDevice):
        identity = IDENT

        def __init__(self) -> None:
            super().__init__(bars=[Bar(0, 0x40)], caps=[MsixCap(8, table_bar=0)])

    with pytest.raises(ValueError, match="MSI-X"):
        Bad()

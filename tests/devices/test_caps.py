"""Capability placement, chain walking and each capability's fields and write masks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.sdk import (
    Bar,
    CapId,
    ExtCapId,
    MsiCap,
    MsixCap,
    PciDevice,
    PcieCap,
    PciIdentity,
    PmCap,
    PowerState,
    Status,
    VendorCap,
    VendorExtCap,
)

from .fakes import FakeContext
from .helpers import cfg_read, cfg_write, walk_caps, walk_ext_caps

IDENT = PciIdentity(vendor_id=0x1234, device_id=0x0002)


class Full(PciDevice):
    name = "full"
    identity = IDENT

    def __init__(self) -> None:
        self.pm = PmCap(pme_support=0b01001)
        self.msi_cap = MsiCap(4, addr64=True, per_vector_mask=True)
        self.msix_cap = MsixCap(8, table_bar=0, table_offset=0x1000, pba_bar=0,
                                pba_offset=0x1800)
        self.pcie_cap = PcieCap()
        self.vendor = VendorCap(b"\x01\x02\x03", wmask=b"\x00\xff\x00")
        super().__init__(
            bars=[Bar(0, 0x4000)],
            caps=[self.pm, self.msi_cap, self.msix_cap, self.pcie_cap, self.vendor],
            ext_caps=[VendorExtCap(0x42, b"abcdef", vsec_rev=1), VendorExtCap(0x43, b"")],
        )


class Conventional(PciDevice):
    name = "conv"
    identity = IDENT

    def __init__(self) -> None:
        self.msi_cap = MsiCap(1, addr64=False)
        super().__init__(caps=[self.msi_cap])


@pytest.fixture
def dev() -> Full:
    return Full()


def test_caps_placed_after_header_dword_aligned_and_linked(dev: Full) -> None:
    chain = walk_caps(dev)
    assert [cap_id for _, cap_id in chain] == [
        CapId.PM, CapId.MSI, CapId.MSIX, CapId.PCIE, CapId.VENDOR]
    offsets = [off for off, _ in chain]
    assert offsets[0] == 0x40
    assert all(off % 4 == 0 for off in offsets)
    # Each capability starts after the previous one ends (no overlap).
    sizes = [dev.pm.size, dev.msi_cap.size, dev.msix_cap.size, dev.pcie_cap.size]
    for prev, nxt, size in zip(offsets, offsets[1:], sizes, strict=False):
        assert nxt >= prev + size
    assert offsets == [c.offset for c in dev.caps]
    assert cfg_read(dev, 0x06, 2) & Status.CAP_LIST
    assert cfg_read(dev, offsets[-1] + 1, 1) == 0  # end of list


def test_pcie_device_has_4k_config_and_ext_chain(dev: Full) -> None:
    assert dev.config.size == 0x1000
    assert dev.region_read(7, 0, 0x1000)[0x100:0x102] == ExtCapId.VENDOR.to_bytes(2, "little")
    chain = walk_ext_caps(dev)
    assert [(cid, ver) for _, cid, ver in chain] == [(ExtCapId.VENDOR, 1), (ExtCapId.VENDOR, 1)]
    first, second = chain[0][0], chain[1][0]
    assert first == 0x100 and second % 4 == 0 and second >= 0x100 + 8 + 8
    vsec = cfg_read(dev, first + 4, 4)
    assert vsec & 0xFFFF == 0x42
    assert (vsec >> 16) & 0xF == 1
    assert vsec >> 20 == 8 + 6
    assert dev.region_read(7, first + 8, 6) == b"abcdef"
    cfg_write(dev, first + 8, 4, 0)
    assert dev.region_read(7, first + 8, 6) == b"abcdef"


def test_pcie_without_ext_caps_has_empty_ext_header() -> None:
    class Plain(PciDevice):
        identity = IDENT

        def __init__(self) -> None:
            super().__init__(caps=[PcieCap()])

    dev = Plain()
    assert dev.region_read(7, 0, 0x1000)[0x100:0x104] == bytes(4)
    assert walk_ext_caps(dev) == []


def test_conventional_device_is_256_bytes() -> None:
    dev = Conventional()
    assert dev.config.size == 0x100
    assert walk_caps(dev) == [(0x40, CapId.MSI)]


def test_ext_caps_need_pcie() -> None:
    class Bad(PciDevice):
        identity = IDENT

        def __init__(self) -> None:
            super().__init__(ext_caps=[VendorExtCap(1, b"")])

    with pytest.raises(ValueError, match="PcieCap"):
        Bad()


def test_caps_that_do_not_fit_are_rejected() -> None:
    class TooMany(PciDevice):
        identity = IDENT

        def __init__(self) -> None:
            super().__init__(caps=[VendorCap(bytes(200)), VendorCap(bytes(100))])

    with pytest.raises(ValueError, match="do not fit"):
        TooMany()


def test_pm_cap(dev: Full) -> None:
    base = dev.pm.offset
    pmc = cfg_read(dev, base + 2, 2)
    assert pmc & 0x7 == 3  # PM spec 1.2
    assert pmc >> 11 == 0b01001
    assert cfg_read(dev, base + 4, 2) & PmCap.PMCSR_NO_SOFT_RESET
    cfg_write(dev, base + 4, 2, PowerState.D3HOT)
    assert dev.pm.power_state is PowerState.D3HOT
    cfg_write(dev, base + 4, 2, PowerState.D1)  # unsupported: ignored
    assert dev.pm.power_state is PowerState.D3HOT
    cfg_write(dev, base + 4, 2, PowerState.D0 | PmCap.PMCSR_PME_EN)
    assert cfg_read(dev, base + 4, 2) & 0x3 == 0
    assert cfg_read(dev, base + 4, 2) & PmCap.PMCSR_PME_EN
    dev.config.set_bits(base + 4, 2, PmCap.PMCSR_PME_STATUS, True)
    cfg_write(dev, base + 4, 2, PmCap.PMCSR_PME_STATUS | PmCap.PMCSR_PME_EN)
    assert not cfg_read(dev, base + 4, 2) & PmCap.PMCSR_PME_STATUS


def test_msi_cap_64bit_with_masking(dev: Full) -> None:
    base = dev.msi_cap.offset
    assert dev.msi_cap.size == 0x18
    ctrl = cfg_read(dev, base + 2, 2)
    assert ctrl == (2 << 1) | MsiCap.CTRL_64BIT | MsiCap.CTRL_MASKBIT  # MMC = log2(4)
    cfg_write(dev, base + 2, 2, 0xFFFF)
    ctrl = cfg_read(dev, base + 2, 2)
    assert ctrl & MsiCap.CTRL_ENABLE and (ctrl >> 4) & 7 == 7
    assert dev.msi_cap.enabled_vectors == 4  # capped at what we offer
    cfg_write(dev, base + 4, 4, 0xFEE0_1003)
    cfg_write(dev, base + 8, 4, 0x1)
    cfg_write(dev, base + 0xC, 4, 0xFFFF_4021)
    assert dev.msi_cap.address == 0x1_FEE0_1000
    assert dev.msi_cap.data == 0x4021
    assert cfg_read(dev, base + 0xC, 4) == 0x4021  # extended data is RO 0
    cfg_write(dev, base + 0x10, 4, 0xFFFF_FFFF)
    assert cfg_read(dev, base + 0x10, 4) == 0xF  # one mask bit per vector
    cfg_write(dev, base + 0x14, 4, 0xFFFF_FFFF)
    assert cfg_read(dev, base + 0x14, 4) == 0  # pending is RO


def test_msi_cap_32bit_layout() -> None:
    dev = Conventional()
    base = dev.msi_cap.offset
    assert dev.msi_cap.size == 0xA
    assert cfg_read(dev, base + 2, 2) == 0
    cfg_write(dev, base + 8, 2, 0xBEEF)
    assert dev.msi_cap.data == 0xBEEF


def test_msix_cap_fields(dev: Full) -> None:
    base = dev.msix_cap.offset
    assert cfg_read(dev, base + 2, 2) == 7  # table size N-1
    assert cfg_read(dev, base + 4, 4) == 0x1000 | 0
    assert cfg_read(dev, base + 8, 4) == 0x1800 | 0
    cfg_write(dev, base + 2, 2, 0xFFFF)
    assert cfg_read(dev, base + 2, 2) == 0xC007
    assert dev.msix_cap.enabled and dev.msix_cap.function_masked
    cfg_write(dev, base + 4, 4, 0)
    assert cfg_read(dev, base + 4, 4) == 0x1000


async def test_msix_table_is_memory_and_pba_reads_pending(dev: Full, ctx: FakeContext) -> None:
    # Vector control starts masked; the table keeps what the guest writes.
    assert dev.region_read(0, 0x1000 + 12, 4) == (1).to_bytes(4, "little")
    dev.region_write(0, 0x1010, bytes.fromhex("03 10 e0 fe 00 00 00 00 21 43 00 00 00 00 00 00"))
    assert dev.msix_cap.table.entry(1) == (0xFEE0_1000, 0x4321, False)
    assert dev.region_read(0, 0x1800, 8) == bytes(8)  # no client: nothing pending
    ctx.irq.pending_vectors = {(2, 1), (2, 7)}
    dev.attach(ctx)
    assert dev.region_read(0, 0x1800, 8) == ((1 << 1) | (1 << 7)).to_bytes(8, "little")
    dev.region_write(0, 0x1800, bytes(8))
    assert dev.region_read(0, 0x1800, 1) == bytes([0x82])


def test_pcie_cap_fields(dev: Full) -> None:
    base = dev.pcie_cap.offset
    caps = cfg_read(dev, base + 2, 2)
    assert caps & 0xF == 2 and (caps >> 4) & 0xF == 0  # v2, endpoint
    lnkcap = cfg_read(dev, base + 0xC, 4)
    assert lnkcap & 0xF == 1 and (lnkcap >> 4) & 0x3F == 1  # 2.5 GT/s, x1
    lnksta = cfg_read(dev, base + 0x12, 2)
    assert lnksta & 0xF == 1 and (lnksta >> 4) & 0x3F == 1
    assert cfg_read(dev, base + 0x2C, 4) == 0x2  # supported speeds: 2.5 GT/s
    # Device Control: MRRS writable, MPS hardwired to 128 B.
    cfg_write(dev, base + 8, 2, 0x5000 | 0x00E0 | 0xF)
    devctl = cfg_read(dev, base + 8, 2)
    assert devctl & 0x7000 == 0x5000 and devctl & 0xE0 == 0 and devctl & 0xF == 0xF
    assert dev.pcie_cap.max_read_request == 4096
    # Device Status error bits are RW1C.
    dev.config.set_bits(base + 0xA, 2, 0x5, True)
    cfg_write(dev, base + 0xA, 2, 0x1)
    assert cfg_read(dev, base + 0xA, 2) == 0x4
    # Link Status is read-only.
    cfg_write(dev, base + 0x12, 2, 0)
    assert cfg_read(dev, base + 0x12, 2) == lnksta


def test_vendor_cap(dev: Full) -> None:
    base = dev.vendor.offset
    assert cfg_read(dev, base + 2, 1) == 6  # length includes the 3-byte header
    cfg_write(dev, base + 3, 4, 0xFFFFFFFF)
    assert dev.region_read(7, base + 3, 3) == b"\x01\xff\x03"


def test_reset_restores_caps(dev: Full) -> None:
    cfg_write(dev, dev.msi_cap.offset + 2, 2, MsiCap.CTRL_ENABLE)
    cfg_write(dev, dev.msix_cap.offset + 2, 2, MsixCap.CTRL_ENABLE)
    dev.region_write(0, 0x100C, bytes(4))
    dev.reset()
    assert not dev.msi_enabled() and not dev.msix_enabled()
    assert dev.msix_cap.table.entry(0)[2] is True


@settings(max_examples=300, deadline=None)
@given(offset=st.integers(0, 0xFFF), data=st.binary(min_size=1, max_size=8))
def test_arbitrary_config_writes_only_touch_writable_bits(offset: int, data: bytes) -> None:
    dev = Full()
    data = data[: 0x1000 - offset]
    before = dev.config.snapshot()
    dev.region_write(7, offset, data)
    after = dev.config.snapshot()
    for i in range(len(before)):
        fixed = ~(dev.config.wmask[i] | dev.config.w1cmask[i]) & 0xFF
        assert before[i] & fixed == after[i] & fixed, f"byte 0x{i:x} changed"
    assert walk_caps(dev) == [(c.offset, c.cap_id) for c in dev.caps]

"""PCI capabilities as classes, placed automatically and linked by `place_capabilities`.

A capability knows its own register layout (drawn in its docstring), its power-on values and
its write masks; it does not know where it lives until it is placed. Standard capabilities
go after the 64-byte header on dword boundaries, in declaration order, linked through the
next pointers from 0x34; extended capabilities (PCI Express only) start at 0x100 and are
linked through the 12-bit next field of their headers. The Status register's capability-list
bit is set when there is at least one capability.

Capabilities that interrupts depend on (MSI, MSI-X) are driven by `PciDevice`; they only
describe and decode their registers here.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import ClassVar

from .bits import BytesLike, get_le, is_power_of_two, masked_write
from .config import (
    CAPABILITY_LIST,
    HEADER_SIZE,
    PCI_CONFIG_SIZE,
    PCIE_CONFIG_SIZE,
    STATUS,
    ConfigSpace,
    Status,
)


class CapId(enum.IntEnum):
    PM = 0x01
    MSI = 0x05
    VENDOR = 0x09
    PCIE = 0x10
    MSIX = 0x11


class ExtCapId(enum.IntEnum):
    VENDOR = 0x000B


CAP_ID_OFFSET = 0
CAP_NEXT_OFFSET = 1
EXT_CAP_NEXT_SHIFT = 20
EXT_CAP_VERSION_SHIFT = 16
DWORD = 4


class _CapBase:
    """Common plumbing: a capability bound to a config space at a placed offset."""

    #: size in bytes including the header
    size: int = 0

    def __init__(self) -> None:
        self.offset = -1
        self._space: ConfigSpace | None = None

    @property
    def placed(self) -> bool:
        return self._space is not None

    @property
    def space(self) -> ConfigSpace:
        if self._space is None:
            raise RuntimeError(f"{type(self).__name__} has not been placed in config space")
        return self._space

    def _install(self, space: ConfigSpace, offset: int) -> None:
        self._space = space
        self.offset = offset
        self.build()

    def define(self, rel: int, size: int, value: int, wmask: int = 0, w1c: int = 0) -> None:
        """Declare a register at `rel` bytes into the capability (used by `build`)."""
        self.space.define(self.offset + rel, size, value, wmask, w1c)

    def get(self, rel: int, size: int) -> int:
        return self.space.get(self.offset + rel, size)

    def set(self, rel: int, size: int, value: int) -> None:
        self.space.set(self.offset + rel, size, value)

    def build(self) -> None:
        """Define the body registers (everything after the header)."""

    def after_write(self, old: bytes) -> None:
        """A guest write touched this capability; `old` is its bytes before the write.

        Override to undo writes the spec says to ignore (e.g. unsupported power states).
        """


class Capability(_CapBase):
    """A standard capability: 8-bit ID and next pointer, placed below 0x100."""

    cap_id: ClassVar[int]


class ExtendedCapability(_CapBase):
    """A PCI Express extended capability: 32-bit header with 16-bit ID and version."""

    cap_id: ClassVar[int]
    version: ClassVar[int] = 1


def _align(value: int, to: int) -> int:
    return (value + to - 1) & ~(to - 1)


def place_capabilities(
    space: ConfigSpace,
    caps: Sequence[Capability],
    ext_caps: Sequence[ExtendedCapability] = (),
) -> None:
    """Lay out and link capabilities; raises ValueError when they do not fit."""
    pos = HEADER_SIZE
    link = CAPABILITY_LIST
    for cap in caps:
        if cap.placed:
            raise ValueError(f"{type(cap).__name__} is already placed")
        pos = _align(pos, DWORD)
        if pos + cap.size > PCI_CONFIG_SIZE:
            raise ValueError("capabilities do not fit in the 256-byte config space")
        space.set(link, 1, pos)
        space.define(pos + CAP_ID_OFFSET, 1, cap.cap_id)
        space.define(pos + CAP_NEXT_OFFSET, 1, 0)
        cap._install(space, pos)
        link = pos + CAP_NEXT_OFFSET
        pos += cap.size
    space.set_bits(STATUS, 2, Status.CAP_LIST, bool(caps))

    if not ext_caps:
        return
    if space.size < PCIE_CONFIG_SIZE:
        raise ValueError("extended capabilities need a PCI Express capability")
    pos = PCI_CONFIG_SIZE
    prev = -1
    for ecap in ext_caps:
        if ecap.placed:
            raise ValueError(f"{type(ecap).__name__} is already placed")
        pos = _align(pos, DWORD)
        if pos + ecap.size > PCIE_CONFIG_SIZE:
            raise ValueError("extended capabilities do not fit in 4 KiB config space")
        if prev >= 0:
            header = space.get(prev, 4)
            space.set(prev, 4, header | (pos << EXT_CAP_NEXT_SHIFT))
        space.define(pos, 4, ecap.cap_id | (ecap.version << EXT_CAP_VERSION_SHIFT))
        ecap._install(space, pos)
        prev = pos
        pos += ecap.size


# --------------------------------------------------------------------------- PM


class PowerState(enum.IntEnum):
    D0 = 0
    D1 = 1
    D2 = 2
    D3HOT = 3


class PmCap(Capability):
    """Power Management capability (PCI PM 1.2, chapter 3).

    ::

        31                           16 15            8 7             0
       +-------------------------------+---------------+---------------+
       |  PMC (Power Mgmt Capabilities)|   Next Ptr    |  Cap ID 0x01  | +0
       +---------------+---------------+---------------+---------------+
       |     Data      |   PMCSR_BSE   |  PMCSR (Control/Status)       | +4
       +---------------+---------------+-------------------------------+

    PMC (RO): version 3, D1/D2 support, PME support per state. PMCSR: PowerState[1:0] RW
    (writes of unsupported states are ignored, per spec), No_Soft_Reset[3] RO, PME_En[8] RW
    and PME_Status[15] RW1C when PME is supported.
    """

    cap_id = CapId.PM
    size = 8

    PMC = 2
    PMCSR = 4
    PMC_VERSION_1_2 = 3
    PMC_D1 = 1 << 9
    PMC_D2 = 1 << 10
    PMC_PME_SHIFT = 11
    PMCSR_STATE_MASK = 0x3
    PMCSR_NO_SOFT_RESET = 1 << 3
    PMCSR_PME_EN = 1 << 8
    PMCSR_PME_STATUS = 1 << 15

    def __init__(
        self,
        *,
        d1: bool = False,
        d2: bool = False,
        pme_support: int = 0,
        no_soft_reset: bool = True,
    ) -> None:
        super().__init__()
        if pme_support & ~0x1F:
            raise ValueError("pme_support is a 5-bit mask (D0, D1, D2, D3hot, D3cold)")
        self.d1 = d1
        self.d2 = d2
        self.pme_support = pme_support
        self.no_soft_reset = no_soft_reset

    def build(self) -> None:
        pmc = self.PMC_VERSION_1_2 | (self.pme_support << self.PMC_PME_SHIFT)
        pmc |= (self.PMC_D1 if self.d1 else 0) | (self.PMC_D2 if self.d2 else 0)
        self.define(self.PMC, 2, pmc)
        pmcsr = self.PMCSR_NO_SOFT_RESET if self.no_soft_reset else 0
        wmask = self.PMCSR_STATE_MASK | (self.PMCSR_PME_EN if self.pme_support else 0)
        w1c = self.PMCSR_PME_STATUS if self.pme_support else 0
        self.define(self.PMCSR, 2, pmcsr, wmask, w1c)
        self.define(self.PMCSR + 2, 2, 0)

    @property
    def power_state(self) -> PowerState:
        return PowerState(self.get(self.PMCSR, 2) & self.PMCSR_STATE_MASK)

    def after_write(self, old: bytes) -> None:
        supported = {PowerState.D0, PowerState.D3HOT}
        if self.d1:
            supported.add(PowerState.D1)
        if self.d2:
            supported.add(PowerState.D2)
        if self.power_state not in supported:
            old_state = get_le(old, self.PMCSR, 2) & self.PMCSR_STATE_MASK
            value = self.get(self.PMCSR, 2)
            self.set(self.PMCSR, 2, (value & ~self.PMCSR_STATE_MASK) | old_state)


# --------------------------------------------------------------------------- MSI


class MsiCap(Capability):
    """MSI capability (PCI 3.0, 6.8.1), 32- or 64-bit, with optional per-vector masking.

    ::

        31                           16 15            8 7             0
       +-------------------------------+---------------+---------------+
       |       Message Control         |   Next Ptr    |  Cap ID 0x05  | +0
       +-------------------------------+---------------+---------------+
       |                 Message Address [31:2]                    |00 | +4
       +---------------------------------------------------------------+
       |        Message Upper Address [63:32] (64-bit only)            | +8
       +-------------------------------+-------------------------------+
       |       (reserved, RO 0)        |         Message Data          | +8 / +0xc
       +-------------------------------+-------------------------------+
       |                  Mask Bits (per-vector masking only)          | +0xc / +0x10
       +---------------------------------------------------------------+
       |                  Pending Bits (per-vector masking only, RO)   | +0x10 / +0x14
       +---------------------------------------------------------------+

    Message Control: Enable[0] RW, Multiple Message Capable[3:1] RO, Multiple Message
    Enable[6:4] RW, 64-bit[7] RO, Per-vector masking[8] RO.
    """

    cap_id = CapId.MSI

    CONTROL = 2
    ADDRESS_LO = 4
    CTRL_ENABLE = 1 << 0
    CTRL_MMC_SHIFT = 1
    CTRL_MME_SHIFT = 4
    CTRL_MME_MASK = 0x7 << 4
    CTRL_64BIT = 1 << 7
    CTRL_MASKBIT = 1 << 8
    ADDRESS_LO_MASK = 0xFFFF_FFFC
    DATA_MASK = 0xFFFF
    MAX_VECTORS = 32

    def __init__(self, vectors: int = 1, *, addr64: bool = True, per_vector_mask: bool = False):
        super().__init__()
        if not is_power_of_two(vectors) or vectors > self.MAX_VECTORS:
            raise ValueError("MSI vectors must be a power of two up to 32")
        self.vectors = vectors
        self.addr64 = addr64
        self.per_vector_mask = per_vector_mask
        self.data_offset = 0xC if addr64 else 0x8
        self.mask_offset = self.data_offset + 4
        self.pending_offset = self.mask_offset + 4
        if per_vector_mask:
            self.size = self.pending_offset + 4
        else:
            self.size = self.data_offset + 2

    def build(self) -> None:
        ctrl = (self.vectors.bit_length() - 1) << self.CTRL_MMC_SHIFT
        ctrl |= self.CTRL_64BIT if self.addr64 else 0
        ctrl |= self.CTRL_MASKBIT if self.per_vector_mask else 0
        self.define(self.CONTROL, 2, ctrl, self.CTRL_ENABLE | self.CTRL_MME_MASK)
        self.define(self.ADDRESS_LO, 4, 0, self.ADDRESS_LO_MASK)
        if self.addr64:
            self.define(self.ADDRESS_LO + 4, 4, 0, 0xFFFF_FFFF)
        self.define(self.data_offset, 2, 0, self.DATA_MASK)
        if self.per_vector_mask:
            self.define(self.data_offset + 2, 2, 0)
            self.define(self.mask_offset, 4, 0, (1 << self.vectors) - 1)
            self.define(self.pending_offset, 4, 0)

    @property
    def enabled(self) -> bool:
        return bool(self.get(self.CONTROL, 2) & self.CTRL_ENABLE)

    @property
    def enabled_vectors(self) -> int:
        """Vectors the guest allocated (Multiple Message Enable), capped at what we offer."""
        mme = (self.get(self.CONTROL, 2) & self.CTRL_MME_MASK) >> self.CTRL_MME_SHIFT
        return min(1 << mme, self.vectors)

    @property
    def address(self) -> int:
        addr = self.get(self.ADDRESS_LO, 4)
        if self.addr64:
            addr |= self.get(self.ADDRESS_LO + 4, 4) << 32
        return addr

    @property
    def data(self) -> int:
        return self.get(self.data_offset, 2)

    def masked(self, vector: int) -> bool:
        return self.per_vector_mask and bool(self.get(self.mask_offset, 4) >> vector & 1)

    def pending(self, vector: int) -> bool:
        return self.per_vector_mask and bool(self.get(self.pending_offset, 4) >> vector & 1)

    def set_pending(self, vector: int, on: bool) -> None:
        if self.per_vector_mask:
            self.space.set_bits(self.offset + self.pending_offset, 4, 1 << vector, on)


# --------------------------------------------------------------------------- MSI-X


class MsixCap(Capability):
    """MSI-X capability (PCI 3.0, 6.8.2); the device serves its table and PBA in BARs.

    ::

        31                           16 15            8 7             0
       +-------------------------------+---------------+---------------+
       |       Message Control         |   Next Ptr    |  Cap ID 0x11  | +0
       +-------------------------------+---------------+-----------+---+
       |                 Table Offset [31:3]                       |BIR| +4
       +-----------------------------------------------------------+---+
       |                 PBA Offset [31:3]                         |BIR| +8
       +-----------------------------------------------------------+---+

    Message Control: Table Size[10:0] RO (N-1), Function Mask[14] RW, Enable[15] RW.

    Table entry (16 bytes each)::

       +-------------------+-------------------+-------------------+-------------------+
       | Msg Address [31:2]| Msg Upper Address |   Message Data    |  Vector Control   |
       +-------------------+-------------------+-------------------+-------------------+

    The table is plain memory here (QEMU emulates it itself and never forwards table
    accesses; a conforming client may still read it). Masking and pending state belong to
    the engine (SET_IRQS MASK/UNMASK), so PBA reads report `ctx.irq.pending`.
    """

    cap_id = CapId.MSIX
    size = 12

    CONTROL = 2
    TABLE = 4
    PBA = 8
    CTRL_TABLE_SIZE_MASK = 0x7FF
    CTRL_FUNCTION_MASK = 1 << 14
    CTRL_ENABLE = 1 << 15
    BIR_MASK = 0x7
    ENTRY_SIZE = 16
    ENTRY_ADDR_LO = 0
    ENTRY_ADDR_HI = 4
    ENTRY_DATA = 8
    ENTRY_CTRL = 12
    ENTRY_CTRL_MASKED = 1
    MAX_VECTORS = 2048
    QWORD = 8

    def __init__(
        self,
        vectors: int,
        *,
        table_bar: int,
        table_offset: int = 0,
        pba_bar: int | None = None,
        pba_offset: int | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= vectors <= self.MAX_VECTORS:
            raise ValueError("MSI-X vectors must be 1..2048")
        self.vectors = vectors
        self.table_bar = table_bar
        self.table_offset = table_offset
        self.table_size = vectors * self.ENTRY_SIZE
        self.pba_bar = table_bar if pba_bar is None else pba_bar
        if pba_offset is None:
            pba_offset = table_offset + self.table_size if self.pba_bar == table_bar else 0
        self.pba_offset = pba_offset
        self.pba_size = _align(vectors, 64) // 8
        if table_offset % self.QWORD or pba_offset % self.QWORD:
            raise ValueError("MSI-X table and PBA offsets must be 8-byte aligned")
        if self.pba_bar == table_bar and (
            pba_offset < table_offset + self.table_size
            and table_offset < pba_offset + self.pba_size
        ):
            raise ValueError("MSI-X table and PBA overlap")
        self.table = MsixTable(vectors)
        #: set by PciDevice: where PBA reads get pending bits from
        self.pending_source: Callable[[int], bool] = lambda vector: False
        self.pba = MsixPba(self)

    def build(self) -> None:
        ctrl = self.vectors - 1
        self.define(self.CONTROL, 2, ctrl, self.CTRL_FUNCTION_MASK | self.CTRL_ENABLE)
        self.define(self.TABLE, 4, self.table_offset | self.table_bar)
        self.define(self.PBA, 4, self.pba_offset | self.pba_bar)

    @property
    def enabled(self) -> bool:
        return bool(self.get(self.CONTROL, 2) & self.CTRL_ENABLE)

    @property
    def function_masked(self) -> bool:
        return bool(self.get(self.CONTROL, 2) & self.CTRL_FUNCTION_MASK)


class MsixTable:
    """The MSI-X table as plain memory with the spec's per-field write masks."""

    def __init__(self, vectors: int) -> None:
        entry = MsixCap.ENTRY_SIZE
        self.size = vectors * entry
        self._data = bytearray(self.size)
        self._wmask = bytearray(self.size)
        self._w1c = bytes(self.size)
        for v in range(vectors):
            base = v * entry
            self._wmask[base : base + entry] = (
                (0xFFFF_FFFC).to_bytes(4, "little")
                + (0xFFFF_FFFF).to_bytes(4, "little")
                + (0xFFFF_FFFF).to_bytes(4, "little")
                + MsixCap.ENTRY_CTRL_MASKED.to_bytes(4, "little")
            )
        self.reset()

    def reset(self) -> None:
        """Power-on state: every vector masked, everything else 0 (PCI 3.0 6.8.2.9)."""
        self._data[:] = bytes(self.size)
        for base in range(0, self.size, MsixCap.ENTRY_SIZE):
            self._data[base + MsixCap.ENTRY_CTRL] = MsixCap.ENTRY_CTRL_MASKED

    def entry(self, vector: int) -> tuple[int, int, bool]:
        """(address, data, masked) of one vector."""
        base = vector * MsixCap.ENTRY_SIZE
        addr = get_le(self._data, base + MsixCap.ENTRY_ADDR_LO, 8)
        data = get_le(self._data, base + MsixCap.ENTRY_DATA, 4)
        ctrl = get_le(self._data, base + MsixCap.ENTRY_CTRL, 4)
        return addr, data, bool(ctrl & MsixCap.ENTRY_CTRL_MASKED)

    def read(self, offset: int, count: int) -> bytes:
        return bytes(self._data[offset : offset + count])

    def write(self, offset: int, data: BytesLike) -> None:
        masked_write(self._data, self._wmask, self._w1c, offset, data)


class MsixPba:
    """The Pending Bit Array: read-only, built from the engine's pending state."""

    def __init__(self, cap: MsixCap) -> None:
        self.cap = cap
        self.size = cap.pba_size

    def read(self, offset: int, count: int) -> bytes:
        bits = 0
        for vector in range(self.cap.vectors):
            if self.cap.pending_source(vector):
                bits |= 1 << vector
        image = bits.to_bytes(self.size, "little")
        return image[offset : offset + count]

    def write(self, offset: int, data: BytesLike) -> None:
        """The PBA is read-only; writes are ignored."""


# --------------------------------------------------------------------------- PCIe


class PcieDeviceType(enum.IntEnum):
    ENDPOINT = 0x0
    LEGACY_ENDPOINT = 0x1
    RC_INTEGRATED_ENDPOINT = 0x9


class PcieCap(Capability):
    """PCI Express capability, version 2, for an endpoint on a Gen1 x1 link (PCIe 3.0 7.8).

    ::

        31                           16 15            8 7             0
       +-------------------------------+---------------+---------------+
       |   PCI Express Capabilities    |   Next Ptr    |  Cap ID 0x10  | +0x00
       +-------------------------------+---------------+---------------+
       |                     Device Capabilities                       | +0x04
       +-------------------------------+-------------------------------+
       |        Device Status          |        Device Control         | +0x08
       +-------------------------------+-------------------------------+
       |                      Link Capabilities                        | +0x0c
       +-------------------------------+-------------------------------+
       |         Link Status           |         Link Control          | +0x10
       +-------------------------------+-------------------------------+
       |   Slot Cap / Slot Ctl+Sta / Root Ctl+Cap / Root Status (0)    | +0x14..+0x23
       +---------------------------------------------------------------+
       |                     Device Capabilities 2                     | +0x24
       +-------------------------------+-------------------------------+
       |        Device Status 2        |       Device Control 2        | +0x28
       +-------------------------------+-------------------------------+
       |                      Link Capabilities 2                      | +0x2c
       +-------------------------------+-------------------------------+
       |        Link Status 2          |        Link Control 2         | +0x30
       +-------------------------------+-------------------------------+
       |             Slot Capabilities 2 / Control 2 / Status 2 (0)    | +0x34..+0x3b
       +---------------------------------------------------------------+

    Writable: Device Control error-reporting enables, relaxed ordering, Max_Payload_Size
    (only 128 B is supported, so only 000b sticks), no-snoop and Max_Read_Request_Size; the
    Device Status error bits are RW1C; Link Control ASPM control, RCB, common clock and
    extended synch. Link fields report 2.5 GT/s x1, trained. FLR is not offered.
    """

    cap_id = CapId.PCIE
    size = 0x3C

    CAPS = 0x02
    DEVCAP = 0x04
    DEVCTL = 0x08
    DEVSTA = 0x0A
    LNKCAP = 0x0C
    LNKCTL = 0x10
    LNKSTA = 0x12
    DEVCAP2 = 0x24
    DEVCTL2 = 0x28
    LNKCAP2 = 0x2C
    LNKCTL2 = 0x30
    LNKSTA2 = 0x32

    CAPS_VERSION_2 = 0x2
    CAPS_TYPE_SHIFT = 4
    DEVCAP_L0S_NO_LIMIT = 0x7 << 6
    DEVCAP_L1_NO_LIMIT = 0x7 << 9
    DEVCAP_RBER = 1 << 15
    DEVCTL_ERR_ENABLES = 0xF
    DEVCTL_RELAXED_ORDERING = 1 << 4
    DEVCTL_NO_SNOOP = 1 << 11
    DEVCTL_MRRS_MASK = 0x7 << 12
    DEVCTL_MRRS_512 = 0x2 << 12
    DEVSTA_ERRORS = 0xF
    LINK_SPEED_2_5GT = 0x1
    LINK_WIDTH_SHIFT = 4
    LINK_WIDTH_X1 = 1 << 4
    LNKCAP_ASPM_COMPLIANCE = 1 << 22
    LNKCTL_ASPM = 0x3
    LNKCTL_RCB = 1 << 3
    LNKCTL_COMMON_CLOCK = 1 << 6
    LNKCTL_EXT_SYNCH = 1 << 7
    LNKCAP2_SPEEDS_2_5GT = 1 << 1

    def __init__(self, device_type: PcieDeviceType = PcieDeviceType.ENDPOINT) -> None:
        super().__init__()
        self.device_type = device_type

    def build(self) -> None:
        self.define(self.CAPS, 2, self.CAPS_VERSION_2 | (self.device_type << self.CAPS_TYPE_SHIFT))
        self.define(self.DEVCAP, 4, self.DEVCAP_L0S_NO_LIMIT | self.DEVCAP_L1_NO_LIMIT
                    | self.DEVCAP_RBER)
        self.define(
            self.DEVCTL,
            2,
            self.DEVCTL_RELAXED_ORDERING | self.DEVCTL_NO_SNOOP | self.DEVCTL_MRRS_512,
            self.DEVCTL_ERR_ENABLES | self.DEVCTL_RELAXED_ORDERING | self.DEVCTL_NO_SNOOP
            | self.DEVCTL_MRRS_MASK,
        )
        self.define(self.DEVSTA, 2, 0, w1c=self.DEVSTA_ERRORS)
        self.define(self.LNKCAP, 4, self.LINK_SPEED_2_5GT | self.LINK_WIDTH_X1
                    | self.LNKCAP_ASPM_COMPLIANCE)
        self.define(
            self.LNKCTL,
            2,
            0,
            self.LNKCTL_ASPM | self.LNKCTL_RCB | self.LNKCTL_COMMON_CLOCK | self.LNKCTL_EXT_SYNCH,
        )
        self.define(self.LNKSTA, 2, self.LINK_SPEED_2_5GT | self.LINK_WIDTH_X1)
        self.define(self.LNKCAP2, 4, self.LNKCAP2_SPEEDS_2_5GT)
        self.define(self.LNKCTL2, 2, self.LINK_SPEED_2_5GT)

    @property
    def max_read_request(self) -> int:
        """Max_Read_Request_Size in bytes as programmed by the guest."""
        return 128 << ((self.get(self.DEVCTL, 2) & self.DEVCTL_MRRS_MASK) >> 12)


# --------------------------------------------------------------------------- vendor


class VendorCap(Capability):
    """Vendor-specific capability (PCI 3.0, 6.7): free-form bytes after a length byte.

    ::

        31            24 23           16 15            8 7             0
       +----------------+---------------+---------------+---------------+
       |   payload[0]   |    Length     |   Next Ptr    |  Cap ID 0x09  | +0
       +----------------+---------------+---------------+---------------+
       |                       payload[1..]                             | +4
       +----------------------------------------------------------------+

    The payload is read-only unless `wmask` (one mask byte per payload byte) says otherwise.
    """

    cap_id = CapId.VENDOR
    LENGTH = 2
    PAYLOAD = 3

    def __init__(self, payload: bytes, wmask: bytes | None = None) -> None:
        super().__init__()
        if wmask is not None and len(wmask) != len(payload):
            raise ValueError("wmask must have one byte per payload byte")
        self.payload = payload
        self.wmask = wmask or bytes(len(payload))
        self.size = self.PAYLOAD + len(payload)
        if self.size > 0xFF:
            raise ValueError("vendor capability longer than 255 bytes")

    def build(self) -> None:
        self.define(self.LENGTH, 1, self.size)
        for i, (value, mask) in enumerate(zip(self.payload, self.wmask, strict=True)):
            self.define(self.PAYLOAD + i, 1, value, mask)


class VendorExtCap(ExtendedCapability):
    """Vendor-Specific Extended Capability (PCIe 3.0, 7.19).

    ::

        31              20 19    16 15                                 0
       +------------------+--------+-----------------------------------+
       |   Next Offset    |  Ver 1 |   Extended Cap ID 0x000B          | +0
       +------------------+--------+-----------------------------------+
       |   VSEC Length    |VSEC Rev|           VSEC ID                 | +4
       +------------------+--------+-----------------------------------+
       |                    payload (read-only)                         | +8
       +----------------------------------------------------------------+
    """

    cap_id = ExtCapId.VENDOR
    VSEC_HEADER = 4
    PAYLOAD = 8
    VSEC_REV_SHIFT = 16
    VSEC_LEN_SHIFT = 20
    MAX_LENGTH = 0xFFF

    def __init__(self, vsec_id: int, payload: bytes, vsec_rev: int = 0) -> None:
        super().__init__()
        self.vsec_id = vsec_id
        self.vsec_rev = vsec_rev
        self.payload = payload
        self.size = self.PAYLOAD + _align(len(payload), DWORD)
        if self.size > self.MAX_LENGTH:
            raise ValueError("VSEC too long")

    def build(self) -> None:
        header = (
            self.vsec_id
            | (self.vsec_rev << self.VSEC_REV_SHIFT)
            | ((self.PAYLOAD + len(self.payload)) << self.VSEC_LEN_SHIFT)
        )
        self.define(self.VSEC_HEADER, 4, header)
        for i, value in enumerate(self.payload):
            self.define(self.PAYLOAD + i, 1, value)

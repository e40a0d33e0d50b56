"""The catalogue of PCI capabilities a model can declare (every one importable from here).

Defined here: Power Management, PCI Express and the vendor-specific ones. The base classes
and the placement live in `capability`, MSI and MSI-X in `msi`; a model needs only this
module (or `devices.sdk`).
"""

from __future__ import annotations

import enum

from .bits import get_le
from .capability import (
    DWORD,
    Capability,
    CapId,
    ExtCapId,
    ExtendedCapability,
    align_up,
    place_capabilities,
)
from .msi import MsiCap, MsixCap, MsixPba, MsixTable

__all__ = [
    "CapId",
    "Capability",
    "ExtCapId",
    "ExtendedCapability",
    "MsiCap",
    "MsixCap",
    "MsixPba",
    "MsixTable",
    "PcieCap",
    "PcieDeviceType",
    "PmCap",
    "PowerState",
    "VendorCap",
    "VendorExtCap",
    "place_capabilities",
]

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
        self.size = self.PAYLOAD + align_up(len(payload), DWORD)
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


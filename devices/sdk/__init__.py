"""Device-model SDK: declare a PCI device, get config space, BARs, capabilities and IRQs.

The engine-facing contract lives in `interface`; everything else here helps a model
implement it from declarations (see `pci.PciDevice`).
"""

from .bars import Bar, BarHandler, BarKind, CallbackHandler, Rom, SharedMemory, Trap
from .caps import (
    Capability,
    CapId,
    ExtCapId,
    ExtendedCapability,
    MsiCap,
    MsixCap,
    PcieCap,
    PcieDeviceType,
    PmCap,
    PowerState,
    VendorCap,
    VendorExtCap,
)
from .config import Command, ConfigSpace, Status
from .interface import (
    DeviceContext,
    DeviceError,
    DeviceModel,
    DmaError,
    IrqIndex,
    OptionSpec,
    RegionIndex,
)
from .pci import INTA, INTX_NONE, PciDevice, PciIdentity
from .regs import Access, Field, Register, RegisterBank

__all__ = [
    "INTA",
    "INTX_NONE",
    "Access",
    "Bar",
    "BarHandler",
    "BarKind",
    "CallbackHandler",
    "CapId",
    "Capability",
    "Command",
    "ConfigSpace",
    "DeviceContext",
    "DeviceError",
    "DeviceModel",
    "DmaError",
    "ExtCapId",
    "ExtendedCapability",
    "Field",
    "IrqIndex",
    "MsiCap",
    "MsixCap",
    "OptionSpec",
    "PciDevice",
    "PciIdentity",
    "PcieCap",
    "PcieDeviceType",
    "PmCap",
    "PowerState",
    "RegionIndex",
    "Register",
    "RegisterBank",
    "Rom",
    "SharedMemory",
    "Status",
    "Trap",
    "VendorCap",
    "VendorExtCap",
]

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
    StateError,
)
from .options import Size, SizeList
from .pci import INTA, INTX_NONE, PciDevice, PciIdentity
from .regs import Access, Field, Register, RegisterBank
from .state import (
    Apply,
    Bank,
    Blob,
    Flag,
    Record,
    StateField,
    UInt,
    Value,
    pack_state,
    unpack_state,
)

__all__ = [
    "INTA",
    "INTX_NONE",
    "Access",
    "Apply",
    "Bank",
    "Bar",
    "BarHandler",
    "BarKind",
    "Blob",
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
    "Flag",
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
    "Record",
    "RegionIndex",
    "Register",
    "RegisterBank",
    "Rom",
    "SharedMemory",
    "Size",
    "SizeList",
    "StateError",
    "StateField",
    "Status",
    "Trap",
    "UInt",
    "Value",
    "VendorCap",
    "VendorExtCap",
    "pack_state",
    "unpack_state",
]

"""PCI configuration space: storage with per-byte masks, and the type-0 header layout.

`ConfigSpace` is plain bytes plus two masks (writable, write-1-to-clear). Everything the
guest can change is expressed as masks, which is how BAR sizing works without special
cases: a BAR's writable mask covers only its address bits above the size, so writing all
ones reads back the size mask with the read-only type bits underneath (the same trick QEMU
uses in `pci_register_bar`).

Type-0 header (PCI Local Bus 3.0, 6.1)::

    31            24 23            16 15             8 7              0
   +----------------+----------------+----------------+----------------+
   |           Device ID             |           Vendor ID             | 0x00
   +----------------+----------------+----------------+----------------+
   |             Status              |            Command              | 0x04
   +----------------+----------------+----------------+----------------+
   |              Class Code                          |  Revision ID   | 0x08
   +----------------+----------------+----------------+----------------+
   |      BIST      |  Header Type   | Latency Timer  |Cache Line Size | 0x0c
   +----------------+----------------+----------------+----------------+
   |                 Base Address Registers 0-5                        | 0x10-0x24
   +----------------+----------------+----------------+----------------+
   |                      Cardbus CIS Pointer                          | 0x28
   +----------------+----------------+----------------+----------------+
   |          Subsystem ID           |      Subsystem Vendor ID        | 0x2c
   +----------------+----------------+----------------+----------------+
   |                  Expansion ROM Base Address                       | 0x30
   +----------------+----------------+----------------+----------------+
   |                     Reserved                     |  Cap. Pointer  | 0x34
   +----------------+----------------+----------------+----------------+
   |                            Reserved                               | 0x38
   +----------------+----------------+----------------+----------------+
   |    Max_Lat     |    Min_Gnt     | Interrupt Pin  | Interrupt Line | 0x3c
   +----------------+----------------+----------------+----------------+
"""

from __future__ import annotations

import enum

from .bits import get_le, masked_write, set_le

# Header register offsets.
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_PROG_IF = 0x09
CLASS_CODE = 0x09  # 24 bits: prog-if, subclass, base class
CACHE_LINE_SIZE = 0x0C
LATENCY_TIMER = 0x0D
HEADER_TYPE = 0x0E
BIST = 0x0F
BAR0 = 0x10
BAR_STRIDE = 4
NUM_BARS = 6
CARDBUS_CIS = 0x28
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
ROM_ADDRESS = 0x30
CAPABILITY_LIST = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D
MIN_GNT = 0x3E
MAX_LAT = 0x3F

#: End of the type-0 header; standard capabilities start here.
HEADER_SIZE = 0x40
#: Size of conventional config space; PCI Express extended capabilities start here.
PCI_CONFIG_SIZE = 0x100
#: Size of PCI Express config space.
PCIE_CONFIG_SIZE = 0x1000

HEADER_TYPE_NORMAL = 0x00


class Command(enum.IntFlag):
    """Command register bits (PCI 3.0 6.2.2)."""

    IO = 1 << 0
    MEMORY = 1 << 1
    MASTER = 1 << 2
    SPECIAL = 1 << 3
    INVALIDATE = 1 << 4
    VGA_PALETTE = 1 << 5
    PARITY = 1 << 6
    SERR = 1 << 8
    FAST_BACK = 1 << 9
    INTX_DISABLE = 1 << 10


class Status(enum.IntFlag):
    """Status register bits (PCI 3.0 6.2.3)."""

    INTERRUPT = 1 << 3
    CAP_LIST = 1 << 4
    MHZ66 = 1 << 5
    FAST_BACK = 1 << 7
    MASTER_DATA_PARITY = 1 << 8
    DEVSEL_MASK = 3 << 9
    SIG_TARGET_ABORT = 1 << 11
    REC_TARGET_ABORT = 1 << 12
    REC_MASTER_ABORT = 1 << 13
    SIG_SYSTEM_ERROR = 1 << 14
    DETECTED_PARITY = 1 << 15


#: Status bits the guest clears by writing 1 (the error-reporting bits).
STATUS_RW1C = (
    Status.MASTER_DATA_PARITY
    | Status.SIG_TARGET_ABORT
    | Status.REC_TARGET_ABORT
    | Status.REC_MASTER_ABORT
    | Status.SIG_SYSTEM_ERROR
    | Status.DETECTED_PARITY
)

# BAR low bits (PCI 3.0 6.2.5.1).
BAR_SPACE_IO = 0x1
BAR_MEM_TYPE_64 = 0x4
BAR_MEM_PREFETCH = 0x8
BAR_MEM_ADDR_MASK = 0xFFFF_FFF0
BAR_IO_ADDR_MASK = 0xFFFF_FFFC
ROM_ENABLE = 0x1
ROM_ADDR_MASK = 0xFFFF_F800
#: Smallest decodable sizes: 16 bytes of memory, 4 of I/O, 2 KiB of ROM.
BAR_MEM_MIN_SIZE = 16
BAR_IO_MIN_SIZE = 4
ROM_MIN_SIZE = 0x800


class ConfigSpace:
    """Config-space bytes with per-byte writable and write-1-to-clear masks.

    Device-side code uses `get`/`set` (no masks: hardware may change read-only bits);
    guest accesses go through `read`/`write`.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.data = bytearray(size)
        self.wmask = bytearray(size)
        self.w1cmask = bytearray(size)

    def define(self, offset: int, size: int, value: int, wmask: int = 0, w1c: int = 0) -> None:
        """Set a field's power-on value and its masks in one go."""
        if wmask & w1c:
            raise ValueError(f"config 0x{offset:x}: a bit cannot be both RW and RW1C")
        set_le(self.data, offset, size, value)
        set_le(self.wmask, offset, size, wmask)
        set_le(self.w1cmask, offset, size, w1c)

    def get(self, offset: int, size: int) -> int:
        return get_le(self.data, offset, size)

    def set(self, offset: int, size: int, value: int) -> None:
        set_le(self.data, offset, size, value)

    def set_bits(self, offset: int, size: int, bits: int, on: bool) -> None:
        value = self.get(offset, size)
        self.set(offset, size, value | bits if on else value & ~bits)

    def read(self, offset: int, count: int) -> bytes:
        if offset < 0 or offset + count > self.size:
            raise ValueError(f"config read 0x{offset:x}+{count} outside 0x{self.size:x}")
        return bytes(self.data[offset : offset + count])

    def write(self, offset: int, data: bytes) -> None:
        if offset < 0 or offset + len(data) > self.size:
            raise ValueError(f"config write 0x{offset:x}+{len(data)} outside 0x{self.size:x}")
        masked_write(self.data, self.wmask, self.w1cmask, offset, data)

    def snapshot(self) -> bytes:
        return bytes(self.data)

    def restore(self, image: bytes) -> None:
        self.data[:] = image

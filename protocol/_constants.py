"""Numbers of the vfio-user wire format (QEMU docs/interop/vfio-user.rst, linux/vfio.h).

Every flag and command lives here as an enum so that no call site masks bits with a literal.
"""

from __future__ import annotations

import enum

#: Size of the header that starts every message.
HEADER_SIZE = 16

#: Largest message accepted before VERSION completes (the VERSION exchange itself), header
#: included. QEMU's VERSION is about 200 bytes; without a bound, a peer could make us buffer
#: and parse up to max_data_xfer_size of JSON before any capability was agreed.
MAX_VERSION_SIZE = 4096

#: Protocol version we speak (the spec's current one; QEMU proposes 0.0).
PROTOCOL_MAJOR = 0
PROTOCOL_MINOR = 0


class Command(enum.IntEnum):
    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    #: retired (migration v1 dirty pages); rejected as unknown
    DIRTY_PAGES = 14
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


class HeaderFlags(enum.IntFlag):
    TYPE_COMMAND = 0x0
    TYPE_REPLY = 0x1
    TYPE_MASK = 0xF
    NO_REPLY = 0x10
    ERROR = 0x20


#: bits of the header flags field the spec defines; others must be zero
HEADER_FLAGS_KNOWN = HeaderFlags.TYPE_MASK | HeaderFlags.NO_REPLY | HeaderFlags.ERROR


class DmaMapFlags(enum.IntFlag):
    READ = 1 << 0
    WRITE = 1 << 1


class DmaUnmapFlags(enum.IntFlag):
    #: legacy migration v1: reply carries a dirty bitmap
    GET_DIRTY_BITMAP = 1 << 0
    #: unmap every window (address = size = 0); what QEMU sends
    ALL = 1 << 1


class DeviceFlags(enum.IntFlag):
    RESET = 1 << 0
    PCI = 1 << 1


class RegionFlags(enum.IntFlag):
    READ = 1 << 0
    WRITE = 1 << 1
    MMAP = 1 << 2
    CAPS = 1 << 3


class RegionCapId(enum.IntEnum):
    SPARSE_MMAP = 1
    TYPE = 2


class IrqInfoFlags(enum.IntFlag):
    EVENTFD = 1 << 0
    MASKABLE = 1 << 1
    AUTOMASKED = 1 << 2
    NORESIZE = 1 << 3


class IrqSetFlags(enum.IntFlag):
    DATA_NONE = 1 << 0
    DATA_BOOL = 1 << 1
    DATA_EVENTFD = 1 << 2
    ACTION_MASK = 1 << 3
    ACTION_UNMASK = 1 << 4
    ACTION_TRIGGER = 1 << 5


IRQ_SET_DATA_MASK = IrqSetFlags.DATA_NONE | IrqSetFlags.DATA_BOOL | IrqSetFlags.DATA_EVENTFD
IRQ_SET_ACTION_MASK = (
    IrqSetFlags.ACTION_MASK | IrqSetFlags.ACTION_UNMASK | IrqSetFlags.ACTION_TRIGGER
)


class FeatureFlags(enum.IntFlag):
    MASK = 0xFFFF
    GET = 1 << 16
    SET = 1 << 17
    PROBE = 1 << 18


class Feature(enum.IntEnum):
    MIGRATION = 1
    MIG_DEVICE_STATE = 2
    DMA_LOGGING_START = 6
    DMA_LOGGING_STOP = 7
    DMA_LOGGING_REPORT = 8


class MigrationFlags(enum.IntFlag):
    STOP_COPY = 1 << 0
    P2P = 1 << 1
    PRE_COPY = 1 << 2


class IoFdType(enum.IntEnum):
    IOEVENTFD = 0
    IOREGIONFD = 1

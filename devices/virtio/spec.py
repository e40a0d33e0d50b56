"""virtio 1.2 numbers for the modern PCI transport (4.1): IDs, feature and status bits,
capability types, the BAR layout we use and the common configuration's field offsets.

Written once here so the transport (`transport`) reads as behaviour and the tests can name
the same offsets the driver uses.

Common configuration (4.1.4.3)::

    0x00 device_feature_select  le32 RW     0x16 queue_select       le16 RW
    0x04 device_feature         le32 RO     0x18 queue_size         le16 RW
    0x08 driver_feature_select  le32 RW     0x1a queue_msix_vector  le16 RW
    0x0c driver_feature         le32 RW     0x1c queue_enable       le16 RW
    0x10 config_msix_vector     le16 RW     0x1e queue_notify_off   le16 RO
    0x12 num_queues             le16 RO     0x20 queue_desc         le64 RW
    0x14 device_status          u8   RW     0x28 queue_driver       le64 RW
    0x15 config_generation      u8   RO     0x30 queue_device       le64 RW
"""

from __future__ import annotations

import enum

from devices.sdk.caps import VendorCap

VENDOR_ID_REDHAT_QUMRANET = 0x1AF4
#: modern (non-transitional) PCI device IDs are 0x1040 + the virtio device ID
MODERN_DEVICE_ID_BASE = 0x1040
MODERN_REVISION = 1
NO_VECTOR = 0xFFFF


class Feature(enum.IntFlag):
    """Device-independent feature bits (virtio 1.2, 6)."""

    RING_INDIRECT_DESC = 1 << 28
    RING_EVENT_IDX = 1 << 29
    VERSION_1 = 1 << 32
    ACCESS_PLATFORM = 1 << 33


class Status(enum.IntFlag):
    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 64
    FAILED = 128


class CfgType(enum.IntEnum):
    COMMON = 1
    NOTIFY = 2
    ISR = 3
    DEVICE = 4
    PCI = 5


class Isr(enum.IntFlag):
    QUEUE = 1
    CONFIG = 2


MSIX_BAR = 1
MSIX_PBA_OFFSET = 0x800
MSIX_BAR_SIZE = 0x1000
VIRTIO_BAR = 4
VIRTIO_BAR_SIZE = 0x4000
COMMON_OFFSET = 0x0000
ISR_OFFSET = 0x1000
DEVICE_OFFSET = 0x2000
NOTIFY_OFFSET = 0x3000
REGION_SIZE = 0x1000
NOTIFY_MULTIPLIER = 4
COMMON_SIZE = 0x38

# common configuration offsets
DEVICE_FEATURE_SELECT = 0x00
DEVICE_FEATURE = 0x04
DRIVER_FEATURE_SELECT = 0x08
DRIVER_FEATURE = 0x0C
CONFIG_MSIX_VECTOR = 0x10
NUM_QUEUES = 0x12
DEVICE_STATUS = 0x14
CONFIG_GENERATION = 0x15
QUEUE_SELECT = 0x16
QUEUE_SIZE = 0x18
QUEUE_MSIX_VECTOR = 0x1A
QUEUE_ENABLE = 0x1C
QUEUE_NOTIFY_OFF = 0x1E
QUEUE_DESC = 0x20
QUEUE_DRIVER = 0x28
QUEUE_DEVICE = 0x30

#: the transport features every device offers
TRANSPORT_FEATURES = Feature.VERSION_1 | Feature.RING_EVENT_IDX | Feature.RING_INDIRECT_DESC


def virtio_cap(cfg_type: CfgType, bar: int, offset: int, length: int,
               extra: bytes = b"") -> VendorCap:
    """struct virtio_pci_cap (4.1.4) as a vendor capability::

        +--------+--------+--------+---------+
        |cap_vndr|cap_next|cap_len |cfg_type |   payload starts at cfg_type
        +--------+--------+--------+---------+
        |  bar   |   id   |   padding[2]     |
        +--------+--------+------------------+
        |             offset (le32)          |
        +------------------------------------+
        |             length (le32)          |
        +------------------------------------+
        |   notify_off_multiplier (NOTIFY)   |
        +------------------------------------+
    """
    payload = (bytes([cfg_type, bar, 0, 0, 0]) + offset.to_bytes(4, "little")
               + length.to_bytes(4, "little") + extra)
    return VendorCap(payload)

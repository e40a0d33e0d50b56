"""protocol/_constants.py: every number against the spec and linux/vfio.h."""

from __future__ import annotations

from protocol import (
    HEADER_SIZE,
    IRQ_SET_ACTION_MASK,
    IRQ_SET_DATA_MASK,
    PROTOCOL_MAJOR,
    PROTOCOL_MINOR,
    Command,
    DeviceFlags,
    DmaMapFlags,
    DmaUnmapFlags,
    Feature,
    FeatureFlags,
    HeaderFlags,
    IoFdType,
    IrqInfoFlags,
    IrqSetFlags,
    MigrationFlags,
    RegionCapId,
    RegionFlags,
)


def test_commands() -> None:
    assert {c.name: c.value for c in Command} == {
        "VERSION": 1, "DMA_MAP": 2, "DMA_UNMAP": 3, "DEVICE_GET_INFO": 4,
        "DEVICE_GET_REGION_INFO": 5, "DEVICE_GET_REGION_IO_FDS": 6, "DEVICE_GET_IRQ_INFO": 7,
        "DEVICE_SET_IRQS": 8, "REGION_READ": 9, "REGION_WRITE": 10, "DMA_READ": 11,
        "DMA_WRITE": 12, "DEVICE_RESET": 13, "DIRTY_PAGES": 14, "REGION_WRITE_MULTI": 15,
        "DEVICE_FEATURE": 16, "MIG_DATA_READ": 17, "MIG_DATA_WRITE": 18,
    }


def test_header() -> None:
    assert HEADER_SIZE == 16
    assert (PROTOCOL_MAJOR, PROTOCOL_MINOR) == (0, 0)
    assert HeaderFlags.TYPE_COMMAND == 0 and HeaderFlags.TYPE_REPLY == 1
    assert HeaderFlags.TYPE_MASK == 0xF  # bits 0-3
    assert HeaderFlags.NO_REPLY == 1 << 4 and HeaderFlags.ERROR == 1 << 5


def test_flag_bits() -> None:
    assert (DmaMapFlags.READ, DmaMapFlags.WRITE) == (1, 2)
    assert (DmaUnmapFlags.GET_DIRTY_BITMAP, DmaUnmapFlags.ALL) == (1, 2)
    assert (DeviceFlags.RESET, DeviceFlags.PCI) == (1, 2)
    assert [int(f) for f in (RegionFlags.READ, RegionFlags.WRITE, RegionFlags.MMAP,
                             RegionFlags.CAPS)] == [1, 2, 4, 8]
    assert (RegionCapId.SPARSE_MMAP, RegionCapId.TYPE) == (1, 2)
    assert [int(f) for f in (IrqInfoFlags.EVENTFD, IrqInfoFlags.MASKABLE,
                             IrqInfoFlags.AUTOMASKED, IrqInfoFlags.NORESIZE)] == [1, 2, 4, 8]
    assert [int(f) for f in IrqSetFlags] == [1, 2, 4, 8, 16, 32]
    assert IRQ_SET_DATA_MASK == 0x7 and IRQ_SET_ACTION_MASK == 0x38
    assert FeatureFlags.MASK == 0xFFFF
    assert (FeatureFlags.GET, FeatureFlags.SET, FeatureFlags.PROBE) == (1 << 16, 1 << 17, 1 << 18)
    assert [int(f) for f in Feature] == [1, 2, 6, 7, 8]
    assert [int(f) for f in MigrationFlags] == [1, 2, 4]
    assert (IoFdType.IOEVENTFD, IoFdType.IOREGIONFD) == (0, 1)

"""Config-space access the way a guest (Linux, QEMU's vfio) does it."""

from __future__ import annotations

from devices.sdk.interface import DeviceModel, RegionIndex

CFG = RegionIndex.CONFIG
CAP_PTR = 0x34
CAP_TTL = 48
EXT_START = 0x100


def cfg_read(dev: DeviceModel, offset: int, size: int) -> int:
    return int.from_bytes(dev.region_read(CFG, offset, size), "little")


def cfg_write(dev: DeviceModel, offset: int, size: int, value: int) -> None:
    dev.region_write(CFG, offset, value.to_bytes(size, "little"))


def walk_caps(dev: DeviceModel) -> list[tuple[int, int]]:
    """(offset, id) pairs, following Linux's __pci_find_next_cap_ttl."""
    found: list[tuple[int, int]] = []
    pos = cfg_read(dev, CAP_PTR, 1)
    ttl = CAP_TTL
    while ttl:
        ttl -= 1
        if pos < 0x40:
            break
        pos &= ~3
        ent = cfg_read(dev, pos, 2)
        cap_id = ent & 0xFF
        if cap_id == 0xFF:
            break
        found.append((pos, cap_id))
        pos = ent >> 8
    return found


def walk_ext_caps(dev: DeviceModel) -> list[tuple[int, int, int]]:
    """(offset, id, version) triples, following Linux's pci_find_next_ext_capability."""
    found: list[tuple[int, int, int]] = []
    pos = EXT_START
    ttl = (0x1000 - 0x100) // 8
    header = cfg_read(dev, pos, 4)
    if header in (0, 0xFFFF_FFFF):
        return found
    while ttl > 0:
        ttl -= 1
        found.append((pos, header & 0xFFFF, (header >> 16) & 0xF))
        pos = (header >> 20) & 0xFFC
        if pos < EXT_START:
            break
        header = cfg_read(dev, pos, 4)
    return found

"""Identify and log page data structures, built as bytes from plain parameters.

Pure functions, so the layouts (which Linux parses field by field) are testable without a
controller. Offsets follow NVMe 1.4 figures 247 (controller), 249 (namespace), 245/246
(descriptor list), 194-196 (error, SMART, firmware slot logs).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from .spec import CQES_LOG2, SQES_LOG2, VERSION_1_4

IDENTIFY_SIZE = 4096
ERROR_LOG_ENTRY_SIZE = 64
SMART_LOG_SIZE = 512
FW_SLOT_LOG_SIZE = 512

# Identify Controller offsets
_C_VID, _C_SSVID, _C_SN, _C_MN, _C_FR = 0, 2, 4, 24, 64
_C_RAB, _C_IEEE, _C_MDTS, _C_CNTLID, _C_VER = 72, 73, 77, 78, 80
_C_CNTRLTYPE = 111
_C_OACS, _C_ACL, _C_AERL, _C_FRMW, _C_LPA, _C_ELPE, _C_NPSS = 256, 258, 259, 260, 261, 262, 263
_C_WCTEMP, _C_CCTEMP = 266, 268
_C_SQES, _C_CQES, _C_NN, _C_ONCS, _C_VWC, _C_SGLS = 512, 513, 516, 520, 525, 536
_C_SUBNQN = 768
_C_PSD0 = 2048

OACS_DBBUF = 1 << 8
ONCS_DSM = 1 << 2
ONCS_WRITE_ZEROES = 1 << 3
VWC_PRESENT = 1 << 0
VWC_FLUSH_BROADCAST = 0x3 << 1
FRMW_SLOT1_RO_ONE_SLOT = 0x03
CNTRLTYPE_IO = 1
IEEE_OUI = b"\x00\x54\x52"  # QEMU's, byte-reversed as the field wants; informational only

# Identify Namespace offsets
_N_NSZE, _N_NCAP, _N_NUSE, _N_NLBAF, _N_FLBAS, _N_DLFEAT = 0, 8, 16, 25, 26, 33
_N_NGUID, _N_LBAF0 = 104, 128
#: deallocated blocks read zeros (001b) and Write Zeroes may deallocate (bit 3)
DLFEAT_READ_ZEROES_WZ_DEALLOC = 0x09

# Namespace identification descriptor types
NIDT_NGUID = 0x02
NIDT_UUID = 0x03

WARNING_TEMP_K = 343
CRITICAL_TEMP_K = 373
COMPOSITE_TEMP_K = 293
POWER_25W_CW = 2500


def _ascii(text: str, size: int) -> bytes:
    """A space-padded ASCII field (SN, MN, FR are not NUL-terminated)."""
    raw = text.encode("ascii", "replace")[:size]
    return raw + b" " * (size - len(raw))


def namespace_guid(serial: str, nsid: int) -> bytes:
    """A stable 16-byte NGUID for a namespace: same options, same identity across boots."""
    return hashlib.sha256(f"vfiouser-nvme:{serial}:{nsid}".encode()).digest()[:16]


def namespace_uuid(serial: str, nsid: int) -> bytes:
    raw = bytearray(hashlib.sha256(f"vfiouser-nvme-uuid:{serial}:{nsid}".encode()).digest()[:16])
    raw[6] = (raw[6] & 0x0F) | 0x40  # RFC 4122 version 4 layout
    raw[8] = (raw[8] & 0x3F) | 0x80
    return bytes(raw)


@dataclass(frozen=True)
class ControllerInfo:
    """What Identify Controller reports; the controller builds one from its options."""

    vendor_id: int
    subsystem_vendor_id: int
    serial: str
    model: str
    firmware: str
    mdts: int
    num_namespaces: int
    aerl: int
    acl: int
    dbbuf: bool = True


def identify_controller(info: ControllerInfo) -> bytes:
    d = bytearray(IDENTIFY_SIZE)
    struct.pack_into("<HH", d, _C_VID, info.vendor_id, info.subsystem_vendor_id)
    d[_C_SN : _C_SN + 20] = _ascii(info.serial, 20)
    d[_C_MN : _C_MN + 40] = _ascii(info.model, 40)
    d[_C_FR : _C_FR + 8] = _ascii(info.firmware, 8)
    d[_C_RAB] = 6
    d[_C_IEEE : _C_IEEE + 3] = IEEE_OUI
    d[_C_MDTS] = info.mdts
    struct.pack_into("<HI", d, _C_CNTLID, 0, VERSION_1_4)
    d[_C_CNTRLTYPE] = CNTRLTYPE_IO
    struct.pack_into("<H", d, _C_OACS, OACS_DBBUF if info.dbbuf else 0)
    d[_C_ACL] = info.acl
    d[_C_AERL] = info.aerl
    d[_C_FRMW] = FRMW_SLOT1_RO_ONE_SLOT
    d[_C_LPA] = 0
    d[_C_ELPE] = 0
    d[_C_NPSS] = 0
    struct.pack_into("<HH", d, _C_WCTEMP, WARNING_TEMP_K, CRITICAL_TEMP_K)
    d[_C_SQES] = (SQES_LOG2 << 4) | SQES_LOG2
    d[_C_CQES] = (CQES_LOG2 << 4) | CQES_LOG2
    struct.pack_into("<I", d, _C_NN, info.num_namespaces)
    struct.pack_into("<H", d, _C_ONCS, ONCS_DSM | ONCS_WRITE_ZEROES)
    d[_C_VWC] = VWC_PRESENT | VWC_FLUSH_BROADCAST
    struct.pack_into("<I", d, _C_SGLS, 0)
    nqn = f"nqn.2026-11.io.vfiouser-srv:nvme:{info.serial}".encode()[:255]
    d[_C_SUBNQN : _C_SUBNQN + len(nqn)] = nqn
    struct.pack_into("<H", d, _C_PSD0, POWER_25W_CW)
    return bytes(d)


def identify_namespace(blocks: int, lba_shift: int, nguid: bytes) -> bytes:
    d = bytearray(IDENTIFY_SIZE)
    struct.pack_into("<QQQ", d, _N_NSZE, blocks, blocks, blocks)
    d[_N_NLBAF] = 0  # one format (0-based)
    d[_N_FLBAS] = 0
    d[_N_DLFEAT] = DLFEAT_READ_ZEROES_WZ_DEALLOC
    d[_N_NGUID : _N_NGUID + 16] = nguid
    struct.pack_into("<HBB", d, _N_LBAF0, 0, lba_shift, 0)
    return bytes(d)


def active_namespace_list(nsids: list[int], after: int) -> bytes:
    """Up to 1024 active NSIDs greater than `after`, ascending, zero-filled."""
    chosen = sorted(n for n in nsids if n > after)[: IDENTIFY_SIZE // 4]
    d = bytearray(IDENTIFY_SIZE)
    struct.pack_into(f"<{len(chosen)}I", d, 0, *chosen)
    return bytes(d)


def namespace_descriptors(nguid: bytes, uuid: bytes) -> bytes:
    d = bytearray(IDENTIFY_SIZE)
    pos = 0
    for nidt, value in ((NIDT_NGUID, nguid), (NIDT_UUID, uuid)):
        struct.pack_into("<BB2x", d, pos, nidt, len(value))
        d[pos + 4 : pos + 4 + len(value)] = value
        pos += 4 + len(value)
    return bytes(d)


@dataclass
class SmartCounters:
    """The counters the SMART log reports (host commands and 512 000-byte data units)."""

    read_commands: int = 0
    write_commands: int = 0
    bytes_read: int = 0
    bytes_written: int = 0


def smart_log(c: SmartCounters) -> bytes:
    d = bytearray(SMART_LOG_SIZE)
    d[0] = 0  # critical warning
    struct.pack_into("<H", d, 1, COMPOSITE_TEMP_K)
    d[3] = 100  # available spare %
    d[4] = 10  # available spare threshold %
    d[5] = 0  # percentage used

    def units(n: int) -> int:
        return -(-n // 512_000)  # data units of 1000 x 512 bytes, rounded up

    for off, value in ((32, units(c.bytes_read)), (48, units(c.bytes_written)),
                       (64, c.read_commands), (80, c.write_commands)):
        struct.pack_into("<QQ", d, off, value & (2**64 - 1), value >> 64)
    return bytes(d)


def firmware_slot_log(firmware: str) -> bytes:
    d = bytearray(FW_SLOT_LOG_SIZE)
    d[0] = 1  # active firmware: slot 1
    d[8:16] = _ascii(firmware, 8)
    return bytes(d)


def error_log(entries: int) -> bytes:
    return bytes(ERROR_LOG_ENTRY_SIZE * entries)

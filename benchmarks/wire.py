"""Minimal vfio-user wire helpers for the benchmark client (stdlib only).

Deliberately tiny: constants plus pack/unpack helpers for the handful of messages the
benchmarks send. The project's own ``protocol`` package may replace this module later.
All structures are little-endian (host order on the machines we run on).
"""

from __future__ import annotations

import json
import struct
from typing import Any, NamedTuple

HEADER = struct.Struct("<HHIII")  # msg_id, command, size (whole message), flags, error
HEADER_SIZE = HEADER.size  # 16

CMD_VERSION = 1
CMD_DMA_MAP = 2
CMD_DMA_UNMAP = 3
CMD_REGION_READ = 9

F_TYPE_MASK = 0xF
F_TYPE_COMMAND = 0x0
F_TYPE_REPLY = 0x1
F_NO_REPLY = 0x10
F_ERROR = 0x20

DMA_FLAG_READ = 1
DMA_FLAG_WRITE = 2

_VERSION = struct.Struct("<HH")
_DMA_MAP = struct.Struct("<IIQQQ")  # argsz, flags, offset, address, size
_DMA_UNMAP = struct.Struct("<IIQQ")  # argsz, flags, address, size
REGION_ACCESS = struct.Struct("<QII")  # offset, region, count

DEFAULT_CAPABILITIES: dict[str, Any] = {
    "capabilities": {"max_msg_fds": 8, "max_data_xfer_size": 1048576}
}


class Header(NamedTuple):
    msg_id: int
    command: int
    size: int
    flags: int
    error: int

    @property
    def is_reply(self) -> bool:
        return (self.flags & F_TYPE_MASK) == F_TYPE_REPLY

    @property
    def is_error(self) -> bool:
        return bool(self.flags & F_ERROR)


def pack_header(msg_id: int, command: int, payload_len: int, flags: int = F_TYPE_COMMAND) -> bytes:
    return HEADER.pack(msg_id & 0xFFFF, command, HEADER_SIZE + payload_len, flags, 0)


def unpack_header(buf: bytes | bytearray | memoryview, offset: int = 0) -> Header:
    return Header(*HEADER.unpack_from(buf, offset))


def pack_version(
    msg_id: int, major: int = 0, minor: int = 0, caps: dict[str, Any] | None = None
) -> bytes:
    body = json.dumps(DEFAULT_CAPABILITIES if caps is None else caps).encode() + b"\0"
    payload = _VERSION.pack(major, minor) + body
    return pack_header(msg_id, CMD_VERSION, len(payload)) + payload


def unpack_version(payload: bytes | bytearray | memoryview) -> tuple[int, int, dict[str, Any]]:
    """Parse a VERSION payload (without header): major, minor, decoded JSON (or {})."""
    major, minor = _VERSION.unpack_from(payload, 0)
    raw = bytes(payload[_VERSION.size :]).split(b"\0", 1)[0]
    caps: dict[str, Any] = json.loads(raw) if raw.strip() else {}
    return major, minor, caps


def pack_region_read(msg_id: int, region: int, offset: int, count: int) -> bytes:
    return pack_header(msg_id, CMD_REGION_READ, REGION_ACCESS.size) + REGION_ACCESS.pack(
        offset, region, count
    )


def unpack_region_access(payload: bytes | bytearray | memoryview) -> tuple[int, int, int]:
    """offset, region, count of a REGION_READ/WRITE payload (data follows at byte 16)."""
    offset, region, count = REGION_ACCESS.unpack_from(payload, 0)
    return offset, region, count


def pack_dma_map(
    msg_id: int,
    address: int,
    size: int,
    offset: int = 0,
    flags: int = DMA_FLAG_READ | DMA_FLAG_WRITE,
) -> bytes:
    payload = _DMA_MAP.pack(_DMA_MAP.size, flags, offset, address, size)
    return pack_header(msg_id, CMD_DMA_MAP, len(payload)) + payload


def pack_dma_unmap(msg_id: int, address: int, size: int, flags: int = 0) -> bytes:
    payload = _DMA_UNMAP.pack(_DMA_UNMAP.size, flags, address, size)
    return pack_header(msg_id, CMD_DMA_UNMAP, len(payload)) + payload

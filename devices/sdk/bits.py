"""Byte-level helpers shared by config space, capabilities and register banks.

Every partial write in the SDK, whatever its width or alignment, goes through
`masked_write`: the per-byte writable mask and write-1-to-clear mask decide what a byte
becomes. Keeping one helper means config space, capabilities and register banks cannot
disagree about what a 1-, 2- or 4-byte unaligned write does.
"""

from __future__ import annotations

from typing import TypeAlias

#: What the helpers accept as bytes (collections.abc.Buffer needs Python 3.12).
BytesLike: TypeAlias = bytes | bytearray | memoryview


def masked_write(
    cur: bytearray, wmask: BytesLike, w1cmask: BytesLike, offset: int, data: BytesLike
) -> None:
    """Apply `data` at `offset` to `cur` under per-byte masks.

    Writable bits take the written value; write-1-to-clear bits are cleared where the
    written value has a 1; every other bit keeps its value. A bit must not be in both masks.
    """
    wm = memoryview(wmask).cast("B")
    cm = memoryview(w1cmask).cast("B")
    for i, value in enumerate(memoryview(data).cast("B")):
        pos = offset + i
        writable = wm[pos]
        old = cur[pos]
        cur[pos] = ((old & ~writable) | (value & writable)) & ~(value & cm[pos]) & 0xFF


def get_le(buf: BytesLike, offset: int, size: int) -> int:
    """Little-endian unsigned integer of `size` bytes at `offset`."""
    return int.from_bytes(memoryview(buf).cast("B")[offset : offset + size], "little")


def set_le(buf: bytearray, offset: int, size: int, value: int) -> None:
    """Store `value` as `size` little-endian bytes at `offset` (truncating high bits)."""
    buf[offset : offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")


def is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0

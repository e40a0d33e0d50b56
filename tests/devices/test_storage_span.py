"""The span helpers in the SDK (`storage.bounds`, `span_view`, `span_slices`): one copy,
used by `read_cached` and re-exported by virtio's `guestmem`; `read_cached(span_first=True)`
(virtio-blk's handler) takes the span before the engine's `pin_ranges`."""

from __future__ import annotations

import pytest

from devices.sdk import storage
from devices.sdk.storage import SPAN_LIMIT, MemoryBackend, read_cached
from devices.virtio import guestmem

from .test_storage_read_cached import PinOnly, Ram, disk

__all__ = ["disk"]  # the fixture, shared with the read_cached tests


def test_guestmem_names_are_the_sdk_helpers() -> None:
    assert guestmem.bounds is storage.bounds
    assert guestmem.span_view is storage.span_view
    assert guestmem.span_slices is storage.span_slices


def test_span_slices_cut_one_view_per_piece() -> None:
    ram = PinOnly()
    ram.ram[0x2000:0x3000] = b"a" * 0x1000
    ram.ram[0x5000:0x5010] = b"b" * 0x10
    views = storage.span_slices(ram, [(0x5000, 0x10), (0x2000, 0x1000)])
    assert views is not None and [bytes(v) for v in views] == [b"b" * 0x10, b"a" * 0x1000]
    assert ram.views == [(0x2000, 0x3010)]  # one view of the span
    assert storage.span_slices(ram, [(0x2000, 8), (0x2000 + SPAN_LIMIT, 8)],
                               limit=SPAN_LIMIT) is None
    assert storage.span_slices(ram, [(0x2000, 8), (PinOnly.HOLE + 4096, 8)]) is None
    assert storage.span_slices(ram, []) is None


def scattered() -> list[tuple[int, int]]:
    return [(0x10000 + 2 * i * 4096, 4096) for i in range(8)]


@pytest.mark.parametrize("span_first", [False, True])
def test_span_first_takes_the_span_before_pin_ranges(disk: MemoryBackend,
                                                     span_first: bool) -> None:
    ram = Ram()
    ranges = scattered()
    assert read_cached(disk, ram, 0, ranges, 8 * 4096, span_first=span_first)
    if span_first:
        assert ram.views == [(0x10000, 15 * 4096)] and ram.pinned == []
    else:
        assert ram.views == [] and ram.pinned == [ranges]
    out = memoryview(bytearray(8 * 4096))
    disk.readinto(0, [out])
    got = b"".join(bytes(ram.ram[a : a + n]) for a, n in ranges)
    assert got == bytes(out)


def test_span_first_over_the_limit_goes_to_pin_ranges(disk: MemoryBackend) -> None:
    ram = Ram()
    ranges = [(0x10000, 4096), (0x10000 + SPAN_LIMIT, 4096)]
    assert read_cached(disk, ram, 0, ranges, 8192, span_first=True)
    assert ram.views == [] and ram.pinned == [ranges]

"""`storage.read_cached`: a page-cache read straight into guest memory without waiting,
for a register or notify handler; every case it cannot serve answers False untouched."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from devices.sdk.interface import DmaError
from devices.sdk.storage import SPAN_LIMIT, FileBackend, MemoryBackend, read_cached

RAM = 16 << 20


class PinOnly:
    """Guest RAM with a hole at [HOLE, HOLE + 4096), through an engine with `view` and
    `pin` but no `pin_ranges`; counts views and pins."""

    HOLE = 1 << 20

    def __init__(self, *, mmapped: bool = True) -> None:
        self.ram = bytearray(RAM)
        self.mmapped = mmapped
        self.views: list[tuple[int, int]] = []
        self.pinned: list[Sequence[tuple[int, int]]] = []

    def _check(self, address: int, size: int) -> None:
        if (address < self.HOLE + 4096 and address + size > self.HOLE) or address + size > RAM:
            raise DmaError(errno.EFAULT, f"{address:#x}+{size} not mapped")

    def view(self, address: int, size: int, *, write: bool = False) -> memoryview | None:
        self._check(address, size)
        self.views.append((address, size))
        return memoryview(self.ram)[address : address + size] if self.mmapped else None

    @contextlib.contextmanager
    def pin(self, address: int, size: int, *,
            write: bool = False) -> Iterator[memoryview | None]:
        self._check(address, size)
        self.pinned.append([(address, size)])
        yield memoryview(self.ram)[address : address + size] if self.mmapped else None

    async def read(self, address: int, size: int) -> bytes:
        raise AssertionError("read_cached never waits")

    async def write(self, address: int, data: bytes | bytearray | memoryview) -> None:
        raise AssertionError("read_cached never waits")


class Ram(PinOnly):
    """The same with the session engine's batch `pin_ranges`."""

    @contextlib.contextmanager
    def pin_ranges(self, ranges: Sequence[tuple[int, int]], *,
                   write: bool = False) -> Iterator[list[memoryview] | None]:
        for a, n in ranges:
            self._check(a, n)
        self.pinned.append(ranges)
        yield [memoryview(self.ram)[a : a + n] for a, n in ranges] if self.mmapped else None


@pytest.fixture
def disk() -> Iterator[MemoryBackend]:
    be = MemoryBackend(1 << 20)
    be.write(0, [os.urandom(1 << 20)])
    yield be
    be.close()


def disk_bytes(be: MemoryBackend, offset: int, n: int) -> bytes:
    out = memoryview(bytearray(n))
    be.readinto(offset, [out])
    return bytes(out)


def test_one_range_is_one_view(disk: MemoryBackend) -> None:
    ram = Ram()
    assert read_cached(disk, ram, 4096, [(0x5000, 8192)], 8192)
    assert ram.ram[0x5000:0x7000] == disk_bytes(disk, 4096, 8192)
    assert ram.views == [(0x5000, 8192)] and not ram.pinned


SCATTERED = [(0x20000 + i * 3 * 4096, 4096) for i in range(8)][::-1]  # any order


def test_scattered_pages_go_to_pin_ranges(disk: MemoryBackend) -> None:
    ram = Ram()
    assert read_cached(disk, ram, 0, SCATTERED, 8 * 4096)
    got = b"".join(bytes(ram.ram[a : a + n]) for a, n in SCATTERED)
    assert got == disk_bytes(disk, 0, 8 * 4096)
    assert ram.pinned == [SCATTERED] and not ram.views


def test_without_pin_ranges_scattered_pages_take_one_view_of_their_span(
        disk: MemoryBackend) -> None:
    ram = PinOnly()
    assert read_cached(disk, ram, 0, SCATTERED, 8 * 4096)
    got = b"".join(bytes(ram.ram[a : a + n]) for a, n in SCATTERED)
    assert got == disk_bytes(disk, 0, 8 * 4096)
    assert ram.views == [(0x20000, 7 * 3 * 4096 + 4096)] and not ram.pinned


@pytest.mark.parametrize("where", ["hole", "far"])
def test_a_span_that_cannot_be_one_view_pins_piece_by_piece(disk: MemoryBackend,
                                                            where: str) -> None:
    """A hole between the pieces, or pieces further apart than SPAN_LIMIT: the exact
    pieces through `pinned_views` instead (right data, no over-wide view)."""
    second = PinOnly.HOLE + 8192 if where == "hole" else 0x10000 + SPAN_LIMIT
    ranges = [(0x10000, 4096), (second, 4096)]
    ram = PinOnly()
    assert read_cached(disk, ram, 512, ranges, 8192)
    want = disk_bytes(disk, 512, 8192)
    assert bytes(ram.ram[0x10000:0x11000]) + bytes(ram.ram[second : second + 4096]) == want
    assert ram.pinned == [[r] for r in ranges]
    assert all(n <= SPAN_LIMIT for _, n in ram.views)


@pytest.mark.parametrize("ranges", [[(0x10000, 4096)], [(0x10000, 4096), (0x30000, 4096)]])
@pytest.mark.parametrize("engine", [Ram, PinOnly])
def test_memory_without_mmap_is_left_to_the_caller(disk: MemoryBackend,
                                                   ranges: list[tuple[int, int]],
                                                   engine: type[PinOnly]) -> None:
    ram = engine(mmapped=False)
    assert not read_cached(disk, ram, 0, ranges, 4096 * len(ranges))
    assert all(not any(ram.ram[a : a + n]) for a, n in ranges)


def test_unmapped_address_is_left_to_the_caller(disk: MemoryBackend) -> None:
    assert not read_cached(disk, Ram(), 0, [(Ram.HOLE, 4096)], 4096)
    assert not read_cached(disk, Ram(), 0, [(0x10000, 4096), (Ram.HOLE, 4096)], 8192)
    assert not read_cached(disk, Ram(), 0, [(RAM - 4096, 8192)], 8192)


class Partial(MemoryBackend):
    """A page cache holding only the first `have` bytes, or failing with EIO."""

    def __init__(self, have: int, fail: bool = False) -> None:
        super().__init__(1 << 20)
        self.have, self.fail = have, fail

    def readinto_nowait(self, offset: int, bufs: Sequence[memoryview]) -> int:
        if self.fail:
            raise OSError(errno.EIO, "bad sector")
        first = bufs[0][: self.have]
        self.readinto(offset, [first])
        return len(first)


@pytest.mark.parametrize("ranges", [[(0x10000, 8192)], [(0x10000, 4096), (0x30000, 4096)]])
def test_a_miss_or_an_error_answers_false(ranges: list[tuple[int, int]]) -> None:
    for be in (Partial(4096), Partial(0), Partial(0, fail=True)):
        try:
            assert not read_cached(be, Ram(), 0, ranges, 8192)
            assert not read_cached(be, PinOnly(), 0, ranges, 8192)
        finally:
            be.close()


def test_file_backend_page_cache(tmp_path: Path) -> None:
    """A real image: what was just written is in the page cache (RWF_NOWAIT serves it)."""
    be = FileBackend(tmp_path / "disk.img", size=1 << 20)
    try:
        data = os.urandom(3 * 4096)
        be.write(8192, [data])
        ram = Ram()
        ranges = [(0x40000, 4096), (0x10000, 8192)]
        if not read_cached(be, ram, 8192, ranges, len(data)):
            pytest.skip("this file system has no RWF_NOWAIT for buffered reads")
        assert bytes(ram.ram[0x40000:0x41000]) + bytes(ram.ram[0x10000:0x12000]) == data
    finally:
        be.close()

"""`pinned_views`: batch pinning when the engine has `pin_ranges`, per-range `pin` when it
only has that, None (copy) when it has neither or a range cannot be viewed."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from devices.sdk.interface import pinned_views


class OnlyPin:
    def __init__(self) -> None:
        self.ram = bytearray(8192)
        self.pins = 0

    def view(self, address: int, size: int, *, write: bool = False) -> memoryview | None:
        return None

    @contextlib.contextmanager
    def pin(self, address: int, size: int, *, write: bool = False) -> Iterator[memoryview | None]:
        self.pins += 1
        try:
            yield memoryview(self.ram)[address : address + size] if address < 8192 else None
        finally:
            self.pins -= 1

    async def read(self, address: int, size: int) -> bytes:
        return bytes(size)

    async def write(self, address: int, data: bytes | bytearray | memoryview) -> None:
        pass


class NoPin:
    def view(self, address: int, size: int, *, write: bool = False) -> memoryview | None:
        return None

    async def read(self, address: int, size: int) -> bytes:
        return bytes(size)

    async def write(self, address: int, data: bytes | bytearray | memoryview) -> None:
        pass


class Batch(OnlyPin):
    @contextlib.contextmanager
    def pin_ranges(self, ranges: list[tuple[int, int]], *,
                   write: bool = False) -> Iterator[list[memoryview] | None]:
        self.pins += 100
        try:
            yield [memoryview(self.ram)[a : a + n] for a, n in ranges]
        finally:
            self.pins -= 100


def test_per_range_pins_when_only_pin_exists() -> None:
    d = OnlyPin()
    with pinned_views(d, [(0, 10), (100, 10)], write=True) as views:
        assert views is not None and [len(v) for v in views] == [10, 10]
        assert d.pins == 2
        views[1][:2] = b"hi"
    assert d.pins == 0 and d.ram[100:102] == b"hi"


def test_a_range_without_a_view_means_copy_and_nothing_stays_pinned() -> None:
    d = OnlyPin()
    with pinned_views(d, [(0, 10), (9000, 10)]) as views:
        assert views is None
        assert d.pins == 0


def test_no_pinning_means_copy() -> None:
    with pinned_views(NoPin(), [(0, 1)]) as views:
        assert views is None


def test_batch_pinning_is_preferred() -> None:
    d = Batch()
    with pinned_views(d, [(0, 10), (100, 10)]) as views:
        assert views is not None and d.pins == 100
    assert d.pins == 0

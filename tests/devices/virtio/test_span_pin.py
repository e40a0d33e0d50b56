"""A request's payload pinned once per span (`devices/virtio/blkreq.pin`): one pin of the
pieces' span when they lie in one mmap'd stretch within `SPAN_LIMIT`, sliced per piece;
piece by piece when the span crosses a hole, a window edge or the limit (the request must
not fail for memory between its pieces); views released before the pin goes (an unmap
waits for the pin, and the window's mmap cannot close while views of it live)."""

from __future__ import annotations

import contextlib
import errno
import random
from collections.abc import Iterator

import pytest

from devices.sdk import DmaError
from devices.sdk.storage import SPAN_LIMIT
from devices.virtio.blkreq import pin
from devices.virtio.guestmem import bounds

from ..fakes import FakeDma

PAGE = 4096


class CountingDma(FakeDma):
    """FakeDma that records each pin and pin_ranges call, with unmapped `holes`."""

    def __init__(self, size: int, holes: list[tuple[int, int]] | None = None) -> None:
        super().__init__(size)
        self.holes = holes or []
        self.pin_calls: list[tuple[int, int]] = []
        self.range_calls = 0
        #: views handed out by `pin`, checked released when the pin goes
        self.released_at_unpin: list[bool] = []
        self.handed: list[memoryview] = []

    def _range(self, address: int, size: int) -> slice:
        for lo, n in self.holes:
            if address < lo + n and lo < address + size:
                raise DmaError(errno.EFAULT, f"0x{address:x}+{size} crosses a hole")
        return super()._range(address, size)

    @contextlib.contextmanager
    def pin(self, address: int, size: int, *, write: bool = False) -> Iterator[memoryview | None]:
        self.pin_calls.append((address, size))
        with super().pin(address, size, write=write) as view:
            try:
                yield view
            finally:
                self.released_at_unpin.append(all(map(_released, self.handed)))

    @contextlib.contextmanager
    def pin_ranges(self, ranges: list[tuple[int, int]], *,
                   write: bool = False) -> Iterator[list[memoryview] | None]:
        self.range_calls += 1
        with super().pin_ranges(ranges, write=write) as views:
            yield views


def _released(view: memoryview) -> bool:
    try:
        view.tobytes()
    except ValueError:
        return True
    return False


def _pieces(rng: random.Random, count: int, pages: int) -> list[tuple[int, int]]:
    return [(p * PAGE, PAGE) for p in rng.sample(range(1, pages), count)]


def _fill(dma: FakeDma) -> None:
    dma.ram[:] = bytes(i * 7 % 251 for i in range(len(dma.ram)))


def test_one_pin_for_pieces_in_one_window() -> None:
    rng = random.Random(1)
    dma = CountingDma(1 << 22)
    _fill(dma)
    pieces = _pieces(rng, 256, (1 << 22) // PAGE)
    with contextlib.ExitStack() as pins:
        views = pin(pins, dma, pieces)
        assert views is not None
        assert dma.pin_calls == [(bounds(pieces)[0], bounds(pieces)[1] - bounds(pieces)[0])]
        assert dma.range_calls == 0
        assert [bytes(v) for v in views] == [bytes(dma.ram[a : a + n]) for a, n in pieces]
        assert dma.pins == 1
    assert dma.pins == 0
    with pytest.raises(ValueError):
        views[0].tobytes()  # released when the pins closed: nothing keeps the mmap


def test_hole_between_pieces_falls_back_per_piece() -> None:
    """A page between two pieces is not mapped: the span pin fails, the pieces are pinned
    one by one and the request goes on (before: DmaError -> GuestMemoryError)."""
    dma = CountingDma(1 << 20, holes=[(5 * PAGE, PAGE)])
    _fill(dma)
    pieces = [(2 * PAGE, PAGE), (9 * PAGE, PAGE), (3 * PAGE + 100, 200)]
    with contextlib.ExitStack() as pins:
        views = pin(pins, dma, pieces)
        assert views is not None
        assert dma.range_calls == 1
        assert [bytes(v) for v in views] == [bytes(dma.ram[a : a + n]) for a, n in pieces]
    assert dma.pins == 0


def test_a_hole_inside_a_piece_is_still_an_error() -> None:
    from devices.virtio.guestmem import GuestMemoryError

    dma = CountingDma(1 << 20, holes=[(5 * PAGE, PAGE)])
    with contextlib.ExitStack() as pins, pytest.raises(GuestMemoryError):
        pin(pins, dma, [(2 * PAGE, PAGE), (5 * PAGE, 16)])


def test_span_over_the_limit_pins_per_piece() -> None:
    far = SPAN_LIMIT + PAGE
    dma = CountingDma(far + PAGE)
    pieces = [(0, PAGE), (far, PAGE)]
    with contextlib.ExitStack() as pins:
        views = pin(pins, dma, pieces)
        assert views is not None and len(views) == 2
        assert dma.pin_calls == [] and dma.range_calls == 1


def test_writes_into_the_guest_pin_per_piece() -> None:
    """Dirty logging must mark only the pieces: no span pin for write=True."""
    dma = CountingDma(1 << 20)
    with contextlib.ExitStack() as pins:
        assert pin(pins, dma, [(0, PAGE), (8 * PAGE, PAGE)], write=True) is not None
    assert dma.pin_calls == [] and dma.range_calls == 1


def test_pin_held_until_close_and_views_released_first() -> None:
    """What makes an unmap wait: the pin lasts until the request's pins close, and its
    views are released before the pin is let go (LIFO), or the mmap could not close."""
    dma = CountingDma(1 << 20)
    with contextlib.ExitStack() as pins:
        views = pin(pins, dma, [(0, PAGE), (4 * PAGE, PAGE)])
        assert views is not None
        dma.handed = views
        assert dma.pins == 1 and dma.released_at_unpin == []
    assert dma.pins == 0
    assert dma.released_at_unpin == [True]


@pytest.mark.parametrize("seed", range(20))
def test_bounds_matches_reference(seed: int) -> None:
    rng = random.Random(seed)
    count = rng.randint(1, 40)
    same = rng.random() < 0.5
    pieces = [(rng.randrange(1 << 40), PAGE if same else rng.randint(0, 1 << 20))
              for _ in range(count)]
    assert bounds(pieces) == (min(a for a, _ in pieces), max(a + n for a, n in pieces))

"""`Container.view` answers a range inside one window in its own frame; everything else
goes through `spans`. Both must give the same answer, error and dirty marks for any range."""

from __future__ import annotations

import errno
import mmap
from collections.abc import Iterator

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.sdk.interface import DmaError
from vfiouser_srv.container import Container, DirtyLog, DmaWindow
from vfiouser_srv.session_dma import SessionDma

PAGE = 4096


def _window(address: int, size: int, readable: bool, writable: bool,
            mapped: bool) -> DmaWindow:
    mapping = mmap.mmap(-1, size) if mapped else None
    view = memoryview(mapping) if mapping is not None else None
    return DmaWindow(address, size, readable, writable, 0, mapping, view, None, None, None)


@pytest.fixture
def container() -> Iterator[Container]:
    """Windows at 0x1000 (rw, 4 pages), 0x5000 (rw, adjacent, 2 pages), 0x9000 (read-only,
    1 page), 0xb000 (write-only, 1 page), 0xd000 (rw, not mmap'd, 1 page)."""
    c = Container(page_size=PAGE)
    for args in ((0x1000, 4 * PAGE, True, True, True), (0x5000, 2 * PAGE, True, True, True),
                 (0x9000, PAGE, True, False, True), (0xB000, PAGE, False, True, True),
                 (0xD000, PAGE, True, True, False)):
        c.add(_window(*args))
    yield c
    c.release_all()


def _reference(c: Container, address: int, size: int, write: bool) -> memoryview | None:
    """What `view` answered before its one-window shortcut (the `spans` path alone)."""
    pieces = list(c.spans(address, size, write))
    if len(pieces) != 1:
        return None if pieces else memoryview(b"")
    w, off, n = pieces[0]
    if w.view is None:
        return None
    if write and c.dirty is not None:
        c.dirty.mark(address, size)
    return w.view[off : off + n]


def _outcome(c: Container, fn: object, address: int, size: int, write: bool) -> object:
    try:
        got = fn(address, size, write=write) if fn is not None else _reference(
            c, address, size, write)
    except DmaError as exc:
        return ("error", exc.errno)
    if got is None:
        return None
    assert isinstance(got, memoryview)
    return ("view", got.nbytes, got.obj is not None and bytes(got[:1]))


@settings(max_examples=400, deadline=None)
@given(address=st.integers(-PAGE, 0x10000), size=st.integers(-1, 7 * PAGE),
       write=st.booleans())
def test_view_matches_the_spans_path(address: int, size: int, write: bool) -> None:
    c = Container(page_size=PAGE)
    for args in ((0x1000, 4 * PAGE, True, True, True), (0x5000, 2 * PAGE, True, True, True),
                 (0x9000, PAGE, True, False, True), (0xB000, PAGE, False, True, True),
                 (0xD000, PAGE, True, True, False)):
        c.add(_window(*args))
    try:
        assert _outcome(c, c.view, address, size, write) == _outcome(
            c, None, address, size, write)
    finally:
        c.release_all()


def test_one_window_view_is_that_window_and_marks_dirty(container: Container) -> None:
    container.dirty = DirtyLog(PAGE)
    view = container.view(0x1000 + 10, 100, write=True)
    assert view is not None and view.nbytes == 100
    view[:3] = b"abc"
    view.release()
    (w,) = [w for w in container if w.address == 0x1000]
    assert w.mapping is not None and w.mapping[10:13] == b"abc"
    bitmap = container.dirty.report(0x1000, 2 * PAGE, PAGE)
    assert bitmap[0] & 0b11 == 0b01  # the first page only


def test_one_window_view_checks_permissions(container: Container) -> None:
    with pytest.raises(DmaError) as exc:
        container.view(0x9000, 16, write=True)
    assert exc.value.errno == errno.EPERM
    with pytest.raises(DmaError) as exc:
        container.view(0xB000, 16)
    assert exc.value.errno == errno.EPERM
    assert container.view(0xD000, 16) is None  # not mmap'd: the caller copies


def test_views_across_or_outside_windows(container: Container) -> None:
    assert container.view(0x5000 - 8, 16) is None  # two adjacent windows
    with pytest.raises(DmaError) as exc:
        container.view(0x7000 - 8, 16)  # runs off its window into a hole
    assert exc.value.errno == errno.EFAULT
    with pytest.raises(DmaError) as exc:
        container.view(0x8000, 16)  # a hole
    assert exc.value.errno == errno.EFAULT
    empty = container.view(0x8000, 0)
    assert empty is not None and empty.nbytes == 0



async def test_pin_ranges_lets_go_of_every_window_and_wakes_an_unmap(
    container: Container,
) -> None:
    """`SessionDma.pin_ranges` pins each window once, without a context manager per
    window: every pin is let go, also when the caller's block raises, and an unmap waiting
    for the last pin of a window is woken."""
    dma = SessionDma()
    dma.attached_to = container
    a, b = sorted((w for w in container if w.address in (0x1000, 0x5000)),
                  key=lambda w: w.address)
    drained: list[bool] = []
    async with trio.open_nursery() as nursery:
        with dma.pin_ranges([(0x1000, 16), (0x2000, 16), (0x5000, 16)], write=True) as views:
            assert views is not None and [v.nbytes for v in views] == [16, 16, 16]
            assert (a.pins, b.pins) == (1, 1)
            taken = container.take(0x5000, 2 * PAGE)

            async def unmap() -> None:
                drained.append(await Container.drain([taken], timeout=5))

            nursery.start_soon(unmap)
            await trio.testing.wait_all_tasks_blocked()
            assert drained == []  # still pinned
            with pytest.raises(RuntimeError), dma.pin_ranges([(0x1000, 16)]) as inner:
                assert inner is not None and a.pins == 2
                raise RuntimeError("the caller's block fails")
            assert (a.pins, b.pins) == (1, 1)
            views = None
    assert (a.pins, b.pins) == (0, 0) and drained == [True]
    taken.release()

"""`IrqTable.thread_signal`: a worker thread's own dup of a vector's eventfd. What must
hold: the signal reaches the eventfd even if SET_IRQS closed the table's copy meanwhile,
it never reaches whatever reused that descriptor number, `settle` closes the dup (no fd
leak) and reports whether the route changed."""

from __future__ import annotations

import os
import threading

import pytest

from devices.sdk.interface import IrqIndex, IrqSpec
from vfiouser_srv.fds import OwnedFd
from vfiouser_srv.irq import IrqTable


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def table_with_eventfd() -> tuple[IrqTable, int]:
    """An MSI-X index of 4 vectors, vector 2 wired to an eventfd; returns the client's end."""
    table = IrqTable([IrqSpec(IrqIndex.MSIX, 4), IrqSpec(IrqIndex.INTX, 1, automasked=True)])
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    table.lines[IrqIndex.MSIX].triggers[2] = OwnedFd(os.dup(efd))
    return table, efd


def readable(efd: int) -> int:
    try:
        return int.from_bytes(os.read(efd, 8), "little")
    except BlockingIOError:
        return 0


def test_fired_from_a_thread_and_settled_unchanged() -> None:
    table, efd = table_with_eventfd()
    try:
        before = open_fds()
        sig = table.thread_signal(IrqIndex.MSIX, 2)
        assert sig is not None and open_fds() == before + 1
        t = threading.Thread(target=sig.fire)
        t.start()
        t.join()
        assert readable(efd) == 1
        assert sig.settle() is True and table.fired == 1
        assert open_fds() == before  # the dup is closed
        assert sig.settle() is True and open_fds() == before and table.fired == 1  # twice
    finally:
        table.close()
        os.close(efd)


def test_no_signal_where_the_table_would_not_signal() -> None:
    table, efd = table_with_eventfd()
    try:
        assert table.thread_signal(IrqIndex.MSIX, 1) is None  # no eventfd
        assert table.thread_signal(IrqIndex.MSIX, 9) is None  # no such vector
        assert table.thread_signal(IrqIndex.INTX, 0) is None  # a level, automasked
        table.lines[IrqIndex.MSIX].masked[2] = True
        assert table.thread_signal(IrqIndex.MSIX, 2) is None  # masked: pending bit instead
    finally:
        table.close()
        os.close(efd)


def test_set_irqs_closing_the_eventfd_under_the_thread() -> None:
    """The table's copy is closed and its number reused by a pipe before the thread fires:
    the signal still reaches the eventfd (through the dup), never the pipe, and `settle`
    says the route changed (the model then raises through the table again)."""
    table, efd = table_with_eventfd()
    sig = table.thread_signal(IrqIndex.MSIX, 2)
    assert sig is not None
    old_number = table.lines[IrqIndex.MSIX].triggers[2].fd  # type: ignore[union-attr]
    table.disable(IrqIndex.MSIX)  # SET_IRQS count 0: closes the table's copy
    r, w = os.pipe()
    try:
        os.set_blocking(r, False)
        assert old_number in (r, w)  # the lowest free number: the one just closed
        sig.fire()
        assert readable(efd) == 1
        try:
            leaked = os.read(r, 8)
        except BlockingIOError:
            leaked = b""
        assert leaked == b""
        assert sig.settle() is False and table.fired == 0
    finally:
        for fd in (r, w, efd):
            os.close(fd)
        table.close()


def test_a_mask_or_new_eventfd_is_a_changed_route() -> None:
    table, efd = table_with_eventfd()
    try:
        sig = table.thread_signal(IrqIndex.MSIX, 2)
        assert sig is not None
        table.lines[IrqIndex.MSIX].masked[2] = True
        assert sig.settle() is False
        table.lines[IrqIndex.MSIX].masked[2] = False
        sig = table.thread_signal(IrqIndex.MSIX, 2)
        assert sig is not None
        old = table.lines[IrqIndex.MSIX].triggers[2]
        table.lines[IrqIndex.MSIX].triggers[2] = OwnedFd(os.dup(efd))
        assert old is not None
        old.close()
        assert sig.settle() is False
    finally:
        table.close()
        os.close(efd)


def test_the_libvfio_user_engine_offers_no_thread_signal() -> None:
    """Its library owns the eventfds: a model served there keeps raising on the trio
    thread, whatever the table's (unused) eventfd columns hold."""
    from types import SimpleNamespace

    from vfiouser_srv.engines import EngineUnavailable

    try:
        from vfiouser_srv.engines.libvfio_user._irq import VfuIrq
    except EngineUnavailable as exc:
        pytest.skip(f"libvfio-user engine unavailable: {exc}")

    host = SimpleNamespace(name="t", lib=None, ctx_or_none=lambda: None)
    table = VfuIrq(host, [IrqSpec(IrqIndex.MSIX, 4)])  # type: ignore[arg-type]
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        table.lines[IrqIndex.MSIX].triggers[2] = OwnedFd(os.dup(efd))
        assert table.thread_signal(IrqIndex.MSIX, 2) is None
    finally:
        table.close()
        os.close(efd)

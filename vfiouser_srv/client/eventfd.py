"""Eventfds as the client uses them: the interrupts a server raises, seen from the guest side.

Kept apart from the connection because they never touch the socket: once `set_irqs` has
passed an eventfd, the server signals it directly and the test waits on the fd alone.
"""

from __future__ import annotations

import os

import trio

from ..fds import OwnedFd

#: a descriptor a caller passes in: one we own, or a bare number it keeps owning
FdLike = OwnedFd | int


def make_eventfd() -> OwnedFd:
    """A fresh non-blocking eventfd, e.g. for `set_irq_eventfds`."""
    return OwnedFd(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))


def _fileno(fd: FdLike) -> int:
    return fd if isinstance(fd, int) else fd.fileno()


def read_eventfd_nowait(fd: FdLike) -> int:
    """The eventfd's counter (and reset it), or 0 if nothing was signalled."""
    try:
        return os.eventfd_read(_fileno(fd))
    except BlockingIOError:
        return 0


async def wait_eventfd(fd: FdLike, timeout: float = 5.0) -> int:
    """Wait until the eventfd is signalled; return (and reset) its counter.

    Raises `trio.TooSlowError` after `timeout` seconds. The fd must be non-blocking (as
    `make_eventfd` makes them); we do not flip the flag ourselves because it belongs to the
    open file description the server shares.
    """
    num = _fileno(fd)
    if os.get_blocking(num):
        raise ValueError(f"eventfd {num} is blocking; use make_eventfd()")
    await trio.lowlevel.checkpoint()
    with trio.fail_after(timeout):
        while True:
            try:
                return os.eventfd_read(num)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(num)


__all__ = ["FdLike", "make_eventfd", "read_eventfd_nowait", "wait_eventfd"]

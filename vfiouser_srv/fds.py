"""Owned file descriptors: closed exactly once, never used after close.

Descriptors arrive from the peer (SCM_RIGHTS) at any time and can be rejected at many
points; wrapping each one in an `OwnedFd` the moment it arrives makes "who closes it" a
question with one answer. A closed holder sets its number to -1 (like trio's FdStream), so a
stale number can never hit a reused descriptor.

See docs/security.md: no descriptor outlives the connection that brought it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)


class OwnedFd:
    __slots__ = ("__weakref__", "fd")

    def __init__(self, fd: int) -> None:
        if fd < 0:
            raise ValueError(f"bad fd {fd}")
        self.fd = fd

    def fileno(self) -> int:
        if self.fd < 0:
            raise ValueError("descriptor already closed")
        return self.fd

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError as exc:  # EBADF would mean a double close somewhere else
                log.error("closing fd %d: %s", fd, exc)

    def detach(self) -> int:
        """Give up ownership and return the number (the caller now owns it)."""
        fd, self.fd = self.fd, -1
        return fd

    def dup(self) -> OwnedFd:
        return OwnedFd(os.dup(self.fileno()))

    def __enter__(self) -> OwnedFd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"OwnedFd({self.fd})"

    def __del__(self) -> None:
        if self.fd >= 0:
            log.warning("fd %d leaked and was closed by the garbage collector", self.fd)
            self.close()


def close_all(fds: Iterable[Any]) -> None:
    """Close every OwnedFd in `fds` (other objects are ignored)."""
    for fd in fds:
        if isinstance(fd, OwnedFd):
            fd.close()


def fd_kind(fd: int) -> str:
    """What a descriptor is, as /proc shows it (e.g. 'anon_inode:[eventfd]', 'socket:[..]')."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def is_eventfd(fd: int) -> bool:
    return fd_kind(fd) == "anon_inode:[eventfd]"


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))

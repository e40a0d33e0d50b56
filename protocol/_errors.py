"""Typed protocol errors that carry an errno.

Like h11's Local/RemoteProtocolError: the codec raises these, and exactly one place in the
server (its dispatch module) turns them into error replies or a disconnect.

See docs/protocol.md.
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Sequence
from typing import Any


class ProtocolError(Exception):
    """A message broke the protocol. `errno` is what an error reply should carry.

    `fds` holds descriptors that arrived with the offending message: the codec never closes
    anything, so whoever catches this owns them and must close them.
    """

    def __init__(self, message: str, errno: int = _errno.EINVAL, fds: Sequence[Any] = ()) -> None:
        super().__init__(message)
        self.errno = errno
        self.fds: list[Any] = list(fds)


class RemoteProtocolError(ProtocolError):
    """The peer sent something malformed; the message (not the stream) is rejected."""


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol forbids (a bug on our side)."""


class FatalProtocolError(RemoteProtocolError):
    """The byte stream itself can no longer be trusted (bad size, stray fds): disconnect."""

"""The one error boundary: which errno a failure becomes, and its error reply.

Every exception a handler, the region fast path or a model raises while a command is being
answered ends in `fail` (Python engine); the libvfio-user engine's trampolines use
`errno_of` for the number they return to the library, so both engines answer by the same
table (docs/architecture.md, "Errors"):

| raised                                   | errno                       |
|------------------------------------------|-----------------------------|
| `ProtocolError` (bad payload, ranges)    | its errno (mostly EINVAL)   |
| `DeviceError` / `DmaError` / `OSError`   | its errno                   |
| anything else                            | EIO, logged with traceback  |
"""

from __future__ import annotations

import errno
import logging
from typing import Protocol

from devices.sdk.interface import DeviceError, DmaError
from protocol import Command, Connection, ProtocolError

from .objects import ObjectError

log = logging.getLogger(__name__)
_VERSION = int(Command.VERSION)

#: failures that are the client's or the device's business, logged without a traceback
EXPECTED = (ProtocolError, DeviceError, DmaError, OSError)


def errno_of(exc: BaseException) -> int:
    """The errno to answer `exc` with (never 0: a zero errno would read as success)."""
    if isinstance(exc, EXPECTED):
        return exc.errno or errno.EIO
    return errno.EIO


class ReplyContext(Protocol):
    """What answering with an error needs of a connection (a `Session`)."""

    name: str
    conn: Connection

    def request_close(self) -> None: ...

    def count_error(self, command: int, err: int) -> None:
        """Count an error reply (`stats`)."""


def fail(
    ctx: ReplyContext, msg_id: int, command: int, no_reply: bool, exc: Exception
) -> bytes | None:
    """Log `exc` and frame the error reply for request `msg_id` (None under No_reply).

    Expected failures (bad input, a device or DMA error) are one warning line; anything
    else is a bug and logged with its traceback. A VERSION refused by the object model
    (EBUSY, ENODEV) is answered and then the connection closes."""
    err = errno_of(exc)
    ctx.count_error(command, err)
    name = Command(command).name if command in Command._value2member_map_ else str(command)
    if isinstance(exc, EXPECTED):
        log.warning("%s: %s id=%d failed: %s (errno %d)", ctx.name, name, msg_id, exc, err)
    else:
        log.error("%s: %s id=%d raised", ctx.name, name, msg_id, exc_info=exc)
    if isinstance(exc, ObjectError) and command == _VERSION:
        ctx.request_close()
    if no_reply:
        return None
    return ctx.conn.send_error(msg_id, command, err)


__all__ = ["EXPECTED", "ReplyContext", "errno_of", "fail"]

"""What a reply means to the caller: its body, an exception, or the descriptors it owns.

Shared by the connection core (which must close the fds of replies nobody collects) and the
typed commands (which check the body they expected); neither depends on the other for it.
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

from protocol import (
    BadRequest,
    Body,
    Command,
    ErrorReply,
    Event,
    RemoteProtocolError,
    Reply,
    Request,
)

from ..fds import close_all

B = TypeVar("B", bound=Body)


class VfioUserError(OSError):
    """The server answered a command with an error reply; `errno` is what it sent."""

    def __init__(self, err: int, command: int) -> None:
        try:
            cmd: int = Command(command)
            name = Command(command).name
        except ValueError:
            cmd, name = command, f"command {command}"
        super().__init__(err, f"{name}: {os.strerror(err)}")
        #: the command that failed (a `Command` when the number is known)
        self.command = cmd


def reply_body(event: Reply | ErrorReply) -> Body:
    """The body of a successful reply; an error reply raises `VfioUserError`.

    For code that pipelines with `Client.pipeline` and then wants the usual exceptions.
    """
    if isinstance(event, ErrorReply):
        raise VfioUserError(event.errno, event.command)
    return event.body


def check_reply(event: Reply | ErrorReply, expect: type[B]) -> B:
    """The body if it is an `expect`; a body of another type is closed, then refused."""
    body = reply_body(event)
    if not isinstance(body, expect):
        close_all(body_fds(body))
        raise RemoteProtocolError(
            f"expected {expect.__name__}, server replied {type(body).__name__}"
        )
    return body


def body_fds(body: Body) -> list[Any]:
    """Every descriptor a decoded body holds.

    `RegionInfo.fds` hides the fd of a truncated reply (it would not be *sent*), but a
    received one may still carry it, and then we own it.
    """
    fds = list(body.fds)
    fd = getattr(body, "fd", None)
    if fd is not None and not any(f is fd for f in fds):
        fds.append(fd)
    return fds


def event_fds(event: Event | None) -> list[Any]:
    """Every descriptor an incoming message holds, whatever it turned out to be."""
    if isinstance(event, Reply | Request):
        return body_fds(event.body)
    if isinstance(event, BadRequest):
        return list(event.error.fds)
    return []


__all__ = ["VfioUserError", "body_fds", "check_reply", "event_fds", "reply_body"]

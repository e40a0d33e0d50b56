"""The message log of `vfiouser-srv -v`: one line per message, each way.

`trace-on` (control socket) gives one device its own logger, writing to a file; the log
functions take the logger to use.

Logged to `vfiouser_srv.wire` at DEBUG (the CLI's `-v` turns that logger on), so a server
that is not asked to log pays one `isEnabledFor` per read and nothing per message.

See docs/architecture.md, "Layers".
"""

from __future__ import annotations

import logging

from protocol import (
    HEADER,
    HEADER_SIZE,
    Body,
    Command,
    ErrorReply,
    Event,
    Reply,
    Request,
)

wire_log = logging.getLogger("vfiouser_srv.wire")


def enabled() -> bool:
    return wire_log.isEnabledFor(logging.DEBUG)


def _label(command: int) -> str:
    return Command(command).name if command in Command._value2member_map_ else str(command)


def log_fast(
    name: str, msg_id: int, command: int, flags: int, size: int, logger: logging.Logger = wire_log
) -> None:
    """A request served by the region fast path (no message object exists)."""
    logger.debug(
        "%s <- id=%d %s size=%d flags=%#x fds=0", name, msg_id, _label(command), size, flags
    )


def log_in(name: str, ev: Event, logger: logging.Logger = wire_log) -> None:
    """One line per incoming message: id, command, size, flags, fds (and a summary)."""
    if isinstance(ev, Request):
        logger.debug(
            "%s <- id=%d %s size=%d flags=%#x fds=%d %s",
            name,
            ev.msg_id,
            ev.body.COMMAND.name,
            ev.size,
            ev.flags,
            len(ev.body.fds),
            _brief(ev.body),
        )
    elif isinstance(ev, Reply):
        logger.debug(
            "%s <- id=%d %s reply fds=%d", name, ev.msg_id, ev.body.COMMAND.name, len(ev.body.fds)
        )
    elif isinstance(ev, ErrorReply):
        logger.debug(
            "%s <- id=%d command %d error reply errno=%d", name, ev.msg_id, ev.command, ev.errno
        )
    else:
        logger.debug("%s <- id=%d command %d rejected: %s", name, ev.msg_id, ev.command, ev.error)


def log_out(name: str, data: bytes, nfds: int, logger: logging.Logger = wire_log) -> None:
    """One line per outgoing message of a batch (header fields only)."""
    pos = 0
    while pos + HEADER_SIZE <= len(data):
        msg_id, command, size, flags, error = HEADER.unpack_from(data, pos)
        logger.debug(
            "%s -> id=%d %s size=%d flags=%#x error=%d fds=%d",
            name,
            msg_id,
            _label(command),
            size,
            flags,
            error,
            nfds if pos == 0 else 0,
        )
        pos += max(size, HEADER_SIZE)


def _brief(body: Body) -> str:
    text = repr(body)
    return text if len(text) <= 120 else text[:117] + "..."


__all__ = ["enabled", "log_fast", "log_in", "log_out", "wire_log"]

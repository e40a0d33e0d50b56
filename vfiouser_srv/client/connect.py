"""Opening a client: connect, start the reader, negotiate VERSION, and always close.

Apart from `Client` because the lifetime (a nursery around the reader, exceptions held until
it has finished) is the caller's concern, not the connection's.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from protocol import Capabilities

from ..transport import FdStream
from .commands import Client


async def connect_unix(path: str | os.PathLike[str]) -> FdStream:
    """Connect to a server's listening socket."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.connect(os.fspath(path))
    except BaseException:
        sock.close()
        raise
    return FdStream(socket.socket(fileno=sock.detach()))


@asynccontextmanager
async def open_client(
    target: str | os.PathLike[str] | FdStream,
    *,
    caps: Capabilities | None = None,
    version: bool = True,
    reply_timeout: float | None = None,
) -> AsyncIterator[Client]:
    """Connect (or adopt a stream), start the reader, negotiate VERSION; close on exit.

    Resource handling: the stream is closed on exit even when it was passed in, along with
    the guest RAM and every fd the client did not hand out.

    Error handling: exceptions from the body (and from VERSION) come out as they are, not
    wrapped in an ExceptionGroup: they are held until the reader's nursery has finished
    and re-raised outside it.
    """
    stream = target if isinstance(target, FdStream) else await connect_unix(target)
    failure: BaseException | None = None
    async with trio.open_nursery() as nursery:
        client = Client(stream, caps=caps, reply_timeout=reply_timeout)
        try:
            await nursery.start(client.run)
            if version:
                await client.version()
            yield client
        except BaseException as exc:
            failure = exc
        finally:
            client.close()
    if failure is not None:
        raise failure


__all__ = ["connect_unix", "open_client"]

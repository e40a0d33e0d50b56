"""One request in flight, awaiting its reply: shared by both ends of a connection.

The server session sends DMA_READ / DMA_WRITE and the client sends everything else, but both
match replies to requests the same way: a dict from msg_id to a `Waiter`, filled in by the
task that reads the socket and awaited by the task that sent the request. The reader never
blocks on the requester, so a waiter is just a slot and an event.

`command` is kept because a reply is matched by msg_id alone: a peer that answers with a
reply of another command (or a recycled id) must be refused, not taken as the answer.

See docs/architecture.md, "Layers".
"""

from __future__ import annotations

from typing import Generic, TypeVar

import trio

R = TypeVar("R")


class Waiter(Generic[R]):
    """The reader sets `result` (or `error`), then `event`; the requester waits on `event`.

    `result` stays None until a reply arrives, so a requester that stopped waiting (a
    timeout) can tell "no reply" from any reply. `abandoned` is for a requester that gave up
    while its msg_id is still in use: the reply may yet come, and whatever it carries (file
    descriptors) must then be released by the reader, since nobody will collect it.
    """

    __slots__ = ("abandoned", "command", "error", "event", "result")

    def __init__(self, command: int) -> None:
        self.command = command
        self.event = trio.Event()
        self.result: R | None = None
        #: raised to the requester instead of returning `result` (undecodable reply, lost
        #: connection)
        self.error: BaseException | None = None
        self.abandoned = False

    @property
    def done(self) -> bool:
        return self.event.is_set()

    def settle(self, result: R | None, error: BaseException | None = None) -> None:
        """Hand the requester its outcome and wake it."""
        self.result, self.error = result, error
        self.event.set()


__all__ = ["Waiter"]

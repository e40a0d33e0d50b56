"""What a live upgrade hands the sessions it holds at a message boundary.

Its own module so `takeover` and `session` share it without the session growing; the
session's side is `Session.request_pause`, `Session._park` and `Pause.hold`. See
docs/architecture.md.
"""

from __future__ import annotations

import logging

import trio

log = logging.getLogger("vfiouser_srv.session")


class Pause:
    """A live upgrade holding sessions at a message boundary (`vfiouser_srv.takeover`).

    Each session it is given to (`Session.request_pause`) stops reading once it has answered
    everything complete it received and its outbox is empty, counts itself in `parked` and
    waits for `done`: then it either serves on (`handed_over` False) or ends without sending
    or detaching anything the next process now owns.
    """

    def __init__(self) -> None:
        self.parked = 0
        #: set (and replaced) whenever a session parks or ends, for the waiting taker
        self.changed = trio.Event()
        self.done = trio.Event()
        self.handed_over = False

    async def hold(self, name: str) -> bool:
        """A session at its message boundary, its outbox empty: count as parked until
        `done`; True when the connection was handed over (the session ends quietly)."""
        self.parked += 1
        self.changed.set()
        try:
            await self.done.wait()
        finally:
            self.parked -= 1
        if self.handed_over:
            log.info("%s: handed over to the next process", name)
        return self.handed_over


__all__ = ["Pause"]

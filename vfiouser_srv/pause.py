"""What a live upgrade hands the sessions it holds at a message boundary.

Its own module so `takeover` and `session` share it without the session growing; the
session's side is `Session.request_pause` and `Session._park`. See docs/architecture.md.
"""

from __future__ import annotations

import trio


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


__all__ = ["Pause"]

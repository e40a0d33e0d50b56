"""The VERSION deadline of a device's new connections, kept by one task for all of them.

A client has `Limits.version_timeout` to complete VERSION (docs/security.md): one that
connects and says nothing, or trickles bytes, must not hold a connection slot (and, for an
owned group, block its owner) forever. A deadline on each session's cancel scope, set at
accept and lifted at VERSION, cost two trio deadline updates per connection (~3% of a
connect + VERSION + close); here a connection costs a dict insert and a pop, and one task,
started with the first deadline and ending one timeout after the last one went, sleeps
until the oldest one and disconnects whoever has not completed VERSION by then
(`force_close`: the session detaches and closes as on any other disconnect).

Deadlines come due in arrival order: one server has one timeout, so a later connection
never has an earlier deadline.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import trio

log = logging.getLogger("vfiouser_srv.session")


class Negotiating(Protocol):
    """A connection that has not completed VERSION (a `Session`)."""

    name: str

    def force_close(self) -> None: ...


class VersionDeadlines:
    """The pending VERSION deadlines of one device's connections (see the module docstring)."""

    def __init__(self, spawn: Callable[..., object], timeout: float) -> None:
        #: starts the task (the server's `start_soon`)
        self._spawn = spawn
        self.timeout = timeout
        #: connection -> trio time of its deadline, oldest first
        self._pending: dict[Negotiating, float] = {}
        self._running = False

    def add(self, conn: Negotiating) -> None:
        """`conn` was accepted: it must complete VERSION within `timeout`."""
        self._pending[conn] = trio.current_time() + self.timeout
        if not self._running:
            self._running = True
            self._spawn(self._run)

    def discard(self, conn: Negotiating) -> None:
        """`conn` completed VERSION, or ended: no deadline any more."""
        self._pending.pop(conn, None)

    def __len__(self) -> int:
        return len(self._pending)

    async def _run(self) -> None:
        pending = self._pending
        lingered = False
        try:
            while True:
                if not pending:
                    # Most connections complete VERSION before this task first runs: wait
                    # one timeout for the next before ending (a task per connection would
                    # cost more than the deadlines it replaces). A deadline added meanwhile
                    # comes due after this sleep ends.
                    if lingered:
                        return
                    lingered = True
                    await trio.sleep(self.timeout)
                    continue
                lingered = False
                conn, deadline = next(iter(pending.items()))
                if trio.current_time() < deadline:
                    await trio.sleep_until(deadline)
                    continue
                del pending[conn]
                log.warning("%s: no VERSION within %.1fs; disconnecting", conn.name, self.timeout)
                conn.force_close()
        finally:
            self._running = False


__all__ = ["Negotiating", "VersionDeadlines"]

"""Everything one connection sends, in order, without the reader ever waiting in send().

The reader must not block in send(): the peer may itself be blocked sending to us (a large
DMA_READ reply while we send a large DMA_WRITE), and then neither side would read again.
So replies and our own requests alike go through one FIFO drained by a writer task; when
the FIFO is empty the bytes are sent directly (the common case: one syscall, no task
switch). Only `Outbox` touches the socket for sending, and the direct send happens without
a checkpoint, so messages can never interleave. A peer that stops reading is stopped at
`WRITE_BACKLOG_LIMIT` queued bytes: `flush` then waits, so the reader stops reading too
(backpressure, docs/security.md).

The writer task starts the first time something has to be queued (`start_in` says how to
spawn it: the session passes the server's `start_soon`, so no connection opens a nursery of
its own for it): most connections never fill their socket, and a task per connection that
only ever waited was part of what made a connection cost ten times the C reference's. The
session `stop`s it when the connection ends. Its three Events are built when first waited
on, for the same reason.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import trio

from . import wirelog
from .transport import FdStream

log = logging.getLogger(__name__)

#: replies the writer may hold for a peer that is not reading before the reader stops
#: reading too (backpressure)
WRITE_BACKLOG_LIMIT = 8 << 20


class Outbox:
    """The outgoing side of one connection (see the module docstring)."""

    def __init__(self, stream: FdStream, name: str) -> None:
        self.stream = stream
        self.name = name
        #: log every message sent (`vfiouser-srv -v`), set by the session
        self.verbose = False
        #: where the message log goes (the session's `set_trace`)
        self.wire = wirelog.wire_log
        #: the session's `trace.Tracer` (None: not tracing) and its connection id there
        self.tracer: Any = None
        self.trace_conn = 0
        #: the connection is closing: `flush` stops waiting for room
        self.closing = False
        #: a send failed: the peer is gone, everything queued was dropped
        self.broken = False
        self._queue: deque[tuple[bytes, tuple[Any, ...]]] = deque()
        self.backlog = 0
        #: the writer's wake-up, "backlog below the limit" and "queue empty" signals; None
        #: until somebody waits on them (most connections never do)
        self._wakeup: trio.Event | None = None
        self._room: trio.Event | None = None
        self._empty: trio.Event | None = None
        #: how the writer starts when first needed (`start_in`: ``spawn(self.run)``)
        self._spawn: Callable[..., object] | None = None
        self._writer = False
        #: the writer's scope while it runs (`stop` cancels it)
        self._writer_scope: trio.CancelScope | None = None
        self._stopped = False

    def start_in(self, spawn: Callable[..., object]) -> None:
        """Start the writer with ``spawn(self.run)`` when something is first queued (now,
        if it is)."""
        self._spawn = spawn
        if self._queue:
            self._start_writer()

    def _start_writer(self) -> None:
        if not self._writer and self._spawn is not None and not self._stopped:
            self._writer = True
            self._spawn(self.run)

    def stop(self) -> None:
        """The connection is over: end the writer (or keep it from starting)."""
        self._stopped = True
        if self._writer_scope is not None:
            self._writer_scope.cancel()

    @property
    def pending(self) -> bool:
        return bool(self._queue)

    def send(self, data: bytes, fds: tuple[Any, ...] = ()) -> None:
        """Queue one whole message (or batch) for the peer; never waits."""
        if self.broken:
            return
        if not self._queue:
            try:
                sent = self.stream.send_some(data, fds)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._broke(exc)
                return
            if sent == len(data):
                return
            if sent:
                data, fds = data[sent:], ()
        self._queue.append((data, fds))
        self.backlog += len(data)
        if self._writer:
            if self._wakeup is not None:
                self._wakeup.set()
        else:
            self._start_writer()

    def send_batch(self, out: list[bytes], fds: tuple[Any, ...] = ()) -> None:
        """`send` for a list of replies, joined into one sendmsg; empties the list."""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        if self.verbose:
            wirelog.log_out(self.name, data, len(fds), self.wire)
        if self.tracer is not None:
            self.tracer.outgoing(self.trace_conn, data, fds)
        self.send(data, fds)

    async def flush(self, out: list[bytes], fds: tuple[Any, ...] = ()) -> None:
        """Send a batch; wait only while the peer has left too much unread."""
        if out:
            self.send_batch(out, fds)
        while self.backlog > WRITE_BACKLOG_LIMIT and not self.closing and not self.broken:
            room = self._room = trio.Event()
            await room.wait()

    async def drain(self, timeout: float) -> None:
        """Wait (at most `timeout`) until everything queued went out or the peer broke."""
        if not self._queue or self.broken:
            return  # the usual case: no timer, no cancel scope
        with trio.move_on_after(timeout):
            while self._queue and not self.broken:
                empty = self._empty
                if empty is None or empty.is_set():
                    empty = self._empty = trio.Event()
                await empty.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The writer task: sends what `send` could not, in order."""
        task_status.started()
        if self._stopped:  # the connection ended before the writer first ran
            return
        with trio.CancelScope() as self._writer_scope:
            await self._write()

    async def _write(self) -> None:
        while True:
            while not self._queue:
                if self._empty is not None:
                    self._empty.set()
                wakeup = self._wakeup = trio.Event()
                await wakeup.wait()
            data, fds = self._queue[0]
            try:
                await self.stream.send(data, fds)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._broke(exc)
                return
            self._queue.popleft()
            self.backlog -= len(data)
            if self.backlog <= WRITE_BACKLOG_LIMIT and self._room is not None:
                self._room.set()

    def _broke(self, exc: Exception) -> None:
        log.info("%s: send failed (%s)", self.name, exc)
        self._drop()

    def abandon(self) -> None:
        """The connection is being closed by force (`Session.force_close`): drop what is
        queued, send nothing more, and wake whoever waits for room or for the queue to
        empty (the session has no cancel scope of its own to interrupt them)."""
        self.closing = True
        self._drop()
        if self._writer_scope is not None:
            self._writer_scope.cancel()

    def _drop(self) -> None:
        """Nothing more goes out (`broken`): the queue is freed and whoever waits for room
        or for it to empty is woken."""
        self.broken = True
        self._queue.clear()
        self.backlog = 0
        if self._room is not None:
            self._room.set()
        if self._empty is not None:
            self._empty.set()

    def clear(self) -> None:
        """Drop whatever is queued (the connection is gone): frees its memory at once."""
        self._queue.clear()
        self.backlog = 0


__all__ = ["WRITE_BACKLOG_LIMIT", "Outbox"]

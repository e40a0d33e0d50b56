"""Adaptive polling of shadow SQ tails after a doorbell-served batch.

Why: with shadow doorbells (Doorbell Buffer Config) the host writes each new SQ tail to
guest memory and rings the MMIO doorbell only when the tail passes the event index we
publish. `doorbell_io.DoorbellIo._fetch_now` publishes "seen up to here" when it has
drained a queue, so the next submission rings: a trapped MMIO write in the vCPU, a
vfio-user message, our wake-up. A guest doing synchronous I/O (`dd` with O_DIRECT) submits
its next command soon after our interrupt; while we poll the shadow tail instead, the
event index stays behind, the host does not ring, and we see the command without a
message.

The window adapts like virtio's (`devices/virtio/worker.py`) and KVM's halt polling: it
starts at 0 (no polling); when an MMIO doorbell comes within `limit` of the moment we
published the event index, a longer poll would have caught it and the window doubles
(from `POLL_START` up to `limit`, the `poll_us` option); when it came later, the window
halves (to 0 below `POLL_START`). So sequential reads, whose next command comes a few
hundred µs after the interrupt in a TCG guest, are polled, and writes filling 1 MiB in the
guest for milliseconds between commands are not. Each probe is a trio checkpoint (other
tasks and connections are served in between); an idle guest costs no CPU once the window
ends. Polling is never device state: whatever stops it (quiesce, reset, a worker step, the
engine cancelling device tasks) publishes the event index first, so the host rings again.
"""

from __future__ import annotations

from typing import Protocol

import trio

from .queue import SubmissionQueue

#: the first window after an MMIO doorbell a longer poll would have avoided (s)
POLL_START = 10e-6


class PollingHost(Protocol):
    """What the poller needs of the worker (`doorbell_io.DoorbellIo`)."""

    _nursery: trio.Nursery | None

    def can_fetch_now(self) -> bool: ...

    def _fetch_now(self, sq: SubmissionQueue) -> bool: ...

    def _publish_event_idx(self, sq: SubmissionQueue) -> bool: ...

    def _shadow_tail_now(self, sq: SubmissionQueue) -> bool: ...

    def kick(self) -> None: ...


class SqPoller:
    """The polling of one controller's I/O SQs (module docstring)."""

    def __init__(self, host: PollingHost, limit: float) -> None:
        self.host = host
        self.limit = limit
        self.window = 0.0
        #: SQ ID -> (the SQ being polled, trio time its window ends)
        self.until: dict[int, tuple[SubmissionQueue, float]] = {}
        #: SQ ID -> when we published its event index (for the adaptation)
        self.published: dict[int, float] = {}
        self.running = False
        #: probes that found a command (statistics, tests)
        self.hits = 0

    def hold(self, sq: SubmissionQueue) -> bool:
        """`sq` was just drained: True to keep polling it (leave the event index behind),
        False to publish the event index now (no window, or no worker nursery)."""
        nursery = self.host._nursery
        if self.window <= 0 or nursery is None:
            return False
        self.until[sq.qid] = (sq, trio.current_time() + self.window)
        if not self.running:
            self.running = True
            nursery.start_soon(self._run, name="nvme-sq-poll")
        return True

    def published_now(self, sq: SubmissionQueue) -> None:
        """The event index of `sq` was published (so the host will ring when it submits)."""
        if self.limit > 0:
            self.published[sq.qid] = trio.current_time()

    def mmio_doorbell(self, sq: SubmissionQueue) -> None:
        """The host rang `sq`'s MMIO doorbell: adapt the window to how long it was since we
        published the event index."""
        since = self.published.pop(sq.qid, None)
        if since is None:
            return
        if trio.current_time() - since <= self.limit:
            self.window = min(self.limit, max(2 * self.window, POLL_START))
        else:
            self.window /= 2
            if self.window < POLL_START:
                self.window = 0.0

    def stop(self) -> None:
        """Publish every polled SQ's event index now (quiesce, a worker step, the end)."""
        for qid, (sq, _end) in list(self.until.items()):
            del self.until[qid]
            self._publish(sq)

    def forget(self) -> None:
        """The queues are gone (controller reset): nothing to publish."""
        self.until.clear()
        self.published.clear()

    def _publish(self, sq: SubmissionQueue) -> None:
        """Publish `sq`'s event index; a command the host added meanwhile is fetched (or
        left to the worker)."""
        host = self.host
        if (host._publish_event_idx(sq) and sq.pending
                and not (host.can_fetch_now() and host._fetch_now(sq))):
            host.kick()

    async def _run(self) -> None:
        host = self.host
        try:
            while self.until:
                await trio.sleep(0)
                if not host.can_fetch_now():
                    break  # the worker takes over; `stop` publishes first
                now = trio.current_time()
                for qid, entry in list(self.until.items()):
                    if self.until.get(qid) is not entry:
                        continue
                    sq, end = entry
                    if not host._shadow_tail_now(sq):
                        del self.until[qid]
                        host.kick()
                    elif sq.pending:
                        del self.until[qid]
                        self.hits += 1
                        if not host._fetch_now(sq):  # polls on when drained (`hold`)
                            host.kick()
                    elif now >= end:
                        del self.until[qid]
                        self._publish(sq)
        finally:
            self.running = False
            self.stop()

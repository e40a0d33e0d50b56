"""The generic queue worker: batches of requests, then adaptive polling, then sleep.

Why a module of its own: the transport serves registers; this is the loop every request
queue runs (virtio-blk's queues, virtio-net's transmit queue), and its polling policy is
the part with a speed/CPU trade-off worth reading on its own.

Why poll: a guest doing synchronous I/O (``dd`` with O_DIRECT, one request at a time)
submits its next request shortly after our interrupt. While the worker polls the avail
ring, notifications stay suppressed: with VIRTIO_F_RING_EVENT_IDX the driver kicks only
when its new index passes ``avail_event``, which we leave behind the requests we already
took; without it, USED_F_NO_NOTIFY is set (`Virtqueue.disable_notify`). So the driver skips
its notify write (a trapped MMIO access in QEMU and a vfio-user message to us) and we skip
the wake-up. Polling starts only after a batch and ends a window after the last one, then
the worker re-enables notifications, checks the ring once more (the race with a driver that
added a buffer meanwhile) and sleeps on its kick: an idle guest costs no CPU. Each probe is
a trio checkpoint, so other tasks and connections are served in between.

The window adapts, like KVM's halt polling: it starts at 0; when a kick comes within
`poll_window` (the `poll_us` option) of going to sleep, a longer poll would have caught it
and the window doubles (from `POLL_START`, up to `poll_window`); when the sleep was longer,
it halves (to 0 below `POLL_START`). So a guest whose next request comes soon (a stream of
frames) is polled, and one that computes for milliseconds between requests (``dd`` filling
1 MiB in a TCG guest) is not: there polling only burnt CPU the guest's vCPU needed.
`poll_us=0` turns it off (every request is kicked, as before).
"""

from __future__ import annotations

from typing import Protocol

import trio

from devices.sdk.interface import DmaPort

from .guestmem import GuestMemoryError, MemoryRetry
from .virtqueue import Chain, Virtqueue

#: the first window after a sleep that a longer poll would have avoided (s)
POLL_START = 10e-6


class PollWindow:
    """The adaptive poll window of one queue (module docstring)."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.window = 0.0
        #: when the worker last went to sleep, or the notify handler re-armed for it
        #: (`rearm_after_inline`): what the next kick's sleep is measured from
        self.since = 0.0

    def slept(self, seconds: float) -> None:
        """The worker slept `seconds` until the driver's kick."""
        if seconds <= self.limit:
            self.window = min(self.limit, max(2 * self.window, POLL_START))
        else:
            self.window /= 2
            if self.window < POLL_START:
                self.window = 0.0


def rearm_after_inline(poll: PollWindow | None, queue: Virtqueue, dma: DmaPort, *,
                       later: bool = False) -> bool:
    """After the notify handler served a sleeping worker's ring (`serve_inline`): True
    when it also re-armed notifications, so the worker may sleep on.

    Why: woken, the worker would only find the ring empty, keep its window at 0 and
    re-arm (~90-110k instructions per 1 MiB read in `benchmarks/virtio_blk_read.py`;
    a write woke it twice: to wait for the thread, then to re-arm), off the critical path
    but on CPUs the guest shares. Only when that is all it would do: its window is 0 and
    this kick would not open one (it came later than the poll limit), the rings are
    mmap'd and nothing arrived meanwhile; otherwise the kick wakes it. (Writes the
    handler left in a thread need no worker: their hand-back completes them, or wakes it
    when it cannot; `later`: that hand-back re-arms, so the handler returns sooner and
    the thread, which needs the GIL before its `pwritev`, starts sooner.)
    The kick's time becomes the sleep's start, as if the worker had gone back to sleep.
    Raises `VirtqueueError` for a malformed avail index (the caller wakes the worker,
    which meets it and resets the device)."""
    if poll is None or poll.window:
        return False
    now = trio.current_time()
    if poll.limit and now - poll.since <= poll.limit:
        return False  # the window would open: the worker polls
    if not later and queue.enable_notify_mapped(dma) is not False:
        return False
    poll.since = now
    return True


class QueueDevice(Protocol):
    """What the loop needs of `transport.VirtioPciDevice` (declared here so the transport
    can import this module, not the other way round)."""

    quiescing: bool
    poll_window: float
    #: each queue's poll window, while its worker runs (`rearm_after_inline` reads it)
    polls: list[PollWindow | None]

    @property
    def dma(self) -> DmaPort: ...

    def serve_inline(self, queue: Virtqueue) -> bool | None: ...

    async def settle(self, queue: Virtqueue) -> bool: ...

    async def process_batch(self, queue: Virtqueue,
                            chains: list[Chain]) -> list[tuple[int, int]]: ...

    async def complete(self, queue: Virtqueue, done: list[tuple[int, int]]) -> None: ...

    async def wait_kick(self, queue: Virtqueue) -> None: ...


async def serve_requests(dev: QueueDevice, queue: Virtqueue) -> None:
    """Serve `queue` until the device quiesces (cancellation ends it otherwise).

    Whatever `serve_inline` left running (virtio-blk's writes, in threads) is waited for
    before anything else is popped or completed (ring order, FLUSH after earlier writes),
    and before the worker ends, shielded: a reset, quiesce or detach waits for the worker,
    so none of them goes on while such a write still runs or can still be posted."""
    try:
        await _serve(dev, queue)
    finally:
        with trio.CancelScope(shield=True):
            await dev.settle(queue)


async def _serve(dev: QueueDevice, queue: Virtqueue) -> None:
    retry = MemoryRetry()
    poll = dev.polls[queue.index] = PollWindow(dev.poll_window)
    poll_until = 0.0
    while not dev.quiescing:
        if await dev.settle(queue):
            poll_until = trio.current_time() + poll.window
        # cached reads served, writes started, the notify handler's way (no batch objects)
        served = dev.serve_inline(queue)
        if served:
            poll_until = trio.current_time() + poll.window
            await trio.lowlevel.checkpoint()
            continue
        dma = dev.dma
        start = queue.last_avail_idx
        chains: list[Chain] = []
        try:
            # None: the rings were just seen empty (a poll probe costs one look, not two)
            chains = await queue.pop_all(dma) if served is not None else []
            done = await dev.process_batch(queue, chains) if chains else []
        except GuestMemoryError as exc:
            # Nothing was pushed yet: give the chains back and try again shortly.
            queue.rewind(start)
            await retry.wait(exc)
            continue
        retry.reset()
        if chains:
            await dev.complete(queue, done)
            poll_until = trio.current_time() + poll.window
            # With mmap'd rings and page-cache reads a batch may not await anything for
            # real: a guest that keeps its ring full must not starve the other devices.
            await trio.lowlevel.checkpoint()
            continue
        if trio.current_time() < poll_until:
            await trio.lowlevel.checkpoint()
            continue
        poll.since = trio.current_time()
        used = queue.used_idx
        await dev.wait_kick(queue)
        if poll.limit:
            poll.slept(trio.current_time() - poll.since)
            if poll.window:
                await queue.disable_notify(dev.dma)
        if queue.used_idx != used:
            # The notify handler served the requests (`serve_inline`): poll after them as
            # after a batch of ours. Until we sleep again (`wait_kick` re-arms), an EVENT_IDX
            # driver does not kick: avail_event stays where we left it.
            poll_until = trio.current_time() + poll.window

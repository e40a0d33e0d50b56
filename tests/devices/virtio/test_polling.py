"""Adaptive polling after activity and the notification suppression that goes with it
(`worker.serve_requests`): the window grows while kicks come soon after the worker went to
sleep and shrinks when they do not; requests the driver adds without kicking are served
while the worker polls, notifications are re-enabled when polling ends, and nothing is
polled without activity."""

from __future__ import annotations

from collections.abc import Callable

import trio

from devices.virtio.blk import BlkFeature, ReqType, VirtioBlk
from devices.virtio.spec import Feature
from devices.virtio.transport import MAX_POLL_US
from devices.virtio.virtqueue import USED_F_NO_NOTIFY, Virtqueue
from devices.virtio.worker import POLL_START, PollWindow

from ..fakes import FakeContext
from .driver import Driver
from .test_blk import HDR, STATUS_BYTE

EVENT_IDX = int(Feature.VERSION_1 | Feature.RING_EVENT_IDX | BlkFeature.FLUSH)
NO_EVENT_IDX = int(Feature.VERSION_1 | BlkFeature.FLUSH)
#: long enough that a test step never outlives it by accident on a loaded host
WINDOW_US = 10_000  # 10 ms
#: a poll limit no stall of a loaded host outlasts (set on the device, past the option's cap)
LONG = 5.0


def flush(drv: Driver, *, kick: bool) -> int:
    """A FLUSH request made available; notified only when `kick`."""
    head = drv.rings[0].add([(HDR, 16)], [(STATUS_BYTE, 1)])
    drv.ram[HDR : HDR + 4] = int(ReqType.FLUSH).to_bytes(4, "little")
    if kick:
        drv.kick(0)
    return head


def used_flags(drv: Driver) -> int:
    ring = drv.rings[0]
    return ring.u16(ring.used)


async def quiet(seconds: float) -> None:
    await trio.sleep(seconds)


async def warm_up(drv: Driver, requests: int = 16) -> None:
    """Kicked requests in quick succession: each kick comes soon after the worker slept,
    so its poll window doubles up to the limit."""
    for _ in range(requests):
        head = flush(drv, kick=True)
        assert await drv.wait_used(0) == [(head, 1)]


def record_completions(dev: VirtioBlk, drv: Driver) -> list[tuple[int, int, int]]:
    """(used flags, avail_event, avail idx) as the worker leaves them when it completes each
    batch: read then, not after the test task runs again (on a loaded host the poll window
    may be over by then, and a check made afterwards would race with it)."""
    seen: list[tuple[int, int, int]] = []
    complete = dev.complete
    ring = drv.rings[0]

    async def recording_complete(queue: Virtqueue, done: list[tuple[int, int]]) -> None:
        seen.append((used_flags(drv), ring.avail_event(), ring.avail_idx))
        await complete(queue, done)

    dev.complete = recording_complete  # type: ignore[method-assign]
    return seen


async def until_polling(drv: Driver, tries: int = 200,
                        polled: Callable[[], bool] | None = None) -> None:
    """Requests at a steady pace until one is served without a kick (the window grew
    enough) and `polled` (if given) agrees it was served by polling (not by the worker's
    re-check of the ring right after re-enabling notifications, which also needs no kick);
    each one that is not gets its kick, which grows the window further."""
    ring = drv.rings[0]
    for _ in range(tries):
        head = flush(drv, kick=False)
        for _ in range(5):
            await trio.sleep(0.001)
            if ring.take_used() == [(head, 1)]:
                if polled is None or polled():
                    return
                break
        else:
            drv.kick(0)
            assert await drv.wait_used(0) == [(head, 1)]
    raise AssertionError(f"never polled in {tries} requests")


def test_blk_default_window_covers_a_guest_reading_one_request_at_a_time() -> None:
    """A TCG guest's O_DIRECT reads (dd, 1 MiB each) come ~0.5-0.6 ms after our interrupt:
    virtio-blk's default window must grow to cover that (the transport's 200 us did not,
    and every read paid a notify), while ~2 ms write gaps leave it at 0."""
    dev = VirtioBlk(size=1 << 20)
    assert dev.poll_window == 1e-3
    reads = PollWindow(dev.poll_window)
    for _ in range(12):
        reads.slept(600e-6)  # the worker slept 0.6 ms until the next read's kick
    assert reads.window >= 600e-6
    writes = PollWindow(dev.poll_window)
    for _ in range(12):
        writes.slept(2.2e-3)
    assert writes.window == 0.0


def test_window_grows_on_short_sleeps_and_shrinks_on_long_ones() -> None:
    poll = PollWindow(200e-6)
    assert poll.window == 0.0  # no polling before any evidence
    poll.slept(50e-6)
    assert poll.window == POLL_START
    for _ in range(10):
        poll.slept(50e-6)
    assert poll.window == 200e-6  # capped at poll_us
    poll.slept(3e-3)  # the guest computed for 3 ms: polling would not have caught it
    assert poll.window == 100e-6
    for _ in range(5):
        poll.slept(3e-3)
    assert poll.window == 0.0
    off = PollWindow(0.0)
    off.slept(0.0)
    assert off.window == 0.0


async def test_requests_without_kick_served_while_polling(ctx: FakeContext) -> None:
    dev = VirtioBlk(size=1 << 20, poll_us=MAX_POLL_US)
    dev.poll_window = LONG  # the whole test polls, however slow the host
    drv = Driver(dev, ctx.dma.ram)
    dev.attach(ctx)
    drv.setup(EVENT_IDX)
    await quiet(0.01)
    ring = drv.rings[0]
    assert ring.avail_event() == 0  # idle worker: notifications on
    seen = record_completions(dev, drv)

    def event_behind() -> bool:
        # avail_event stayed behind the index before the request (the worker did not ask
        # for a kick at it), so a Linux driver would not have kicked: vring_need_event is
        # false. (A request the worker finds when it re-checks after asking for that kick
        # is served without one too, with avail_event at it: not polling, try again.)
        _, event, idx = seen[-1]
        return event != (idx - 1) & 0xFFFF

    await until_polling(drv, polled=event_behind)
    dev.close()


async def test_polling_ends_and_notifications_come_back(ctx: FakeContext) -> None:
    dev = VirtioBlk(size=1 << 20, poll_us=WINDOW_US)
    drv = Driver(dev, ctx.dma.ram)
    dev.attach(ctx)
    drv.setup(EVENT_IDX)
    ring = drv.rings[0]
    await warm_up(drv)
    await quiet(10 * WINDOW_US / 1e6)
    # The worker sleeps again and asked for a kick at the next index.
    assert ring.avail_event() == 16
    late = flush(drv, kick=False)
    await quiet(5 * WINDOW_US / 1e6)
    assert ring.take_used() == [], "served without a kick after polling ended"
    drv.kick(0)
    assert await drv.wait_used(0) == [(late, 1)]
    dev.close()


async def test_without_event_idx_no_notify_flag_while_polling(ctx: FakeContext) -> None:
    dev = VirtioBlk(size=1 << 20, poll_us=MAX_POLL_US)
    dev.poll_window = LONG
    drv = Driver(dev, ctx.dma.ram)
    dev.attach(ctx)
    drv.setup(NO_EVENT_IDX)
    await quiet(0.01)
    assert not used_flags(drv) & USED_F_NO_NOTIFY
    seen = record_completions(dev, drv)
    await until_polling(drv)
    # the request served without its kick was completed with the flag up: the driver skips
    # its kicks meanwhile
    assert seen[-1][0] & USED_F_NO_NOTIFY
    dev.close()


async def test_without_event_idx_flag_cleared_after_polling(ctx: FakeContext) -> None:
    dev = VirtioBlk(size=1 << 20, poll_us=WINDOW_US)
    drv = Driver(dev, ctx.dma.ram)
    dev.attach(ctx)
    drv.setup(NO_EVENT_IDX)
    await warm_up(drv)
    await quiet(10 * WINDOW_US / 1e6)
    assert not used_flags(drv) & USED_F_NO_NOTIFY
    dev.close()


async def test_poll_zero_never_polls(ctx: FakeContext) -> None:
    dev = VirtioBlk(size=1 << 20, poll_us=0)
    drv = Driver(dev, ctx.dma.ram)
    dev.attach(ctx)
    drv.setup(EVENT_IDX)
    await warm_up(drv)
    assert drv.rings[0].avail_event() == 16
    flush(drv, kick=False)
    await quiet(0.05)
    assert drv.rings[0].take_used() == []
    dev.close()


async def test_idle_worker_does_not_spin(ctx: FakeContext) -> None:
    """Without activity the worker sleeps on its kick: no checkpoints in a busy loop."""
    dev = VirtioBlk(size=1 << 20, poll_us=WINDOW_US)
    drv = Driver(dev, ctx.dma.ram)
    dev.attach(ctx)
    drv.setup(EVENT_IDX)
    await warm_up(drv)
    await quiet(10 * WINDOW_US / 1e6)
    pops = 0
    real_pop = dev.queues[0].pop

    async def counting_pop(dma: object) -> object:
        nonlocal pops
        pops += 1
        return await real_pop(dma)  # type: ignore[arg-type]

    dev.queues[0].pop = counting_pop  # type: ignore[method-assign, assignment]
    await quiet(0.1)
    assert pops == 0
    dev.close()


async def test_a_ring_kept_full_does_not_starve_other_tasks(ctx: FakeContext) -> None:
    """A guest refilling its ring as fast as we complete (an in-memory disk: no batch
    awaits for real) must leave the trio thread to other tasks between batches."""
    dev = VirtioBlk(size=1 << 20)
    drv = Driver(dev, ctx.dma.ram)
    dev.attach(ctx)
    drv.setup(EVENT_IDX)
    ring = drv.rings[0]
    batches = 0
    flooding = True
    others = 0
    real_complete = dev.complete

    async def refill(queue: Virtqueue, done: list[tuple[int, int]]) -> None:
        nonlocal batches, flooding
        await real_complete(queue, done)
        ring.take_used()
        batches += 1
        if batches < 300:  # the "vCPU" adds more before the worker looks again
            for _ in range(4):
                flush(drv, kick=False)
        else:
            flooding = False

    async def other() -> None:
        nonlocal others
        while flooding:
            others += 1
            await trio.lowlevel.checkpoint()

    dev.complete = refill  # type: ignore[method-assign]
    ctx.nursery.start_soon(other)
    flush(drv, kick=True)
    with trio.fail_after(10):
        while flooding:
            await trio.sleep(0.01)
    assert others > 100, f"other tasks ran {others} times during {batches} batches"
    await drv.reset()
    dev.close()

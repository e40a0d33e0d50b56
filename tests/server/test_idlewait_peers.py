"""`IdleWaiter.must_yield` with other waiters in the same trio run: the serial loop's read
must never block on one socket while another connection may need the thread (the
end-to-end view is tests/hostile/test_idle_device_latency.py)."""

from __future__ import annotations

import socket
import time

import trio
import trio.testing

from vfiouser_srv import idlewait
from vfiouser_srv.idlewait import HOT_WAIT, IdleWaiter

from .conftest import python_engine_only

pytestmark = python_engine_only("tests the Python engine's own wait")


async def test_alone_the_read_may_block() -> None:
    a, b = socket.socketpair()
    with a, b:
        waiter = IdleWaiter(a.fileno())
        deadline = waiter.idle_deadline()
        assert deadline is not None
        assert not waiter.must_yield(deadline)  # then the caller blocks in its read


async def test_with_another_waiter_it_waits_on_both_and_never_lets_the_read_block() -> None:
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    with a, b, c, d:
        ours, other = IdleWaiter(a.fileno()), IdleWaiter(c.fileno())
        assert other.idle_deadline() is not None
        deadline = ours.idle_deadline()
        assert deadline is not None
        start = time.monotonic()
        assert ours.must_yield(deadline)  # nothing came: go through trio, do not read
        assert time.monotonic() - start >= HOT_WAIT * 0.9  # it waited in poll() meanwhile
        b.send(b"x")
        assert not ours.must_yield(deadline)  # ours alone is readable: the read returns
        a.recv(1)
        del other
        assert not ours.must_yield(deadline)  # alone again: back to the blocking read


async def test_many_tasks_a_task_later_in_the_batch_is_not_idle() -> None:
    """With more tasks than `_SCAN_LIMIT`, `idle_deadline` reads trio's current batch
    instead of looking at every task: the first of two tasks started together must still
    see the second one pending."""
    a, b = socket.socketpair()
    with a, b:
        seen: list[tuple[str, float | None]] = []

        async def probe(name: str) -> None:
            seen.append((name, IdleWaiter(a.fileno()).idle_deadline()))

        async with trio.open_nursery() as nursery:
            for _ in range(2 * idlewait._SCAN_LIMIT):
                nursery.start_soon(trio.sleep_forever)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(probe, "x")
            nursery.start_soon(probe, "y")
            await trio.sleep(0.05)  # past the batch both run in; the probes have run
            assert len(seen) == 2, seen
            assert seen[0][1] is None, seen  # the other probe was still to run
            nursery.cancel_scope.cancel()

"""Blocking backend work (a pwritev, an fdatasync) in a thread, for any model.

Why not `trio.to_thread.run_sync`: its limiter and context copy nearly doubled the cost of a
hop (70 -> 39 µs measured for nvme), and every write and uncached read pays one. This uses
trio's thread cache directly (`trio.lowlevel.start_thread_soon`).

Why `in_flight`: a thread hands its result back through trio's wake-up socket, which only
trio's epoll sees. An engine that sometimes blocks on one descriptor of its own instead of
in trio's epoll (the Python engine's serial loop blocks in recvmsg on its one client's
socket, for a scheduler tick at most) would notice a finished call only when that wait ends.
It reads `in_flight` and, while a call runs, waits on its descriptor and trio's epoll
together (`vfiouser_srv.idlewait.IdleWaiter.must_yield`). The count lives here, on the
model's side, so a model never learns which engine serves it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import trio

if TYPE_CHECKING:
    import outcome  # trio's own result type (what `start_thread_soon` hands over)

_T = TypeVar("_T")

#: ``in_flight[0]``: calls started by `run_in_thread` in this process whose caller has not
#: resumed yet (a list, so a reader can keep a reference and index it: cheaper per message
#: than a module attribute). Changed only by trio threads, never by the worker threads.
in_flight = [0]


async def run_in_thread(fn: Callable[[], _T]) -> _T:
    """`fn()` in one of trio's cached worker threads; its result or exception.

    Not cancellable once started (a write in flight cannot be taken back): the call
    finishes, and the caller sees a cancel at its next checkpoint after it."""
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()
    result: list[outcome.Outcome[_T]] = []

    def deliver(res: outcome.Outcome[_T]) -> None:
        result.append(res)
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(done.set)

    in_flight[0] += 1
    try:
        trio.lowlevel.start_thread_soon(fn, deliver)
        with trio.CancelScope(shield=True):
            await done.wait()
    finally:
        in_flight[0] -= 1
    return result[0].unwrap()


__all__ = ["in_flight", "run_in_thread"]

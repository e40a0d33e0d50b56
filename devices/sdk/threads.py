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

#: ``in_flight[0]``: calls started by `start_in_thread` in this process whose hand-back has
#: not run on the trio thread yet (a list, so a reader can keep a reference and index it:
#: cheaper per message than a module attribute). Changed only by trio threads, never by the
#: worker threads.
in_flight = [0]


def start_in_thread(fn: Callable[[], _T], then: Callable[[outcome.Outcome[_T]], None]) -> None:
    """Start `fn()` in one of trio's cached worker threads and return at once; `then(result)`
    runs on the trio thread when it is back. For a caller that must not wait (a register
    handler starting a device's I/O); counted in `in_flight` until `then` runs."""
    token = trio.lowlevel.current_trio_token()

    def back(res: outcome.Outcome[_T]) -> None:
        in_flight[0] -= 1
        then(res)

    def deliver(res: outcome.Outcome[_T]) -> None:  # in the worker thread
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(back, res)

    in_flight[0] += 1
    try:
        trio.lowlevel.start_thread_soon(fn, deliver)
    except BaseException:
        in_flight[0] -= 1
        raise


async def run_in_thread(fn: Callable[[], _T]) -> _T:
    """`fn()` in one of trio's cached worker threads; its result or exception.

    Not cancellable once started (a write in flight cannot be taken back): the call
    finishes, and the caller sees a cancel at its next checkpoint after it."""
    done = trio.Event()
    result: list[outcome.Outcome[_T]] = []

    def then(res: outcome.Outcome[_T]) -> None:
        result.append(res)
        done.set()

    start_in_thread(fn, then)
    with trio.CancelScope(shield=True):
        await done.wait()
    return result[0].unwrap()


__all__ = ["in_flight", "run_in_thread", "start_in_thread"]

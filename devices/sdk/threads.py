"""Blocking backend work (a pwritev, an fdatasync) in a thread, for any model.

Why not `trio.to_thread.run_sync`: its limiter and context copy nearly doubled the cost of a
hop (70 -> 39 µs measured for nvme), and every write and uncached read pays one. This uses
trio's thread cache directly (`trio.lowlevel.start_thread_soon`).

Why the loop of near deadlines while the call runs: with trio otherwise idle, the Python
engine's serial loop blocks in recvmsg on the client's socket (for a whole scheduler tick,
4 ms at HZ=250) and notices the thread's wake-up only when that read times out; a trio
deadline closer than its `idlewait.HOT_WAIT` makes it wait in trio's epoll instead, which
wakes the moment the thread is done. It costs a wake-up per `NEAR` only while a call runs,
and keeps the model ignorant of which engine serves it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import trio

if TYPE_CHECKING:
    import outcome  # trio's own result type (what `start_thread_soon` hands over)

_T = TypeVar("_T")

#: while a call runs in a thread, the caller keeps a trio deadline this close (module
#: docstring); below the Python engine's `idlewait.HOT_WAIT` (0.5 ms)
NEAR = 0.0004


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

    trio.lowlevel.start_thread_soon(fn, deliver)
    with trio.CancelScope(shield=True):
        while not done.is_set():
            with trio.move_on_after(NEAR):
                await done.wait()
    return result[0].unwrap()


__all__ = ["NEAR", "run_in_thread"]

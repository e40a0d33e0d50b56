"""Wait for one descriptor when the trio thread has nothing else to do, without a scheduler round.

Why this exists: a serial vfio-user peer (QEMU's vCPU doing one MMIO read at a time, or the
benchmark client) sends a request, waits for the reply, sends the next. Between two requests
the server is idle, and `trio.lowlevel.wait_readable` costs an `epoll_ctl` to arm the
one-shot registration, a pass of trio's run loop, an `epoll_wait`, and another pass to
reschedule the task; trying the read first costs a BlockingIOError when nothing is there.
On our 2-core VMs that made a trio server's serial round trip 2.3x libvfio-user's C sample
even with no request handling at all (benchmarks/README.md, "Serial round trip: where the
time went").

`IdleWaiter` short-cuts that case, and only that case. When no other task is scheduled, none
waits in `trio.testing.wait_all_tasks_blocked`, no instrument is installed, the clock is the
real one and trio is not in guest mode, it blocks in one `poll()` on two descriptors: ours,
and trio's own epoll descriptor. An epoll descriptor polls readable as soon as any
descriptor trio waits on has an event (another connection, the listener, an eventfd, a
worker thread finishing through `run_sync_soon`, a signal through the wakeup socket), and
the poll timeout is the next cancel-scope deadline. So the thread blocks exactly as long as
trio itself would have, and then:

- only our descriptor is ready: the caller reads it at once, no scheduler round;
- anything else (trio has an event, a deadline is due): the caller goes through
  `trio.lowlevel.wait_readable`, so trio handles it first with its usual semantics
  (cancellation, fairness, deadlines).

`Session._serve_serial` goes one step further for a peer that is actively sending: between
messages it asks `must_yield` (one poll(0) on trio's epoll descriptor, plus the checks
above) and then blocks in recvmsg itself for at most `HOT_WAIT`, because waking from a
blocking recvmsg is far quicker than waking from poll() when the peer is on another CPU.
That blocking read sees only its own socket, and SO_RCVTIMEO counts in scheduler ticks
(0.5 ms is one tick: 4 ms at HZ=250), so while any other descriptor uses this module in
the same trio run (another connection, a libvfio-user device), `must_yield` waits in
poll() on ours and trio's epoll descriptor instead, and the read that follows never
blocks: otherwise every request to another device waited a tick behind an idle one
(benchmarks/scale.py: 8 ms per DMA_MAP alternating between two devices, 0.1 ms after).
It does the same while a model's backend call runs in a thread
(`devices.sdk.threads.in_flight`), whose completion only trio's epoll sees.

The fast case is not a checkpoint, like a non-blocking read that succeeds: callers that
loop must checkpoint now and then themselves (`FdStream` and `Session._serve_serial` do every
64 reads). Cancellation is not delayed by it: a cancel can only come from another task
(none can run while we block), a deadline (the poll times out at it) or a signal or thread
(their wakeup makes trio's epoll descriptor readable).

It reads private attributes of trio's runner (`runq`, `tasks` and their `_next_send_fn`
and `_schedule_points`, `deadlines`, `clock`, `instruments`, `waiting_for_idle`,
`io_manager._epoll`, `is_guest`).
They have been stable for years, and pyproject.toml bounds trio to the releases this was
tested with (`TESTED_TRIO`). If a trio release moves them anyway, the probe fails, the
server logs one warning (`vfiouser_srv.idlewait`: the fast wait is off, serial round trips
get about 2x slower) and uses the ordinary path; and
`tests/server/test_idlewait.py::test_fast_path_is_available` fails so we notice.

Off switch: `VFIOUSER_SRV_IDLE_WAIT=0` in the environment turns the fast path (and with it
`Session._serve_serial`) off, for debugging or for a trio this module does not know.

See docs/architecture.md, "The region-access path".
"""

from __future__ import annotations

import logging
import math
import os
import select
import sys
import weakref
from typing import Any

import trio

from devices.sdk.threads import in_flight as _THREADS

log = logging.getLogger(__name__)

#: trio releases whose internals this module was tested against (pyproject.toml pins the
#: same range; CI installs the newest one it allows). Checked 2026-12-07 by running
#: tests/server/test_idlewait.py under each release: 0.30.0 to 0.35.0 pass; up to 0.29 the
#: runner's internals differ and the fast path turns itself off with a warning.
TESTED_TRIO = ">=0.30,<0.36"
#: False when VFIOUSER_SRV_IDLE_WAIT=0: every wait goes through trio's own path
ENABLED = os.environ.get("VFIOUSER_SRV_IDLE_WAIT", "1").strip().lower() not in ("0", "no", "off")
_warned = False

try:  # trio internals: see the module docstring
    from trio._core import _run as _trio_run
except ImportError:  # pragma: no cover - depends on the installed trio
    _trio_run = None  # type: ignore[assignment]
_RUN_CONTEXT: Any = getattr(_trio_run, "GLOBAL_RUN_CONTEXT", None)
#: the code of trio's run loop, whose local `batch` holds the tasks still to run this round
_RUN_LOOP_CODE: Any = getattr(getattr(_trio_run, "unrolled_run", None), "__code__", None)
_SystemClock: Any = getattr(_trio_run, "SystemClock", None)

_POLLIN = select.POLLIN
_INF = math.inf

#: How long `Session._serve_serial` may block in a plain recvmsg for a serial peer's next
#: request (the socket's SO_RCVTIMEO, see `FdStream`), delaying any other trio event by at
#: most this much. Why block in recvmsg at all: with the peer on another CPU (QEMU's vCPU
#: thread and us on CPUs of our own), a task woken out of a blocking recvmsg answered a
#: serial peer in ~35 µs on our VMs, one woken out of poll() or epoll_wait() in ~80 µs
#: (benchmarks/README.md). A vCPU's MMIO accesses come much closer together than this.
HOT_WAIT = 0.0005
#: `HOT_WAIT` as a poll() timeout (whole milliseconds)
_HOT_WAIT_MS = max(1, math.ceil(HOT_WAIT * 1000))
#: Above this many tasks, `idle_deadline` reads the run loop's batch (one `f_locals`,
#: ~1.5 µs) instead of looking at every task (~37 ns each: 12 µs with 64 devices' sessions,
#: more than the rest of a message; benchmarks/scale.py)
_SCAN_LIMIT = 48
#: per trio run, the waiters set up in it: with more than one, nobody may block on one alone
_LIVE: weakref.WeakKeyDictionary[Any, weakref.WeakSet[IdleWaiter]] = weakref.WeakKeyDictionary()
#: per trio run, `_epoll_fd`'s answer and a `select.poll` on that descriptor alone, shared by
#: the run's waiters: checking trio's internals and building the poll object again for every
#: connection was ~4% of a connect (the run's internals cannot change while it runs)
_RUNS: weakref.WeakKeyDictionary[Any, tuple[int | None, Any]] = weakref.WeakKeyDictionary()
#: a waiter's peers before its first use (never added to: one shared empty set)
_NO_PEERS: weakref.WeakSet[IdleWaiter] = weakref.WeakSet()


def _internals_moved(what: str) -> None:
    """Say once per process that the fast wait is off because trio changed under us."""
    global _warned
    if not _warned:
        _warned = True
        log.warning(
            "trio %s: %s; the fast idle wait is off and serial round trips will be about 2x "
            "slower (tested with trio%s; VFIOUSER_SRV_IDLE_WAIT=0 silences this)",
            trio.__version__,
            what,
            TESTED_TRIO,
        )


class _AnyTask:
    """Stands in for a task when the runner has none yet (nothing to contradict)."""

    _next_send_fn = None
    _schedule_points = 0


_ANY_TASK = _AnyTask()


def _epoll_fd(runner: Any) -> int | None:
    """trio's epoll descriptor for `runner`, or None when the fast path cannot be used in
    this run (switched off, another I/O backend, guest mode, changed internals: only the
    last is worth a warning)."""
    if not ENABLED:
        return None
    try:
        epoll = runner.io_manager._epoll
        if not isinstance(epoll, select.epoll) or runner.is_guest:
            return None  # another backend or guest mode: legitimately not ours to shortcut
        if (
            hasattr(runner, "runq")
            and hasattr(runner, "waiting_for_idle")
            and isinstance(runner.tasks, set)
            # one task tells (they are all trio's Task): checking every one made each new
            # connection cost O(tasks in the process)
            and hasattr(next(iter(runner.tasks), _ANY_TASK), "_next_send_fn")
            and hasattr(next(iter(runner.tasks), _ANY_TASK), "_schedule_points")
            and hasattr(runner.deadlines, "next_deadline")
            and isinstance(getattr(runner.deadlines, "_heap", None), list)
            and hasattr(runner.instruments, "data")
            and _SystemClock is not None
        ):
            return epoll.fileno()
    except AttributeError:
        pass
    _internals_moved("the runner's private attributes are not where idlewait expects them")
    return None


def _current_runner() -> Any:
    if _RUN_CONTEXT is None:
        _internals_moved("trio._core._run.GLOBAL_RUN_CONTEXT is gone")
        return None
    return getattr(_RUN_CONTEXT, "runner", None)


def trio_watches(fd: int) -> bool:
    """Whether trio may hold state for `fd` (a task waiting on it, an armed registration),
    so that closing it needs `trio.lowlevel.notify_closing` first.

    trio keeps a record for a descriptor exactly while a task waits on it; without one, its
    epoll holds the descriptor disarmed (EPOLLONESHOT after an event or a cancelled wait)
    or not at all, and close() drops it (a disarmed entry of a file another process still
    holds, e.g. a connection handed over by a live upgrade, never reports). notify_closing
    then only tries an EPOLL_CTL_DEL that fails with ENOENT (a syscall, an OSError and a
    context manager: ~2% of a connect). True whenever we cannot tell."""
    try:
        return fd in _RUN_CONTEXT.runner.io_manager._registered
    except (AttributeError, TypeError):  # not in trio.run, or trio moved its internals
        return True


def available() -> bool:
    """Whether the fast path can be used in the current trio run."""
    runner = _current_runner()
    return runner is not None and _epoll_fd(runner) is not None


class IdleWaiter:
    """Waits for one descriptor to become readable; see the module docstring.

    One per descriptor: it keeps a `select.poll` object with both descriptors registered
    (built again if it is used from another `trio.run`). The caller owns `fd` and must not
    close it while a `wait` is running (as with `trio.lowlevel.wait_readable`).
    """

    __slots__ = (
        "__weakref__", "_busy_step", "_busy_task", "_epoll_poller", "_fd", "_heap_len",
        "_peer_refs", "_peers", "_poller", "_run_frame", "_runner", "busy", "empty",
    )

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._runner: Any = False  # never a runner: the first use sets up
        self._poller: Any = None  # select.poll, or None when the fast path is unavailable
        self._heap_len = 0  # trio's deadline heap size when idle_deadline last looked
        self._epoll_poller: Any = None  # select.poll on trio's epoll descriptor alone
        #: the waiters of this trio run (this one included), see `must_yield`
        self._peers: weakref.WeakSet[IdleWaiter] = _NO_PEERS
        self._peer_refs: set[Any] = _NO_PEERS.data  # type: ignore[attr-defined]
        #: trio's run loop frame (`_batch_pending`), None until needed or when not found
        self._run_frame: Any = None
        #: trio has something to do (`idle_deadline` found a task to run, `must_yield` an
        #: event): `idle_poll` would fail, so the next `wait` goes straight to trio, and
        #: `idle_deadline` says None at once until the task yields (`_busy_step`: looking
        #: at trio's batch costs more than the rest of its checks). Only ever a shortcut.
        self.busy = False
        self._busy_task: Any = None
        self._busy_step = -1
        #: our descriptor has nothing to read (`must_yield` saw only trio's epoll
        #: descriptor; the caller's guess after the last read): the reader skips its
        #: read-first (`FdStream`) until `wait` returns. Stale, it costs a round too.
        self.empty = False

    def _setup(self, runner: Any) -> None:
        self._runner = runner
        self._run_frame = None
        run = _RUNS.get(runner)
        if run is None:
            epfd = _epoll_fd(runner)
            epoll_poller = None
            if epfd is not None:
                epoll_poller = select.poll()
                epoll_poller.register(epfd, _POLLIN)
            run = _RUNS[runner] = (epfd, epoll_poller)
        epfd, self._epoll_poller = run
        if epfd is None:
            self._poller = None
            return
        poller = select.poll()
        poller.register(self._fd, _POLLIN)
        poller.register(epfd, _POLLIN)
        self._poller = poller
        peers = _LIVE.get(runner)
        if peers is None:
            peers = _LIVE[runner] = weakref.WeakSet()
        peers.add(self)
        self._peers = peers
        # the WeakSet's own set of references: its len() is C-level, WeakSet's a Python
        # frame per message (its count is off only while somebody iterates the WeakSet)
        self._peer_refs = peers.data  # type: ignore[attr-defined]

    def idle_deadline(self) -> float | None:
        """None when the fast path does not apply right now (other tasks runnable, an
        instrument installed, another clock, backend or guest mode); otherwise the trio
        time of the next cancel-scope deadline (inf if none) for `poll_until` and
        `must_yield`.

        Valid until the caller next yields to trio: while a task runs synchronously, no
        other task can run, so a caller may serve several messages with one call to this
        and one `poll_until` or `must_yield` per message. (Its own synchronous code can
        still wake a task or set a deadline, e.g. a register write that starts device
        work: both notice that.)"""
        try:
            runner = _RUN_CONTEXT.runner
            if self.busy:  # still in the task step that found trio busy: it still is
                task = _RUN_CONTEXT.task
                if task is self._busy_task and task._schedule_points == self._busy_step:
                    return None
        except AttributeError:  # not inside trio.run, or no trio internals
            if _RUN_CONTEXT is None and ENABLED:
                _internals_moved("trio._core._run.GLOBAL_RUN_CONTEXT is gone")
            return None
        if runner is not self._runner:
            self._setup(runner)
        # Instruments always holds an "_all" key; any other key is a hook somebody installed.
        # A task in `trio.testing.wait_all_tasks_blocked` must be woken by trio when all
        # tasks block, which it cannot do while we block in poll().
        if (
            self._poller is None
            or runner.runq
            or runner.waiting_for_idle
            or len(runner.instruments.data) != 1
            or type(runner.clock) is not _SystemClock
        ):
            self._set_busy()
            return None
        # `runq` is only the *next* batch: trio takes a batch off it and runs the tasks one
        # by one, so tasks later in the batch we run in are scheduled but in no queue. A
        # scheduled task has a pending resume function; we have none while we run.
        if len(runner.tasks) > _SCAN_LIMIT:
            pending = self._batch_pending()
            if pending is None:
                pending = any(task._next_send_fn is not None for task in runner.tasks)
            if pending:
                self._set_busy()
                return None
        else:
            for task in runner.tasks:
                if task._next_send_fn is not None:
                    self._set_busy()
                    return None
        deadline: float = runner.deadlines.next_deadline()
        self._heap_len = len(runner.deadlines._heap)
        return deadline

    def _batch_pending(self) -> bool | None:
        """Whether tasks are left in the batch trio's run loop is running (the local `batch`
        of `unrolled_run`, which it pops as it runs them), or None when that cannot be
        read: then the caller looks at every task. The loop's frame is the caller of the
        running task's outermost coroutine, found once by walking up from here."""
        frame = self._run_frame
        if frame is None:
            frame = sys._getframe(1)
            while frame is not None and frame.f_code is not _RUN_LOOP_CODE:
                frame = frame.f_back
            if frame is None:
                return None
            self._run_frame = frame
        batch = frame.f_locals.get("batch")
        return bool(batch) if isinstance(batch, list) else None

    def poll_until(self, deadline: float) -> bool:
        """Block in `poll()` until our descriptor or trio's epoll descriptor is readable
        or `deadline` (from `idle_deadline`) passes. True when only our descriptor is
        ready: read it now, no scheduler round and no EAGAIN. False otherwise: trio has
        something to do, so go through the ordinary trio path. Data already waiting makes
        the poll return at once, so callers poll first instead of trying a read that may
        raise BlockingIOError (raising costs more in CPython than the poll)."""
        runner = self._runner
        if runner.runq or len(runner.deadlines._heap) != self._heap_len:
            return False  # our own code woke a task or set a deadline: let trio run
        if deadline == _INF:
            timeout = -1
        else:
            left = deadline - runner.clock.current_time()
            if left <= 0:
                return False
            # round up: waking a little after the deadline costs one fallback, not a spin
            timeout = math.ceil(left * 1000)
        events = self._poller.poll(timeout)
        return len(events) == 1 and events[0][0] == self._fd

    def must_yield(self, deadline: float) -> bool:
        """After `idle_deadline`, before a read that may block for up to `HOT_WAIT`: True
        when trio should run first (our own code woke a task or set a deadline, the
        deadline is that close, or trio's epoll descriptor has an event). One poll(0).

        With other waiters in this run (other connections), the read must not block: a
        request to another device would wait behind ours for a whole scheduler tick. The
        same while a model's backend call runs in a thread (`devices.sdk.threads`): its
        completion reaches only trio's epoll, and the device's completion would wait for
        the tick. Then this waits up to `HOT_WAIT` in poll() on both descriptors and says
        False only when our descriptor alone is readable, so the read that follows returns
        at once."""
        runner = self._runner
        if runner.runq or len(runner.deadlines._heap) != self._heap_len:
            self._set_busy()
            return True
        if deadline != _INF and deadline - runner.clock.current_time() <= HOT_WAIT:
            return True
        if len(self._peer_refs) > 1 or _THREADS[0]:
            events = self._poller.poll(_HOT_WAIT_MS)
            if len(events) == 1:
                if events[0][0] == self._fd:
                    return False
                self.empty = True  # (with many connections: the usual way out)
                self._set_busy()
            return True
        if self._epoll_poller.poll(0):
            self._set_busy()
            return True
        return False

    def _set_busy(self) -> None:
        self.busy = True
        task = self._busy_task = _RUN_CONTEXT.task
        self._busy_step = task._schedule_points

    def idle_poll(self) -> bool:
        """`idle_deadline` and `poll_until` in one: False at once when not idle."""
        deadline = self.idle_deadline()
        return deadline is not None and self.poll_until(deadline)

    async def wait(self) -> None:
        """Return when the descriptor is readable (or at EOF or error)."""
        self.empty = False
        if self.busy or not self.idle_poll():
            self.busy = False
            await trio.lowlevel.wait_readable(self._fd)


__all__ = ["ENABLED", "HOT_WAIT", "TESTED_TRIO", "IdleWaiter", "available", "trio_watches"]

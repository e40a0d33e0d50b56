"""The device's tasks for one connection, shared by both engines.

A register write may start device work (`DeviceContext.start_task`) that runs after the
write's reply went out; DEVICE_RESET, a DMA_UNMAP that must quiesce, and the client's
departure all need to cancel that work as a whole and then let new work start. trio's
nursery cannot be restarted after it was cancelled, so `TaskGroup` runs one nursery after
another inside its own task. A device task that raises is logged, never allowed to take the
connection down (a model bug must not disconnect the guest).

A session gives its group a way to spawn the runner (`start_in`: the server's `start_soon`)
instead of starting `run` itself: most connections never start a device task (a probe, a
connect + VERSION, a client that only reads registers), and the runner task, its cancel
scope and its nursery were a fifth of the server's cost of a connection; a nursery of the
session's own only to parent the runner was another sixth. The runner then starts with the
first `start_soon`, which queues its task until the nursery is open (the next scheduler
batch), in order. The session `close`s the group before it ends, so the runner never
outlives its connection.

See docs/architecture.md, "Rules QEMU imposes" (the deadlock rule).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

log = logging.getLogger(__name__)


class TaskGroup:
    """The device's tasks for one connection; cancellable as a whole and restartable."""

    def __init__(self, owner: str, on_failure: Callable[[str], None] | None = None) -> None:
        self.owner = owner
        #: told when a device task raised (health: the device is marked unhealthy)
        self.on_failure = on_failure
        self._nursery: trio.Nursery | None = None
        self._scope: trio.CancelScope | None = None
        #: set while the runner's nursery is open; both Events are built by the runner (most
        #: connections never start one, and two Events were ~3% of a connect's cost)
        self._ready: trio.Event | None = None
        self._stopped: trio.Event | None = None
        self._closing = False
        self.running = 0
        #: how `start_soon` starts the runner on first use (`start_in`, called as
        #: ``spawn(self.run)``); None: the owner runs `run` itself
        self._spawn: Callable[..., object] | None = None
        #: the runner was spawned (it may not have opened its nursery yet)
        self._spawned = False
        #: tasks started before the runner's nursery was open, in order
        self._pending: list[tuple[Callable[..., Awaitable[Any]], tuple[Any, ...], str]] = []

    @property
    def started(self) -> bool:
        """The runner opened its scope at some point: `close` and `cancel_all` wait for it
        (a checkpoint); never started, they return without one."""
        return self._scope is not None

    def start_in(self, spawn: Callable[..., object]) -> None:
        """Run lazily: the first device task starts the runner with ``spawn(self.run)``
        (a nursery's `start_soon`, the server's)."""
        self._spawn = spawn

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        started = False
        while not self._closing:
            self._stopped = stopped = trio.Event()
            try:
                with trio.CancelScope() as scope:
                    self._scope = scope
                    async with trio.open_nursery() as nursery:
                        self._nursery = nursery
                        if self._ready is not None:
                            self._ready.set()
                        pending, self._pending = self._pending, []
                        for fn, args, name in pending:
                            nursery.start_soon(self._guard, fn, args, name=name)
                        if not started:
                            started = True
                            task_status.started()
                        await trio.sleep_forever()
            finally:
                # Also when an outer cancellation ends us: `cancel_all`/`close` wait on it.
                self._nursery = None
                self._ready = trio.Event()
                stopped.set()

    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any, name: str = "") -> None:
        name = name or getattr(fn, "__name__", "")
        if self._nursery is not None:
            self._nursery.start_soon(self._guard, fn, args, name=name)
            return
        if self._spawn is None or self._closing:
            raise RuntimeError(f"{self.owner}: no task group (device not attached)")
        self._pending.append((fn, args, name))
        if not self._spawned:
            self._spawned = True
            self._spawn(self.run)

    async def _guard(self, fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...]) -> None:
        self.running += 1
        try:
            await fn(*args)
        except Exception:
            # A device bug must not take the connection down; it is logged loudly instead.
            name = getattr(fn, "__name__", fn)
            log.exception("%s: device task %s failed", self.owner, name)
            if self.on_failure is not None:
                self.on_failure(f"device task {name} raised")
        finally:
            self.running -= 1

    async def cancel_all(self) -> None:
        """Cancel every task and wait until they are gone; new tasks may start afterwards."""
        self._pending.clear()  # not started yet: they never run
        if self._scope is None:
            return
        stopped = self._stopped
        assert stopped is not None  # the runner set both before it opened its scope
        self._scope.cancel()
        await stopped.wait()
        if not self._closing:
            ready = self._ready
            assert ready is not None
            await ready.wait()

    def stop(self) -> None:
        """`close` without the wait: the connection is gone for good (its end, whatever
        path it took), so the runner must not outlive it in the server's nursery."""
        self._closing = True
        self._pending.clear()
        if self._scope is not None:
            self._scope.cancel()

    async def close(self) -> None:
        self._closing = True
        self._pending.clear()
        if self._scope is not None:
            stopped = self._stopped
            assert stopped is not None
            self._scope.cancel()
            await stopped.wait()


__all__ = ["TaskGroup"]

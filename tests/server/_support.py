"""Helpers shared by test_objects, test_hotplug, test_lifecycle and test_cli.

Everything here runs the real server (`vfiouser_srv.server.Server`) in the test's own trio
run, listening on real Unix sockets under `tmp_path`, and drives it with the real client.
Synchronisation never sleeps: it waits on the server's own events (`Device.released`) or on
`trio.testing.wait_all_tasks_blocked()`, which returns only once every task (server and
client alike) is blocked and no I/O is ready, i.e. once the server has processed everything
the kernel has delivered to it.
"""

from __future__ import annotations

import fcntl
import gc
import os
import struct
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from devices.edu import Edu
from devices.sdk.interface import RegionIndex
from protocol import Capabilities
from vfiouser_srv.fds import OwnedFd, fd_kind
from vfiouser_srv.objects import Device, OwnerPolicy
from vfiouser_srv.server import Server
from vfiouser_srv.session import Session

BAR0 = int(RegionIndex.BAR0)
CONFIG = int(RegionIndex.CONFIG)
EDU_ID = 0x010000ED
#: an offset in edu's BAR0 with no register: `TrackedEdu` uses it to start a task
HANG_REG = 0x200


@pytest.fixture
def fd_leak_check(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Every descriptor opened during the test is closed by its end, and explicitly.

    Sync, so it runs outside `trio.run` (trio's own fds are not counted) and after the
    test's server is gone. An `OwnedFd` closed by its finalizer logs, and counts as a leak.
    Modules use it with `pytestmark = pytest.mark.usefixtures("fd_leak_check")` and import
    it, so they do not depend on any conftest.
    """
    before = len(os.listdir("/proc/self/fd"))
    yield
    gc.collect()
    records = [r for when in ("setup", "call", "teardown") for r in caplog.get_records(when)]
    assert [r.getMessage() for r in records if r.name == "vfiouser_srv.fds"] == []
    assert len(os.listdir("/proc/self/fd")) == before


class TrackedEdu(Edu):
    """edu, plus counters the tests need: close() calls and a task that waits forever.

    A 4-byte write to BAR0 offset `HANG_REG` starts a device task (through the context, as a
    real model would) that blocks until cancelled and records that it was.
    """

    def __init__(self) -> None:
        super().__init__()
        self.closed = 0
        self.task_started = trio.Event()
        self.task_cancelled = 0

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        if index == BAR0 and offset == HANG_REG:
            assert self.ctx is not None
            self.ctx.start_task(self._hang, name="hang")
            return
        super().region_write(index, offset, data)

    async def _hang(self) -> None:
        self.task_started.set()
        try:
            await trio.sleep_forever()
        finally:
            self.task_cancelled += 1

    def close(self) -> None:
        self.closed += 1
        super().close()


@asynccontextmanager
async def running_server(caps: Capabilities | None = None) -> AsyncIterator[Server]:
    """A `Server` serving in a nursery of its own; cancelled (everything torn down) on exit."""
    server = Server(caps)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()


def add_edu(
    server: Server,
    tmp_path: Path,
    name: str = "edu",
    *,
    group: str | None = None,
    model: Edu | None = None,
    engine: str = "python",
) -> tuple[Device, str]:
    path = str(tmp_path / f"{name}.sock")
    dev = server.add_device(
        name, model or TrackedEdu(), socket_path=path, group=group, engine=engine
    )
    return dev, path


def make_group(
    server: Server, name: str, policy: OwnerPolicy = OwnerPolicy.PID, *, shared: bool = False
) -> None:
    server.group(name, policy=policy, shared_container=shared)


async def settle() -> None:
    """Let the server process everything already delivered to it (no sleeping)."""
    await trio.testing.wait_all_tasks_blocked()


async def wait_detached(dev: Device) -> None:
    """Wait until the device's current session (if any) has detached, then settle."""
    session = dev.session
    if session is not None:
        assert dev.released is not None
        with trio.fail_after(5):
            await dev.released.wait()
    await settle()


class Removal:
    """A `Server.remove_device` running in the background: `done` and its result."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.requests: int | None = None

    async def wait(self, timeout: float = 5.0) -> int:
        with trio.fail_after(timeout):
            await self.done.wait()
        assert self.requests is not None
        return self.requests


async def start_removal(nursery: trio.Nursery, server: Server, name: str, **kwargs: Any) -> Removal:
    """Start hot-removing `name` and return once it has done what it can without waiting."""
    removal = Removal()

    async def run() -> None:
        removal.requests = await server.remove_device(name, **kwargs)
        removal.done.set()

    nursery.start_soon(run)
    await settle()
    return removal


def session_of(dev: Device) -> Session:
    assert dev.session is not None, f"{dev.name} has no attached client"
    return dev.session


# ------------------------------------------------------------------------ edu registers


def u32(value: int) -> bytes:
    return struct.pack("<I", value)


def from_u32(data: bytes) -> int:
    return int(struct.unpack("<I", data)[0])


# ------------------------------------------------------------------------ /proc accounting


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def fds_of_kind(kind: str) -> int:
    """How many of our descriptors /proc shows as `kind` (e.g. 'anon_inode:[eventfd]')."""
    n = 0
    for name in os.listdir("/proc/self/fd"):
        if fd_kind(int(name)) == kind:
            n += 1
    return n


def fds_closed_by_gc(caplog: Any) -> list[str]:
    """Descriptors nobody closed, found by `OwnedFd`'s finalizer (it logs each one).

    Counting /proc/self/fd alone cannot see those: the finalizer already closed them.
    """
    return [r.getMessage() for r in caplog.records if r.name == "vfiouser_srv.fds"]


def maps_lines() -> list[str]:
    with open("/proc/self/maps") as f:
        return f.read().splitlines()


def mappings_of(name: str) -> int:
    """Mappings of memfd `name` in this process (/proc shows them as '/memfd:NAME')."""
    return sum(1 for line in maps_lines() if f"/memfd:{name} " in line + " ")


def make_memfd(name: str, size: int, data: bytes = b"", *, sealed: bool = True) -> OwnedFd:
    """A memfd of `size` bytes holding `data` at offset 0, not mapped by us; `sealed`
    against shrinking and growing like QEMU's memory-backend-memfd (the server mmaps only
    such files)."""
    fd = OwnedFd(os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING))
    os.ftruncate(fd.fileno(), size)
    if data:
        os.pwrite(fd.fileno(), data, 0)
    if sealed:
        fcntl.fcntl(fd.fileno(), fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


def unique(prefix: str, tmp_path: Path) -> str:
    """A name no other test (or earlier run) uses, for memfds seen in /proc/self/maps."""
    return f"{prefix}-{os.getpid()}-{tmp_path.name}"

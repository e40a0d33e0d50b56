"""Shared fixtures for the tier-2 server tests: a real `Server` over real Unix sockets.

* `server`: a running `Server` (in the test's nursery) with edu registered as "edu" on a
  socket under `tmp_path`. `make_server` builds others (own caps, more devices, groups).
* `open_client(server, name)`: the real client connected to a device, VERSION done.
* `no_fd_leak`: every descriptor opened during the test is closed by its end (apply it with
  `pytestmark = pytest.mark.usefixtures("no_fd_leak")`).
* `session_of(server, name)`: the server-side `Session` of a device's current client.
* `settle()`: let the server process everything the kernel delivered (no sleeping).

Nothing here sleeps: `trio.testing.wait_all_tasks_blocked()` returns only once every task
(server and client run in the same trio run) is blocked and no I/O is ready.
"""

from __future__ import annotations

import gc
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from devices.edu import Edu
from devices.sdk.interface import DeviceModel
from protocol import Capabilities
from vfiouser_srv.client import Client
from vfiouser_srv.client import open_client as _open_client
from vfiouser_srv.container import Container
from vfiouser_srv.fds import open_fd_count
from vfiouser_srv.irq import IrqTable
from vfiouser_srv.objects import OwnerPolicy
from vfiouser_srv.server import DEFAULT_CAPS, Server
from vfiouser_srv.session import Session

from ..conftest import python_engine_only

#: a call that gets no reply within this fails the test instead of hanging it
REPLY_TIMEOUT = 10.0

MakeServer = Callable[..., Awaitable[Server]]


@pytest.fixture
def no_fd_leak(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Every descriptor the test (client, server, models) opened is closed at its end.

    Sync on purpose: it runs outside `trio.run`, so trio's own fds are not counted, and
    after the test's nursery (hence the server) is gone. An `OwnedFd` dropped without
    close is closed by its finalizer, which logs: that counts as a leak too.
    """
    before = open_fd_count()
    yield
    if open_fd_count() != before:
        # Something is still open: if it is an OwnedFd kept alive by a reference cycle,
        # collecting runs its finalizer, which logs the leak (a full collection costs tens
        # of milliseconds, so it is only paid when a leak is already certain).
        gc.collect()
    records = [r for when in ("setup", "call", "teardown") for r in caplog.get_records(when)]
    leaked = [r.getMessage() for r in records if r.name == "vfiouser_srv.fds"]
    assert leaked == []
    assert open_fd_count() == before


def sock_path(tmp_path: Path, name: str) -> str:
    path = str(tmp_path / f"{name}.sock")
    assert len(path) < 100, f"socket path too long for AF_UNIX: {path}"
    return path


def small_caps(**changes: Any) -> Capabilities:
    """The server's default capabilities with some limits changed (e.g. max_dma_maps=2)."""
    from dataclasses import replace

    return replace(DEFAULT_CAPS, **changes)




@pytest.fixture
def engine(request: pytest.FixtureRequest) -> str:
    """The engine `make_server` (and `_support.add_edu`) registers devices with: "python"
    unless a module opts in to both with `pytestmark = pytest.mark.parametrize("engine",
    ENGINE_PARAMS)` (see tests/engines/params.py), which overrides this fixture.
    `VFIOUSER_TEST_ENGINE=libvfio-user` changes the default, except for `python_engine_only`
    tests."""
    if request.node.get_closest_marker("python_engine_only") is not None:
        return "python"
    return os.environ.get("VFIOUSER_TEST_ENGINE", "python")


@pytest.fixture
async def make_server(nursery: trio.Nursery, tmp_path: Path, engine: str) -> MakeServer:
    """`await make_server(devices={"name": model}, caps=..., groups={"g": policy},
    members={"name": "g"})`: a `Server` serving in the test's nursery.

    Models are created by the caller and closed by the server when the test ends.
    """

    async def make(
        devices: Mapping[str, DeviceModel] | None = None,
        *,
        caps: Capabilities | None = None,
        groups: Mapping[str, OwnerPolicy] | None = None,
        members: Mapping[str, str] | None = None,
    ) -> Server:
        srv = Server(caps)
        for gname, policy in (groups or {}).items():
            srv.group(gname, policy=policy)
        models = devices if devices is not None else {"edu": Edu()}
        for name, model in models.items():
            srv.add_device(
                name,
                model,
                socket_path=sock_path(tmp_path, name),
                group=(members or {}).get(name),
                engine=engine,
            )
        await nursery.start(srv.serve)
        return srv

    return make


@pytest.fixture
async def server(make_server: MakeServer) -> Server:
    """A running server with edu registered as "edu"."""
    return await make_server()


def path_of(server: Server, name: str = "edu") -> str:
    path = server.devices[name].socket_path
    assert path is not None
    return path


@asynccontextmanager
async def open_client(
    server: Server,
    name: str = "edu",
    *,
    reply_timeout: float | None = REPLY_TIMEOUT,
    **kwargs: Any,
) -> AsyncIterator[Client]:
    """The real client connected to device `name` (VERSION done unless version=False)."""
    async with _open_client(path_of(server, name), reply_timeout=reply_timeout, **kwargs) as c:
        yield c


def session_of(server: Server, name: str = "edu") -> Session:
    session = server.devices[name].session
    assert session is not None, f"{name} has no attached client"
    return session


def container_of(server: Server, name: str = "edu") -> Container:
    """The DMA windows of a device's current client."""
    container = session_of(server, name).container
    assert container is not None
    return container


def irq_table_of(server: Server, name: str = "edu") -> IrqTable:
    """The eventfds, masks and pending bits of a device's current client."""
    table = session_of(server, name).irq_table
    assert table is not None
    return table


async def settle() -> None:
    """Let the server process everything already delivered to it (no sleeping)."""
    await trio.testing.wait_all_tasks_blocked()


def count_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


__all__ = [
    "REPLY_TIMEOUT",
    "MakeServer",
    "container_of",
    "count_fds",
    "irq_table_of",
    "open_client",
    "path_of",
    "python_engine_only",
    "session_of",
    "settle",
    "small_caps",
    "sock_path",
]

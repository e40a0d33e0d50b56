from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Iterator

import pytest
import trio

from vfiouser_srv.client import Client, open_client
from vfiouser_srv.fds import open_fd_count
from vfiouser_srv.transport import FdStream

from .fake_server import FakeServer


@pytest.fixture(autouse=True)
def no_fd_leak(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Every test must give back every descriptor it (or the client) opened, explicitly.

    Sync on purpose: it runs outside trio.run, so trio's own fds are not counted. An
    `OwnedFd` dropped without close is closed by its finalizer, which logs: that counts as
    a leak too.
    """
    before = open_fd_count()
    yield
    gc.collect()
    records = [r for when in ("setup", "call", "teardown") for r in caplog.get_records(when)]
    leaked = [r.getMessage() for r in records if r.name == "vfiouser_srv.fds"]
    assert leaked == []
    assert open_fd_count() == before


@pytest.fixture
async def pair(nursery: trio.Nursery) -> AsyncIterator[tuple[FdStream, FakeServer]]:
    """The client's end of a socketpair, and a fake server running on the other end."""
    a, b = FdStream.pair()
    srv = FakeServer(b)
    nursery.start_soon(srv.run)
    yield a, srv
    srv.close()
    a.close()


@pytest.fixture
async def fake(pair: tuple[FdStream, FakeServer]) -> FakeServer:
    return pair[1]


@pytest.fixture
async def client(pair: tuple[FdStream, FakeServer]) -> AsyncIterator[Client]:
    async with open_client(pair[0]) as c:
        yield c

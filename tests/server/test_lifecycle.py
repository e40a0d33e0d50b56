"""Disconnect, reconnect and leaks (docs/architecture.md, "The object model").

On disconnect the server cancels the connection's device tasks, unmaps every window it
mmap'd, closes every eventfd it was given and releases the group, but keeps the device's
state so the client can come back. Nothing may accumulate across connections: the leak tests
count this process's descriptors and mappings (the server runs in the test process).
"""

from __future__ import annotations

import errno
import gc
import os
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import trio

from devices.edu import Reg
from devices.sdk.interface import IrqIndex
from protocol import PROTOCOL_MAJOR, PROTOCOL_MINOR, Command, HeaderFlags, Version, pack_header
from vfiouser_srv.client import (
    VfioUserError,
    make_eventfd,
    open_client,
    read_eventfd_nowait,
    reply_body,
    wait_eventfd,
)
from vfiouser_srv.fds import fd_kind
from vfiouser_srv.server import Server

from ..engines.params import ENGINE_PARAMS
from ._support import (
    BAR0,
    CONFIG,
    EDU_ID,
    HANG_REG,
    TrackedEdu,
    add_edu,
    fd_leak_check,  # noqa: F401  (fixture)
    fds_closed_by_gc,
    fds_of_kind,
    from_u32,
    make_memfd,
    mappings_of,
    maps_lines,
    running_server,
    session_of,
    settle,
    u32,
    unique,
    wait_detached,
)
from .conftest import python_engine_only

EVENTFD = "anon_inode:[eventfd]"


# Every test runs on both engines (tests/engines/params.py) unless marked python_engine_only.
pytestmark = [
    pytest.mark.usefixtures("fd_leak_check"),
    pytest.mark.parametrize("engine", ENGINE_PARAMS),
]
PYTHON = "python"

# ------------------------------------------------------------------------ disconnect


async def test_disconnect_unmaps_every_window(
    tmp_path: Path, engine: str, caplog: pytest.LogCaptureFixture
) -> None:
    name = unique("disc-unmap", tmp_path)
    async with running_server() as server:
        dev, path = add_edu(server, tmp_path, engine=engine)
        with make_memfd(name, 0x4000) as fd:
            async with open_client(path) as c:
                await c.dma_map(0x100000, 0x2000, fd=fd)
                await c.dma_map(0x200000, 0x2000, fd=fd, offset=0x2000)
                await c.memory.add_ram(0x300000, 0x1000, shared=False)  # message mode
                container = session_of(dev).container if engine == PYTHON else None
                assert container is None or len(container) == 3
                assert mappings_of(name) == 2
            await wait_detached(dev)
            assert container is None or len(container) == 0
            assert mappings_of(name) == 0
            # The server kept no copy of the memfd either: ours is the only descriptor.
            assert fds_of_kind(f"/memfd:{name} (deleted)") == 1
            assert fds_closed_by_gc(caplog) == []


async def test_disconnect_closes_irq_eventfds(
    tmp_path: Path, engine: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_server() as server:
        dev, path = add_edu(server, tmp_path, engine=engine)
        model = dev.model
        assert isinstance(model, TrackedEdu)
        with make_eventfd() as intx, make_eventfd() as req:
            base = fds_of_kind(EVENTFD)
            async with open_client(path) as c:
                await c.set_irq_eventfds(IrqIndex.INTX, 0, [intx])
                await c.set_irq_eventfds(IrqIndex.REQ, 0, [req])
                assert fds_of_kind(EVENTFD) == base + 2  # the server's copies
                # The eventfd works while connected: edu's IRQ_RAISE asserts INTx.
                await c.region_write(BAR0, Reg.IRQ_RAISE, u32(1))
                assert await wait_eventfd(intx) == 1
                await c.region_write(BAR0, Reg.IRQ_ACK, u32(1))
            await wait_detached(dev)
            assert fds_of_kind(EVENTFD) == base
            assert fds_closed_by_gc(caplog) == []
            # A later client that assigned nothing: raising must not reach the old eventfd.
            async with open_client(path) as c:
                await c.region_write(BAR0, Reg.IRQ_RAISE, u32(1))
                assert from_u32(await c.region_read(BAR0, Reg.IRQ_STATUS, 4)) == 1
                await c.region_write(BAR0, Reg.IRQ_ACK, u32(1))
            assert read_eventfd_nowait(intx) == 0


async def test_device_state_survives_reconnect(tmp_path: Path, engine: str) -> None:
    async with running_server() as server:
        dev, path = add_edu(server, tmp_path, engine=engine)
        async with open_client(path) as c:
            await c.region_write(BAR0, Reg.LIVENESS, u32(0x12345678))
            await c.region_write(BAR0, Reg.FACTORIAL, u32(10))
        await wait_detached(dev)
        async with open_client(path) as c:
            assert from_u32(await c.region_read(BAR0, Reg.LIVENESS, 4)) == ~0x12345678 & 0xFFFFFFFF
            assert from_u32(await c.region_read(BAR0, Reg.FACTORIAL, 4)) == 3628800
            # ...and the device is fully usable by the new client.
            await c.region_write(BAR0, Reg.FACTORIAL, u32(5))
            assert from_u32(await c.region_read(BAR0, Reg.FACTORIAL, 4)) == 120


async def test_immediate_reconnect_is_accepted(tmp_path: Path, engine: str) -> None:
    async with running_server() as server:
        dev, path = add_edu(server, tmp_path, engine=engine)
        for value in range(5):
            async with open_client(path) as c:
                await c.region_write(BAR0, Reg.LIVENESS, u32(value))
            # No waiting for the server to notice: connect again at once.
        async with open_client(path) as c:
            assert from_u32(await c.region_read(BAR0, Reg.LIVENESS, 4)) == ~4 & 0xFFFFFFFF
            # group users are counted by the Python engine's sessions only
            assert dev.group.users == (1 if engine == PYTHON else 0)


@python_engine_only(
    "libvfio-user does not accept() while a client is attached "
    "(BEHAVIOUR_DIFFERENCES 'second client'); checks session_of"
)
async def test_reconnect_waits_for_the_old_session_to_detach(tmp_path: Path, engine: str) -> None:
    """VERSION arriving while the old session is still attached is held, not refused."""
    async with running_server() as server:
        dev, path = add_edu(server, tmp_path, engine=engine)
        async with open_client(path) as old, open_client(path, version=False) as new:
            old_session = session_of(dev)
            pending = await new.submit(Version(PROTOCOL_MAJOR, PROTOCOL_MINOR, new.caps))
            await settle()
            # The server holds the new client's VERSION while the old one is attached...
            assert dev.session is old_session and not pending.done
            await old.aclose()
            # ...and answers it once the old session has let go.
            with trio.fail_after(5):
                reply = await pending.wait_reply()
            assert isinstance(reply_body(reply), Version) and new.negotiated
            assert session_of(dev) is not old_session
            assert from_u32(await new.region_read(BAR0, 0, 4)) == EDU_ID


@python_engine_only("checks the Python engine's session task group (session_of)")
async def test_disconnect_cancels_the_connections_device_tasks(
    tmp_path: Path, engine: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_server() as server:
        dev, path = add_edu(server, tmp_path, engine=engine)
        model = dev.model
        assert isinstance(model, TrackedEdu)
        async with open_client(path) as c:
            await c.region_write(BAR0, HANG_REG, u32(1))
            with trio.fail_after(5):
                await model.task_started.wait()
            assert session_of(dev).tasks.running == 1
            assert model.task_cancelled == 0
        await wait_detached(dev)
        assert model.task_cancelled == 1
        assert model.ctx is None
        # The next connection gets a task group of its own.
        model.task_started = trio.Event()
        async with open_client(path) as c:
            await c.region_write(BAR0, HANG_REG, u32(1))
            with trio.fail_after(5):
                await model.task_started.wait()
            assert session_of(dev).tasks.running == 1
        await wait_detached(dev)
        assert model.task_cancelled == 2
        assert fds_closed_by_gc(caplog) == []


@python_engine_only("checks the Python engine's session tasks (session_of)")
async def test_task_runner_and_writer_start_only_when_needed(tmp_path: Path, engine: str) -> None:
    """Most connections never start device work nor fill their socket: a session starts its
    device-task runner and its writer on first use (`TaskGroup.start_in`,
    `Outbox.start_in`), and a task started then runs and is cancelled as before."""
    async with running_server() as server:
        dev, path = add_edu(server, tmp_path, engine=engine)
        model = dev.model
        assert isinstance(model, TrackedEdu)
        async with open_client(path) as c:
            await c.region_read(BAR0, 0, 4)
            session = session_of(dev)
            assert not session.tasks._spawned and not session.outbox._writer
            await c.region_write(BAR0, HANG_REG, u32(1))
            with trio.fail_after(5):
                await model.task_started.wait()
            assert session.tasks._spawned and session.tasks.running == 1
            assert not session.outbox._writer
        await wait_detached(dev)
        assert model.task_cancelled == 1
        # the runner ran in the server's nursery: it ended with its connection
        await settle()
        assert server._nursery is not None
        left = [t.name for t in server._nursery.child_tasks]
        assert not [n for n in left if "TaskGroup" in n or "Outbox" in n], left


@python_engine_only("checks the Python engine's session (session_of)")
async def test_a_plain_connection_builds_no_migration_nor_release_event(
    tmp_path: Path, engine: str
) -> None:
    """A connection that never migrates builds no `Migration`, and `Device.released` is
    built only for whoever waits on it (each was ~1% of a connect); once asked for, it is
    set at detach, and it reads as set while no client is attached."""
    async with running_server() as server:
        dev, path = add_edu(server, tmp_path, engine=engine)
        async with open_client(path) as c:
            await c.region_read(BAR0, 0, 4)
            session = session_of(dev)
            assert session._migration is None and dev._released is None
            released = dev.released  # somebody waits: built now, not set while attached
            assert not released.is_set()
        with trio.fail_after(5):
            await released.wait()
        await settle()
        async with open_client(path) as c:
            await c.region_read(BAR0, 0, 4)
            assert dev._released is None  # a new session: a new Event when asked
        await wait_detached(dev)
        assert dev.released.is_set()


@python_engine_only("checks the Python engine's session task group (session_of)")
async def test_edu_dma_task_cancelled_by_disconnect_leaves_device_usable(
    tmp_path: Path,
    engine: str,
) -> None:
    """edu's DMA in message mode waits for the client; a disconnect cancels it cleanly."""
    async with running_server() as server:
        dev, path = add_edu(server, tmp_path, engine=engine)
        async with open_client(path) as c:
            c._answer = lambda request: None  # type: ignore[method-assign]  # never answer DMA
            await c.region_write(CONFIG, 4, struct.pack("<H", 0x6))  # memory + Bus Master
            await c.memory.add_ram(0x10000, 0x1000, shared=False)  # message mode
            await c.region_write(BAR0, Reg.DMA_SRC, struct.pack("<Q", 0x10000))
            await c.region_write(BAR0, Reg.DMA_DST, struct.pack("<Q", 0x40000))
            await c.region_write(BAR0, Reg.DMA_CNT, struct.pack("<Q", 16))
            await c.region_write(BAR0, Reg.DMA_CMD, struct.pack("<Q", 1))
            await settle()
            # The DMA task is stuck waiting for our DMA_READ reply: start bit still set.
            assert session_of(dev).tasks.running == 1
            assert from_u32(await c.region_read(BAR0, Reg.DMA_CMD, 4)) & 1 == 1
        await wait_detached(dev)
        async with open_client(path) as c:
            # The task was cancelled and cleared the start bit: the device is not wedged.
            assert from_u32(await c.region_read(BAR0, Reg.DMA_CMD, 4)) & 1 == 0
            assert session_of(dev).tasks.running == 0


# ------------------------------------------------------------------------ leaks


#: see `Snapshot.assert_same_counts`
ANON_SLACK = 2


class Snapshot:
    """This process's descriptors (by kind) and mappings (by backing), for leak checks."""

    def __init__(self) -> None:
        gc.collect()
        self.fds = Counter(fd_kind(int(n)) for n in os.listdir("/proc/self/fd"))
        # the 6th column of /proc/self/maps names the backing ("" for anonymous memory)
        self.maps = Counter((line.split(maxsplit=5)[5:] or [""])[0] for line in maps_lines())

    def assert_same_counts(self, before: Snapshot) -> None:
        """Same number of descriptors and of file mappings; on failure, say which differ.

        Anonymous mappings may differ by a couple: the allocators map and unmap arenas of
        their own, and the kernel splits and merges adjacent anonymous regions. A leak per
        connection would show as one per cycle (these tests run 100 or 1000)."""
        fds = (self.fds - before.fds) + (before.fds - self.fds)
        maps = (self.maps - before.maps) + (before.maps - self.maps)
        assert self.fds.total() == before.fds.total(), f"fds differ: {fds}"
        named = {k: v for k, v in maps.items() if k}
        assert named == {}, f"mappings differ: {maps}"
        assert abs(self.maps[""] - before.maps[""]) <= ANON_SLACK, f"mappings differ: {maps}"


async def _snapshot(server: Server) -> Snapshot:
    await settle()
    assert not server.sessions
    return Snapshot()


async def test_no_leak_over_1000_connections(
    tmp_path: Path, engine: str, caplog: pytest.LogCaptureFixture
) -> None:
    name = unique("leak-ram", tmp_path)
    async with running_server() as server:
        dev, path = add_edu(server, tmp_path, engine=engine)
        with make_memfd(name, 0x10000) as ram, make_eventfd() as efd:

            async def cycle() -> None:
                async with open_client(path) as c:
                    await c.dma_map(0x100000, 0x10000, fd=ram)
                    await c.set_irq_eventfds(IrqIndex.INTX, 0, [efd])
                    assert mappings_of(name) == 1
                await wait_detached(dev)

            for _ in range(3):  # warm up: lazily created buffers, caches, arenas
                await cycle()
            before = await _snapshot(server)
            for _ in range(1000):
                await cycle()
            after = await _snapshot(server)
        assert mappings_of(name) == 0
        after.assert_same_counts(before)
        assert fds_closed_by_gc(caplog) == []


async def test_no_leak_over_100_garbage_clients(
    tmp_path: Path, engine: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A client sending a poisoned header (with a descriptor riding along) is disconnected."""
    async with running_server() as server:
        dev, path = add_edu(server, tmp_path, engine=engine)
        garbage = pack_header(1, Command.VERSION, 8, HeaderFlags.TYPE_COMMAND) + b"\xff" * 8

        async def cycle() -> None:
            async with open_client(path, version=False) as c:
                with make_eventfd() as efd:
                    await c.send_bytes(garbage, [efd])
                with trio.fail_after(5):
                    await c.wait_disconnected()
            await settle()

        for _ in range(3):
            await cycle()
        before = await _snapshot(server)
        for _ in range(100):
            await cycle()
        after = await _snapshot(server)
        after.assert_same_counts(before)
        assert fds_closed_by_gc(caplog) == []
        assert dev.session is None and dev.group.users == 0
        async with open_client(path) as c:
            assert from_u32(await c.region_read(BAR0, 0, 4)) == EDU_ID


@python_engine_only("libvfio-user never answers EBUSY (BEHAVIOUR_DIFFERENCES 'second client')")
async def test_no_leak_from_clients_refused_with_ebusy(
    tmp_path: Path, engine: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A second client of a busy device is answered EBUSY (after the grace) and dropped."""
    async with running_server() as server:
        _, path = add_edu(server, tmp_path, engine=engine)
        async with open_client(path):

            async def cycle() -> None:
                async with open_client(path, version=False) as c:
                    with pytest.raises(VfioUserError) as info:
                        await c.version()
                    assert info.value.errno == errno.EBUSY
                    with trio.fail_after(5):
                        await c.wait_disconnected()
                await settle()

            await cycle()
            gc.collect()
            before = Snapshot()
            for _ in range(2):
                await cycle()
            gc.collect()
            Snapshot().assert_same_counts(before)
            assert len(server.sessions) == 1
            assert fds_closed_by_gc(caplog) == []


@python_engine_only("counts the Python engine's session cancel scopes")
async def test_connect_version_close_opens_few_cancel_scopes(
    tmp_path: Path, engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancel scope is a few percent of a connection's cost, a nursery twice that: a
    session that never starts device work and pins no window opens no nursery (its runner
    and writer would start in the server's), its own scope and at most one read epoch's,
    no shield for `detach` (nothing there can wait) and no epoch before it must wait."""
    entered: list[str] = []
    enter = trio.CancelScope.__enter__
    open_nursery = trio.open_nursery

    def own_task() -> bool:
        task = trio.lowlevel.current_task()
        return task.coro.cr_code.co_name == "_serve_connection"  # the session's own task

    def counting_enter(self: trio.CancelScope) -> trio.CancelScope:
        if own_task():
            entered.append("shield" if self.shield else "scope")
        return enter(self)

    def counting_open_nursery(**kwargs: Any) -> Any:
        if own_task():
            entered.append("nursery")
        return open_nursery(**kwargs)

    async with running_server() as server:
        dev, path = add_edu(server, tmp_path, engine=engine)
        monkeypatch.setattr(trio.CancelScope, "__enter__", counting_enter)
        monkeypatch.setattr(trio, "open_nursery", counting_open_nursery)
        for _ in range(3):
            async with open_client(path) as c:
                await c.region_read(BAR0, 0, 4)
            await wait_detached(dev)
        monkeypatch.undo()
    assert "shield" not in entered and "nursery" not in entered, entered
    assert 3 <= len(entered) <= 6, entered  # per connection: the session's, one epoch's

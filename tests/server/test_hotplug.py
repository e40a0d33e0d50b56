"""Hot add and hot remove (docs/architecture.md, "The object model"; after `vfio_del_group_dev`).

Remove: the socket is unlinked first, the connected client is asked to let go through its
REQ eventfd every `interval` seconds, it may be disconnected by force after `deadline`, and
the model is closed last. A device being removed answers VERSION with ENODEV.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import trio

from devices.edu import Reg
from devices.sdk.interface import IrqIndex
from vfiouser_srv.client import (
    VfioUserError,
    connect_unix,
    make_eventfd,
    open_client,
    read_eventfd_nowait,
    wait_eventfd,
)
from vfiouser_srv.objects import DeviceState, ObjectError

from ..engines.params import ENGINE_PARAMS
from ._support import (
    BAR0,
    EDU_ID,
    TrackedEdu,
    add_edu,
    fd_leak_check,  # noqa: F401  (fixture)
    from_u32,
    make_memfd,
    mappings_of,
    running_server,
    session_of,
    settle,
    start_removal,
    u32,
    unique,
)
from .conftest import python_engine_only


def tracked(dev: object) -> TrackedEdu:
    model = dev.model  # type: ignore[attr-defined]
    assert isinstance(model, TrackedEdu)
    return model


# Every test runs on both engines (tests/engines/params.py) unless marked python_engine_only.
pytestmark = [
    pytest.mark.usefixtures("fd_leak_check"),
    pytest.mark.parametrize("engine", ENGINE_PARAMS),
]

# ------------------------------------------------------------------------ hot add


async def test_hot_add_while_serving(tmp_path: Path, engine: str) -> None:
    async with running_server() as server:
        assert not server.devices
        _, a = add_edu(server, tmp_path, "a", engine=engine)
        async with open_client(a) as ca:
            assert from_u32(await ca.region_read(BAR0, 0, 4)) == EDU_ID
            # A second device added while the first one has a client.
            _, b = add_edu(server, tmp_path, "b", engine=engine)
            async with open_client(b) as cb:
                await cb.region_write(BAR0, Reg.LIVENESS, u32(1))
                assert from_u32(await cb.region_read(BAR0, Reg.LIVENESS, 4)) == 0xFFFFFFFE
            assert from_u32(await ca.region_read(BAR0, Reg.LIVENESS, 4)) == 0
        assert server.devices["a"].group is not server.devices["b"].group


async def test_hot_add_duplicate_name_is_refused_without_touching_anything(
    tmp_path: Path,
    engine: str,
) -> None:
    async with running_server() as server:
        _, a = add_edu(server, tmp_path, "a", engine=engine)
        other = str(tmp_path / "other.sock")
        with pytest.raises(ObjectError) as info:
            server.add_device("a", TrackedEdu(), socket_path=other)
        assert info.value.errno == errno.EEXIST
        assert not os.path.exists(other)
        async with open_client(a) as c:
            assert from_u32(await c.region_read(BAR0, 0, 4)) == EDU_ID


# ------------------------------------------------------------------------ hot remove


async def test_remove_without_client_completes_at_once(tmp_path: Path, engine: str) -> None:
    """Also the regression for a hot remove before the new accept loop first ran: its
    getsockopt on the closed listener raised EBADF out of serve() (fixed in 1d5b426)."""
    async with running_server() as server:
        dev, path = add_edu(server, tmp_path, engine=engine)
        model = tracked(dev)
        assert await server.remove_device("edu") == 0
        assert not os.path.exists(path)
        assert dev.state is DeviceState.REMOVED
        assert "edu" not in server.devices and "edu" not in server.groups
        assert model.closed == 1
    assert model.closed == 1  # the server's shutdown does not close it again


@python_engine_only(
    "hot remove of a libvfio-user device disconnects its client at once (BEHAVIOUR_DIFFERENCES "
    "'ERR and REQ interrupts')"
)
async def test_remove_unlinks_socket_first_and_completes_when_client_leaves(
    tmp_path: Path,
    engine: str,
) -> None:
    async with running_server() as server, trio.open_nursery() as nursery:
        dev, path = add_edu(server, tmp_path, engine=engine)
        model = tracked(dev)
        async with open_client(path) as c:
            removal = await start_removal(nursery, server, "edu", interval=60)
            assert dev.state is DeviceState.REMOVING
            assert not os.path.exists(path)
            with pytest.raises(OSError) as info:
                await connect_unix(path)
            assert info.value.errno in (errno.ENOENT, errno.ECONNREFUSED)
            # The current client is still served until it lets go; the model is open.
            assert from_u32(await c.region_read(BAR0, 0, 4)) == EDU_ID
            assert not removal.done.is_set() and model.closed == 0
        assert await removal.wait() == 1
        assert model.closed == 1
        assert dev.state is DeviceState.REMOVED and "edu" not in server.devices


@python_engine_only(
    "libvfio-user cannot raise REQ (BEHAVIOUR_DIFFERENCES 'ERR and REQ interrupts')"
)
async def test_remove_signals_req_eventfd_at_each_interval(tmp_path: Path, engine: str) -> None:
    async with running_server() as server, trio.open_nursery() as nursery:
        dev, path = add_edu(server, tmp_path, engine=engine)
        model = tracked(dev)
        with make_eventfd() as req:
            async with open_client(path) as c:
                await c.set_irq_eventfds(IrqIndex.REQ, 0, [req])
                removal = await start_removal(nursery, server, "edu", interval=0.02)
                seen = 0
                wakeups = 0
                while wakeups < 4:  # the client ignores the first requests...
                    seen += await wait_eventfd(req)
                    wakeups += 1
                assert not removal.done.is_set()
            # ...then lets go.
            requests = await removal.wait()
            seen += read_eventfd_nowait(req)
        assert requests >= 4
        assert seen == requests  # one REQ signal per request, none after the release
        assert model.closed == 1


@python_engine_only(
    "hot remove of a libvfio-user device disconnects its client at once (BEHAVIOUR_DIFFERENCES "
    "'ERR and REQ interrupts')"
)
async def test_remove_without_req_eventfd_still_waits_for_release(
    tmp_path: Path, engine: str
) -> None:
    async with running_server() as server, trio.open_nursery() as nursery:
        dev, path = add_edu(server, tmp_path, engine=engine)
        async with open_client(path):
            removal = await start_removal(nursery, server, "edu", interval=0.01)
            with trio.move_on_after(0.1):
                await removal.done.wait()
            assert not removal.done.is_set()
        assert await removal.wait() >= 1
        assert tracked(dev).closed == 1


@python_engine_only(
    "libvfio-user cannot raise REQ (BEHAVIOUR_DIFFERENCES 'ERR and REQ interrupts')"
)
async def test_remove_deadline_disconnects_a_client_that_ignores_req(
    tmp_path: Path, engine: str
) -> None:
    name = unique("hot-remove-ram", tmp_path)
    async with running_server() as server, trio.open_nursery() as nursery:
        dev, path = add_edu(server, tmp_path, engine=engine)
        model = tracked(dev)
        with make_memfd(name, 0x1000) as ram, make_eventfd() as req:
            async with open_client(path) as c:
                await c.dma_map(0, 0x1000, fd=ram)
                await c.set_irq_eventfds(IrqIndex.REQ, 0, [req])
                assert mappings_of(name) == 1
                removal = await start_removal(nursery, server, "edu", interval=0.02, deadline=0.2)
                with trio.fail_after(5):
                    await c.wait_disconnected()
                requests = await removal.wait()
                with pytest.raises(trio.BrokenResourceError):
                    await c.region_read(BAR0, 0, 4)
            assert requests >= 2
            assert read_eventfd_nowait(req) == requests
            assert mappings_of(name) == 0
        assert model.closed == 1 and dev.session is None
        assert dev.group.users == 0


@python_engine_only(
    "needs a second client while one is attached (BEHAVIOUR_DIFFERENCES 'second client'); "
    "checks session_of"
)
async def test_removing_device_refuses_version_with_enodev(tmp_path: Path, engine: str) -> None:
    async with running_server() as server, trio.open_nursery() as nursery:
        dev, path = add_edu(server, tmp_path, engine=engine)
        async with open_client(path) as first, open_client(path, version=False) as late:
            removal = await start_removal(nursery, server, "edu", interval=60)
            with pytest.raises(VfioUserError) as info:
                await late.version()
            assert info.value.errno == errno.ENODEV
            with trio.fail_after(5):
                await late.wait_disconnected()
            assert session_of(dev).attached
            assert from_u32(await first.region_read(BAR0, 0, 4)) == EDU_ID
        await removal.wait()


@python_engine_only(
    "a connected client that sends no VERSION holds vfu_attach_ctx (BEHAVIOUR_DIFFERENCES "
    "'split frames')"
)
async def test_unversioned_connection_does_not_hold_up_removal(tmp_path: Path, engine: str) -> None:
    """A connection without VERSION is not a user: removal completes; VERSION is ENODEV."""
    async with running_server() as server:
        dev, path = add_edu(server, tmp_path, engine=engine)
        async with open_client(path, version=False) as c:
            await settle()
            assert await server.remove_device("edu") == 0
            with pytest.raises(VfioUserError) as info:
                await c.version()
            assert info.value.errno == errno.ENODEV
            with trio.fail_after(5):
                await c.wait_disconnected()
        assert tracked(dev).closed == 1


@python_engine_only("checks the Python engine's session (session_of)")
async def test_readd_after_remove_on_the_same_path(tmp_path: Path, engine: str) -> None:
    async with running_server() as server:
        dev, path = add_edu(server, tmp_path, engine=engine)
        async with open_client(path) as c:
            await c.region_write(BAR0, Reg.LIVENESS, u32(7))
        await server.remove_device("edu")
        new, new_path = add_edu(server, tmp_path, engine=engine)
        assert new_path == path and new is not dev
        async with open_client(path) as c:
            # A new model: fresh state.
            assert from_u32(await c.region_read(BAR0, Reg.LIVENESS, 4)) == 0
            assert session_of(new).device is new


async def test_remove_one_device_of_a_group_leaves_the_other_served(
    tmp_path: Path, engine: str
) -> None:
    async with running_server() as server:
        server.group("g")
        _, a = add_edu(server, tmp_path, "a", group="g", engine=engine)
        _, b = add_edu(server, tmp_path, "b", group="g", engine=engine)
        async with open_client(b) as cb:
            assert await server.remove_device("a") == 0
            assert [d.name for d in server.groups["g"].devices] == ["b"]
            assert not os.path.exists(a)
            assert from_u32(await cb.region_read(BAR0, 0, 4)) == EDU_ID
        assert os.path.exists(b)


@python_engine_only(
    "waits for a client release that libvfio-user does not wait for (BEHAVIOUR_DIFFERENCES 'ERR "
    "and REQ interrupts')"
)
async def test_second_remove_of_the_same_device_is_enodev(tmp_path: Path, engine: str) -> None:
    async with running_server() as server, trio.open_nursery() as nursery:
        dev, path = add_edu(server, tmp_path, engine=engine)
        async with open_client(path):
            removal = await start_removal(nursery, server, "edu", interval=60)
            with pytest.raises(ObjectError) as info, trio.fail_after(5):
                await server.remove_device("edu", interval=60)
            assert info.value.errno == errno.ENODEV
            assert not removal.done.is_set()
        assert await removal.wait() == 1
        assert tracked(dev).closed == 1
        with pytest.raises(ObjectError) as info:
            await server.remove_device("edu")
        assert info.value.errno == errno.ENODEV

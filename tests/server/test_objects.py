"""The VFIO object model: group ownership, viability, users, containers, external users.

docs/architecture.md, "The object model": a group has one owner at a time, chosen by
SO_PEERCRED under the group's policy (pid / uid / connection); it is viable only while every
member is active and healthy; users = live connections + external users, and at 0 the owner
is cleared. A container is per connection unless the group shares one.
"""

from __future__ import annotations

import errno
import os
import sys
import textwrap
from pathlib import Path

import pytest
import trio

from devices.sdk.interface import DmaError
from vfiouser_srv.client import VfioUserError, open_client
from vfiouser_srv.objects import ExternalUser, ObjectError, OwnerPolicy
from vfiouser_srv.server import Server

from ._support import (
    BAR0,
    EDU_ID,
    add_edu,
    fd_leak_check,  # noqa: F401  (fixture)
    from_u32,
    make_group,
    make_memfd,
    mappings_of,
    running_server,
    session_of,
    settle,
    start_removal,
    unique,
    wait_detached,
)
from .conftest import python_engine_only

REPO = Path(__file__).resolve().parents[2]

#: a client in another process: connects, sends VERSION, prints "ok" or the errno
CHILD_CLIENT = textwrap.dedent(
    """
    import sys, trio
    from vfiouser_srv.client import VfioUserError, open_client

    async def main(path):
        try:
            async with open_client(path) as c:
                print("ok", await c.region_read(0, 0, 4) != b"", flush=True)
        except VfioUserError as exc:
            print("errno", exc.errno, flush=True)

    trio.run(main, sys.argv[1])
    """
)


async def other_process_version(path: str) -> str:
    """VERSION from a different pid (same uid); returns the child's one-line verdict."""
    proc = await trio.run_process(
        [sys.executable, "-c", CHILD_CLIENT, path],
        capture_stdout=True,
        capture_stderr=True,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode().strip()


async def two_device_group(
    server: Server, tmp_path: Path, policy: OwnerPolicy, *, shared: bool = False
) -> tuple[str, str]:
    make_group(server, "g", policy, shared=shared)
    _, a = add_edu(server, tmp_path, "a", group="g")
    _, b = add_edu(server, tmp_path, "b", group="g")
    return a, b


pytestmark = [
    pytest.mark.usefixtures("fd_leak_check"),
    python_engine_only(
        "groups, SO_PEERCRED ownership policies and shared containers are the Python "
        "engine's (BEHAVIOUR_DIFFERENCES 'ownership and groups', 'second client')"
    ),
]

# ------------------------------------------------------------------------ ownership


async def test_pid_policy_second_connection_of_same_pid_joins(tmp_path: Path) -> None:
    async with running_server() as server:
        a, b = await two_device_group(server, tmp_path, OwnerPolicy.PID)
        g = server.groups["g"]
        async with open_client(a) as ca, open_client(b) as cb:
            assert g.owner is not None and g.owner.pid == os.getpid()
            assert g.users == 2
            assert from_u32(await ca.region_read(BAR0, 0, 4)) == EDU_ID
            assert from_u32(await cb.region_read(BAR0, 0, 4)) == EDU_ID


async def test_pid_policy_other_process_gets_ebusy(tmp_path: Path) -> None:
    async with running_server() as server:
        a, b = await two_device_group(server, tmp_path, OwnerPolicy.PID)
        async with open_client(a):
            assert await other_process_version(b) == f"errno {errno.EBUSY}"
            assert server.groups["g"].users == 1
        # Once the owner has gone, the other process may take the group.
        await wait_detached(server.devices["a"])
        assert server.groups["g"].owner is None
        assert await other_process_version(b) == "ok True"


async def test_uid_policy_other_process_of_same_user_joins(tmp_path: Path) -> None:
    async with running_server() as server:
        a, b = await two_device_group(server, tmp_path, OwnerPolicy.UID)
        async with open_client(a):
            assert await other_process_version(b) == "ok True"


async def test_connection_policy_second_connection_gets_ebusy_and_is_closed(
    tmp_path: Path,
) -> None:
    async with running_server() as server:
        a, b = await two_device_group(server, tmp_path, OwnerPolicy.CONNECTION)
        g = server.groups["g"]
        async with open_client(a), open_client(b, version=False) as cb:
            with pytest.raises(VfioUserError) as info:
                await cb.version()
            assert info.value.errno == errno.EBUSY
            with trio.fail_after(5):
                await cb.wait_disconnected()
            assert cb.closed
            assert g.users == 1
            assert server.devices["b"].session is None


async def test_second_client_to_connected_device_gets_ebusy_and_is_closed(
    tmp_path: Path,
) -> None:
    async with running_server() as server:
        dev, path = add_edu(server, tmp_path)
        async with open_client(path) as first, open_client(path, version=False) as second:
            with pytest.raises(VfioUserError) as info:
                await second.version()
            assert info.value.errno == errno.EBUSY
            with trio.fail_after(5):
                await second.wait_disconnected()
            # The first client is untouched.
            assert session_of(dev).attached
            assert from_u32(await first.region_read(BAR0, 0, 4)) == EDU_ID
            assert dev.group.users == 1


# ------------------------------------------------------------------------ viability


async def test_unhealthy_member_makes_group_refuse_new_clients(tmp_path: Path) -> None:
    async with running_server() as server:
        await two_device_group(server, tmp_path, OwnerPolicy.PID)
        server.devices["b"].healthy = False
        g = server.groups["g"]
        assert not g.viable
        async with open_client(str(tmp_path / "a.sock"), version=False) as c:
            with pytest.raises(VfioUserError) as info:
                await c.version()
            assert info.value.errno == errno.EPERM
            with trio.fail_after(5):
                await c.wait_disconnected()
        assert g.users == 0 and g.owner is None
        server.devices["b"].healthy = True
        async with open_client(str(tmp_path / "a.sock")) as c:
            assert from_u32(await c.region_read(BAR0, 0, 4)) == EDU_ID


async def test_removing_member_makes_group_refuse_new_clients(tmp_path: Path) -> None:
    async with running_server() as server, trio.open_nursery() as nursery:
        a, b = await two_device_group(server, tmp_path, OwnerPolicy.PID)
        g = server.groups["g"]
        async with open_client(a):
            removal = await start_removal(nursery, server, "a", interval=60)
            assert not removal.done.is_set()
            assert g.draining and not g.viable
            async with open_client(b, version=False) as cb:
                with pytest.raises(VfioUserError) as info:
                    await cb.version()
                assert info.value.errno == errno.EBUSY
                with trio.fail_after(5):
                    await cb.wait_disconnected()
            assert g.users == 1
        # The client of a let go: removal finishes, b alone is viable again.
        assert await removal.wait() == 1
        assert g.viable and not g.draining and g.devices == [server.devices["b"]]
        async with open_client(b) as cb:
            assert from_u32(await cb.region_read(BAR0, 0, 4)) == EDU_ID


# ------------------------------------------------------------------------ users / owner


async def test_users_count_connections_and_external_users(tmp_path: Path) -> None:
    async with running_server() as server:
        a, b = await two_device_group(server, tmp_path, OwnerPolicy.PID)
        g = server.groups["g"]
        ext = ExternalUser(g, "migration")
        assert (g.users, g.owner) == (0, None)
        async with open_client(a):
            assert g.users == 1
            owner = g.owner
            assert owner is not None
            async with open_client(b):
                assert g.users == 2
                ext.acquire()
                assert g.users == 3 and g in (ext.group,) and ext in g.external
                await settle()
            await wait_detached(server.devices["b"])
            assert g.users == 2 and g.owner == owner
        await wait_detached(server.devices["a"])
        # The external user alone keeps the group (and its owner).
        assert g.users == 1 and g.owner == owner
        ext.release()
        assert g.users == 0 and g.owner is None and ext not in g.external
        ext.release()  # idempotent
        assert g.users == 0


async def test_owner_cleared_when_last_connection_goes(tmp_path: Path) -> None:
    async with running_server() as server:
        dev, path = add_edu(server, tmp_path)
        async with open_client(path):
            assert dev.group.owner is not None and dev.group.owner.pid == os.getpid()
            first_owner = dev.group.owner
        await wait_detached(dev)
        assert dev.group.users == 0 and dev.group.owner is None
        async with open_client(path):
            # A new connection id: the owner is the new client, not a leftover.
            assert dev.group.owner is not None
            assert dev.group.owner.connection != first_owner.connection


# ------------------------------------------------------------------------ containers


async def test_shared_container_window_visible_to_other_device(tmp_path: Path) -> None:
    name = unique("shared-ctr", tmp_path)
    async with running_server() as server:
        a, b = await two_device_group(server, tmp_path, OwnerPolicy.PID, shared=True)
        da, db = server.devices["a"], server.devices["b"]
        with make_memfd(name, 0x2000, b"mapped through a") as fd:
            async with open_client(a) as ca, open_client(b):
                await ca.dma_map(0x10000, 0x2000, fd=fd)
                assert session_of(da).container is session_of(db).container
                port = session_of(db).dma
                assert await port.read(0x10000, 16) == b"mapped through a"
                view = port.view(0x10000, 4, write=True)
                assert view is not None
                view[:4] = b"BBBB"
                del view
                assert os.pread(fd.fileno(), 4, 0) == b"BBBB"
                assert mappings_of(name) == 1  # one mmap for the whole container
            await wait_detached(da)
            await wait_detached(db)
            assert mappings_of(name) == 0


async def test_shared_container_drops_windows_of_a_departing_connection(
    tmp_path: Path,
) -> None:
    name = unique("shared-drop", tmp_path)
    async with running_server() as server:
        a, b = await two_device_group(server, tmp_path, OwnerPolicy.PID, shared=True)
        da, db = server.devices["a"], server.devices["b"]
        with make_memfd(name, 0x1000, b"x") as fd:
            async with open_client(b):
                async with open_client(a) as ca:
                    await ca.dma_map(0x10000, 0x1000, fd=fd)
                    assert await session_of(db).dma.read(0x10000, 1) == b"x"
                await wait_detached(da)
                assert mappings_of(name) == 0
                with pytest.raises(DmaError) as info:
                    await session_of(db).dma.read(0x10000, 1)
                assert info.value.errno == errno.EFAULT


async def test_default_one_container_per_connection(tmp_path: Path) -> None:
    name = unique("private-ctr", tmp_path)
    async with running_server() as server:
        a, b = await two_device_group(server, tmp_path, OwnerPolicy.PID)
        da, db = server.devices["a"], server.devices["b"]
        with make_memfd(name, 0x1000, b"only a") as fd:
            async with open_client(a) as ca, open_client(b) as cb:
                await ca.dma_map(0x10000, 0x1000, fd=fd)
                assert session_of(da).container is not session_of(db).container
                assert await session_of(da).dma.read(0x10000, 6) == b"only a"
                with pytest.raises(DmaError) as info:
                    await session_of(db).dma.read(0x10000, 6)
                assert info.value.errno == errno.EFAULT
                # b's own address space is independent: the same range maps without EEXIST.
                await cb.dma_map(0x10000, 0x1000, fd=fd)
                assert mappings_of(name) == 2


# ------------------------------------------------------------------------ external users


async def test_external_user_needs_an_owned_group(tmp_path: Path) -> None:
    async with running_server() as server:
        dev, _ = add_edu(server, tmp_path)
        ext = ExternalUser(dev.group, "nic-loop")
        with pytest.raises(ObjectError) as info:
            ext.acquire()
        assert info.value.errno == errno.EINVAL
        assert dev.group.users == 0 and not ext.acquired


async def test_external_user_needs_a_viable_group(tmp_path: Path) -> None:
    async with running_server() as server:
        dev, path = add_edu(server, tmp_path)
        async with open_client(path):
            dev.healthy = False
            ext = ExternalUser(dev.group, "tap")
            with pytest.raises(ObjectError) as info:
                ext.acquire()
            assert info.value.errno == errno.EINVAL
            assert dev.group.users == 1
            dev.healthy = True
            with ext:
                assert dev.group.users == 2
                with pytest.raises(ObjectError) as info:
                    ext.acquire()  # twice
                assert info.value.errno == errno.EINVAL
            assert dev.group.users == 1 and not ext.acquired


async def test_external_user_refused_while_draining(tmp_path: Path) -> None:
    async with running_server() as server, trio.open_nursery() as nursery:
        a, b = await two_device_group(server, tmp_path, OwnerPolicy.PID)
        g = server.groups["g"]
        async with open_client(a), open_client(b):
            ext = ExternalUser(g, "migration")
            removal = await start_removal(nursery, server, "b", interval=60)
            assert g.owner is not None and g.draining
            with pytest.raises(ObjectError) as info:
                ext.acquire()
            assert info.value.errno == errno.EINVAL
            assert g.users == 2 and not ext.acquired and not g.external
        await removal.wait()


async def test_external_user_release_clears_owner_when_last(tmp_path: Path) -> None:
    async with running_server() as server:
        dev, path = add_edu(server, tmp_path)
        ext = ExternalUser(dev.group, "migration")
        async with open_client(path):
            ext.acquire()
            assert dev.group.users == 2
        await wait_detached(dev)
        assert dev.group.users == 1 and dev.group.owner is not None
        # A new client from the same pid may still join the group held by the external user.
        async with open_client(path):
            assert dev.group.users == 2
        await wait_detached(dev)
        ext.release()
        assert dev.group.users == 0 and dev.group.owner is None

"""Who may connect, and how many (docs/access.md): every client is a possibly hostile local
process, so the socket file's mode and group are set explicitly (never by the umask), a
device's uid/gid allow-list is checked at accept before a byte is read, and connections
beyond `Limits.max_connections_per_device` / `max_connections` are closed at once.

Raw peers are plain blocking sockets: connecting to a listening Unix socket completes in the
kernel's backlog, so after `settle()` the server has accepted (and possibly refused) it, and
a non-blocking `recv` tells the two apart: EOF (refused) or nothing yet (being served).
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import socket
import stat
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import vfiouser_srv.engines.python as server_mod
from devices.edu import Edu, Reg
from vfiouser_srv.limits import Limits
from vfiouser_srv.objects import ObjectError
from vfiouser_srv.server import Server
from vfiouser_srv.sockets import SocketAccess

from ._support import BAR0, EDU_ID, from_u32
from .conftest import open_client, path_of, settle, sock_path

pytestmark = pytest.mark.usefixtures("no_fd_leak")

SERVER_LOG = "vfiouser_srv.engines.python"


@contextmanager
def umask(value: int) -> Iterator[None]:
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def other_gid() -> int:
    """A group this process may give a file, other than the one files get by default.

    root may use any group; anyone else a supplementary group of theirs (else their own,
    which makes the st_gid check weaker but still valid).
    """
    own = os.getegid()
    if os.geteuid() == 0:
        return next(g.gr_gid for g in grp.getgrall() if g.gr_gid != own)
    return next((g for g in os.getgroups() if g != own), own)


def mode_of(path: str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def raw_connect(stack: ExitStack, path: str) -> socket.socket:
    sock = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
    sock.connect(path)
    return sock


def refused(sock: socket.socket) -> bool:
    """True if the server closed `sock` without a byte; False if it is still being served."""
    try:
        data = sock.recv(1, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    assert data == b"", f"the server sent {data!r}"
    return True


async def serving(nursery: trio.Nursery, server: Server) -> Server:
    await nursery.start(server.serve)
    return server


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == SERVER_LOG and r.levelno == logging.WARNING and "refused" in r.getMessage()
    ]


# ------------------------------------------------------------------------ socket mode / group


@pytest.mark.parametrize("mask", [0o000, 0o022])
def test_socket_is_0600_from_the_moment_it_exists_whatever_the_umask(
    tmp_path: Path, mask: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old code left the mode to the umask: 0777 under 000, 0755 under 022."""
    seen: list[int] = []
    real_chmod = os.chmod

    def spy(path: Any, mode: int, **kwargs: Any) -> None:
        seen.append(mode_of(path))  # what the file had before we set its final mode
        real_chmod(path, mode, **kwargs)

    monkeypatch.setattr(os, "chmod", spy)
    path = sock_path(tmp_path, "edu")
    server = Server()
    with umask(mask):
        server.add_device("edu", Edu(), socket_path=path)
        assert os.umask(mask) == mask  # restored after the bind
    try:
        assert mode_of(path) == 0o600
        assert seen and all(m & 0o077 == 0 for m in seen), [oct(m) for m in seen]
    finally:
        server.close()
    assert not os.path.exists(path)


def test_socket_mode_and_group_are_honoured(tmp_path: Path) -> None:
    gid = other_gid()
    path = sock_path(tmp_path, "edu")
    server = Server()
    with umask(0o022):
        server.add_device("edu", Edu(), socket_path=path, access=SocketAccess(0o660, gid))
    try:
        st = os.lstat(path)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == gid
    finally:
        server.close()


def test_a_failure_after_bind_leaves_no_socket_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_chown(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "chown", no_chown)
    path = sock_path(tmp_path, "edu")
    server = Server()
    with pytest.raises(ObjectError, match=f"cannot give {path} group 4242"):
        server.add_device("edu", Edu(), socket_path=path, access=SocketAccess(group=4242))
    assert not os.path.exists(path)
    assert "edu" not in server.devices


@pytest.mark.parametrize(
    ("make_path", "message"),
    [
        (lambda tmp: str(tmp / "missing" / "edu.sock"), "does not exist"),
        (lambda tmp: str(tmp / ("x" * 120 + ".sock")), "a Unix socket path holds at most 107"),
    ],
    ids=["missing-parent", "too-long"],
)
def test_unusable_path_is_an_object_error_naming_it(
    tmp_path: Path, make_path: Any, message: str
) -> None:
    path = make_path(tmp_path)
    server = Server()
    with pytest.raises(ObjectError, match=message) as info:
        server.add_device("edu", Edu(), socket_path=path)
    assert path in str(info.value)
    assert server.devices == {}


def test_libvfio_user_refuses_an_allow_list_it_cannot_enforce(tmp_path: Path) -> None:
    """Checked before the engine is even loaded, so this holds without the library."""
    path = sock_path(tmp_path, "edu")
    server = Server()
    with pytest.raises(ObjectError, match="cannot be enforced"):
        server.add_device(
            "edu",
            Edu(),
            socket_path=path,
            engine="libvfio-user",
            access=SocketAccess(allow_uids=frozenset({os.getuid() + 1})),
        )
    assert not os.path.exists(path)


# ------------------------------------------------------------------------ allow-lists


async def test_allow_list_refuses_an_unlisted_peer_before_version(
    nursery: trio.Nursery,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sessions = 0
    real_session = server_mod.Session

    def counting_session(*args: Any) -> Any:
        nonlocal sessions
        sessions += 1
        return real_session(*args)

    monkeypatch.setattr(server_mod, "Session", counting_session)
    server = Server()
    somebody_else = os.getuid() + 1
    access = SocketAccess(allow_uids=frozenset({somebody_else}))
    server.add_device("edu", Edu(), socket_path=sock_path(tmp_path, "edu"), access=access)
    await serving(nursery, server)
    async with open_client(server, version=False) as c:
        with pytest.raises((trio.BrokenResourceError, OSError)):
            await c.version()  # no reply: the connection was closed at accept
        with trio.fail_after(5):
            await c.wait_disconnected()
    assert sessions == 0  # nothing was read from it: no session was ever created
    assert server.connections["edu"] == 0
    me = f"pid {os.getpid()} uid {os.getuid()} gid {os.getgid()}"
    assert refusals(caplog) == [
        f"edu: refused connection from {me}: uid/gid not in the device's allow-list"
    ]


@pytest.mark.parametrize("listed", ["uid", "gid"])
async def test_allow_list_admits_a_listed_peer(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture, listed: str
) -> None:
    somebody_else = os.getuid() + 1
    access = (
        SocketAccess(allow_uids=frozenset({somebody_else, os.getuid()}))
        if listed == "uid"
        else SocketAccess(
            allow_uids=frozenset({somebody_else}), allow_gids=frozenset({os.getgid()})
        )
    )
    server = Server()
    server.add_device("edu", Edu(), socket_path=sock_path(tmp_path, "edu"), access=access)
    await serving(nursery, server)
    async with open_client(server) as c:
        assert from_u32(await c.region_read(BAR0, Reg.ID, 4)) == EDU_ID
    assert refusals(caplog) == []


async def test_peer_credentials_are_read_once_per_connection(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the accept loop reads SO_PEERCRED for the allow-list and hands it to the session
    # (a getsockopt per connection less); the session still knows who its client is
    reads = 0
    real = socket.socket.getsockopt

    def counting(sock: socket.socket, level: int, option: int, *rest: Any) -> Any:
        nonlocal reads
        if (level, option) == (socket.SOL_SOCKET, socket.SO_PEERCRED) and sock.family == (
            socket.AF_UNIX
        ) and sock.getsockname():  # the server's end (the client's is unnamed)
            reads += 1
        return real(sock, level, option, *rest)

    server = Server()
    server.add_device("edu", Edu(), socket_path=sock_path(tmp_path, "edu"))
    await serving(nursery, server)
    monkeypatch.setattr(socket.socket, "getsockopt", counting)
    async with open_client(server) as c:
        assert from_u32(await c.region_read(BAR0, Reg.ID, 4)) == EDU_ID
        (session,) = server.sessions
        assert (session.client.pid, session.client.uid, session.client.gid) == (
            os.getpid(), os.getuid(), os.getgid())
    assert reads == 1


# ------------------------------------------------------------------------ connection caps


async def test_connection_beyond_the_device_cap_is_closed_at_once(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = Server(limits=Limits(max_connections_per_device=2))
    for name in ("edu", "other"):
        server.add_device(name, Edu(), socket_path=sock_path(tmp_path, name))
    await serving(nursery, server)
    with ExitStack() as stack:
        async with open_client(server) as first:
            second = raw_connect(stack, path_of(server))  # negotiating: counts too
            await settle()
            assert not refused(second)
            third = raw_connect(stack, path_of(server))
            await settle()
            assert refused(third)
            # the first N are unaffected
            assert from_u32(await first.region_read(BAR0, Reg.ID, 4)) == EDU_ID
            assert not refused(second)
            # another device is not affected by this one's cap
            async with open_client(server, "other") as c:
                extra = raw_connect(stack, path_of(server, "other"))
                await settle()
                assert not refused(extra)
                assert from_u32(await c.region_read(BAR0, Reg.ID, 4)) == EDU_ID
            # a connection that ends frees its place
            second.close()
            await settle()
            assert server.connections["edu"] == 1
            fourth = raw_connect(stack, path_of(server))
            await settle()
            assert not refused(fourth)
    me = f"pid {os.getpid()} uid {os.getuid()} gid {os.getgid()}"
    assert refusals(caplog) == [
        f"edu: refused connection from {me}: 2 connections to this device already open "
        "(max_connections_per_device)"
    ]


async def test_server_wide_cap_counts_every_device(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = Server(limits=Limits(max_connections=2))
    for name in ("edu", "other"):
        server.add_device(name, Edu(), socket_path=sock_path(tmp_path, name))
    await serving(nursery, server)
    with ExitStack() as stack:
        a = raw_connect(stack, path_of(server))
        b = raw_connect(stack, path_of(server, "other"))
        await settle()
        assert not refused(a) and not refused(b)
        c = raw_connect(stack, path_of(server, "other"))
        await settle()
        assert refused(c)
    assert len(refusals(caplog)) == 1
    assert "(max_connections)" in refusals(caplog)[0]


async def test_a_flood_of_refusals_logs_one_line_then_a_count_per_second(
    nursery: trio.Nursery,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    mock_clock: trio.testing.MockClock,
) -> None:
    server = Server(limits=Limits(max_connections_per_device=1))
    server.add_device("edu", Edu(), socket_path=sock_path(tmp_path, "edu"))
    await serving(nursery, server)
    with ExitStack() as stack:
        held = raw_connect(stack, path_of(server))
        for _ in range(11):
            with ExitStack() as each:
                flood = raw_connect(each, path_of(server))
                await settle()
                assert refused(flood)
        assert len(refusals(caplog)) == 1  # the first, in full; ten counted
        mock_clock.jump(server_mod.REFUSAL_LOG_INTERVAL)
        await settle()
        lines = refusals(caplog)
        assert len(lines) == 2, lines
        assert lines[1].startswith("edu: refused 10 more connection(s) in the last 1s: ")
        assert f"(last from pid {os.getpid()} " in lines[1]
        assert not refused(held)

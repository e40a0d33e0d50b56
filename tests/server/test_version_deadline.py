"""Where the VERSION deadline lives: on the read epoch of a session that waits for its client
before VERSION, never on the session's own scope (a connect + VERSION that never waits sets
no trio deadline at all), and lifted by VERSION even while that epoch runs on."""

from __future__ import annotations

import struct
from pathlib import Path

import trio

from devices.sdk import Bar, CallbackHandler, PciDevice, PciIdentity
from protocol import HEADER, Capabilities, Command, Connection, Role, Version, pack_header
from vfiouser_srv.limits import Limits
from vfiouser_srv.outbox import WRITE_BACKLOG_LIMIT
from vfiouser_srv.server import Server
from vfiouser_srv.session import Session

from ._support import add_edu, settle
from .conftest import MakeServer, path_of

_INF = float("inf")


def _version_bytes() -> bytes:
    _id, data, _fds = Connection(Role.CLIENT).send_request(Version(0, 0, Capabilities()))
    return data


async def _reply(stream: trio.SocketStream) -> tuple[int, int, int, int, int]:
    """The next reply's header (its payload read and dropped)."""
    data = b""
    while len(data) < 16:
        chunk = await stream.receive_some(16 - len(data))
        assert chunk, "server closed instead of replying"
        data += chunk
    head = HEADER.unpack(data)
    rest = head[2] - 16
    while rest > 0:
        chunk = await stream.receive_some(rest)
        assert chunk, "server closed mid-reply"
        rest -= len(chunk)
    return head


async def test_the_session_scope_has_no_deadline_and_a_waiting_epoch_does(
    tmp_path: Path,
) -> None:
    server = Server(limits=Limits(version_timeout=0.3))
    _dev, path = add_edu(server, tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        silent = await trio.open_unix_socket(path)
        await settle()  # the session now waits for VERSION
        (session,) = server.sessions
        assert isinstance(session, Session)
        # the session has no scope of its own: the one it waits in is the epoch's
        assert session._scope is not None and session._scope.deadline < _INF
        with trio.fail_after(5):  # and the silent client is still cut off
            assert await silent.receive_some(16) == b""
        await silent.aclose()
        nursery.cancel_scope.cancel()


async def test_version_after_a_wait_lifts_the_epoch_deadline(tmp_path: Path) -> None:
    """The session waited (its epoch carries the deadline), then VERSION came: the same
    epoch reads on, so `attach` must lift its deadline or the client is cut off later."""
    server = Server(limits=Limits(version_timeout=0.2))
    _dev, path = add_edu(server, tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        client = await trio.open_unix_socket(path)
        await settle()
        await client.send_all(_version_bytes())
        assert (await _reply(client))[4] == 0
        await settle()
        (session,) = server.sessions
        assert isinstance(session, Session)
        assert session._scope is None or session._scope.deadline == _INF  # lifted
        await trio.sleep(0.5)  # well past the deadline the epoch had
        info = pack_header(2, Command.DEVICE_GET_INFO, 32, 0) + struct.pack("<4I", 16, 0, 0, 0)
        await client.send_all(info)
        with trio.fail_after(5):
            msg_id, _command, _size, _flags, error = await _reply(client)
        assert (msg_id, error) == (2, 0)
        await client.aclose()
        nursery.cancel_scope.cancel()


class BigBar(PciDevice):
    """BAR0 of 1 MiB that reads as zeros: big replies from small requests."""

    name = "bigbar"
    identity = PciIdentity(vendor_id=0x1234, device_id=0xB16B)

    def __init__(self) -> None:
        super().__init__(bars=[Bar(0, 1 << 20, backing=CallbackHandler(self._read, self._write))])

    def _read(self, offset: int, count: int) -> bytes:
        return bytes(count)

    def _write(self, offset: int, data: bytes) -> None:
        pass


async def test_force_close_wakes_a_session_waiting_for_room_before_its_first_wait(
    make_server: MakeServer,
) -> None:
    """The session has no cancel scope of its own, and its first epoch none either: a peer
    that asks for big reads in its first bytes and never reads the replies leaves the
    session waiting for room in the outbox there. `force_close` (the hot-remove deadline)
    must still end it, through `Outbox.abandon`."""
    srv = await make_server({"big": BigBar()})
    sock = await trio.open_unix_socket(path_of(srv, "big"))
    count = 64 << 10
    read = pack_header(0, Command.REGION_READ, 32, 0) + struct.pack("<QII", 0, 0, count)
    n = 2 * WRITE_BACKLOG_LIMIT // count
    await sock.send_all(_version_bytes() + read * n)  # one write: the first read sees all
    await settle()
    (session,) = srv.sessions
    assert isinstance(session, Session)
    assert session._scope is None and session.outbox.backlog > WRITE_BACKLOG_LIMIT
    session.force_close()
    with trio.fail_after(5):
        while srv.sessions:
            await trio.sleep(0.01)
    await sock.aclose()

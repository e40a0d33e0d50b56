"""Helpers for the protocol tests: sentinel fds, hand-built frames, a client/server pair.

Like h11's `tests/helpers.py`: everything runs through both roles of `Connection` with no
sockets at all. Descriptors are `FdToken` sentinels, so a test can count where each went.
"""

from __future__ import annotations

import dataclasses
import itertools
import struct
from collections.abc import Iterable, Sequence
from typing import Any

from protocol import (
    BadRequest,
    Body,
    Capabilities,
    Connection,
    ErrorReply,
    Event,
    Reply,
    Request,
    Role,
    Version,
    VersionReply,
    negotiate,
)


class FdToken:
    """A stand-in for an owned descriptor: compared by identity only."""

    __slots__ = ("n",)
    _count = 0

    def __init__(self) -> None:
        FdToken._count += 1
        self.n = FdToken._count

    def __repr__(self) -> str:
        return f"<fd {self.n}>"


def fds(n: int) -> list[FdToken]:
    return [FdToken() for _ in range(n)]


def layout(size: int, *fields: tuple[int, str, Any]) -> bytes:
    """Bytes of a struct drawn from a spec table: (offset, struct format, value) per row.

    The rows must tile [0, size) exactly, so a row left out of the transcription fails.
    """
    buf = bytearray(size)
    covered = 0
    for offset, fmt, value in sorted(fields, key=lambda f: f[0]):
        assert offset == covered, f"gap or overlap at offset {offset} (expected {covered})"
        struct.pack_into("<" + fmt, buf, offset, value)
        covered = offset + struct.calcsize("<" + fmt)
    assert covered == size, f"rows cover {covered} bytes, struct is {size}"
    return bytes(buf)


def header(msg_id: int, command: int, size: int, flags: int = 0, error: int = 0) -> bytes:
    """The 16-byte header from the spec table: id@0 u16, cmd@2 u16, size@4, flags@8, error@12."""
    return layout(16, (0, "H", msg_id), (2, "H", command), (4, "I", size), (8, "I", flags),
                  (12, "I", error))


def frame(command: int, payload: bytes = b"", msg_id: int = 0, flags: int = 0,
          error: int = 0) -> bytes:
    return header(msg_id, command, 16 + len(payload), flags, error) + payload


def fds_of(ev: Event) -> list[Any]:
    """Every descriptor an event hands to its receiver; checks none hides outside `.fds`."""
    if isinstance(ev, BadRequest):
        return list(ev.error.fds)
    if isinstance(ev, ErrorReply):
        return []
    assert isinstance(ev, Request | Reply)
    out = list(ev.body.fds)
    hidden = _tokens_in(ev.body)
    assert set(map(id, hidden)) <= set(map(id, out)), f"{ev.body!r} holds fds not in .fds"
    return out


def _tokens_in(obj: Any) -> list[FdToken]:
    if isinstance(obj, FdToken):
        return [obj]
    if isinstance(obj, tuple | list):
        return [t for x in obj for t in _tokens_in(x)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [t for f in dataclasses.fields(obj) for t in _tokens_in(getattr(obj, f.name))]
    return []


def drain(conn: Connection) -> list[Event]:
    out = []
    while (ev := conn.next_event()) is not None:
        out.append(ev)
    return out


def one_event(conn: Connection) -> Event:
    evs = drain(conn)
    assert len(evs) == 1, evs
    return evs[0]


def version_payload(major: int = 0, minor: int = 0, caps: Capabilities | None = None) -> bytes:
    return Version(major, minor, caps or Capabilities()).encode()


def ready_server(caps: Capabilities | None = None) -> Connection:
    """A server connection that completed VERSION with a default client."""
    server = Connection(Role.SERVER, local_caps=caps)
    server.receive_data(frame(1, version_payload(), msg_id=7))
    ev = one_event(server)
    assert isinstance(ev, Request) and isinstance(ev.body, Version)
    agreed = negotiate(ev.body.capabilities, server.local_caps)
    server.send_reply(ev.msg_id, VersionReply(0, 0, agreed))
    return server


class ConnectionPair:
    """A client and a server wired back to back (bytes and fds handed over directly)."""

    def __init__(self, server_caps: Capabilities | None = None,
                 client_caps: Capabilities | None = None) -> None:
        self.server = Connection(Role.SERVER, local_caps=server_caps)
        self.client = Connection(Role.CLIENT, local_caps=client_caps)

    def request(self, body: Body, *, no_reply: bool = False) -> Event:
        """Client sends `body`; returns the server's event."""
        _msg_id, data, sent = self.client.send_request(body, no_reply=no_reply)
        self.server.receive_data(data, sent)
        return one_event(self.server)

    def server_request(self, body: Body) -> Event:
        _msg_id, data, sent = self.server.send_request(body)
        self.client.receive_data(data, sent)
        return one_event(self.client)

    def reply(self, msg_id: int, body: Body) -> Event:
        """Server replies; returns the client's event."""
        data, sent = self.server.send_reply(msg_id, body)
        self.client.receive_data(data, sent)
        return one_event(self.client)

    def handshake(self) -> Capabilities:
        ev = self.request(Version(0, 0, self.client.local_caps))
        assert isinstance(ev, Request) and isinstance(ev.body, Version)
        agreed = negotiate(ev.body.capabilities, self.server.local_caps)
        rep = self.reply(ev.msg_id, VersionReply(0, 0, agreed))
        assert isinstance(rep, Reply)
        return agreed


def split(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def feed_all(conn: Connection, chunks: Sequence[tuple[bytes, Sequence[Any]]]) -> list[Event]:
    out: list[Event] = []
    for data, chunk_fds in chunks:
        conn.receive_data(data, chunk_fds)
        out += drain(conn)
    return out

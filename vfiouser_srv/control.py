"""The control socket: a QMP-like line protocol for whoever runs the server (`serve --control`).

Why QMP's shape: operators and tools already know it from QEMU. One JSON object per line; on
connect the server sends a greeting, then answers each request in order:

    <- {"QMP": {"version": {"package": "vfiouser-srv 0.1.0"}, "capabilities": []}}
    -> {"execute": "query-version", "id": 1}
    <- {"return": {"package": "vfiouser-srv 0.1.0"}, "id": 1}
    -> {"execute": "nope"}
    <- {"error": {"class": "CommandNotFound", "desc": "no command 'nope'"}}

`id` is echoed when given; `qmp_capabilities` is accepted (and not required). A command may
also send events (`{"event": NAME, "data": ...}`) and descriptors (SCM_RIGHTS) before its
reply: the live upgrade does (`takeover`, docs/live-upgrade.md).

Adding a command is one decorated coroutine anywhere above this module:

    @command("query-thing", "one line for query-commands")
    async def _thing(conn: ControlConnection, args: Arguments) -> object: ...

Who may connect: the socket is created with the same rules as a device socket (mode 0600 by
default, group, SO_PEERCRED allow-list checked before a byte is read: `sockets.py`,
docs/access.md). Bad input (not JSON, not an object, unknown command, bad arguments, a line
over `MAX_LINE`) gets an error reply, or for an oversized line a disconnect; it never
disturbs the server or another control connection. Descriptors a client sends are closed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from . import __version__
from .fds import OwnedFd, close_all
from .server import Server
from .sockets import SocketAccess, adopt_fd, listen_path, peer_groups, peercred
from .transport import SCM_MAX_FD, FdStream, TransportError

log = logging.getLogger(__name__)

#: longest request line accepted from a control client (a longer one closes the connection)
MAX_LINE = 1 << 20
#: control connections open at a time; more are closed at accept
MAX_CONNECTIONS = 16
PACKAGE = f"vfiouser-srv {__version__}"
#: events queued for one subscriber before further ones are dropped
MAX_QUEUED_EVENTS = 256
_BROKEN = (TransportError, trio.BrokenResourceError, trio.ClosedResourceError)

Arguments = dict[str, Any]
Handler = Callable[["ControlConnection", Arguments], Awaitable[Any]]


class ControlError(Exception):
    """A command's failure, sent as `{"error": {"class": ..., "desc": ...}}`."""

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


@dataclass(frozen=True)
class Command:
    name: str
    handler: Handler
    help: str


#: every command, by name (`command` adds to it)
COMMANDS: dict[str, Command] = {}


def command(name: str, help: str) -> Callable[[Handler], Handler]:
    """Register a control command (see the module docstring)."""

    def register(handler: Handler) -> Handler:
        if name in COMMANDS:
            raise ValueError(f"control command {name!r} registered twice")
        COMMANDS[name] = Command(name, handler, help)
        return handler

    return register


class LineChannel:
    """JSON lines over an `FdStream`, in both directions, with descriptors.

    Descriptors that arrive are queued in order (`fds`) whatever line they came with; the
    sender of a batch says how many it sent, so the two can be matched up.
    """

    def __init__(self, stream: FdStream, max_line: int = MAX_LINE) -> None:
        self.stream = stream
        self.max_line = max_line
        self.fds: list[OwnedFd] = []
        self._buf = bytearray()
        self._eof = False

    async def receive(self) -> Any:
        """The next JSON value; None at end of stream. Raises `ControlError` for a line that
        is not JSON (the channel stays usable) and `TransportError` for one over
        `max_line` (it does not)."""
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                line = bytes(self._buf[:end])
                del self._buf[: end + 1]
                if not line.strip():
                    continue
                try:
                    return json.loads(line)
                except (ValueError, UnicodeDecodeError) as exc:
                    raise ControlError(f"JSON parse error: {exc}") from None
            if len(self._buf) > self.max_line:
                raise TransportError(f"control line over {self.max_line} bytes")
            if self._eof:
                return None
            data, fds = await self.stream.receive()
            self.fds.extend(fds)
            if not data:
                self._eof = True
            self._buf += data

    async def send(self, obj: Any, fds: list[Any] | tuple[Any, ...] = ()) -> None:
        """One line; `fds` ride with its first byte (at most `SCM_MAX_FD`)."""
        await self.stream.send(json.dumps(obj, separators=(",", ":")).encode() + b"\n", fds)

    async def send_fds(self, fds: list[Any], event: str) -> None:
        """Any number of descriptors, as events of `SCM_MAX_FD` at most each."""
        for i in range(0, len(fds), SCM_MAX_FD):
            batch = fds[i : i + SCM_MAX_FD]
            await self.send({"event": event, "data": {"count": len(batch)}}, batch)

    def take_fds(self) -> list[OwnedFd]:
        fds, self.fds = self.fds, []
        return fds

    def close(self) -> None:
        close_all(self.take_fds())
        self.stream.close()


class ControlConnection:
    """One control client, as a command handler sees it."""

    def __init__(self, control: ControlServer, channel: LineChannel, peer: str) -> None:
        self.control = control
        self.server = control.server
        self.channel = channel
        self.peer = peer
        #: the request being answered: its `id` (echoed in the reply, and in events)
        self.request_id: Any = None
        #: the handler sent its reply itself (`reply`): the loop must not send another
        self.replied = False
        self._send_lock = trio.Lock()
        #: server events queued for this connection once it ran `subscribe`
        self.events: trio.MemorySendChannel[dict[str, Any]] | None = None
        #: this connection's tasks (the event pump), set by `ControlServer`
        self.nursery: trio.Nursery | None = None

    async def send(self, obj: dict[str, Any], fds: list[Any] | tuple[Any, ...] = ()) -> None:
        async with self._send_lock:  # replies and pushed events never interleave
            await self.channel.send(obj, fds)

    def push_event(self, name: str, data: dict[str, Any]) -> None:
        """A server event (`objects.EventBus` listener); dropped if the client lags far."""
        if self.events is not None:
            with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError):
                self.events.send_nowait({"event": name, "data": data})

    async def pump_events(self, receive: trio.MemoryReceiveChannel[dict[str, Any]]) -> None:
        with contextlib.suppress(*_BROKEN):
            async for event in receive:
                await self.send(event)

    async def reply(self, value: Any) -> None:
        self.replied = True
        await self.send(self._with_id({"return": value}))

    async def error(self, exc: ControlError) -> None:
        await self.send(self._with_id({"error": {"class": exc.error_class, "desc": exc.desc}}))

    def _with_id(self, msg: dict[str, Any]) -> dict[str, Any]:
        if self.request_id is not None:
            msg["id"] = self.request_id
        return msg

    async def serve(self) -> None:
        await self.send({"QMP": {"version": {"package": PACKAGE}, "capabilities": []}})
        while True:
            self.request_id = None
            self.replied = False
            try:
                msg = await self.channel.receive()
            except ControlError as exc:
                await self.error(exc)
                continue
            finally:
                close_all(self.channel.take_fds())  # no command takes descriptors
            if msg is None:
                return
            try:
                name, args = self._parse(msg)
                cmd = COMMANDS.get(name)
                if cmd is None:
                    raise ControlError(f"no command {name!r}", "CommandNotFound")
                log.info("control: %s from %s", name, self.peer)
                result = await cmd.handler(self, args)
            except ControlError as exc:
                await self.error(exc)
            except Exception as exc:
                log.exception("control: %r failed", msg)
                await self.error(ControlError(f"internal error: {exc}"))
            else:
                if not self.replied:
                    await self.reply(result if result is not None else {})

    def _parse(self, msg: Any) -> tuple[str, Arguments]:
        if not isinstance(msg, dict):
            raise ControlError("a request is a JSON object")
        self.request_id = msg.get("id")
        name = msg.get("execute")
        if not isinstance(name, str):
            raise ControlError('a request needs "execute": "<command>"')
        args = msg.get("arguments", {})
        if not isinstance(args, dict):
            raise ControlError('"arguments" must be a JSON object')
        unknown = set(msg) - {"execute", "arguments", "id"}
        if unknown:
            raise ControlError(f"unknown request member(s): {', '.join(sorted(unknown))}")
        return name, args


class ControlServer:
    """The control socket's listener and its connections (run `serve` in a nursery)."""

    def __init__(
        self,
        server: Server,
        path: str,
        access: SocketAccess,
        *,
        fd: int | None = None,
    ) -> None:
        """`fd`: a listener already bound at `path`, handed over by a live upgrade."""
        self.server = server
        self.path = path
        self.access = access
        self.sock = adopt_fd(fd) if fd is not None else listen_path(path, access)
        #: set when a live upgrade committed: the process should exit (`cli`)
        self.handed_over = trio.Event()
        #: a take-over is under way (one at a time)
        self.busy = False
        #: the socket file belongs to the next process: never unlink it
        self.keep_socket_file = False
        self.connections = 0
        self._closed = False

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    await trio.lowlevel.wait_readable(self.sock)
                    try:
                        conn, _ = self.sock.accept()
                    except BlockingIOError:
                        continue
                    except OSError as exc:
                        log.error("control: accept: %s", exc)
                        await trio.sleep(0.1)
                        continue
                    peer = self._admit(conn)
                    if peer is not None:
                        nursery.start_soon(self._serve_connection, conn, peer)
        finally:
            self.close()

    def _admit(self, conn: socket.socket) -> str | None:
        try:
            pid, uid, gid = peercred(conn)
        except OSError:
            pid = uid = gid = -1
        peer = f"pid {pid} uid {uid} gid {gid}"
        why = None
        if self.access.restricted and not self.access.admits(uid, peer_groups(conn, gid)):
            why = "uid/gid not in the allow-list"
        elif self.connections >= MAX_CONNECTIONS:
            why = f"{MAX_CONNECTIONS} control connections already open"
        if why is None:
            return peer
        log.warning("control: refused connection from %s: %s", peer, why)
        conn.close()
        return None

    async def _serve_connection(self, conn: socket.socket, peer: str) -> None:
        self.connections += 1
        channel = LineChannel(FdStream(conn, max_fds=SCM_MAX_FD))
        connection = ControlConnection(self, channel, peer)
        try:
            async with trio.open_nursery() as nursery:
                connection.nursery = nursery
                try:
                    await connection.serve()
                except _BROKEN as exc:
                    log.info("control: %s: %s", peer, exc)
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self.connections -= 1
            with contextlib.suppress(ValueError):
                self.server.events.listeners.remove(connection.push_event)
            channel.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.keep_socket_file:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        with contextlib.suppress(RuntimeError):
            trio.lowlevel.notify_closing(self.sock)
        self.sock.close()


# ------------------------------------------------------------------------ basic commands


@command("qmp_capabilities", "accepted for QMP clients; there is nothing to negotiate")
async def _qmp_capabilities(conn: ControlConnection, args: Arguments) -> object:
    return {}


@command("query-version", "the server's package and version")
async def _query_version(conn: ControlConnection, args: Arguments) -> object:
    return {"package": PACKAGE, "pid": os.getpid()}


@command("query-commands", "every command, with one line about it")
async def _query_commands(conn: ControlConnection, args: Arguments) -> object:
    return [{"name": c.name, "help": c.help} for c in sorted(COMMANDS.values(), key=_name)]


def _name(c: Command) -> str:
    return c.name


__all__ = [
    "COMMANDS",
    "MAX_LINE",
    "Arguments",
    "Command",
    "ControlConnection",
    "ControlError",
    "ControlServer",
    "LineChannel",
    "command",
]

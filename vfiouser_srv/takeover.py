"""Live upgrade: a new server process takes every device, connection and socket from the old
one while QEMU waits for its next reply (docs/live-upgrade.md).

Why it can work at all: everything QEMU shares with us is a file descriptor (the listening
sockets, each connection, the DMA windows' memory files, the interrupt eventfds), and a
descriptor passed with SCM_RIGHTS is the same open file in the receiver. QEMU cannot
reconnect, but it never needs to: its requests wait in the socket while the processes swap.

The exchange, over the old process's control socket (`control.py`):

    new -> {"execute": "take-over", "arguments": {"format": 1}, "id": 1}
    old    holds its accept loops, quiesces attached models (their sessions still serve, so
           in-flight DMA completes), parks every session at a message boundary (outbox
           flushed, nothing half-read), cancels remaining device tasks, saves each model
    old -> {"event": "TAKE_OVER_FDS", "data": {"count": n}} + n fds (repeated), then
           {"event": "TAKE_OVER_STATE", "data": <snapshot>}
    new    builds its server on the listeners, loads each model's state, restores each
           session (group claimed, windows mapped, eventfds and IRQ bits in place)
    new -> {"execute": "take-over-commit"}        (or "take-over-abort" with a reason)
    old -> {"return": {...}, "id": 1}; the old process then exits 0 without unlinking
           anything or sending a byte to a client; the new one starts serving.

The commit point is the old process reading "take-over-commit": before it, any failure of
the new process (death, timeout, garbage, abort) makes the old one resume exactly where it
was (models resumed, sessions unparked, accept loops released). The new process serves only
after the old one's reply, so the two never serve at once. While the handover holds a
device, its group is held by an `ExternalUser` on both sides, so it cannot be torn down.

Python engine only: libvfio-user keeps its connection state inside the C library.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from .control import (
    Arguments,
    ControlConnection,
    ControlError,
    LineChannel,
    command,
)
from .engines.python import PythonDevice
from .objects import ExternalUser, Group, ObjectError
from .server import Server
from .session import Pause, Session
from .takeover_state import (
    FORMAT,
    Fds,
    Received,
    SnapshotError,
    b64,
    restore_session,
    save_session,
    unb64,
    undo_session,
)
from .transport import SCM_MAX_FD, FdStream, TransportError

log = logging.getLogger(__name__)

#: default bound on the whole handover, as seen by the old process (pause + new process)
HANDOVER_TIMEOUT = 10.0
#: how long a model's `quiesce` may take before its remaining tasks are cancelled
QUIESCE_GRACE = 2.0
#: a snapshot line may be this long (device states travel in it)
MAX_SNAPSHOT = 1 << 30
FDS_EVENT = "TAKE_OVER_FDS"
STATE_EVENT = "TAKE_OVER_STATE"


class TakeOverError(Exception):
    """The take-over did not happen; the old process keeps serving. One line, for the CLI."""


# ------------------------------------------------------------------------ the old process


def python_devices(server: Server) -> dict[str, PythonDevice]:
    """Every device's engine device, if all can be handed over (else `ControlError`)."""
    out: dict[str, PythonDevice] = {}
    for name, dev in server.devices.items():
        served = server.engine_device(name)
        if not isinstance(served, PythonDevice):
            raise ControlError(
                f"device {name} is served by the libvfio-user engine, which keeps its "
                "connection state inside the C library: take-over needs the python engine"
            )
        if served.listener is None:
            raise ControlError(
                f"device {name} is served on an inherited connected socket (--fd), which "
                "has no listener to hand over"
            )
        version = type(dev.model).state_version
        if not version:
            raise ControlError(
                f"device {name} (model {dev.model.name or type(dev.model).__name__}) cannot "
                "save its state (state_version 0)"
            )
        if dev.group.draining:
            raise ControlError(f"device {name}'s group {dev.group.name} is being removed")
        out[name] = served
    return out


@dataclass(eq=False)
class Handover:
    """One take-over, on the old process's side (see the module docstring)."""

    conn: ControlConnection
    devices: dict[str, PythonDevice]
    timeout: float
    pause: Pause = field(default_factory=Pause)
    sessions: list[Session] = field(default_factory=list)
    quiesced: list[Session] = field(default_factory=list)
    externals: list[ExternalUser] = field(default_factory=list)
    committed: bool = False
    paused_at: float = 0.0

    @property
    def server(self) -> Server:
        return self.conn.server

    async def run(self) -> dict[str, Any]:
        try:
            with trio.fail_after(self.timeout) as scope:
                snapshot, fds = await self._stop_everything()
            scope.deadline = float("inf")
            channel = self.conn.channel
            await channel.send_fds(fds, FDS_EVENT)
            await self.conn.send({"event": STATE_EVENT, "data": snapshot})
            with trio.move_on_after(self._remaining()):
                return await self._await_verdict(channel)
            raise ControlError(f"the new process did not commit within {self.timeout:.1f}s")
        except trio.TooSlowError:
            raise ControlError(
                f"sessions did not reach a message boundary within {self.timeout:.1f}s "
                "(a client not reading its replies?)"
            ) from None
        finally:
            if not self.committed:
                self._resume()

    def _remaining(self) -> float:
        return max(0.0, self.paused_at + self.timeout - trio.current_time())

    async def _stop_everything(self) -> tuple[dict[str, Any], list[int]]:
        self.paused_at = trio.current_time()
        for group in self._owned_groups():
            user = ExternalUser(group, "take-over")
            try:
                user.acquire()
            except ObjectError as exc:
                raise ControlError(f"cannot hold group {group.name}: {exc.strerror}") from None
            self.externals.append(user)
        for served in self.devices.values():
            served.hold()
        # a connection accepted just before the hold registers its session when its task
        # first runs: let those tasks run
        for _ in range(2):
            await trio.lowlevel.checkpoint()
        self.sessions = [
            s
            for s in self.server.sessions
            if s.device.name in self.devices and not s.closing and not s.closed
        ]
        # quiesce while sessions still serve: a model finishing a message-mode DMA needs
        # the client's replies routed to it
        async with trio.open_nursery() as nursery:
            for s in self.sessions:
                if s.attached:
                    self.quiesced.append(s)
                    nursery.start_soon(self._quiesce, s)
        for s in self.sessions:
            s.request_pause(self.pause)
        while self.pause.parked < sum(not s.closed for s in self.sessions):
            self.pause.changed = trio.Event()
            await self.pause.changed.wait()
        self.sessions = [s for s in self.sessions if not s.closed]
        for s in self.sessions:
            if s.attached:
                await s.tasks.cancel_all()
        return self._snapshot()

    def _owned_groups(self) -> list[Group]:
        groups = {id(d.group): d.group for d in self.server.devices.values()}
        return [g for g in groups.values() if g.owner is not None]

    async def _quiesce(self, session: Session) -> None:
        with trio.move_on_after(QUIESCE_GRACE) as scope:
            try:
                await session.model.quiesce()
            except Exception as exc:
                raise ControlError(f"{session.device.name}: quiesce failed: {exc}") from exc
        if scope.cancelled_caught:
            log.warning(
                "%s: quiesce took over %.1fs; cancelling its remaining tasks",
                session.name,
                QUIESCE_GRACE,
            )

    def _snapshot(self) -> tuple[dict[str, Any], list[int]]:
        fds = Fds()
        control = self.conn.control
        devices = []
        for name, served in self.devices.items():
            model = self.server.devices[name].model
            try:
                state = model.save_state()
            except Exception as exc:
                raise ControlError(f"device {name}: save_state failed: {exc}") from exc
            listener = served.listener
            assert listener is not None
            devices.append(
                {
                    "name": name,
                    "model": model.name,
                    "socket": served.endpoint.path,
                    "listener": fds.add(listener.fileno()),
                    "state_version": type(model).state_version,
                    "state": b64(state),
                }
            )
        sessions = [save_session(s, fds) for s in self.sessions]
        snapshot = {
            "format": FORMAT,
            "pid": os.getpid(),
            "control": fds.add(control.sock.fileno()),
            "devices": devices,
            "sessions": sessions,
            "fds": len(fds.items),
        }
        return snapshot, fds.items

    async def _await_verdict(self, channel: LineChannel) -> dict[str, Any]:
        try:
            msg = await channel.receive()
        except TransportError as exc:
            raise ControlError(f"take-over abandoned: {exc}") from None
        if msg is None:
            raise ControlError("the new process went away before committing")
        verb = msg.get("execute") if isinstance(msg, dict) else None
        if verb == "take-over-abort":
            args = msg.get("arguments") or {}
            reason = args.get("reason", "no reason given") if isinstance(args, dict) else ""
            raise ControlError(f"the new process abandoned the take-over: {reason}")
        if verb != "take-over-commit":
            raise ControlError(f"expected take-over-commit or take-over-abort, got {msg!r:.200}")
        return await self._commit()

    async def _commit(self) -> dict[str, Any]:
        paused_ms = (trio.current_time() - self.paused_at) * 1000
        for served in self.devices.values():
            served.keep_socket_file = True
        control = self.conn.control
        control.keep_socket_file = True
        result = {"sessions": len(self.sessions), "paused_ms": round(paused_ms, 3)}
        try:
            await self.conn.reply(result)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            # the new process is gone, so it will not serve either: keep serving
            for served in self.devices.values():
                served.keep_socket_file = False
            control.keep_socket_file = False
            raise ControlError(f"the new process went away while committing: {exc}") from None
        self.committed = True
        self.pause.handed_over = True
        self.pause.done.set()
        for user in self.externals:
            user.release()
        log.warning(
            "handed over %d device(s) and %d connection(s) after %.1f ms; exiting",
            len(self.devices),
            len(self.sessions),
            paused_ms,
        )
        control.handed_over.set()
        return result

    def _resume(self) -> None:
        """Serve on as if nothing had happened."""
        for s in self.quiesced:
            if s.closed:
                continue
            try:
                s.model.resume()
            except Exception:
                log.exception("%s: resume after an abandoned take-over failed", s.name)
        self.pause.done.set()
        for served in self.devices.values():
            served.unhold()
        for user in self.externals:
            user.release()
        log.warning("take-over abandoned; serving on")


@command(
    "take-over",
    "hand every device, connection and listening socket to the calling process "
    "(live upgrade, docs/live-upgrade.md); arguments: format, timeout",
)
async def _take_over(conn: ControlConnection, args: Arguments) -> object:
    control = conn.control
    if args.get("format", FORMAT) != FORMAT:
        raise ControlError(f"snapshot format {args.get('format')!r} unknown (this is {FORMAT})")
    timeout = args.get("timeout", HANDOVER_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ControlError('"timeout" must be a positive number of seconds')
    if control.busy or control.handed_over.is_set():
        raise ControlError("a take-over is already in progress")
    devices = python_devices(conn.server)
    control.busy = True
    try:
        await Handover(conn, devices, float(timeout)).run()
    finally:
        control.busy = False
    return None  # replied already (`Handover._commit`)


@command("take-over-commit", "second step of take-over (only within one)")
async def _commit(conn: ControlConnection, args: Arguments) -> object:
    raise ControlError("no take-over in progress on this connection")


@command("take-over-abort", "second step of take-over (only within one)")
async def _abort(conn: ControlConnection, args: Arguments) -> object:
    raise ControlError("no take-over in progress on this connection")


# ------------------------------------------------------------------------ the new process

#: builds the new server on the handed-over listeners (device name -> fd)
Build = Callable[[dict[str, int]], Server]


@dataclass(eq=False)
class TakenOver:
    """What the new process got, ready to serve once `start` runs in trio."""

    server: Server
    sessions: list[Session]
    control_fd: int
    externals: list[ExternalUser]
    paused_ms: float = 0.0

    def start(self) -> None:
        """Serve the restored sessions (the server is serving); let go of the groups."""
        for s in self.sessions:
            served = self.server.engine_device(s.device.name)
            assert isinstance(served, PythonDevice)
            served.adopt(s)
        for user in self.externals:
            user.release()


async def take_over(
    control_path: str, build: Build, *, timeout: float = HANDOVER_TIMEOUT
) -> TakenOver:
    """Take everything from the server whose control socket is `control_path`.

    Raises `TakeOverError` with one line saying why; the old server then keeps serving.
    """
    try:
        stream = await _connect(control_path)
    except OSError as exc:
        raise TakeOverError(f"cannot connect to control socket {control_path}: {exc}") from None
    channel = LineChannel(stream, MAX_SNAPSHOT)
    try:
        with trio.fail_after(timeout):
            return await _take(channel, build, timeout)
    except trio.TooSlowError:
        raise TakeOverError(f"no answer from the old server within {timeout:.1f}s") from None
    except (TransportError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise TakeOverError(f"control connection failed: {exc}") from None
    finally:
        channel.close()


async def _connect(path: str) -> FdStream:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return FdStream(socket.socket(fileno=sock.detach()), max_fds=SCM_MAX_FD)


async def _take(channel: LineChannel, build: Build, timeout: float) -> TakenOver:
    greeting = await channel.receive()
    if not isinstance(greeting, dict) or "QMP" not in greeting:
        raise TakeOverError(f"not a vfiouser-srv control socket (greeting {greeting!r:.100})")
    await channel.send(
        {"execute": "take-over", "arguments": {"format": FORMAT, "timeout": timeout}, "id": 1}
    )
    while True:
        try:
            msg = await channel.receive()
        except ControlError as exc:
            raise TakeOverError(f"bad message from the old server: {exc.desc}") from None
        if not isinstance(msg, dict):
            raise TakeOverError("the old server closed the control connection")
        if "error" in msg:
            raise TakeOverError(f"the old server refused: {msg['error'].get('desc', msg)}")
        if msg.get("event") == STATE_EVENT:
            snapshot = msg.get("data")
            break
    t0 = time.monotonic()
    received = Received(channel.take_fds())
    try:
        taken = _restore(snapshot, received, build)
    except Exception as exc:
        received.close_rest()
        reason = str(exc) or type(exc).__name__
        await channel.send({"execute": "take-over-abort", "arguments": {"reason": reason}})
        raise TakeOverError(f"cannot restore what the old server handed over: {reason}") from exc
    received.close_rest()
    try:
        await channel.send({"execute": "take-over-commit"})
        reply = await channel.receive()
        if not isinstance(reply, dict) or "return" not in reply:
            raise TakeOverError(f"the old server did not confirm: {reply!r:.200}")
    except BaseException:
        _undo(taken)
        raise
    taken.paused_ms = float(reply["return"].get("paused_ms", 0.0))
    log.info("restored in %.1f ms", (time.monotonic() - t0) * 1000)
    return taken


def _restore(snapshot: Any, fds: Received, build: Build) -> TakenOver:
    if not isinstance(snapshot, dict) or snapshot.get("format") != FORMAT:
        found = snapshot.get("format") if isinstance(snapshot, dict) else snapshot
        raise SnapshotError(f"snapshot format {found!r:.50} unknown")
    if snapshot.get("fds") != len(fds.fds):
        raise SnapshotError(f"{len(fds.fds)} descriptors received, {snapshot.get('fds')} sent")
    devices = snapshot["devices"]
    listeners = {d["name"]: fds.take(d["listener"]).detach() for d in devices}
    try:
        server = build(dict(listeners))
    except BaseException:
        for fd in listeners.values():
            os.close(fd)
        raise
    sessions: list[Session] = []
    externals: list[ExternalUser] = []
    try:
        if set(server.devices) != set(listeners):
            raise SnapshotError(
                f"devices differ: the old server has {sorted(listeners)}, "
                f"this one is configured with {sorted(server.devices)}"
            )
        for d in devices:
            model = server.devices[d["name"]].model
            if d["model"] != model.name:
                raise SnapshotError(
                    f"device {d['name']} is a {d['model']} there, a {model.name} here"
                )
            model.load_state(unb64(d["state"]))
        for snap in snapshot["sessions"]:
            dev = server.devices.get(snap["device"])
            if dev is None:
                raise SnapshotError(f"a connection to unknown device {snap['device']!r}")
            sessions.append(restore_session(server, dev, snap, fds))
        for group in {id(g): g for g in server.groups.values() if g.owner is not None}.values():
            user = ExternalUser(group, "take-over")
            user.acquire()
            externals.append(user)
        control_fd = fds.take(snapshot["control"]).detach()
    except BaseException:
        _undo(TakenOver(server, sessions, -1, externals))
        raise
    return TakenOver(server, sessions, control_fd, externals)


def _undo(taken: TakenOver) -> None:
    """The new process gives up: close what it built, unlinking nothing (the old server
    keeps the sockets and serves on)."""
    for user in taken.externals:
        user.release()
    for s in taken.sessions:
        undo_session(s)
    for name in taken.server.devices:
        served = taken.server.engine_device(name)
        if isinstance(served, PythonDevice):
            served.keep_socket_file = True
    taken.server.close()
    if taken.control_fd >= 0:
        os.close(taken.control_fd)


__all__ = [
    "HANDOVER_TIMEOUT",
    "QUIESCE_GRACE",
    "Handover",
    "TakeOverError",
    "TakenOver",
    "python_devices",
    "take_over",
]

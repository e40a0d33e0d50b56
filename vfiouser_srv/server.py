"""The server: devices registered under names, each listening on its own socket.

Resource handling: `serve()` owns one nursery holding every accept loop and every session,
so cancelling it (SIGTERM, end of a test) tears down all connections; each session detaches
in a shielded `finally` (tasks cancelled, windows unmapped, eventfds closed, group released).
Listening sockets are unlinked when their device goes, and `close()` releases everything a
start-up that failed part way had already created.

Access (docs/access.md): every client is a possibly hostile local process. A socket file we
create gets its mode and group from `SocketAccess` (default 0600), never from the umask; a
device's optional uid/gid allow-list is checked with SO_PEERCRED at accept, before a byte is
read; `Limits.max_connections_per_device` / `max_connections` are enforced at accept too. A
refused connection is closed at once and logged, rate-limited so a flood cannot fill the log.

Error handling: accept failures from fd exhaustion (EMFILE/ENFILE) are logged and retried
after a pause, like trio's `serve_listeners`; a failing session never affects another. A
socket path that cannot be used raises `ObjectError` naming the path and the reason.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import socket
import stat
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import trio

from devices.sdk.interface import DeviceModel, IrqIndex, RegionSpec
from protocol import Capabilities

from .limits import DEFAULT_LIMITS, Limits
from .objects import Device, DeviceState, Group, ObjectError, OwnerPolicy
from .session import Session
from .transport import FdStream

log = logging.getLogger(__name__)

#: what we advertise at VERSION (explicitly: QEMU's defaults differ from the spec's)
DEFAULT_CAPS = Capabilities(
    max_msg_fds=16,
    max_data_xfer_size=1 << 20,
    # Each mmap'd window holds one descriptor (see container.py); QEMU without a vIOMMU
    # maps a handful of windows, so this bounds what one client can pin, not what works.
    max_dma_maps=4096,
    pgsizes=4096,
    write_multiple=True,
)

#: pause before retrying accept after EMFILE/ENFILE
ACCEPT_RETRY_SLEEP = 0.1

#: mode of a socket file we create unless configured: only the server's own user may
#: connect (root ignores file modes anyway)
DEFAULT_SOCKET_MODE = 0o600

#: longest socket path in bytes: sun_path holds 108 bytes including the terminating NUL
SUN_PATH_MAX = 107

#: after a refused connection is logged, further refusals of the same device and reason are
#: only counted, and summarised in one line at most this often (seconds)
REFUSAL_LOG_INTERVAL = 1.0

#: listen backlog of the sockets we create
LISTEN_BACKLOG = 16

#: getsockopt option for a peer's supplementary groups (Linux >= 4.13; Python has no name)
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
#: Python's getsockopt buffer is at most 1024 bytes: 256 gid_t
_PEERGROUPS_MAX = 256


@dataclass(frozen=True, slots=True)
class SocketAccess:
    """Who may connect to one device: the socket file's mode and group, and an allow-list.

    The mode and group apply to a socket file the server (or an engine) creates; an
    inherited `--fd` socket keeps whatever its creator gave it. The allow-list is checked
    against the peer's SO_PEERCRED at accept: a peer is admitted when its uid is in
    `allow_uids` or its gid or one of its supplementary groups is in `allow_gids`. Both empty
    means no list (whoever can open the socket file may connect).
    """

    mode: int = DEFAULT_SOCKET_MODE
    #: gid for the socket file; None keeps the server's (or the directory's setgid) group
    group: int | None = None
    allow_uids: frozenset[int] = frozenset()
    allow_gids: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if not 0 <= self.mode <= 0o777:
            raise ValueError(f"socket mode {self.mode:#o} is not a permission mode (0..0o777)")

    @property
    def restricted(self) -> bool:
        return bool(self.allow_uids or self.allow_gids)

    def admits(self, uid: int, gids: Iterable[int]) -> bool:
        if not self.restricted:
            return True
        return uid in self.allow_uids or any(g in self.allow_gids for g in gids)


DEFAULT_ACCESS = SocketAccess()


@dataclass(eq=False)
class _Listener:
    sock: socket.socket
    path: str | None
    access: SocketAccess = DEFAULT_ACCESS
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


@dataclass(eq=False)
class _Refusals:
    """Refusals of one device for one reason since the last line logged about them."""

    #: refusals before this trio time are summarised, not logged one by one
    quiet_until: float = float("-inf")
    suppressed: int = 0
    last_peer: str = ""
    flushing: bool = False


class _RefusalLog:
    """Log refused connections without letting a flood of them flood the log.

    The first refusal after a quiet second is logged in full (pid, uid, gid); the ones that
    follow within `REFUSAL_LOG_INTERVAL` are counted and summarised in one line when the
    interval ends, by a task in the server's nursery, so a client connecting in a loop costs
    at most two lines per second per device and reason.
    """

    def __init__(self) -> None:
        self._state: dict[tuple[str, str], _Refusals] = {}

    def refused(self, device: str, reason: str, peer: str, nursery: trio.Nursery | None) -> None:
        state = self._state.setdefault((device, reason), _Refusals())
        now = trio.current_time()
        if now >= state.quiet_until and not state.flushing:
            log.warning("%s: refused connection from %s: %s", device, peer, reason)
            state.quiet_until = now + REFUSAL_LOG_INTERVAL
            return
        state.suppressed += 1
        state.last_peer = peer
        if not state.flushing and nursery is not None:
            state.flushing = True
            nursery.start_soon(self._flush, device, reason, state)

    async def _flush(self, device: str, reason: str, state: _Refusals) -> None:
        try:
            await trio.sleep_until(state.quiet_until)
        finally:
            # also when cancelled at shutdown: the count is not lost
            if state.suppressed:
                log.warning(
                    "%s: refused %d more connection(s) in the last %.0fs: %s (last from %s)",
                    device,
                    state.suppressed,
                    REFUSAL_LOG_INTERVAL,
                    reason,
                    state.last_peer,
                )
            state.suppressed = 0
            state.flushing = False
            state.quiet_until = trio.current_time() + REFUSAL_LOG_INTERVAL


class EngineDevice(Protocol):
    """A device served by another engine (`vfiouser_srv.engines`), which owns its socket."""

    async def serve(self, *, task_status: trio.TaskStatus[None] = ...) -> None: ...

    def close(self) -> None: ...


@dataclass(eq=False)
class _EngineRunner:
    device: EngineDevice
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    running: bool = False
    done: trio.Event = field(default_factory=trio.Event)


def raise_fd_limit() -> int:
    """Lift the soft descriptor limit to the hard one (windows and eventfds are fds)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
    return soft


class Server:
    def __init__(self, caps: Capabilities | None = None, limits: Limits | None = None) -> None:
        self.caps = caps or DEFAULT_CAPS
        self.limits = limits or DEFAULT_LIMITS
        self.devices: dict[str, Device] = {}
        self.groups: dict[str, Group] = {}
        self._listeners: dict[str, _Listener] = {}
        self._engines: dict[str, _EngineRunner] = {}
        self._regions: dict[str, dict[int, RegionSpec]] = {}
        self._nursery: trio.Nursery | None = None
        self.sessions: set[Session] = set()
        #: open connections per device name, and in all (the `limits` caps)
        self.connections: dict[str, int] = {}
        self.total_connections = 0
        self._refusals = _RefusalLog()

    # ------------------------------------------------------------------ registry

    def group(
        self, name: str, *, policy: OwnerPolicy = OwnerPolicy.PID, shared_container: bool = False
    ) -> Group:
        g = self.groups.get(name)
        if g is None:
            g = self.groups[name] = Group(name, policy, shared_container)
        return g

    def add_device(
        self,
        name: str,
        model: DeviceModel,
        *,
        socket_path: str | None = None,
        fd: int | None = None,
        group: str | None = None,
        engine: str = "python",
        access: SocketAccess = DEFAULT_ACCESS,
    ) -> Device:
        """Register a device and start listening at once (hot add when already serving).

        The socket listens before this returns: QEMU fails to start if it cannot connect.
        With `engine` other than "python" that engine owns the socket and the protocol
        (`vfiouser_srv.engines`); the device is still registered here, in its group.
        Nothing is left behind when this raises: a socket it created is closed and unlinked.
        """
        if name in self.devices:
            raise ObjectError(errno.EEXIST, f"device {name!r} already exists")
        if (socket_path is None) == (fd is None):
            raise ValueError("give exactly one of socket_path and fd")
        # before any socket exists, so that a model failing here leaves nothing to undo
        regions = {r.index: r for r in model.regions()}
        sock: socket.socket | None = None
        if engine != "python":
            self._engines[name] = self._add_engine_device(
                name, model, socket_path, fd, engine, access
            )
        elif socket_path is not None:
            sock = _listen_path(socket_path, access)
        else:
            assert fd is not None
            sock = _adopt_fd(fd)
        g = self.group(group or name)
        dev = Device(name, model, socket_path, g)
        g.devices.append(dev)
        self.devices[name] = dev
        self._regions[name] = regions
        # kept across a hot remove: connections still negotiating with the removed device
        # are counted until they end, even if a new device takes the name
        self.connections.setdefault(name, 0)
        if sock is not None:
            listener = _Listener(sock, socket_path, access)
            self._listeners[name] = listener
            if self._nursery is not None:
                self._nursery.start_soon(self._accept_loop, dev, listener)
        elif self._nursery is not None:
            self._nursery.start_soon(self._run_engine, self._engines[name])
        log.info(
            "device %s (%s) listening on %s", name, type(model).__name__, socket_path or f"fd {fd}"
        )
        return dev

    def _add_engine_device(
        self,
        name: str,
        model: DeviceModel,
        socket_path: str | None,
        fd: int | None,
        engine: str,
        access: SocketAccess,
    ) -> _EngineRunner:
        from .engines import load_engine

        if socket_path is None:
            raise ObjectError(
                errno.EINVAL, f"engine {engine!r} creates its own socket: give a path, not fd {fd}"
            )
        if access.restricted:
            # The engine accepts and reads VERSION inside one library call: a peer could not
            # be refused before it is served, so the list is refused rather than ignored.
            raise ObjectError(
                errno.EINVAL,
                f"device {name!r}: engine {engine!r} accepts connections itself, so "
                "allow_uids/allow_gids cannot be enforced; use the python engine or drop the "
                "allow-list (the socket mode and group still apply)",
            )
        _check_path(socket_path)
        _clear_stale(socket_path)
        try:
            # The library binds and listens inside the constructor: the umask is the only way
            # to keep its socket file from ever being wider than `access` allows.
            with _creation_umask(access.mode):
                device: EngineDevice = load_engine(engine).create_device(name, model, socket_path)
        except ObjectError:
            raise
        except OSError as exc:  # EngineError: the library's errno and what it was doing
            raise ObjectError(
                exc.errno or errno.EINVAL,
                f"cannot serve {name!r} with {engine} on {socket_path}: {exc.strerror or exc}",
            ) from None
        try:
            _apply_access(socket_path, access)
        except BaseException:
            device.close()  # unlinks the socket file too
            raise
        return _EngineRunner(device)

    async def _run_engine(self, runner: _EngineRunner) -> None:
        runner.running = True
        try:
            with runner.scope:
                await runner.device.serve()
        finally:
            runner.done.set()

    def region_specs(self, device: Device) -> dict[int, RegionSpec]:
        return self._regions[device.name]

    # ------------------------------------------------------------------ serving

    async def serve(
        self, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Accept and serve clients until cancelled; then close everything."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for name, listener in self._listeners.items():
                    nursery.start_soon(self._accept_loop, self.devices[name], listener)
                for runner in self._engines.values():
                    nursery.start_soon(self._run_engine, runner)
                task_status.started(self)
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self.close()

    def close(self) -> None:
        """Close every socket (unlinking the files we created), engine device and model.

        `serve()` ends with this; a caller whose set-up failed part way (the second device
        of a config file) calls it so that the devices already added leave no socket file.
        """
        for name in list(self._listeners):
            self._close_listener(name)
        for runner in self._engines.values():
            with contextlib.suppress(Exception):
                runner.device.close()
        for dev in self.devices.values():
            with contextlib.suppress(Exception):
                dev.model.close()

    async def _accept_loop(self, device: Device, listener: _Listener) -> None:
        sock = listener.sock
        with listener.scope:
            if sock.fileno() < 0:  # hot-removed before this task first ran
                return
            if not _is_listening(sock):  # --fd handed us one connected client
                if self._admit(device, listener.access, sock):
                    self.connections[device.name] += 1
                    self.total_connections += 1
                    await self._serve_connection(device, sock)
                return
            while True:
                await trio.lowlevel.wait_readable(sock)
                try:
                    conn, _ = sock.accept()
                except BlockingIOError:
                    continue
                except OSError as exc:
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        log.error(
                            "accept on %s: %s; retrying in %.1fs",
                            device.name,
                            exc,
                            ACCEPT_RETRY_SLEEP,
                        )
                        await trio.sleep(ACCEPT_RETRY_SLEEP)
                        continue
                    if exc.errno in (errno.EBADF, errno.EINVAL):
                        return  # listener closed under us (hot remove)
                    raise
                if not self._admit(device, listener.access, conn):
                    continue
                assert self._nursery is not None
                self._nursery.start_soon(self._serve_connection, device, conn)
                # no checkpoint since the check: the next accept sees this connection counted
                self.connections[device.name] += 1
                self.total_connections += 1

    def _admit(self, device: Device, access: SocketAccess, conn: socket.socket) -> bool:
        """Check a new connection against the allow-list and the caps; close it if refused.

        Runs before anything is read from `conn`, so a refused peer gets no byte from us and
        costs no parsing; the caps count every open connection, negotiating or attached.
        """
        try:
            pid, uid, gid = _peercred(conn)
        except OSError:
            pid = uid = gid = -1
        reason = None
        if access.restricted and not access.admits(uid, _peer_groups(conn, gid)):
            reason = "uid/gid not in the device's allow-list"
        elif self.connections[device.name] >= self.limits.max_connections_per_device:
            reason = (
                f"{self.limits.max_connections_per_device} connections to this device already "
                "open (max_connections_per_device)"
            )
        elif self.total_connections >= self.limits.max_connections:
            reason = (
                f"{self.limits.max_connections} connections to the server already open "
                "(max_connections)"
            )
        if reason is None:
            return True
        conn.close()
        peer = f"pid {pid} uid {uid} gid {gid}"
        self._refusals.refused(device.name, reason, peer, self._nursery)
        return False

    async def _serve_connection(self, device: Device, conn: socket.socket) -> None:
        """Serve one admitted connection (already counted in `connections`) until it ends."""
        try:
            session = Session(self, device, FdStream(conn, max_fds=self.caps.max_msg_fds))
            self.sessions.add(session)
            log.info("%s: connected", session.name)
            try:
                await session.run()
            finally:
                self.sessions.discard(session)
        finally:
            self.connections[device.name] -= 1
            self.total_connections -= 1

    # ------------------------------------------------------------------ hot remove

    def _close_listener(self, name: str) -> None:
        listener = self._listeners.pop(name, None)
        if listener is None:
            return
        listener.scope.cancel()
        if listener.path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(listener.path)
        # outside trio.run when a start-up that failed part way is cleaned up
        with contextlib.suppress(RuntimeError):
            trio.lowlevel.notify_closing(listener.sock)
        listener.sock.close()

    async def remove_device(
        self, name: str, *, interval: float = 1.0, deadline: float | None = None
    ) -> int:
        """Hot remove, like `vfio_del_group_dev`: returns how many REQ signals were sent.

        The socket is unlinked first (no new client can arrive), then the current client
        is asked to let go by signalling the REQ interrupt every `interval` seconds; after
        `deadline` seconds (if given) it is disconnected by force. The model is closed last.
        """
        dev = self.devices.get(name)
        if dev is None or dev.state is not DeviceState.ACTIVE:
            raise ObjectError(errno.ENODEV, f"no device {name!r} to remove (or already removing)")
        dev.state = DeviceState.REMOVING
        self._close_listener(name)
        runner = self._engines.pop(name, None)
        if runner is not None:  # its engine owns the client: no REQ escalation, just stop it
            runner.scope.cancel()
            if runner.running:
                await runner.done.wait()
            runner.device.close()
        requests = 0
        session = dev.session
        if session is not None:
            with trio.move_on_after(deadline if deadline is not None else float("inf")):
                while dev.session is not None:
                    if session.irq_table is not None:
                        session.irq_table.trigger(IrqIndex.REQ, 0)
                    requests += 1
                    log.info("%s: asked client to release (request %d)", name, requests)
                    with trio.move_on_after(interval):
                        await dev.released.wait()
            if dev.session is not None:
                log.warning(
                    "%s: client did not release in %.1fs; disconnecting it", name, deadline or 0.0
                )
                dev.session.force_close()
                await dev.released.wait()
        dev.state = DeviceState.REMOVED
        dev.group.devices.remove(dev)
        if not dev.group.devices:
            del self.groups[dev.group.name]
        del self.devices[name]
        del self._regions[name]
        try:
            dev.model.close()
        except Exception:
            log.exception("%s: model close failed", name)
        log.info("%s: removed", name)
        return requests


# ---------------------------------------------------------------------- sockets


def _listen_path(path: str, access: SocketAccess = DEFAULT_ACCESS) -> socket.socket:
    """A listening socket at `path` with exactly `access`'s mode and group.

    The file is created under a restrictive umask (`_creation_umask`), gets its group and
    mode, and only then listens: no client can connect through a mode wider than the one
    configured, and the file never shows one either. Failures name the path; a file we
    bound is unlinked again.
    """
    _check_path(path)
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    bound = False
    try:
        with _creation_umask(access.mode):
            sock.bind(path)
        bound = True
        _apply_access(path, access)
        sock.listen(LISTEN_BACKLOG)
    except BaseException as exc:
        sock.close()
        if bound:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        if isinstance(exc, OSError) and not isinstance(exc, ObjectError):
            raise _path_error(path, exc) from None
        raise
    sock.setblocking(False)
    return sock


def _check_path(path: str) -> None:
    """Refuse, naming the path, what bind() would refuse with a less helpful message."""
    size = len(os.fsencode(path))
    if not size:
        raise ObjectError(errno.EINVAL, "empty socket path")
    if size > SUN_PATH_MAX:
        raise ObjectError(
            errno.ENAMETOOLONG,
            f"cannot listen on {path}: the path is {size} bytes, a Unix socket path holds at "
            f"most {SUN_PATH_MAX}",
        )
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise ObjectError(
            errno.ENOENT, f"cannot listen on {path}: directory {parent} does not exist"
        )


def _path_error(path: str, exc: OSError) -> ObjectError:
    return ObjectError(exc.errno or errno.EINVAL, f"cannot listen on {path}: {exc.strerror or exc}")


@contextlib.contextmanager
def _creation_umask(mode: int) -> Iterator[None]:
    """Create files with at most the owner bits of `mode` (and never more than the umask).

    os.umask is process-wide. This is safe here because bind() (or the engine's constructor)
    is synchronous and runs on the trio thread: nothing else of ours creates files meanwhile,
    and a file another thread did create would only get a narrower mode, never a wider one.
    The group and other bits are added by `_apply_access` once the group is right.
    """
    old = os.umask(0o777)
    try:
        os.umask(old | (0o777 & ~(mode & 0o700)))
        yield
    finally:
        os.umask(old)


def _apply_access(path: str, access: SocketAccess) -> None:
    """Give the socket file its group, then its mode (group bits only for the right group).

    Checks the path is still a socket first: chmod follows symlinks, and we must not change
    the mode of whatever someone put there instead. The directory is trusted beyond that.
    """
    st = os.lstat(path)
    if not stat.S_ISSOCK(st.st_mode):
        raise ObjectError(errno.EEXIST, f"{path} was replaced by something that is not a socket")
    if access.group is not None:
        try:
            os.chown(path, -1, access.group, follow_symlinks=False)
        except OSError as exc:
            raise ObjectError(
                exc.errno or errno.EPERM,
                f"cannot give {path} group {access.group}: {exc.strerror} (the server's user "
                "must belong to that group)",
            ) from None
    os.chmod(path, access.mode)


def _peercred(conn: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer when it connected, from SO_PEERCRED."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def _peer_groups(conn: socket.socket, gid: int) -> list[int]:
    """The peer's gid plus its supplementary groups (SO_PEERGROUPS), so that `allow_gids`
    admits members of a group and not only processes whose primary group it is. A peer in
    more than `_PEERGROUPS_MAX` groups (or a kernel without the option) is judged by `gid`.
    """
    gids = [gid]
    with contextlib.suppress(OSError):
        raw = conn.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 4 * _PEERGROUPS_MAX)
        n = len(raw) // 4
        gids.extend(struct.unpack(f"{n}I", raw[: 4 * n]))
    return gids


def _clear_stale(path: str) -> None:
    """Unlink a dead server's socket at `path`; refuse a live one or a non-socket."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise _path_error(path, exc) from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ObjectError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # stale socket of a dead server
    except FileNotFoundError:
        pass  # went away meanwhile
    except OSError as exc:
        raise _path_error(path, exc) from None
    else:
        raise ObjectError(errno.EADDRINUSE, f"another server is listening on {path}")
    finally:
        probe.close()


def _adopt_fd(fd: int) -> socket.socket:
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:  # not open (EBADF), not a socket (ENOTSOCK)
        raise ObjectError(errno.EINVAL, f"fd {fd} is not a usable socket: {exc.strerror}") from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ObjectError(errno.EINVAL, f"fd {fd} is not an AF_UNIX stream socket")
    sock.setblocking(False)
    return sock


def _is_listening(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))

"""The server: devices registered under names, each listening on its own socket.

Resource handling: `serve()` owns one nursery holding every accept loop and every session,
so cancelling it (SIGTERM, end of a test) tears down all connections; each session detaches
in a shielded `finally` (tasks cancelled, windows unmapped, eventfds closed, group released).
Listening sockets are unlinked when their device goes.

Error handling: accept failures from fd exhaustion (EMFILE/ENFILE) are logged and retried
after a pause, like trio's `serve_listeners`; a failing session never affects another.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import socket
import stat
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


@dataclass(eq=False)
class _Listener:
    sock: socket.socket
    path: str | None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


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
    ) -> Device:
        """Register a device and start listening at once (hot add when already serving).

        The socket listens before this returns: QEMU fails to start if it cannot connect.
        With `engine` other than "python" that engine owns the socket and the protocol
        (`vfiouser_srv.engines`); the device is still registered here, in its group.
        """
        if name in self.devices:
            raise ObjectError(errno.EEXIST, f"device {name!r} already exists")
        if (socket_path is None) == (fd is None):
            raise ValueError("give exactly one of socket_path and fd")
        if engine != "python":
            self._add_engine_device(name, model, socket_path, fd, engine)
            sock = None
        else:
            sock = _listen_path(socket_path) if socket_path is not None else _adopt_fd(fd)  # type: ignore[arg-type]
        g = self.group(group or name)
        dev = Device(name, model, socket_path, g)
        g.devices.append(dev)
        self.devices[name] = dev
        self._regions[name] = {r.index: r for r in model.regions()}
        if sock is not None:
            listener = _Listener(sock, socket_path)
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
        self, name: str, model: DeviceModel, socket_path: str | None, fd: int | None, engine: str
    ) -> None:
        from .engines import load_engine

        if socket_path is None:
            raise ObjectError(
                errno.EINVAL, f"engine {engine!r} creates its own socket: give a path, not fd {fd}"
            )
        _clear_stale(socket_path)
        device: EngineDevice = load_engine(engine).create_device(name, model, socket_path)
        self._engines[name] = _EngineRunner(device)

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
                assert self._nursery is not None
                self._nursery.start_soon(self._serve_connection, device, conn)

    async def _serve_connection(self, device: Device, conn: socket.socket) -> None:
        session = Session(self, device, FdStream(conn, max_fds=self.caps.max_msg_fds))
        self.sessions.add(session)
        log.info("%s: connected", session.name)
        try:
            await session.run()
        finally:
            self.sessions.discard(session)

    # ------------------------------------------------------------------ hot remove

    def _close_listener(self, name: str) -> None:
        listener = self._listeners.pop(name, None)
        if listener is None:
            return
        listener.scope.cancel()
        if listener.path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(listener.path)
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


def _listen_path(path: str) -> socket.socket:
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        sock.listen(16)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _clear_stale(path: str) -> None:
    """Unlink a dead server's socket at `path`; refuse a live one or a non-socket."""
    with contextlib.suppress(FileNotFoundError):
        st = os.stat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise ObjectError(errno.EEXIST, f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # stale socket of a dead server
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

"""The server: devices registered under names and groups, each served by an engine.

The server keeps the object model (devices, groups: `objects`) and what every engine shares
(capabilities, `Limits`, connection counts); the engines (`engines.python`,
`engines.libvfio_user`) own the sockets, the connections and the protocol
(docs/architecture.md, "Layers"). Adding a device asks its engine for an `EngineDevice`;
serving runs each one in the server's nursery; hot remove asks the client to let go, as the
kernel's `vfio_del_group_dev` does.

Resource handling: `serve()` owns one nursery holding every engine device, so cancelling it
(SIGTERM, end of a test) tears down all connections; a Python-engine session detaches in a
shielded `finally` (tasks cancelled, windows unmapped, eventfds closed, group released).
Socket files are unlinked when their device goes, and `close()` releases everything a
start-up that failed part way had already created.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from devices.sdk.interface import DeviceModel, RegionSpec
from protocol import Capabilities, MigrationCaps

from .contract import Endpoint, EngineDevice
from .engines import check_endpoint, load_engine
from .limits import DEFAULT_LIMITS, Limits
from .objects import Device, DeviceState, EventBus, Group, ObjectError, OwnerPolicy
from .sockets import DEFAULT_ACCESS, SocketAccess, raise_fd_limit

log = logging.getLogger(__name__)

#: what we advertise at VERSION (explicitly: QEMU's defaults differ from the spec's)
DEFAULT_CAPS = Capabilities(
    max_msg_fds=16,
    max_data_xfer_size=1 << 20,
    # Each mmap'd window holds two descriptors (see container.py); QEMU without a vIOMMU
    # maps a handful of windows, so this bounds what one client can pin, not what works.
    max_dma_maps=4096,
    pgsizes=4096,
    write_multiple=True,
    # migration v2 (docs/migration.md); returned to a client that offers it (`negotiate`)
    migration=MigrationCaps(),
)


@dataclass(eq=False)
class _Runner:
    """One engine device and the task serving it."""

    device: EngineDevice
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    running: bool = False
    done: trio.Event = field(default_factory=trio.Event)


class Server:
    """The host of every engine device (`engines.contract.EngineHost`)."""

    def __init__(self, caps: Capabilities | None = None, limits: Limits | None = None) -> None:
        self.caps = caps or DEFAULT_CAPS
        self.limits = limits or DEFAULT_LIMITS
        self.devices: dict[str, Device] = {}
        self.groups: dict[str, Group] = {}
        self._runners: dict[str, _Runner] = {}
        self._regions: dict[str, dict[int, RegionSpec]] = {}
        self._nursery: trio.Nursery | None = None
        #: live Python-engine sessions
        self.sessions: set[Any] = set()
        #: open connections per device name, and in all (the `limits` caps)
        self.connections: dict[str, int] = {}
        self.total_connections = 0
        #: events for the control socket's subscribers (`objects.EventBus`)
        self.events = EventBus()
        #: the model name and options each device was built from (for `query-devices`)
        self.model_names: dict[str, str] = {}

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
        Both `socket_path` and `fd`: `fd` already listens at `socket_path` (a live upgrade
        handed it over), and the file is unlinked when the device goes, as if created here.
        The engine named by `engine` owns the socket and the protocol; the device is
        registered here, in its group. Nothing is left behind when this raises: a socket
        the engine created is closed and unlinked, and the device is not registered.
        """
        if name in self.devices:
            raise ObjectError(errno.EEXIST, f"device {name!r} already exists")
        if socket_path is None and fd is None:
            raise ValueError("give socket_path or fd")
        # before any socket exists, so that a model failing here leaves nothing to undo
        regions = {r.index: r for r in model.regions()}
        check_endpoint(engine, name, fd, access)
        create = load_engine(engine).create_device
        new_group = (group or name) not in self.groups
        g = self.group(group or name)
        dev = Device(name, model, socket_path, g, events=self.events)
        self._regions[name] = regions
        try:
            served: EngineDevice = create(self, dev, Endpoint(socket_path, fd, access))
        except BaseException:
            del self._regions[name]
            if new_group:
                del self.groups[g.name]
            raise
        g.devices.append(dev)
        self.devices[name] = dev
        runner = self._runners[name] = _Runner(served)
        if self._nursery is not None:
            self._nursery.start_soon(self._run, runner)
        log.info(
            "device %s (%s, %s engine) listening on %s",
            name,
            type(model).__name__,
            engine,
            socket_path or f"fd {fd}",
        )
        return dev

    async def _run(self, runner: _Runner) -> None:
        runner.running = True
        try:
            with runner.scope:
                await runner.device.serve()
        finally:
            runner.done.set()

    def engine_device(self, name: str) -> EngineDevice:
        """What serves device `name` (a live upgrade needs the Python engine's)."""
        return self._runners[name].device

    def region_specs(self, device: Device) -> dict[int, RegionSpec]:
        return self._regions[device.name]

    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        if self._nursery is None:
            raise RuntimeError("the server is not serving")
        self._nursery.start_soon(fn, *args)

    # ------------------------------------------------------------------ serving

    async def serve(
        self, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve every device until cancelled; then close everything."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for runner in self._runners.values():
                    nursery.start_soon(self._run, runner)
                task_status.started(self)
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self.close()

    def close(self) -> None:
        """Close every engine device (unlinking the socket files they created) and model.

        `serve()` ends with this; a caller whose set-up failed part way (the second device
        of a config file) calls it so that the devices already added leave no socket file.
        """
        for runner in self._runners.values():
            with contextlib.suppress(Exception):
                runner.device.close()
        for dev in self.devices.values():
            with contextlib.suppress(Exception):
                dev.model.close()

    # ------------------------------------------------------------------ hot remove

    async def remove_device(
        self, name: str, *, interval: float = 1.0, deadline: float | None = None
    ) -> int:
        """Hot remove, like `vfio_del_group_dev`: returns how many REQ signals were sent.

        The socket is unlinked first (no new client can arrive), then the current client
        is asked to let go by signalling the REQ interrupt every `interval` seconds; after
        `deadline` seconds (if given) it is disconnected by force. The engine device is
        stopped and the model closed last.
        """
        dev = self.devices.get(name)
        if dev is None or dev.state is not DeviceState.ACTIVE:
            raise ObjectError(errno.ENODEV, f"no device {name!r} to remove (or already removing)")
        dev.state = DeviceState.REMOVING
        runner = self._runners.pop(name)
        runner.device.stop_accepting()
        requests = 0
        session = dev.session
        if session is not None:
            with trio.move_on_after(deadline if deadline is not None else float("inf")):
                while dev.session is not None:
                    session.request_release()
                    requests += 1
                    log.info("%s: asked client to release (request %d)", name, requests)
                    with trio.move_on_after(interval) as waited:
                        await dev.released.wait()
                    if waited.cancelled_caught:
                        self.events.emit("REQ_IGNORED", {"device": name, "requests": requests})
            if dev.session is not None:
                log.warning(
                    "%s: client did not release in %.1fs; disconnecting it", name, deadline or 0.0
                )
                dev.session.force_close()
                await dev.released.wait()
        runner.scope.cancel()
        if runner.running:
            await runner.done.wait()
        runner.device.close()
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
        self.model_names.pop(name, None)
        log.info("%s: removed", name)
        self.events.emit("DEVICE_DELETED", {"device": name, "requests": requests})
        return requests


__all__ = ["DEFAULT_CAPS", "Server", "SocketAccess", "raise_fd_limit"]

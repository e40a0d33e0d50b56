"""The VFIO object model, mirrored from the kernel: groups, devices, external users.

| kernel                                   | here                                        |
|------------------------------------------|---------------------------------------------|
| group: viability, exclusive open, users  | `Group`: one owner at a time, `users` count |
| device registered in a group             | `Device`: a model + its socket              |
| `vfio_del_group_dev` + `ops->request`    | hot remove (see `server.Server.remove`)     |
| external user (KVM holding a group)      | `ExternalUser`                              |

A group's *owner* is a client identity taken from SO_PEERCRED; the policy decides which part
of it must match for a second connection to join the same group (QEMU opens one connection per
device, so a multi-function device served to one QEMU matches by pid). *users* counts live
connections plus external users; when it drops to 0 the owner is cleared, like the kernel
clearing a group's container when its last user goes.

See docs/architecture.md, "The object model".
"""

from __future__ import annotations

import enum
import errno
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import trio

from devices.sdk.interface import DeviceModel

from .container import Container
from .stats import DeviceStats

log = logging.getLogger(__name__)


class ObjectError(OSError):
    """An object-model refusal, carrying the errno the client should see."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, message)


class OwnerPolicy(enum.Enum):
    #: the same process (a QEMU with several devices of the group)
    PID = "pid"
    #: the same user
    UID = "uid"
    #: one connection: the group is exclusive to whoever connected first
    CONNECTION = "connection"


class ClientId(NamedTuple):
    """Who a connection is (SO_PEERCRED and our connection number). A named tuple, not a
    frozen dataclass: one is built per connection, and a frozen dataclass sets each field
    through `object.__setattr__`."""

    pid: int
    uid: int
    gid: int
    connection: int

    def matches(self, other: ClientId, policy: OwnerPolicy) -> bool:
        if policy is OwnerPolicy.PID:
            return self.pid == other.pid
        if policy is OwnerPolicy.UID:
            return self.uid == other.uid
        return self.connection == other.connection


_connection_ids = itertools.count(1)


def new_connection_id() -> int:
    return next(_connection_ids)


class DeviceState(enum.Enum):
    ACTIVE = "active"
    #: being hot-removed: socket gone, client asked to let go
    REMOVING = "removing"
    REMOVED = "removed"


class EventBus:
    """Server events (a client attached, detached, ignored REQ; a device failed) for
    whoever listens: the control socket's subscribers (docs/operations.md)."""

    def __init__(self) -> None:
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []

    def emit(self, name: str, data: dict[str, Any]) -> None:
        for listener in list(self.listeners):
            try:
                listener(name, data)
            except Exception:
                log.exception("event listener failed on %s", name)


class Attachment(Protocol):
    """The connection a device is attached to, as hot remove sees it (a Python-engine
    `Session`; the libvfio-user engine keeps its client to itself)."""

    def request_release(self) -> None:
        """Ask the client to let go of the device (the REQ interrupt)."""

    def force_close(self) -> None:
        """Disconnect now; detaching still runs in full."""


@dataclass(eq=False)
class Device:
    name: str
    model: DeviceModel
    socket_path: str | None
    group: Group
    state: DeviceState = DeviceState.ACTIVE
    #: False after a model failed in a way that makes it unsafe to hand out (viability)
    healthy: bool = True
    #: why it is unhealthy (None while healthy)
    health_reason: str | None = None
    session: Attachment | None = None
    #: `released`'s Event, built when somebody first asks for it (`None` until then)
    _released: trio.Event | None = field(default=None, repr=False)
    #: counters for `query-stats` (`stats`)
    stats: DeviceStats = field(default_factory=DeviceStats)
    #: where server events go (the server's bus; a lone device gets its own)
    events: EventBus = field(default_factory=EventBus)
    #: `trace-on`: this device's message log (a logger writing to a file), else None
    trace: logging.Logger | None = None
    #: `--trace FILE` / `trace-on format=trace`: this device's `trace.Tracer`, else None
    tracer: Any = None

    def set_health(self, healthy: bool, reason: str | None = None) -> None:
        """Mark the device (un)healthy: an unhealthy one makes its group non-viable, so
        no new client may attach until it is reset or removed (docs/operations.md)."""
        if healthy == self.healthy:
            return
        self.healthy, self.health_reason = healthy, None if healthy else reason
        if healthy:
            log.info("%s: healthy again", self.name)
        else:
            log.error("%s: unhealthy: %s", self.name, reason)
        self.events.emit(
            "DEVICE_HEALTH", {"device": self.name, "healthy": healthy, "reason": reason}
        )

    @property
    def released(self) -> trio.Event:
        """Set when the current session ends (hot remove and a reconnecting client wait on
        it); already set when no session is attached. Built on first use: most sessions
        end without anybody waiting, and an Event per attach was ~1% of a connect."""
        ev = self._released
        if ev is None:
            ev = self._released = trio.Event()
            if self.session is None:
                ev.set()
        return ev

    def attached(self, session: Attachment) -> None:
        """`session` is now the device's client (a new `released` for it, when asked)."""
        self.session = session
        self._released = None

    def detached(self) -> None:
        """The device's client let go: wake whoever waits in `released`."""
        self.session = None
        if self._released is not None:
            self._released.set()

    def __repr__(self) -> str:
        return f"Device({self.name!r}, {self.state.value})"


@dataclass(eq=False)
class Group:
    name: str
    policy: OwnerPolicy = OwnerPolicy.PID
    #: one container for all of the owner's connections to this group's devices
    shared_container: bool = False
    devices: list[Device] = field(default_factory=list)
    owner: ClientId | None = None
    users: int = 0
    external: set[ExternalUser] = field(default_factory=set)
    container: Container | None = None

    @property
    def viable(self) -> bool:
        """Every member registered, active and healthy (the kernel's group viability)."""
        return bool(self.devices) and all(
            d.state is DeviceState.ACTIVE and d.healthy for d in self.devices
        )

    @property
    def draining(self) -> bool:
        return any(d.state is DeviceState.REMOVING for d in self.devices)

    def claim(self, client: ClientId, device: Device) -> None:
        """A connection to `device` finished VERSION: make it a user of the group."""
        if device.state is not DeviceState.ACTIVE:
            raise ObjectError(errno.ENODEV, f"device {device.name} is being removed")
        if self.draining:
            raise ObjectError(errno.EBUSY, f"group {self.name} is draining")
        if not self.viable:
            raise ObjectError(errno.EPERM, f"group {self.name} is not viable")
        if device.session is not None:
            raise ObjectError(errno.EBUSY, f"device {device.name} already has a client")
        if self.owner is not None and not self.owner.matches(client, self.policy):
            raise ObjectError(errno.EBUSY, f"group {self.name} is owned by pid {self.owner.pid}")
        if self.owner is None:
            self.owner = client
        self.users += 1

    def release(self) -> None:
        self.users -= 1
        assert self.users >= 0, "group users went negative"
        if self.users == 0:
            self.owner = None
            if self.container is not None:
                self.container.release_all()
                self.container = None

    def container_for(self, page_size: int, max_maps: int) -> Container:
        if not self.shared_container:
            return Container(page_size=page_size, max_maps=max_maps)
        if self.container is None:
            self.container = Container(page_size=page_size, max_maps=max_maps)
        return self.container


class ExternalUser:
    """An in-server component that keeps a group attached (migration stream, NIC loop, tap).

    Like `vfio_group_get_external_user`: acquiring needs an owned, viable, non-draining
    group; release drops the user count before the reference goes away.
    """

    def __init__(self, group: Group, name: str) -> None:
        self.group = group
        self.name = name
        self.acquired = False

    def acquire(self) -> None:
        g = self.group
        if self.acquired:
            raise ObjectError(errno.EINVAL, f"{self.name} already holds {g.name}")
        if g.owner is None or not g.viable or g.draining:
            raise ObjectError(errno.EINVAL, f"group {g.name} is not owned, ready and viable")
        g.users += 1
        g.external.add(self)
        self.acquired = True

    def release(self) -> None:
        if not self.acquired:
            return
        self.acquired = False
        self.group.release()
        self.group.external.discard(self)

    def __enter__(self) -> ExternalUser:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

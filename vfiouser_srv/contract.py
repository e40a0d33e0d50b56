"""What the server asks of an engine, and what an engine may ask of the server.

Both engines (`python`: this package's own, `libvfio_user`: the C library through ctypes)
export `create_device(host, device, endpoint) -> EngineDevice`. The server registers the
device in its object model (name, group) and then only runs, stops and closes what the
engine gave back; the engine owns the socket, the connections and the protocol. This keeps
the dependency one way: engines import the object model and this contract, never the server
(docs/architecture.md, "Layers").
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from devices.sdk.interface import RegionSpec
from protocol import Capabilities

from .limits import Limits
from .objects import Device
from .sockets import DEFAULT_ACCESS, SocketAccess


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a device is served: a socket path to create, or an inherited socket fd."""

    path: str | None = None
    fd: int | None = None
    access: SocketAccess = DEFAULT_ACCESS

    @property
    def label(self) -> str:
        return self.path if self.path is not None else f"fd {self.fd}"


class EngineHost(Protocol):
    """The server, as an engine sees it: what it advertises, its limits, its bookkeeping."""

    caps: Capabilities
    limits: Limits
    #: every live Python-engine session (tests and the control surface look here)
    sessions: set[Any]
    #: open connections per device name, and in all (`Limits` caps them)
    connections: dict[str, int]
    total_connections: int

    def region_specs(self, device: Device) -> dict[int, RegionSpec]: ...

    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run `fn(*args)` in the server's nursery: a connection outlives its device's
        accept loop (a client that has not sent VERSION when its device is hot-removed
        still gets its ENODEV reply) and ends with the server."""


class EngineDevice(Protocol):
    """One device as served by an engine."""

    async def serve(self, *, task_status: trio.TaskStatus[None] = ...) -> None:
        """Accept and serve clients until cancelled (or, for an inherited connected socket,
        until that one client leaves); everything the engine opened is closed on return."""

    def stop_accepting(self) -> None:
        """Hot remove, first step: no new client may arrive (the socket file goes), the
        current one keeps being served until it lets go or is disconnected."""

    def close(self) -> None:
        """Release the socket (unlinking a file the engine created) and engine state;
        safe to call more than once and outside trio."""


CreateDevice = Callable[[EngineHost, Device, Endpoint], EngineDevice]

__all__ = ["CreateDevice", "Endpoint", "EngineDevice", "EngineHost"]

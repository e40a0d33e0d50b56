"""The operations commands of the control socket (docs/operations.md).

`query-devices`, `query-sessions`, `query-stats`, `device-add`, `device-del`, `subscribe`,
`trace-on`, `trace-off`. Registered on import (the CLI imports this module with
`control`); each is one `@command` coroutine over the `Server`'s object model.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Any

import trio

import devices
from devices.sdk.interface import IrqIndex
from protocol import Command

from .control import MAX_QUEUED_EVENTS, Arguments, ControlConnection, ControlError, command
from .objects import Device, ObjectError
from .server import Server
from .stats import SessionCounters

log = logging.getLogger(__name__)

_COMMAND_NAMES = {int(c): c.name for c in Command}


def _str(args: Arguments, key: str, default: str | None = None) -> str:
    value = args.get(key, default)
    if not isinstance(value, str) or not value:
        raise ControlError(f'"{key}" must be a non-empty string')
    return value


def _number(args: Arguments, key: str, default: float | None) -> float | None:
    value = args.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ControlError(f'"{key}" must be a number >= 0')
    if not math.isfinite(value):
        raise ControlError(f'"{key}" must be finite')
    return float(value)


def _only(args: Arguments, *known: str) -> None:
    unknown = set(args) - set(known)
    if unknown:
        raise ControlError(f"unknown argument(s): {', '.join(sorted(unknown))}")


def _device(server: Server, args: Arguments) -> Device:
    name = _str(args, "device")
    dev = server.devices.get(name)
    if dev is None:
        raise ControlError(f"no device {name!r}", "DeviceNotFound")
    return dev


def _sessions(server: Server, dev: Device | None = None) -> list[Any]:
    """Python-engine sessions (of `dev`), in connection order."""
    found = [s for s in server.sessions if dev is None or s.device is dev]
    return sorted(found, key=lambda s: int(s.conn_id))


def session_info(session: Any) -> dict[str, Any]:
    client = session.client
    caps = session.conn.caps
    windows = list(session.container) if session.container is not None else []
    modes = Counter(w.mode for w in windows)
    irqs: dict[str, int] = {}
    if session.irq_table is not None:
        for index, line in enumerate(session.irq_table.lines):
            name = IrqIndex(index).name if index in IrqIndex._value2member_map_ else str(index)
            irqs[name] = sum(fd is not None for fd in line.triggers)
    return {
        "device": session.device.name,
        "connection": session.conn_id,
        "pid": client.pid,
        "uid": client.uid,
        "gid": client.gid,
        "attached": session.attached,
        "capabilities": caps.to_json() if caps is not None else None,
        "dma_windows": len(windows),
        "dma_bytes": sum(w.size for w in windows),
        "dma_modes": dict(modes),
        "irq_eventfds": irqs,
    }


def device_info(server: Server, dev: Device) -> dict[str, Any]:
    clients = [session_info(s) for s in _sessions(server, dev) if s.attached]
    return {
        "name": dev.name,
        "model": server.model_names.get(dev.name, type(dev.model).__name__),
        "socket": dev.socket_path,
        "group": dev.group.name,
        "state": dev.state.value,
        "healthy": dev.healthy,
        "health_reason": dev.health_reason,
        "viable": dev.group.viable,
        "traced": dev.trace is not None or dev.tracer is not None,
        "client": clients[0] if clients else None,
    }


@command("query-devices", "every device: model, socket, group, state, health, its client")
async def _query_devices(conn: ControlConnection, args: Arguments) -> object:
    _only(args)
    return [device_info(conn.server, d) for d in conn.server.devices.values()]


@command("query-sessions", "every client connection, attached or still negotiating")
async def _query_sessions(conn: ControlConnection, args: Arguments) -> object:
    _only(args)
    return [session_info(s) for s in _sessions(conn.server)]


@command("query-stats", "counters per device (optional argument: device)")
async def _query_stats(conn: ControlConnection, args: Arguments) -> object:
    _only(args, "device")
    server = conn.server
    devs = [_device(server, args)] if "device" in args else list(server.devices.values())
    out = {}
    for dev in devs:
        live: list[SessionCounters] = [s.counters() for s in _sessions(server, dev)]
        out[dev.name] = dev.stats.report(live, _COMMAND_NAMES)
    return out


@command("device-add", "add a device: model, socket; optional name, group, options")
async def _device_add(conn: ControlConnection, args: Arguments) -> object:
    _only(args, "model", "socket", "name", "group", "options")
    model_name = _str(args, "model")
    socket_path = _str(args, "socket")
    name = _str(args, "name", model_name)
    group = _str(args, "group", name) if "group" in args else None
    options = args.get("options", {})
    if not isinstance(options, dict):
        raise ControlError('"options" must be an object of KEY: VALUE')
    server = conn.server
    if name in server.devices:
        raise ControlError(f"device {name!r} already exists")
    try:
        model = devices.create(model_name, {str(k): str(v) for k, v in options.items()})
    except devices.OptionError as exc:
        raise ControlError(str(exc)) from None
    try:
        dev = server.add_device(
            name, model, socket_path=socket_path, group=group, access=conn.control.access
        )
    except (OSError, ValueError) as exc:
        model.close()
        raise ControlError(f"cannot add {name!r}: {exc}") from None
    server.model_names[name] = model_name
    server.events.emit("DEVICE_ADDED", {"device": name, "socket": socket_path})
    return device_info(server, dev)


@command("device-del", "hot remove a device: REQ every interval s, disconnect after deadline s")
async def _device_del(conn: ControlConnection, args: Arguments) -> object:
    _only(args, "device", "interval", "deadline")
    server = conn.server
    dev = _device(server, args)
    interval = _number(args, "interval", 1.0) or 0.1
    deadline = _number(args, "deadline", 10.0)
    result: dict[str, Any] = {}
    done = trio.Event()

    async def remove() -> None:  # in the server's nursery: the control client may leave
        try:
            result["requests"] = await server.remove_device(
                dev.name, interval=interval, deadline=deadline
            )
        except ObjectError as exc:
            result["error"] = str(exc)
        finally:
            done.set()

    server.start_soon(remove)
    await done.wait()
    if "error" in result:
        raise ControlError(result["error"], "DeviceNotFound")
    return {"device": dev.name, "requests": result["requests"]}


@command("subscribe", "push server events to this connection from now on")
async def _subscribe(conn: ControlConnection, args: Arguments) -> object:
    _only(args)
    if conn.events is None:
        assert conn.nursery is not None
        send, receive = trio.open_memory_channel[dict[str, Any]](MAX_QUEUED_EVENTS)
        conn.events = send
        conn.nursery.start_soon(conn.pump_events, receive)
        conn.server.events.listeners.append(conn.push_event)
    return {}


@command(
    "trace-on",
    "record one device's messages to a file: device, file, format (log: the -v lines, "
    "the default; trace: the format of --trace, docs/trace.md), dma (trace: keep DMA data)",
)
async def _trace_on(conn: ControlConnection, args: Arguments) -> object:
    _only(args, "device", "file", "format", "dma")
    dev = _device(conn.server, args)
    path = _str(args, "file")
    fmt = _str(args, "format", "log")
    if fmt not in ("log", "trace"):
        raise ControlError(f'"format" must be "log" or "trace", not {fmt!r}')
    _trace_off_device(conn.server, dev)
    if fmt == "trace":
        from .trace import Tracer

        try:
            tracer = Tracer(path, dma=bool(args.get("dma", False)), meta={"device": dev.name})
        except OSError as exc:
            raise ControlError(f"cannot open {path}: {exc}") from None
        dev.tracer = tracer
        for s in _sessions(conn.server, dev):
            s.set_tracer(tracer)
        return {"device": dev.name, "file": path, "format": fmt}
    try:
        handler = logging.FileHandler(path)
    except OSError as exc:
        raise ControlError(f"cannot open {path}: {exc}") from None
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger = logging.getLogger(f"vfiouser_srv.wire.{dev.name}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    dev.trace = logger
    for s in _sessions(conn.server, dev):
        s.set_trace(logger)
    return {"device": dev.name, "file": path}


@command("trace-off", "stop a device's trace-on: device")
async def _trace_off(conn: ControlConnection, args: Arguments) -> object:
    _only(args, "device")
    dev = _device(conn.server, args)
    return {"device": dev.name, "was_on": _trace_off_device(conn.server, dev)}


def _trace_off_device(server: Server, dev: Device) -> bool:
    tracer = dev.tracer
    if tracer is not None:
        dev.tracer = None
        for s in _sessions(server, dev):
            s.set_tracer(None)
        tracer.close()
        return True
    logger = dev.trace
    if logger is None:
        return False
    dev.trace = None
    for s in _sessions(server, dev):
        s.set_trace(None)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    return True


__all__ = ["device_info", "session_info"]

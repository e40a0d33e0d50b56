"""A small async client for QMP (QEMU's `-qmp unix:PATH,server=on,wait=off`) and for our own
control socket, which speaks the same shape (docs/operations.md).

Both send a greeting, then answer one JSON object per line: ``{"execute": ..., "arguments":
...}`` gets ``{"return": ...}`` or ``{"error": {"class", "desc"}}``; events
(``{"event": ..., "data": ...}``) may arrive in between and are kept for `wait_event`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import trio

__all__ = ["QmpClient", "QmpError", "open_qmp"]


class QmpError(RuntimeError):
    """An ``error`` reply: ``klass`` is QMP's error class, the message its description."""

    def __init__(self, command: str, klass: str, desc: str) -> None:
        super().__init__(f"{command}: {klass}: {desc}")
        self.klass = klass


class QmpClient:
    """One connection; `execute` is not concurrent (one request at a time, in order)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._buf = b""
        self.events: list[dict[str, Any]] = []
        self.greeting: dict[str, Any] = {}
        self._event_seen = trio.Event()
        self._lock = trio.Lock()

    async def _receive(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise EOFError("the QMP peer closed the connection")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        obj = json.loads(line)
        if not isinstance(obj, dict):
            raise ValueError(f"not a JSON object: {line[:200]!r}")
        return obj

    def _event(self, obj: dict[str, Any]) -> None:
        self.events.append(obj)
        self._event_seen.set()
        self._event_seen = trio.Event()

    async def execute(self, command: str, **arguments: Any) -> Any:
        """Send one command and return its ``return`` value; events read meanwhile are kept.
        Raises `QmpError` for an ``error`` reply."""
        async with self._lock:
            msg: dict[str, Any] = {"execute": command}
            if arguments:
                msg["arguments"] = arguments
            await self.stream.send_all(json.dumps(msg).encode() + b"\n")
            while True:
                obj = await self._receive()
                if "event" in obj:
                    self._event(obj)
                elif "error" in obj:
                    err = obj["error"]
                    raise QmpError(command, str(err.get("class")), str(err.get("desc")))
                elif "return" in obj:
                    return obj["return"]

    async def wait_event(self, name: str, *, since: int = 0,
                         match: dict[str, Any] | None = None) -> dict[str, Any]:
        """The first event ``name`` at index >= ``since`` in `events` whose ``data`` holds
        ``match``; reads the connection until one arrives (bound it with a trio timeout)."""
        while True:
            for ev in self.events[since:]:
                data = ev.get("data") or {}
                if ev.get("event") == name and all(data.get(k) == v
                                                   for k, v in (match or {}).items()):
                    return ev
            since = len(self.events)
            if self._lock.locked():
                await self._event_seen.wait()
                continue
            async with self._lock:
                obj = await self._receive()
            if "event" in obj:
                self._event(obj)


@contextlib.asynccontextmanager
async def open_qmp(path: str | os.PathLike[str], *, timeout: float = 30.0,
                   capabilities: bool = True) -> AsyncIterator[QmpClient]:
    """Connect to ``path`` (waiting up to ``timeout`` s for it to appear and accept), read
    the greeting and, for QEMU, negotiate ``qmp_capabilities``."""
    stream: trio.SocketStream | None = None
    with trio.fail_after(timeout):
        while stream is None:
            try:
                stream = await trio.open_unix_socket(os.fspath(Path(path)))
            except OSError:
                await trio.sleep(0.05)
    async with stream:
        client = QmpClient(stream)
        client.greeting = await client._receive()
        if capabilities:
            await client.execute("qmp_capabilities")
        yield client

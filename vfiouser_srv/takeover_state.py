"""What a live upgrade hands over per connection, as JSON plus descriptors, and back.

Why plain JSON: the old and the new process may be different versions of this code, so the
format is explicit (`FORMAT`) and every field is named; nothing is pickled. Descriptors are
not in the JSON: `Fds.add` appends one to the list sent with SCM_RIGHTS and the JSON holds
its index; the receiver's list is in the same order (docs/live-upgrade.md).

A connection is: its socket; the protocol state (phase, negotiated capabilities, the id of
the server's next request); the client's identity; and, once attached, its DMA windows (with
their files) and its interrupt table (eventfds, masks, pending bits, the INTx level). The
device model's own state travels separately (`save_state`/`load_state`).
"""

from __future__ import annotations

import base64
import socket
from typing import Any

from protocol import Capabilities, DmaMap, DmaMapFlags, LocalProtocolError, Phase

from .contract import EngineHost
from .fds import OwnedFd
from .irq import IrqTable
from .objects import Device
from .session import Session
from .transport import FdStream

#: version of the snapshot layout; a new process refuses one it does not know
FORMAT = 1
_IRQ_TABLES = ("triggers", "mask_fds", "unmask_fds")


class SnapshotError(ValueError):
    """A snapshot this process cannot restore (unknown format, bad field, missing fd)."""


class Fds:
    """The descriptors of a snapshot, in the order they are sent."""

    def __init__(self) -> None:
        self.items: list[int] = []

    def add(self, fd: int | OwnedFd | None) -> int | None:
        if fd is None:
            return None
        self.items.append(fd.fileno() if isinstance(fd, OwnedFd) else fd)
        return len(self.items) - 1


class Received:
    """The descriptors that arrived with a snapshot; each is taken once, the rest closed."""

    def __init__(self, fds: list[OwnedFd]) -> None:
        self.fds: list[OwnedFd | None] = list(fds)

    def take(self, index: Any) -> OwnedFd:
        if not isinstance(index, int) or not 0 <= index < len(self.fds):
            raise SnapshotError(f"descriptor index {index!r} out of range")
        fd = self.fds[index]
        if fd is None:
            raise SnapshotError(f"descriptor {index} used twice")
        self.fds[index] = None
        return fd

    def take_opt(self, index: Any) -> OwnedFd | None:
        return None if index is None else self.take(index)

    def close_rest(self) -> None:
        for fd in self.fds:
            if fd is not None:
                fd.close()
        self.fds = []


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise SnapshotError("state is not base64 text")
    return base64.b64decode(text, validate=True)


# ------------------------------------------------------------------------ the old process


def save_session(session: Session, fds: Fds) -> dict[str, Any]:
    """A parked session (nothing half-read, nothing queued to send) as JSON + `fds`."""
    conn = session.conn
    out: dict[str, Any] = {
        "device": session.device.name,
        "socket": fds.add(session.stream.sock.fileno()),
        "phase": conn.phase.value,
        "caps": conn.caps.to_json() if conn.caps is not None else None,
        # the id of the server's next request (message-mode DMA): ids continue
        "next_id": conn.next_id,
        "client": [session.client.pid, session.client.uid, session.client.gid],
        "attached": session.attached,
        "attached_once": session.attached_once,
        "warned_unsealed": session.warned_unsealed,
        "windows": [],
        "irqs": None,
    }
    if session.attached and session.container is not None:
        out["windows"] = [
            {
                "address": w.address,
                "size": w.size,
                "readable": w.readable,
                "writable": w.writable,
                "offset": w.offset,
                "fd": fds.add(w.fd if w.fd is not None else w.file),
            }
            for w in session.container
            if w.owner is session.requests
        ]
    table = session.irq_table
    if session.attached and table is not None:
        out["irqs"] = {
            "intx_level": table.intx_level,
            "fired": table.fired,
            "lines": [
                {
                    **{name: [fds.add(f) for f in getattr(line, name)] for name in _IRQ_TABLES},
                    "masked": list(line.masked),
                    "pending": list(line.pending),
                }
                for line in table.lines
            ],
        }
    return out


# ------------------------------------------------------------------------ the new process


def restore_session(
    host: EngineHost, device: Device, snap: dict[str, Any], fds: Received
) -> Session:
    """A `Session` in the state `snap` describes, attached (group claimed, windows mapped,
    eventfds in place) but not running; the model gets its ctx when it runs. Raises
    `SnapshotError` (or the object model's `ObjectError`) and then leaves nothing behind:
    the caller closes the session's stream, which closes what it took."""
    sock = socket.socket(fileno=fds.take(snap.get("socket")).detach())
    session = Session(host, device, FdStream(sock, max_fds=host.caps.max_msg_fds))
    try:
        _restore_into(session, snap, fds)
    except BaseException:
        undo_session(session)
        raise
    return session


def undo_session(session: Session) -> None:
    """Let go of a restored session that will not run (the take-over failed)."""
    if session.attached:
        session.attached = False
        if session.container is not None:
            for w in session.container.take_all(owner=session.requests):
                w.release()
            session.container.users -= 1
        if session.irq_table is not None:
            session.irq_table.close()
        session.device.session = None
        session.device.group.release()
    session.stream.close()


def _restore_into(session: Session, snap: dict[str, Any], fds: Received) -> None:
    conn = session.conn
    try:
        phase = Phase(snap["phase"])
        caps = Capabilities.from_json(snap["caps"]) if snap["caps"] is not None else None
        next_id = int(snap["next_id"]) & 0xFFFF
        attached = bool(snap["attached"])
    except (KeyError, ValueError, TypeError) as exc:
        raise SnapshotError(f"bad connection state: {exc!r}") from None
    if attached and caps is None:
        raise SnapshotError("an attached connection without capabilities")
    try:
        conn.resume(phase, caps if phase is Phase.READY else None, next_id)
    except LocalProtocolError as exc:
        raise SnapshotError(f"cannot restore the connection: {exc}") from None
    session.attached_once = bool(snap.get("attached_once"))
    session.warned_unsealed = bool(snap.get("warned_unsealed"))
    if not attached:
        return
    assert caps is not None
    session.attach(caps, model=False)
    container = session.container
    assert container is not None
    for w in snap.get("windows", []):
        flags = (int(DmaMapFlags.READ) if w["readable"] else 0) | (
            int(DmaMapFlags.WRITE) if w["writable"] else 0
        )
        req = DmaMap(
            flags=flags,
            offset=int(w["offset"]),
            address=int(w["address"]),
            size=int(w["size"]),
            fd=fds.take_opt(w["fd"]),
        )
        container.map(req, owner=session.requests)
    irqs = snap.get("irqs")
    if irqs is not None:
        assert session.irq_table is not None
        _restore_irqs(session.irq_table, irqs, fds)


def _restore_irqs(table: IrqTable, snap: dict[str, Any], fds: Received) -> None:
    lines = snap["lines"]
    if len(lines) != len(table.lines):
        raise SnapshotError(f"{len(lines)} IRQ indexes saved, this device has {len(table.lines)}")
    for line, saved in zip(table.lines, lines, strict=True):
        n = line.spec.count
        for name in (*_IRQ_TABLES, "masked", "pending"):
            if len(saved[name]) != n:
                raise SnapshotError(f"IRQ index {line.spec.index}: {name} is not {n} long")
        for name in _IRQ_TABLES:
            setattr(line, name, [fds.take_opt(i) for i in saved[name]])
        line.masked = [bool(b) for b in saved["masked"]]
        line.pending = [bool(b) for b in saved["pending"]]
    table.intx_level = bool(snap["intx_level"])
    table.fired = int(snap["fired"])


__all__ = [
    "FORMAT",
    "Fds",
    "Received",
    "SnapshotError",
    "b64",
    "restore_session",
    "save_session",
    "unb64",
    "undo_session",
]

"""Message traces: `serve --trace FILE`, `trace-on format=trace`, `vfiouser-srv trace`.

A trace is every vfio-user message of a device's connections, both ways, in a versioned
binary record stream (docs/trace.md has the byte layout). It is written on the server's
thread, so it is built to be cheap: one `struct.pack` and a few writes into a 64 KiB
`BufferedWriter` per message (a write(2) every 64 KiB, into the page cache), no
formatting, no base64. Descriptors are described (kind, size, seals), never kept.

The writer sees raw bytes: `Tracer.incoming` gets each read as it arrived (it frames
messages itself, with the decoder's descriptor rule: a read's fds belong to the message
holding its last byte) and `Tracer.outgoing` each batch sent. A session with a tracer goes
through the general path only (no serial loop), like `-v`; with none, the only cost is one
`is not None` per read and per batch sent.

See docs/architecture.md, "Layers".
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import struct
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from protocol import HEADER, HEADER_SIZE, Command, HeaderFlags

MAGIC = b"VFUTRACE"
VERSION = 1
#: magic, version, flags, metadata length (then that many bytes of JSON)
FILE_HEADER = struct.Struct("<8sHHI")
#: kind, flags, fd count, connection, ns since the trace started, size on the wire, size kept
RECORD = struct.Struct("<BBHIQII")
#: fd kind, 3 reserved bytes, seals, size
FD_DESC = struct.Struct("<B3xIQ")

# record kinds
CONNECT = 1  #: payload: JSON (device, model, pid, uid)
DISCONNECT = 2  #: no payload
IN = 3  #: client -> server, one message
OUT = 4  #: server -> client, one message
GARBAGE = 5  #: client bytes that cannot be framed (bad size field): kept as they came
KIND_NAMES = {CONNECT: "connect", DISCONNECT: "disconnect", IN: "in", OUT: "out", GARBAGE: "junk"}

# record flags
CUT = 1  #: the stored bytes are a prefix of the message (DMA data left out)
# file flags
FILE_DMA = 1  #: recorded with DMA payloads

# fd kinds
FD_OTHER, FD_FILE, FD_EVENTFD, FD_SOCKET, FD_PIPE = range(5)
FD_NAMES = {FD_OTHER: "other", FD_FILE: "file", FD_EVENTFD: "eventfd", FD_SOCKET: "socket"}
FD_NAMES[FD_PIPE] = "pipe"

_DMA_READ = int(Command.DMA_READ)
_DMA_WRITE = int(Command.DMA_WRITE)
_REPLY = int(HeaderFlags.TYPE_REPLY)
#: header + the DMA struct (address, count): what is kept of a DMA message without --trace-dma
_DMA_HEAD = HEADER_SIZE + 16
_SIZE = struct.Struct("<I")
#: a size field above this cannot be framed (the decoder refuses it too)
_MAX_FRAME = 1 << 30


class TraceError(Exception):
    """A file that is not a (complete) trace; the message names the offset."""


def describe_fd(fd: Any) -> tuple[int, int, int]:
    """(kind, seals, size) of a descriptor (as in the record), without keeping it."""
    try:
        num = fd if isinstance(fd, int) else fd.fileno()
        st = os.fstat(num)
    except (OSError, ValueError):
        return FD_OTHER, 0, 0
    if stat.S_ISREG(st.st_mode):
        seals = 0
        with contextlib.suppress(OSError):
            seals = fcntl.fcntl(num, fcntl.F_GET_SEALS)
        return FD_FILE, seals, st.st_size
    if stat.S_ISSOCK(st.st_mode):
        return FD_SOCKET, 0, 0
    if stat.S_ISFIFO(st.st_mode):
        return FD_PIPE, 0, 0
    try:
        link = os.readlink(f"/proc/self/fd/{num}")
    except OSError:
        link = ""
    return (FD_EVENTFD if link == "anon_inode:[eventfd]" else FD_OTHER), 0, 0


class _Framer:
    """Cuts one connection's incoming reads into messages."""

    __slots__ = ("buf", "held")

    def __init__(self) -> None:
        self.buf = bytearray()
        #: fd descriptions waiting for the message that holds the last byte of their read
        self.held: list[tuple[int, int, int]] = []


class Tracer:
    """Writes one trace file (one per device; its connections are told apart by id)."""

    def __init__(
        self,
        path: str,
        *,
        dma: bool = False,
        meta: dict[str, Any] | None = None,
        file: IO[bytes] | None = None,
    ) -> None:
        self.path = path
        self.dma = dma
        self._f: IO[bytes] = file if file is not None else open(path, "wb", buffering=1 << 16)  # noqa: SIM115
        self._t0 = time.monotonic_ns()
        info = {"wall_ns": time.time_ns(), "pid": os.getpid(), **(meta or {})}
        blob = json.dumps(info).encode()
        self._f.write(FILE_HEADER.pack(MAGIC, VERSION, FILE_DMA if dma else 0, len(blob)) + blob)
        self._framers: dict[int, _Framer] = {}
        self.closed = False
        #: messages and bytes written (`query-devices`, tests)
        self.records = 0

    # ------------------------------------------------------------ hooks

    def connect(self, conn: int, info: dict[str, Any]) -> None:
        self._framers[conn] = _Framer()
        blob = json.dumps(info).encode()
        self._write(CONNECT, 0, conn, len(blob), blob, ())

    def disconnect(self, conn: int) -> None:
        if self._framers.pop(conn, None) is not None:
            self._write(DISCONNECT, 0, conn, 0, b"", ())
            self.flush()

    def incoming(self, conn: int, data: bytes | memoryview, fds: Sequence[Any]) -> None:
        """One read from the client, as it arrived."""
        fr = self._framers.get(conn)
        if fr is None:
            fr = self._framers[conn] = _Framer()
        buf = fr.buf
        buf += data
        descs = [describe_fd(fd) for fd in fds]
        msgs: list[tuple[int, bytes]] = []
        pos, end = 0, len(buf)
        while end - pos >= HEADER_SIZE:
            (size,) = _SIZE.unpack_from(buf, pos + 4)
            if size < HEADER_SIZE or size > _MAX_FRAME:
                msgs.append((GARBAGE, bytes(buf[pos:])))
                pos = end
                break
            if end - pos < size:
                break
            msgs.append((IN, bytes(buf[pos : pos + size])))
            pos += size
        del buf[:pos]
        owned: dict[int, list[tuple[int, int, int]]] = {}
        if fr.held and msgs:  # the message that was partial when they came is complete now
            owned[0] = fr.held
            fr.held = []
        if descs:
            if buf or not msgs:  # the read ended inside a message: it is theirs
                fr.held += descs
            else:  # the read ended at a message boundary: its last message is theirs
                owned.setdefault(len(msgs) - 1, []).extend(descs)
        for i, (kind, msg) in enumerate(msgs):
            self._message(kind, conn, msg, owned.get(i, ()), _DMA_READ)

    def outgoing(self, conn: int, data: bytes, fds: Sequence[Any]) -> None:
        """One batch sent (whole messages; its fds belong to the last one)."""
        descs = [describe_fd(fd) for fd in fds]
        pos, end = 0, len(data)
        view = memoryview(data)
        while pos + HEADER_SIZE <= end:
            (size,) = _SIZE.unpack_from(data, pos + 4)
            size = max(size, HEADER_SIZE)
            last = pos + size >= end
            self._message(OUT, conn, view[pos : pos + size], descs if last else (), _DMA_WRITE)
            pos += size

    # ------------------------------------------------------------ writing

    def _message(
        self,
        kind: int,
        conn: int,
        msg: bytes | memoryview,
        descs: Sequence[tuple[int, int, int]],
        dma_command: int,
    ) -> None:
        n = len(msg)
        flags = 0
        if not self.dma and n > _DMA_HEAD and kind != GARBAGE:
            command = msg[2] | msg[3] << 8
            reply = msg[8] & 0xF == _REPLY
            # DMA data: the client's DMA_READ reply, our DMA_WRITE request
            if command == dma_command and reply == (dma_command == _DMA_READ):
                msg, flags = msg[:_DMA_HEAD], CUT
        self._write(kind, flags, conn, n, msg, descs)

    def _write(
        self,
        kind: int,
        flags: int,
        conn: int,
        wire_len: int,
        stored: bytes | memoryview,
        descs: Sequence[tuple[int, int, int]],
    ) -> None:
        if self.closed:
            return
        f = self._f
        f.write(
            RECORD.pack(
                kind,
                flags,
                len(descs),
                conn,
                time.monotonic_ns() - self._t0,
                wire_len,
                len(stored),
            )
        )
        for d in descs:
            f.write(FD_DESC.pack(*d))
        f.write(stored)
        self.records += 1

    def flush(self) -> None:
        if not self.closed:
            self._f.flush()

    def close(self) -> None:
        if not self.closed:
            self._f.close()
            self.closed = True


# ---------------------------------------------------------------------------- reading


@dataclass
class Record:
    offset: int  #: where the record starts in the file
    index: int  #: its number (from 0)
    kind: int
    flags: int
    conn: int
    t_ns: int
    wire_len: int
    data: bytes
    fds: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def cut(self) -> bool:
        return bool(self.flags & CUT)

    def header(self) -> tuple[int, int, int, int, int] | None:
        """msg_id, command, size, flags, error (None for records that are not messages)."""
        if self.kind not in (IN, OUT) or len(self.data) < HEADER_SIZE:
            return None
        return HEADER.unpack_from(self.data)

    def info(self) -> dict[str, Any]:
        """A CONNECT record's JSON."""
        return json.loads(self.data) if self.kind == CONNECT else {}


@dataclass
class Trace:
    path: str
    version: int
    dma: bool
    meta: dict[str, Any]
    records: list[Record]


def read_trace(path: str) -> Trace:
    """The whole file, checked; TraceError (naming the offset) if it is not a whole trace."""
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as exc:
        raise TraceError(f"{path}: {exc.strerror}") from None
    return parse_trace(blob, path)


def parse_trace(blob: bytes, path: str = "<trace>") -> Trace:
    if len(blob) < FILE_HEADER.size or blob[:8] != MAGIC:
        raise TraceError(
            f"{path}: offset 0: not a vfiouser-srv trace (expected magic {MAGIC!r}, "
            f"found {blob[:8]!r})"
        )
    _, version, fflags, meta_len = FILE_HEADER.unpack_from(blob)
    if version != VERSION:
        raise TraceError(f"{path}: offset 8: trace format version {version}, we read {VERSION}")
    pos = FILE_HEADER.size
    if pos + meta_len > len(blob):
        raise TraceError(f"{path}: offset {pos}: truncated file header")
    try:
        meta = json.loads(blob[pos : pos + meta_len])
    except ValueError:
        raise TraceError(f"{path}: offset {pos}: file header metadata is not JSON") from None
    pos += meta_len
    records = list(_records(blob, pos, path))
    return Trace(path, version, bool(fflags & FILE_DMA), meta, records)


def _records(blob: bytes, pos: int, path: str) -> Iterator[Record]:
    end = len(blob)
    index = 0
    while pos < end:
        start = pos
        if end - pos < RECORD.size:
            raise TraceError(
                f"{path}: offset {start}: truncated record header "
                f"({end - pos} of {RECORD.size} bytes)"
            )
        kind, flags, nfds, conn, t_ns, wire_len, stored = RECORD.unpack_from(blob, pos)
        if kind not in KIND_NAMES or stored > wire_len or flags & ~CUT:
            raise TraceError(
                f"{path}: offset {start}: not a trace record (kind {kind}, flags {flags:#x}, "
                f"sizes {stored}/{wire_len})"
            )
        pos += RECORD.size
        need = nfds * FD_DESC.size + stored
        if end - pos < need:
            raise TraceError(
                f"{path}: offset {start}: truncated record #{index} "
                f"(needs {need} bytes after its header, the file has {end - pos})"
            )
        fds = [FD_DESC.unpack_from(blob, pos + i * FD_DESC.size) for i in range(nfds)]
        pos += nfds * FD_DESC.size
        yield Record(start, index, kind, flags, conn, t_ns, wire_len, blob[pos : pos + stored], fds)
        pos += stored
        index += 1


__all__ = [
    "MAGIC",
    "VERSION",
    "Record",
    "Trace",
    "TraceError",
    "Tracer",
    "command_name",
    "describe_fd",
    "describe_fds",
    "describe_message",
    "describe_record",
    "parse_trace",
    "read_trace",
]


# ---------------------------------------------------------------------------- for people

_REGION = struct.Struct("<QII")
_DMA = struct.Struct("<QQ")
_COMMAND_NAMES = {int(c): c.name for c in Command}


def command_name(command: int) -> str:
    return _COMMAND_NAMES.get(command, str(command))


def describe_message(data: bytes, wire_len: int, cut: bool = False) -> str:
    """One message, header and a summary of its payload, on one line."""
    if len(data) < HEADER_SIZE:
        return f"runt message ({wire_len} bytes) {data.hex()}"
    msg_id, command, size, flags, error = HEADER.unpack_from(data)
    reply = flags & 0xF == _REPLY
    parts = [
        f"id={msg_id}",
        command_name(command),
        "reply" if reply else "request",
        f"size={size}",
    ]
    if flags & ~0xF:
        parts.append(f"flags={flags:#x}")
    if error or flags & int(HeaderFlags.ERROR):
        parts.append(f"errno={error}")
    body = data[HEADER_SIZE:]
    if command in (int(Command.REGION_READ), int(Command.REGION_WRITE)) and len(body) >= 16:
        offset, region, count = _REGION.unpack_from(body)
        parts.append(f"region={region} offset={offset:#x} count={count}")
        if len(body) > 16:
            parts.append(f"data={_hex(body[16:])}")
    elif command in (_DMA_READ, _DMA_WRITE) and len(body) >= 16:
        addr, count = _DMA.unpack_from(body)
        parts.append(f"addr={addr:#x} count={count}")
        if cut:
            parts.append("(data not recorded)")
        elif len(body) > 16:
            parts.append(f"data={_hex(body[16:])}")
    elif command == int(Command.VERSION) and len(body) > 4:
        parts.append(body[4:].rstrip(b"\0").decode("utf-8", "replace")[:160])
    elif body:
        parts.append(f"payload={_hex(body)}")
    return " ".join(parts)


def _hex(b: bytes, limit: int = 32) -> str:
    return b[:limit].hex() + ("..." if len(b) > limit else "")


def describe_fds(fds: Sequence[tuple[int, int, int]]) -> str:
    out = []
    for kind, seals, size in fds:
        text = FD_NAMES.get(kind, str(kind))
        if kind == FD_FILE:
            text += f"({size} bytes, seals {seals:#x})"
        out.append(text)
    return " fds=[" + ", ".join(out) + "]" if out else ""


def describe_record(r: Record) -> str:
    """The `trace show` line of a record."""
    t = f"{r.t_ns / 1e9:12.6f}"
    if r.kind == CONNECT:
        return f"{t} #{r.conn} connect {r.data.decode('utf-8', 'replace')}"
    if r.kind == DISCONNECT:
        return f"{t} #{r.conn} disconnect"
    if r.kind == GARBAGE:
        return f"{t} #{r.conn} <- unframeable bytes ({r.wire_len}): {_hex(r.data)}"
    arrow = "<-" if r.kind == IN else "->"
    return f"{t} #{r.conn} {arrow} {describe_message(r.data, r.wire_len, r.cut)}" + describe_fds(
        r.fds
    )

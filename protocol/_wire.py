"""Framing: the 16-byte header, and a decoder that splits a byte stream into frames.

File descriptors arrive with the bytes of the `recvmsg` that carried them. The sender
(QEMU, libvfio-user, us) passes fds in the same `sendmsg` as the message they belong to, and
Linux stops a stream read right after the segment that carried descriptors. Therefore the
descriptors of one read belong to the *last message that starts inside that read*. A read
that carries descriptors but starts no message is a broken stream (docs/protocol.md,
"Frames and descriptors").
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ._constants import HEADER_SIZE, HeaderFlags
from ._errors import FatalProtocolError

HEADER = struct.Struct("<HHIII")
assert HEADER.size == HEADER_SIZE

_TYPE_MASK = int(HeaderFlags.TYPE_MASK)
_TYPE_REPLY = int(HeaderFlags.TYPE_REPLY)
_NO_REPLY = int(HeaderFlags.NO_REPLY)
_ERROR = int(HeaderFlags.ERROR)


def pack_header(msg_id: int, command: int, size: int, flags: int, error: int = 0) -> bytes:
    return HEADER.pack(msg_id, command, size, flags, error)


@dataclass(slots=True)
class Frame:
    """One whole message as it came off the wire, not yet decoded."""

    msg_id: int
    command: int
    flags: int
    error: int
    payload: bytes
    fds: list[Any]

    # Plain-int masks: IntFlag arithmetic costs microseconds on the per-message hot path.
    @property
    def is_reply(self) -> bool:
        return (self.flags & _TYPE_MASK) == _TYPE_REPLY

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & _NO_REPLY)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & _ERROR)


class FrameDecoder:
    """Incremental frame splitter over (bytes, fds) chunks.

    Never raises anything but `FatalProtocolError`, and then it hands back every descriptor
    it still held (in the exception), so nothing leaks.
    """

    def __init__(self, max_message_size: int, max_fds_per_message: int) -> None:
        self.max_message_size = max_message_size
        self.max_fds = max_fds_per_message
        self._buf = bytearray()
        self._pos = 0  # parse position in _buf
        self._base = 0  # absolute stream offset of _buf[0]
        # (start, end, fds): descriptors of one read, by the read's absolute byte range
        self._pending: deque[tuple[int, int, list[Any]]] = deque()
        self._broken = False

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    @property
    def idle(self) -> bool:
        """No partial message and no descriptors waiting for one."""
        return self._pos == len(self._buf) and not self._pending and not self._broken

    def feed(self, data: bytes | bytearray | memoryview, fds: Sequence[Any] = ()) -> None:
        if self._broken:
            raise FatalProtocolError("stream already broken", fds=fds)
        if fds:
            if len(fds) > self.max_fds:
                self._fail(f"{len(fds)} fds in one message, limit {self.max_fds}", fds)
            if not data:
                self._fail("descriptors without data", fds)
            start = self._base + len(self._buf)
            self._pending.append((start, start + len(data), list(fds)))
        if self._pos and self._pos == len(self._buf):
            self._base += self._pos
            self._buf.clear()
            self._pos = 0
        self._buf += data

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None until more bytes arrive."""
        buf, pos = self._buf, self._pos
        if len(buf) - pos < HEADER_SIZE:
            return None
        msg_id, command, size, flags, error = HEADER.unpack_from(buf, pos)
        if size < HEADER_SIZE or size > self.max_message_size:
            self._fail(f"message size {size} outside [16, {self.max_message_size}]")
        if len(buf) - pos < size:
            return None
        start = self._base + pos
        fds: list[Any] = []
        pending = self._pending
        while pending:
            p_start, p_end, p_fds = pending[0]
            if p_end <= start:  # a read that carried fds but started no message
                self._fail("descriptors arrived with no message start")
            if p_start <= start < p_end and start + size >= p_end:
                fds.extend(p_fds)
                pending.popleft()
                continue
            break
        if len(fds) > self.max_fds:
            self._broken = True
            raise FatalProtocolError(f"{len(fds)} fds for one message", fds=fds + self._drain())
        payload = bytes(buf[pos + HEADER_SIZE : pos + size])
        self._pos = pos + size
        if self._pos > 65536 and self._pos * 2 > len(buf):
            del buf[: self._pos]
            self._base += self._pos
            self._pos = 0
        return Frame(msg_id, command, flags, error, payload, fds)

    def _drain(self) -> list[Any]:
        out = [fd for _s, _e, fds in self._pending for fd in fds]
        self._pending.clear()
        return out

    def _fail(self, why: str, extra: Sequence[Any] = ()) -> None:
        self._broken = True
        raise FatalProtocolError(why, fds=[*extra, *self._drain()])

    def close(self) -> list[Any]:
        """Descriptors still held (of incomplete messages); the caller must close them."""
        self._broken = True
        return self._drain()

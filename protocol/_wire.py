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

    Zero copy for whole frames: a chunk fed while nothing is buffered is parsed in place
    (the decoder keeps a view of it), and only a frame left incomplete at its end is copied
    into the decoder's own buffer, when the caller next asks for a frame and there is none.
    So the caller must not overwrite a chunk's buffer until `next_frame` returned None for
    it (the session reads again only then), and `take_plain` hands out payload views of it
    that stay valid until that stream's next read.

    Never raises anything but `FatalProtocolError`, and then it hands back every descriptor
    it still held (in the exception), so nothing leaks.
    """

    def __init__(self, max_message_size: int, max_fds_per_message: int) -> None:
        self.max_message_size = max_message_size
        self.max_fds = max_fds_per_message
        self._buf = bytearray()
        self._pos = 0  # parse position in _buf
        self._base = 0  # absolute stream offset of the source's first byte (_view or _buf)
        #: the caller's chunk, parsed in place while `_buf` is empty
        self._view: memoryview | None = None
        self._vpos = 0
        # (start, end, fds): descriptors of one read, by the read's absolute byte range
        self._pending: deque[tuple[int, int, list[Any]]] = deque()
        self._broken = False

    @property
    def buffered(self) -> int:
        if self._view is not None:
            return len(self._view) - self._vpos
        return len(self._buf) - self._pos

    @property
    def idle(self) -> bool:
        """No partial message and no descriptors waiting for one."""
        return self.buffered == 0 and not self._pending and not self._broken

    def feed(self, data: bytes | bytearray | memoryview, fds: Sequence[Any] = ()) -> None:
        if self._broken:
            raise FatalProtocolError("stream already broken", fds=fds)
        if self._view is not None:
            self._spill()  # the caller did not drain the previous chunk: keep its rest
        if self._pos == len(self._buf):  # nothing kept: parse the new chunk in place
            self._base += self._pos
            self._buf.clear()
            self._pos = 0
        if fds:
            if len(fds) > self.max_fds:
                self._fail(f"{len(fds)} fds in one message, limit {self.max_fds}", fds)
            if not data:
                self._fail("descriptors without data", fds)
            start = self._base + len(self._buf)
            self._pending.append((start, start + len(data), list(fds)))
        if not self._buf and data:
            self._view = memoryview(data).cast("B")
            self._vpos = 0
        else:
            self._buf += data

    def _spill(self) -> None:
        """Copy the unparsed rest of the caller's chunk into our own buffer."""
        view = self._view
        assert view is not None and not self._buf
        self._base += self._vpos
        self._buf += view[self._vpos :]
        self._pos = 0
        self._view = None

    def _consumed(self, pos: int) -> None:
        """The source is parsed up to `pos`."""
        view = self._view
        if view is not None:
            if pos == len(view):
                self._base += pos
                self._view = None
                self._vpos = 0
            else:
                self._vpos = pos
            return
        buf = self._buf
        self._pos = pos
        if pos > 65536 and pos * 2 > len(buf):
            del buf[:pos]
            self._base += pos
            self._pos = 0

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None until more bytes arrive."""
        view = self._view
        src: memoryview | bytearray
        src, pos = (view, self._vpos) if view is not None else (self._buf, self._pos)
        avail = len(src) - pos
        if avail < HEADER_SIZE:
            if view is not None:
                self._spill()
            return None
        msg_id, command, size, flags, error = HEADER.unpack_from(src, pos)
        if size < HEADER_SIZE or size > self.max_message_size:
            self._fail(f"message size {size} outside [16, {self.max_message_size}]")
        if avail < size:
            if view is not None:
                self._spill()
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
        payload = bytes(src[pos + HEADER_SIZE : pos + size])
        self._consumed(pos + size)
        return Frame(msg_id, command, flags, error, payload, fds)

    def take_plain(self, commands: frozenset[int]) -> list[tuple[int, int, int, memoryview]]:
        """The whole *plain* frames at the head: requests whose command is in `commands`,
        with no flag but No_reply, no error field and no descriptors (none are pending).

        One ``(msg_id, command, flags, payload)`` each, the payload a view of the source
        (the caller's chunk, or a copy when the frame was reassembled); stops at the first
        frame that is partial or not plain, which `next_frame` then takes. Saves a Frame
        object and a payload copy per message on the path nearly all traffic takes."""
        out: list[tuple[int, int, int, memoryview]] = []
        if self._pending or self._broken:
            return out
        view = self._view
        src: memoryview | bytearray
        src, pos = (view, self._vpos) if view is not None else (self._buf, self._pos)
        n = len(src)
        start = pos
        unpack = HEADER.unpack_from
        limit = self.max_message_size
        while n - pos >= HEADER_SIZE:
            msg_id, command, size, flags, error = unpack(src, pos)
            end = pos + size
            if (
                size < HEADER_SIZE
                or size > limit
                or end > n
                or command not in commands
                or error
                or (flags and flags != _NO_REPLY)
            ):
                break
            if view is not None:
                payload = view[pos + HEADER_SIZE : end]
            else:  # our own buffer may be compacted later: the payload must not pin it
                payload = memoryview(bytes(src[pos + HEADER_SIZE : end]))
            out.append((msg_id, command, flags, payload))
            pos = end
        if pos != start:
            self._consumed(pos)
        return out

    def _drain(self) -> list[Any]:
        out = [fd for _s, _e, fds in self._pending for fd in fds]
        self._pending.clear()
        return out

    def _fail(self, why: str, extra: Sequence[Any] = ()) -> None:
        self._broken = True
        raise FatalProtocolError(why, fds=[*extra, *self._drain()])

    def close(self) -> list[Any]:
        """Descriptors still held (of incomplete messages); the caller must close them.
        Also drops what was buffered, so a closed stream holds no memory."""
        self._broken = True
        self._buf = bytearray()
        self._pos = 0
        self._view = None
        return self._drain()

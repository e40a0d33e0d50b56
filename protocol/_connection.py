"""The sans-IO vfio-user connection: bytes and fds in, typed events out, and back.

Like h11's Connection: no sockets, no clocks. A server and a client are the same class in
different roles. Phases are a data table (`PHASE_TABLE`), so the rules can be read (and
documented: docs/protocol.md, "Phases", is generated from it) without reading code.
"""

from __future__ import annotations

import enum
import errno
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ._body import Body
from ._caps import Capabilities
from ._constants import HEADER_FLAGS_KNOWN, HEADER_SIZE, MAX_VERSION_SIZE, Command, HeaderFlags
from ._errors import FatalProtocolError, LocalProtocolError, ProtocolError, RemoteProtocolError
from ._messages import decode_body
from ._variable import Version
from ._wire import Frame, FrameDecoder, pack_header


class Role(enum.Enum):
    #: members are equal only to themselves, so they hash by identity: Enum's own
    #: `__hash__` is a Python call, and a phase-table lookup makes three
    __hash__ = object.__hash__

    SERVER = "server"
    CLIENT = "client"


class Phase(enum.Enum):
    #: members are equal only to themselves, so they hash by identity: Enum's own
    #: `__hash__` is a Python call, and a phase-table lookup makes three
    __hash__ = object.__hash__

    #: nothing but VERSION may happen (for a server: nothing is granted yet)
    AWAIT_VERSION = "await-version"
    #: the VERSION request is in flight (client sent it / server is answering it)
    NEGOTIATING = "negotiating"
    #: capabilities agreed; every other command may flow
    READY = "ready"
    #: the stream is finished (closed by either side or broken)
    CLOSED = "closed"


class Step(enum.Enum):
    #: members are equal only to themselves, so they hash by identity: Enum's own
    #: `__hash__` is a Python call, and a phase-table lookup makes three
    __hash__ = object.__hash__

    SEND_VERSION = "send VERSION request"
    RECV_VERSION = "receive VERSION request"
    SEND_VERSION_REPLY = "send VERSION reply"
    RECV_VERSION_REPLY = "receive VERSION reply"
    VERSION_FAILED = "VERSION rejected"
    OTHER = "any other command"
    CLOSE = "close"


#: (role, phase, step) -> next phase. Anything absent is a protocol violation.
PHASE_TABLE: dict[tuple[Role, Phase, Step], Phase] = {
    (Role.SERVER, Phase.AWAIT_VERSION, Step.RECV_VERSION): Phase.NEGOTIATING,
    (Role.SERVER, Phase.NEGOTIATING, Step.SEND_VERSION_REPLY): Phase.READY,
    (Role.SERVER, Phase.NEGOTIATING, Step.VERSION_FAILED): Phase.AWAIT_VERSION,
    (Role.SERVER, Phase.READY, Step.OTHER): Phase.READY,
    (Role.CLIENT, Phase.AWAIT_VERSION, Step.SEND_VERSION): Phase.NEGOTIATING,
    (Role.CLIENT, Phase.NEGOTIATING, Step.RECV_VERSION_REPLY): Phase.READY,
    (Role.CLIENT, Phase.NEGOTIATING, Step.VERSION_FAILED): Phase.CLOSED,
    (Role.CLIENT, Phase.READY, Step.OTHER): Phase.READY,
}
for _role in Role:
    for _phase in Phase:
        PHASE_TABLE[(_role, _phase, Step.CLOSE)] = Phase.CLOSED


# ------------------------------------------------------------------------------ events


@dataclass(frozen=True, slots=True)
class Request:
    """A command from the peer, decoded."""

    msg_id: int
    body: Body
    no_reply: bool = False
    #: whole message size and header flags as received (for logging; not part of equality)
    size: int = field(default=0, compare=False)
    flags: int = field(default=0, compare=False)

    @property
    def command(self) -> Command:
        return self.body.COMMAND


@dataclass(frozen=True, slots=True)
class BadRequest:
    """A command that could not be accepted; answer it with `error.errno` (unless no_reply).

    The connection stays usable. `error.fds` are the descriptors that came with it: the
    receiver owns them and must close them.
    """

    msg_id: int
    command: int
    no_reply: bool
    error: ProtocolError


@dataclass(frozen=True, slots=True)
class Reply:
    msg_id: int
    body: Body


@dataclass(frozen=True, slots=True)
class ErrorReply:
    msg_id: int
    command: int
    errno: int


Event = Request | BadRequest | Reply | ErrorReply

_NO_REPLY = int(HeaderFlags.NO_REPLY)
_ERROR_FLAG = int(HeaderFlags.ERROR)
_TYPE_MASK = int(HeaderFlags.TYPE_MASK)
_TYPE_REPLY = int(HeaderFlags.TYPE_REPLY)
_UNKNOWN_FLAGS = ~int(HEADER_FLAGS_KNOWN)
#: the fast paths compare against this instead of looking up `Phase.READY` per message
_READY = Phase.READY


#: size of the fixed structs in front of bulk data, so a frame limit covers the biggest one
_STRUCT_HEADROOM = 64


class Connection:
    """One end of a vfio-user stream."""

    def __init__(
        self,
        role: Role,
        *,
        local_caps: Capabilities | None = None,
        max_version_size: int = MAX_VERSION_SIZE,
    ) -> None:
        self.role = role
        self.phase = Phase.AWAIT_VERSION
        #: what we accept (a server advertises these in its VERSION reply)
        self.local_caps = local_caps or Capabilities(max_msg_fds=16)
        #: agreed capabilities (set when VERSION completes)
        self.caps: Capabilities | None = None
        self.peer_caps: Capabilities | None = None
        self._next_id = 0
        #: the frame limit once READY; until then frames are bounded by `max_version_size`,
        #: so a peer that has agreed to nothing cannot make us buffer (or parse) megabytes
        self._max_frame = HEADER_SIZE + _STRUCT_HEADROOM + self.local_caps.max_data_xfer_size
        self._decoder = FrameDecoder(
            min(max_version_size, self._max_frame), max(self.local_caps.max_msg_fds, 1)
        )

    # ---------------------------------------------------------------- phases

    def _step(self, step: Step) -> None:
        nxt = PHASE_TABLE.get((self.role, self.phase, step))
        if nxt is None:
            raise LocalProtocolError(f"{self.role.value}: {step.value} in phase {self.phase.value}")
        self.phase = nxt
        if nxt is Phase.READY:
            self._decoder.max_message_size = self._max_frame

    def _allowed(self, step: Step) -> bool:
        return (self.role, self.phase, step) in PHASE_TABLE

    # ---------------------------------------------------------------- receiving

    def receive_data(self, data: bytes | bytearray | memoryview, fds: Sequence[Any] = ()) -> None:
        """Feed one read's bytes and the descriptors that came with it.

        Raises FatalProtocolError (carrying every fd it held) when the stream is broken.
        An empty `data` means the peer closed.
        """
        if not data and not fds:
            self.phase = Phase.CLOSED
            return
        self._decoder.feed(data, fds)

    def next_event(self) -> Event | None:
        """The next event, or None until more data arrives."""
        frame = self._decoder.next_frame()
        return None if frame is None else self.event_from_frame(frame)

    def take_plain(self, commands: frozenset[int]) -> list[tuple[int, int, int, memoryview]]:
        """The plain requests at the head of what was fed, as ``(msg_id, command, flags,
        payload)`` without message objects (`FrameDecoder.take_plain`); empty unless READY.

        "Plain" means: the command is in `commands`, the frame is a request with no flag
        but No_reply, no error field and no descriptors, so no phase rule or fd ownership
        is involved and the caller's own fast decoder needs only the payload. Call
        `next_event` for whatever comes after them."""
        if self.phase is not _READY:
            return []
        return self._decoder.take_plain(commands)

    def fast_ready(self) -> bool:
        """READY with nothing buffered: a read holding exactly one plain request can be
        served from its header alone, without feeding it (`Session._serve_serial`)."""
        return self.phase is _READY and self._decoder.idle

    def event_from_frame(self, frame: Frame) -> Event:
        """Full decoding of a frame (also for a plain one its caller could not handle)."""
        try:
            return self._event(frame)
        except FatalProtocolError:
            raise
        except RemoteProtocolError as exc:
            return BadRequest(frame.msg_id, frame.command, frame.no_reply, exc)

    def _event(self, f: Frame) -> Event:
        if f.flags & _UNKNOWN_FLAGS or (f.flags & _TYPE_MASK) > 1:
            raise RemoteProtocolError(f"header flags {f.flags:#x} invalid", fds=f.fds)
        if f.is_reply:
            return self._reply_event(f)
        if f.error or f.flags & _ERROR_FLAG:
            raise RemoteProtocolError("a command must not carry an error", fds=f.fds)
        if f.command == Command.VERSION:
            if not self._allowed(Step.RECV_VERSION):
                raise RemoteProtocolError("VERSION in phase " + self.phase.value, fds=f.fds)
            body = decode_body(f.command, False, memoryview(f.payload), f.fds)
            self._step(Step.RECV_VERSION)
            return Request(f.msg_id, body, f.no_reply, HEADER_SIZE + len(f.payload), f.flags)
        if self.phase is not Phase.READY:
            raise RemoteProtocolError(f"command {f.command} before VERSION completed", fds=f.fds)
        body = decode_body(f.command, False, memoryview(f.payload), f.fds)
        to_client = body.COMMAND in (Command.DMA_READ, Command.DMA_WRITE)
        if to_client != (self.role is Role.CLIENT):
            raise RemoteProtocolError(
                f"{body.COMMAND.name} may not be sent to a {self.role.value}", fds=f.fds
            )
        return Request(f.msg_id, body, f.no_reply, HEADER_SIZE + len(f.payload), f.flags)

    def _reply_event(self, f: Frame) -> Event:
        if f.is_error:
            if f.fds:
                raise RemoteProtocolError("error reply with descriptors", fds=f.fds)
            if f.command == Command.VERSION and self._allowed(Step.VERSION_FAILED):
                self._step(Step.VERSION_FAILED)
            return ErrorReply(f.msg_id, f.command, f.error or errno.EIO)
        if (
            f.command == Command.VERSION
            and self.role is Role.CLIENT
            and not self._allowed(Step.RECV_VERSION_REPLY)
        ):
            raise RemoteProtocolError("VERSION reply in phase " + self.phase.value, fds=f.fds)
        body = decode_body(f.command, True, memoryview(f.payload), f.fds)
        if f.command == Command.VERSION and self.role is Role.CLIENT:
            assert isinstance(body, Version)
            self.peer_caps = body.capabilities
            self.caps = body.capabilities
            self._step(Step.RECV_VERSION_REPLY)
        return Reply(f.msg_id, body)

    # ---------------------------------------------------------------- sending

    def _new_id(self) -> int:
        msg_id = self._next_id
        self._next_id = (self._next_id + 1) & 0xFFFF
        return msg_id

    def send_request(
        self, body: Body, *, no_reply: bool = False
    ) -> tuple[int, bytes, tuple[Any, ...]]:
        """Frame a request; returns (msg_id, bytes to send, fds to send with them)."""
        if body.IS_REPLY:
            raise LocalProtocolError(f"{type(body).__name__} is a reply")
        if body.COMMAND == Command.VERSION:
            self._step(Step.SEND_VERSION)
        elif self.phase is not Phase.READY:
            raise LocalProtocolError(f"{body.COMMAND.name} before VERSION completed")
        msg_id = self._new_id()
        payload = body.encode()
        flags = _NO_REPLY if no_reply else 0
        return (
            msg_id,
            pack_header(msg_id, body.COMMAND, HEADER_SIZE + len(payload), flags) + payload,
            body.fds,
        )

    def send_reply(self, msg_id: int, body: Body) -> tuple[bytes, tuple[Any, ...]]:
        """Frame a successful reply; a VERSION reply moves the server to READY."""
        if not body.IS_REPLY:
            raise LocalProtocolError(f"{type(body).__name__} is not a reply")
        if body.COMMAND == Command.VERSION and self.role is Role.SERVER:
            assert isinstance(body, Version)
            self._step(Step.SEND_VERSION_REPLY)
            self.caps = body.capabilities
        payload = body.encode()
        head = pack_header(msg_id, body.COMMAND, HEADER_SIZE + len(payload), _TYPE_REPLY)
        return head + payload, body.fds

    def send_error(self, msg_id: int, command: int, err: int) -> bytes:
        """Frame an error reply (header only). A failed VERSION returns to AWAIT_VERSION."""
        if command == Command.VERSION and self._allowed(Step.VERSION_FAILED):
            self._step(Step.VERSION_FAILED)
        flags = _TYPE_REPLY | _ERROR_FLAG
        return pack_header(msg_id, command & 0xFFFF, HEADER_SIZE, flags, err or errno.EIO)

    @property
    def next_id(self) -> int:
        """The msg_id our next request will carry."""
        return self._next_id

    def resume(self, phase: Phase, caps: Capabilities | None, next_id: int) -> None:
        """Continue, on a fresh Connection, a stream another one served up to a message
        boundary (a live upgrade hands the socket over): its phase, the agreed capabilities
        and the id of our next request. Only the boundary phases AWAIT_VERSION and READY
        (with capabilities) can be resumed."""
        if phase is Phase.READY and caps is None:
            raise LocalProtocolError("resuming READY needs the agreed capabilities")
        if phase not in (Phase.AWAIT_VERSION, Phase.READY):
            raise LocalProtocolError(f"cannot resume a stream in phase {phase.value}")
        self.phase = phase
        self.caps = caps
        if phase is Phase.READY:
            self._decoder.max_message_size = self._max_frame  # as entering READY does
        self._next_id = next_id & 0xFFFF

    def close(self) -> list[Any]:
        """Mark the stream closed; returns descriptors of incomplete messages to close."""
        self.phase = Phase.CLOSED
        return self._decoder.close()

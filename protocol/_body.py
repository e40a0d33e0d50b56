"""What every message body shares: the `Body` base, its declared head, and the empty bodies.

A body is what follows the 16-byte header. Each class declares its fixed head once, as
`FIELDS` (name, struct format) pairs in wire order, and what may follow it as `TAIL_DOC`
(prose, for docs/protocol.md). The `struct.Struct` of the head is built here, once per class,
so codecs (generated or hand-written) and the generated documentation read the same layout.

Descriptors travel in `fds` attributes and are opaque objects here (the server passes owned
fd objects): the codec never opens, closes or duplicates anything. Every decode error is a
`RemoteProtocolError` with EINVAL that carries the message's descriptors, because whoever
catches it must close them.
"""

from __future__ import annotations

import struct
from typing import Any, ClassVar, Self

from ._constants import Command
from ._errors import RemoteProtocolError

Fds = tuple[Any, ...]

#: (name, struct format) per field of a fixed head, in wire order (little-endian)
Fields = tuple[tuple[str, str], ...]


class Body:
    """Base of every message body.

    `decode(payload, fds)` takes the payload after the header and the descriptors that came
    with the frame; `encode()` returns the payload bytes and `fds` the descriptors to send
    with them. Only what the wire format itself requires is checked (sizes, argsz minimums,
    reserved bits); whether a region index or a window exists is the server's business.
    """

    COMMAND: ClassVar[Command]
    IS_REPLY: ClassVar[bool] = False
    #: the fixed head, in wire order; `HEAD`/`SIZE` are derived from it per class
    FIELDS: ClassVar[Fields] = ()
    #: what follows the head, in words (rendered into docs/protocol.md)
    TAIL_DOC: ClassVar[str] = ""
    #: which descriptors the message carries, in words ("" = none)
    FDS_DOC: ClassVar[str] = ""
    HEAD: ClassVar[struct.Struct] = struct.Struct("<")
    SIZE: ClassVar[int] = 0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Also runs for the class dataclass(slots=True) re-creates: cheap and idempotent.
        if "FIELDS" in cls.__dict__:
            cls.HEAD = struct.Struct("<" + "".join(fmt for _name, fmt in cls.FIELDS))
            cls.SIZE = cls.HEAD.size

    @classmethod
    def what(cls) -> str:
        """The name error messages use: the command, plus " reply" for replies."""
        return cls.COMMAND.name + (" reply" if cls.IS_REPLY else "")

    @property
    def fds(self) -> Fds:
        return ()

    def encode(self) -> bytes:
        raise NotImplementedError

    @classmethod
    def decode(cls, payload: memoryview, fds: Fds) -> Self:
        raise NotImplementedError


def need(cls: type[Body], payload: memoryview, size: int, fds: Fds) -> None:
    """Reject a payload shorter than `size` (before any unpack can fail)."""
    if len(payload) < size:
        raise RemoteProtocolError(
            f"{cls.what()}: payload of {len(payload)} bytes, need {size}", fds=fds
        )


def no_fds(cls: type[Body], fds: Fds) -> None:
    """Reject descriptors on a message that takes none (they are handed back, not lost)."""
    if fds:
        raise RemoteProtocolError(
            f"{cls.what()} carries no file descriptors, got {len(fds)}", fds=fds
        )


def reject(cls: type[Body], why: str, fds: Fds) -> RemoteProtocolError:
    """The error for a malformed body (raise it); generated codecs call this too."""
    return RemoteProtocolError(f"{cls.what()}: {why}", fds=fds)


class EmptyBody(Body):
    """Bodies with no payload (DEVICE_RESET, the replies of DMA_MAP and SET_IRQS, ...).

    Not dataclasses: there is nothing to hold, so equality is by type.
    """

    TAIL_DOC = "nothing (trailing bytes are ignored)"

    def encode(self) -> bytes:
        return b""

    @classmethod
    def decode(cls, payload: memoryview, fds: Fds) -> Self:
        no_fds(cls, fds)
        # Trailing bytes are tolerated: replies of older peers sometimes echo a struct.
        return cls()

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other)

    def __hash__(self) -> int:
        return hash(type(self))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

"""The words the worker's parts share: a decoded command, its outcome, the namespace it
addresses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from devices.sdk.storage import BlockBackend

from .spec import SQE, SQE_PSDT_SHIFT, Status

BROADCAST_NSID = 0xFFFF_FFFF

_tuple_new = tuple.__new__


@dataclass
class Namespace:
    nsid: int
    backend: BlockBackend
    lba_shift: int
    nguid: bytes
    uuid: bytes

    @property
    def blocks(self) -> int:
        return self.backend.size >> self.lba_shift


class Command(NamedTuple):
    """A decoded submission queue entry (see `spec.SQE`)."""

    opcode: int
    flags: int
    cid: int
    nsid: int
    mptr: int
    prp1: int
    prp2: int
    cdw10: int
    cdw11: int
    cdw12: int
    cdw13: int
    cdw14: int
    cdw15: int

    @classmethod
    def decode(cls, buf: bytes | memoryview, offset: int = 0) -> Command:
        # tuple.__new__ straight from the unpacked fields: the NamedTuple's own __new__ is
        # a Python call with 13 arguments, once per fetched command
        return _tuple_new(cls, SQE.unpack_from(buf, offset))

    @property
    def psdt(self) -> int:
        return (self.flags >> SQE_PSDT_SHIFT) & 0x3


#: (status, DW0 result); None from an admin handler means "completes later" (AER)
Outcome = tuple[int, int]


class CommandError(Exception):
    """Raised inside a handler to complete the command with `status`."""

    def __init__(self, status: Status, message: str = "") -> None:
        super().__init__(message or status.name)
        self.status = status


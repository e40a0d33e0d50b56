"""Per-device counters for `query-stats` (docs/operations.md), cheap enough to leave on.

Where each is counted, so that the region fast path pays one integer increment at most:

| counter                            | counted                                              |
|------------------------------------|------------------------------------------------------|
| region reads / writes (and bytes)  | `access.serve` / `dispatch`: one packed increment     |
| other messages, per command        | `dispatch.run_request` / `reject` (the full path)    |
| errors, per errno                  | `errors.fail` (through `Session.count_error`)        |
| DMA bytes each way                 | `SessionDma` (copies, and views handed to the model) |
| interrupts raised                  | `IrqTable.fired` (already counted)                   |
| connections accepted / refused     | the Python engine's `_admit`                         |

A *packed* counter holds a message count and a byte count in one Python int: each access
adds `count + ONE` (`ONE` = 2**48), so `value >> 48` is the messages and
`value & (ONE - 1)` the bytes (up to 256 TiB per session before they would carry). A
session's own counters are folded into its device's `DeviceStats` when it ends
(`absorb`); `report` adds the live sessions' on top.
"""

from __future__ import annotations

import errno as errno_mod
from collections import Counter
from dataclasses import dataclass, field

#: one message in a packed counter (see the module docstring)
ONE = 1 << 48
_MASK = ONE - 1


def unpack(packed: int) -> tuple[int, int]:
    """(messages, bytes) of a packed counter."""
    return packed >> 48, packed & _MASK


@dataclass(frozen=True)
class SessionCounters:
    """What one session counted itself (a snapshot)."""

    region_read: int = 0
    region_write: int = 0
    dma_read_bytes: int = 0
    dma_write_bytes: int = 0
    interrupts: int = 0


@dataclass(eq=False)
class DeviceStats:
    """Every counter of one device, over all its sessions."""

    #: full-path messages by command number
    messages: Counter[int] = field(default_factory=Counter)
    #: error replies by errno
    errors: Counter[int] = field(default_factory=Counter)
    region_read: int = 0
    region_write: int = 0
    dma_read_bytes: int = 0
    dma_write_bytes: int = 0
    interrupts: int = 0
    connections_accepted: int = 0
    connections_refused: int = 0

    def absorb(self, c: SessionCounters) -> None:
        self.fold(c.region_read, c.region_write, c.dma_read_bytes, c.dma_write_bytes, c.interrupts)

    def fold(
        self, region_read: int, region_write: int, dma_read: int, dma_write: int, irqs: int
    ) -> None:
        """`absorb` without the snapshot: a closing session's counts (a frozen dataclass
        per connection is not free)."""
        self.region_read += region_read
        self.region_write += region_write
        self.dma_read_bytes += dma_read
        self.dma_write_bytes += dma_write
        self.interrupts += irqs

    def report(
        self, live: list[SessionCounters], command_name: dict[int, str]
    ) -> dict[str, object]:
        """The JSON shape of `query-stats` for this device (live sessions included)."""
        total = DeviceStats(region_read=self.region_read, region_write=self.region_write)
        total.absorb(
            SessionCounters(0, 0, self.dma_read_bytes, self.dma_write_bytes, self.interrupts)
        )
        for c in live:
            total.absorb(c)
        reads, read_bytes = unpack(total.region_read)
        writes, write_bytes = unpack(total.region_write)
        messages = {command_name.get(k, str(k)): v for k, v in sorted(self.messages.items())}
        for name, n in (("REGION_READ", reads), ("REGION_WRITE", writes)):
            if n:
                messages[name] = messages.get(name, 0) + n
        return {
            "messages": messages,
            "errors": {
                errno_mod.errorcode.get(k, str(k)): v for k, v in sorted(self.errors.items())
            },
            "region_bytes_read": read_bytes,
            "region_bytes_written": write_bytes,
            "dma_bytes_read": total.dma_read_bytes,
            "dma_bytes_written": total.dma_write_bytes,
            "interrupts": total.interrupts,
            "connections_accepted": self.connections_accepted,
            "connections_refused": self.connections_refused,
        }


__all__ = ["ONE", "DeviceStats", "SessionCounters", "unpack"]

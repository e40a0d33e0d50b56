"""Submission and completion rings: pure arithmetic, no DMA, no trio.

Why pure: ring bugs (an off-by-one at the wrap, a phase tag that does not flip, a doorbell
value past the end) are the classic NVMe emulation failures, and they are easiest to pin
down in unit tests that need neither guest memory nor tasks (openvmm keeps `queue.rs` free
of I/O for the same reason). The worker owns the DMA; these classes only say *where*.

A ring of `size` entries is full when `tail + 1 == head (mod size)`: one slot always stays
empty so that `head == tail` means empty. The completion phase tag starts at 1 and flips
each time the device's tail wraps to slot 0; the host recognises new entries by it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from .spec import CQE_SIZE, SQE_SIZE

#: CAP.MQES + 1: the largest queue we accept (I/O queues; the admin queue is capped at 4096
#: by AQA's 12-bit fields).
MAX_QUEUE_ENTRIES = 4096
MIN_QUEUE_ENTRIES = 2


class DoorbellError(ValueError):
    """A doorbell write named a slot outside the ring (an asynchronous error in the spec)."""


@dataclass
class SubmissionQueue:
    """One SQ: the host produces at `tail` (doorbell), the device consumes at `head`."""

    qid: int
    base: int
    size: int
    cqid: int
    head: int = 0
    tail: int = 0
    #: shadow doorbell / event index addresses (Doorbell Buffer Config), None when off
    shadow_db: int | None = None
    event_idx: int | None = None

    def __post_init__(self) -> None:
        if not MIN_QUEUE_ENTRIES <= self.size <= MAX_QUEUE_ENTRIES:
            raise ValueError(f"SQ {self.qid}: size {self.size} out of range")

    def set_tail(self, value: int) -> None:
        """Record the host's new tail (MMIO or shadow doorbell)."""
        if not 0 <= value < self.size:
            raise DoorbellError(f"SQ {self.qid}: tail {value} >= size {self.size}")
        self.tail = value

    @property
    def pending(self) -> int:
        """Entries submitted and not yet fetched."""
        return (self.tail - self.head) % self.size

    def runs(self, limit: int | None = None) -> Iterator[tuple[int, int]]:
        """(guest address, entry count) runs from head towards tail, split at the wrap.

        Yields at most `limit` entries in total; does not move `head` (call `advance`).
        """
        left = self.pending if limit is None else min(limit, self.pending)
        pos = self.head
        while left:
            n = min(left, self.size - pos)
            yield self.base + pos * SQE_SIZE, n
            left -= n
            pos = (pos + n) % self.size

    def first_run(self, limit: int) -> tuple[int, int]:
        """The first of `runs(limit)` ((address, 0) when nothing is pending), without a
        generator: the doorbell handler takes one run at a time."""
        return self.base + self.head * SQE_SIZE, min(limit, self.pending, self.size - self.head)

    def advance(self, n: int) -> None:
        if not 0 <= n <= self.pending:
            raise ValueError(f"SQ {self.qid}: cannot consume {n} of {self.pending}")
        self.head = (self.head + n) % self.size


@dataclass
class CompletionQueue:
    """One CQ: the device produces at `tail` with phase tags, the host consumes at `head`."""

    qid: int
    base: int
    size: int
    vector: int = 0
    interrupts: bool = True
    head: int = 0
    tail: int = 0
    phase: int = 1
    shadow_db: int | None = None
    event_idx: int | None = None
    #: SQs that post here (a CQ cannot be deleted while any remain)
    sqs: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        if not MIN_QUEUE_ENTRIES <= self.size <= MAX_QUEUE_ENTRIES:
            raise ValueError(f"CQ {self.qid}: size {self.size} out of range")

    def set_head(self, value: int) -> None:
        """Record the host's new head; it may not pass the device's tail."""
        if not 0 <= value < self.size:
            raise DoorbellError(f"CQ {self.qid}: head {value} >= size {self.size}")
        if (value - self.head) % self.size > self.outstanding:
            raise DoorbellError(f"CQ {self.qid}: head {value} passes tail {self.tail}")
        self.head = value

    @property
    def outstanding(self) -> int:
        """Entries posted and not yet consumed by the host."""
        return (self.tail - self.head) % self.size

    @property
    def free(self) -> int:
        return self.size - 1 - self.outstanding

    @property
    def full(self) -> bool:
        # (free == 0 without the two properties: asked at least twice per completion)
        return (self.tail + 1) % self.size == self.head

    def reserve(self) -> tuple[int, int]:
        """Claim the slot at tail: (guest address, phase tag to write). Raises when full."""
        if self.full:
            raise OverflowError(f"CQ {self.qid} is full")
        slot, phase = self.tail, self.phase
        self.tail = (self.tail + 1) % self.size
        if self.tail == 0:
            self.phase ^= 1
        return self.base + slot * CQE_SIZE, phase


def doorbell_decode(offset: int, stride: int) -> tuple[int, bool] | None:
    """Map a doorbell offset (relative to 0x1000) to (queue id, is_completion_head).

    `stride` is the doorbell spacing in bytes (4 << CAP.DSTRD). Offsets that are not the
    start of a doorbell return None (the write is ignored).
    """
    if offset < 0 or offset % stride:
        return None
    index = offset // stride
    return index // 2, bool(index & 1)

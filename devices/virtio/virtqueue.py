"""Split virtqueues (virtio 1.2, 2.7) as pure logic over the device's DMA port.

Why here and not in the transport: the ring format is the part a guest can corrupt, so it is
kept small, free of PCI and trio-scheduling concerns, and tested against a fake DMA port with
hand-built rings (chains, indirect tables, wrap-around, event index, malformed input).

Layout reminder (all little-endian)::

    descriptor table (16 bytes each)   avail ring (driver area)      used ring (device area)
    +--------+-----+-------+------+    +-------+-----+---------+     +-------+-----+--------------+
    | addr64 |len32|flags16|next16|    |flags16|idx16|ring[N]16|     |flags16|idx16|ring[N]{id,len}|
    +--------+-----+-------+------+    +-------+-----+---------+     +-------+-----+--------------+
                                       | used_event16 (EVENT_IDX)|    | avail_event16 (EVENT_IDX)  |

Guest memory is read through `DmaPort.view` (zero copy, synchronous) when the window is
mmap'd and through `DmaPort.read/write` messages otherwise, hence the async methods.

Error handling: anything a driver can get wrong (a loop, an index or address out of range, a
chain longer than the queue, an indirect table inside an indirect table, an avail index that
jumps by more than the queue size) raises `VirtqueueError`; the transport answers that with
DEVICE_NEEDS_RESET. `DmaError` (an unmapped address) becomes `GuestMemoryError`, a subclass
that workers first retry (see its docstring).
"""

from __future__ import annotations

import functools
import operator
import struct
from dataclasses import dataclass, field

from devices.sdk.fence import full_fence
from devices.sdk.interface import DmaError, DmaPort

from .guestmem import (
    DeviceBugError,
    GuestMemoryError,
    VirtqueueError,
    read_guest,
    store_u16,
    write_guest,
)

#: descriptor flags
DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
#: avail.flags: the driver does not want interrupts (ignored with EVENT_IDX)
AVAIL_F_NO_INTERRUPT = 1
#: used.flags: the device does not want notifications (ignored with EVENT_IDX)
USED_F_NO_NOTIFY = 1

DESC_SIZE = 16
USED_ELEM_SIZE = 8
RING_HEADER = 4  # flags + idx
MAX_QUEUE_SIZE = 32768
#: largest total byte count of one chain we accept (a guard against absurd lengths)
MAX_CHAIN_BYTES = 1 << 32

_DESC = struct.Struct("<QIHH")
_length = operator.itemgetter(1)
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")


class _NoView(Exception):
    """A ring is not mmap'd (message-mode DMA): take the async path."""


class _NeedTable(Exception):
    """Message mode: `_walk` needs an indirect table that has not been read yet."""

    def __init__(self, addr: int, length: int) -> None:
        super().__init__(f"indirect table 0x{addr:x}+{length}")
        self.addr = addr
        self.length = length

@dataclass
class Chain:
    """One descriptor chain popped from the avail ring.

    `readable` are driver->device buffers, `writable` device->driver ones, each a list of
    (guest address, length), in chain order.
    """

    head: int
    readable: list[tuple[int, int]] = field(default_factory=list)
    writable: list[tuple[int, int]] = field(default_factory=list)
    #: (readable, writable) byte counts, when the walk knew them (`_walk_linear`): a
    #: request asks for them up to three times, each a pass over ~256 pieces otherwise
    lengths: tuple[int, int] | None = field(default=None, repr=False, compare=False)

    @property
    def readable_len(self) -> int:
        if self.lengths is not None:
            return self.lengths[0]
        return sum(map(_length, self.readable))  # C-level: chains have ~256 pieces

    @property
    def writable_len(self) -> int:
        if self.lengths is not None:
            return self.lengths[1]
        return sum(map(_length, self.writable))


@functools.lru_cache(maxsize=64)
def _table_struct(entries: int) -> struct.Struct:
    return struct.Struct("<" + "QIHH" * entries)


@functools.lru_cache(maxsize=64)
def _linear_layout(entries: int, readable: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The flags and next fields of an in-order table (`_walk_linear`): a driver sends the
    same few shapes over and over, so they are built once, not per request."""
    flags = [DESC_F_NEXT] * readable + [DESC_F_NEXT | DESC_F_WRITE] * (entries - readable)
    flags[-1] &= ~DESC_F_NEXT
    return tuple(flags), tuple(range(1, entries))


def _walk_linear(head: int, table: bytes | memoryview) -> Chain | None:
    """An indirect table laid out in order (entry i links to i + 1, readable entries
    first, as Linux builds them), checked with a few C-level operations; None for
    anything else, which `Virtqueue._walk` then walks (and rejects) entry by entry.

    Why: a 1 MiB request is a 256-entry table, and the entry-by-entry walk was about a
    third of the server's CPU per read; one unpack and tuple comparisons take a tenth.
    """
    n = len(table) // DESC_SIZE
    if n == 0:
        return None
    fields = _table_struct(n).unpack(table)
    flags = fields[2::4]
    # Where the writable part starts (a guess: the comparison below checks every entry).
    try:
        readable_count = flags.index(DESC_F_NEXT | DESC_F_WRITE)
    except ValueError:
        readable_count = n - 1 if flags[-1] == DESC_F_WRITE else n
    expect_flags, expect_next = _linear_layout(n, readable_count)
    if flags != expect_flags or fields[3:-4:4] != expect_next:
        return None
    addrs, lengths = fields[0::4], fields[1::4]
    total = sum(lengths)
    if total > MAX_CHAIN_BYTES:
        return None
    # one sum over the shorter side (a read's header, a write's status byte)
    if readable_count <= n // 2:
        readable_len = sum(lengths[:readable_count])
    else:
        readable_len = total - sum(lengths[readable_count:])
    # equal lengths by construction, so no zip(strict=True), which doubles its cost
    return Chain(head, list(zip(addrs[:readable_count], lengths[:readable_count])),  # noqa: B905
                 list(zip(addrs[readable_count:], lengths[readable_count:])),  # noqa: B905
                 (readable_len, total - readable_len))


class Virtqueue:
    """Device side of one split virtqueue.

    The transport owns the registers (size, addresses, enable, vector) and copies them here;
    `pop`, `push` and `should_interrupt` walk the rings. `event_idx` mirrors the negotiated
    VIRTIO_F_RING_EVENT_IDX feature, `indirect` VIRTIO_F_RING_INDIRECT_DESC.
    """

    def __init__(self, index: int, max_size: int) -> None:
        if not 1 <= max_size <= MAX_QUEUE_SIZE:
            raise ValueError("queue size must be 1..32768")
        self.index = index
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        """Back to the power-on state (queue disabled, size = maximum, vector none)."""
        self.size = self.max_size
        self.desc_addr = 0
        self.avail_addr = 0
        self.used_addr = 0
        self.enabled = False
        self.msix_vector = 0xFFFF
        self.event_idx = False
        self.indirect = False
        self.last_avail_idx = 0
        self._known_avail = 0
        self.used_idx = 0
        self.signalled_used = 0
        self.signalled_valid = False
        #: heads popped and not yet pushed -> the avail index they were popped at
        self._inflight: dict[int, int] = {}

    # ---------------------------------------------------------------- in-flight heads

    def _track(self, head: int) -> None:
        """Record a popped head. A head the driver offers while we still hold it means the
        two sides disagree about ownership: completing both would hand the driver a buffer
        twice, which it reports as "id N is not a head", so it is refused here instead."""
        if head in self._inflight:
            raise VirtqueueError(f"queue {self.index}: head {head} made available again "
                                 "while the device still holds it")
        self._inflight[head] = self.last_avail_idx

    def rewind(self, start: int) -> None:
        """Give back every chain popped since avail index `start` (none of them pushed):
        the next `pop` returns them again. For workers that must retry a batch."""
        count = (self.last_avail_idx - start) & 0xFFFF
        if count:
            for head, at in list(self._inflight.items()):
                if (at - start) & 0xFFFF < count:
                    del self._inflight[head]
        self.last_avail_idx = start

    def held(self) -> dict[int, int]:
        """Heads popped and not yet pushed -> the avail index each was popped at."""
        return dict(self._inflight)

    def restart_at(self, last_avail_idx: int) -> None:
        """Continue popping at `last_avail_idx`, holding nothing (a loaded state)."""
        self.last_avail_idx = last_avail_idx
        self._known_avail = last_avail_idx
        self._inflight = {}

    @property
    def in_flight(self) -> int:
        """How many chains the device holds (popped, not pushed)."""
        return len(self._inflight)

    def _untrack(self, head: int) -> None:
        """A head is being pushed: it must be one we hold, or we would corrupt the ring."""
        if self._inflight.pop(head, None) is None:
            raise DeviceBugError(f"queue {self.index}: pushing head {head}, which the "
                                 "device does not hold")

    # ---------------------------------------------------------------- avail side

    async def avail_idx(self, dma: DmaPort) -> int:
        raw = await read_guest(dma, self.avail_addr + 2, 2)
        return int(_U16.unpack(raw)[0])

    def _pending(self, avail_idx: int) -> int:
        """Chains the driver published past ours, from the avail index it wrote (now our
        latest look: `_known_avail`); a jump beyond the ring size is a malformed ring."""
        self._known_avail = avail_idx
        pending = (avail_idx - self.last_avail_idx) & 0xFFFF
        if pending > self.size:
            raise VirtqueueError(f"queue {self.index}: avail idx moved by {pending} "
                                 f"> size {self.size}")
        return pending

    async def has_work(self, dma: DmaPort) -> bool:
        if 0 < (self._known_avail - self.last_avail_idx) & 0xFFFF <= self.size:
            # The driver already published more than we consumed (it never takes back):
            # no need to ask guest memory again, which costs a message in message mode.
            return True
        return self._pending(await self.avail_idx(dma)) != 0

    async def pop(self, dma: DmaPort) -> Chain | None:
        """The next available chain, or None if the driver has not made one available."""
        try:
            return self._pop_mapped(dma)
        except _NoView:
            pass  # message-mode DMA: the async path below
        if not await self.has_work(dma):
            return None
        slot = self.last_avail_idx % self.size
        raw = await read_guest(dma, self.avail_addr + RING_HEADER + 2 * slot, 2)
        head = _U16.unpack(raw)[0]
        # Each DMA_READ is a round trip to the client, so the descriptor table is read in
        # one message and an indirect table in a second; the walk itself is `_walk`'s.
        desc = await read_guest(dma, self.desc_addr, DESC_SIZE * self.size)
        tables: dict[tuple[int, int], bytes] = {}
        while True:
            try:
                chain = self._walk(head, desc, dma, tables)
                break
            except _NeedTable as need:  # at most once: indirect tables do not nest
                tables[need.addr, need.length] = await read_guest(dma, need.addr, need.length)
        self._track(head)
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        return chain

    def _pop_mapped(self, dma: DmaPort) -> Chain | None:
        """`pop` through mmap'd views of the rings, without awaiting (the fast path).

        Why: a 64 KiB frame fills ~16 receive buffers and a 1 MiB request has a 256-entry
        indirect table; asking the DMA port per descriptor cost more than the data copy.
        The views are used only inside this call (no checkpoint), as `DmaPort.view`
        requires. Raises `_NoView` when a ring is not mmap'd (message mode): the caller
        then takes the async path. Returns None when nothing is available.
        """
        rings = self._mapped_rings(dma)
        if rings is None:
            raise _NoView
        avail, desc, pending = rings
        return self._take(avail, desc, dma) if pending else None

    async def pop_all(self, dma: DmaPort) -> list[Chain]:
        """Every chain available now (what a request queue's worker serves as one batch).

        The rings are viewed once for all of them: `pop` views them per chain and once
        more to find the ring empty, two DMA-port lookups each time, on the path between
        a notify and the request's I/O. Message mode pops one by one."""
        rings = self._mapped_rings(dma)
        if rings is None:
            chains: list[Chain] = []
            while (chain := await self.pop(dma)) is not None:
                chains.append(chain)
            return chains
        avail, desc, pending = rings
        return [self._take(avail, desc, dma) for _ in range(pending)]

    def pop_upto(self, dma: DmaPort, need: int) -> list[Chain] | None:
        """Pop chains until their writable parts hold `need` bytes or the ring is empty
        (the caller rewinds if they are too few); None when the rings are not mmap'd.

        For a receive path filling many small buffers per frame: the rings are viewed
        once for all of them, not once per buffer as `pop` does."""
        rings = self._mapped_rings(dma)
        if rings is None:
            return None
        avail, desc, pending = rings
        chains: list[Chain] = []
        got = 0
        while pending and got < need:
            chain = self._take(avail, desc, dma)
            pending -= 1
            chains.append(chain)
            got += chain.writable_len
        return chains

    def _mapped_rings(self, dma: DmaPort) -> tuple[memoryview, memoryview, int] | None:
        """Views of the avail ring and the descriptor table and how many chains are pending,
        or None when the rings are not mmap'd (message mode). The views are valid only until
        the caller's next checkpoint (`DmaPort.view`)."""
        try:
            avail = dma.view(self.avail_addr, RING_HEADER + 2 * self.size + 2)
            desc = dma.view(self.desc_addr, DESC_SIZE * self.size)
        except DmaError as exc:
            raise GuestMemoryError(f"queue {self.index}: guest memory of the rings: {exc}") \
                from None
        if avail is None or desc is None:
            return None
        # (`_pending` keeps `has_work`'s shortcut from going stale)
        return avail, desc, self._pending(_U16.unpack_from(avail, 2)[0])

    def _take(self, avail: memoryview, desc: memoryview, dma: DmaPort) -> Chain:
        """Walk the next available chain through the mapped rings and consume it."""
        head = _U16.unpack_from(avail, RING_HEADER + 2 * (self.last_avail_idx % self.size))[0]
        chain = self._walk(head, desc, dma, None)
        self._track(head)
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        return chain

    def _walk(self, head: int, desc: bytes | memoryview, dma: DmaPort,
              tables: dict[tuple[int, int], bytes] | None) -> Chain:
        """The chain starting at descriptor `head`, checked (the one walker of both paths).

        `desc` is the descriptor table's bytes: a view on the fast path (`tables` None, an
        indirect table is viewed too), a copy in message mode (`tables` holds the indirect
        tables read so far). Synchronous, so the zero-copy path has no awaits; a table it
        cannot get without awaiting raises `_NoView` / `_NeedTable` for the caller.
        """
        if head >= self.size:
            raise VirtqueueError(f"queue {self.index}: head {head} >= size {self.size}")
        addr, length, flags, _ = _DESC.unpack_from(desc, DESC_SIZE * head)
        if not flags & (DESC_F_NEXT | DESC_F_INDIRECT):
            # One direct descriptor (a receive buffer: 16-40 of them per 64 KiB frame):
            # nothing to follow or check (a u32 length is within MAX_CHAIN_BYTES).
            if flags & DESC_F_WRITE:
                return Chain(head, [], [(addr, length)], (0, length))
            return Chain(head, [(addr, length)], [], (length, 0))
        chain = Chain(head)
        table = desc
        table_len, index = self.size, head
        in_indirect = False
        seen = 0
        total = 0
        while True:
            seen += 1
            if seen > table_len:
                raise VirtqueueError(f"queue {self.index}: chain from {head} loops or is "
                                     f"longer than {table_len}")
            addr, length, flags, nxt = _DESC.unpack_from(table, DESC_SIZE * index)
            if flags & DESC_F_INDIRECT:
                self._check_indirect(in_indirect, flags, length)
                table = self._indirect_table(dma, tables, addr, length)
                if not chain.readable and not chain.writable:
                    linear = _walk_linear(head, table)
                    if linear is not None:
                        return linear
                table_len, index = length // DESC_SIZE, 0
                in_indirect = True
                seen = 0
                continue
            total += length
            if total > MAX_CHAIN_BYTES:
                raise VirtqueueError(f"queue {self.index}: chain larger than 4 GiB")
            if flags & DESC_F_WRITE:
                chain.writable.append((addr, length))
            elif chain.writable:
                raise VirtqueueError(f"queue {self.index}: readable descriptor after a "
                                     "writable one")
            else:
                chain.readable.append((addr, length))
            if not flags & DESC_F_NEXT:
                return chain
            if nxt >= table_len:
                raise VirtqueueError(f"queue {self.index}: next {nxt} out of range "
                                     f"({table_len})")
            index = nxt

    def _indirect_table(self, dma: DmaPort, tables: dict[tuple[int, int], bytes] | None,
                        addr: int, length: int) -> bytes | memoryview:
        if tables is not None:
            table = tables.get((addr, length))
            if table is None:
                raise _NeedTable(addr, length)
            return table
        try:
            view = dma.view(addr, length)
        except DmaError as exc:
            raise GuestMemoryError(f"queue {self.index}: guest memory of an indirect "
                                   f"table: {exc}") from None
        if view is None:
            raise _NoView
        return view

    def _check_indirect(self, in_indirect: bool, flags: int, length: int) -> None:
        if in_indirect:
            raise VirtqueueError(f"queue {self.index}: nested indirect table")
        if not self.indirect:
            raise VirtqueueError(f"queue {self.index}: indirect descriptor without "
                                 "VIRTIO_F_RING_INDIRECT_DESC")
        if flags & DESC_F_NEXT:
            raise VirtqueueError(f"queue {self.index}: indirect descriptor with NEXT")
        if length == 0 or length % DESC_SIZE or length // DESC_SIZE > MAX_QUEUE_SIZE:
            raise VirtqueueError(f"queue {self.index}: bad indirect table length {length}")

    # ---------------------------------------------------------------- used side

    async def push_many(self, dma: DmaPort, done: list[tuple[int, int]]) -> None:
        """`push` for a batch: one view of the used ring when it is mmap'd, else one by one."""
        try:
            used = dma.view(self.used_addr, RING_HEADER + USED_ELEM_SIZE * self.size + 2,
                            write=True)
        except DmaError:
            used = None
        if used is not None:
            self.push_mapped(used, done)
            return
        for head, _ in done:
            self._untrack(head)
        # Message mode: the elements in at most two DMA writes (the ring may wrap),
        # then the index, instead of two writes per element.
        idx = self.used_idx
        while done:
            slot = idx % self.size
            run = done[: self.size - slot]
            done = done[len(run):]
            data = b"".join(_USED_ELEM.pack(h, w) for h, w in run)
            await write_guest(dma, self.used_addr + RING_HEADER + USED_ELEM_SIZE * slot,
                              data)
            idx = (idx + len(run)) & 0xFFFF
        await self._write_u16(dma, self.used_addr + 2, idx)
        self.used_idx = idx

    def push_mapped(self, used: memoryview, done: list[tuple[int, int]]) -> None:
        """`push_many` through a view of the whole used ring (`used`); also what a write's
        thread calls with its pinned view (`blkinline`), while nothing else pushes here."""
        idx = self.used_idx
        seen = _U16.unpack_from(used, 2)[0]
        if seen != idx:
            # Only the device writes used.idx: a different value means someone else wrote
            # the used ring (a stray DMA, or a driver scribbling on device memory).
            raise VirtqueueError(f"queue {self.index}: used idx in guest memory is {seen}, "
                                 f"the device last wrote {idx}")
        for head, _ in done:
            self._untrack(head)
        for head, written in done:
            off = RING_HEADER + USED_ELEM_SIZE * (idx % self.size)
            used[off : off + USED_ELEM_SIZE] = _USED_ELEM.pack(head, written)
            idx = (idx + 1) & 0xFFFF
        # x86 keeps stores in order, so the driver sees the elements before the index.
        store_u16(used, 2, idx)
        self.used_idx = idx

    async def push(self, dma: DmaPort, head: int, written: int) -> None:
        """Return a chain to the driver with `written` bytes placed in its writable part."""
        self._untrack(head)
        slot = self.used_idx % self.size
        await write_guest(dma, self.used_addr + RING_HEADER + USED_ELEM_SIZE * slot,
                          _USED_ELEM.pack(head, written))
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        await self._write_u16(dma, self.used_addr + 2, self.used_idx)

    async def should_interrupt(self, dma: DmaPort) -> bool:
        """After pushes: does the driver want an interrupt for what was used since the last?

        With EVENT_IDX: vring_need_event(used_event, new, old) (virtio 1.2, 2.7.10);
        otherwise the avail ring's NO_INTERRUPT flag.
        """
        full_fence()  # the used index pushed before the driver's used event is read
        avail = await read_guest(dma, self.avail_addr, RING_HEADER + 2 * self.size + 2)
        return self.should_interrupt_mapped(avail)

    def should_interrupt_mapped(self, avail: bytes | memoryview) -> bool:
        """`should_interrupt` on the avail ring's bytes (a pinned view, for a write's
        thread in `blkinline`, or a copy). A caller with a view fences after its push
        first (`full_fence`), as `should_interrupt` does."""
        if not self.event_idx:
            return not _U16.unpack_from(avail, 0)[0] & AVAIL_F_NO_INTERRUPT
        new = self.used_idx
        old = self.signalled_used
        valid = self.signalled_valid
        self.signalled_used = new
        self.signalled_valid = True
        if not valid:
            return True
        used_event = _U16.unpack_from(avail, RING_HEADER + 2 * self.size)[0]
        return bool(((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF))

    async def enable_notify(self, dma: DmaPort) -> bool:
        """Ask the driver to kick on the next buffer; True if work arrived meanwhile.

        With EVENT_IDX the device writes avail_event = last_avail_idx (kick me when you pass
        it); without, it clears USED_F_NO_NOTIFY. Re-checking afterwards closes the race
        with a driver that added a buffer just before it saw the new value.
        """
        await self._publish_avail_event(dma, self.last_avail_idx)
        return await self.has_work(dma)

    def enable_notify_mapped(self, dma: DmaPort) -> bool | None:
        """`enable_notify` without awaiting, through views of the mmap'd rings; None (and
        nothing written) when a ring is not mmap'd. For the notify handler, which re-arms
        for a sleeping worker (`worker.rearm_after_inline`)."""
        try:
            used = dma.view(self.used_addr, RING_HEADER + USED_ELEM_SIZE * self.size + 2,
                            write=True)
            avail = dma.view(self.avail_addr, RING_HEADER)
        except DmaError:
            return None
        if used is None or avail is None:
            return None
        if self.event_idx:
            store_u16(used, RING_HEADER + USED_ELEM_SIZE * self.size, self.last_avail_idx)
        else:
            store_u16(used, 0, 0)
        full_fence()  # the store above before the load below (devices/sdk/fence.py)
        return self._pending(_U16.unpack_from(avail, 2)[0]) != 0

    async def enable_notify_for_more(self, dma: DmaPort) -> bool:
        """Ask for a kick when the driver adds *more* buffers than it has now.

        For a consumer that found too few buffers (a large frame over mergeable receive
        buffers): waking on "any buffer available" would spin. True if more arrived already.
        """
        seen = await self.avail_idx(dma)
        await self._publish_avail_event(dma, seen)
        return await self.avail_idx(dma) != seen

    async def _publish_avail_event(self, dma: DmaPort, idx: int) -> None:
        """Ask for a kick; the caller looks at the avail index next, after a fence."""
        if self.event_idx:
            await self._write_u16(dma, self.used_addr + RING_HEADER
                                  + USED_ELEM_SIZE * self.size, idx)
        else:
            await self._write_u16(dma, self.used_addr, 0)
        full_fence()

    @staticmethod
    async def _write_u16(dma: DmaPort, address: int, value: int) -> None:
        """A 16-bit field the driver reads concurrently: one store when mmap'd."""
        try:
            view = dma.view(address, 2, write=True)
        except DmaError as exc:
            raise GuestMemoryError(f"guest memory 0x{address:x}+2: {exc}") from None
        if view is not None:
            store_u16(view, 0, value)
        else:
            await write_guest(dma, address, _U16.pack(value))

    async def disable_notify(self, dma: DmaPort) -> None:
        """Tell the driver not to kick while the device is busy draining the ring anyway."""
        if not self.event_idx:
            await self._write_u16(dma, self.used_addr, USED_F_NO_NOTIFY)

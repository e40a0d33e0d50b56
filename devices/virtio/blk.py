"""virtio-blk (virtio 1.2, 5.2) over a raw file or memory.

Why batches: a guest under TCG issues many small requests; the worker pops every chain that
is available, copies write payloads out of guest memory, runs all backend operations of the
batch in one worker thread (blocking file I/O never runs on the trio thread), then scatters
read data back and completes the whole batch with a single interrupt check. Reads that the
host's page cache can serve are done on the spot with ``preadv(RWF_NOWAIT)`` straight into
guest memory (see `VirtioBlk._read_nowait`); such reads at the head of the ring are served
without a batch at all, by the notify handler while the worker sleeps or by the worker before
it pops (`VirtioBlk.serve_inline`). Requests of one queue complete in ring order; queues
(`queues=N`, VIRTIO_BLK_F_MQ) run independently.

Request layout (one chain)::

    readable:  struct virtio_blk_outhdr { le32 type; le32 reserved; le64 sector; }
               [payload for OUT / DISCARD / WRITE_ZEROES segments]
    writable:  [data for IN / GET_ID]  u8 status

Durability (docs/durability.md): a request completes only after its backend call returned,
so written data was handed to the kernel (`pwrite`) and survives the server being killed.
The device offers VIRTIO_BLK_F_FLUSH and VIRTIO_BLK_F_CONFIG_WCE and follows the spec's
definition of a stable write (5.2.6.1): with FLUSH negotiated and `writeback` = 1 (the
default) the disk has a write-back cache and FLUSH is `fsync` of the backing file; without
FLUSH, or with `writeback` = 0, the disk is write-through: a batch that changed data is
fsync'd before any of its requests completes. The storage itself, with its error latching
and hole punching, is the SDK's block backend (`devices/sdk/storage.py`, shared with NVMe).
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import struct
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import trio

from devices.sdk import Apply, OptionSpec, Record, Size, Value
from devices.sdk.interface import DmaError, DmaPort, pinned_view, pinned_views
from devices.sdk.state import matches
from devices.sdk.storage import BlockBackend, FileBackend, MemoryBackend
from devices.sdk.threads import run_in_thread

from .guestmem import (
    MAX_SPAN,
    DeviceBugError,
    GuestMemoryError,
    VirtqueueError,
    bounds,
    clip,
    gather,
    scatter,
    span_view,
    write_guest,
)
from .spec import Status
from .transport import VirtioPciDevice
from .virtqueue import RING_HEADER, USED_ELEM_SIZE, Chain, Virtqueue

log = logging.getLogger(__name__)
_T = TypeVar("_T")

VIRTIO_ID_BLOCK = 2
CLASS_STORAGE_SCSI = 0x010000  # what QEMU's virtio-blk-pci reports
SECTOR = 512
DEFAULT_MEMORY_SIZE = 64 << 20
ID_BYTES = 20
#: virtio-blk's default `poll_us` (the transport's is 200). Why longer: a guest reading
#: with O_DIRECT one 1 MiB request at a time submits the next ~0.5-0.6 ms after our
#: interrupt (TCG guest), so a 200 us window never caught it and the adaptive window
#: stayed at 0; up to 1 ms it grows to cover that gap, the driver's notify (a posted
#: REGION_WRITE: a sendmsg in the vCPU, a wake-up and a message here) is skipped, and the
#: guest read 1.10x / 1.09x faster in two same-run A/Bs (devices/virtio/README.md) for
#: ~1.4-1.6x the server CPU per read. Writes (dd computes ~2 ms between them) stay
#: unpolled: the window halves on every longer sleep. Idle costs nothing either way.
BLK_POLL_US = 1000
#: most data bytes `VirtioBlk.serve_inline` reads per call (in a handler: the rest is the
#: worker's): ~0.2 ms of memcpy at most, so other clients wait no longer than for a message
INLINE_BYTES = 1 << 20
#: and at most this many requests (many small reads cost more per byte)
INLINE_CHAINS = 32
#: largest discard / write-zeroes request we advertise, in sectors
MAX_DISCARD_SECTORS = (1 << 22) - 1
MAX_DISCARD_SEGMENTS = 32


class BlkFeature(enum.IntFlag):
    SIZE_MAX = 1 << 1
    SEG_MAX = 1 << 2
    GEOMETRY = 1 << 4
    RO = 1 << 5
    BLK_SIZE = 1 << 6
    FLUSH = 1 << 9
    TOPOLOGY = 1 << 10
    CONFIG_WCE = 1 << 11
    MQ = 1 << 12
    DISCARD = 1 << 13
    WRITE_ZEROES = 1 << 14


class ReqType(enum.IntEnum):
    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    DISCARD = 11
    WRITE_ZEROES = 13


class ReqStatus(enum.IntEnum):
    OK = 0
    IOERR = 1
    UNSUPP = 2


#: requests that change the disk's contents (made stable at once on a write-through disk)
_WRITES = frozenset({ReqType.OUT, ReqType.DISCARD, ReqType.WRITE_ZEROES})
#: offset of `u8 writeback` in struct virtio_blk_config (the only writable field)
WRITEBACK_OFFSET = 32

_OUTHDR = struct.Struct("<IIQ")
_SEGMENT = struct.Struct("<QII")  # sector, num_sectors, flags
#: struct virtio_blk_config up to write_zeroes_may_unmap (+3 bytes of padding)
_CONFIG = struct.Struct("<QII HBB I BBHI BBH IIIIIB3x")


@dataclass
class _Request:
    chain: Chain
    type: int
    sector: int
    #: OUT payload: pinned views of guest memory (zero copy) or one copied buffer
    data: Sequence[bytes | bytearray | memoryview] = ()
    #: IN without a page-cache hit: pinned views of the data buffers, read into directly
    views: Sequence[memoryview] = ()
    segments: tuple[tuple[int, int, int], ...] = ()
    status: int = ReqStatus.OK
    result: bytes | bytearray = b""
    inline_written: int | None = None


class VirtioBlk(VirtioPciDevice):
    name = "virtio-blk"
    description = "virtio-blk (modern virtio-pci) over a raw file or memory"
    options = (
        OptionSpec("backing", str, "", "raw image file (created if missing); empty: memory",
                   aliases=("path",)),
        OptionSpec("size", Size, 0, "disk size (grows the file; 0: the file's size, or 64M "
                   "in memory)"),
        OptionSpec("readonly", bool, False, "offer VIRTIO_BLK_F_RO and refuse writes"),
        OptionSpec("queues", int, 1, "number of request queues (VIRTIO_BLK_F_MQ when > 1)"),
        OptionSpec("queue_size", int, 256, "maximum descriptors per queue"),
        OptionSpec("poll_us", int, BLK_POLL_US, "after a request, poll the ring up to this "
                   "long (us) with notifications off before sleeping (0: never poll)"),
        OptionSpec("serial", str, "", "GET_ID answer (at most 20 bytes)"),
    )
    virtio_id = VIRTIO_ID_BLOCK
    class_code = CLASS_STORAGE_SCSI
    #: transport and queues (`state.py`) plus `save_device_state` (docs/device-state.md)
    state_version = 1

    def __init__(self, backing: str = "", size: int = 0, readonly: bool = False,
                 queues: int = 1, queue_size: int = 256, serial: str = "",
                 poll_us: int = BLK_POLL_US, *, path: str = "") -> None:
        # `path`: the option's old name, still accepted from Python callers
        path = backing or path
        if size < 0 or size % SECTOR:
            raise ValueError(f"size must be a multiple of {SECTOR}")
        if len(serial.encode()) > ID_BYTES:
            raise ValueError(f"serial is at most {ID_BYTES} bytes")
        self.backend: BlockBackend
        if path:
            try:
                # fsync, not fdatasync, on FLUSH: what docs/durability.md promises here
                self.backend = FileBackend(path, size, readonly, flush_metadata=True)
            except OSError as exc:
                raise ValueError(f"cannot open {path}: {exc.strerror}") from None
            if self.backend.size < SECTOR:
                self.backend.close()
                raise ValueError(f"{path}: a disk needs at least {SECTOR} bytes (set size=)")
        else:
            self.backend = MemoryBackend(size or DEFAULT_MEMORY_SIZE, readonly)
        self.serial = serial.encode()
        #: the driver's `writeback` choice (VIRTIO_BLK_F_CONFIG_WCE); 1 = write-back
        self.wce = 1
        super().__init__(num_queues=queues, queue_size=queue_size, poll_us=poll_us)

    @property
    def capacity(self) -> int:
        """Disk size in 512-byte sectors."""
        return self.backend.size // SECTOR

    def device_features(self) -> int:
        f = (BlkFeature.SEG_MAX | BlkFeature.BLK_SIZE | BlkFeature.FLUSH
             | BlkFeature.CONFIG_WCE | BlkFeature.DISCARD | BlkFeature.WRITE_ZEROES)
        if len(self.queues) > 1:
            f |= BlkFeature.MQ
        if self.backend.readonly:
            f |= BlkFeature.RO
        return int(f)

    def read_device_config(self, offset: int, count: int) -> bytes:
        cfg = _CONFIG.pack(
            self.capacity, 0, self.queues[0].max_size - 2,  # capacity, size_max, seg_max
            0, 0, 0,                                         # geometry
            SECTOR,                                          # blk_size
            0, 0, 1, 0,                                      # topology
            self.writeback, 0, len(self.queues),             # writeback, unused, num_queues
            MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, 1,    # discard
            MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, 1,    # write zeroes, may unmap
        )
        chunk = cfg[offset : offset + count]
        return chunk + bytes(count - len(chunk))

    @property
    def writeback(self) -> int:
        """The cache mode in force: 1 (write-back, FLUSH needed) only with FLUSH negotiated
        (5.2.5.2: without it `writeback` must read 0) and not switched off by the driver."""
        return self.wce if self.negotiated(BlkFeature.FLUSH) else 0

    def write_device_config(self, offset: int, data: bytes) -> None:
        """`writeback` is writable when CONFIG_WCE was negotiated (the driver's cache_type).
        Switching to write-through flushes nothing by itself: the spec promises stability
        only for writes submitted and completed while `writeback` was 0."""
        if (offset == WRITEBACK_OFFSET and len(data) == 1 and data[0] in (0, 1)
                and self.negotiated(BlkFeature.CONFIG_WCE)):
            self.wce = data[0]
        else:
            log.debug("%s: config write at %d (%d bytes) ignored", self.name, offset, len(data))

    def on_virtio_reset(self) -> None:
        self.wce = 1

    # ------------------------------------------------------------------ device state

    async def quiesce(self) -> None:
        """Requests in flight complete (workers stop between batches), then the backing
        file is flushed, so whoever loads the state finds every completed write stable.
        The flush also runs when the engine gives up waiting (cancels us after its grace):
        the writes already completed to the guest must be stable all the same."""
        try:
            await super().quiesce()
        finally:
            with trio.CancelScope(shield=True):
                if self.backend.threaded:
                    await trio.to_thread.run_sync(self.backend.flush)
                else:
                    self.backend.flush()

    def save_device_state(self) -> dict[str, Value]:
        return {"size": self.backend.size, "readonly": self.backend.readonly,
                "serial": self.serial, "wce": self.wce}

    def prepare_device_state(self, rec: Record) -> Apply:
        matches(rec, "size", self.backend.size)
        matches(rec, "readonly", self.backend.readonly)
        matches(rec, "serial", self.serial)
        wce = rec.uint_in("wce", 0, 1)

        def apply() -> None:
            self.wce = wce

        return apply

    def close(self) -> None:
        self.backend.close()
        super().close()

    # ------------------------------------------------------------------ requests

    async def process_batch(self, queue: Virtqueue,
                            chains: list[Chain]) -> list[tuple[int, int]]:
        dma = self.dma
        with contextlib.ExitStack() as pins:
            # Guest buffers stay pinned until the batch is done: the worker thread writes
            # from them and reads into them directly. A 1 MiB bytearray per request cost
            # more than the file write itself (its page faults: ~360 us against ~600 us).
            reqs = [await self._parse(queue, chain, pins) for chain in chains]
            write_through = not self.writeback
            failure: OSError | None = None
            if self.backend.threaded:
                fast = 0
                while fast < len(reqs) and self._read_nowait(reqs[fast]):
                    fast += 1
                if fast < len(reqs):
                    for req in reqs[fast:]:
                        if req.type == ReqType.IN:
                            req.views = _pin(pins, dma, _without_last_byte(req.chain.writable),
                                             write=True) or ()
                    failure = await run_in_thread(functools.partial(
                        self._execute, reqs[fast:], write_through))
                    # The thread cannot be interrupted; a reset that arrived meanwhile ends
                    # us here, before anything is written to rings the driver may have taken
                    # back.
                    await trio.lowlevel.checkpoint_if_cancelled()
            else:
                failure = self._execute(reqs, write_through)
        if failure is not None and self.ctx is not None:
            # EIO from the backing file fails the device, not only the request (docs/
            # operations.md, "Health"); the request still gets its IOERR status.
            self.ctx.report_failure(f"{self.name}: backing file error: {failure}")
        done: list[tuple[int, int]] = []
        for req in reqs:
            written = 0
            data_segs = _without_last_byte(req.chain.writable)
            if req.inline_written is not None:
                written = req.inline_written
            elif req.result:
                written = await scatter(dma, data_segs, req.result)
            addr, length = req.chain.writable[-1]
            await write_guest(dma, addr + length - 1, bytes([req.status]))
            done.append((req.chain.head, written + 1))
        return done

    async def _parse(self, queue: Virtqueue, chain: Chain,
                     pins: contextlib.ExitStack) -> _Request:
        """One request's header and payload (pinned in `pins` when it can be)."""
        dma = self.dma
        if chain.readable_len < _OUTHDR.size or chain.writable_len < 1:
            raise VirtqueueError(f"queue {queue.index}: request {chain.head} without a "
                                 "header or status byte")
        rtype, _, sector = _OUTHDR.unpack(await gather(dma, chain.readable,
                                                       limit=_OUTHDR.size))
        req = _Request(chain, rtype, sector)
        if rtype == ReqType.OUT:
            views = _pin(pins, dma, clip(chain.readable, _OUTHDR.size, None))
            req.data = views if views is not None else [
                await gather(dma, chain.readable, skip=_OUTHDR.size)]
        elif rtype in (ReqType.DISCARD, ReqType.WRITE_ZEROES):
            raw = await gather(dma, chain.readable, skip=_OUTHDR.size)
            req.segments = tuple(_SEGMENT.iter_unpack(raw[: len(raw) // 16 * 16]))
        return req

    def serve_inline(self, queue: Virtqueue) -> bool | None:
        """Serve page-cache reads in the notify handler while the queue's worker sleeps,
        and in the worker before it pops a batch (a request found while polling).

        Why: a notify used to wake the worker task, and the read started ~300 us after the
        notify arrived (the session's path, a scheduler round, the worker's pop and parse);
        here the chains are popped, read with ``preadv(RWF_NOWAIT)`` straight into guest
        memory, completed and interrupted before the handler returns. Everything is
        synchronous (mmap'd rings and buffers only) and bounded (`INLINE_BYTES`,
        `INLINE_CHAINS`), so the access is still answered before anything waits and other
        clients are not held up.
        The first request that is not a cached read, and all after it, are given back for
        the worker (woken by the caller as before), which also keeps the polling window
        and re-arms notifications. Nothing is held when the handler returns, so reset,
        quiesce and device state see no difference. A ring error is left to the worker.
        In the worker it replaces `process_batch`'s per-batch objects (requests, pins,
        awaits) for these reads. None: the ring was seen empty (a polling worker skips its
        own look).
        """
        if self.ctx is None or not self.status & Status.DRIVER_OK:
            return False
        dma = self.ctx.dma
        start = queue.last_avail_idx
        try:
            used = dma.view(queue.used_addr, RING_HEADER + USED_ELEM_SIZE * queue.size + 2,
                            write=True)
            rings = queue._mapped_rings(dma)
        except (DmaError, GuestMemoryError, VirtqueueError):
            return False
        if used is None or rings is None:
            return False
        if not rings[2]:
            return None  # nothing available: a polling worker need not pop either
        avail, desc, pending = rings
        done: list[tuple[int, int]] = []
        budget = INLINE_BYTES
        at = start
        try:
            while pending and budget > 0 and len(done) < INLINE_CHAINS:
                at = queue.last_avail_idx
                chain = queue._take(avail, desc, dma)
                pending -= 1
                n = self._read_inline(chain, dma)
                if n is None:
                    queue.rewind(at)
                    break
                done.append((chain.head, n + 1))
                budget -= n
        except (DmaError, GuestMemoryError, VirtqueueError, OSError):
            # the worker meets the same error and answers it (retry, NEEDS_RESET, IOERR)
            queue.rewind(at)
        if not done:
            return False
        _now(queue.push_many(dma, done))
        if _now(queue.should_interrupt(dma)):
            self.notify_queue(queue)
        return True

    def _read_inline(self, chain: Chain, dma: DmaPort) -> int | None:
        """A cached read of `chain` done, its status byte OK; the data bytes, or None (not
        a read, not cached, or not mmap'd: then nothing was written)."""
        first = chain.readable[0] if chain.readable else (0, 0)
        if first[1] < _OUTHDR.size or not chain.writable:
            return None
        hdr = dma.view(first[0], _OUTHDR.size)
        addr, length = chain.writable[-1]
        status = dma.view(addr + length - 1, 1, write=True)
        if hdr is None or status is None:
            return None
        rtype, _, sector = _OUTHDR.unpack(hdr)
        req = _Request(chain, rtype, sector)
        if not self._read_nowait(req) or req.inline_written is None:
            return None
        status[0] = ReqStatus.OK
        return req.inline_written

    def _read_nowait(self, req: _Request) -> bool:
        """Serve a read from the page cache straight into guest memory, without blocking.

        Why: most reads of a busy disk hit the host's page cache, and a hop to a worker
        thread costs more than the copy. ``preadv(RWF_NOWAIT)`` either completes from the
        cache or fails with EAGAIN, so the trio thread never waits for the disk; the
        guest-memory views are used synchronously, before any checkpoint. Anything else
        (a miss, a short read, a write, a flush) goes to the worker thread.
        """
        if req.type != ReqType.IN:
            return False
        count = req.chain.writable_len - 1
        if count <= 0 or count % SECTOR or not self._in_range(req.sector, count):
            return False
        pieces = _without_last_byte(req.chain.writable)
        assert self.ctx is not None
        span = span_view(self.ctx.dma, pieces, write=True)
        if span is None:
            return False
        base, view = span
        buffers = [view[a - base : a - base + n] for a, n in pieces]
        if self.backend.readinto_nowait(req.sector * SECTOR, buffers) != count:
            return False  # partly cached: the thread redoes the whole read
        req.inline_written = count
        return True

    def _execute(self, reqs: list[_Request], write_through: bool = False) -> OSError | None:
        """Run the backend side of a batch, in order (a thread for file backends).

        On a write-through disk one fsync after the batch makes its writes stable before
        any of them completes (one per batch, not per request: the guest sees the same
        thing, and a busy queue pays for one sync); if it fails, so do they. Returns the
        first backend error, for the caller to report on the trio thread."""
        failure: OSError | None = None
        for req in reqs:
            try:
                self._execute_one(req)
            except OSError as exc:
                failure = failure or exc
                log.warning("%s: request type %d sector %d failed: %s", self.name, req.type,
                            req.sector, exc)
                req.status = ReqStatus.IOERR
                req.result = b""
        if not write_through:
            return failure
        written = [r for r in reqs if r.type in _WRITES and r.status == ReqStatus.OK]
        if not written:
            return failure
        try:
            self.backend.flush()
        except OSError as exc:
            log.warning("%s: write-through flush failed: %s", self.name, exc)
            failure = failure or exc
            for req in written:
                req.status = ReqStatus.IOERR
        return failure

    def _in_range(self, sector: int, nbytes: int) -> bool:
        return sector >= 0 and sector * SECTOR + nbytes <= self.backend.size

    def _execute_one(self, req: _Request) -> None:
        b = self.backend
        if req.type == ReqType.IN:
            count = req.chain.writable_len - 1
            if count % SECTOR or not self._in_range(req.sector, count):
                req.status = ReqStatus.IOERR
                return
            if req.views:
                b.readinto(req.sector * SECTOR, req.views)
                req.inline_written = count
                return
            data = bytearray(count)
            b.readinto(req.sector * SECTOR, [memoryview(data)])
            req.result = data
        elif req.type == ReqType.OUT:
            nbytes = sum(map(len, req.data))
            if b.readonly or nbytes % SECTOR or not self._in_range(req.sector, nbytes):
                req.status = ReqStatus.IOERR
                return
            b.write(req.sector * SECTOR, req.data)
        elif req.type == ReqType.FLUSH:
            b.flush()
        elif req.type == ReqType.GET_ID:
            want = min(ID_BYTES, req.chain.writable_len - 1)
            req.result = (self.serial + bytes(ID_BYTES))[:want]
        elif req.type in (ReqType.DISCARD, ReqType.WRITE_ZEROES):
            if b.readonly or not req.segments or len(req.segments) > MAX_DISCARD_SEGMENTS:
                req.status = ReqStatus.IOERR
                return
            for sector, num, _flags in req.segments:
                if num > MAX_DISCARD_SECTORS or not self._in_range(sector, num * SECTOR):
                    req.status = ReqStatus.IOERR
                    return
            # Deallocating satisfies both: holes read back as zeros, and `unmap` (flags
            # bit 0) only permits it, while VIRTIO_BLK_F_WRITE_ZEROES may_unmap = 1 says so.
            for sector, num, _flags in req.segments:
                b.deallocate(sector * SECTOR, num * SECTOR)
        else:
            req.status = ReqStatus.UNSUPP




def _pin(pins: contextlib.ExitStack, dma: DmaPort, pieces: list[tuple[int, int]], *,
         write: bool = False) -> list[memoryview] | None:
    """Zero-copy views of `pieces` valid until `pins` closes, or None (message mode, or an
    engine that cannot pin): the caller copies then."""
    if not pieces:
        return None
    try:
        if not write:
            # One pin of the pieces' span (guest RAM is normally one window), sliced:
            # pinning 256 pages one by one cost about as much as copying them. Writes
            # into the guest pin per piece, so dirty logging marks only those pages.
            lo, hi = bounds(pieces)
            if hi - lo <= MAX_SPAN:
                span = pins.enter_context(pinned_view(dma, lo, hi - lo))
                if span is not None:
                    views = [span[a - lo : a - lo + n] for a, n in pieces]
                    # released before the pin goes (LIFO), or the window's mmap could
                    # not be closed while the request objects still hold them
                    pins.callback(_release, views)
                    return views
        return pins.enter_context(pinned_views(dma, pieces, write=write))
    except DmaError as exc:
        raise GuestMemoryError(f"guest memory of a request: {exc}") from None


def _now(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run a ring coroutine that cannot suspend here (every ring is mmap'd, checked first:
    `Virtqueue.push_many` / `should_interrupt` then only touch views)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return cast(_T, done.value)
    coro.close()
    raise DeviceBugError("a ring access waited in the notify handler")


def _release(views: list[memoryview]) -> None:
    for v in views:
        v.release()


def _without_last_byte(segments: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The writable data segments of a request: everything but the final status byte."""
    if not segments:
        return []
    *head, (addr, length) = segments
    return [*head, (addr, length - 1)] if length > 1 else list(head)

"""virtio-blk (virtio 1.2, 5.2) over a raw file or memory.

Why batches: a guest under TCG issues many small requests; the worker pops every chain that
is available, copies write payloads out of guest memory, runs all backend operations of the
batch in one worker thread (blocking file I/O never runs on the trio thread), then scatters
read data back and completes the whole batch with a single interrupt check. Reads that the
host's page cache can serve are done on the spot with ``preadv(RWF_NOWAIT)`` straight into
guest memory. Cached reads at the head of the ring are served without a batch at all, and
writes there get their thread started, by the notify handler while the worker sleeps or by
the worker before it pops (`blkinline`, which says what keeps that safe). Requests of one
queue complete in ring order; queues (`queues=N`, VIRTIO_BLK_F_MQ) run independently.

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

import trio

from devices.sdk import Apply, OptionSpec, Record, Size, Value
from devices.sdk.state import matches
from devices.sdk.storage import FileBackend, MemoryBackend
from devices.sdk.threads import run_in_thread

from .blkinline import INLINE_BYTES, INLINE_CHAINS, INLINE_WRITE_BYTES, InlineBlk
from .blkreq import (
    OUTHDR,
    SECTOR,
    WRITES,
    ReqStatus,
    ReqType,
    Request,
    pin,
    without_last_byte,
)
from .guestmem import VirtqueueError, clip, gather, scatter, write_guest
from .virtqueue import Chain, Virtqueue

log = logging.getLogger(__name__)

VIRTIO_ID_BLOCK = 2
CLASS_STORAGE_SCSI = 0x010000  # what QEMU's virtio-blk-pci reports
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


#: offset of `u8 writeback` in struct virtio_blk_config (the only writable field)
WRITEBACK_OFFSET = 32

_SEGMENT = struct.Struct("<QII")  # sector, num_sectors, flags
#: struct virtio_blk_config up to write_zeroes_may_unmap (+3 bytes of padding)
_CONFIG = struct.Struct("<QII HBB I BBHI BBH IIIIIB3x")


class VirtioBlk(InlineBlk):
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
                            req.views = pin(pins, dma, without_last_byte(req.chain.writable),
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
            data_segs = without_last_byte(req.chain.writable)
            if req.inline_written is not None:
                written = req.inline_written
            elif req.result:
                written = await scatter(dma, data_segs, req.result)
            addr, length = req.chain.writable[-1]
            await write_guest(dma, addr + length - 1, bytes([req.status]))
            done.append((req.chain.head, written + 1))
        return done

    async def _parse(self, queue: Virtqueue, chain: Chain,
                     pins: contextlib.ExitStack) -> Request:
        """One request's header and payload (pinned in `pins` when it can be)."""
        dma = self.dma
        if chain.readable_len < OUTHDR.size or chain.writable_len < 1:
            raise VirtqueueError(f"queue {queue.index}: request {chain.head} without a "
                                 "header or status byte")
        rtype, _, sector = OUTHDR.unpack(await gather(dma, chain.readable,
                                                       limit=OUTHDR.size))
        req = Request(chain, rtype, sector)
        if rtype == ReqType.OUT:
            views = pin(pins, dma, clip(chain.readable, OUTHDR.size, None))
            req.data = views if views is not None else [
                await gather(dma, chain.readable, skip=OUTHDR.size)]
        elif rtype in (ReqType.DISCARD, ReqType.WRITE_ZEROES):
            raw = await gather(dma, chain.readable, skip=OUTHDR.size)
            req.segments = tuple(_SEGMENT.iter_unpack(raw[: len(raw) // 16 * 16]))
        return req

    def _execute(self, reqs: list[Request], write_through: bool = False) -> OSError | None:
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
        written = [r for r in reqs if r.type in WRITES and r.status == ReqStatus.OK]
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

    def _execute_one(self, req: Request) -> None:
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


__all__ = ["INLINE_BYTES", "INLINE_CHAINS", "INLINE_WRITE_BYTES", "SECTOR", "BlkFeature",
           "ReqStatus", "ReqType", "VirtioBlk"]

"""The NVM I/O command set (NVMe 1.4, 6): Read, Write, Write Zeroes, Flush, Dataset
Management.

Each I/O command runs as its own task (commands of all queues overlap; file I/O goes to
worker threads), tracked in `_inflight` so a controller reset can cancel them and a queue
deletion or shutdown can wait for them.

Durability (docs/durability.md): a completion is posted only after the backend call it
reports on has returned, i.e. written data was handed to the kernel (`pwritev`). Identify
reports a volatile write cache (VWC present), so Flush (`fdatasync`) is what makes data
stable; a FUA write or Write Zeroes, or any data-changing command while the host has turned
the Volatile Write Cache feature off, is flushed before it completes.

Data path: PRP segments are pinned in one call (`pinned_views`) and handed to the backend as
zero-copy views of guest RAM; reads first try the page cache without blocking.

The register handler's path (a doorbell served without a task: cached reads on the spot,
writes started in their thread) is `doorbell_io`, this class's base.
"""

from __future__ import annotations

import logging
import struct

import trio

from devices.sdk.interface import DmaError, pinned_views
from devices.sdk.storage import consume

from .command import BROADCAST_NSID, Command, CommandError, Namespace, Outcome
from .doorbell_io import FUA, DoorbellIo, _Started
from .prp import PrpError, Segments
from .queue import SubmissionQueue
from .spec import DSM_ATTR_DEALLOCATE, DSM_RANGE_SIZE, FeatureId, IoOpcode, Status

log = logging.getLogger(__name__)

__all__ = ["IoCommands"]


class IoCommands(DoorbellIo):
    """The I/O queues' commands, on the worker's state."""

    def _start_io(self, sq: SubmissionQueue, cmd: Command, token: int,
                  segs: Segments | None = None) -> None:
        """Run one I/O command in its own task; `token` is its `carried` entry, `segs` its
        data segments when `_io_now` already walked its PRPs."""
        assert self._nursery is not None
        scope = trio.CancelScope()
        self._inflight[scope] = sq.qid
        self._nursery.start_soon(self._io_task, sq, cmd, scope, token, segs)

    # ------------------------------------------------------------------ in a task

    async def _io_task(self, sq: SubmissionQueue, cmd: Command, scope: trio.CancelScope,
                       token: int, segs: Segments | None = None,
                       started: _Started | None = None) -> None:
        item = self.carried.get(token)
        try:
            with scope:
                try:
                    if started is not None:
                        # (started by the hand-back: the write is back, not posted)
                        if scope.cancel_called:
                            return  # reset: aborted without a completion
                        status, result = await self._started_outcome(started)
                    elif item is not None and item.outcome is not None:
                        status, result = item.outcome  # executed before; post it only
                    else:
                        status, result = await self._io(cmd, segs)
                except CommandError as exc:
                    status, result = exc.status, 0
                except PrpError as exc:
                    status, result = exc.status, 0
                except DmaError as exc:
                    log.warning("nvme: I/O %#x cid %d: DMA failed: %s", cmd.opcode, cmd.cid, exc)
                    status, result = Status.DATA_TRANSFER_ERROR, 0
                except OSError as exc:
                    log.error("nvme: I/O %#x cid %d: backend error: %s", cmd.opcode, cmd.cid, exc)
                    self._backend_failed(exc)
                    status = (Status.UNRECOVERED_READ_ERROR if cmd.opcode == IoOpcode.READ
                              else Status.WRITE_FAULT)
                    result = 0
                if scope.cancel_called:
                    return  # controller reset: the command is aborted without a completion
                if item is not None:
                    item.outcome = (status, result)
                await self._complete_or_log(sq, cmd.cid, status, result, item)
                self.carried.pop(token, None)
        finally:
            if scope.cancel_called:
                self.carried.pop(token, None)
            self._inflight_done(scope)

    async def _started_outcome(self, started: _Started) -> Outcome:
        """What a `_write_now` write's task reports when `_write_done` did not post it:
        the backend's error, or success once flushed if the write must be stable."""
        item = self.carried.get(started.token)
        if item is not None and item.outcome is not None:
            return item.outcome  # posted by neither: no room in the CQ; post it only
        if started.error is not None:
            raise started.error  # OSError: reported by the caller
        self.smart.write_commands += 1
        self.smart.bytes_written += started.length
        await self._stable_if_asked(self._namespace(started.cmd.nsid),
                                    fua=bool(started.cmd.cdw12 & FUA))
        return Status.SUCCESS, 0


    async def _io(self, cmd: Command, segs: Segments | None = None) -> Outcome:
        op = cmd.opcode
        if op == IoOpcode.FLUSH:
            if cmd.nsid == BROADCAST_NSID:
                await self._flush_all()
            else:
                ns = self._namespace(cmd.nsid)
                await self._backend(ns, ns.backend.flush)
            return Status.SUCCESS, 0
        ns = self._namespace(cmd.nsid)
        slba = cmd.cdw10 | (cmd.cdw11 << 32)
        nlb = (cmd.cdw12 & 0xFFFF) + 1
        if op in (IoOpcode.READ, IoOpcode.WRITE):
            ns, offset, length = self._rw_range(cmd)
            if segs is None:
                segs = await self._segments(cmd, length)
            if op == IoOpcode.READ:
                await self._read_to_guest(ns, offset, segs)
                self.smart.read_commands += 1
                self.smart.bytes_read += length
            else:
                await self._write_from_guest(ns, offset, segs)
                self.smart.write_commands += 1
                self.smart.bytes_written += length
                await self._stable_if_asked(ns, fua=bool(cmd.cdw12 & FUA))
            return Status.SUCCESS, 0
        if op == IoOpcode.WRITE_ZEROES:
            offset, length = self._range(ns, slba, nlb)
            await self._backend(ns, ns.backend.deallocate, offset, length)
            await self._stable_if_asked(ns, fua=bool(cmd.cdw12 & FUA))
            return Status.SUCCESS, 0
        if op == IoOpcode.DATASET_MANAGEMENT:
            nr = (cmd.cdw10 & 0xFF) + 1
            if not cmd.cdw11 & DSM_ATTR_DEALLOCATE:
                return Status.SUCCESS, 0  # attributes are hints
            raw = await self._from_guest(cmd, nr * DSM_RANGE_SIZE)
            ranges = []
            for i in range(nr):
                _attrs, count, start = struct.unpack_from("<IIQ", raw, i * DSM_RANGE_SIZE)
                if count:
                    ranges.append(self._range(ns, start, count))
            for offset, length in ranges:
                await self._backend(ns, ns.backend.deallocate, offset, length)
            if ranges:
                await self._stable_if_asked(ns, fua=False)
            return Status.SUCCESS, 0
        raise CommandError(Status.INVALID_OPCODE, f"I/O opcode {op:#x}")

    async def _stable_if_asked(self, ns: Namespace, *, fua: bool) -> None:
        """Flush after a data-changing command that must be stable when it completes: it
        set Force Unit Access, or the host turned the volatile write cache off (a host
        may then rely on completions alone and never send a Flush)."""
        if fua or not self.features[FeatureId.VOLATILE_WRITE_CACHE]:
            await self._backend(ns, ns.backend.flush)

    async def _read_to_guest(self, ns: Namespace, offset: int, segs: Segments) -> None:
        dma = self.dma
        with pinned_views(dma, segs, write=True) as views:
            if views is not None:
                await self._read_backend(ns, offset, views)
                return
        buf = bytearray(sum(n for _, n in segs))
        await self._read_backend(ns, offset, [memoryview(buf)])
        pos = 0
        for addr, n in segs:
            await dma.write(addr, memoryview(buf)[pos : pos + n])
            pos += n

    async def _read_backend(self, ns: Namespace, offset: int, bufs: list[memoryview]) -> None:
        """Cached data inline (non-blocking), the rest in a worker thread."""
        done = ns.backend.readinto_nowait(offset, bufs)
        if done < sum(len(b) for b in bufs):
            await self._backend(ns, ns.backend.readinto, offset + done, consume(bufs, done))

    async def _write_from_guest(self, ns: Namespace, offset: int, segs: Segments) -> None:
        dma = self.dma
        with pinned_views(dma, segs) as views:
            if views is not None:
                await self._backend(ns, ns.backend.write, offset, views)
                return
        chunks: list[bytes] = []
        for addr, n in segs:
            chunks.append(await dma.read(addr, n))
        await self._backend(ns, ns.backend.write, offset, chunks)

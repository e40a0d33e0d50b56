"""The worker's state and plumbing: queues, features, doorbells, completions, guest memory.

Why a base of its own: the controller state machine (`worker`), the admin command set
(`admin`) and the NVM I/O commands (`io_commands`) all work on the same queues and
features; this class holds that state and the few operations they share (posting a
completion, reading guest memory, calling a backend), so each command set reads on its own.

The synchronous entry points (`sq_doorbell`, `cq_doorbell`, `request_*`, `kick`,
`update_intx`) are called from register handlers: they only record and wake the task,
because QEMU holds its big lock while a vCPU waits for our reply to the register access.

Shadow doorbells (Doorbell Buffer Config): for I/O queues the host writes tails and heads
to a page of guest memory and rings the MMIO doorbell only when it passes the event index
we publish. The worker reads the shadow values every time it looks at a queue, publishes
"seen up to here" as the event index, and re-reads once after publishing so a submission
racing with the publish is never lost. MMIO values of shadowed queues are only wake-ups
(a late MMIO write may carry an older value than the shadow already showed).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import struct
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Protocol

import trio

from devices.sdk.fence import full_fence
from devices.sdk.interface import DmaError, DmaPort
from devices.sdk.threads import run_in_thread

from . import identify as idf
from .command import Command, CommandError, Namespace
from .polling import SqPoller
from .port import ControllerPort
from .prp import Segments, walk_prps
from .queue import CompletionQueue, DoorbellError, SubmissionQueue
from .spec import CQE, DNR, FeatureId, Status

log = logging.getLogger(__name__)

#: a CQE's first three dwords (`spec.CQE` without the last, stored on its own)
_CQE_HEAD = struct.Struct("<IIHH")

#: statuses a retry might fix (everything else completes with Do Not Retry)
_RETRYABLE = frozenset({Status.SUCCESS, Status.ABORTED_BY_REQUEST, Status.ABORTED_SQ_DELETION,
                        Status.NAMESPACE_NOT_READY})


#: backend calls of one controller running in threads at once
IO_THREADS = 8




class Cancellable(Protocol):
    """What a reset needs of a command in flight (`_inflight`): a task's `trio.CancelScope`,
    or a write whose thread the register handler started (`doorbell_io._Started`), which
    has no task to cancel and so no scope (building one per write cost more than the rest
    of its hand-back)."""

    def cancel(self) -> None: ...

    @property
    def cancel_called(self) -> bool: ...


@dataclass
class Carried:
    """A command fetched from its SQ and not yet completed: kept on the worker, not in its
    task, so a command whose task the engine cancels (quiesce past its grace, disconnect)
    is not lost but runs again, or only posts its completion once `outcome` is known,
    when the worker next runs (also after a state load: it is part of the state)."""

    sqid: int
    cmd: Command
    #: (status, DW0) once the command has executed
    outcome: tuple[int, int] | None = None
    #: (CQ entry address, phase) once a CQ slot is reserved for it: a completion whose
    #: DMA write was cancelled is written to that slot again, never to a new one (the
    #: host would wait at the old slot forever)
    slot: tuple[int, int] | None = None


def default_features(max_queues: int) -> dict[int, int]:
    q = max_queues - 1
    return {
        FeatureId.ARBITRATION: 0,
        FeatureId.POWER_MANAGEMENT: 0,
        FeatureId.TEMPERATURE_THRESHOLD: idf.WARNING_TEMP_K,
        FeatureId.ERROR_RECOVERY: 0,
        FeatureId.VOLATILE_WRITE_CACHE: 1,
        FeatureId.NUMBER_OF_QUEUES: q | (q << 16),
        FeatureId.INTERRUPT_COALESCING: 0,
        FeatureId.INTERRUPT_VECTOR_CONFIG: 0,
        FeatureId.WRITE_ATOMICITY: 0,
        FeatureId.ASYNC_EVENT_CONFIG: 0,
    }


class WorkerCore:
    """State and shared operations of one controller's worker (see the module docstring)."""

    def __init__(self, dev: ControllerPort, namespaces: dict[int, Namespace],
                 info: idf.ControllerInfo, *, max_queues: int, stride: int,
                 poll_us: int = 0) -> None:
        self.dev = dev
        self.namespaces = namespaces
        self.info = info
        self.max_queues = max_queues
        self.stride = stride
        self.max_transfer = (1 << info.mdts) * 4096 if info.mdts else 1 << 30
        self.smart = idf.SmartCounters()
        self.running = False
        #: quiesce: no new commands are fetched (docs/device-state.md)
        self.quiescing = False
        #: the worker task is inside `_step` (not parked waiting for a wake-up)
        self.stepping = False
        #: a loaded state wants the worker started once a client is attached
        self.restart_on_attach = False
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        #: vectors to raise at the end of a batch of completions (see `_notify`)
        self._irq_batch: set[int] | None = None
        #: I/O commands fetched and MMIO doorbell writes of I/O queues, since power-on (in
        #: the shutdown log line: with shadow doorbells the host rings far less than twice
        #: per command); statistics only, not device state
        self.io_fetched = 0
        self.io_mmio_doorbells = 0
        #: backend calls in threads at once (a guest with deep queues must not get a thread
        #: per command; trio.to_thread's limiter is 40 for the whole process)
        self._threads = trio.Semaphore(IO_THREADS)
        #: shadow SQ tails polled after a doorbell-served batch (not device state)
        self.poller = SqPoller(self, poll_us / 1e6)
        #: taken around every CQ slot reservation and CQ replacement: a write's thread
        #: posts its own completion (`doorbell_io.DoorbellIo._post_from_thread`) while
        #: the trio thread may post others to the same CQ; never held across an await
        self._cq_lock = threading.Lock()
        self.power_on()

    # ------------------------------------------------------------------ state

    def power_on(self) -> None:
        """Power-on / function-level reset state (tasks are already gone)."""
        self.want_enable = False
        self.reset_pending = False
        self.shutdown_pending = False
        self.enabled = False
        self.quiescing = False
        self.restart_on_attach = False
        self._controller_state()

    def _controller_state(self) -> None:
        self.poller.forget()
        self.sqs: dict[int, SubmissionQueue] = {}
        with self._cq_lock:  # a write's thread posts only to a CQ still in `cqs`
            self.cqs: dict[int, CompletionQueue] = {}
        self.page_size = 4096
        self.features = default_features(self.max_queues)
        self.queues_granted = self.max_queues
        self.aers: list[int] = []
        self.dbbuf: tuple[int, int] | None = None
        self._inflight: dict[Cancellable, int] = {}
        #: set when an `_inflight` entry goes; made only by a waiter (`_wait_inflight`),
        #: so a command's end costs no new Event while nobody waits (nearly always)
        self._inflight_changed: trio.Event | None = None
        self._cq_space: dict[int, trio.Event] = {}
        self.carried: dict[int, Carried] = {}
        #: tokens of `carried` writes whose backend call is still in its thread
        #: (`doorbell_io.DoorbellIo._write_now`): not run again by `_rerun_carried` meanwhile
        self.writing: set[int] = set()
        #: `carried` holds commands of tasks that are gone (set at worker start and load)
        self.rerun_carried = False
        self.next_token = 0

    def carry(self, sqid: int, cmd: Command) -> int:
        """Record a fetched command until its completion is posted; returns its token."""
        self.next_token += 1
        self.carried[self.next_token] = Carried(sqid, cmd)
        if sqid:
            self.io_fetched += 1
        return self.next_token

    # ------------------------------------------------------------------ quiesce

    async def quiesce(self) -> None:
        """Stop fetching, let the worker park and every command in flight complete, then
        flush the backends. Polled (1 ms): quiesce is rare, and the worker and its I/O
        tasks each end on their own schedule."""
        self.quiescing = True
        self.poller.stop()
        try:
            while self.stepping or self._inflight:
                await trio.sleep(0.001)
        finally:
            # also when the engine gives up waiting (cancels us after its grace): what was
            # completed to the guest must be stable before the state moves elsewhere
            with trio.CancelScope(shield=True):
                await self._flush_all()

    def resume(self) -> None:
        self.quiescing = False
        self.kick()

    # ------------------------------------------------------------------ register side (sync)

    def request_enable(self) -> None:
        self.want_enable = True
        self.kick()

    def request_disable(self) -> None:
        self.want_enable = False
        self.reset_pending = True
        self.kick()

    def request_shutdown(self) -> None:
        self.shutdown_pending = True
        self.kick()

    def sq_doorbell(self, qid: int, value: int) -> None:
        self.io_mmio_doorbells += qid != 0
        sq = self.sqs.get(qid)
        if sq is None or not self.enabled:
            log.debug("nvme: doorbell for SQ %d that does not exist, ignored", qid)
            return
        if sq.shadow_db is None:
            try:
                sq.set_tail(value)
            except DoorbellError as exc:
                log.warning("nvme: %s; ignored", exc)
                return
        else:
            self.poller.mmio_doorbell(sq)
        if qid and self.can_fetch_now() and self._fetch_now(sq):
            return
        self.kick()

    def can_fetch_now(self) -> bool:
        """An I/O doorbell may be served right in the register handler (`_fetch_now`):
        the worker task is alive and parked, the controller is running and nothing it must
        do first (reset, shutdown, quiesce, commands of a cancelled task) is pending. Why
        bother: each trio scheduling round between the doorbell and the completion cost
        tens of µs of the guest's I/O latency."""
        return (self.running and self._nursery is not None and not self.stepping
                and self.enabled and not self.quiescing and not self.reset_pending
                and not self.shutdown_pending and not self.rerun_carried
                and self.dev.ctx is not None)

    def _fetch_now(self, sq: SubmissionQueue) -> bool:
        """`doorbell_io.DoorbellIo` supplies it: fetch and run what `sq` holds without
        waiting; False when the worker must take over."""
        raise NotImplementedError

    def _publish_event_idx(self, sq: SubmissionQueue,
                           tail_view: memoryview | None = None) -> bool:
        raise NotImplementedError  # `doorbell_io.DoorbellIo`

    def _shadow_tail_now(self, sq: SubmissionQueue) -> bool:
        raise NotImplementedError  # `doorbell_io.DoorbellIo`

    def cq_doorbell(self, qid: int, value: int) -> None:
        self.io_mmio_doorbells += qid != 0
        cq = self.cqs.get(qid)
        if cq is None or not self.enabled:
            log.debug("nvme: doorbell for CQ %d that does not exist, ignored", qid)
            return
        if cq.shadow_db is None:
            try:
                cq.set_head(value)
            except DoorbellError as exc:
                log.warning("nvme: %s; ignored", exc)
                return
        waiter = self._cq_space.pop(qid, None)
        if waiter is not None:
            waiter.set()
        self.update_intx()

    def kick(self) -> None:
        """Wake the worker, starting it if the engine cancelled it (or it never ran)."""
        self._wake.set()
        ctx = self.dev.ctx
        if self.running or ctx is None:
            return
        try:
            ctx.start_task(self.run, name="nvme-worker")
        except RuntimeError:
            log.debug("nvme: no task group yet; the worker starts on the next kick")
            return
        self.running = True

    def _backend_failed(self, exc: OSError) -> None:
        """A backing file error is a device failure, not just a command's: the engine marks
        the device unhealthy (docs/operations.md, "Health"); the command still completes
        with its error status."""
        ctx = self.dev.ctx
        if ctx is not None:
            ctx.report_failure(f"nvme: backing file error: {exc}")

    def update_intx(self) -> None:
        """INTx is a level: asserted while an interrupt-enabled CQ holds unconsumed entries
        and INTMS bit 0 does not mask it (only meaningful while MSI-X and MSI are off)."""
        if self.dev.msix_enabled() or self.dev.msi_enabled():
            return
        pending = False
        for cq in self.cqs.values():
            if cq.interrupts and cq.outstanding:
                self._peek_cq_head(cq)
                if cq.outstanding:
                    pending = True
                    break
        level = pending and not self.dev.intmask & 1
        # raising a raised line or lowering a low one changes nothing (pci drives the line
        # again itself on every config write and attach), and each cost a config-space
        # update and two enum.Flag operations per completion and CQ doorbell
        if level != self.dev.intx_asserted():
            if level:
                self.dev.raise_irq(0)
            else:
                self.dev.lower_irq()

    def _peek_cq_head(self, cq: CompletionQueue) -> None:
        """Sync read of a shadow CQ head (mmap mode only), for the INTx level."""
        if cq.shadow_db is None or self.dev.ctx is None:
            return
        try:
            view = self.dev.ctx.dma.view(cq.shadow_db, 4)
        except DmaError:
            return
        if view is not None:
            with contextlib.suppress(DoorbellError):
                cq.set_head(int.from_bytes(view, "little"))

    async def run(self) -> None:
        """The worker task that `kick` starts; `worker.Worker` supplies it."""
        raise NotImplementedError

    @property
    def dma(self) -> DmaPort:
        ctx = self.dev.ctx
        if ctx is None:
            raise DmaError(0, "no client attached")
        return ctx.dma

    async def _flush_all(self) -> None:
        for ns in self.namespaces.values():
            await self._backend(ns, ns.backend.flush)

    def _inflight_done(self, scope: Cancellable) -> None:
        """`scope`'s command is finished (its task ended, or a write's hand-back posted
        it): whoever waits for in-flight commands looks again."""
        del self._inflight[scope]
        changed = self._inflight_changed
        if changed is not None:
            self._inflight_changed = None
            changed.set()

    async def _wait_inflight(self, which: Callable[[int], bool]) -> None:
        while any(which(qid) for qid in self._inflight.values()):
            if self._inflight_changed is None:
                self._inflight_changed = trio.Event()
            await self._inflight_changed.wait()

    async def _refresh_sq_tail(self, sq: SubmissionQueue) -> None:
        assert sq.shadow_db is not None
        value = await self._read_u32(sq.shadow_db)
        try:
            sq.set_tail(value)
        except DoorbellError as exc:
            log.warning("nvme: shadow %s; ignored", exc)

    async def _refresh_cq_head(self, cq: CompletionQueue) -> None:
        assert cq.shadow_db is not None
        value = await self._read_u32(cq.shadow_db)
        with contextlib.suppress(DoorbellError):
            cq.set_head(value)

    async def complete(self, sq: SubmissionQueue, cid: int, status: int, result: int = 0,
                       item: Carried | None = None) -> None:
        """Post a completion for a command of `sq` to its CQ (waits while the CQ is full).
        `item`: the carried command, whose slot is reused if it has one (see `Carried`)."""
        cq = self.cqs.get(sq.cqid)
        while cq is not None and cq.full and (item is None or item.slot is None):
            if cq.shadow_db is not None:
                await self._refresh_cq_head(cq)
                if not cq.full:
                    break
                if cq.event_idx is not None:
                    await self._write_u32(cq.event_idx, cq.head)
                    full_fence()  # (devices/sdk/fence.py)
                    await self._refresh_cq_head(cq)
                    if not cq.full:
                        break
            waiter = self._cq_space.setdefault(cq.qid, trio.Event())
            await waiter.wait()
            cq = self.cqs.get(sq.cqid)
        if cq is None:
            log.debug("nvme: completion for a deleted CQ dropped (cid %d)", cid)
            return
        if item is not None and item.slot is not None:
            addr, phase = item.slot
        else:
            slot = self._reserve(cq)
            if slot is None:  # a write's thread took the last free slot meanwhile
                await self.complete(sq, cid, status, result, item)
                return
            addr, phase = slot
            if item is not None:
                item.slot = slot
        view = self.dma.view(addr, CQE.size, write=True)
        if view is not None:
            self._store_cqe(view, sq, cid, status, result, phase)
        else:
            await self.dma.write(addr, self._cqe(sq, cid, status, result, phase))
        self._notify(cq)

    def complete_now(self, sq: SubmissionQueue, cid: int, status: int, result: int,
                     item: Carried | None = None) -> bool:
        """`complete` without waiting, for the register-handler path: True once posted
        (or dropped for a deleted CQ); False when it would have to wait (CQ full, or its
        slot not in an mmap'd window), and the caller falls back to `complete`."""
        cq = self.cqs.get(sq.cqid)
        if cq is None:
            log.debug("nvme: completion for a deleted CQ dropped (cid %d)", cid)
            return True
        slot = item.slot if item is not None else None
        try:
            if slot is None:
                with self._cq_lock:  # (the slot at tail is ours from the look to `reserve`)
                    if cq.full:
                        self._peek_cq_head(cq)
                        if cq.full:
                            return False
                    view = self.dma.view(cq.base + cq.tail * CQE.size, CQE.size, write=True)
                    if view is None:
                        return False
                    slot = cq.reserve()
                if item is not None:
                    item.slot = slot
            else:
                view = self.dma.view(slot[0], CQE.size, write=True)
                if view is None:
                    return False
        except DmaError:
            return False  # `complete` meets it again and reports it
        self._store_cqe(view, sq, cid, status, result, slot[1])
        self._notify(cq)
        return True

    def _reserve(self, cq: CompletionQueue) -> tuple[int, int] | None:
        """`cq.reserve()` under `_cq_lock`; None when the CQ is full."""
        with self._cq_lock:
            return None if cq.full else cq.reserve()

    @staticmethod
    def _cqe(sq: SubmissionQueue, cid: int, status: int, result: int, phase: int) -> bytes:
        """The entry as bytes, for a CQ that is not mmap'd (one layout: `_store_cqe`)."""
        entry = bytearray(CQE.size)
        WorkerCore._store_cqe(memoryview(entry), sq, cid, status, result, phase)
        return bytes(entry)

    @staticmethod
    def _store_cqe(view: memoryview, sq: SubmissionQueue, cid: int, status: int,
                   result: int, phase: int) -> None:
        """`_cqe` stored straight into guest memory. The driver polls the phase bit (last
        dword) and then reads the rest: the first 12 bytes go first, the last dword
        (command id, status, phase) in one store after them, so a new phase is never
        visible before its entry."""
        if status not in _RETRYABLE:
            status |= DNR
        _CQE_HEAD.pack_into(view, 0, result & 0xFFFF_FFFF, 0, sq.head, sq.qid)
        view.cast("I")[3] = cid | ((status << 1) | phase) << 16

    def _notify(self, cq: CompletionQueue) -> None:
        """The interrupt for a new entry in `cq`; while `_irq_batch` collects (a doorbell
        served in the register handler), one per vector at the end of the batch
        (`_raise_batch`), which also decides MSI-X/MSI or INTx there, once per batch."""
        if not cq.interrupts:
            return
        if self._irq_batch is not None:
            self._irq_batch.add(cq.vector)
        else:
            self._raise_batch((cq.vector,))

    def _raise_batch(self, vectors: Collection[int]) -> None:
        """The interrupts of `vectors`' new entries (the end of an `_irq_batch`, or one
        entry): MSI-X/MSI per vector, else the INTx level, decided once."""
        if not vectors:
            return
        if self.dev.msix_enabled() or self.dev.msi_enabled():
            for vector in sorted(vectors):
                self.dev.raise_irq(vector)
        else:
            self.update_intx()

    async def _complete_or_log(self, sq: SubmissionQueue, cid: int, status: int,
                               result: int, item: Carried | None = None) -> None:
        """`complete`, for callers that cannot report a lost completion to anyone."""
        try:
            await self.complete(sq, cid, status, result, item)
        except DmaError as exc:
            log.error("nvme: completion of cid %d on SQ %d lost: %s", cid, sq.qid, exc)

    # ------------------------------------------------------------------ guest memory

    async def _read_guest(self, address: int, size: int) -> bytes:
        view = self.dma.view(address, size)
        if view is not None:
            return bytes(view)
        return await self.dma.read(address, size)

    async def _read_u32(self, address: int) -> int:
        view = self.dma.view(address, 4)
        if view is not None:
            return int.from_bytes(view, "little")
        return int.from_bytes(await self.dma.read(address, 4), "little")

    async def _write_u32(self, address: int, value: int) -> None:
        data = (value & 0xFFFF_FFFF).to_bytes(4, "little")
        view = self.dma.view(address, 4, write=True)
        if view is not None:
            view[:] = data
        else:
            await self.dma.write(address, data)

    async def _segments(self, cmd: Command, length: int) -> Segments:
        if cmd.psdt:
            raise CommandError(Status.INVALID_FIELD, "SGLs are not supported")
        return await walk_prps(cmd.prp1, cmd.prp2, length, self.page_size, self._read_guest)

    async def _to_guest(self, cmd: Command, data: bytes) -> None:
        pos = 0
        for addr, n in await self._segments(cmd, len(data)):
            await self.dma.write(addr, memoryview(data)[pos : pos + n])
            pos += n

    async def _from_guest(self, cmd: Command, length: int) -> bytes:
        out = bytearray()
        for addr, n in await self._segments(cmd, length):
            out += await self._read_guest(addr, n)
        return bytes(out)

    async def _backend(self, ns: Namespace, fn: Callable[..., None], *args: object) -> None:
        if ns.backend.threaded:
            # the limiter's own `acquire` takes a scheduling round even when a thread is
            # free; that round is on the I/O's latency
            try:
                self._threads.acquire_nowait()
            except trio.WouldBlock:
                await self._threads.acquire()
            try:
                await run_in_thread(functools.partial(fn, *args))
            finally:
                self._threads.release()
        else:
            fn(*args)

    def _attach_shadow(self, q: SubmissionQueue | CompletionQueue, qid: int, *,
                       completion: bool) -> None:
        if self.dbbuf is None or qid == 0:
            return
        offset = (2 * qid + int(completion)) * self.stride
        q.shadow_db = self.dbbuf[0] + offset
        q.event_idx = self.dbbuf[1] + offset


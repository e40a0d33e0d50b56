"""The controller's worker: runs the queues, the admin command set and the NVM I/O commands.

Why a separate task: register accesses are synchronous and QEMU holds its big lock while a
vCPU waits for our reply (DESIGN.md 2.8), so a doorbell or CC write only records what the
guest asked for and wakes this worker (openvmm's `pci.rs` / `workers/` split). Everything
that touches guest memory or a backing file happens here.

Task structure, per attached client::

    worker.run()                      one task, started lazily by `kick()`
      ├─ admin commands               inline, in submission order
      └─ one task per I/O command     concurrent; file I/O in worker threads

The worker is restartable: the engine cancels device tasks on disconnect, reset and
quiesce (DMA unmap with pinned memory), and the next register write that needs it starts
it again. All state (queues, features) lives on this object, not in the task.

Controller state changes (CC.EN, CC.SHN) are requests the worker carries out in `_step`:
enable builds the admin queues and sets CSTS.RDY; disable cancels in-flight commands,
waits for them, deletes every queue and clears RDY; shutdown lets in-flight commands
finish, flushes the backends (fdatasync) and reports SHST = complete.

Durability (docs/durability.md): a completion is posted only after the backend call it
reports on has returned, i.e. written data was handed to the kernel (`pwritev`). Identify
reports a volatile write cache (VWC present), so Flush (`fdatasync`) is what makes data
stable; a FUA write or Write Zeroes, or any data-changing command while the host has turned
the Volatile Write Cache feature off, is flushed before it completes, and turning the
feature off flushes what earlier writes left in the cache.

Shadow doorbells (Doorbell Buffer Config): for I/O queues the host writes tails and heads
to a page of guest memory and rings the MMIO doorbell only when it passes the event index
we publish. The worker reads the shadow values every time it looks at a queue, publishes
"seen up to here" as the event index, and re-reads once after publishing so a submission
racing with the publish is never lost. MMIO values of shadowed queues are only wake-ups
(a late MMIO write may carry an older value than the shadow already showed).
"""

from __future__ import annotations

import contextlib
import logging
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import trio

from devices.sdk.interface import DmaError, DmaPort, pinned_views

from . import identify as idf
from .backend import Backend, consume
from .prp import PrpError, Segments, walk_prps
from .queue import CompletionQueue, DoorbellError, SubmissionQueue
from .spec import (
    CQE,
    CQES_LOG2,
    DNR,
    DSM_ATTR_DEALLOCATE,
    DSM_RANGE_SIZE,
    SQE,
    SQE_PSDT_SHIFT,
    SQES_LOG2,
    AdminOpcode,
    Cns,
    FeatureId,
    IoOpcode,
    LogPage,
    Shst,
    Status,
)

if TYPE_CHECKING:
    from .controller import Nvme

log = logging.getLogger(__name__)

BROADCAST_NSID = 0xFFFF_FFFF
FUA = 1 << 30
#: Get Features SEL values
SEL_CURRENT, SEL_DEFAULT, SEL_SAVED, SEL_CAPABILITIES = 0, 1, 2, 3
CAPABILITY_CHANGEABLE = 1 << 2
SET_FEATURES_SAVE = 1 << 31
#: statuses a retry might fix (everything else completes with Do Not Retry)
_RETRYABLE = frozenset({Status.SUCCESS, Status.ABORTED_BY_REQUEST, Status.ABORTED_SQ_DELETION,
                        Status.NAMESPACE_NOT_READY})


@dataclass
class Namespace:
    nsid: int
    backend: Backend
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
        return cls(*SQE.unpack_from(buf, offset))

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


def _default_features(max_queues: int) -> dict[int, int]:
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


class Worker:
    """Queue and command engine of one controller (see the module docstring)."""

    def __init__(self, dev: Nvme, namespaces: dict[int, Namespace], info: idf.ControllerInfo,
                 *, max_queues: int, stride: int) -> None:
        self.dev = dev
        self.namespaces = namespaces
        self.info = info
        self.max_queues = max_queues
        self.stride = stride
        self.max_transfer = (1 << info.mdts) * 4096 if info.mdts else 1 << 30
        self.smart = idf.SmartCounters()
        self.running = False
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.power_on()

    # ------------------------------------------------------------------ state

    def power_on(self) -> None:
        """Power-on / function-level reset state (tasks are already gone)."""
        self.want_enable = False
        self.reset_pending = False
        self.shutdown_pending = False
        self.enabled = False
        self._controller_state()

    def _controller_state(self) -> None:
        self.sqs: dict[int, SubmissionQueue] = {}
        self.cqs: dict[int, CompletionQueue] = {}
        self.page_size = 4096
        self.features = _default_features(self.max_queues)
        self.queues_granted = self.max_queues
        self.aers: list[int] = []
        self.dbbuf: tuple[int, int] | None = None
        self._inflight: dict[trio.CancelScope, int] = {}
        self._inflight_changed = trio.Event()
        self._cq_space: dict[int, trio.Event] = {}

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
        self.kick()

    def cq_doorbell(self, qid: int, value: int) -> None:
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

    def update_intx(self) -> None:
        """INTx is a level: asserted while an interrupt-enabled CQ holds unconsumed entries
        and INTMS bit 0 does not mask it (only meaningful while MSI-X is off)."""
        if self.dev.msix_enabled():
            return
        pending = False
        for cq in self.cqs.values():
            if cq.interrupts and cq.outstanding:
                self._peek_cq_head(cq)
                if cq.outstanding:
                    pending = True
                    break
        if pending and not self.dev.intmask & 1:
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

    # ------------------------------------------------------------------ the task

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                while True:
                    self._wake = trio.Event()
                    await self._step()
                    await self._wake.wait()
        finally:
            self._nursery = None
            self.running = False

    @property
    def dma(self) -> DmaPort:
        ctx = self.dev.ctx
        if ctx is None:
            raise DmaError(0, "no client attached")
        return ctx.dma

    async def _step(self) -> None:
        if self.reset_pending:
            self.reset_pending = False
            await self._disable()
        if self.want_enable and not self.enabled and not self.dev.csts_cfs:
            self._enable()
        if self.shutdown_pending:
            self.shutdown_pending = False
            await self._shutdown()
        if self.enabled:
            await self._service()

    def _enable(self) -> None:
        cc = self.dev.cc_fields()
        page_size = 4096 << cc.mps
        if cc.mps > self.dev.mps_max or cc.css != 0 or cc.asqs < 2 or cc.acqs < 2:
            log.warning("nvme: enable with bad configuration %s: controller fatal status", cc)
            self.dev.set_csts(cfs=True)
            return
        self._controller_state()
        self.page_size = page_size
        self.cqs[0] = CompletionQueue(0, cc.acq, cc.acqs, vector=0, interrupts=True, sqs={0})
        self.sqs[0] = SubmissionQueue(0, cc.asq, cc.asqs, cqid=0)
        self.enabled = True
        self.dev.set_csts(rdy=True, shst=0)
        log.info("nvme: enabled (admin SQ %#x/%d, CQ %#x/%d, page %d)", cc.asq, cc.asqs, cc.acq,
                 cc.acqs, page_size)

    async def _disable(self) -> None:
        """Controller reset: abort in-flight commands, delete every queue, clear RDY."""
        for scope in list(self._inflight):
            scope.cancel()
        await self._wait_inflight(lambda qid: True)
        self._controller_state()
        self.enabled = False
        self.dev.set_csts(rdy=False, cfs=False)
        self.dev.lower_irq()
        log.info("nvme: disabled")

    async def _shutdown(self) -> None:
        """Finish I/O, flush, report SHST = complete. Why a failed flush is fatal: "shutdown
        complete" tells the host its data is safe to power off, which would be a lie; with
        CSTS.CFS the host knows the controller failed instead."""
        await self._wait_inflight(lambda qid: qid != 0)
        try:
            await self._flush_all()
        except OSError as exc:
            log.error("nvme: flush at shutdown failed (%s): controller fatal status", exc)
            self.dev.set_csts(cfs=True)
            return
        self.dev.set_csts(shst=Shst.COMPLETE)
        log.info("nvme: shutdown complete")

    async def _flush_all(self) -> None:
        for ns in self.namespaces.values():
            await self._backend(ns, ns.backend.flush)

    async def _wait_inflight(self, which: Callable[[int], bool]) -> None:
        while any(which(qid) for qid in self._inflight.values()):
            await self._inflight_changed.wait()

    # ------------------------------------------------------------------ queues

    async def _service(self) -> None:
        progress = True
        while progress and self.enabled:
            progress = False
            for qid in sorted(self.sqs):
                sq = self.sqs.get(qid)
                if sq is None:
                    continue
                try:
                    if await self._drain_sq(sq):
                        progress = True
                except DmaError as exc:
                    # The queue itself is unreachable: nothing can report this to the host
                    # but Controller Fatal Status (it will reset us).
                    log.error("nvme: SQ %d unreachable (%s): controller fatal status", qid, exc)
                    self.dev.set_csts(cfs=True)
                    self.enabled = False
                    return
            if progress:
                await trio.lowlevel.checkpoint()

    async def _drain_sq(self, sq: SubmissionQueue) -> bool:
        """Fetch and start everything `sq` holds; True if anything was found."""
        found = False
        while True:
            if sq.shadow_db is not None:
                await self._refresh_sq_tail(sq)
            if not sq.pending:
                if sq.event_idx is None:
                    return found
                # Publish what we have seen, then look once more (the host may have
                # written the shadow tail before it could see the new event index).
                await self._write_u32(sq.event_idx, sq.tail)
                await self._refresh_sq_tail(sq)
                if not sq.pending:
                    return found
            found = True
            for addr, count in list(sq.runs()):
                raw = await self._read_guest(addr, count * SQE.size)
                cmds = [Command.decode(raw, i * SQE.size) for i in range(count)]
                sq.advance(count)
                for cmd in cmds:
                    if sq.qid == 0:
                        await self._admin(sq, cmd)
                        if not self.enabled or self.sqs.get(0) is not sq:
                            return found
                    else:
                        self._start_io(sq, cmd)
            if self.sqs.get(sq.qid) is not sq:
                return found

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

    async def complete(self, sq: SubmissionQueue, cid: int, status: int, result: int = 0) -> None:
        """Post a completion for a command of `sq` to its CQ (waits while the CQ is full)."""
        cq = self.cqs.get(sq.cqid)
        while cq is not None and cq.full:
            if cq.shadow_db is not None:
                await self._refresh_cq_head(cq)
                if not cq.full:
                    break
                if cq.event_idx is not None:
                    await self._write_u32(cq.event_idx, cq.head)
                    await self._refresh_cq_head(cq)
                    if not cq.full:
                        break
            waiter = self._cq_space.setdefault(cq.qid, trio.Event())
            await waiter.wait()
            cq = self.cqs.get(sq.cqid)
        if cq is None:
            log.debug("nvme: completion for a deleted CQ dropped (cid %d)", cid)
            return
        if status not in _RETRYABLE:
            status |= DNR
        addr, phase = cq.reserve()
        entry = CQE.pack(result & 0xFFFF_FFFF, 0, sq.head, sq.qid, cid, (status << 1) | phase)
        view = self.dma.view(addr, CQE.size, write=True)
        if view is not None:
            # The driver polls the phase bit (last dword) and then reads the rest: the
            # first 12 bytes go first, the last dword (command id, status, phase) in one
            # store after them, so a new phase is never visible before its entry.
            view[:12] = entry[:12]
            view[12:16].cast("I")[0] = int.from_bytes(entry[12:16], "little")
        else:
            await self.dma.write(addr, entry)
        if cq.interrupts:
            if self.dev.msix_enabled():
                self.dev.raise_irq(cq.vector)
            else:
                self.update_intx()

    async def _complete_or_log(self, sq: SubmissionQueue, cid: int, status: int,
                               result: int) -> None:
        """`complete`, for callers that cannot report a lost completion to anyone."""
        try:
            await self.complete(sq, cid, status, result)
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
            await trio.to_thread.run_sync(fn, *args)
        else:
            fn(*args)

    # ------------------------------------------------------------------ admin

    async def _admin(self, sq: SubmissionQueue, cmd: Command) -> None:
        handler = self._admin_handlers.get(cmd.opcode)
        outcome: Outcome | None
        try:
            if handler is None:
                raise CommandError(Status.INVALID_OPCODE, f"admin opcode {cmd.opcode:#x}")
            outcome = await handler(self, cmd)
        except CommandError as exc:
            log.debug("nvme: admin %#x cid %d: %s", cmd.opcode, cmd.cid, exc)
            outcome = (exc.status, 0)
        except PrpError as exc:
            outcome = (exc.status, 0)
        except DmaError as exc:
            log.warning("nvme: admin %#x cid %d: DMA failed: %s", cmd.opcode, cmd.cid, exc)
            outcome = (Status.DATA_TRANSFER_ERROR, 0)
        if outcome is not None and self.sqs.get(0) is sq:
            await self._complete_or_log(sq, cmd.cid, outcome[0], outcome[1])

    async def _identify(self, cmd: Command) -> Outcome:
        cns = cmd.cdw10 & 0xFF
        csi = (cmd.cdw11 >> 24) & 0xFF
        if cns == Cns.CONTROLLER:
            data = idf.identify_controller(self.info)
        elif cns == Cns.ACTIVE_NS_LIST:
            if cmd.nsid >= BROADCAST_NSID - 1:
                raise CommandError(Status.INVALID_NAMESPACE)
            data = idf.active_namespace_list(list(self.namespaces), cmd.nsid)
        elif cns in (Cns.NAMESPACE, Cns.NS_DESCRIPTORS, Cns.CSI_NAMESPACE):
            ns = self.namespaces.get(cmd.nsid)
            if ns is None:
                if cns == Cns.NAMESPACE and cmd.nsid == BROADCAST_NSID:
                    data = bytes(idf.IDENTIFY_SIZE)
                else:
                    raise CommandError(Status.INVALID_NAMESPACE)
            elif cns == Cns.NAMESPACE:
                data = idf.identify_namespace(ns.blocks, ns.lba_shift, ns.nguid)
            elif cns == Cns.NS_DESCRIPTORS:
                data = idf.namespace_descriptors(ns.nguid, ns.uuid)
            elif csi == 0:
                data = bytes(idf.IDENTIFY_SIZE)
            else:
                raise CommandError(Status.INVALID_FIELD, f"CSI {csi}")
        elif cns == Cns.CSI_CONTROLLER and csi == 0:
            data = bytes(idf.IDENTIFY_SIZE)
        else:
            raise CommandError(Status.INVALID_FIELD, f"CNS {cns:#x} CSI {csi}")
        await self._to_guest(cmd, data)
        return Status.SUCCESS, 0

    async def _create_cq(self, cmd: Command) -> Outcome:
        qid, qsize = cmd.cdw10 & 0xFFFF, (cmd.cdw10 >> 16) + 1
        contiguous, ien, vector = cmd.cdw11 & 1, bool(cmd.cdw11 & 2), cmd.cdw11 >> 16
        if not 0 < qid <= self.queues_granted or qid in self.cqs:
            raise CommandError(Status.INVALID_QUEUE_IDENTIFIER)
        if qsize < 2 or qsize > self.dev.mqes + 1:
            raise CommandError(Status.INVALID_QUEUE_SIZE)
        if not contiguous or cmd.prp1 & (self.page_size - 1) or not cmd.prp1:
            raise CommandError(Status.INVALID_FIELD, "CQ must be contiguous and page aligned")
        if ien and vector >= self.dev.vectors:
            raise CommandError(Status.INVALID_INTERRUPT_VECTOR)
        if self.dev.cc_fields().iocqes != CQES_LOG2:
            raise CommandError(Status.INVALID_FIELD, "CC.IOCQES is not 4")
        cq = CompletionQueue(qid, cmd.prp1, qsize, vector=vector, interrupts=ien)
        self._attach_shadow(cq, qid, completion=True)
        self.cqs[qid] = cq
        return Status.SUCCESS, 0

    async def _create_sq(self, cmd: Command) -> Outcome:
        qid, qsize = cmd.cdw10 & 0xFFFF, (cmd.cdw10 >> 16) + 1
        contiguous, cqid = cmd.cdw11 & 1, cmd.cdw11 >> 16
        if not 0 < qid <= self.queues_granted or qid in self.sqs:
            raise CommandError(Status.INVALID_QUEUE_IDENTIFIER)
        cq = self.cqs.get(cqid)
        if cqid == 0 or cq is None:
            raise CommandError(Status.COMPLETION_QUEUE_INVALID)
        if qsize < 2 or qsize > self.dev.mqes + 1:
            raise CommandError(Status.INVALID_QUEUE_SIZE)
        if not contiguous or cmd.prp1 & (self.page_size - 1) or not cmd.prp1:
            raise CommandError(Status.INVALID_FIELD, "SQ must be contiguous and page aligned")
        if self.dev.cc_fields().iosqes != SQES_LOG2:
            raise CommandError(Status.INVALID_FIELD, "CC.IOSQES is not 6")
        sq = SubmissionQueue(qid, cmd.prp1, qsize, cqid=cqid)
        self._attach_shadow(sq, qid, completion=False)
        self.sqs[qid] = sq
        cq.sqs.add(qid)
        return Status.SUCCESS, 0

    def _attach_shadow(self, q: SubmissionQueue | CompletionQueue, qid: int, *,
                       completion: bool) -> None:
        if self.dbbuf is None or qid == 0:
            return
        offset = (2 * qid + int(completion)) * self.stride
        q.shadow_db = self.dbbuf[0] + offset
        q.event_idx = self.dbbuf[1] + offset

    async def _delete_sq(self, cmd: Command) -> Outcome:
        qid = cmd.cdw10 & 0xFFFF
        sq = self.sqs.get(qid)
        if qid == 0 or sq is None:
            raise CommandError(Status.INVALID_QUEUE_IDENTIFIER)
        del self.sqs[qid]  # no new fetches; commands already started complete normally
        await self._wait_inflight(lambda q: q == qid)
        cq = self.cqs.get(sq.cqid)
        if cq is not None:
            cq.sqs.discard(qid)
        return Status.SUCCESS, 0

    async def _delete_cq(self, cmd: Command) -> Outcome:
        qid = cmd.cdw10 & 0xFFFF
        cq = self.cqs.get(qid)
        if qid == 0 or cq is None:
            raise CommandError(Status.INVALID_QUEUE_IDENTIFIER)
        if cq.sqs:
            raise CommandError(Status.INVALID_QUEUE_DELETION)
        del self.cqs[qid]
        waiter = self._cq_space.pop(qid, None)
        if waiter is not None:
            waiter.set()
        self.update_intx()
        return Status.SUCCESS, 0

    async def _get_features(self, cmd: Command) -> Outcome:
        fid, sel = cmd.cdw10 & 0xFF, (cmd.cdw10 >> 8) & 0x7
        if fid not in self.features:
            raise CommandError(Status.INVALID_FIELD, f"feature {fid:#x}")
        if sel == SEL_CAPABILITIES:
            return Status.SUCCESS, CAPABILITY_CHANGEABLE
        if sel in (SEL_DEFAULT, SEL_SAVED):
            return Status.SUCCESS, _default_features(self.max_queues)[fid]
        if sel != SEL_CURRENT:
            raise CommandError(Status.INVALID_FIELD, f"SEL {sel}")
        if fid == FeatureId.INTERRUPT_VECTOR_CONFIG:
            vector = cmd.cdw11 & 0xFFFF
            if vector >= self.dev.vectors:
                raise CommandError(Status.INVALID_FIELD, f"vector {vector}")
            return Status.SUCCESS, vector
        return Status.SUCCESS, self.features[fid]

    async def _set_features(self, cmd: Command) -> Outcome:
        fid = cmd.cdw10 & 0xFF
        if cmd.cdw10 & SET_FEATURES_SAVE:
            raise CommandError(Status.FEATURE_NOT_SAVEABLE)
        if fid not in self.features:
            raise CommandError(Status.INVALID_FIELD, f"feature {fid:#x}")
        value = cmd.cdw11
        if fid == FeatureId.NUMBER_OF_QUEUES:
            nsq, ncq = value & 0xFFFF, value >> 16
            if nsq == 0xFFFF or ncq == 0xFFFF:
                raise CommandError(Status.INVALID_FIELD, "0xffff queues")
            granted = min(self.max_queues, max(nsq, ncq) + 1)
            self.queues_granted = granted
            value = (granted - 1) | ((granted - 1) << 16)
            self.features[fid] = value
            return Status.SUCCESS, value
        if fid == FeatureId.VOLATILE_WRITE_CACHE:
            value &= 1
            if not value and self.features[fid]:
                # The host switches to write-through: from now on a completed write is
                # stable, so what is still cached from before must be, too.
                try:
                    await self._flush_all()
                except OSError as exc:
                    log.error("nvme: flush when disabling the write cache failed: %s", exc)
                    raise CommandError(Status.INTERNAL_ERROR, str(exc)) from exc
        elif fid == FeatureId.TEMPERATURE_THRESHOLD and value >> 16:
            return Status.SUCCESS, 0  # other sensors / under-threshold: accepted, not kept
        elif fid == FeatureId.INTERRUPT_VECTOR_CONFIG and (value & 0xFFFF) >= self.dev.vectors:
            raise CommandError(Status.INVALID_FIELD, "vector out of range")
        self.features[fid] = value
        return Status.SUCCESS, 0

    async def _get_log_page(self, cmd: Command) -> Outcome:
        lid = cmd.cdw10 & 0xFF
        numd = ((cmd.cdw11 & 0xFFFF) << 16 | (cmd.cdw10 >> 16)) + 1
        offset = cmd.cdw12 | (cmd.cdw13 << 32)
        if lid == LogPage.ERROR:
            page = idf.error_log(1)
        elif lid == LogPage.SMART:
            page = idf.smart_log(self.smart)
        elif lid == LogPage.FIRMWARE_SLOT:
            page = idf.firmware_slot_log(self.info.firmware)
        else:
            raise CommandError(Status.INVALID_LOG_PAGE, f"log page {lid:#x}")
        length = numd * 4
        if offset & 3 or offset > len(page) or length > self.max_transfer:
            raise CommandError(Status.INVALID_FIELD, f"log offset {offset} length {length}")
        data = page[offset : offset + length]
        await self._to_guest(cmd, data + bytes(length - len(data)))
        return Status.SUCCESS, 0

    async def _async_event_request(self, cmd: Command) -> Outcome | None:
        if len(self.aers) > self.info.aerl:
            raise CommandError(Status.ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED)
        self.aers.append(cmd.cid)  # completes when an event happens (none are generated yet)
        return None

    async def _abort(self, cmd: Command) -> Outcome:
        # Commands run to completion quickly; report "not aborted" (DW0 bit 0 = 1).
        return Status.SUCCESS, 1

    async def _keep_alive(self, cmd: Command) -> Outcome:
        return Status.SUCCESS, 0

    async def _doorbell_buffer_config(self, cmd: Command) -> Outcome:
        mask = self.page_size - 1
        if not cmd.prp1 or not cmd.prp2 or cmd.prp1 & mask or cmd.prp2 & mask:
            raise CommandError(Status.INVALID_FIELD, "buffers must be page aligned")
        if not self.dev.msix_enabled():
            # With INTx, QEMU drops the line only when the guest touches a BAR (its EOI
            # heuristic), and a handler that updates the CQ head in the shadow buffer
            # touches none: the line stays up and the guest sees an interrupt storm.
            # Linux goes on without shadow doorbells when this fails.
            raise CommandError(Status.INVALID_FIELD, "shadow doorbells need MSI-X")
        self.dbbuf = (cmd.prp1, cmd.prp2)
        for sq in self.sqs.values():
            self._attach_shadow(sq, sq.qid, completion=False)
            if sq.shadow_db is not None and sq.event_idx is not None:
                await self._write_u32(sq.shadow_db, sq.tail)
                await self._write_u32(sq.event_idx, sq.tail)
        for cq in self.cqs.values():
            self._attach_shadow(cq, cq.qid, completion=True)
            if cq.shadow_db is not None and cq.event_idx is not None:
                await self._write_u32(cq.shadow_db, cq.head)
                await self._write_u32(cq.event_idx, cq.head)
        return Status.SUCCESS, 0

    _admin_handlers: dict[int, Callable[[Worker, Command], Awaitable[Outcome | None]]] = {
        AdminOpcode.IDENTIFY: _identify,
        AdminOpcode.CREATE_CQ: _create_cq,
        AdminOpcode.CREATE_SQ: _create_sq,
        AdminOpcode.DELETE_SQ: _delete_sq,
        AdminOpcode.DELETE_CQ: _delete_cq,
        AdminOpcode.GET_FEATURES: _get_features,
        AdminOpcode.SET_FEATURES: _set_features,
        AdminOpcode.GET_LOG_PAGE: _get_log_page,
        AdminOpcode.ASYNC_EVENT_REQUEST: _async_event_request,
        AdminOpcode.ABORT: _abort,
        AdminOpcode.KEEP_ALIVE: _keep_alive,
        AdminOpcode.DOORBELL_BUFFER_CONFIG: _doorbell_buffer_config,
    }

    # ------------------------------------------------------------------ I/O

    def _start_io(self, sq: SubmissionQueue, cmd: Command) -> None:
        assert self._nursery is not None
        scope = trio.CancelScope()
        self._inflight[scope] = sq.qid
        self._nursery.start_soon(self._io_task, sq, cmd, scope)

    async def _io_task(self, sq: SubmissionQueue, cmd: Command, scope: trio.CancelScope) -> None:
        try:
            with scope:
                try:
                    status, result = await self._io(cmd)
                except CommandError as exc:
                    status, result = exc.status, 0
                except PrpError as exc:
                    status, result = exc.status, 0
                except DmaError as exc:
                    log.warning("nvme: I/O %#x cid %d: DMA failed: %s", cmd.opcode, cmd.cid, exc)
                    status, result = Status.DATA_TRANSFER_ERROR, 0
                except OSError as exc:
                    log.error("nvme: I/O %#x cid %d: backend error: %s", cmd.opcode, cmd.cid, exc)
                    status = (Status.UNRECOVERED_READ_ERROR if cmd.opcode == IoOpcode.READ
                              else Status.WRITE_FAULT)
                    result = 0
                if scope.cancel_called:
                    return  # controller reset: the command is aborted without a completion
                await self._complete_or_log(sq, cmd.cid, status, result)
        finally:
            del self._inflight[scope]
            changed, self._inflight_changed = self._inflight_changed, trio.Event()
            changed.set()

    def _namespace(self, nsid: int) -> Namespace:
        ns = self.namespaces.get(nsid)
        if ns is None:
            raise CommandError(Status.INVALID_NAMESPACE, f"namespace {nsid}")
        return ns

    @staticmethod
    def _range(ns: Namespace, slba: int, nlb: int) -> tuple[int, int]:
        if slba + nlb > ns.blocks:
            raise CommandError(Status.LBA_OUT_OF_RANGE, f"LBA {slba}+{nlb} > {ns.blocks}")
        return slba << ns.lba_shift, nlb << ns.lba_shift

    async def _io(self, cmd: Command) -> Outcome:
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
            offset, length = self._range(ns, slba, nlb)
            if length > self.max_transfer:
                raise CommandError(Status.INVALID_FIELD, f"{length} bytes > MDTS")
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

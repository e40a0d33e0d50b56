"""The admin command set (NVMe 1.4, 5): Identify, queue creation and deletion, features,
log pages, AERs, Doorbell Buffer Config.

Admin commands run inline on the worker task, one after the other in submission order,
because they change what later commands depend on (queues, features); each handler returns
(status, DW0), None to complete later (AERs), or raises `CommandError`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from devices.sdk.interface import DmaError

from . import identify as idf
from .command import BROADCAST_NSID, Command, CommandError, Outcome
from .core import WorkerCore, default_features
from .prp import PrpError
from .queue import CompletionQueue, SubmissionQueue
from .spec import CQES_LOG2, SQES_LOG2, AdminOpcode, Cns, FeatureId, LogPage, Status

log = logging.getLogger(__name__)

#: Get Features SEL values
SEL_CURRENT, SEL_DEFAULT, SEL_SAVED, SEL_CAPABILITIES = 0, 1, 2, 3
CAPABILITY_CHANGEABLE = 1 << 2
SET_FEATURES_SAVE = 1 << 31


class AdminCommands(WorkerCore):
    """The admin queue's commands, on the worker's state."""

    async def _admin(self, sq: SubmissionQueue, cmd: Command, token: int) -> None:
        """Run one admin command; `token` is its `carried` entry, dropped once its
        completion is posted (an entry with an outcome only posts it)."""
        item = self.carried.get(token)
        if item is not None and item.outcome is not None:
            outcome: Outcome | None = item.outcome
        else:
            outcome = await self._run_admin(cmd)
            if item is not None and outcome is not None:
                item.outcome = outcome
        if outcome is not None and self.sqs.get(0) is sq:
            await self._complete_or_log(sq, cmd.cid, outcome[0], outcome[1], item)
        self.carried.pop(token, None)

    async def _run_admin(self, cmd: Command) -> Outcome | None:
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
        return outcome

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
        with self._cq_lock:
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
            return Status.SUCCESS, default_features(self.max_queues)[fid]
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
                    self._backend_failed(exc)
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
        if not (self.dev.msix_enabled() or self.dev.msi_enabled()):
            # With INTx, QEMU drops the line only when the guest touches a BAR (its EOI
            # heuristic), and a handler that updates the CQ head in the shadow buffer
            # touches none: the line stays up and the guest sees an interrupt storm.
            # Linux goes on without shadow doorbells when this fails.
            raise CommandError(Status.INVALID_FIELD, "shadow doorbells need MSI-X or MSI")
        self.dbbuf = (cmd.prp1, cmd.prp2)
        log.info("nvme: shadow doorbells on (doorbells %#x, event indexes %#x)", cmd.prp1,
                 cmd.prp2)
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

    _admin_handlers: dict[int, Callable[[AdminCommands, Command], Awaitable[Outcome | None]]] = {
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


"""The controller's worker task: the CC/CSTS state machine and the queue service loop.

Why a separate task: register accesses are synchronous and QEMU holds its big lock while a
vCPU waits for our reply, so a doorbell or CC write only records what the guest asked for
and wakes this worker (openvmm's `pci.rs` / `workers/` split). Everything that touches guest
memory or a backing file happens here.

Task structure, per attached client::

    worker.run()                      one task, started lazily by `kick()`
      ├─ admin commands               inline, in submission order (`admin`)
      └─ one task per I/O command     concurrent; file I/O in worker threads (`io_commands`)

The worker is restartable: the engine cancels device tasks on disconnect, reset and
quiesce (DMA unmap with pinned memory), and the next register write that needs it starts
it again. All state (queues, features) lives on this object (`core.WorkerCore`), not in
the task.

Controller state changes (CC.EN, CC.SHN) are requests the worker carries out in `_step`:
enable builds the admin queues and sets CSTS.RDY; disable cancels in-flight commands,
waits for them, deletes every queue and clears RDY; shutdown lets in-flight commands
finish, flushes the backends (fdatasync) and reports SHST = complete.
"""

from __future__ import annotations

import logging

import trio

from devices.sdk.fence import full_fence
from devices.sdk.interface import DmaError

from .admin import AdminCommands
from .command import Command, Namespace
from .io_commands import IoCommands
from .queue import CompletionQueue, SubmissionQueue
from .spec import SQE, Shst

__all__ = ["Namespace", "Worker"]

log = logging.getLogger(__name__)


class Worker(AdminCommands, IoCommands):
    """Queue and command engine of one controller (see the module docstring)."""

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                # A new task: whatever is still carried belongs to tasks that are gone.
                self.rerun_carried = True
                while True:
                    self._wake = trio.Event()
                    self.stepping = True
                    try:
                        await self._step()
                    finally:
                        self.stepping = False
                    await self._wake.wait()
        finally:
            self._nursery = None
            self.running = False

    async def _step(self) -> None:
        if self.quiescing:
            return  # requests and submissions wait (in the state) until resume or a load
        if self.reset_pending:
            self.reset_pending = False
            await self._disable()
        if self.want_enable and not self.enabled and not self.dev.csts_cfs:
            self._enable()
        if self.shutdown_pending:
            self.shutdown_pending = False
            await self._shutdown()
        if self.enabled and self.rerun_carried:
            self.rerun_carried = False
            await self._rerun_carried()
        if self.enabled:
            await self._service()

    async def _rerun_carried(self) -> None:
        """Commands an earlier task left unfinished (cancelled by the engine, or loaded
        with a state): post the completion if they had executed, else execute them again
        (reads, writes, flushes and deallocations are idempotent)."""
        for token, item in sorted(self.carried.items()):
            if token in self.writing:
                continue  # its thread is still out: its hand-back posts it or starts its task
            sq = self.sqs.get(item.sqid)
            if sq is None:
                del self.carried[token]
            elif item.sqid == 0:
                await self._admin(sq, item.cmd, token)
            else:
                self._start_io(sq, item.cmd, token)

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
            self._backend_failed(exc)
            self.dev.set_csts(cfs=True)
            return
        self.dev.set_csts(shst=Shst.COMPLETE)
        log.info("nvme: shutdown complete (%d I/O commands, %d I/O doorbell writes)",
                 self.io_fetched, self.io_mmio_doorbells)

    # ------------------------------------------------------------------ queues

    async def _service(self) -> None:
        progress = True
        while progress and self.enabled and not self.quiescing:
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
        while not self.quiescing:
            if sq.shadow_db is not None:
                await self._refresh_sq_tail(sq)
            if not sq.pending:
                if sq.event_idx is None:
                    return found
                # Publish what we have seen, then look once more (the host may have
                # written the shadow tail before it could see the new event index).
                await self._write_u32(sq.event_idx, sq.tail)
                full_fence()  # (devices/sdk/fence.py)
                await self._refresh_sq_tail(sq)
                if not sq.pending:
                    return found
            found = True
            for addr, count in list(sq.runs()):
                raw = await self._read_guest(addr, count * SQE.size)
                cmds = [Command.decode(raw, i * SQE.size) for i in range(count)]
                sq.advance(count)
                # Carried from the moment they leave the ring (see `core.Carried`).
                tokens = [self.carry(sq.qid, cmd) for cmd in cmds]
                for cmd, token in zip(cmds, tokens, strict=True):
                    if sq.qid == 0:
                        await self._admin(sq, cmd, token)
                        if not self.enabled or self.sqs.get(0) is not sq:
                            return found
                    else:
                        self._start_io(sq, cmd, token)
            if self.sqs.get(sq.qid) is not sq:
                return found
        return found


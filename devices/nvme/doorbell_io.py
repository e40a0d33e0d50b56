"""I/O served inside the doorbell's register handler, without a task: the SQ fetched
from mmap'd memory, cached reads answered on the spot, writes started in their thread.

Why a module of its own: it is the latency path of the I/O command set (`io_commands`),
with rules of its own, and `IoCommands` builds on it (its base class): everything here
falls back to the command's task (`IoCommands._start_io`) when it cannot go on without
waiting.

Writes from a doorbell served in the register handler start their thread right there
(`_write_now`): measured in the guest, a 512 KiB write spent ~3x QEMU's device time between
doorbell and interrupt, much of it trio rounds (task start, the thread limiter's checkpoint,
the hand-back waking a task that then posts). Such a write has no task at all unless its
hand-back needs one: it is in `_inflight` (reset cancels it and waits for the hand-back;
queue deletion, shutdown and quiesce wait for it) and in `writing` (a restarted worker
does not run it again meanwhile); only an error to report, a flush owed first (FUA, write
cache off) or a full CQ starts its task, from the hand-back. Why: a task per write was a
spawn, a first step and a wake-up on the trio thread per I/O, competing for the host's
two CPUs with the write's own thread while the guest waits.

Since 2026-12-08 the write's thread itself posts the completion and raises the MSI-X
vector when it may (`_thread_post`, `_post_from_thread`; the rules: docs/architecture.md,
"What a backend thread may touch"), and the hand-back (`_write_done`) only lets go; else
the hand-back posts as before.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, cast

import trio

from devices.sdk import threads
from devices.sdk.fence import full_fence
from devices.sdk.interface import DmaError, pinned_views
from devices.sdk.storage import read_cached

from .command import Command, CommandError, Namespace
from .core import Carried, WorkerCore
from .prp import PrpError, Segments, prp_head, walk_list
from .queue import CompletionQueue, DoorbellError, SubmissionQueue
from .spec import CQE, SQE, FeatureId, IoOpcode, Status

if TYPE_CHECKING:
    import outcome

    from devices.sdk.interface import ThreadIrq

    from .port import ControllerPort

log = logging.getLogger(__name__)

FUA = 1 << 30
#: commands one doorbell fetches inside the register handler before the worker takes over
#: (bounds how long the handler keeps the trio thread, e.g. for cached 1 MiB reads)
FETCH_NOW_LIMIT = 32
#: data bytes one doorbell reads from the page cache inside the register handler (as
#: virtio-blk's `INLINE_BYTES`): ~0.2 ms of copying at most, so other devices' clients wait
#: no longer than for a message; cached reads past it are read by their tasks
INLINE_BYTES = 1 << 20


class _NotNow(Exception):
    """`_io_now` cannot go on without waiting (a PRP list outside mmap'd memory)."""


def _run_now(coro: Coroutine[object, object, Segments]) -> Segments:
    """Run a coroutine that never suspends (its reads come from mmap'd memory) to the
    end, synchronously; `_NotNow` if it tries to suspend after all."""
    try:
        coro.send(None)
    except StopIteration as done:
        return cast(Segments, done.value)
    coro.close()
    raise _NotNow


def _enter(pins: contextlib.AbstractContextManager[list[memoryview] | None],
           ) -> list[memoryview] | None:
    """`pins` entered, its views; None (nothing left to exit) when the memory is not
    mmap'd or not mapped at all. The caller exits `pins` itself once the views are let go
    (by a write's hand-back: no `with` can span it)."""
    try:
        views = pins.__enter__()
    except DmaError:
        return None  # (a generator that raised is closed: nothing to exit)
    if views is None:
        pins.__exit__(None, None, None)
    return views


class _ThreadPost:
    """What a write's thread needs to post its own completion and raise its interrupt
    (`IoCommands._post_from_thread`): the CQ, a pinned view of its whole ring (a DMA_UNMAP
    of the window waits for the pin, so the thread's store cannot fault) and the vector as
    a `ThreadIrq` (None: the CQ has interrupts off)."""

    __slots__ = ("cq", "irq", "pins", "ring")

    def __init__(self, cq: CompletionQueue, ring: memoryview, irq: ThreadIrq | None,
                 pins: contextlib.AbstractContextManager[list[memoryview] | None]) -> None:
        self.cq, self.ring, self.irq, self.pins = cq, ring, irq, pins

    def let_go(self, dev: ControllerPort, posted: bool) -> None:
        """Trio thread, the write's thread being back: unpin the ring and settle the
        interrupt (raised again the usual way if its route changed; see `ThreadIrq`)."""
        self.pins.__exit__(None, None, None)
        if self.irq is not None:
            if posted:
                if not dev.thread_irq_stands(self.irq):
                    dev.raise_irq(self.cq.vector)
            else:
                self.irq.settle()


class _Started:
    """A write whose thread `_write_now` started from the register handler: what the
    hand-back (`_write_done`) and, when it needs one, the command's task share. It is its
    own `_inflight` entry (`core.Cancellable`) while it has no task: a reset's `cancel`
    only marks it, and the hand-back then posts nothing."""

    __slots__ = ("cancel_called", "cmd", "error", "item", "length", "pins", "post", "posted",
                 "sq", "token")

    def __init__(self, sq: SubmissionQueue, cmd: Command, token: int, item: Carried,
                 length: int, pins: contextlib.AbstractContextManager[list[memoryview] | None],
                 post: _ThreadPost | None) -> None:
        self.sq, self.cmd, self.token, self.length, self.pins = sq, cmd, token, length, pins
        #: what the thread needs to post the completion itself, None when it may not
        self.post = post
        #: set by the thread once it posted (under `_cq_lock`)
        self.posted = False
        #: its `carried` entry: the hand-back acts only while this is still it (a device
        #: reset that does not wait, `power_on`, starts tokens again)
        self.item = item
        #: what the backend call raised (the task reports it)
        self.error: Exception | None = None
        self.cancel_called = False

    def cancel(self) -> None:
        self.cancel_called = True


class DoorbellIo(WorkerCore):
    """The register handler's share of the I/O command set (module docstring);
    `io_commands.IoCommands` adds the commands' tasks."""

    def _start_io(self, sq: SubmissionQueue, cmd: Command, token: int,
                  segs: Segments | None = None) -> None:
        raise NotImplementedError  # `io_commands.IoCommands`

    async def _io_task(self, sq: SubmissionQueue, cmd: Command, scope: trio.CancelScope,
                       token: int, segs: Segments | None = None,
                       started: _Started | None = None) -> None:
        raise NotImplementedError  # `io_commands.IoCommands`

    def _fetch_now(self, sq: SubmissionQueue) -> bool:
        """Serve an I/O doorbell inside the register handler (`core.can_fetch_now` said
        the worker is parked): fetch what `sq` holds, answer reads the page cache has
        (`_io_now`), start a task for the rest, and raise one interrupt per vector at the
        end. Only mmap'd guest memory is touched here, never a message to the client
        (the deadlock rule, docs/architecture.md). False, with whatever was fetched already
        handled, when the worker must take over: a ring not in one mmap'd window, an
        unreachable address (the worker turns it into CFS) or `FETCH_NOW_LIMIT` reached."""
        budget = FETCH_NOW_LIMIT
        spent = 0  # data bytes read here (`INLINE_BYTES`)
        batch: set[int] = set()
        self._irq_batch = batch
        try:
            # the shadow tail's view is taken once and read again wherever the tail is
            # looked at (no checkpoint before we return): a view per look was two more
            # window lookups per doorbell
            tail_view = None
            if sq.shadow_db is not None:
                tail_view = self.dma.view(sq.shadow_db, 4)
                if tail_view is None:
                    return False
            while True:
                if tail_view is not None:
                    self._shadow_tail_from(sq, tail_view)
                if not sq.pending:
                    if sq.event_idx is None or self.poller.hold(sq):
                        return True  # (held: the event index stays behind while we poll)
                    # publish what we have seen, then look once more (see _drain_sq)
                    if not self._publish_event_idx(sq, tail_view):
                        return False
                    if sq.pending:
                        continue
                    return True
                if budget <= 0:
                    return False
                addr, count = sq.first_run(budget)
                view = self.dma.view(addr, count * SQE.size)
                if view is None:
                    return False
                raw = bytes(view)
                sq.advance(count)
                budget -= count
                for i in range(count):
                    cmd = Command.decode(raw, i * SQE.size)
                    spent += self._io_now(sq, cmd, self.carry(sq.qid, cmd),
                                          spent < INLINE_BYTES)
        except DmaError:
            return False
        finally:
            self._irq_batch = None
            self._raise_batch(batch)

    def _publish_event_idx(self, sq: SubmissionQueue,
                           tail_view: memoryview | None = None) -> bool:
        """Tell the host (event index) we have seen `sq` up to its tail, so its next
        submission rings the MMIO doorbell, and read the shadow tail once more (a command
        added before the host could see the new index would not ring), through
        `tail_view` when the caller holds one; False when guest memory is not mmap'd
        here."""
        assert sq.event_idx is not None
        try:
            view = self.dma.view(sq.event_idx, 4, write=True)
        except DmaError:
            return False
        if view is None:
            return False
        view[:] = sq.tail.to_bytes(4, "little")
        full_fence()  # the event index out before the shadow tail is read again
        self.poller.published_now(sq)
        if tail_view is None:
            return self._shadow_tail_now(sq)
        self._shadow_tail_from(sq, tail_view)
        return True

    def _shadow_tail_now(self, sq: SubmissionQueue) -> bool:
        assert sq.shadow_db is not None
        view = self.dma.view(sq.shadow_db, 4)
        if view is None:
            return False
        self._shadow_tail_from(sq, view)
        return True

    @staticmethod
    def _shadow_tail_from(sq: SubmissionQueue, view: memoryview) -> None:
        try:
            sq.set_tail(int.from_bytes(view, "little"))
        except DoorbellError as exc:
            log.warning("nvme: shadow %s; ignored", exc)

    def _io_now(self, sq: SubmissionQueue, cmd: Command, token: int, read: bool) -> int:
        """Complete `cmd` right away when that needs no waiting: a read the page cache
        holds (when `read`: the doorbell's `INLINE_BYTES` are not spent), or a read or
        write that fails its checks; otherwise start its task (with the PRPs already
        walked). Returns the data bytes read here."""
        segs: Segments | None = None
        if cmd.opcode in (IoOpcode.READ, IoOpcode.WRITE):
            try:
                ns, offset, length = self._rw_range(cmd)
                if cmd.psdt:
                    raise CommandError(Status.INVALID_FIELD, "SGLs are not supported")
                segs, left = prp_head(cmd.prp1, cmd.prp2, length, self.page_size)
                if left:
                    _run_now(walk_list(segs, cmd.prp2, left, self.page_size, self._list_now))
            except (CommandError, PrpError) as exc:
                self._finish_now(sq, cmd, token, exc.status)
                return 0
            except (DmaError, _NotNow):
                segs = None
            else:
                if cmd.opcode == IoOpcode.READ:
                    if read and read_cached(ns.backend, self.dma, offset, segs, length):
                        self.smart.read_commands += 1
                        self.smart.bytes_read += length
                        self._finish_now(sq, cmd, token, Status.SUCCESS)
                        return length
                elif self._write_now(sq, cmd, token, ns, offset, segs, length):
                    return 0
        self._start_io(sq, cmd, token, segs)
        return 0

    def _write_now(self, sq: SubmissionQueue, cmd: Command, token: int, ns: Namespace,
                   offset: int, segs: Segments, length: int) -> bool:
        """Start a write's backend call in a thread now, from the register handler, with
        its guest memory pinned (module docstring); False when it must go the task's way:
        an in-memory backend (no thread), no free I/O thread, memory not mmap'd."""
        if not ns.backend.threaded:
            return False
        try:
            self._threads.acquire_nowait()
        except trio.WouldBlock:
            return False
        # the pin's context manager itself, left at `__exit__` by the hand-back: an
        # ExitStack around it cost a context manager more per write
        pins = pinned_views(self.dma, segs)  # the engine's own context manager
        views = _enter(pins)
        if views is None:
            self._threads.release()
            return False
        job = _Started(sq, cmd, token, self.carried[token], length, pins,
                       self._thread_post(sq, cmd))
        threads.start_in_thread(functools.partial(self._write_in_thread, job, ns, offset, views),
                                functools.partial(self._write_done, job))
        # in flight (reset, queue deletion, shutdown and quiesce wait for it), with no task
        # until the hand-back needs one
        self._inflight[job] = sq.qid
        self.writing.add(token)
        return True

    def _thread_post(self, sq: SubmissionQueue, cmd: Command) -> _ThreadPost | None:
        """Whether a write's thread may post its own completion, and what it needs: a
        write that completes as soon as `pwritev` returns (no FUA, write cache on), a CQ
        in one mmap'd window, and its interrupt raisable from a thread (MSI-X, an engine
        that offers it) unless the CQ has interrupts off. Why: the hand-back's thread
        wake-up and GIL hand-over were ~70-170 µs of each write's latency (measured)."""
        cq = self.cqs.get(sq.cqid)
        if cq is None or cmd.cdw12 & FUA or not self.features[FeatureId.VOLATILE_WRITE_CACHE]:
            return None
        irq = None
        if cq.interrupts:
            irq = self.dev.thread_irq(cq.vector)
            if irq is None:
                return None
        pins = pinned_views(self.dma, ((cq.base, cq.size * CQE.size),), write=True)
        views = _enter(pins)
        if views is None:
            if irq is not None:
                irq.settle()
            return None
        return _ThreadPost(cq, views[0], irq, pins)

    def _write_in_thread(self, job: _Started, ns: Namespace, offset: int,
                         views: list[memoryview]) -> None:
        """The write's thread: `pwritev`, then its completion and interrupt when it may
        post them itself (`_thread_post`); a failed write raises to the hand-back."""
        ns.backend.write(offset, views)
        post = job.post
        if post is not None:
            self._post_from_thread(job, post)

    def _post_from_thread(self, job: _Started, post: _ThreadPost) -> None:
        """In the write's thread, under `_cq_lock` (the trio thread may be posting to the
        same CQ): only while the command is not cancelled, its CQ is still the controller's
        and has room, and the write cache is still on; else the hand-back posts it as
        before. The CQE is stored before the interrupt is raised, from this one thread."""
        cq = post.cq
        with self._cq_lock:
            if (job.cancel_called or self.cqs.get(cq.qid) is not cq or cq.full
                    or not self.features[FeatureId.VOLATILE_WRITE_CACHE]):
                return
            addr, phase = cq.reserve()
            at = addr - cq.base
            self._store_cqe(post.ring[at : at + CQE.size], job.sq, job.cmd.cid,
                            Status.SUCCESS, 0, phase)
            job.item.slot = (addr, phase)
            job.item.outcome = (Status.SUCCESS, 0)
            job.posted = True
        if post.irq is not None:
            post.irq.fire()

    def _write_done(self, job: _Started, result: outcome.Outcome[None]) -> None:
        """The thread of a `_write_now` write is back (on the trio thread): let go of its
        guest memory and thread, and post its completion; only when that is not all (an
        error to report, FUA or the write cache off: a flush first; no room in the CQ)
        does the write get a task, started here. A reset cancelled it: no completion."""
        try:
            result.unwrap()
        except Exception as exc:  # handed to the task, which reports it
            job.error = exc
        except BaseException:  # not an I/O error of the command: logged, the write stands as before
            log.exception("nvme: a write's thread raised")
        job.pins.__exit__(None, None, None)
        if job.post is not None:
            job.post.let_go(self.dev, job.posted)
        self._threads.release()
        item = self.carried.get(job.token)
        posted = False
        if item is not None and item is job.item:
            # (not: the controller was reset under it without waiting, `power_on`)
            self.writing.discard(job.token)
            if job.posted:  # by its thread (`_post_from_thread`)
                self.smart.write_commands += 1
                self.smart.bytes_written += job.length
                del self.carried[job.token]
                posted = True
            elif job.cancel_called:
                del self.carried[job.token]  # reset: aborted without a completion
            elif (job.error is None and not job.cmd.cdw12 & FUA
                  and self.features[FeatureId.VOLATILE_WRITE_CACHE]):
                self.smart.write_commands += 1
                self.smart.bytes_written += job.length
                item.outcome = (Status.SUCCESS, 0)
                posted = self.complete_now(job.sq, job.cmd.cid, Status.SUCCESS, 0, item)
                if posted:
                    del self.carried[job.token]
            if not posted and not job.cancel_called and self._nursery is not None:
                # the task takes its place in `_inflight` (a reset cancels the task's scope)
                scope = trio.CancelScope()
                self._inflight[scope] = self._inflight.pop(job, job.sq.qid)
                self._nursery.start_soon(self._io_task, job.sq, job.cmd, scope, job.token,
                                         None, job)
                return
        if job in self._inflight:
            # done; or no worker: the command stays carried, and the worker's next start
            # posts its outcome or runs it again
            self._inflight_done(job)

    async def _list_now(self, address: int, size: int) -> bytes:
        """A PRP list from mmap'd memory, for `_run_now` (never suspends)."""
        view = self.dma.view(address, size)
        if view is None:
            raise _NotNow
        return bytes(view)

    def _finish_now(self, sq: SubmissionQueue, cmd: Command, token: int, status: int) -> None:
        item = self.carried[token]
        item.outcome = (status, 0)
        if self.complete_now(sq, cmd.cid, status, 0, item):
            del self.carried[token]
        else:
            self._start_io(sq, cmd, token)  # posts the known outcome once there is room

    # ------------------------------------------------------------------ shared checks

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

    def _rw_range(self, cmd: Command) -> tuple[Namespace, int, int]:
        """Namespace, byte offset and length of a Read or Write, checked."""
        ns = self._namespace(cmd.nsid)
        offset, length = self._range(ns, cmd.cdw10 | (cmd.cdw11 << 32), (cmd.cdw12 & 0xFFFF) + 1)
        if length > self.max_transfer:
            raise CommandError(Status.INVALID_FIELD, f"{length} bytes > MDTS")
        return ns, offset, length

"""virtio-blk requests served from the notify handler: cached reads done on the spot, writes
started in a thread there and completed from its hand-back.

Why: a notify used to wake the queue's worker task, and the I/O started ~300 us after the
notify arrived (the session's path, a scheduler round, the worker's pop and parse), then
a write took two more thread hops through the worker before its completion. Here, while
the worker sleeps on its kick (and in the worker before it pops a batch), the chains are
popped through the mmap'd rings at once:

* a read the host's page cache holds is read with ``preadv(RWF_NOWAIT)`` straight into
  guest memory, completed and interrupted before the handler returns;
* a run of writes (``pwritev`` cannot be done without blocking: buffered RWF_NOWAIT writes
  give EOPNOTSUPP) gets its payload pinned and its thread started right there
  (`devices.sdk.threads.start_in_thread`); the thread's hand-back, on the trio thread,
  writes the status bytes, pushes the used entries and raises the interrupt
  (`InlineBlk._writes_back`), as nvme's `_write_now` does.

The first request that is neither, and everything after it, is given back
(`Virtqueue.rewind`) for the worker, which is woken as before. The rules that keep this
safe, each tested in tests/devices/virtio/test_inline_writes.py:

* **Ring order and FLUSH.** Reads are served only before the first write, one group of
  writes at most is in flight per queue, and the worker waits for it (`settle`) before it
  pops or completes anything: the used ring is written in ring order, and a FLUSH (or
  anything else) after a write completes only after that write did.
* **Reset.** The group remembers the transport's epoch and client; a status 0, NEEDS_RESET
  or another client in between, and the hand-back writes nothing to guest memory. The
  worker's exit waits for the thread (shielded), so the reset is applied, quiesce and
  detach return, and an engine's task cancellation ends, only after it is back.
* **Guest memory.** The payload is pinned (`DmaPort.pin`): a DMA_UNMAP or a disconnect
  waits for the pin, which the hand-back lets go; windows whose file could shrink are
  never mmap'd, so a pin never faults. A ring that is not mapped at hand-back (QEMU
  remapping RAM) is not written: the worker gives the group back to the ring and redoes
  it (block writes are idempotent, `state.py`).
* **Device state.** The heads stay held (popped, not pushed) until the hand-back pushes
  them, so a state saved meanwhile lists them in flight and a load redoes them; quiesce
  waits for them.
* **Bounds.** `INLINE_CHAINS` requests per call, `INLINE_BYTES` read and
  `INLINE_WRITE_BYTES` written: a handler keeps the trio thread for a bounded copy, and
  one queue pins a bounded share of guest memory.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import TYPE_CHECKING, cast

import trio

from devices.sdk.fence import full_fence
from devices.sdk.interface import DeviceContext, DmaError, DmaPort, pinned_views
from devices.sdk.storage import BlockBackend, read_cached
from devices.sdk.threads import start_in_thread

from .blkreq import OUTHDR, SECTOR, ReqStatus, ReqType, Request, pin, run_now, without_last_byte
from .guestmem import GuestMemoryError, VirtqueueError, clip
from .spec import Status
from .transport import VirtioPciDevice
from .virtqueue import RING_HEADER, USED_ELEM_SIZE, Chain, Virtqueue
from .worker import rearm_after_inline

if TYPE_CHECKING:
    import outcome

    from devices.sdk.interface import ThreadIrq

log = logging.getLogger(__name__)

#: most data bytes `InlineBlk.serve_inline` reads per call (in a handler: the rest is the
#: worker's): ~0.2 ms of memcpy at most, so other clients wait no longer than for a message
INLINE_BYTES = 1 << 20
#: and at most this many requests (many small reads cost more per byte)
INLINE_CHAINS = 32
#: most payload bytes of the writes one call starts (pinned until their thread is back):
#: four of Linux's largest requests (max_sectors_kb 1280)
INLINE_WRITE_BYTES = 5 << 20
_OK_DRIVER = Status.DRIVER_OK | Status.DEVICE_NEEDS_RESET


class _ThreadPost:
    """What a write group's thread needs to complete it itself (`InlineBlk._post_from_thread`):
    pinned views of the used ring, the avail ring and each request's status byte (pinned
    in the group's `pins`: a DMA_UNMAP waits, so the thread's stores cannot fault), and
    the queue's MSI-X vector as a `ThreadIrq`."""

    __slots__ = ("avail", "fired", "irq", "statuses", "used")

    def __init__(self, used: memoryview, avail: memoryview, statuses: list[memoryview],
                 irq: ThreadIrq) -> None:
        self.used, self.avail, self.statuses, self.irq = used, avail, statuses, irq
        #: the thread raised the interrupt (the driver wanted one)
        self.fired = False


class _Started:
    """Writes `InlineBlk._start_writes` started in a thread: what its hand-back and the
    queue's worker (`InlineBlk.settle`) share."""

    def __init__(self, queue: Virtqueue, start: int, reqs: list[Request],
                 pins: contextlib.ExitStack, epoch: int, ctx: DeviceContext,
                 post: _ThreadPost | None = None) -> None:
        self.queue, self.start, self.reqs, self.pins = queue, start, reqs, pins
        self.epoch, self.ctx = epoch, ctx
        #: set when the thread may complete the group itself, else None
        self.post = post
        #: the thread completed them (status bytes, used entries, interrupt)
        self.thread_posted = False
        self.done = trio.Event()
        #: the hand-back completed them (else the worker gives them back to the ring)
        self.posted = False
        #: the used ring turned out malformed at hand-back: the worker raises it
        self.error: VirtqueueError | None = None
        #: the notify left the worker asleep: the hand-back re-arms notifications for it
        self.rearm = False


class InlineBlk(VirtioPciDevice):
    """The notify handler's share of virtio-blk (module docstring); `blk.VirtioBlk` adds
    the backend, the worker's batches and the rest of the device."""

    backend: BlockBackend

    def __init__(self, num_queues: int, queue_size: int, poll_us: int) -> None:
        super().__init__(num_queues=num_queues, queue_size=queue_size, poll_us=poll_us)
        #: per queue: the writes started from a notify and not yet settled by the worker
        self._started: list[_Started | None] = [None] * num_queues

    @property
    def writeback(self) -> int:
        raise NotImplementedError

    def _execute(self, reqs: list[Request], write_through: bool = False) -> OSError | None:
        raise NotImplementedError

    def _in_range(self, sector: int, nbytes: int) -> bool:
        return sector >= 0 and sector * SECTOR + nbytes <= self.backend.size

    def serve_notify(self, queue: Virtqueue) -> bool:
        """A notify while the worker sleeps: `serve_inline`, and True when the worker may
        sleep on (`worker.rearm_after_inline`: nothing left for it to do)."""
        if not self.serve_inline(queue) or self.ctx is None:
            return False
        job = self._started[queue.index]
        try:
            # writes left in a thread need no worker: their hand-back completes them and
            # re-arms, or wakes the worker when it cannot (`_writes_back`)
            if not rearm_after_inline(self.polls[queue.index], queue, self.ctx.dma,
                                      later=job is not None):
                return False
        except VirtqueueError:
            return False  # the worker meets it again and sets NEEDS_RESET
        if job is not None:
            job.rearm = True
        return True

    def serve_inline(self, queue: Virtqueue) -> bool | None:
        """Serve `queue`'s first requests without waiting: cached reads, then a run of
        writes started in a thread (module docstring). False when nothing was served
        (the worker's then), None when the ring was seen empty (a polling worker skips its
        own look). By a notify while the worker sleeps, and by the worker before it pops."""
        ctx = self.ctx
        if (ctx is None or self.status & _OK_DRIVER != Status.DRIVER_OK or self.reset_pending
                or self._started[queue.index] is not None):
            return False  # (a reset asked for: nothing more reaches guest memory)
        dma = ctx.dma
        try:
            rings = queue._mapped_rings(dma)
            if rings is None:
                return False
            if not rings[2]:
                # an empty ring (a polling worker's probe, the worker after a served
                # notify): two ring views, not three
                return None
            used = dma.view(queue.used_addr, RING_HEADER + USED_ELEM_SIZE * queue.size + 2,
                            write=True)
        except (DmaError, GuestMemoryError, VirtqueueError):
            return False
        if used is None:
            return False
        avail, desc, pending = rings
        done: list[tuple[int, int]] = []
        writes: list[Request] = []
        pins = contextlib.ExitStack()
        read_budget, write_budget = INLINE_BYTES, INLINE_WRITE_BYTES
        at = first_write = queue.last_avail_idx
        try:
            while pending and len(done) + len(writes) < INLINE_CHAINS:
                at = queue.last_avail_idx
                chain = queue._take(avail, desc, dma)
                pending -= 1
                hdr = self._header(chain, dma)
                if hdr is None:
                    queue.rewind(at)
                    break
                if hdr[0] == ReqType.IN and not writes and read_budget > 0:
                    n = self._read_inline(chain, hdr[1], dma)
                    if n is not None:
                        done.append((chain.head, n + 1))
                        read_budget -= n
                        continue
                elif hdr[0] == ReqType.OUT and self.backend.threaded:
                    size = chain.readable_len - OUTHDR.size  # one pass over ~257 pieces
                    req = self._pin_write(chain, hdr[1], dma, pins, size <= write_budget)
                    if req is not None:
                        if not writes:
                            first_write = at
                        writes.append(req)
                        write_budget -= size
                        continue
                queue.rewind(at)
                break
        except (DmaError, GuestMemoryError, VirtqueueError, OSError):
            # the worker meets the same error and answers it (retry, NEEDS_RESET, IOERR)
            queue.rewind(at)
        if done:
            run_now(queue.push_many(dma, done))
        if writes:
            self._start_writes(queue, first_write, writes, pins, ctx)
        else:
            pins.close()
        if done:
            interrupt: bool = run_now(queue.should_interrupt(dma))
            if interrupt:
                self.notify_queue(queue)
        return bool(done or writes)

    @staticmethod
    def _header(chain: Chain, dma: DmaPort) -> tuple[int, int] | None:
        """(type, sector) of a request whose header is mmap'd and in one piece, else None."""
        first = chain.readable[0] if chain.readable else (0, 0)
        if first[1] < OUTHDR.size or not chain.writable:
            return None
        hdr = dma.view(first[0], OUTHDR.size)
        if hdr is None:
            return None
        rtype, _, sector = OUTHDR.unpack(hdr)
        return rtype, sector

    def _read_inline(self, chain: Chain, sector: int, dma: DmaPort) -> int | None:
        """A cached read of `chain` done, its status byte OK; the data bytes, or None (not
        cached, or not mmap'd: then nothing was written)."""
        addr, length = chain.writable[-1]
        status = dma.view(addr + length - 1, 1, write=True)
        if status is None:
            return None
        req = Request(chain, ReqType.IN, sector)
        if not self._read_nowait(req) or req.inline_written is None:
            return None
        status[0] = ReqStatus.OK
        return req.inline_written

    @staticmethod
    def _pin_write(chain: Chain, sector: int, dma: DmaPort, pins: contextlib.ExitStack,
                   fits: bool) -> Request | None:
        """A write whose payload is now pinned in `pins`, or None (it does not fit what is
        left of the budget, is empty, or is not mmap'd: the worker's then)."""
        if not fits:
            return None
        views = pin(pins, dma, clip(chain.readable, OUTHDR.size, None))
        return None if views is None else Request(chain, ReqType.OUT, sector, data=views)

    def _read_nowait(self, req: Request) -> bool:
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
        pieces = without_last_byte(req.chain.writable)
        assert self.ctx is not None
        # `read_cached(span_first=True)`: one write view of the pieces' span within
        # SPAN_LIMIT (a write view marks its whole span dirty while the client logs dirty
        # pages), sliced per piece; pieces further apart (a guest's pages usually are) go
        # through the engine's pin_ranges or a pin per piece, still here: giving them to
        # the worker instead doubled the server's CPU per guest read and cost a third of
        # the read throughput (benchmarks/README.md, "Fifth pass"). A partly cached read
        # answers False: the thread redoes the whole read.
        if not read_cached(self.backend, self.ctx.dma, req.sector * SECTOR, pieces, count,
                           span_first=True):
            return False
        req.inline_written = count
        return True

    # ------------------------------------------------------------------ started writes

    def _start_writes(self, queue: Virtqueue, start: int, reqs: list[Request],
                      pins: contextlib.ExitStack, ctx: DeviceContext) -> None:
        """One thread for the run of writes (in ring order, fsync'd after them on a
        write-through disk, as a batch of the worker's); on failure to start it they are
        the worker's."""
        job = _Started(queue, start, reqs, pins, self._epoch, ctx,
                       self._thread_post(queue, reqs, pins, ctx))
        try:
            start_in_thread(functools.partial(self._write_in_thread, job),
                            functools.partial(self._writes_back, job))
        except Exception:
            log.exception("%s: could not start a write thread; the worker does it", self.name)
            if job.post is not None:
                job.post.irq.settle()
            pins.close()
            queue.rewind(start)
            return
        self._started[queue.index] = job

    def _thread_post(self, queue: Virtqueue, reqs: list[Request], pins: contextlib.ExitStack,
                     ctx: DeviceContext) -> _ThreadPost | None:
        """Whether the group's thread may complete it itself, and what it needs (the rings
        and status bytes pinned into `pins`); None when the queue has no MSI-X vector
        raisable from a thread (INTx, no vector, an engine without `thread_signal`) or a
        ring is not mmap'd: the hand-back completes it then. Why: the hand-back's thread
        wake-up and GIL hand-over were ~250 µs of a 1 MiB write's latency in the guest
        (benchmarks/README.md, "Where a virtio-blk write's time goes")."""
        irq = self.thread_irq(queue.msix_vector)  # (NO_VECTOR is past every vector: None)
        if irq is None:
            return None
        try:
            written = pins.enter_context(pinned_views(
                ctx.dma, [(queue.used_addr, RING_HEADER + USED_ELEM_SIZE * queue.size + 2)]
                + [(a + n - 1, 1) for a, n in (req.chain.writable[-1] for req in reqs)],
                write=True))
            avail = pins.enter_context(pinned_views(
                ctx.dma, ((queue.avail_addr, RING_HEADER + 2 * queue.size + 2),)))
        except DmaError:
            written = avail = None
        if written is None or avail is None:
            irq.settle()
            return None
        return _ThreadPost(written[0], avail[0], written[1:], irq)

    def _write_in_thread(self, job: _Started) -> OSError | None:
        """The group's thread: the writes (`_execute`), then their completion when the
        thread may post it (`_post_from_thread`); a failed write is the hand-back's."""
        failure = self._execute(job.reqs, not self.writeback)
        if failure is None and job.post is not None:
            self._post_from_thread(job, job.post)
        return failure

    def _post_from_thread(self, job: _Started, post: _ThreadPost) -> None:
        """`_post` from the group's thread, through its pinned views. Nothing else writes
        this queue's used ring meanwhile: the notify handler starts nothing while a group
        is out, and the worker `settle`s it first. A reset or another client found here
        leaves it to the hand-back (which then writes nothing); one that comes after this
        look waits for the hand-back before it is applied (`settle`), so these stores land
        before it. A malformed used ring is left to the hand-back too, which meets it again
        and reports it."""
        if self._moved_on(job):
            return
        try:
            wanted = self._complete(job, post.used, post.avail, post.statuses)
        except VirtqueueError:
            return  # (checked before anything is pushed; the hand-back reports it)
        job.thread_posted = True
        if wanted:
            post.irq.fire()
            post.fired = True

    def _moved_on(self, job: _Started) -> bool:
        """A status 0, NEEDS_RESET or another client since `job` started: its completion
        must not reach guest memory any more."""
        return (self.ctx is not job.ctx or self.ctx is None or job.epoch != self._epoch
                or self.reset_pending or self.status & _OK_DRIVER != Status.DRIVER_OK)

    @staticmethod
    def _complete(job: _Started, used: memoryview, avail: memoryview,
                  statuses: list[memoryview]) -> bool:
        """Status bytes, then the used entries in ring order (`VirtqueueError` before any
        is pushed when the used ring is malformed), through views of the used ring, the
        avail ring and the status bytes; whether the driver wants an interrupt."""
        for view, req in zip(statuses, job.reqs, strict=True):
            view[0] = req.status
        q = job.queue
        q.push_mapped(used, [(req.chain.head, 1) for req in job.reqs])
        full_fence()  # the used index before the driver's used event (devices/sdk/fence.py)
        return q.should_interrupt_mapped(avail)

    def _writes_back(self, job: _Started, result: outcome.Outcome[OSError | None]) -> None:
        """The thread is back (on the trio thread, outside any task: nothing may raise
        from here). Complete the writes unless a reset, NEEDS_RESET or another client came
        meanwhile, then let go of their guest memory and wake the worker's `settle`."""
        try:
            failure = result.unwrap()
            if failure is not None and self.ctx is job.ctx and self.ctx is not None:
                # EIO from the backing file fails the device (docs/operations.md, "Health")
                self.ctx.report_failure(f"{self.name}: backing file error: {failure}")
            job.posted = job.thread_posted or self._post(job)
        except VirtqueueError as exc:
            job.error = exc
        except Exception:
            log.exception("%s: a write started from a notify failed; the worker redoes it",
                          self.name)
        finally:
            # what its thread posted stays posted whatever else failed (the worker would
            # redo it: the driver would see each completion twice)
            job.posted = job.posted or job.thread_posted
            post = job.post
            if post is not None:
                if not post.fired:
                    post.irq.settle()
                elif not self.thread_irq_stands(post.irq):
                    self.notify_queue(job.queue)  # its route changed: raise it again
            job.pins.close()
            job.done.set()
            index = job.queue.index
            if job.posted and self._started[index] is job:
                self._started[index] = None  # done: a sleeping worker has nothing to settle
                if job.rearm and self._parked[index] and not self._rearm(job):
                    self._kicks[index].set()
            elif not job.posted:
                self._kicks[index].set()  # the worker gives them back, or raises the error

    def _rearm(self, job: _Started) -> bool:
        """Notifications re-armed for the sleeping worker after its writes were posted;
        False when it must wake (more requests arrived, a ring is not mmap'd, the avail
        index is malformed: it meets that again and resets the device)."""
        try:
            return job.queue.enable_notify_mapped(job.ctx.dma) is False
        except VirtqueueError:
            return False

    def _post(self, job: _Started) -> bool:
        """Status bytes, used entries in ring order, the interrupt if the driver wants it;
        False (nothing written) when the device moved on or a ring is not mmap'd now."""
        if self._moved_on(job):
            return False
        dma, q = job.ctx.dma, job.queue
        try:
            used = dma.view(q.used_addr, RING_HEADER + USED_ELEM_SIZE * q.size + 2, write=True)
            avail = dma.view(q.avail_addr, RING_HEADER + 2 * q.size + 2)
            statuses = [dma.view(a + n - 1, 1, write=True)
                        for a, n in (req.chain.writable[-1] for req in job.reqs)]
        except DmaError:
            return False
        if used is None or avail is None or None in statuses:
            return False
        if self._complete(job, used, avail, cast("list[memoryview]", statuses)):
            self.notify_queue(q)
        return True

    async def settle(self, queue: Virtqueue) -> bool:
        """Wait for the writes a notify started on `queue` (shielded: a write cannot be
        taken back); True if there were any. Completed by the hand-back, or given back to
        the ring for the worker to redo when it could not (a ring unmapped meanwhile)."""
        job = self._started[queue.index]
        if job is None:
            return False
        if not job.done.is_set():
            with trio.CancelScope(shield=True):
                await job.done.wait()
        if self._started[queue.index] is job:  # (posted: the hand-back may have cleared it)
            self._started[queue.index] = None
        if job.error is not None:
            raise job.error
        if not job.posted and job.epoch == self._epoch and self.ctx is job.ctx:
            queue.rewind(job.start)
        return True

"""One client connection to one device: the pure-Python engine.

Structure (one task per connection, plus the device's tasks):

* The *reader loop* receives chunks, decodes every complete message in them, and handles
  commands strictly in arrival order. Handlers are synchronous except the few that must wait
  (DMA_UNMAP draining pinned DMA, DEVICE_RESET cancelling device tasks); those are awaited
  inline, so ordering holds. Replies of one chunk are batched into one `sendmsg` (a reply
  carrying fds ends its batch, so the receiver can tell whose fds they are).
* Replies to our own requests (DMA_READ / DMA_WRITE) are routed to their waiters by msg_id
  from the same loop.
* Device tasks run in a `TaskGroup` that reset, unmap-quiesce and disconnect cancel.

Deadlock rule (DESIGN.md 2.8): a region access handler is synchronous and its reply is sent
before the loop waits for anything, so a region reply can never wait for a server->client
request. Device tasks started by a register write run after that reply went out.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import trio

from devices.sdk.interface import (
    NUM_PCI_REGIONS,
    DeviceContext,
    DmaError,
    DmaPort,
    IrqIndex,
    IrqPort,
)
from protocol import (
    HEADER,
    HEADER_SIZE,
    Body,
    Capabilities,
    Command,
    Connection,
    DmaRead,
    DmaReadReply,
    DmaWrite,
    ErrorReply,
    Event,
    FatalProtocolError,
    Frame,
    HeaderFlags,
    Reply,
    Request,
    Role,
)

from . import dispatch
from .container import Container, DmaWindow
from .contract import EngineHost
from .fds import close_all
from .irq import IrqTable
from .objects import ClientId, Device, new_connection_id
from .tasks import TaskGroup
from .transport import (
    RECV_BUDGET,
    RECV_FLAGS,
    RECV_TRUNCATED,
    SEND_FLAGS,
    FdStream,
    TransportError,
)
from .waiter import Waiter

log = logging.getLogger(__name__)
wire_log = logging.getLogger("vfiouser_srv.wire")

#: replies the writer may hold for a peer that is not reading before the read loop stops
#: reading too (backpressure)
WRITE_BACKLOG_LIMIT = 8 << 20
#: Replies to a read holding many requests leave in batches of this many: one sendmsg for
#: all of them would leave a pipelining peer (QEMU on another CPU) idle until the last one
#: is done; per-reply sends would cost a syscall each. 16 replies amortise the syscall and
#: let the peer work in parallel (pipelined throughput with client and server on separate
#: CPUs: see benchmarks/README.md).
REPLY_BATCH = 16
#: reads `_hot_loop` serves before it lets trio take a turn (with `FdStream`'s own count,
#: a checkpoint at least every 64 reads)
_HOT_LOOP_READS = 63
_NO_REPLY = int(HeaderFlags.NO_REPLY)
#: how long a closing connection waits for its queued replies to go out
OUTPUT_DRAIN_TIMEOUT = 1.0

#: how long a device's DMA_READ/DMA_WRITE may wait for the client (QEMU's own is 5 s)
DMA_REQUEST_TIMEOUT = 5.0
#: Message-mode DMA moves at most this much per request, one request at a time. Our read
#: loop never blocks in send() (see `Session._send`), but QEMU's main loop does: a big
#: DMA_WRITE that fills the socket stalls QEMU (and the guest) until it is read. Keeping
#: what is in flight below the socket buffers (~200 KiB each way) keeps both sides moving.
MESSAGE_DMA_CHUNK = 64 << 10


class SessionDma:
    """The device's DmaPort for this connection."""

    def __init__(self, session: Session) -> None:
        #: None once the session ended (`Session._break_cycles`)
        self.session: Session | None = session

    @property
    def container(self) -> Container:
        c = self.session.container if self.session is not None else None
        if c is None:
            raise DmaError(errno.ENODEV, "no client attached")
        return c

    def view(self, address: int, size: int, *, write: bool = False) -> memoryview | None:
        pieces = list(self.container.spans(address, size, write))
        if len(pieces) != 1:
            return None if pieces else memoryview(b"")
        w, off, n = pieces[0]
        if w.view is None:
            return None
        return w.view[off : off + n]

    @contextlib.contextmanager
    def pin(self, address: int, size: int, *, write: bool = False) -> Iterator[memoryview | None]:
        """A view that stays valid across awaits: DMA_UNMAP of its window waits for it."""
        container = self.container
        pieces = list(container.spans(address, size, write))
        if len(pieces) != 1 or pieces[0][0].view is None:
            yield None if pieces else memoryview(b"")
            return
        w, off, n = pieces[0]
        assert w.view is not None
        with container.pin(w):
            view = w.view[off : off + n]
            try:
                yield view
            finally:
                view.release()

    @contextlib.contextmanager
    def pin_ranges(
        self, ranges: Sequence[tuple[int, int]], *, write: bool = False
    ) -> Iterator[list[memoryview] | None]:
        """Views of many ranges, each window pinned once (see `pinned_views`); None when a
        range has no mmap'd window of its own (message mode, or it spans windows)."""
        container = self.container
        views: list[memoryview] = []
        windows: dict[int, DmaWindow] = {}
        try:
            for address, size in ranges:
                w = container.find(address)
                if not (w.writable if write else w.readable):
                    raise DmaError(errno.EPERM, f"DMA window at {w.address:#x}: no access")
                off = address - w.address
                if w.view is None or off + size > w.size:
                    break
                views.append(w.view[off : off + size])
                windows[id(w)] = w
            else:
                with contextlib.ExitStack() as pins:
                    for w in windows.values():
                        pins.enter_context(container.pin(w))
                    yield views
                return
        finally:
            for v in views:
                v.release()
        yield None

    async def read(self, address: int, size: int) -> bytes:
        out = bytearray(size)
        dst = memoryview(out)
        pos = 0
        for w, off, n in self.container.spans(address, size, False):
            if w.view is not None:
                dst[pos : pos + n] = w.view[off : off + n]
            elif w.file is not None:
                w.read_into(off, dst[pos : pos + n])
            else:
                dst[pos : pos + n] = await self._message(w.owner).dma_read(w.address + off, n)
            pos += n
        dst.release()
        return bytes(out)

    async def write(self, address: int, data: bytes | bytearray | memoryview) -> None:
        mv = memoryview(data).cast("B")
        pos = 0
        for w, off, n in self.container.spans(address, len(mv), True):
            if w.view is not None:
                w.view[off : off + n] = mv[pos : pos + n]
            elif w.file is not None:
                w.write_from(off, mv[pos : pos + n])
            else:
                await self._message(w.owner).dma_write(w.address + off, mv[pos : pos + n])
            pos += n

    def _message(self, owner: Any) -> Session:
        if not isinstance(owner, Session) or owner.closed:
            raise DmaError(errno.ENODEV, "the client that mapped this window is gone")
        return owner


class Session(DeviceContext):
    """A connection to a device; also the `DeviceContext` its model sees."""

    def __init__(self, host: EngineHost, device: Device, stream: FdStream) -> None:
        #: the server hosting this engine: capabilities, limits, region specs
        self.host = host
        self.device = device
        self.stream = stream
        self.conn_id = new_connection_id()
        try:
            pid, uid, gid = stream.peercred()
        except OSError:
            pid = uid = gid = -1
        self.client = ClientId(pid, uid, gid, self.conn_id)
        self.conn = Connection(
            Role.SERVER, local_caps=host.caps, max_version_size=host.limits.max_version_size
        )
        self.container: Container | None = None
        self.irq_table: IrqTable | None = None
        self.tasks = TaskGroup(f"{device.name}#{self.conn_id}")
        self._dma = SessionDma(self)
        self._pending: dict[int, Waiter[Body | int]] = {}
        self._dma_lock = trio.Lock()
        #: (size, readable, writable) per region index, for the hot path
        self.region_limits: list[tuple[int, bool, bool]] = []
        self.max_xfer = 0
        self.attached = False
        self.closed = False
        self._close_requested = False
        #: a DMA window of this client was not sealed against shrinking (logged once)
        self.warned_unsealed = False
        #: VERSION succeeded at some point (a failed attach may be retried)
        self.attached_once = False
        self._forced = False
        self._scope = trio.CancelScope()
        self._verbose = False
        self._outq: deque[tuple[bytes, tuple[Any, ...]]] = deque()
        self._out_bytes = 0
        self._out_wakeup = trio.Event()
        self._out_room = trio.Event()
        self._out_empty = trio.Event()
        self._send_broken = False
        self.name = f"{device.name}#{self.conn_id}(pid {pid})"

    # ------------------------------------------------------------ DeviceContext

    @property
    def dma(self) -> DmaPort:
        return self._dma

    @property
    def irq(self) -> IrqPort:
        assert self.irq_table is not None
        return self.irq_table

    def start_task(self, fn: Callable[..., Awaitable[Any]], *args: Any, name: str = "") -> None:
        self.tasks.start_soon(fn, *args, name=name)

    # ------------------------------------------------------------ attach / detach

    def attach(self, caps: Capabilities) -> None:
        """VERSION succeeded: claim the group, set up DMA and IRQs, hand the model a ctx."""
        group = self.device.group
        group.claim(self.client, self.device)
        self.device.session = self
        self.device.released = trio.Event()
        self.container = group.container_for(caps.page_size, self.host.caps.max_dma_maps)
        self.container.users += 1
        self.irq_table = IrqTable(self.device.model.irqs())
        specs = self.host.region_specs(self.device)
        self.region_limits = [
            (s.size, s.readable, s.writable) if (s := specs.get(i)) else (0, False, False)
            for i in range(NUM_PCI_REGIONS)
        ]
        self.max_xfer = caps.max_data_xfer_size
        self.attached = self.attached_once = True
        self._scope.deadline = float("inf")
        self.device.model.attach(self)
        log.info("%s: attached (caps %s)", self.name, caps.to_json())

    async def detach(self) -> None:
        if not self.attached:
            return
        self.attached = False
        await self.tasks.close()
        for waiter in self._pending.values():
            waiter.settle(errno.ENOTCONN)
        self._pending.clear()
        if self.container is not None:
            windows = self.container.take_all(owner=self)
            await Container.drain(windows)
            for w in windows:
                w.release()
            self.container.users -= 1
        if self.irq_table is not None:
            self.irq_table.close()
        try:
            self.device.model.detach()
        except Exception:
            log.exception("%s: model detach failed", self.name)
        self.device.session = None
        self.device.group.release()
        if self.device.released is not None:
            self.device.released.set()
        log.info("%s: detached", self.name)

    def request_close(self) -> None:
        """Close after the current batch is flushed (EBUSY at VERSION, hot-remove timeout)."""
        self._close_requested = True

    # ------------------------------------------------------------ main loop

    def request_release(self) -> None:
        """Hot remove: signal the REQ interrupt, as vfio-pci does (QEMU may then unplug)."""
        if self.irq_table is not None:
            self.irq_table.trigger(IrqIndex.REQ, 0)

    def force_close(self) -> None:
        """Disconnect now (hot-remove deadline); detaching still runs in full."""
        self._forced = True
        self._scope.cancel()

    async def run(self) -> None:
        # A client has `limits.version_timeout` to complete VERSION (`attach` lifts the
        # deadline): one that connects and says nothing, or trickles bytes, must not hold a
        # connection slot (and, for an owned group, block its owner) forever.
        timeout = self.host.limits.version_timeout
        self._scope.deadline = trio.current_time() + timeout
        try:
            with self._scope:
                await self._run()
            if self._scope.cancelled_caught and not self._forced and not self.attached_once:
                log.warning(
                    "%s: no VERSION within %.1fs of connecting; disconnecting", self.name, timeout
                )
        finally:
            self.closed = True
            close_all(self.conn.close())
            self.stream.close()
            self._break_cycles()

    def _break_cycles(self) -> None:
        """Drop what refers back to this session, so its memory (a partly received
        megabyte frame, queued replies) is freed when the server lets go of it, not at the
        next cyclic garbage collection. The model got `detach()` and must not use us again."""
        self._dma.session = None
        self._pending.clear()
        self._outq.clear()
        self._out_bytes = 0
        self.container = None
        self.irq_table = None

    async def _run(self) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.tasks.run)
            await nursery.start(self._writer)
            try:
                await self._read_loop()
                # Whatever was answered goes out before the connection closes (e.g. the
                # EBUSY reply to a VERSION that is refused), unless the peer stopped reading.
                with trio.move_on_after(OUTPUT_DRAIN_TIMEOUT):
                    while self._outq and not self._send_broken:
                        await self._out_empty.wait()
            finally:
                with trio.CancelScope(shield=True):
                    await self.detach()
                nursery.cancel_scope.cancel()

    async def _read_loop(self) -> None:
        conn, stream = self.conn, self.stream
        hot = dispatch.HOT_COMMANDS
        run_hot = dispatch.run_hot
        verbose = self._verbose = wire_log.isEnabledFor(logging.DEBUG)
        receive_now = stream.receive_now
        while not self._close_requested:
            try:
                got = None if verbose else self._hot_loop()
                if got is None:
                    got = receive_now()
                data, fds = got if got is not None else await stream.receive_view()
            except TransportError as exc:
                log.warning("%s: %s; disconnecting", self.name, exc)
                return
            if not data:
                close_all(fds)
                log.info("%s: client closed the connection", self.name)
                return
            if not fds:
                frames, used = conn.hot_prefix(data, hot)
                if frames:  # the steady state: MMIO accesses and nothing else
                    self._run_hot_frames(data, frames)
                    if self._out_bytes > WRITE_BACKLOG_LIMIT:
                        await self._flush([])
                    if used == len(data):
                        continue
                    data = data[used:]
            try:
                conn.receive_data(data, fds)
            except FatalProtocolError as exc:
                close_all(exc.fds)
                log.warning("%s: broken stream (%s); disconnecting", self.name, exc)
                return
            out: list[bytes] = []
            while not self._close_requested:
                try:
                    item = conn.next_event_or_hot_frame(hot)
                except FatalProtocolError as exc:
                    close_all(exc.fds)
                    log.warning("%s: broken stream (%s); disconnecting", self.name, exc)
                    await self._flush(out)
                    return
                if item is None:
                    break
                if verbose:
                    _log_item(self.name, item)
                if isinstance(item, Frame):
                    reply = run_hot(self, item)
                    if reply is not None:
                        out.append(reply)
                        if len(out) >= REPLY_BATCH:
                            await self._flush(out)
                else:
                    await self._handle(item, out)
            await self._flush(out)

    def _hot_loop(self) -> tuple[memoryview, list[Any]] | None:
        """Serve one-access reads back to back, synchronously, while trio is otherwise idle.

        This is the serial round trip of a vCPU doing MMIO, the latency a guest feels. Per
        message: one poll(0) on trio's epoll descriptor (`IdleWaiter.must_yield`: does
        trio have anything to do?), one recvmsg that blocks for the next request for
        `idlewait.HOT_WAIT` at most, the handler, one send; no coroutine, scheduler round,
        EAGAIN exception or reassembly buffer. Waking from a blocking recvmsg is much
        faster than from poll() for a peer on another CPU, and on these VMs every distinct
        object touched per message shows up in the round trip (with a peer on the same
        CPU, it runs in between and evicts our caches), hence the flat style.

        Returns the first read that is not a single plain REGION_READ/WRITE (for the
        general path), or None when the caller must go through trio: it is not idle, trio
        has an event, a deadline is near, our handler woke a task, no request came within
        HOT_WAIT, the reply could not be sent whole, or 63 reads went by without a
        checkpoint.
        """
        conn, stream = self.conn, self.stream
        if self._outq or self._close_requested or not conn.hot_ready():
            return None
        waiter = stream.waiter
        deadline = waiter.idle_deadline()
        if deadline is None:
            return None
        must_yield = waiter.must_yield
        recv = stream.sock.recvmsg_into
        send = stream.sock.send
        send_flags = SEND_FLAGS
        iov, ancsize, view, flags_in = stream.iov, stream.ancsize, stream.view, RECV_FLAGS
        truncated = RECV_TRUNCATED
        unpack = HEADER.unpack_from
        hot = dispatch.HOT_COMMANDS
        run_hot_parts = dispatch.run_hot_parts
        reads = nbytes = 0
        try:
            while reads < _HOT_LOOP_READS and nbytes < RECV_BUDGET:
                if must_yield(deadline):
                    return None
                reads += 1
                try:  # blocks for the peer's next request, HOT_WAIT at most
                    n, anc, mflags, _addr = recv(iov, ancsize, flags_in)
                except OSError as exc:
                    return stream.read_failed(exc)
                nbytes += n
                if anc or mflags & truncated or n < HEADER_SIZE:
                    return stream.chunk(n, anc, mflags)
                msg_id, command, size, flags, error = unpack(view)
                # one whole frame, plain by protocol._plain_hot's rule (inlined: hot path)
                if size != n or error or command not in hot or (flags and flags != _NO_REPLY):
                    return view[:n], []
                reply = run_hot_parts(self, msg_id, command, flags, view[HEADER_SIZE:n])
                if reply is not None:
                    if stream.sending:
                        self._send(reply)
                        return None
                    try:
                        sent = send(reply, send_flags)
                    except OSError:  # full or broken: `_send` queues or records it
                        self._send(reply)
                        return None
                    if sent != len(reply):
                        self._send(reply[sent:])
                        return None
                if self._close_requested:
                    return None
            return None
        finally:
            stream.count_reads(reads, nbytes)

    def _run_hot_frames(
        self, data: memoryview, frames: list[tuple[int, int, int, int, int]]
    ) -> None:
        """Serve `Connection.hot_prefix` frames; replies leave `REPLY_BATCH` at a time.

        Synchronous (no coroutine per read on the hottest path); the caller applies the
        write backlog limit afterwards."""
        run_hot_parts = dispatch.run_hot_parts
        verbose = self._verbose
        out: list[bytes] = []
        for msg_id, command, flags, start, end in frames:
            if verbose:
                _log_item(self.name, Frame(msg_id, command, flags, 0, bytes(data[start:end]), []))
            reply = run_hot_parts(self, msg_id, command, flags, data[start:end])
            if reply is not None:
                out.append(reply)
                if len(out) >= REPLY_BATCH:
                    self._send_batch(out)
        if out:
            self._send_batch(out)

    def _send_batch(self, out: list[bytes], fds: tuple[Any, ...] = ()) -> None:
        """`_send` for a list of replies (joined, logged with -v); empties the list."""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        if self._verbose:
            _log_out(self.name, data, len(fds))
        self._send(data, fds)

    async def _handle(self, ev: Event, out: list[bytes]) -> None:
        if isinstance(ev, Request):
            result = dispatch.run_handler(self, dispatch.HANDLERS.get(ev.body.COMMAND), ev)
            if isinstance(result, tuple):  # a reply with descriptors ends its batch
                out.append(result[0])
                await self._flush(out, result[1])
            elif isinstance(result, bytes):
                out.append(result)
            elif result is not None:  # a coroutine: flush, then wait, still in order
                await self._flush(out)
                reply = await result
                if isinstance(reply, tuple):
                    await self._flush([reply[0]], reply[1])
                elif reply is not None:
                    out.append(reply)
        elif isinstance(ev, (Reply, ErrorReply)):
            self._route_reply(ev)
        else:
            rejection = dispatch.reject(self, ev)
            if rejection is not None:
                out.append(rejection)

    async def _flush(self, out: list[bytes], fds: tuple[Any, ...] = ()) -> None:
        """Send a batch of replies; waits only when the peer has stopped reading for long."""
        if out:
            self._send_batch(out, fds)
        while self._out_bytes > WRITE_BACKLOG_LIMIT and not self._close_requested:
            self._out_room = trio.Event()
            await self._out_room.wait()

    def _send(self, data: bytes, fds: tuple[Any, ...] = ()) -> None:
        """Queue one whole message (or batch) for the peer; never waits.

        The read loop must not block in send(): the peer may be blocked sending to us (a
        large DMA_READ reply while we send a large DMA_WRITE), and then neither side would
        read again. So everything outgoing, replies and our own requests alike, goes through
        one FIFO drained by the writer task; when the FIFO is empty the bytes are sent
        directly (the common case: one syscall, no task switch). Only this method and the
        writer touch the socket for sending, and the direct send happens without a
        checkpoint, so messages can never interleave.
        """
        if self._send_broken:
            return
        if not self._outq:
            try:
                sent = self.stream.send_some(data, fds)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                log.info("%s: send failed (%s)", self.name, exc)
                self._send_broken = self._close_requested = True
                return
            if sent == len(data):
                return
            if sent:
                data, fds = data[sent:], ()
        self._outq.append((data, fds))
        self._out_bytes += len(data)
        self._out_wakeup.set()

    async def _writer(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        while True:
            while not self._outq:
                self._out_empty.set()
                self._out_wakeup = trio.Event()
                await self._out_wakeup.wait()
            self._out_empty = trio.Event()
            data, fds = self._outq[0]
            try:
                await self.stream.send(data, fds)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                log.info("%s: send failed (%s)", self.name, exc)
                self._send_broken = self._close_requested = True
                self._outq.clear()
                self._out_bytes = 0
                self._out_room.set()
                return
            self._outq.popleft()
            self._out_bytes -= len(data)
            if self._out_bytes <= WRITE_BACKLOG_LIMIT:
                self._out_room.set()

    # ------------------------------------------------------------ server -> client

    def _route_reply(self, ev: Reply | ErrorReply) -> None:
        """Hand a reply to the request that waits for it. Whatever the reply carries that
        its request cannot take (descriptors: no reply to DMA_READ/DMA_WRITE has any; a
        body of another command) is closed here and now, never left to the collector."""
        waiter = self._pending.pop(ev.msg_id, None)
        if isinstance(ev, ErrorReply):
            if waiter is None:
                log.warning("%s: error reply to unknown request %d ignored", self.name, ev.msg_id)
            else:
                waiter.settle(ev.errno)
            return
        fds = ev.body.fds
        if fds:
            close_all(fds)
        if waiter is None:
            log.warning("%s: reply to unknown request %d ignored", self.name, ev.msg_id)
            return
        if waiter.command != ev.body.COMMAND or fds:
            log.warning(
                "%s: reply %d is a %s%s, the request was %s; failing it with EPROTO",
                self.name,
                ev.msg_id,
                ev.body.COMMAND.name,
                f" with {len(fds)} fd(s)" if fds else "",
                Command(waiter.command).name,
            )
            waiter.settle(errno.EPROTO)
        else:
            waiter.settle(ev.body)

    async def _request(self, body: Body) -> Body:
        if self.closed or not self.attached:
            raise DmaError(errno.ENOTCONN, "client is gone")
        msg_id, data, fds = self.conn.send_request(body)
        if msg_id in self._pending:
            raise DmaError(errno.EBUSY, "too many outstanding requests")
        waiter: Waiter[Body | int] = Waiter(body.COMMAND)
        self._pending[msg_id] = waiter
        try:
            if self._verbose:
                _log_out(self.name, data, len(fds))
            self._send(data, fds)
            if self._send_broken:
                raise DmaError(errno.ENOTCONN, "client is gone")
            with trio.move_on_after(DMA_REQUEST_TIMEOUT):
                await waiter.event.wait()
        finally:
            self._pending.pop(msg_id, None)
        if waiter.result is None:
            raise DmaError(errno.ETIMEDOUT, f"{body.COMMAND.name} got no reply")
        if isinstance(waiter.result, int):
            raise DmaError(waiter.result, f"{body.COMMAND.name} failed: errno {waiter.result}")
        return waiter.result

    def _xfer_limit(self) -> int:
        peer = self.conn.peer_caps
        return peer.max_data_xfer_size if peer else 1 << 20

    async def dma_read(self, address: int, size: int) -> bytes:
        out = bytearray()
        limit = min(self._xfer_limit(), MESSAGE_DMA_CHUNK)
        while len(out) < size:
            n = min(limit, size - len(out))
            async with self._dma_lock:
                reply = await self._request(DmaRead(address + len(out), n))
            if not isinstance(reply, DmaReadReply) or len(reply.data) != n:
                raise DmaError(errno.EIO, "short DMA_READ reply")
            out += reply.data
        return bytes(out)

    async def dma_write(self, address: int, data: bytes | bytearray | memoryview) -> None:
        mv = memoryview(data)
        limit = min(self._xfer_limit(), MESSAGE_DMA_CHUNK)
        for pos in range(0, len(mv), limit):
            async with self._dma_lock:
                await self._request(DmaWrite(address + pos, bytes(mv[pos : pos + limit])))


def _log_item(name: str, ev: Event | Frame) -> None:
    """One line per incoming message: id, command, size, flags, fds (and a summary)."""
    if isinstance(ev, Frame):
        wire_log.debug(
            "%s <- id=%d %s size=%d flags=%#x fds=0",
            name,
            ev.msg_id,
            Command(ev.command).name,
            HEADER_SIZE + len(ev.payload),
            ev.flags,
        )
    elif isinstance(ev, Request):
        wire_log.debug(
            "%s <- id=%d %s size=%d flags=%#x fds=%d %s",
            name,
            ev.msg_id,
            ev.body.COMMAND.name,
            ev.size,
            ev.flags,
            len(ev.body.fds),
            _brief(ev.body),
        )
    elif isinstance(ev, Reply):
        wire_log.debug(
            "%s <- id=%d %s reply fds=%d", name, ev.msg_id, ev.body.COMMAND.name, len(ev.body.fds)
        )
    elif isinstance(ev, ErrorReply):
        wire_log.debug(
            "%s <- id=%d command %d error reply errno=%d", name, ev.msg_id, ev.command, ev.errno
        )
    else:
        wire_log.debug("%s <- id=%d command %d rejected: %s", name, ev.msg_id, ev.command, ev.error)


def _log_out(name: str, data: bytes, nfds: int) -> None:
    """One line per outgoing message of a batch (header fields only)."""
    pos = 0
    while pos + HEADER_SIZE <= len(data):
        msg_id, command, size, flags, error = HEADER.unpack_from(data, pos)
        label = Command(command).name if command in Command._value2member_map_ else command
        wire_log.debug(
            "%s -> id=%d %s size=%d flags=%#x error=%d fds=%d",
            name,
            msg_id,
            label,
            size,
            flags,
            error,
            nfds if pos == 0 else 0,
        )
        pos += max(size, HEADER_SIZE)


def _brief(body: Body) -> str:
    text = repr(body)
    return text if len(text) <= 120 else text[:117] + "..."


__all__ = ["DMA_REQUEST_TIMEOUT", "Command", "Session", "SessionDma"]

"""One client connection to one device: the Python engine's session.

Structure (one task reading; a writer and the device's task runner, started when first
needed; docs/architecture.md):

* The *read loop* receives chunks and handles every complete message in them strictly in
  arrival order. Plain region accesses go to `access.serve` straight from the receive buffer,
  plain DMA_MAP / DMA_UNMAP to `dispatch.serve_plain` (the same codec and handler, without
  a message object); everything else is decoded into an event and handled by `dispatch`
  (handlers are synchronous except the few that must wait, DMA_UNMAP draining pinned DMA
  and DEVICE_RESET cancelling device tasks; those are awaited inline, so ordering holds).
  Replies leave in batches (`REPLY_BATCH`) through the `Outbox`; a reply carrying fds ends
  its batch, so the receiver can tell whose fds they are.
* The *serial loop* (`serial.serve_serial`, bound as our `_serve_serial`) is the latency
  path of a vCPU doing one MMIO access at a time: while trio has nothing else to do it
  waits for the next request in a blocking read (at most `idlewait.HOT_WAIT`) and answers
  it at once, without a scheduler round.
* Replies to our own requests (message-mode DMA) go to their waiters by msg_id
  (`session_dma.DmaRequests`); device tasks run in a `TaskGroup` (reset etc. cancel it).

Deadlock rule (docs/architecture.md): a region access is answered before the loop waits for
anything; the device work it starts runs in a task afterwards. Broken streams are handled in
one place (`_read_loop`'s `except`), errors in another (`errors.fail`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from devices.sdk.interface import DeviceContext, DeviceModel, DmaPort, IrqIndex, IrqPort
from protocol import (
    Capabilities,
    Command,
    Connection,
    ErrorReply,
    Event,
    FatalProtocolError,
    Frame,
    Reply,
    Request,
    Role,
)

from . import access, dispatch, serial, wirelog
from .access import Regions
from .container import Container
from .contract import EngineHost
from .fds import close_all
from .irq import IrqTable
from .migration import Migration, PerConnection
from .objects import ClientId, Device, new_connection_id
from .outbox import Outbox
from .pause import Pause
from .session_dma import DmaRequests, SessionDma
from .stats import SessionCounters
from .tasks import TaskGroup
from .trace import Tracer
from .transport import FdStream, TransportError

log = logging.getLogger(__name__)

#: Replies to a read holding many requests leave in batches of this many: one sendmsg for all
#: would leave a pipelining peer (QEMU on another CPU) idle until the last one is done, a send
#: per reply costs a syscall each (pipelined throughput: benchmarks/README.md).
REPLY_BATCH = 16
_REGION_ACCESS = (int(Command.REGION_READ), int(Command.REGION_WRITE))
#: a reply this big is sent (and backpressure applied) at once instead of being batched
_BIG_REPLY = 64 << 10
_INF = float("inf")
#: how long a closing connection waits for its queued replies to go out
OUTPUT_DRAIN_TIMEOUT = 1.0


class Session(DeviceContext):
    """A connection to a device; also the `DeviceContext` its model sees."""

    # What a connection starts with, as class attributes: an instance sets its own only when
    # it changes them (two dozen stores per connection were ~1% of a connect's cost).
    # `attached_once`: VERSION succeeded at some point (a failed attach may be retried);
    # `warned_unsealed`: a window of this client was not sealed against shrinking (logged once)
    attached = attached_once = closed = warned_unsealed = False
    _close_requested = _forced = _verbose = _no_serial = _counted = False
    container: Container | None = None
    _irq_table: IrqTable | None = None
    #: the device's regions (`access.Regions`), set at VERSION (the shared, empty NONE before)
    regions: Regions = Regions.NONE
    #: migration v2 of the device through this connection (`migration`), built on first use
    migration = PerConnection()
    _migration: Migration | None = None
    #: the scope the session waits in now (a read epoch, a pause), for `force_close`; the
    #: session has none of its own
    _scope: trio.CancelScope | None = None
    #: trio time by which VERSION must be complete, fixed when the session first waits
    #: for the client before VERSION (`_version_deadline`); None until then
    _version_by: float | None = None
    #: where the message log goes (`set_trace`)
    wire: logging.Logger = wirelog.wire_log
    #: `--trace` / `trace-on format=trace` (`trace.Tracer`), else None; with -v, every
    #: message takes the general path (`_no_serial`: no serial loop)
    tracer: Tracer | None = None
    #: a live upgrade asked this session to stop at a message boundary
    pause: Pause | None = None
    #: the read epoch's scope while it waits to read (`_read_loop`): `request_pause` cancels
    _waiting: trio.CancelScope | None = None
    #: an unmap the serial loop started that waits for pinned DMA (the read loop awaits it)
    _deferred: Awaitable[bytes | None] | None = None

    def __init__(self, host: EngineHost, device: Device, stream: FdStream) -> None:
        #: the server hosting this engine: capabilities, limits, region specs
        self.host = host
        self.device = device
        self.model: DeviceModel = device.model
        self.stream = stream
        self.conn_id = conn_id = new_connection_id()
        try:
            pid, uid, gid = stream.peercred()
        except OSError:
            pid = uid = gid = -1
        self.client = ClientId(pid, uid, gid, conn_id)
        self.name = name = f"{device.name}#{conn_id}(pid {pid})"
        self.conn = Connection(
            Role.SERVER, local_caps=host.caps, max_version_size=host.limits.max_version_size
        )
        self.outbox = Outbox(stream, name)
        self.requests = DmaRequests(self.conn, self.outbox, name)
        self._dma = SessionDma()
        self.tasks = TaskGroup(f"{device.name}#{conn_id}", self.report_failure)

    # ------------------------------------------------------------ DeviceContext

    @property
    def dma(self) -> DmaPort:
        return self._dma

    @property
    def irq(self) -> IrqPort:
        table = self.irq_table
        assert table is not None
        return table

    @property
    def irq_table(self) -> IrqTable | None:
        """The IRQ table while attached, built on first use (a tenth of a connect's cost)."""
        table = self._irq_table
        if table is None and self.attached:
            table = self._irq_table = IrqTable(self.model.irqs())
        return table

    def start_task(self, fn: Callable[..., Awaitable[Any]], *args: Any, name: str = "") -> None:
        self.tasks.start_soon(fn, *args, name=name)

    # ------------------------------------------------------------ attach / detach

    def attach(self, caps: Capabilities, *, model: bool = True) -> None:
        """VERSION succeeded: claim the group, set up DMA and IRQs, hand the model a ctx.

        A session restored by a live upgrade attaches with `model=False`: its windows and
        eventfds are filled in first, and the model gets its ctx when the session runs."""
        group = self.device.group
        group.claim(self.client, self.device)
        self.device.attached(self)
        self.container = group.container_for(caps.page_size, self.host.caps.max_dma_maps)
        self.container.users += 1
        self._dma.attached_to = self.container
        self.regions = Regions(self.host.region_specs(self.device), caps.max_data_xfer_size)
        self.attached = self.attached_once = True
        scope = self._scope
        if scope is not None and scope.deadline != _INF:  # the VERSION deadline: lifted
            scope.deadline = _INF
        if model:
            self.model.attach(self)
        if log.isEnabledFor(logging.INFO):  # caps.to_json() is not free
            log.info("%s: attached (caps %s)", self.name, caps.to_json())
        if self.device.events.listeners:
            self.device.events.emit("CLIENT_ATTACHED", self._event_data())

    async def detach(self) -> None:
        if not self.attached:
            return
        self.attached = False
        PerConnection.close(self)  # lets go of the group before the session does
        await self.tasks.close()
        self.requests.fail_all()
        if self.container is not None:
            windows = self.container.take_all(owner=self.requests)
            await Container.drain(windows)
            for w in windows:
                w.release()
            self.container.users -= 1
        if self._irq_table is not None:
            self._irq_table.close()
        try:
            self.model.detach()
        except Exception:
            log.exception("%s: model detach failed", self.name)
        self.device.group.release()
        self.device.detached()
        log.info("%s: detached", self.name)
        if self.device.events.listeners:
            self.device.events.emit("CLIENT_DETACHED", self._event_data())

    # ------------------------------------------------------------ operations (control socket)

    def _event_data(self) -> dict[str, Any]:
        c = self.client
        return {"device": self.device.name, "connection": self.conn_id, "pid": c.pid, "uid": c.uid}

    def count_error(self, command: int, err: int) -> None:
        """`errors.ReplyContext.count_error`: a failed region access counts as a message too
        (the packed counters hold only those served)."""
        stats = self.device.stats
        stats.errors[err] += 1
        if command in _REGION_ACCESS:
            stats.messages[command] += 1

    def counters(self) -> SessionCounters:
        """What this session counted itself (`stats`); zero once folded into the device's."""
        return SessionCounters(*self._counts()) if not self._counted else SessionCounters()

    def _counts(self) -> tuple[int, int, int, int, int]:
        table, dma = self._irq_table, self._dma
        fired = table.fired if table is not None else 0
        return self.regions.rd, self.regions.wr, dma.read_bytes, dma.written_bytes, fired

    def report_failure(self, reason: str) -> None:
        """The device failed under this client (a device task raised, a backend broke): mark
        it unhealthy (its group is non-viable until reset or removal) and raise the ERR
        interrupt, as vfio-pci does on an AER error (docs/operations.md, "Health")."""
        self.device.set_health(False, reason)
        if self.irq_table is not None:
            self.irq_table.trigger(IrqIndex.ERR, 0)

    def set_trace(self, logger: logging.Logger | None) -> None:
        """`trace-on`/`trace-off`: log every message of this session to `logger` (None: back
        to `-v`'s log if that is on)."""
        if logger is None and wirelog.enabled():
            logger = wirelog.wire_log
        self._verbose = self.outbox.verbose = logger is not None
        self.wire = self.outbox.wire = logger or wirelog.wire_log
        self._no_serial = self._verbose or self.tracer is not None

    def set_tracer(self, tracer: Tracer | None) -> None:
        """Write this session's messages to a trace file (`trace.Tracer`), or stop."""
        old = self.tracer
        if old is tracer:
            return
        if old is not None:
            old.disconnect(self.conn_id)
        self.tracer = self.outbox.tracer = tracer
        self.outbox.trace_conn = self.conn_id
        if tracer is not None:
            info = {**self._event_data(), "model": type(self.model).__name__}
            # joined: the connection is past VERSION (trace-on mid-session): not replayable
            tracer.connect(self.conn_id, {**info, "joined": self.attached_once})
        self._no_serial = self._verbose or tracer is not None

    def request_close(self) -> None:
        """Close after the current batch is flushed (EBUSY at VERSION, hot-remove timeout)."""
        self._close_requested = True
        self.outbox.closing = True

    def request_release(self) -> None:
        """Hot remove: signal the REQ interrupt, as vfio-pci does (QEMU 11.1 sets no REQ
        eventfd, so it hears nothing: docs/operations.md, "Hot-plug with QEMU")."""
        if self.irq_table is not None:
            self.irq_table.trigger(IrqIndex.REQ, 0)

    def force_close(self) -> None:
        """Disconnect now (hot-remove deadline); detaching still runs in full.

        The session has no cancel scope of its own (one was ~8% of a connect + VERSION +
        close): every loop ends at its next check (`closing`), the outbox stops waiting
        for room and sends nothing more (`Outbox.abandon`), and the scope the session
        waits in, if any (a read epoch, a pause), is cancelled. The first epoch has no
        scope; the only waits it can be in besides the outbox's are handlers that drain
        pinned DMA, reset or quiesce the device, each bounded by its own timeout (and
        `detach` waits for the same drains)."""
        self._forced = self._close_requested = True
        self.outbox.abandon()
        if self._scope is not None:
            self._scope.cancel()

    @property
    def closing(self) -> bool:
        return self._close_requested or self.outbox.broken

    def request_pause(self, pause: Pause) -> None:
        """Live upgrade: stop at the next message boundary (see `Pause`)."""
        self.pause = pause
        if self._waiting is not None:
            self._waiting.cancel()

    async def _park(self, pause: Pause) -> bool:
        """Wait out a pause; True when the connection was handed over (end quietly)."""
        await self.outbox.drain(OUTPUT_DRAIN_TIMEOUT)
        if self.outbox.pending:
            return False  # the peer is not reading: no handover (the taker times out)
        if await pause.hold(self.name):
            return True
        self.pause = None
        return False

    # ------------------------------------------------------------ the connection's life

    async def run(self) -> None:
        # No nursery (~15% of a connect) and no scope of our own (`force_close`): the
        # device-task runner and the writer, if needed, run in the server's until we end;
        # the VERSION deadline is on the scopes we wait in (`_version_deadline`).
        try:
            await self._run()
        finally:
            self.closed = True
            self.tasks.stop()  # (after `detach`, nothing left to stop: unless it raised)
            self.outbox.stop()
            self.set_tracer(None)
            if self.pause is not None:
                self.pause.changed.set()
            self.requests.fail_all()
            close_all(self.conn.close())
            self.stream.close()
            self.device.stats.fold(*self._counts())
            self._counted = True
            self.tasks.on_failure = None  # no cycle: a closed session is freed at once
            # Whatever is still queued is garbage now: free it with the session, at once.
            self.outbox.clear()
            self._dma.attached_to = None
            self.container = None
            self._irq_table = None

    async def _run(self) -> None:
        # the device's task runner and the writer start when first needed (`start_in`)
        self.tasks.start_in(self.host.start_soon)
        self.outbox.start_in(self.host.start_soon)
        if self.attached:  # restored by a live upgrade: the model gets its ctx now
            self.model.attach(self)
        try:
            await self._read_loop()
            # Whatever was answered goes out before the connection closes (e.g. the
            # EBUSY reply to a VERSION that is refused), unless the peer stopped reading.
            await self.outbox.drain(OUTPUT_DRAIN_TIMEOUT)
        finally:
            # shielded if `detach` can reach a checkpoint (device tasks to stop, pinned windows;
            # nothing before those yields), else no scope: one is ~2% of a connect
            c = self.container
            if self.attached and (self.tasks.started or (c is not None and any(w.pins for w in c))):
                with trio.CancelScope(shield=True):
                    await self.detach()
            else:
                await self.detach()

    def _version_deadline(self) -> float:
        """When a session that has not completed VERSION must stop waiting for it.

        A client has `limits.version_timeout` to complete VERSION: one that connects and
        says nothing, or trickles bytes, must not hold a connection slot (and, for an owned
        group, block its owner) forever. Before VERSION a session waits for its client only
        in a read epoch or a pause (`_read_loop`), so the deadline goes on those scopes,
        fixed at the first wait: up to then the session ran without yielding, on bytes
        already received. A connect + VERSION that never waits sets no trio deadline at
        all (setting one and lifting it at VERSION was two deadline updates, ~6% of a
        connect: benchmarks/README.md)."""
        by = self._version_by
        if by is None:
            by = self._version_by = trio.current_time() + self.host.limits.version_timeout
        return by

    def _no_version(self) -> None:
        log.warning(
            "%s: no VERSION within %.1fs; disconnecting",
            self.name,
            self.host.limits.version_timeout,
        )

    async def _read_loop(self) -> None:
        """Read, handle everything that arrived, repeat; the one place a broken stream ends
        the connection. It reads in *epochs*, one cancel scope from pause to pause (a scope
        per wait was a quarter of a message's cost with many connections: benchmarks/
        README.md, "Scale"); `request_pause` cancels it only while it waits for data
        (`FdStream.wait_ready`, which reads nothing: a cancel there loses nothing)."""
        dev = self.device
        if dev.trace is not None or wirelog.enabled():  # (else the defaults stand)
            self.set_trace(dev.trace)
        if dev.tracer is not None:
            self.set_tracer(dev.tracer)
        out: list[bytes] = []
        # The first epoch opens no scope until it must wait (None; later ones start with the
        # wait): a connect + VERSION + close often never waits, and a scope is ~4% of that.
        wait: bool | None = False
        try:
            while not self.closing:
                pause = self.pause
                if pause is not None and self.conn._decoder.idle:  # a message boundary
                    handed = False
                    deadline = _INF if self.attached else self._version_deadline()
                    with trio.CancelScope(deadline=deadline) as held:
                        self._scope = held
                        handed = await self._park(pause)
                    self._scope = None
                    if handed:
                        return
                    if held.cancelled_caught and not self._forced:  # the VERSION deadline
                        self._no_version()
                        return
                    continue
                if wait is False:
                    wait = await self._read_epoch(None, out)
                else:
                    deadline = _INF if self.attached else self._version_deadline()
                    with trio.CancelScope(deadline=deadline) as epoch:
                        self._scope = epoch
                        wait = await self._read_epoch(epoch, out, wait=wait is None)
                    self._waiting = self._scope = None
                    # cancelled: by `request_pause` (read on), `force_close` (`closing`
                    # ends the loop) or the VERSION deadline
                    if (
                        epoch.cancelled_caught
                        and not (self.attached or self._forced)
                        and self.pause is None
                    ):
                        self._no_version()
                        return
                if wait:
                    log.info("%s: client closed the connection", self.name)
                    return
        except (FatalProtocolError, TransportError) as exc:
            if isinstance(exc, FatalProtocolError):
                close_all(exc.fds)
            log.warning("%s: broken stream (%s); disconnecting", self.name, exc)
            await self.outbox.flush(out)

    async def _read_epoch(
        self, epoch: trio.CancelScope | None, out: list[bytes], wait: bool = False
    ) -> bool | None:
        """`_read_loop` until a pause's message boundary or closing (False) or EOF (True),
        or (without `epoch`) until it must wait (None; `wait`: wait before reading).
        After a wait, the serial loop reads first (`ready`: no poll before that read)."""
        stream, decoder = self.stream, self.conn._decoder
        receive_now = stream.receive_now
        ready = False
        while not self.closing:
            if self.pause is not None and decoder.idle:
                return False
            got = None if wait or self._no_serial else self._serve_serial(ready)
            ready = False
            if got is None and self._deferred is not None:  # the serial loop's unmap
                deferred, self._deferred = self._deferred, None
                await self.outbox.flush([r] if (r := await deferred) is not None else [])
                continue
            if got is None and (wait or (got := receive_now()) is None):
                wait = False
                if epoch is None:
                    return None
                self._waiting = epoch
                ready = await stream.wait_ready()
                self._waiting = None
                if self.pause is not None:  # maybe cancelled: read on in a new epoch
                    return False
                continue
            data, fds = got
            if not data:
                close_all(fds)
                return True
            await self._handle_chunk(data, fds, out)
        return False

    async def _handle_chunk(self, data: memoryview, fds: list[Any], out: list[bytes]) -> None:
        """Everything complete in one read, in order: plain region accesses straight from
        the buffer, the rest as events. Returns with nothing of `data` left unparsed in
        place (the decoder copies a partial frame), so the buffer may be read into again."""
        conn, outbox = self.conn, self.outbox
        fast = access.FAST_COMMANDS
        serve = access.serve
        if self.tracer is not None:
            self.tracer.incoming(self.conn_id, data, fds)
        conn.receive_data(data, fds)
        while not self.closing:
            for msg_id, command, flags, payload in conn.take_plain(fast):
                if self._verbose:
                    wirelog.log_fast(
                        self.name, msg_id, command, flags, len(payload) + 16, self.wire
                    )
                if command in _REGION_ACCESS:
                    reply = serve(self, msg_id, command, flags, payload)
                else:
                    got = dispatch.serve_plain(self, msg_id, command, flags, payload)
                    if got is None or isinstance(got, bytes):
                        reply = got
                    else:  # wait (unmap of a pinned window), still in order
                        await outbox.flush(out)
                        reply = await got
                if reply is not None:
                    out.append(reply)
                    # a batch is due, or big replies pile up: send, and wait while the peer
                    # leaves too much unread (the payload views stay valid: this stream's
                    # buffer is not read into again until the chunk is done)
                    if len(out) >= REPLY_BATCH or len(reply) > _BIG_REPLY:
                        await outbox.flush(out)
            ev = conn.next_event()
            if ev is None:
                break
            if self._verbose:
                wirelog.log_in(self.name, ev, self.wire)
            await self._handle(ev, out)
        await self.outbox.flush(out)

    #: the serial loop (`vfiouser_srv.serial`), a method of ours
    _serve_serial = serial.serve_serial

    def full_path(
        self, msg_id: int, command: int, flags: int, payload: bytes | memoryview
    ) -> bytes | None:
        """`access.AccessContext.full_path`: decode a region access the fast path would not
        answer itself and run it like any other message."""
        return dispatch.run_frame(self, Frame(msg_id, command, flags, 0, bytes(payload), []))

    async def _handle(self, ev: Event, out: list[bytes]) -> None:
        if isinstance(ev, Request):
            result = dispatch.run_request(self, ev)
            if isinstance(result, tuple):  # a reply with descriptors ends its batch
                out.append(result[0])
                await self.outbox.flush(out, result[1])
            elif isinstance(result, bytes):
                out.append(result)
            elif result is not None:  # a coroutine: flush, then wait, still in order
                await self.outbox.flush(out)
                reply = await result
                if isinstance(reply, tuple):
                    await self.outbox.flush([reply[0]], reply[1])
                elif reply is not None:
                    out.append(reply)
        elif isinstance(ev, (Reply, ErrorReply)):
            self.requests.route_reply(ev)
        else:
            rejection = dispatch.reject(self, ev)
            if rejection is not None:
                out.append(rejection)


__all__ = ["OUTPUT_DRAIN_TIMEOUT", "REPLY_BATCH", "Pause", "Session"]

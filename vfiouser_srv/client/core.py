"""The connection core: one reader task, request/reply matching by msg_id, and sending.

Shape (trio-websocket's): the sans-IO `protocol.Connection` decodes, one reader task turns
events into waiter wake-ups and DMA answers, one writer task sends the DMA answers (so the
reader never blocks on a send: if both peers blocked sending large messages to each other
with full socket buffers, neither would ever read again). Callers send their own requests
directly, one `sendmsg` per message, and wait for the reply routed to them by msg_id.

This module knows no command but VERSION (whose reply the codec only accepts in the
NEGOTIATING phase); the typed commands live on `Client`, one layer up.

Resource handling
    Descriptors that arrive in replies become `OwnedFd`s (the transport does that). Those a
    method hands out (the MMAP fd of `region_info`, `region_io_fds`, `request_raw` bodies)
    belong to the caller. Every other one (replies nobody waits for, replies of cancelled
    calls, truncated argsz replies, rejected messages) is closed here, and `close()` closes
    whatever was delivered but never taken, the guest RAM and the socket.

Error handling
    An error reply raises `VfioUserError` (an `OSError` with the reply's errno). A reply that
    cannot be decoded raises the codec's `RemoteProtocolError` in the caller that waited for
    it. If the server closes the stream or breaks framing, every pending and later call raises
    `trio.BrokenResourceError`; after our own `aclose()` they raise
    `trio.ClosedResourceError`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from typing import Any

import trio

from protocol import (
    HEADER_SIZE,
    Body,
    Capabilities,
    Command,
    Connection,
    ErrorReply,
    Event,
    HeaderFlags,
    Phase,
    ProtocolError,
    Reply,
    Request,
    Role,
    pack_header,
)

from ..fds import close_all
from ..transport import FdStream, TransportError
from ..waiter import Waiter
from .eventfd import FdLike
from .memory import GuestMemory
from .replies import B, check_reply, event_fds

log = logging.getLogger(__name__)

#: what we propose in VERSION unless told otherwise. max_msg_fds is what *we* can receive
#: per message (a GET_REGION_IO_FDS reply may carry several); the rest are the spec defaults.
DEFAULT_CLIENT_CAPS = Capabilities(max_msg_fds=16)

#: server->client commands; a malformed frame of any other command is a reply gone wrong
_SERVER_REQUESTS = frozenset({Command.DMA_READ, Command.DMA_WRITE})
#: pipelined requests without fds are coalesced into sends of about this size
_COALESCE_BYTES = 256 * 1024


class _Call(Waiter[Reply | ErrorReply]):
    """A client request in flight: the shared `Waiter`, plus what only the client needs."""

    __slots__ = ("on_reply", "prev_phase")

    def __init__(
        self,
        command: int,
        *,
        prev_phase: Phase | None = None,
        on_reply: Callable[[Body], None] | None = None,
    ) -> None:
        super().__init__(command)
        #: for VERSION: the codec phase to restore if the server refuses it
        self.prev_phase = prev_phase
        #: runs in the reader when a success reply arrives, before any later message is
        #: handled (so a DMA window is known as mapped before the server's first DMA_READ)
        self.on_reply = on_reply


class Pending:
    """A request that was sent and whose reply has not been collected yet."""

    __slots__ = ("_client", "_taken", "_waiter", "msg_id")

    def __init__(self, client: ClientCore, msg_id: int, waiter: _Call) -> None:
        self._client = client
        self.msg_id = msg_id
        self._waiter = waiter
        self._taken = False

    @property
    def command(self) -> int:
        return self._waiter.command

    @property
    def done(self) -> bool:
        return self._waiter.done

    async def wait_reply(self) -> Reply | ErrorReply:
        """The reply (or error reply) routed to this request. Collect it once.

        Raises the codec's `RemoteProtocolError` for an undecodable reply,
        `trio.BrokenResourceError` if the connection died first, `trio.TooSlowError` after
        the client's `reply_timeout`. If cancelled, the reply is dropped (its fds closed)
        when it arrives.
        """
        if self._taken:
            raise RuntimeError(f"reply to msg_id {self.msg_id} already collected")
        w = self._waiter
        timeout = self._client.reply_timeout
        try:
            with trio.fail_after(timeout) if timeout is not None else nullcontext():
                await w.event.wait()
        except BaseException:
            if not w.done:
                w.abandoned = True
            raise
        self._taken = True
        self._client._untaken.discard(w)
        if w.error is not None:
            raise w.error
        assert w.result is not None
        return w.result

    def abandon(self) -> None:
        """Give up on the reply: it is dropped (fds closed) whenever it comes."""
        if self._taken:
            return
        self._taken = True
        w = self._waiter
        if not w.done:
            w.abandoned = True
        else:
            self._client._untaken.discard(w)
            close_all(event_fds(w.result))


class ClientCore:
    """The connection without its commands; `Client` adds them. Not made directly.

    `memory` is passed in rather than made here because it maps windows by calling back
    into `Client.dma_map`, a layer above this one: `Client` makes it with itself as owner.
    """

    def __init__(
        self,
        stream: FdStream,
        memory: GuestMemory,
        *,
        caps: Capabilities | None = None,
        reply_timeout: float | None = None,
    ) -> None:
        self.stream = stream
        #: what we propose in VERSION (and what our decoder accepts)
        self.caps = caps or DEFAULT_CLIENT_CAPS
        #: seconds any call waits for its reply before `trio.TooSlowError` (None: forever)
        self.reply_timeout = reply_timeout
        #: answers the server's DMA requests (the reader hands it each one)
        self.memory = memory
        #: replies that matched no request (a server answering a posted write, say); their
        #: fds are already closed
        self.unexpected: list[Reply | ErrorReply] = []
        self._conn = Connection(Role.CLIENT, local_caps=self.caps)
        self._waiters: dict[int, _Call] = {}
        self._untaken: set[_Call] = set()
        self._next_id = 0
        self._out_send, self._out_recv = trio.open_memory_channel[tuple[bytes, tuple[Any, ...]]](
            math.inf
        )
        self._closed = False
        #: set when the server went away; `_lost_cause` says why, if we know more than EOF
        self._lost = False
        self._lost_cause: BaseException | None = None
        self._disconnected = trio.Event()

    # ---------------------------------------------------------------- state

    @property
    def server_caps(self) -> Capabilities:
        """The capabilities the server replied with; RuntimeError before VERSION completed."""
        if self._conn.caps is None:
            raise RuntimeError("VERSION has not completed")
        return self._conn.caps

    @property
    def negotiated(self) -> bool:
        return self._conn.caps is not None

    @property
    def closed(self) -> bool:
        """True once the connection is unusable (our aclose, or the server went away)."""
        return self._closed or self._lost

    @property
    def in_flight(self) -> int:
        """Requests sent whose replies have not arrived (abandoned ones included)."""
        return len(self._waiters)

    async def wait_disconnected(self) -> None:
        """Return once the server has closed the stream (or we did)."""
        await self._disconnected.wait()

    def _check_usable(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("client closed")
        if self._lost:
            raise trio.BrokenResourceError("connection lost") from self._lost_cause

    # ---------------------------------------------------------------- sending

    def _alloc_id(self) -> int:
        """Next 16-bit msg_id not still waiting for a reply (ids wrap after 65536)."""
        for _ in range(0x10000):
            msg_id = self._next_id
            self._next_id = (msg_id + 1) & 0xFFFF
            if msg_id not in self._waiters:
                return msg_id
        raise RuntimeError("all 65536 message ids are in flight")

    def _version_phase(self, command: int) -> Phase | None:
        """Before sending VERSION: put the codec in NEGOTIATING so it accepts the reply.

        The codec's table forbids a second VERSION, but the server's tests must send one;
        the phase to restore if the server refuses it is kept with the waiter.
        """
        if command != Command.VERSION:
            return None
        prev = self._conn.phase
        self._conn.phase = Phase.NEGOTIATING
        return prev

    async def _send(self, data: bytes, fds: Sequence[Any] = ()) -> None:
        self._check_usable()
        try:
            await self.stream.send(data, fds)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self._check_usable()  # say *why* it is closed, if we know
            raise

    def _register(
        self, command: int, on_reply: Callable[[Body], None] | None = None
    ) -> tuple[int, _Call]:
        self._check_usable()
        prev = self._version_phase(command)
        msg_id = self._alloc_id()
        waiter = _Call(command, prev_phase=prev, on_reply=on_reply)
        self._waiters[msg_id] = waiter
        return msg_id, waiter

    def _unregister_failed(self, waiter: _Call) -> None:
        """The request may not have gone out: keep its id reserved, restore VERSION phase."""
        waiter.abandoned = True
        if waiter.prev_phase is not None and self._conn.phase is Phase.NEGOTIATING:
            self._conn.phase = waiter.prev_phase

    @staticmethod
    def _frame(msg_id: int, command: int, payload: bytes | Body, flags: int) -> bytes:
        """One message; a `Body` is encoded here, once its msg_id is taken."""
        data = payload if isinstance(payload, bytes) else payload.encode()
        return pack_header(msg_id, command & 0xFFFF, HEADER_SIZE + len(data), flags) + data

    async def _start(
        self,
        command: int,
        payload: bytes | Body,
        fds: Sequence[FdLike],
        flags: int,
        on_reply: Callable[[Body], None] | None = None,
    ) -> Pending:
        """Register a waiter, then send: the reply can never beat its waiter."""
        msg_id, waiter = self._register(command, on_reply)
        try:
            await self._send(self._frame(msg_id, command, payload, flags), fds)
        except BaseException:
            self._unregister_failed(waiter)
            raise
        return Pending(self, msg_id, waiter)

    async def _post(
        self, command: int, payload: bytes | Body, fds: Sequence[FdLike], flags: int
    ) -> int:
        self._check_usable()
        msg_id = self._alloc_id()
        await self._send(self._frame(msg_id, command, payload, flags | HeaderFlags.NO_REPLY), fds)
        return msg_id

    async def submit(
        self, body: Body, *, _on_reply: Callable[[Body], None] | None = None
    ) -> Pending:
        """Send a request and return at once; `await pending.wait_reply()` later.

        Commands are sent whatever the connection phase (a test may want a DEVICE_GET_INFO
        before VERSION); only the server decides whether that is allowed.
        """
        return await self._start(body.COMMAND, body, body.fds, HeaderFlags.TYPE_COMMAND, _on_reply)

    async def submit_many(self, bodies: Iterable[Body]) -> list[Pending]:
        """Send many requests back to back; messages without fds share `sendmsg` calls."""
        pendings: list[Pending] = []
        batch = bytearray()
        try:
            for body in bodies:
                msg_id, waiter = self._register(body.COMMAND)
                pendings.append(Pending(self, msg_id, waiter))
                frame = self._frame(msg_id, body.COMMAND, body, HeaderFlags.TYPE_COMMAND)
                if body.fds:
                    if batch:
                        await self._send(bytes(batch))
                        batch.clear()
                    await self._send(frame, body.fds)
                else:
                    batch += frame
                    if len(batch) >= _COALESCE_BYTES:
                        await self._send(bytes(batch))
                        batch.clear()
            if batch:
                await self._send(bytes(batch))
        except BaseException:
            for p in pendings:
                self._unregister_failed(p._waiter)
            raise
        return pendings

    async def pipeline(self, bodies: Iterable[Body]) -> list[Reply | ErrorReply]:
        """Send every request, then collect every reply, in order (for benchmarks).

        Error replies are returned, not raised; `reply_body()` raises them.
        """
        pendings = await self.submit_many(bodies)
        out: list[Reply | ErrorReply] = []
        try:
            for p in pendings:
                out.append(await p.wait_reply())
        except BaseException:
            for p in pendings[len(out) :]:
                p.abandon()
            raise
        return out

    async def post(self, body: Body) -> int:
        """Send a request with the No_reply flag; returns its msg_id without waiting."""
        return await self._post(body.COMMAND, body, body.fds, HeaderFlags.TYPE_COMMAND)

    async def call(self, body: Body, expect: type[B]) -> B:
        """Send one request and return its reply body, checked to be of type `expect`."""
        return check_reply(await (await self.submit(body)).wait_reply(), expect)

    # ---------------------------------------------------------------- raw access

    async def request_raw(
        self,
        command: int,
        payload: bytes = b"",
        fds: Sequence[FdLike] = (),
        flags: int = HeaderFlags.TYPE_COMMAND,
    ) -> Reply | ErrorReply:
        """Send a hand-built message (header from `pack_header`) and await its reply.

        The msg_id comes from the same counter as every other request and the reply is
        routed by it. Fds in a successful reply's body belong to the caller.
        """
        if flags & HeaderFlags.NO_REPLY:
            raise ValueError("No_reply messages get no reply: use post_raw()")
        return await (await self._start(command, payload, fds, flags)).wait_reply()

    async def post_raw(
        self,
        command: int,
        payload: bytes = b"",
        fds: Sequence[FdLike] = (),
        flags: int = HeaderFlags.TYPE_COMMAND,
    ) -> int:
        """Like `request_raw` with No_reply set: returns the msg_id without waiting."""
        return await self._post(command, payload, fds, flags)

    async def send_bytes(self, data: bytes, fds: Sequence[FdLike] = ()) -> None:
        """Put arbitrary bytes (and fds) on the wire: for broken headers and split frames."""
        await self._send(data, fds)

    # ---------------------------------------------------------------- reader

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The reader and the DMA-reply writer, for `nursery.start(client.run)`.

        `open_client` does this for you; call it yourself only when the client must live in
        a nursery of your own (it returns once the client is closed or the server is gone).
        """
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read_loop)
            nursery.start_soon(self._write_loop)
            task_status.started()

    async def _read_loop(self) -> None:
        """Read until EOF or close; route replies, answer the server's DMA requests."""
        try:
            while True:
                try:
                    data, fds = await self.stream.receive()
                except trio.ClosedResourceError:
                    return
                except (TransportError, OSError) as exc:
                    self._lose(exc)
                    return
                if not data:
                    close_all(fds)
                    self._lose(None)
                    return
                try:
                    self._conn.receive_data(data, fds)
                    while (event := self._conn.next_event()) is not None:
                        self._on_event(event)
                except ProtocolError as exc:
                    # Fatal framing (or a codec state error): nothing later can be trusted.
                    close_all(exc.fds)
                    log.warning("vfio-user stream from server broken: %s", exc)
                    self._lose(exc)
                    return
        finally:
            self._disconnected.set()

    def _on_event(self, event: Event) -> None:
        if isinstance(event, Reply | ErrorReply):
            self._deliver(event.msg_id, event, None)
        elif isinstance(event, Request):
            self._answer(event)
        elif event.command not in _SERVER_REQUESTS and event.msg_id in self._waiters:
            # BadRequest for a command the server never sends: a reply we could not decode
            self._deliver(event.msg_id, None, event.error)
        else:
            close_all(event.error.fds)
            log.warning("bad request %d from server: %s", event.command, event.error)
            if not event.no_reply:
                self._queue(
                    self._conn.send_error(event.msg_id, event.command, event.error.errno), ()
                )

    def _deliver(
        self, msg_id: int, event: Reply | ErrorReply | None, error: ProtocolError | None
    ) -> None:
        if error is not None:
            close_all(error.fds)
        waiter = self._waiters.pop(msg_id, None)
        if waiter is None:
            close_all(event_fds(event))
            log.warning("unexpected reply from server: %r", event)
            if event is not None:
                self.unexpected.append(event)
            return
        ok = isinstance(event, Reply)
        if not ok and waiter.prev_phase is not None and waiter.prev_phase is not Phase.NEGOTIATING:
            self._conn.phase = waiter.prev_phase  # VERSION refused: as if it was never sent
        if ok and waiter.on_reply is not None:
            assert isinstance(event, Reply)
            waiter.on_reply(event.body)
        if waiter.abandoned:
            close_all(event_fds(event))
            return
        if event_fds(event):
            self._untaken.add(waiter)
        waiter.settle(event, error)

    def _answer(self, request: Request) -> None:
        result = self.memory._serve(request.body)
        if request.no_reply:
            return
        if isinstance(result, int):
            self._queue(self._conn.send_error(request.msg_id, request.command, result), ())
        else:
            self._queue(*self._conn.send_reply(request.msg_id, result))

    def _queue(self, data: bytes, fds: tuple[Any, ...]) -> None:
        try:
            self._out_send.send_nowait((data, fds))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            log.debug("dropping a DMA reply: client closing")

    async def _write_loop(self) -> None:
        """Send what the reader queued (DMA replies), in order, off the reader's path."""
        async with self._out_recv:
            async for data, fds in self._out_recv:
                try:
                    await self.stream.send(data, fds)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    log.debug("DMA reply not sent: %s", exc)
                    return

    def _lose(self, cause: BaseException | None) -> None:
        """The server went away (EOF, reset, broken framing): fail everything pending."""
        if self._closed or self._lost:
            return
        self._lost, self._lost_cause = True, cause
        self._fail_waiters(lambda: trio.BrokenResourceError("server closed the connection"))
        self._out_send.close()
        self.stream.close()
        close_all(self._conn.close())

    def _fail_waiters(self, make: Callable[[], BaseException]) -> None:
        waiters, self._waiters = self._waiters, {}
        for w in waiters.values():
            if not w.abandoned:
                exc = make()
                exc.__cause__ = self._lost_cause
                w.settle(None, exc)

    # ---------------------------------------------------------------- closing

    def close(self) -> None:
        """Close synchronously: socket, pending calls (ClosedResourceError), fds, RAM."""
        if self._closed:
            return
        self._closed = True
        self.stream.close()
        self._out_send.close()
        close_all(self._conn.close())
        self._fail_waiters(lambda: trio.ClosedResourceError("client closed"))
        for w in self._untaken:
            close_all(event_fds(w.result))
        self._untaken.clear()
        self.memory.close()
        self._disconnected.set()

    async def aclose(self) -> None:
        """Idempotent; see `close`."""
        self.close()
        await trio.lowlevel.checkpoint()


__all__ = ["DEFAULT_CLIENT_CAPS", "ClientCore", "Pending"]

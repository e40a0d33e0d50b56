"""An async vfio-user client: the test driver, the benchmark load and the migration peer.

It plays QEMU's part: proposes VERSION, maps guest RAM for DMA, drives regions and IRQs, and
answers the server's DMA_READ / DMA_WRITE requests out of memory it owns. Unlike QEMU it is
deliberately permissive about *what* it sends (a command before VERSION, a second VERSION,
raw malformed frames), because the server's tests must be able to send exactly that.

Shape (trio-websocket's): the sans-IO `protocol.Connection` decodes, one reader task turns
events into waiter wake-ups and DMA answers, one writer task sends the DMA answers (so the
reader never blocks on a send: if both peers blocked sending large messages to each other
with full socket buffers, neither would ever read again). Callers send their own requests
directly, one `sendmsg` per message, and wait for the reply routed to them by msg_id.

    async with open_client("/run/dev.sock") as c:
        await c.memory.add_ram(0, 1 << 20)
        info = await c.region_info(0)
        data = await c.region_read(0, 0, 4)

Resource handling
    Descriptors that arrive in replies become `OwnedFd`s (the transport does that). Those a
    method hands out (the MMAP fd of `region_info`, `region_io_fds`, `request_raw` bodies)
    belong to the caller. Every other one (replies nobody waits for, replies of cancelled
    calls, truncated argsz replies, rejected messages) is closed here, and `aclose()` closes
    whatever was delivered but never taken, the guest RAM and the socket.

Error handling
    An error reply raises `VfioUserError` (an `OSError` with the reply's errno). A reply that
    cannot be decoded raises the codec's `RemoteProtocolError` in the caller that waited for
    it. If the server closes the stream or breaks framing, every pending and later call raises
    `trio.BrokenResourceError`; after our own `aclose()` they raise
    `trio.ClosedResourceError`.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import logging
import math
import mmap
import os
import socket
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from protocol import (
    HEADER_SIZE,
    INFO4_SIZE,
    PROTOCOL_MAJOR,
    PROTOCOL_MINOR,
    REGION_INFO_SIZE,
    BadRequest,
    Body,
    Capabilities,
    Command,
    Connection,
    DeviceFeature,
    DeviceFeatureReply,
    DeviceGetInfo,
    DeviceGetIrqInfo,
    DeviceGetRegionInfo,
    DeviceGetRegionIoFds,
    DeviceInfo,
    DeviceReset,
    DeviceResetReply,
    DeviceSetIrqs,
    DeviceSetIrqsReply,
    DmaMap,
    DmaMapFlags,
    DmaMapReply,
    DmaRead,
    DmaReadReply,
    DmaUnmap,
    DmaUnmapFlags,
    DmaUnmapReply,
    DmaWrite,
    DmaWriteReply,
    ErrorReply,
    Event,
    HeaderFlags,
    IrqInfo,
    IrqSetFlags,
    MigDataRead,
    MigDataReadReply,
    MigDataWrite,
    MigDataWriteReply,
    Phase,
    ProtocolError,
    RegionInfo,
    RegionIoFds,
    RegionRead,
    RegionReadReply,
    RegionWrite,
    RegionWriteMulti,
    RegionWriteMultiReply,
    RegionWriteReply,
    RemoteProtocolError,
    Reply,
    Request,
    Role,
    Version,
    WriteEntry,
    pack_header,
)

from .fds import OwnedFd, close_all
from .transport import FdStream, TransportError

log = logging.getLogger(__name__)

B = TypeVar("B", bound=Body)
FdLike = OwnedFd | int

#: what we propose in VERSION unless told otherwise. max_msg_fds is what *we* can receive
#: per message (a GET_REGION_IO_FDS reply may carry several); the rest are the spec defaults.
DEFAULT_CLIENT_CAPS = Capabilities(max_msg_fds=16)

#: server->client commands; a malformed frame of any other command is a reply gone wrong
_SERVER_REQUESTS = frozenset({Command.DMA_READ, Command.DMA_WRITE})
#: argsz retries before we call a server that keeps growing its answer broken
_ARGSZ_ATTEMPTS = 4
#: pipelined requests without fds are coalesced into sends of about this size
_COALESCE_BYTES = 256 * 1024


class VfioUserError(OSError):
    """The server answered a command with an error reply; `errno` is what it sent."""

    def __init__(self, err: int, command: int) -> None:
        try:
            cmd: int = Command(command)
            name = Command(command).name
        except ValueError:
            cmd, name = command, f"command {command}"
        super().__init__(err, f"{name}: {os.strerror(err)}")
        #: the command that failed (a `Command` when the number is known)
        self.command = cmd


def reply_body(event: Reply | ErrorReply) -> Body:
    """The body of a successful reply; an error reply raises `VfioUserError`.

    For code that pipelines with `Client.pipeline` and then wants the usual exceptions.
    """
    if isinstance(event, ErrorReply):
        raise VfioUserError(event.errno, event.command)
    return event.body


def _body_fds(body: Body) -> list[Any]:
    """Every descriptor a decoded body holds.

    `RegionInfo.fds` hides the fd of a truncated reply (it would not be *sent*), but a
    received one may still carry it, and then we own it.
    """
    fds = list(body.fds)
    fd = getattr(body, "fd", None)
    if fd is not None and not any(f is fd for f in fds):
        fds.append(fd)
    return fds


def _event_fds(event: Event | None) -> list[Any]:
    if isinstance(event, Reply | Request):
        return _body_fds(event.body)
    if isinstance(event, BadRequest):
        return list(event.error.fds)
    return []


# ------------------------------------------------------------------------------ waiters


class _Waiter:
    """One request in flight: the reader fills it in and sets the event."""

    __slots__ = ("abandoned", "command", "error", "event", "on_reply", "prev_phase", "result")

    def __init__(
        self,
        command: int,
        *,
        prev_phase: Phase | None = None,
        on_reply: Callable[[Body], None] | None = None,
    ) -> None:
        self.command = command
        self.event = trio.Event()
        self.result: Reply | ErrorReply | None = None
        self.error: BaseException | None = None
        #: the caller gave up (cancelled, or the send failed): the id stays reserved until
        #: the reply comes, so a late reply can never be routed to a newer request
        self.abandoned = False
        #: for VERSION: the codec phase to restore if the server refuses it
        self.prev_phase = prev_phase
        #: runs in the reader when a success reply arrives, before any later message is
        #: handled (so a DMA window is known as mapped before the server's first DMA_READ)
        self.on_reply = on_reply


class Pending:
    """A request that was sent and whose reply has not been collected yet."""

    __slots__ = ("_client", "_taken", "_waiter", "msg_id")

    def __init__(self, client: Client, msg_id: int, waiter: _Waiter) -> None:
        self._client = client
        self.msg_id = msg_id
        self._waiter = waiter
        self._taken = False

    @property
    def command(self) -> int:
        return self._waiter.command

    @property
    def done(self) -> bool:
        return self._waiter.event.is_set()

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
            if not w.event.is_set():
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
        if not w.event.is_set():
            w.abandoned = True
        else:
            self._client._untaken.discard(w)
            close_all(_event_fds(w.result))


# ------------------------------------------------------------------------------ memory


@dataclass(eq=False)
class RamWindow:
    """One piece of guest RAM: a memfd, mmap'd here, possibly also mmap'd by the server."""

    address: int
    size: int
    fd: OwnedFd
    shared: bool
    _map: mmap.mmap = field(repr=False)

    @property
    def end(self) -> int:
        return self.address + self.size


@dataclass(frozen=True, slots=True)
class MappedRange:
    """A window the server accepted with DMA_MAP (what it may access, and how)."""

    address: int
    size: int
    flags: int

    @property
    def end(self) -> int:
        return self.address + self.size


class _Fault(Exception):
    def __init__(self, err: int, why: str) -> None:
        super().__init__(why)
        self.errno = err


class GuestMemory:
    """The client's "guest RAM", and the server's DMA_READ/DMA_WRITE served from it.

    Two separate facts are kept, because tests need them to disagree: which RAM exists
    (`windows`, memfds created by `add_ram`) and what the server was told it may access
    (`mapped`, updated when a DMA_MAP / DMA_UNMAP *reply* arrives, whoever sent it). A DMA
    request is served only where both cover the whole range and the map's flags allow it:
    READ for DMA_READ, WRITE for DMA_WRITE; anything else gets EFAULT. With `bus_master`
    False every DMA request gets EIO (QEMU ignores DMA while the guest has Bus Master off).
    """

    def __init__(self, client: Client) -> None:
        self._client = client
        self.windows: list[RamWindow] = []
        self.mapped: list[MappedRange] = []
        self.bus_master = True
        #: served requests, for tests that check which DMA path the server took
        self.dma_reads = 0
        self.dma_writes = 0
        self.dma_errors = 0

    # -------------------------------------------------------------- RAM

    async def add_ram(
        self,
        address: int,
        size: int,
        *,
        shared: bool = True,
        flags: int = DmaMapFlags.READ | DmaMapFlags.WRITE,
        dma_map: bool = True,
        sealed: bool = True,
    ) -> RamWindow:
        """Create `size` bytes of RAM at `address` and (unless `dma_map=False`) map it.

        `shared` sends the memfd with DMA_MAP, like `memory-backend-memfd,share=on`, so the
        server can mmap it; otherwise DMA_MAP carries no fd and the server must use DMA_READ
        / DMA_WRITE messages. `sealed` seals the memfd against shrinking and growing, as
        QEMU's memory-backend-memfd does by default: a server mmaps only a file that cannot
        shrink under it (an unsealed one it serves with pread/pwrite). If the server refuses
        the map, the RAM is released again and `VfioUserError` propagates.
        """
        if size <= 0 or address < 0:
            raise ValueError(f"bad RAM window {address:#x}+{size:#x}")
        for w in self.windows:
            if address < w.end and w.address < address + size:
                raise ValueError(f"RAM {address:#x}+{size:#x} overlaps {w.address:#x}+{w.size:#x}")
        fd = OwnedFd(
            os.memfd_create(
                f"vfiouser-guest-ram-{address:#x}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
            )
        )
        try:
            os.ftruncate(fd.fileno(), size)
            if sealed:
                seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                fcntl.fcntl(fd.fileno(), fcntl.F_ADD_SEALS, seals)
            mm = mmap.mmap(fd.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            fd.close()
            raise
        win = RamWindow(address, size, fd, shared, mm)
        bisect.insort(self.windows, win, key=lambda w: w.address)
        if dma_map:
            try:
                await self._client.dma_map(address, size, flags=flags, fd=fd if shared else None)
            except BaseException:
                self._release(win)
                raise
        return win

    async def remove_ram(self, window: RamWindow | int, *, unmap: bool = True) -> None:
        """Release a RAM window; first DMA_UNMAP it if the server has exactly that map."""
        win = self._find_window(window)
        if unmap and any(m.address == win.address and m.size == win.size for m in self.mapped):
            await self._client.dma_unmap(win.address, win.size)
        self._release(win)

    def _find_window(self, window: RamWindow | int) -> RamWindow:
        for w in self.windows:
            if w is window or (isinstance(window, int) and w.address == window):
                return w
        raise KeyError(f"no RAM window {window!r}")

    def _release(self, win: RamWindow) -> None:
        self.windows.remove(win)
        win._map.close()
        win.fd.close()

    def close(self) -> None:
        """Release all RAM (the server's own mmaps of the memfds stay valid until it unmaps)."""
        for w in list(self.windows):
            self._release(w)
        self.mapped.clear()

    # -------------------------------------------------------------- access

    def _pieces(self, address: int, count: int) -> list[tuple[RamWindow, int, int]]:
        """(window, offset in window, length) covering [address, address+count), or _Fault."""
        out: list[tuple[RamWindow, int, int]] = []
        pos, end = address, address + count
        starts = [w.address for w in self.windows]
        while pos < end:
            i = bisect.bisect_right(starts, pos) - 1
            if i < 0 or pos >= self.windows[i].end:
                raise _Fault(errno.EFAULT, f"no RAM at {pos:#x}")
            w = self.windows[i]
            n = min(end, w.end) - pos
            out.append((w, pos - w.address, n))
            pos += n
        return out

    def read(self, address: int, count: int) -> bytes:
        """Read RAM directly (whether or not the server has it mapped). EFAULT if absent."""
        try:
            return b"".join(w._map[o : o + n] for w, o, n in self._pieces(address, count))
        except _Fault as exc:
            raise OSError(exc.errno, str(exc)) from None

    def write(self, address: int, data: bytes | bytearray | memoryview) -> None:
        """Write RAM directly (the server sees it at once through a shared mapping)."""
        try:
            pieces = self._pieces(address, len(data))
        except _Fault as exc:
            raise OSError(exc.errno, str(exc)) from None
        src = memoryview(data).cast("B")
        pos = 0
        for w, o, n in pieces:
            w._map[o : o + n] = src[pos : pos + n]
            pos += n

    # -------------------------------------------------------------- the server's view

    def _note_map(self, address: int, size: int, flags: int) -> None:
        bisect.insort(self.mapped, MappedRange(address, size, flags), key=lambda m: m.address)

    def _note_unmap(self, address: int, size: int, flags: int) -> None:
        if flags & DmaUnmapFlags.ALL:
            self.mapped.clear()
        else:
            self.mapped = [m for m in self.mapped if (m.address, m.size) != (address, size)]

    def _check_mapped(self, address: int, count: int, need: int) -> None:
        pos, end = address, address + count
        while pos < end:
            for m in self.mapped:
                if m.address <= pos < m.end:
                    if m.flags & need != need:
                        raise _Fault(errno.EFAULT, f"{pos:#x} mapped without {need!r}")
                    pos = m.end
                    break
            else:
                raise _Fault(errno.EFAULT, f"{pos:#x} is not DMA-mapped")

    def _dma_check(self, address: int, count: int, need: int) -> list[tuple[RamWindow, int, int]]:
        if not self.bus_master:
            raise _Fault(errno.EIO, "bus master disabled")
        if count > self._client.caps.max_data_xfer_size:
            raise _Fault(errno.EINVAL, f"count {count} above max_data_xfer_size")
        if address + count > 1 << 64:
            raise _Fault(errno.EFAULT, "address wraps")
        self._check_mapped(address, count, need)
        return self._pieces(address, count)

    def _serve(self, body: Body) -> Body | int:
        """Answer one DMA request: a reply body, or an errno for an error reply."""
        try:
            if isinstance(body, DmaRead):
                pieces = self._dma_check(body.address, body.count, DmaMapFlags.READ)
                data = b"".join(w._map[o : o + n] for w, o, n in pieces)
                self.dma_reads += 1
                return DmaReadReply(body.address, data)
            if isinstance(body, DmaWrite):
                pieces = self._dma_check(body.address, len(body.data), DmaMapFlags.WRITE)
                src, pos = memoryview(body.data), 0
                for w, o, n in pieces:
                    w._map[o : o + n] = src[pos : pos + n]
                    pos += n
                self.dma_writes += 1
                return DmaWriteReply(body.address, len(body.data))
        except _Fault as exc:
            self.dma_errors += 1
            log.info("DMA %s refused: %s", body.COMMAND.name, exc)
            return exc.errno
        self.dma_errors += 1
        return errno.ENOTSUP


# ------------------------------------------------------------------------------ eventfds


def make_eventfd() -> OwnedFd:
    """A fresh non-blocking eventfd, e.g. for `set_irq_eventfds`."""
    return OwnedFd(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))


def _fileno(fd: FdLike) -> int:
    return fd if isinstance(fd, int) else fd.fileno()


def read_eventfd_nowait(fd: FdLike) -> int:
    """The eventfd's counter (and reset it), or 0 if nothing was signalled."""
    try:
        return os.eventfd_read(_fileno(fd))
    except BlockingIOError:
        return 0


async def wait_eventfd(fd: FdLike, timeout: float = 5.0) -> int:
    """Wait until the eventfd is signalled; return (and reset) its counter.

    Raises `trio.TooSlowError` after `timeout` seconds. The fd must be non-blocking (as
    `make_eventfd` makes them); we do not flip the flag ourselves because it belongs to the
    open file description the server shares.
    """
    num = _fileno(fd)
    if os.get_blocking(num):
        raise ValueError(f"eventfd {num} is blocking; use make_eventfd()")
    await trio.lowlevel.checkpoint()
    with trio.fail_after(timeout):
        while True:
            try:
                return os.eventfd_read(num)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(num)


# ------------------------------------------------------------------------------ client


class Client:
    """One vfio-user connection, client side. Make one with `open_client`."""

    def __init__(
        self,
        stream: FdStream,
        *,
        caps: Capabilities | None = None,
        reply_timeout: float | None = None,
    ) -> None:
        self.stream = stream
        #: what we propose in VERSION (and what our decoder accepts)
        self.caps = caps or DEFAULT_CLIENT_CAPS
        #: seconds any call waits for its reply before `trio.TooSlowError` (None: forever)
        self.reply_timeout = reply_timeout
        self.memory = GuestMemory(self)
        #: replies that matched no request (a server answering a posted write, say); their
        #: fds are already closed
        self.unexpected: list[Reply | ErrorReply] = []
        self._conn = Connection(Role.CLIENT, local_caps=self.caps)
        self._waiters: dict[int, _Waiter] = {}
        self._untaken: set[_Waiter] = set()
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
        except trio.ClosedResourceError:
            self._check_usable()
            raise
        except trio.BrokenResourceError:
            self._check_usable()
            raise

    def _register(
        self, command: int, on_reply: Callable[[Body], None] | None = None
    ) -> tuple[int, _Waiter]:
        self._check_usable()
        prev = self._version_phase(command)
        msg_id = self._alloc_id()
        waiter = _Waiter(command, prev_phase=prev, on_reply=on_reply)
        self._waiters[msg_id] = waiter
        return msg_id, waiter

    def _unregister_failed(self, waiter: _Waiter) -> None:
        """The request may not have gone out: keep its id reserved, restore VERSION phase."""
        waiter.abandoned = True
        if waiter.prev_phase is not None and self._conn.phase is Phase.NEGOTIATING:
            self._conn.phase = waiter.prev_phase

    @staticmethod
    def _frame(msg_id: int, command: int, payload: bytes, flags: int) -> bytes:
        return pack_header(msg_id, command, HEADER_SIZE + len(payload), flags) + payload

    async def submit(
        self, body: Body, *, _on_reply: Callable[[Body], None] | None = None
    ) -> Pending:
        """Send a request and return at once; `await pending.wait_reply()` later.

        Commands are sent whatever the connection phase (a test may want a DEVICE_GET_INFO
        before VERSION); only the server decides whether that is allowed.
        """
        msg_id, waiter = self._register(body.COMMAND, _on_reply)
        try:
            await self._send(
                self._frame(msg_id, body.COMMAND, body.encode(), HeaderFlags.TYPE_COMMAND),
                body.fds,
            )
        except BaseException:
            self._unregister_failed(waiter)
            raise
        return Pending(self, msg_id, waiter)

    async def submit_many(self, bodies: Iterable[Body]) -> list[Pending]:
        """Send many requests back to back; messages without fds share `sendmsg` calls."""
        pendings: list[Pending] = []
        batch = bytearray()
        try:
            for body in bodies:
                msg_id, waiter = self._register(body.COMMAND)
                pendings.append(Pending(self, msg_id, waiter))
                frame = self._frame(msg_id, body.COMMAND, body.encode(), HeaderFlags.TYPE_COMMAND)
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
        self._check_usable()
        msg_id = self._alloc_id()
        flags = HeaderFlags.TYPE_COMMAND | HeaderFlags.NO_REPLY
        await self._send(self._frame(msg_id, body.COMMAND, body.encode(), flags), body.fds)
        return msg_id

    async def call(self, body: Body, expect: type[B]) -> B:
        """Send one request and return its reply body, checked to be of type `expect`."""
        return self._check_reply(await (await self.submit(body)).wait_reply(), expect)

    @staticmethod
    def _check_reply(event: Reply | ErrorReply, expect: type[B]) -> B:
        body = reply_body(event)
        if not isinstance(body, expect):
            close_all(_body_fds(body))
            raise RemoteProtocolError(
                f"expected {expect.__name__}, server replied {type(body).__name__}"
            )
        return body

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
        msg_id, waiter = self._register(command)
        try:
            await self._send(self._frame(msg_id, command & 0xFFFF, payload, flags), fds)
        except BaseException:
            self._unregister_failed(waiter)
            raise
        return await Pending(self, msg_id, waiter).wait_reply()

    async def post_raw(
        self,
        command: int,
        payload: bytes = b"",
        fds: Sequence[FdLike] = (),
        flags: int = HeaderFlags.TYPE_COMMAND,
    ) -> int:
        """Like `request_raw` with No_reply set: returns the msg_id without waiting."""
        self._check_usable()
        msg_id = self._alloc_id()
        flags |= HeaderFlags.NO_REPLY
        await self._send(self._frame(msg_id, command & 0xFFFF, payload, flags), fds)
        return msg_id

    async def send_bytes(self, data: bytes, fds: Sequence[FdLike] = ()) -> None:
        """Put arbitrary bytes (and fds) on the wire: for broken headers and split frames."""
        await self._send(data, fds)

    # ---------------------------------------------------------------- commands

    async def version(
        self,
        *,
        major: int = PROTOCOL_MAJOR,
        minor: int = PROTOCOL_MINOR,
        caps: Capabilities | None = None,
    ) -> Version:
        """VERSION: propose `caps` (default: the client's); `server_caps` is set on success."""
        return await self.call(Version(major, minor, caps or self.caps), Version)

    async def dma_map(
        self,
        address: int,
        size: int,
        *,
        flags: int = DmaMapFlags.READ | DmaMapFlags.WRITE,
        fd: FdLike | None = None,
        offset: int = 0,
    ) -> None:
        """DMA_MAP a window; with `fd` the server may mmap it (`offset` into that file).

        The caller keeps `fd` (the kernel gives the server its own copy). `memory` learns of
        the map when the reply arrives, so DMA requests for it are served from then on.
        """

        def mapped(_body: Body) -> None:
            self.memory._note_map(address, size, flags)

        pending = await self.submit(DmaMap(flags, offset, address, size, fd), _on_reply=mapped)
        self._check_reply(await pending.wait_reply(), DmaMapReply)

    async def dma_unmap(self, address: int, size: int, *, flags: int = 0) -> DmaUnmapReply:
        """DMA_UNMAP one exactly matching window (flags ALL: every window, address=size=0)."""

        def unmapped(_body: Body) -> None:
            self.memory._note_unmap(address, size, flags)

        pending = await self.submit(DmaUnmap(flags, address, size), _on_reply=unmapped)
        return self._check_reply(await pending.wait_reply(), DmaUnmapReply)

    async def dma_unmap_all(self) -> DmaUnmapReply:
        """What QEMU sends on teardown: DMA_UNMAP flag ALL with address = size = 0."""
        return await self.dma_unmap(0, 0, flags=DmaUnmapFlags.ALL)

    async def device_get_info(self) -> DeviceInfo:
        return await self.call(DeviceGetInfo(), DeviceInfo)

    async def region_info(self, index: int, *, argsz: int | None = None) -> RegionInfo:
        """GET_REGION_INFO with the argsz retry: ask with 32 bytes, then with what it needs.

        The returned `fd` (an `OwnedFd`, set when the region is mmap-able) is the caller's
        to close. With an explicit `argsz` exactly one request is sent and the reply is
        returned as is (possibly truncated: `complete` is False).
        """
        if argsz is not None:
            return await self.call(DeviceGetRegionInfo(index, argsz), RegionInfo)
        ask = REGION_INFO_SIZE
        for _ in range(_ARGSZ_ATTEMPTS):
            info = await self.call(DeviceGetRegionInfo(index, ask), RegionInfo)
            if info.complete and info.argsz <= ask:
                return info
            close_all(_body_fds(info))
            ask = max(info.argsz, ask + 1)
        raise RemoteProtocolError(f"GET_REGION_INFO {index}: argsz still growing at {ask}")

    async def region_io_fds(self, index: int, *, argsz: int | None = None) -> RegionIoFds:
        """GET_REGION_IO_FDS with the same argsz retry; the fds are the caller's to close."""
        if argsz is not None:
            return await self.call(DeviceGetRegionIoFds(index, argsz), RegionIoFds)
        ask = INFO4_SIZE
        for _ in range(_ARGSZ_ATTEMPTS):
            reply = await self.call(DeviceGetRegionIoFds(index, ask), RegionIoFds)
            if reply.argsz <= ask:
                return reply
            close_all(reply.fd_list)
            ask = reply.argsz
        raise RemoteProtocolError(f"GET_REGION_IO_FDS {index}: argsz still growing at {ask}")

    async def irq_info(self, index: int) -> IrqInfo:
        return await self.call(DeviceGetIrqInfo(index), IrqInfo)

    async def set_irqs(
        self,
        index: int,
        flags: int,
        start: int,
        count: int,
        *,
        data: bytes = b"",
        fds: Sequence[FdLike] = (),
    ) -> None:
        """DEVICE_SET_IRQS as given (fds ride in SCM_RIGHTS; the caller keeps its copies)."""
        body = DeviceSetIrqs(flags, index, start, count, data, tuple(fds))
        await self.call(body, DeviceSetIrqsReply)

    async def set_irq_eventfds(self, index: int, start: int, fds: Sequence[FdLike]) -> None:
        """Assign eventfds to vectors start.. (DATA_EVENTFD | ACTION_TRIGGER), like QEMU."""
        flags = IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER
        await self.set_irqs(index, flags, start, len(fds), fds=fds)

    async def unset_irq_eventfds(self, index: int, start: int, count: int = 1) -> None:
        """De-assign vectors: DATA_EVENTFD | ACTION_TRIGGER with no fds."""
        flags = IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER
        await self.set_irqs(index, flags, start, count)

    async def disable_irqs(self, index: int) -> None:
        """Disable a whole index: DATA_NONE | ACTION_TRIGGER with count 0."""
        flags = IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER
        await self.set_irqs(index, flags, 0, 0)

    async def region_read(self, index: int, offset: int, count: int) -> bytes:
        reply = await self.call(RegionRead(offset, index, count), RegionReadReply)
        return reply.data

    async def region_write(
        self, index: int, offset: int, data: bytes, *, posted: bool = False
    ) -> None:
        """REGION_WRITE; `posted` sets No_reply and returns once the message is sent."""
        body = RegionWrite(offset, index, bytes(data))
        if posted:
            await self.post(body)
        else:
            await self.call(body, RegionWriteReply)

    async def region_write_multi(
        self,
        writes: Iterable[WriteEntry | tuple[int, int, bytes]],
        *,
        posted: bool = False,
    ) -> int | None:
        """REGION_WRITE_MULTI of (index, offset, data<=8 bytes) entries or `WriteEntry`s.

        Returns the count in the reply, or None when `posted`.
        """
        entries = tuple(
            w if isinstance(w, WriteEntry) else WriteEntry(w[1], w[0], bytes(w[2])) for w in writes
        )
        body = RegionWriteMulti(entries)
        if posted:
            await self.post(body)
            return None
        return (await self.call(body, RegionWriteMultiReply)).count

    async def device_reset(self) -> None:
        await self.call(DeviceReset(), DeviceResetReply)

    async def device_feature(
        self, flags: int, data: bytes = b"", *, argsz: int = 0
    ) -> DeviceFeatureReply:
        """DEVICE_FEATURE (feature number | GET/SET/PROBE); argsz defaults to 8 + len(data)."""
        return await self.call(DeviceFeature(flags, data, argsz), DeviceFeatureReply)

    async def mig_data_read(self, size: int) -> bytes:
        """MIG_DATA_READ up to `size` bytes; a shorter answer means the end of the data."""
        return (await self.call(MigDataRead(size), MigDataReadReply)).data

    async def mig_data_write(self, data: bytes) -> None:
        await self.call(MigDataWrite(bytes(data)), MigDataWriteReply)

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
        waiter = self._waiters.pop(msg_id, None)
        if waiter is None:
            close_all(_event_fds(event))
            if error is not None:
                close_all(error.fds)
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
            close_all(_event_fds(event))
            if error is not None:
                close_all(error.fds)
            return
        waiter.result, waiter.error = event, error
        if error is not None:
            close_all(error.fds)
        if _event_fds(event):
            self._untaken.add(waiter)
        waiter.event.set()

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
                w.error = exc
                w.event.set()

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
            close_all(_event_fds(w.result))
        self._untaken.clear()
        self.memory.close()
        self._disconnected.set()

    async def aclose(self) -> None:
        """Idempotent; see `close`."""
        self.close()
        await trio.lowlevel.checkpoint()


# ------------------------------------------------------------------------------ opening


async def connect_unix(path: str | os.PathLike[str]) -> FdStream:
    """Connect to a server's listening socket."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.connect(os.fspath(path))
    except BaseException:
        sock.close()
        raise
    return FdStream(socket.socket(fileno=sock.detach()))


@asynccontextmanager
async def open_client(
    target: str | os.PathLike[str] | FdStream,
    *,
    caps: Capabilities | None = None,
    version: bool = True,
    reply_timeout: float | None = None,
) -> AsyncIterator[Client]:
    """Connect (or adopt a stream), start the reader, negotiate VERSION; close on exit.

    Resource handling: the stream is closed on exit even when it was passed in, along with
    the guest RAM and every fd the client did not hand out.

    Error handling: exceptions from the body (and from VERSION) come out as they are, not
    wrapped in an ExceptionGroup: they are held until the reader's nursery has finished
    and re-raised outside it.
    """
    stream = target if isinstance(target, FdStream) else await connect_unix(target)
    failure: BaseException | None = None
    async with trio.open_nursery() as nursery:
        client = Client(stream, caps=caps, reply_timeout=reply_timeout)
        try:
            await nursery.start(client.run)
            if version:
                await client.version()
            yield client
        except BaseException as exc:
            failure = exc
        finally:
            client.close()
    if failure is not None:
        raise failure


__all__ = [
    "DEFAULT_CLIENT_CAPS",
    "Client",
    "GuestMemory",
    "MappedRange",
    "Pending",
    "RamWindow",
    "VfioUserError",
    "connect_unix",
    "make_eventfd",
    "open_client",
    "read_eventfd_nowait",
    "reply_body",
    "wait_eventfd",
]

"""Guest memory as a device sees it, for one connection: the `DmaPort`, and the DMA_READ /
DMA_WRITE requests the server sends in message mode.

Neither object refers back to the session: the session hands `SessionDma` its container at
attach and takes it back at detach, and `DmaRequests` (the owner of every window mapped
without a file) only needs the connection's codec and outbox. A session that ends is then
freed by reference counting, not by the cyclic collector (docs/security.md).
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import trio

from devices.sdk.interface import DmaError
from protocol import (
    Body,
    Command,
    Connection,
    DmaRead,
    DmaReadReply,
    DmaWrite,
    ErrorReply,
    Reply,
)

from . import wirelog
from .container import Container, DmaWindow, unpin
from .fds import close_all
from .outbox import Outbox
from .waiter import Waiter

log = logging.getLogger(__name__)

#: how long a device's DMA_READ/DMA_WRITE may wait for the client (QEMU's own is 5 s)
DMA_REQUEST_TIMEOUT = 5.0
#: Message-mode DMA moves at most this much per request, one request at a time. Our read
#: loop never blocks in send() (see `outbox`), but QEMU's main loop does: a big DMA_WRITE
#: that fills the socket stalls QEMU (and the guest) until it is read. Keeping what is in
#: flight below the socket buffers (~200 KiB each way) keeps both sides moving.
MESSAGE_DMA_CHUNK = 64 << 10


class SessionDma:
    """The device's DmaPort for this connection: zero-copy views of mmap'd windows,
    pread/pwrite for windows whose file may shrink, DMA_READ/DMA_WRITE messages for windows
    without a file (through the `DmaRequests` of the client that mapped them)."""

    def __init__(self) -> None:
        #: the client's address space while it is attached (set and cleared by the session)
        self.attached_to: Container | None = None
        #: guest-memory bytes the device read / wrote (`stats`; views count when handed out)
        self.read_bytes = 0
        self.written_bytes = 0

    def _count(self, size: int, write: bool) -> None:
        if write:
            self.written_bytes += size
        else:
            self.read_bytes += size

    @property
    def container(self) -> Container:
        c = self.attached_to
        if c is None:
            raise DmaError(errno.ENODEV, "no client attached")
        return c

    def view(self, address: int, size: int, *, write: bool = False) -> memoryview | None:
        view = self.container.view(address, size, write=write)
        if view is not None:
            self._count(size, write)
        return view

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
        self._count(size, write)
        with container.pin(w):
            view = w.view[off : off + n]
            if write:  # logged when taken and again when let go: a report may come between
                _log_writes(container, ((address, size),))
            try:
                yield view
            finally:
                view.release()
                if write:
                    _log_writes(container, ((address, size),))

    @contextlib.contextmanager
    def pin_ranges(
        self, ranges: Sequence[tuple[int, int]], *, write: bool = False
    ) -> Iterator[list[memoryview] | None]:
        """Views of many ranges, each window pinned once (see `pinned_views`); None when a
        range has no mmap'd window of its own (message mode, or it spans windows).

        The loop keeps the last range's window and looks one up only when a range leaves
        it: a 1 MiB guest transfer is 256 scattered pages, nearly always in one window, and
        a lookup per page was two thirds of the cost (128 ranges: 156 -> 60 us)."""
        container = self.container
        views: list[memoryview] = []
        windows: list[DmaWindow] = []
        total = 0
        start = end = 0
        wview: memoryview | None = None
        try:
            for address, size in ranges:
                if address < start or address + size > end:
                    w = container.find(address)
                    if not (w.writable if write else w.readable):
                        raise DmaError(errno.EPERM, f"DMA window at {w.address:#x}: no access")
                    if w.view is None or address + size > w.end:
                        break
                    start, end, wview = w.address, w.end, w.view
                    if w not in windows:
                        windows.append(w)
                assert wview is not None
                views.append(wview[address - start : address - start + size])
                total += size
            else:
                self._count(total, write)
                # each window pinned once, let go in `finally` (not an ExitStack and a
                # context manager per window: two of them per transfer, for one window)
                for w in windows:
                    w.pins += 1
                try:
                    if write:
                        _log_writes(container, ranges)
                    yield views
                    if write:
                        _log_writes(container, ranges)
                finally:
                    for w in windows:
                        unpin(w)
                return
        finally:
            for v in views:
                v.release()
        yield None

    async def read(self, address: int, size: int) -> bytes:
        data = await self.container.read(address, size, self._read_message)
        self.read_bytes += size
        return data

    async def write(self, address: int, data: bytes | bytearray | memoryview) -> None:
        await self.container.write(address, data, self._write_message)
        self.written_bytes += memoryview(data).nbytes

    async def message_read(self, address: int, size: int) -> bytes:
        """Read by DMA_READ messages whatever the window (libvfio-user's `vfu_sgl_read`,
        for a model imitating a libvfio-user device; models use `read`)."""
        out = bytearray()
        for w, off, n in self.container.spans(address, size, False):
            out += await self._read_message(w, off, n)
        self.read_bytes += size
        return bytes(out)

    async def message_write(self, address: int, data: bytes | bytearray | memoryview) -> None:
        """Write by DMA_WRITE messages whatever the window (`vfu_sgl_write`; see
        `message_read`). Not logged as dirty: the client performs these writes."""
        mv = memoryview(data).cast("B")
        pos = 0
        for w, off, n in self.container.spans(address, len(mv), True):
            await self._write_message(w, off, mv[pos : pos + n])
            pos += n
        self.written_bytes += pos

    async def _read_message(self, w: DmaWindow, off: int, n: int) -> bytes:
        return await self._message(w.owner).dma_read(w.address + off, n)

    async def _write_message(self, w: DmaWindow, off: int, data: memoryview) -> None:
        await self._message(w.owner).dma_write(w.address + off, data)

    def _message(self, owner: Any) -> DmaRequests:
        if not isinstance(owner, DmaRequests) or owner.closed:
            raise DmaError(errno.ENODEV, "the client that mapped this window is gone")
        return owner


def _log_writes(container: Container, ranges: Iterable[tuple[int, int]]) -> None:
    """The device writes these ranges of guest memory itself: dirty, while logging is on."""
    dirty = container.dirty
    if dirty is not None:
        for address, size in ranges:
            dirty.mark(address, size)


class DmaRequests:
    """The server's own requests to one client (message-mode DMA), matched to its replies.

    Owner of the client's windows that came without a file descriptor: `SessionDma` sends
    their accesses here."""

    def __init__(self, conn: Connection, outbox: Outbox, name: str) -> None:
        self.conn = conn
        self.outbox = outbox
        self.name = name
        #: the connection ended: new requests fail at once
        self.closed = False
        self._pending: dict[int, Waiter[Body | int]] = {}
        self._lock = trio.Lock()

    def fail_all(self) -> None:
        """The client is gone: every request still waiting fails with ENOTCONN."""
        self.closed = True
        for waiter in self._pending.values():
            waiter.settle(errno.ENOTCONN)
        self._pending.clear()

    def route_reply(self, ev: Reply | ErrorReply) -> None:
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
        if self.closed:
            raise DmaError(errno.ENOTCONN, "client is gone")
        msg_id, data, fds = self.conn.send_request(body)
        if msg_id in self._pending:
            raise DmaError(errno.EBUSY, "too many outstanding requests")
        waiter: Waiter[Body | int] = Waiter(body.COMMAND)
        self._pending[msg_id] = waiter
        try:
            if self.outbox.verbose:
                wirelog.log_out(self.name, data, len(fds))
            if self.outbox.tracer is not None:
                self.outbox.tracer.outgoing(self.outbox.trace_conn, data, fds)
            self.outbox.send(data, fds)
            if self.outbox.broken:
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
            async with self._lock:
                reply = await self._request(DmaRead(address + len(out), n))
            if not isinstance(reply, DmaReadReply) or len(reply.data) != n:
                raise DmaError(errno.EIO, "short DMA_READ reply")
            out += reply.data
        return bytes(out)

    async def dma_write(self, address: int, data: bytes | bytearray | memoryview) -> None:
        mv = memoryview(data)
        limit = min(self._xfer_limit(), MESSAGE_DMA_CHUNK)
        for pos in range(0, len(mv), limit):
            async with self._lock:
                await self._request(DmaWrite(address + pos, bytes(mv[pos : pos + limit])))


__all__ = ["DMA_REQUEST_TIMEOUT", "MESSAGE_DMA_CHUNK", "DmaRequests", "SessionDma"]

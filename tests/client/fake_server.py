"""A tiny vfio-user server for the client's tests: `protocol.Connection(Role.SERVER)` over
one end of `FdStream.pair()`, with just enough device behind it to exercise every client
method, and knobs to misbehave (hold replies and send them reversed, refuse VERSION, send
garbage, hang up).
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from protocol import (
    BadRequest,
    Body,
    Capabilities,
    Connection,
    DeviceFeature,
    DeviceFeatureReply,
    DeviceFlags,
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
    DmaMapReply,
    DmaRead,
    DmaReadReply,
    DmaUnmap,
    DmaUnmapFlags,
    DmaUnmapReply,
    DmaWrite,
    ErrorReply,
    IoFdSubRegion,
    IrqInfo,
    IrqInfoFlags,
    MigDataRead,
    MigDataReadReply,
    MigDataWrite,
    MigDataWriteReply,
    RegionFlags,
    RegionInfo,
    RegionIoFds,
    RegionRead,
    RegionReadReply,
    RegionWrite,
    RegionWriteMulti,
    RegionWriteMultiReply,
    RegionWriteReply,
    Reply,
    Request,
    Role,
    SparseMmapCap,
    TypeCap,
    Version,
    VersionReply,
    negotiate,
    pack_header,
)
from vfiouser_srv.fds import OwnedFd, close_all
from vfiouser_srv.transport import FdStream

SERVER_CAPS = Capabilities(max_msg_fds=8, max_data_xfer_size=1 << 16, max_dma_maps=64)
#: region 0 is mmap-able (fd + sparse cap), region 1 has a type cap only, region 7 is config
REGION_SIZES = {0: 0x1000, 1: 0x100, 7: 0x100}
MIG_DATA = b"migration-state-" * 4


def memfd(size: int, fill: bytes = b"") -> OwnedFd:
    fd = OwnedFd(os.memfd_create("fake-bar", os.MFD_CLOEXEC))
    os.ftruncate(fd.fileno(), size)
    if fill:
        os.pwrite(fd.fileno(), fill, 0)
    return fd


@dataclass
class Window:
    body: DmaMap
    map: mmap.mmap | None = None


@dataclass
class FakeServer:
    stream: FdStream
    caps: Capabilities = SERVER_CAPS
    conn: Connection = field(init=False)
    #: every request and bad request, in arrival order (fds of requests already closed)
    log: list[Request | BadRequest] = field(default_factory=list)
    regions: dict[int, bytearray] = field(init=False)
    windows: dict[int, Window] = field(default_factory=dict)
    irq_fds: dict[tuple[int, int], OwnedFd] = field(default_factory=dict)
    #: >0: keep that many replies back, then send them in reverse order
    hold: int = 0
    #: answer VERSION with this errno instead
    version_errno: int = 0
    #: per-command override: return a Body, an errno, or None (no reply at all)
    override: dict[int, Callable[[Request], Body | int | None]] = field(default_factory=dict)
    mig_data: bytearray = field(default_factory=lambda: bytearray(MIG_DATA))
    _held: list[tuple[bytes, tuple[Any, ...]]] = field(default_factory=list)
    _dma: dict[int, tuple[trio.Event, list[Reply | ErrorReply]]] = field(default_factory=dict)
    closed: trio.Event = field(default_factory=trio.Event)
    owned: list[OwnedFd] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.conn = Connection(Role.SERVER, local_caps=self.caps)
        self.regions = {i: bytearray(range(256)) * (n // 256) for i, n in REGION_SIZES.items()}
        self.bar_fd = memfd(REGION_SIZES[0], bytes(self.regions[0]))

    def requests(self, body_type: type[Body]) -> list[Any]:
        return [r.body for r in self.log if isinstance(r, Request) and type(r.body) is body_type]

    # ------------------------------------------------------------------ loop

    async def run(self) -> None:
        try:
            while True:
                try:
                    data, fds = await self.stream.receive()
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    return
                if not data:
                    close_all(fds)
                    return
                self.conn.receive_data(data, fds)
                while (ev := self.conn.next_event()) is not None:
                    await self._on_event(ev)
        finally:
            self.closed.set()

    async def _on_event(self, ev: Any) -> None:
        if isinstance(ev, Reply | ErrorReply):
            event, box = self._dma.pop(ev.msg_id)
            box.append(ev)
            event.set()
            return
        self.log.append(ev)
        if isinstance(ev, BadRequest):
            close_all(ev.error.fds)
            if not ev.no_reply:
                await self._send(self.conn.send_error(ev.msg_id, ev.command, ev.error.errno), ())
            return
        assert isinstance(ev, Request)
        handler = self.override.get(ev.command, self._handle)
        result = handler(ev)
        if ev.no_reply or result is None:
            return
        if isinstance(result, int):
            await self._send(self.conn.send_error(ev.msg_id, ev.command, result), ())
        else:
            await self._send(*self.conn.send_reply(ev.msg_id, result))

    async def _send(self, data: bytes, fds: tuple[Any, ...]) -> None:
        if self.hold:
            self._held.append((data, fds))
            if len(self._held) < self.hold:
                return
            held, self._held = self._held, []
            for d, f in reversed(held):
                await self.stream.send(d, f)
            return
        await self.stream.send(data, fds)

    def close(self) -> None:
        self.stream.close()
        self.bar_fd.close()
        close_all(self.irq_fds.values())
        close_all(self.owned)
        for w in self.windows.values():
            if w.map is not None:
                w.map.close()

    # ------------------------------------------------------------------ server -> client

    async def _dma_request(self, body: Body) -> Reply | ErrorReply:
        msg_id, data, fds = self.conn.send_request(body)
        event: trio.Event = trio.Event()
        box: list[Reply | ErrorReply] = []
        self._dma[msg_id] = (event, box)
        await self.stream.send(data, fds)
        await event.wait()
        return box[0]

    async def request_raw(self, command: int, payload: bytes) -> Reply | ErrorReply:
        """A hand-built server->client request (to see the client reject it)."""
        msg_id = 0x7000 + len(self._dma)
        event: trio.Event = trio.Event()
        box: list[Reply | ErrorReply] = []
        self._dma[msg_id] = (event, box)
        await self.stream.send(pack_header(msg_id, command, 16 + len(payload), 0) + payload)
        await event.wait()
        return box[0]

    async def dma_read(self, address: int, count: int) -> bytes:
        ev = await self._dma_request(DmaRead(address, count))
        if isinstance(ev, ErrorReply):
            raise OSError(ev.errno, os.strerror(ev.errno))
        assert isinstance(ev.body, DmaReadReply)
        return ev.body.data

    async def dma_write(self, address: int, data: bytes) -> None:
        ev = await self._dma_request(DmaWrite(address, data))
        if isinstance(ev, ErrorReply):
            raise OSError(ev.errno, os.strerror(ev.errno))

    def shared_read(self, address: int, count: int) -> bytes:
        """Read guest RAM through the mmap of a window that came with an fd."""
        for w in self.windows.values():
            b = w.body
            if w.map is not None and b.address <= address and address + count <= b.address + b.size:
                off = address - b.address
                return w.map[off : off + count]
        raise OSError(errno.EFAULT, "no shared window")

    # ------------------------------------------------------------------ commands

    def _handle(self, req: Request) -> Body | int | None:
        b = req.body
        if isinstance(b, Version):
            if self.version_errno:
                return self.version_errno
            return VersionReply(0, 0, negotiate(b.capabilities, self.caps))
        if isinstance(b, DmaMap):
            if b.address in self.windows:
                close_all(b.fds)
                return errno.EEXIST
            mm = None
            if b.fd is not None:
                mm = mmap.mmap(b.fd.fileno(), b.size, mmap.MAP_SHARED, offset=b.offset)
                b.fd.close()
            self.windows[b.address] = Window(b, mm)
            return DmaMapReply()
        if isinstance(b, DmaUnmap):
            if b.flags & DmaUnmapFlags.ALL:
                for w in self.windows.values():
                    if w.map is not None:
                        w.map.close()
                self.windows.clear()
            else:
                win = self.windows.get(b.address)
                if win is None or win.body.size != b.size:
                    return errno.ENOENT
                if win.map is not None:
                    win.map.close()
                del self.windows[b.address]
            return DmaUnmapReply(b.flags, b.address, b.size)
        if isinstance(b, DeviceGetInfo):
            return DeviceInfo(DeviceFlags.PCI | DeviceFlags.RESET, 9, 5)
        if isinstance(b, DeviceGetRegionInfo):
            return self._region_info(b)
        if isinstance(b, DeviceGetRegionIoFds):
            if b.index != 0:
                return errno.EINVAL
            subs = (IoFdSubRegion(0, 4, 0, 0, 0), IoFdSubRegion(4, 4, 1, 0, 0))
            full = RegionIoFds(0, subs, (), 0)
            need = len(full.encode())
            if b.argsz < need:
                return RegionIoFds(0, (), (), need)
            fds = (memfd(16), memfd(16))
            self.owned.extend(fds)  # the kernel gives the client copies; ours close at the end
            return RegionIoFds(0, subs, fds, need)
        if isinstance(b, DeviceGetIrqInfo):
            if not 0 <= b.index < 5:
                return errno.EINVAL
            count = {0: 1, 1: 1, 2: 8}.get(b.index, 1)
            return IrqInfo(b.index, IrqInfoFlags.EVENTFD, count)
        if isinstance(b, DeviceSetIrqs):
            for i, fd in enumerate(b.fd_list):
                old = self.irq_fds.pop((b.index, b.start + i), None)
                if old is not None:
                    old.close()
                self.irq_fds[(b.index, b.start + i)] = fd
            return DeviceSetIrqsReply()
        if isinstance(b, RegionRead):
            reg = self.regions.get(b.region)
            if reg is None or b.offset + b.count > len(reg):
                return errno.EINVAL
            return RegionReadReply(b.offset, b.region, bytes(reg[b.offset : b.offset + b.count]))
        if isinstance(b, RegionWrite):
            reg = self.regions.get(b.region)
            if reg is None or b.offset + len(b.data) > len(reg):
                return errno.EINVAL
            reg[b.offset : b.offset + len(b.data)] = b.data
            return RegionWriteReply(b.offset, b.region, len(b.data))
        if isinstance(b, RegionWriteMulti):
            for e in b.writes:
                self.regions[e.region][e.offset : e.offset + len(e.data)] = e.data
            return RegionWriteMultiReply(len(b.writes))
        if isinstance(b, DeviceReset):
            return DeviceResetReply()
        if isinstance(b, DeviceFeature):
            return DeviceFeatureReply(b.flags, b.data[::-1])
        if isinstance(b, MigDataRead):
            out, self.mig_data[:] = self.mig_data[: b.size], self.mig_data[b.size :]
            return MigDataReadReply(bytes(out))
        if isinstance(b, MigDataWrite):
            self.mig_data += b.data
            return MigDataWriteReply()
        return errno.ENOTSUP

    def _region_info(self, b: DeviceGetRegionInfo) -> Body | int:
        rw = RegionFlags.READ | RegionFlags.WRITE
        if b.index == 0:
            info = RegionInfo(
                0,
                rw | RegionFlags.MMAP,
                REGION_SIZES[0],
                0,
                caps=(SparseMmapCap(((0, 0x800), (0x800, 0x800))),),
                fd=self.bar_fd,
            )
        elif b.index == 1:
            info = RegionInfo(1, rw, REGION_SIZES[1], 0x10000, caps=(TypeCap(0x8086, 1),))
        elif b.index == 7:
            info = RegionInfo(7, rw, REGION_SIZES[7], 0x70000)
        else:
            return errno.EINVAL
        return info.fit(b.argsz)

"""The typed commands: one method per vfio-user request, the way QEMU would send it.

Apart from the core because they are many and each is a thin translation (arguments to a
body, the expected reply type back); the two with more to them are `region_info` and
`region_io_fds`, whose argsz retry is the protocol's own way of sizing a variable reply.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

from protocol import (
    INFO4_SIZE,
    PROTOCOL_MAJOR,
    PROTOCOL_MINOR,
    REGION_INFO_SIZE,
    Body,
    Capabilities,
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
    DmaUnmap,
    DmaUnmapFlags,
    DmaUnmapReply,
    Feature,
    FeatureFlags,
    IrqInfo,
    IrqSetFlags,
    MigDataRead,
    MigDataReadReply,
    MigDataWrite,
    MigDataWriteReply,
    MigState,
    RegionInfo,
    RegionIoFds,
    RegionRead,
    RegionReadReply,
    RegionWrite,
    RegionWriteMulti,
    RegionWriteMultiReply,
    RegionWriteReply,
    RemoteProtocolError,
    Version,
    WriteEntry,
)

from ..fds import close_all
from ..transport import FdStream
from .core import ClientCore
from .eventfd import FdLike
from .memory import GuestMemory
from .replies import VfioUserError, body_fds, check_reply

_U64 = struct.Struct("<Q")
_MIG_STATE = struct.Struct("<II")  # device_state, data_fd
_LOG_CONTROL = struct.Struct("<QII")  # page_size, num_ranges, reserved
_LOG_RANGE = struct.Struct("<QQ")  # iova, length
_LOG_REPORT = struct.Struct("<QQQ")  # iova, length, page_size

#: argsz retries before we call a server that keeps growing its answer broken
_ARGSZ_ATTEMPTS = 4


class Client(ClientCore):
    """One vfio-user connection, client side. Make one with `open_client`."""

    def __init__(
        self,
        stream: FdStream,
        *,
        caps: Capabilities | None = None,
        reply_timeout: float | None = None,
    ) -> None:
        super().__init__(stream, GuestMemory(self), caps=caps, reply_timeout=reply_timeout)

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
        check_reply(await pending.wait_reply(), DmaMapReply)

    async def dma_unmap(self, address: int, size: int, *, flags: int = 0) -> DmaUnmapReply:
        """DMA_UNMAP one exactly matching window (flags ALL: every window, address=size=0)."""

        def unmapped(_body: Body) -> None:
            self.memory._note_unmap(address, size, flags)

        pending = await self.submit(DmaUnmap(flags, address, size), _on_reply=unmapped)
        return check_reply(await pending.wait_reply(), DmaUnmapReply)

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
            close_all(body_fds(info))
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

    # ------------------------------------------------------------ migration v2

    async def feature_probe(self, feature: int, ops: int = 0) -> bool:
        """DEVICE_FEATURE PROBE (with GET and/or SET in `ops`): does the device offer it?"""
        try:
            await self.device_feature(feature | FeatureFlags.PROBE | ops)
        except VfioUserError:
            return False
        return True

    async def migration_flags(self) -> int:
        """GET MIGRATION: the MigrationFlags the device supports (STOP_COPY, PRE_COPY)."""
        reply = await self.device_feature(Feature.MIGRATION | FeatureFlags.GET, argsz=16)
        return int(_U64.unpack_from(reply.data)[0])

    async def mig_state(self) -> MigState:
        """GET MIG_DEVICE_STATE."""
        reply = await self.device_feature(Feature.MIG_DEVICE_STATE | FeatureFlags.GET, argsz=16)
        return MigState(_MIG_STATE.unpack_from(reply.data)[0])

    async def set_mig_state(self, state: MigState | int) -> None:
        """SET MIG_DEVICE_STATE: the server walks the spec's path to `state` before replying."""
        data = _MIG_STATE.pack(int(state), 0xFFFF_FFFF)
        await self.device_feature(Feature.MIG_DEVICE_STATE | FeatureFlags.SET, data)

    async def dma_logging_start(
        self, page_size: int = 4096, ranges: Sequence[tuple[int, int]] = ()
    ) -> int:
        """DMA_LOGGING_START over `ranges` (none: all of memory); returns the page size the
        server chose (its reply may change the hint)."""
        data = _LOG_CONTROL.pack(page_size, len(ranges), 0)
        data += b"".join(_LOG_RANGE.pack(iova, length) for iova, length in ranges)
        reply = await self.device_feature(Feature.DMA_LOGGING_START | FeatureFlags.SET, data)
        return int(_LOG_CONTROL.unpack_from(reply.data)[0])

    async def dma_logging_stop(self) -> None:
        data = _LOG_CONTROL.pack(0, 0, 0)
        await self.device_feature(Feature.DMA_LOGGING_STOP | FeatureFlags.SET, data)

    async def dma_logging_report(self, iova: int, length: int, page_size: int = 4096) -> bytes:
        """DMA_LOGGING_REPORT: the dirty bitmap of [iova, iova + length), one bit per
        `page_size` (little-endian u64 words); the server clears what it reports."""
        pages = (length + page_size - 1) // page_size
        size = (pages + 63) // 64 * 8
        argsz = 8 + _LOG_REPORT.size + size
        reply = await self.device_feature(
            Feature.DMA_LOGGING_REPORT | FeatureFlags.GET,
            _LOG_REPORT.pack(iova, length, page_size),
            argsz=argsz,
        )
        return reply.data[_LOG_REPORT.size :]

    async def save_device(self, *, chunk: int = 64 << 10) -> bytes:
        """The source's side of a migration: STOP_COPY (the server stops the device and
        saves it), read the whole stream, then STOP. The device stays stopped."""
        await self.set_mig_state(MigState.STOP_COPY)
        out = bytearray()
        while True:
            data = await self.mig_data_read(chunk)
            out += data
            if len(data) < chunk:
                break
        await self.set_mig_state(MigState.STOP)
        return bytes(out)

    async def restore_device(self, data: bytes, *, chunk: int = 64 << 10) -> None:
        """The destination's side: RESUMING, write the stream, STOP (the server loads it),
        RUNNING."""
        await self.set_mig_state(MigState.RESUMING)
        for pos in range(0, len(data), chunk):
            await self.mig_data_write(data[pos : pos + chunk])
        await self.set_mig_state(MigState.STOP)
        await self.set_mig_state(MigState.RUNNING)


__all__ = ["Client"]

"""Migration v2 for one connection: the device-state machine, its data stream, DMA logging.

The vfio-user spec's DEVICE_FEATURE features (MIGRATION, MIG_DEVICE_STATE,
DMA_LOGGING_START/STOP/REPORT) and MIG_DATA_READ/MIG_DATA_WRITE, over the model's device-state
API (`quiesce`, `resume`, `save_state`, `load_state`: devices/sdk/interface.py). dispatch's
handlers only forward here; docs/migration.md is the reference.

What each arc of `protocol._migration` does (a path of several arcs runs them in turn):

| arc | here |
|---|---|
| RUNNING -> STOP, PRE_COPY -> STOP_COPY | `quiesce()` (at most `QUIESCE_GRACE`), cancel tasks |
| STOP -> RUNNING | `resume()` |
| STOP -> STOP_COPY, PRE_COPY -> STOP_COPY | `save_state()` becomes the data stream |
| RUNNING -> PRE_COPY | the model's optional `save_precopy()` becomes the data stream |
| STOP -> RESUMING | MIG_DATA_WRITE collects the stream |
| RESUMING -> STOP | `load_state(stream)` (the work the state carries restarts at once) |
| STOP_COPY -> STOP, PRE_COPY -> RUNNING | the stream is dropped |

A failed arc leaves the device in ERROR, where only DEVICE_RESET (back to RUNNING) helps;
an illegal target is EINVAL and changes nothing. From entering a saving state or RESUMING
until leaving it, the migration holds the device's group as an `ExternalUser`, so the group
cannot be torn down under the stream. A connection holds no reference to this object's
owner: every entry point takes the session as an argument (no reference cycle).
"""

from __future__ import annotations

import errno
import logging
import struct
from collections.abc import Coroutine
from typing import Any, Protocol

import trio

from devices.sdk.interface import DeviceModel
from protocol import (
    Body,
    Capabilities,
    Connection,
    DeviceFeature,
    DeviceFeatureReply,
    Feature,
    FeatureFlags,
    MigDataRead,
    MigDataReadReply,
    MigDataWrite,
    MigDataWriteReply,
    MigrationCaps,
    MigrationFlags,
    MigState,
    RemoteProtocolError,
    transition_path,
)

from .container import Container, DirtyLog
from .contract import EngineHost
from .objects import Device, ExternalUser, ObjectError
from .tasks import TaskGroup

log = logging.getLogger(__name__)

#: how long a model's `quiesce` may take before the engine cancels the device's tasks
QUIESCE_GRACE = 1.0
#: the most migration data a destination buffers before its load (a hostile client must not
#: make the server hold unbounded memory); larger than any model's state by far
MAX_RESUME_DATA = 64 << 20
#: largest DMA logging page size accepted from START's hint
MAX_LOG_PAGE = 1 << 30

_GET = int(FeatureFlags.GET)
_SET = int(FeatureFlags.SET)
_PROBE = int(FeatureFlags.PROBE)
#: operations each feature allows (as libvfio-user's `device_feature_flags_supported`)
SUPPORTED_OPS: dict[int, int] = {
    Feature.MIGRATION: _GET | _PROBE,
    Feature.MIG_DEVICE_STATE: _GET | _SET | _PROBE,
    Feature.DMA_LOGGING_START: _SET | _PROBE,
    Feature.DMA_LOGGING_STOP: _SET | _PROBE,
    Feature.DMA_LOGGING_REPORT: _GET | _PROBE,
}
_U64 = struct.Struct("<Q")
_MIG_STATE = struct.Struct("<II")  # device_state, data_fd (unused in vfio-user)
_LOG_CONTROL = struct.Struct("<QII")  # page_size, num_ranges, reserved; then the ranges
_LOG_RANGE = struct.Struct("<QQ")  # iova, length
_LOG_REPORT = struct.Struct("<QQQ")  # iova, length, page_size; then the bitmap (reply)
_HEAD = DeviceFeature.SIZE  # argsz, flags
_NO_FD = 0xFFFF_FFFF
_SAVING = (MigState.PRE_COPY, MigState.STOP_COPY)
_SETTABLE = frozenset(
    {MigState.STOP, MigState.RUNNING, MigState.STOP_COPY, MigState.RESUMING, MigState.PRE_COPY}
)


class MigrationContext(Protocol):
    """What migration needs of a connection (a `Session`)."""

    name: str
    model: DeviceModel
    device: Device
    tasks: TaskGroup
    container: Container | None
    conn: Connection
    host: EngineHost


class PerConnection:
    """A connection's `Migration` as an attribute (`Session.migration`), built on first use:
    most connections never migrate, and one per connection was ~1% of a connect's cost.
    Kept in the owner's `_migration` (None until then)."""

    def __get__(self, owner: Any, cls: Any = None) -> Migration:
        m: Migration | None = owner._migration
        if m is None:
            m = owner._migration = Migration()
        return m

    def __set__(self, owner: Any, value: Migration) -> None:
        owner._migration = value

    @staticmethod
    def close(owner: Any) -> None:
        """`Migration.close` for a detaching connection, whether or not it built one."""
        m: Migration | None = owner._migration
        if m is not None:
            m.close(owner)
        elif owner.container is not None:
            owner.container.dirty = None  # (what `Migration.close` does besides)


def einval(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(message, errno=errno.EINVAL)


def can_migrate(model: DeviceModel) -> bool:
    """The model can save its state (`state_version` > 0)."""
    return getattr(model, "state_version", 0) > 0


def has_pre_copy(model: DeviceModel) -> bool:
    """The model offers early data while running (an optional `save_precopy() -> bytes`)."""
    return callable(getattr(model, "save_precopy", None))


class Migration:
    """The migration state of one connection's device (docs/migration.md)."""

    def __init__(self) -> None:
        self.state = MigState.RUNNING
        #: `quiesce` ran and neither `resume` nor a reset followed
        self.quiesced = False
        self._out = b""
        self._pos = 0
        self._in: bytearray | None = None
        self._holder: ExternalUser | None = None

    # ------------------------------------------------------------------ entry points

    def feature(
        self, ctx: MigrationContext, req: DeviceFeature
    ) -> Body | Coroutine[Any, Any, Body]:
        """DEVICE_FEATURE: the five migration features (ENOTTY for any other, and for all
        of them when the model cannot save its state, like the kernel)."""
        feature = req.feature
        allowed = SUPPORTED_OPS.get(feature, 0)
        if not allowed or not can_migrate(ctx.model):
            raise RemoteProtocolError(
                f"feature {feature} not supported by {ctx.device.name}", errno=errno.ENOTTY
            )
        ops = req.flags & (_GET | _SET | _PROBE)
        if not ops or ops & ~allowed:
            raise einval(f"feature {feature}: operations {ops >> 16:#x} not supported")
        if ops & _PROBE:
            return DeviceFeatureReply(req.flags, req.data, req.argsz)
        if ops == _GET | _SET:
            raise einval("DEVICE_FEATURE: GET and SET together")
        if ops == _SET and req.argsz < _HEAD + len(req.data):
            raise einval(f"DEVICE_FEATURE: argsz {req.argsz} < {_HEAD + len(req.data)}")
        if feature == Feature.MIGRATION:
            return self._get_migration(ctx, req)
        if feature == Feature.MIG_DEVICE_STATE:
            if ops == _GET:
                return self._reply(req, _MIG_STATE.pack(int(self.state), _NO_FD))
            return self._set_state(ctx, req)
        if feature == Feature.DMA_LOGGING_START:
            return self._logging_start(ctx, req)
        if feature == Feature.DMA_LOGGING_STOP:
            if ctx.container is not None:
                ctx.container.dirty = None
            return DeviceFeatureReply(req.flags, req.data, req.argsz)
        return self._logging_report(ctx, req)

    def data_read(self, ctx: MigrationContext, req: MigDataRead) -> Body:
        """MIG_DATA_READ: the next chunk of the stream, at most `size` bytes; a shorter one
        ends it. The reply is padded to `size`, as libvfio-user's is (its client needs it)."""
        if self.state not in _SAVING:
            raise einval(f"MIG_DATA_READ in state {self.state.name} (not a saving state)")
        peer = ctx.conn.peer_caps
        limit = peer.max_data_xfer_size if peer is not None else Capabilities().max_data_xfer_size
        if req.size > limit:
            raise einval(f"MIG_DATA_READ of {req.size} bytes > max_data_xfer_size {limit}")
        if req.argsz < MigDataRead.SIZE + req.size:
            raise einval(f"MIG_DATA_READ: argsz {req.argsz} < {MigDataRead.SIZE + req.size}")
        chunk = self._out[self._pos : self._pos + req.size]
        self._pos += len(chunk)
        return MigDataReadReply(chunk, pad_to=req.size)

    def data_write(self, ctx: MigrationContext, req: MigDataWrite) -> Body:
        """MIG_DATA_WRITE: collect the stream while RESUMING."""
        if self.state is not MigState.RESUMING or self._in is None:
            raise einval(f"MIG_DATA_WRITE in state {self.state.name} (not RESUMING)")
        if len(self._in) + len(req.data) > MAX_RESUME_DATA:
            raise RemoteProtocolError(
                f"migration data beyond {MAX_RESUME_DATA} bytes", errno=errno.EFBIG
            )
        self._in += req.data
        return MigDataWriteReply()

    def reset(self) -> None:
        """DEVICE_RESET (the model was reset, its tasks cancelled): back to RUNNING, the way
        out of ERROR."""
        self._drop_streams()
        self.quiesced = False
        self.state = MigState.RUNNING

    def close(self, ctx: MigrationContext) -> None:
        """The connection is detaching: let go of the group, stop logging."""
        self._drop_streams()
        if ctx.container is not None:
            ctx.container.dirty = None

    # ------------------------------------------------------------------ features

    @staticmethod
    def _reply(req: DeviceFeature, data: bytes) -> DeviceFeatureReply:
        size = _HEAD + len(data)
        if req.argsz < size:
            raise einval(f"DEVICE_FEATURE GET: argsz {req.argsz} < {size}")
        return DeviceFeatureReply(req.flags, data, size)

    def _get_migration(self, ctx: MigrationContext, req: DeviceFeature) -> Body:
        flags = int(MigrationFlags.STOP_COPY)
        if has_pre_copy(ctx.model):
            flags |= MigrationFlags.PRE_COPY
        return self._reply(req, _U64.pack(flags))

    def _logging_start(self, ctx: MigrationContext, req: DeviceFeature) -> Body:
        container = ctx.container
        assert container is not None
        if len(req.data) < _LOG_CONTROL.size:
            raise einval("DMA_LOGGING_START: control struct missing")
        hint, num_ranges, _ = _LOG_CONTROL.unpack_from(req.data)
        ranges = req.data[_LOG_CONTROL.size :]
        if len(ranges) < num_ranges * _LOG_RANGE.size:
            raise einval(f"DMA_LOGGING_START: {num_ranges} ranges announced, fewer sent")
        for i in range(num_ranges):
            iova, length = _LOG_RANGE.unpack_from(ranges, i * _LOG_RANGE.size)
            if length == 0 or iova + length > 1 << 64:
                raise einval(f"DMA_LOGGING_START: range {iova:#x}+{length:#x} invalid")
        if container.dirty is not None:
            raise RemoteProtocolError("DMA logging already started", errno=errno.EBUSY)
        # The hint is taken when we can track at that size; otherwise our page size (the
        # reply says which). Every write is logged: ranges only allow logging less.
        page = container.page_size
        if hint & (hint - 1) == 0 and page <= hint <= MAX_LOG_PAGE:
            page = hint
        container.dirty = DirtyLog(page)
        log.info("%s: DMA logging started (page size %#x)", ctx.name, page)
        data = _LOG_CONTROL.pack(page, num_ranges, 0) + req.data[_LOG_CONTROL.size :]
        return DeviceFeatureReply(req.flags, data, req.argsz)

    def _logging_report(self, ctx: MigrationContext, req: DeviceFeature) -> Body:
        container = ctx.container
        if container is None or container.dirty is None:
            raise einval("DMA_LOGGING_REPORT: logging is not started")
        if len(req.data) < _LOG_REPORT.size:
            raise einval("DMA_LOGGING_REPORT: report struct missing")
        iova, length, page = _LOG_REPORT.unpack_from(req.data)
        if page == 0 or page & (page - 1) or length == 0 or iova + length > 1 << 64:
            raise einval(f"DMA_LOGGING_REPORT: {iova:#x}+{length:#x} page {page:#x} invalid")
        pages = (length + page - 1) // page
        size = (pages + 63) // 64 * 8
        mig = ctx.host.caps.migration or MigrationCaps()
        if size > mig.max_bitmap_size:
            raise einval(f"DMA_LOGGING_REPORT: bitmap of {size} bytes > {mig.max_bitmap_size}")
        want = _HEAD + _LOG_REPORT.size + size
        if req.argsz < want:
            raise einval(f"DMA_LOGGING_REPORT: argsz {req.argsz} < {want}")
        bitmap = container.dirty.report(iova, length, page)
        return DeviceFeatureReply(req.flags, req.data[: _LOG_REPORT.size] + bitmap, want)

    # ------------------------------------------------------------------ device state

    async def _set_state(self, ctx: MigrationContext, req: DeviceFeature) -> Body:
        if len(req.data) < _MIG_STATE.size:
            raise einval("MIG_DEVICE_STATE: device_state missing")
        (target, _fd) = _MIG_STATE.unpack_from(req.data)
        path = None
        if target in _SETTABLE:
            path = transition_path(
                self.state, MigState(target), pre_copy=has_pre_copy(ctx.model)
            )
        if path is None:
            name = MigState(target).name if target in MigState._value2member_map_ else target
            raise einval(f"MIG_DEVICE_STATE: {self.state.name} -> {name} is not allowed")
        for step in path:
            try:
                await self._arc(ctx, self.state, step)
            except ObjectError:
                raise  # refused before anything changed (the group is going away)
            except Exception:
                log.warning("%s: migration %s -> %s failed; device state ERROR until reset",
                            ctx.name, self.state.name, step.name)
                self._drop_streams()
                self.state = MigState.ERROR
                raise
            log.debug("%s: migration %s -> %s", ctx.name, self.state.name, step.name)
            self.state = step
        return DeviceFeatureReply(req.flags, req.data, req.argsz)

    async def _arc(self, ctx: MigrationContext, src: MigState, dst: MigState) -> None:
        model = ctx.model
        S = MigState
        if dst is S.STOP:
            if src is S.RUNNING:
                await self._quiesce(ctx)
            elif src is S.RESUMING:
                data = bytes(self._in or b"")
                self._in = None
                model.load_state(data)  # StateError: the device is untouched; ERROR
                # Not quiesced again: the load restarted the work the state carries, and a
                # quiesce now would stall it in message mode (the client's DMA replies
                # are routed by the read loop, which is busy with this SET) and cancel it.
                # `quiesced` stays: STOP -> RUNNING still calls `resume`, which lifts the
                # quiesce of RUNNING -> STOP for a model whose load did not.
                self._let_go()
            else:  # STOP_COPY: the stream ends
                self._drop_streams()
        elif dst is S.RUNNING:
            if src is S.STOP and self.quiesced:
                model.resume()
                self.quiesced = False
            self._drop_streams()  # PRE_COPY: the stream ends
        elif dst is S.STOP_COPY:
            self._hold(ctx)
            if src is S.PRE_COPY:
                await self._quiesce(ctx)
            self._stream(model.save_state())
        elif dst is S.PRE_COPY:
            self._hold(ctx)
            save_precopy = getattr(model, "save_precopy")  # noqa: B009 (optional hook)
            self._stream(bytes(save_precopy()))
        elif dst is S.RESUMING:
            self._hold(ctx)
            self._in = bytearray()

    async def _quiesce(self, ctx: MigrationContext) -> None:
        with trio.move_on_after(QUIESCE_GRACE) as scope:
            await ctx.model.quiesce()
        if scope.cancelled_caught:
            log.warning("%s: quiesce took over %.1fs; cancelling the device's tasks",
                        ctx.name, QUIESCE_GRACE)
        await ctx.tasks.cancel_all()
        self.quiesced = True

    def _stream(self, data: bytes) -> None:
        self._out, self._pos = data, 0

    def _hold(self, ctx: MigrationContext) -> None:
        if self._holder is None:
            holder = ExternalUser(ctx.device.group, f"migration of {ctx.device.name}")
            holder.acquire()
            self._holder = holder

    def _let_go(self) -> None:
        holder, self._holder = self._holder, None
        if holder is not None:
            holder.release()

    def _drop_streams(self) -> None:
        self._out, self._pos, self._in = b"", 0, None
        self._let_go()


__all__ = ["MAX_RESUME_DATA", "QUIESCE_GRACE", "Migration", "MigrationContext", "can_migrate"]

"""Command handlers, and the one place where exceptions become errno replies.

A handler gets the session and the decoded request and returns the reply body, or a
coroutine for the few commands that must wait (DMA_UNMAP, DEVICE_RESET). `run_handler` frames
the reply, honours No_reply, and maps failures to errnos by the table in `errors`.

See docs/architecture.md, "Errors" (the errno table) and "The object model".
"""

from __future__ import annotations

import errno
import logging
import struct
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

import trio

from devices.sdk.interface import (
    NUM_PCI_IRQS,
    NUM_PCI_REGIONS,
    RegionSpec,
)
from protocol import (
    HEADER as _HEADER,
)
from protocol import (
    PROTOCOL_MAJOR,
    PROTOCOL_MINOR,
    BadRequest,
    Body,
    Capabilities,
    Command,
    DeviceFeature,
    DeviceFlags,
    DeviceGetInfo,
    DeviceGetIrqInfo,
    DeviceGetRegionInfo,
    DeviceGetRegionIoFds,
    DeviceInfo,
    DeviceResetReply,
    DeviceSetIrqs,
    DeviceSetIrqsReply,
    DmaMap,
    DmaMapReply,
    DmaUnmap,
    DmaUnmapFlags,
    DmaUnmapReply,
    Frame,
    HeaderFlags,
    IrqInfo,
    MigDataRead,
    MigDataWrite,
    RegionFlags,
    RegionInfo,
    RegionIoFds,
    RegionRead,
    RegionWrite,
    RegionWriteMulti,
    RegionWriteMultiReply,
    RemoteProtocolError,
    Request,
    SparseMmapCap,
    Version,
    VersionReply,
    negotiate,
)

from .access import AccessContext, pack_read_reply, pack_write_reply, read_model
from .container import Container, DmaWindow
from .contract import EngineHost
from .errors import fail
from .fds import close_all
from .irq import IrqTable
from .migration import Migration
from .objects import Attachment, Device, DeviceState, ObjectError
from .session_dma import DmaRequests
from .stats import ONE
from .tasks import TaskGroup

log = logging.getLogger(__name__)


class HandlerContext(AccessContext, Attachment, Protocol):
    """What the handlers need of a connection: the `Session`, seen from below (dispatch is
    imported by the session, never the other way round)."""

    host: EngineHost
    device: Device
    container: Container | None
    tasks: TaskGroup
    #: message-mode DMA of this client: the owner of its windows mapped without a file
    requests: DmaRequests
    warned_unsealed: bool
    #: migration v2 state of this connection's device
    migration: Migration

    @property
    def irq_table(self) -> IrqTable | None:
        """The client's IRQ table while attached (built on first use)."""

    def attach(self, caps: Capabilities) -> None: ...


Result = Body | Coroutine[Any, Any, Body] | None
Handler = Callable[[HandlerContext, Any], Result]
Framed = bytes | tuple[bytes, tuple[Any, ...]] | None
_UNMAP_ALL = int(DmaUnmapFlags.ALL)
_TYPE_REPLY = int(HeaderFlags.TYPE_REPLY)
#: every DMA_MAP reply is the same empty body (frozen)
_DMA_MAP_REPLY = DmaMapReply()
_READ = int(Command.REGION_READ)
_WRITE = int(Command.REGION_WRITE)
_DMA_MAP = int(Command.DMA_MAP)
_UNMAP_SIZE = DmaUnmap.SIZE
#: a DMA_UNMAP reply, header and echoed entry, in one pack (both formats are "<": no padding)
_UNMAP_REPLY = struct.Struct(_HEADER.format + DmaUnmap.HEAD.format.lstrip("<"))
_map_fields = DmaMap.fields
_unmap_fields = DmaUnmap.fields


def _frame(session: HandlerContext, req: Request, body: Body | None) -> Framed:
    if req.no_reply or body is None:
        return None
    data, fds = session.conn.send_reply(req.msg_id, body)
    return (data, fds) if fds else data


def run_request(session: HandlerContext, req: Request) -> Framed | Awaitable[Framed]:
    """Answer one decoded request: framed bytes, None (no reply), or an awaitable of either.

    Region accesses are answered by `access`'s check and packers (the same the fast path
    uses); every other command by its handler in `HANDLERS`."""
    command = req.body.COMMAND
    if command in (_READ, _WRITE):
        return _region_access(session, req)
    session.device.stats.messages[command] += 1
    return run_handler(session, HANDLERS.get(command), req)


def _region_access(session: HandlerContext, req: Request) -> bytes | None:
    body = req.body
    try:
        if isinstance(body, RegionRead):
            session.regions.check(body.region, body.offset, body.count, False)
            data = read_model(session.model, body.region, body.offset, body.count)
            reply = pack_read_reply(req.msg_id, body.offset, body.region, data)
            session.regions.rd += body.count + ONE
        else:
            assert isinstance(body, RegionWrite)
            session.regions.check(body.region, body.offset, len(body.data), True)
            session.model.region_write(body.region, body.offset, body.data)
            session.regions.wr += len(body.data) + ONE
            reply = pack_write_reply(req.msg_id, body.offset, body.region, len(body.data))
    except Exception as exc:
        return fail(session, req.msg_id, body.COMMAND, req.no_reply, exc)
    return None if req.no_reply else reply


def run_handler(
    session: HandlerContext, handler: Handler | None, req: Request
) -> Framed | Awaitable[Framed]:
    """Run a handler; returns framed bytes, None (no reply), or an awaitable of either.
    Every failure becomes its errno reply in `errors.fail`."""
    if handler is None:  # decoded but not served here (e.g. DMA_READ sent to a server)
        exc: Exception = RemoteProtocolError(
            f"command {req.body.COMMAND.name} not supported", errno=errno.ENOTSUP
        )
        return fail(session, req.msg_id, req.body.COMMAND, req.no_reply, exc)
    try:
        result = handler(session, req.body)
    except Exception as exc:
        close_all(req.body.fds)
        return fail(session, req.msg_id, req.body.COMMAND, req.no_reply, exc)
    if isinstance(result, Coroutine):
        return _finish(session, req, result)
    return _frame(session, req, result)


async def _finish(session: HandlerContext, req: Request, coro: Coroutine[Any, Any, Body]) -> Framed:
    try:
        body = await coro
    except Exception as exc:
        return fail(session, req.msg_id, req.body.COMMAND, req.no_reply, exc)
    return _frame(session, req, body)


def serve_plain(
    session: HandlerContext,
    msg_id: int,
    command: int,
    flags: int,
    payload: memoryview,
    fds: tuple[Any, ...] = (),
) -> bytes | Awaitable[bytes | None] | None:
    """Answer a plain DMA_MAP / DMA_UNMAP (a request with no flag but No_reply, no error
    field, no descriptors: `Connection.take_plain`) from its payload.

    The same checks (`fields`, the codec's twin of `decode`), the same handler work
    (`map_window`, `unmap_windows`, which `on_dma_map` and `on_dma_unmap` call too) and the
    same error boundary as `run_request`, minus the Frame, Request, body and reply objects:
    mapping and unmapping windows back to back is what a guest's IOMMU does, and building
    those frozen dataclasses was more than half of what a map cost beyond any message.
    A payload the codec refuses goes to the full path, so the errno is always its own.
    `fds`: the descriptor a DMA_MAP came with alone in its read (the serial loop's)."""
    if command == _DMA_MAP:
        try:
            flags_, offset, address, size, fd, _argsz = _map_fields(payload, fds)
        except RemoteProtocolError:
            close_all(fds)  # refused with or without them: the same EINVAL
            return session.full_path(msg_id, command, flags, payload)
        session.device.stats.messages[command] += 1
        try:
            map_window(session, flags_, offset, address, size, fd)
        except Exception as exc:
            close_all(fds)
            return fail(session, msg_id, command, flags != 0, exc)
        return None if flags else _HEADER.pack(msg_id, command, 16, _TYPE_REPLY, 0)
    try:
        flags_, address, size, argsz, _bitmap = _unmap_fields(payload, fds)
    except RemoteProtocolError:
        close_all(fds)
        return session.full_path(msg_id, command, flags, payload)
    session.device.stats.messages[command] += 1
    try:
        waiting = unmap_windows(session, flags_, address, size)
    except Exception as exc:
        close_all(fds)
        return fail(session, msg_id, command, flags != 0, exc)
    # the reply echoes the request's entry (`DmaUnmapReply` without a bitmap, encoded)
    reply = None if flags else _UNMAP_REPLY.pack(
        msg_id, command, 16 + _UNMAP_SIZE, _TYPE_REPLY, 0, argsz, flags_, address, size
    )
    if waiting is None:
        return reply
    return _finish_plain(session, msg_id, command, flags != 0, waiting, reply)


async def _finish_plain(
    session: HandlerContext,
    msg_id: int,
    command: int,
    no_reply: bool,
    waiting: Awaitable[None],
    reply: bytes | None,
) -> bytes | None:
    try:
        await waiting
    except Exception as exc:
        return fail(session, msg_id, command, no_reply, exc)
    return reply


def run_frame(session: HandlerContext, frame: Frame) -> bytes | None:
    """The full path for a plain frame `access.serve` or `serve_plain` would not answer
    itself: decode it, then run its ordinary handler (or reject it)."""
    ev = session.conn.event_from_frame(frame)
    if isinstance(ev, Request):
        out = run_request(session, ev)
        assert out is None or isinstance(out, bytes), "region accesses answer at once"
        return out  # (a DMA frame here is one its codec refused: a BadRequest)
    assert isinstance(ev, BadRequest)
    return reject(session, ev)


def reject(session: HandlerContext, ev: BadRequest) -> bytes | None:
    """A message that could not be accepted: close its fds, log it, frame the errno reply."""
    close_all(ev.error.fds)
    session.count_error(ev.command, ev.error.errno)
    if ev.command not in (_READ, _WRITE):  # `count_error` counts a failed region access
        session.device.stats.messages[ev.command] += 1
    log.warning(
        "%s: rejected msg %d (command %d): %s", session.name, ev.msg_id, ev.command, ev.error
    )
    return None if ev.no_reply else session.conn.send_error(ev.msg_id, ev.command, ev.error.errno)


# --------------------------------------------------------------------------- handlers


#: how long a new client waits for the device's previous client to finish detaching
PREVIOUS_CLIENT_GRACE = 0.5


def on_version(session: HandlerContext, req: Version) -> Result:
    if req.major != PROTOCOL_MAJOR:
        raise RemoteProtocolError(f"VERSION: major {req.major} not supported")
    caps = negotiate(req.capabilities, session.host.caps)
    session.conn.peer_caps = req.capabilities
    reply = VersionReply(PROTOCOL_MAJOR, min(req.minor, PROTOCOL_MINOR), caps)
    if session.device.state is not DeviceState.ACTIVE:  # no grace for a device going away
        raise ObjectError(errno.ENODEV, f"device {session.device.name} is being removed")
    previous = session.device.session
    if previous is not None and previous is not session:
        # A client that disconnects and reconnects at once may beat its old session's
        # detach; give that one a moment before answering EBUSY.
        return _version_after_previous(session, caps, reply)
    session.attach(caps)
    return reply


async def _version_after_previous(session: HandlerContext, caps: Capabilities, reply: Body) -> Body:
    released = session.device.released
    if released is not None:
        with trio.move_on_after(PREVIOUS_CLIENT_GRACE):
            await released.wait()
    session.attach(caps)
    return reply


def on_dma_map(session: HandlerContext, req: DmaMap) -> Body:
    map_window(session, req.flags, req.offset, req.address, req.size, req.fd)
    return _DMA_MAP_REPLY


def map_window(
    session: HandlerContext, flags: int, offset: int, address: int, size: int, fd: Any
) -> None:
    """DMA_MAP's work, from the body's values (`on_dma_map` and `serve_plain`)."""
    container = session.container
    assert container is not None
    w = container.map_window(flags, offset, address, size, fd, session.requests)
    if w.file is not None and not session.warned_unsealed:
        # once per connection: the deployment loses zero copy and should know why
        session.warned_unsealed = True
        log.warning(
            "%s: window %#x+%#x: its file is not sealed against shrinking, so it is served "
            "with pread/pwrite instead of mmap (seal it with F_SEAL_SHRINK for zero copy); "
            "said once per connection",
            session.name,
            w.address,
            w.size,
        )


async def _release_pinned(session: HandlerContext, windows: list[DmaWindow]) -> None:
    if not await Container.drain(windows, timeout=1.0):
        # Quiesce: the device holds guest memory across an await and did not let go in
        # time; cancel its tasks (they are restartable by design) rather than unmap under it.
        log.warning("%s: DMA still pinned at unmap; quiescing device tasks", session.name)
        await session.tasks.cancel_all()
    for w in windows:
        w.release()


async def _reply_after(waiting: Awaitable[None], reply: Body) -> Body:
    await waiting
    return reply


def on_dma_unmap(session: HandlerContext, req: DmaUnmap) -> Result:
    waiting = unmap_windows(session, req.flags, req.address, req.size)
    reply = DmaUnmapReply(req.flags, req.address, req.size, req.argsz)
    return reply if waiting is None else _reply_after(waiting, reply)


def unmap_windows(
    session: HandlerContext, flags: int, address: int, size: int
) -> Coroutine[Any, Any, None] | None:
    """DMA_UNMAP's work (`on_dma_unmap` and `serve_plain`): the windows are gone from the
    container at once; None when they are released too, else what releases them once the
    device's pins let go (the spec: every reference, in-flight DMA included, is released
    before the reply)."""
    container = session.container
    assert container is not None
    if not flags:
        pinned = container.unmap(address, size)
        return None if pinned is None else _release_pinned(session, [pinned])
    if flags & ~_UNMAP_ALL:
        raise RemoteProtocolError(f"DMA_UNMAP: flags {flags:#x} not supported")
    if address or size:
        raise RemoteProtocolError("DMA_UNMAP: unmap-all needs address = size = 0")
    windows = container.take_all()
    if any(w.pins for w in windows):
        return _release_pinned(session, windows)
    for w in windows:
        w.release()
    return None


def on_device_get_info(session: HandlerContext, req: DeviceGetInfo) -> Body:
    model = session.device.model
    flags = DeviceFlags.PCI | (DeviceFlags.RESET if model.supports_reset else 0)
    return DeviceInfo(int(flags), NUM_PCI_REGIONS, NUM_PCI_IRQS)


def _region(session: HandlerContext, index: int) -> RegionSpec:
    if not 0 <= index < NUM_PCI_REGIONS:
        raise RemoteProtocolError(f"region index {index} out of range")
    return session.host.region_specs(session.device).get(index) or RegionSpec(index, 0)


def on_get_region_info(session: HandlerContext, req: DeviceGetRegionInfo) -> Body:
    spec = _region(session, req.index)
    flags = 0
    if spec.size:
        flags |= RegionFlags.READ if spec.readable else 0
        flags |= RegionFlags.WRITE if spec.writable else 0
    caps: tuple[SparseMmapCap, ...] = ()
    fd = None
    if spec.size and spec.fd is not None:
        flags |= RegionFlags.MMAP
        fd = spec.fd
        if spec.mmap_areas:
            caps = (SparseMmapCap(tuple((a.offset, a.size) for a in spec.mmap_areas)),)
    info = RegionInfo(
        req.index, flags, spec.size, spec.fd_offset if fd is not None else 0, caps, fd
    )
    return info.fit(req.argsz)


def on_get_region_io_fds(session: HandlerContext, req: DeviceGetRegionIoFds) -> Body:
    spec = _region(session, req.index)
    if not spec.size:
        raise RemoteProtocolError(f"region {req.index} does not exist")
    # No ioeventfds are offered: every access comes as a message (or through mmap).
    return RegionIoFds(req.index)


def on_get_irq_info(session: HandlerContext, req: DeviceGetIrqInfo) -> Body:
    table = session.irq_table
    assert table is not None
    if not 0 <= req.index < len(table.lines):
        raise RemoteProtocolError(f"IRQ index {req.index} out of range")
    line = table.lines[req.index]
    return IrqInfo(req.index, line.flags, line.spec.count)


def on_set_irqs(session: HandlerContext, req: DeviceSetIrqs) -> Body:
    table = session.irq_table
    assert table is not None
    for index, vector in table.set_irqs(req):
        session.device.model.irq_unmasked(index, vector)
    return DeviceSetIrqsReply()


def on_region_write_multi(session: HandlerContext, req: RegionWriteMulti) -> Body:
    # Validate every entry before applying any, so a bad entry leaves no half-applied batch.
    for w in req.writes:
        session.regions.check(w.region, w.offset, len(w.data), True)
    model = session.model
    for w in req.writes:
        model.region_write(w.region, w.offset, w.data)
    return RegionWriteMultiReply(len(req.writes))


async def _reset(session: HandlerContext) -> Body:
    await session.tasks.cancel_all()
    session.device.model.reset()
    session.device.set_health(True)  # a reset is the way back, as for a failed VF
    session.migration.reset()  # back to RUNNING (the way out of ERROR)
    return DeviceResetReply()


def on_device_reset(session: HandlerContext, req: Body) -> Result:
    if not session.device.model.supports_reset:
        raise RemoteProtocolError("device does not support reset")
    return _reset(session)


def on_device_feature(session: HandlerContext, req: DeviceFeature) -> Result:
    """Migration and DMA logging (`migration`); any other feature is ENOTTY, as the kernel's."""
    return session.migration.feature(session, req)


def on_mig_data(session: HandlerContext, req: MigDataRead | MigDataWrite) -> Body:
    if isinstance(req, MigDataRead):
        return session.migration.data_read(session, req)
    return session.migration.data_write(session, req)


HANDLERS: dict[int, Handler] = {
    Command.VERSION: on_version,
    Command.DMA_MAP: on_dma_map,
    Command.DMA_UNMAP: on_dma_unmap,
    Command.DEVICE_GET_INFO: on_device_get_info,
    Command.DEVICE_GET_REGION_INFO: on_get_region_info,
    Command.DEVICE_GET_REGION_IO_FDS: on_get_region_io_fds,
    Command.DEVICE_GET_IRQ_INFO: on_get_irq_info,
    Command.DEVICE_SET_IRQS: on_set_irqs,
    Command.REGION_WRITE_MULTI: on_region_write_multi,
    Command.DEVICE_RESET: on_device_reset,
    Command.DEVICE_FEATURE: on_device_feature,
    Command.MIG_DATA_READ: on_mig_data,
    Command.MIG_DATA_WRITE: on_mig_data,
}

#: the commands besides region accesses that the read loop takes as plain frames
#: (`access.FAST_COMMANDS`) and `serve_plain` answers, with the body class that decodes them
PLAIN_BODIES: dict[int, type[DmaMap] | type[DmaUnmap]] = {
    Command.DMA_MAP: DmaMap,
    Command.DMA_UNMAP: DmaUnmap,
}

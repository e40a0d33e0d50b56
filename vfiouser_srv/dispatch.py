"""Command handlers, and the one place where exceptions become errno replies.

A handler gets the session and the decoded request and returns the reply body, or a
coroutine for the few commands that must wait (DMA_UNMAP, DEVICE_RESET). `run_handler` frames
the reply, honours No_reply, and maps failures to errnos by the table in `errors`.
"""

from __future__ import annotations

import errno
import logging
import struct
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

import trio

from devices.sdk.interface import (
    NUM_PCI_IRQS,
    NUM_PCI_REGIONS,
    DeviceError,
    RegionSpec,
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
    RegionReadReply,
    RegionWrite,
    RegionWriteMulti,
    RegionWriteMultiReply,
    RegionWriteReply,
    RemoteProtocolError,
    Request,
    SparseMmapCap,
    Version,
    VersionReply,
    negotiate,
)

from .container import Container, DmaWindow
from .errors import EXPECTED, errno_of
from .fds import close_all
from .objects import DeviceState, ObjectError

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger(__name__)

Result = Body | Coroutine[Any, Any, Body] | None
Handler = Callable[["Session", Any], Result]
Framed = bytes | tuple[bytes, tuple[Any, ...]] | None


def _fail(session: Session, req: Request, exc: Exception) -> bytes | None:
    return _fail_raw(session, req.msg_id, req.body.COMMAND, req.no_reply, exc)


def _fail_raw(
    session: Session, msg_id: int, command: int, no_reply: bool, exc: Exception
) -> bytes | None:
    err = errno_of(exc)
    name = Command(command).name if command in Command._value2member_map_ else str(command)
    if isinstance(exc, EXPECTED):
        log.warning("%s: %s id=%d failed: %s (errno %d)", session.name, name, msg_id, exc, err)
    else:
        log.error("%s: %s id=%d raised", session.name, name, msg_id, exc_info=exc)
    if isinstance(exc, ObjectError) and command == Command.VERSION:
        session.request_close()  # EBUSY/ENODEV at VERSION: answer, then close
    if no_reply:
        return None
    return session.conn.send_error(msg_id, command, err)


def _frame(session: Session, req: Request, body: Body | None) -> Framed:
    if req.no_reply or body is None:
        return None
    data, fds = session.conn.send_reply(req.msg_id, body)
    return (data, fds) if fds else data


def run_handler(
    session: Session, handler: Handler | None, req: Request
) -> Framed | Awaitable[Framed]:
    """Run a handler; returns framed bytes, None (no reply), or an awaitable of either."""
    if handler is None:  # decoded but not served here (e.g. DMA_READ sent to a server)
        exc: Exception = RemoteProtocolError(
            f"command {req.body.COMMAND.name} not supported", errno=errno.ENOTSUP
        )
        return _fail(session, req, exc)
    try:
        result = handler(session, req.body)
    except Exception as exc:
        close_all(req.body.fds)
        return _fail(session, req, exc)
    if isinstance(result, Coroutine):
        return _finish(session, req, result)
    return _frame(session, req, result)


async def _finish(session: Session, req: Request, coro: Coroutine[Any, Any, Body]) -> Framed:
    try:
        body = await coro
    except Exception as exc:
        return _fail(session, req, exc)
    return _frame(session, req, body)


# --------------------------------------------------------------------------- hot path

#: commands worth a decoder of their own: they are nearly all of a running guest's traffic
HOT_COMMANDS = frozenset({int(Command.REGION_READ), int(Command.REGION_WRITE)})
_ACCESS = struct.Struct("<QII")
_REPLY_HEAD = struct.Struct("<HHIIIQII")  # 16-byte header + region access struct
_READ = int(Command.REGION_READ)
_WRITE = int(Command.REGION_WRITE)
_TYPE_REPLY = int(HeaderFlags.TYPE_REPLY)
_UNMAP_ALL = int(DmaUnmapFlags.ALL)


def run_hot(session: Session, frame: Frame) -> bytes | None:
    """REGION_READ / REGION_WRITE without building message objects (see `run_hot_parts`)."""
    return run_hot_parts(session, frame.msg_id, frame.command, frame.flags, frame.payload)


def run_hot_parts(
    session: Session, msg_id: int, command: int, flags: int, payload: bytes | memoryview
) -> bytes | None:
    """A plain REGION_READ / REGION_WRITE from its header fields and payload.

    `payload` may be a view of the receive buffer (used before the next checkpoint, and
    copied before a model sees written data). Anything unusual (bad sizes, ranges,
    permissions) is handed to the full decoder and handlers, so the fast path never has to
    produce an error reply of its own except for failures raised by the model itself.
    """
    if len(payload) < 16:
        return _slow(session, msg_id, command, flags, payload)
    offset, region, count = _ACCESS.unpack_from(payload)
    limits = session.region_limits
    if region >= len(limits) or count > session.max_xfer:
        return _slow(session, msg_id, command, flags, payload)
    size, readable, writable = limits[region]
    if offset + count > size:
        return _slow(session, msg_id, command, flags, payload)
    no_reply = flags != 0
    model = session.device.model
    if command == _READ:
        if not readable or len(payload) != 16:
            return _slow(session, msg_id, command, flags, payload)
        try:
            data = model.region_read(region, offset, count)
            if len(data) != count:
                raise DeviceError(errno.EIO, f"model returned {len(data)} bytes for {count}")
        except Exception as exc:
            return _fail_raw(session, msg_id, _READ, no_reply, exc)
        if no_reply:
            return None
        head = _REPLY_HEAD.pack(msg_id, _READ, 32 + count, _TYPE_REPLY, 0, offset, region, count)
        return head + data
    if not writable or len(payload) - 16 != count:
        return _slow(session, msg_id, command, flags, payload)
    try:
        model.region_write(region, offset, bytes(payload[16:]))
    except Exception as exc:
        return _fail_raw(session, msg_id, _WRITE, no_reply, exc)
    if no_reply:
        return None
    return _REPLY_HEAD.pack(msg_id, _WRITE, 32, _TYPE_REPLY, 0, offset, region, count)


def _slow(
    session: Session, msg_id: int, command: int, flags: int, payload: bytes | memoryview
) -> bytes | None:
    return run_frame(session, Frame(msg_id, command, flags, 0, bytes(payload), []))


def run_frame(session: Session, frame: Frame) -> bytes | None:
    """The full path for a hot frame: decode it, then run its ordinary handler."""
    ev = session.conn.event_from_frame(frame)
    if isinstance(ev, Request):
        out = run_handler(session, HANDLERS.get(ev.body.COMMAND), ev)
        assert out is None or isinstance(out, bytes), "region handlers answer at once"
        return out
    assert isinstance(ev, BadRequest)
    return reject(session, ev)


def reject(session: Session, ev: BadRequest) -> bytes | None:
    """A message that could not be accepted: close its fds, log it, frame the errno reply."""
    close_all(ev.error.fds)
    log.warning(
        "%s: rejected msg %d (command %d): %s", session.name, ev.msg_id, ev.command, ev.error
    )
    return None if ev.no_reply else session.conn.send_error(ev.msg_id, ev.command, ev.error.errno)


# --------------------------------------------------------------------------- handlers


#: how long a new client waits for the device's previous client to finish detaching
PREVIOUS_CLIENT_GRACE = 0.5


def on_version(session: Session, req: Version) -> Result:
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


async def _version_after_previous(session: Session, caps: Capabilities, reply: Body) -> Body:
    released = session.device.released
    if released is not None:
        with trio.move_on_after(PREVIOUS_CLIENT_GRACE):
            await released.wait()
    session.attach(caps)
    return reply


def on_dma_map(session: Session, req: DmaMap) -> Body:
    assert session.container is not None
    w = session.container.map(req, owner=session)
    if w.mode == "file" and not session.warned_unsealed:
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
    else:
        log.debug("%s: mapped %#x+%#x %s", session.name, w.address, w.size, w.mode)
    return DmaMapReply()


async def _release_pinned(session: Session, windows: list[DmaWindow], reply: Body) -> Body:
    if not await Container.drain(windows, timeout=1.0):
        # Quiesce: the device holds guest memory across an await and did not let go in
        # time; cancel its tasks (they are restartable by design) rather than unmap under it.
        log.warning("%s: DMA still pinned at unmap; quiescing device tasks", session.name)
        await session.tasks.cancel_all()
    for w in windows:
        w.release()
    return reply


def on_dma_unmap(session: Session, req: DmaUnmap) -> Result:
    if req.flags & ~_UNMAP_ALL:
        raise RemoteProtocolError(f"DMA_UNMAP: flags {req.flags:#x} not supported")
    unmap_all = bool(req.flags & _UNMAP_ALL)
    if unmap_all and (req.address or req.size):
        raise RemoteProtocolError("DMA_UNMAP: unmap-all needs address = size = 0")
    container = session.container
    assert container is not None
    windows = container.take_all() if unmap_all else [container.take(req.address, req.size)]
    reply = DmaUnmapReply(req.flags, req.address, req.size, req.argsz)
    if any(w.pins for w in windows):
        # The spec: release every reference, in-flight DMA included, before replying.
        return _release_pinned(session, windows, reply)
    for w in windows:
        w.release()
    return reply


def on_device_get_info(session: Session, req: DeviceGetInfo) -> Body:
    model = session.device.model
    flags = DeviceFlags.PCI | (DeviceFlags.RESET if model.supports_reset else 0)
    return DeviceInfo(int(flags), NUM_PCI_REGIONS, NUM_PCI_IRQS)


def _region(session: Session, index: int) -> RegionSpec:
    if not 0 <= index < NUM_PCI_REGIONS:
        raise RemoteProtocolError(f"region index {index} out of range")
    return session.host.region_specs(session.device).get(index) or RegionSpec(index, 0)


def on_get_region_info(session: Session, req: DeviceGetRegionInfo) -> Body:
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


def on_get_region_io_fds(session: Session, req: DeviceGetRegionIoFds) -> Body:
    spec = _region(session, req.index)
    if not spec.size:
        raise RemoteProtocolError(f"region {req.index} does not exist")
    # No ioeventfds are offered: every access comes as a message (or through mmap).
    return RegionIoFds(req.index)


def on_get_irq_info(session: Session, req: DeviceGetIrqInfo) -> Body:
    table = session.irq_table
    assert table is not None
    if not 0 <= req.index < len(table.lines):
        raise RemoteProtocolError(f"IRQ index {req.index} out of range")
    line = table.lines[req.index]
    return IrqInfo(req.index, line.flags, line.spec.count)


def on_set_irqs(session: Session, req: DeviceSetIrqs) -> Body:
    table = session.irq_table
    assert table is not None
    for index, vector in table.set_irqs(req):
        session.device.model.irq_unmasked(index, vector)
    return DeviceSetIrqsReply()


def _check_access(session: Session, index: int, offset: int, count: int, write: bool) -> None:
    spec = _region(session, index)
    if not spec.size:
        raise RemoteProtocolError(f"region {index} does not exist")
    if (write and not spec.writable) or (not write and not spec.readable):
        raise RemoteProtocolError(f"region {index} is not {'writ' if write else 'read'}able")
    if offset + count > spec.size:
        raise RemoteProtocolError(
            f"access {offset:#x}+{count:#x} past the end of region {index} ({spec.size:#x})"
        )
    caps = session.conn.caps
    if caps is not None and count > caps.max_data_xfer_size:
        raise RemoteProtocolError(f"count {count} above max_data_xfer_size")


def on_region_read(session: Session, req: RegionRead) -> Body:
    _check_access(session, req.region, req.offset, req.count, False)
    data = session.device.model.region_read(req.region, req.offset, req.count)
    if len(data) != req.count:
        raise DeviceError(errno.EIO, f"model returned {len(data)} bytes for {req.count}")
    return RegionReadReply(req.offset, req.region, data)


def on_region_write(session: Session, req: RegionWrite) -> Body:
    _check_access(session, req.region, req.offset, len(req.data), True)
    session.device.model.region_write(req.region, req.offset, req.data)
    return RegionWriteReply(req.offset, req.region, len(req.data))


def on_region_write_multi(session: Session, req: RegionWriteMulti) -> Body:
    # Validate every entry before applying any, so a bad entry leaves no half-applied batch.
    for w in req.writes:
        _check_access(session, w.region, w.offset, len(w.data), True)
    model = session.device.model
    for w in req.writes:
        model.region_write(w.region, w.offset, w.data)
    return RegionWriteMultiReply(len(req.writes))


async def _reset(session: Session) -> Body:
    await session.tasks.cancel_all()
    session.device.model.reset()
    return DeviceResetReply()


def on_device_reset(session: Session, req: Body) -> Result:
    if not session.device.model.supports_reset:
        raise RemoteProtocolError("device does not support reset")
    return _reset(session)


def on_device_feature(session: Session, req: DeviceFeature) -> Body:
    # Migration is not offered yet; the kernel answers unknown features with ENOTTY.
    raise RemoteProtocolError(f"feature {req.feature} not supported", errno=errno.ENOTTY)


def on_mig_data(session: Session, req: MigDataRead | MigDataWrite) -> Body:
    raise RemoteProtocolError("no migration data transfer is in progress")


HANDLERS: dict[int, Handler] = {
    Command.VERSION: on_version,
    Command.DMA_MAP: on_dma_map,
    Command.DMA_UNMAP: on_dma_unmap,
    Command.DEVICE_GET_INFO: on_device_get_info,
    Command.DEVICE_GET_REGION_INFO: on_get_region_info,
    Command.DEVICE_GET_REGION_IO_FDS: on_get_region_io_fds,
    Command.DEVICE_GET_IRQ_INFO: on_get_irq_info,
    Command.DEVICE_SET_IRQS: on_set_irqs,
    Command.REGION_READ: on_region_read,
    Command.REGION_WRITE: on_region_write,
    Command.REGION_WRITE_MULTI: on_region_write_multi,
    Command.DEVICE_RESET: on_device_reset,
    Command.DEVICE_FEATURE: on_device_feature,
    Command.MIG_DATA_READ: on_mig_data,
    Command.MIG_DATA_WRITE: on_mig_data,
}

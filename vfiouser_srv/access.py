"""Region access: the one place REGION_READ and REGION_WRITE are checked, served and answered.

These two commands are nearly all of a running guest's traffic (every MMIO access of a vCPU
is one round trip), so they have a fast path: `serve` takes a frame's header fields and its
payload (a view of the receive buffer) and answers without building message objects. The
full path (the decoder's `RegionRead`/`RegionWrite` and `dispatch.on_region_*`) exists for
everything unusual; both use `Regions.check` for the region rules and `pack_read_reply` /
`pack_write_reply` for the reply bytes, so they cannot drift apart, and
tests/server/test_hot_path.py proves them byte-identical on a script of good and bad
accesses. The rules of the fast path (docs/architecture.md, "The region-access path"):

* it never produces an error of its own: anything it does not like (short payload, bad
  range, permissions) is handed to the full decoder, so the errno is the full path's;
* a failure raised by the model goes through `errors.fail`, the one error boundary;
* `payload` is a view of the stream's own receive buffer, valid until that stream's next
  read; a written payload is copied before the model sees it.
"""

from __future__ import annotations

import errno
import struct
from typing import ClassVar, Protocol

from devices.sdk.interface import NUM_PCI_REGIONS, DeviceError, DeviceModel, RegionSpec
from protocol import Command, HeaderFlags, RemoteProtocolError

from .errors import ReplyContext, fail

#: commands the serial loop answers itself, with `serve` (a test switches the fast path off
#: by emptying this and `FAST_COMMANDS`)
SERIAL_COMMANDS = frozenset({int(Command.REGION_READ), int(Command.REGION_WRITE)})
#: commands the read loop takes as plain frames from the receive buffer: region accesses
#: (`serve`) and DMA_MAP / DMA_UNMAP (`dispatch.serve_plain`, which may have to wait)
FAST_COMMANDS = SERIAL_COMMANDS | {int(Command.DMA_MAP), int(Command.DMA_UNMAP)}
_ACCESS = struct.Struct("<QII")
_REPLY_HEAD = struct.Struct("<HHIIIQII")  # 16-byte header + region access struct
_READ = int(Command.REGION_READ)
_WRITE = int(Command.REGION_WRITE)
_TYPE_REPLY = int(HeaderFlags.TYPE_REPLY)
_NO_REGION = (0, False, False)
#: The last `Regions.limits` built and the region specs they came from: a device's sessions
#: share its limits (a tuple: nothing can change them under a session), instead of
#: building them again at each VERSION (~3% of a connect's cost). One entry: another
#: device's VERSION builds its own, as before.
_last: tuple[dict[int, RegionSpec], tuple[tuple[int, bool, bool], ...]] | None = None


class Regions:
    """The regions of one attached device, as flat tuples: (size, readable, writable).

    Built at VERSION from the model's `RegionSpec`s and the negotiated transfer limit; the
    tuples make the fast path's check a few comparisons."""

    __slots__ = ("limits", "max_xfer", "rd", "wr")

    #: before VERSION: no region (shared; a session replaces it at attach, never writes it)
    NONE: ClassVar[Regions]

    def __init__(self, specs: dict[int, RegionSpec], max_xfer: int) -> None:
        global _last
        last = _last
        if last is not None and last[0] is specs:  # the same device again (see `_last`)
            self.limits = last[1]
        else:
            self.limits = tuple(
                (s.size, s.readable, s.writable) if (s := specs.get(i)) else _NO_REGION
                for i in range(NUM_PCI_REGIONS)
            )
            _last = (specs, self.limits)
        self.max_xfer = max_xfer
        #: reads and writes served, packed (messages << 48 | bytes: `stats`)
        self.rd = 0
        self.wr = 0

    def check(self, index: int, offset: int, count: int, write: bool) -> None:
        """Raise RemoteProtocolError (EINVAL) unless the access is allowed."""
        if not 0 <= index < NUM_PCI_REGIONS:
            raise RemoteProtocolError(f"region index {index} out of range")
        size, readable, writable = self.limits[index]
        if not size:
            raise RemoteProtocolError(f"region {index} does not exist")
        if not (writable if write else readable):
            raise RemoteProtocolError(f"region {index} is not {'writ' if write else 'read'}able")
        if offset + count > size:
            raise RemoteProtocolError(
                f"access {offset:#x}+{count:#x} past the end of region {index} ({size:#x})"
            )
        if count > self.max_xfer:
            raise RemoteProtocolError(f"count {count} above max_data_xfer_size")


Regions.NONE = Regions({}, 0)


def pack_read_reply(msg_id: int, offset: int, region: int, data: bytes) -> bytes:
    count = len(data)
    return _REPLY_HEAD.pack(msg_id, _READ, 32 + count, _TYPE_REPLY, 0, offset, region, count) + data


def pack_write_reply(msg_id: int, offset: int, region: int, count: int) -> bytes:
    return _REPLY_HEAD.pack(msg_id, _WRITE, 32, _TYPE_REPLY, 0, offset, region, count)


def read_model(model: DeviceModel, region: int, offset: int, count: int) -> bytes:
    """The model's answer, which must be exactly `count` bytes (a model bug otherwise)."""
    data = model.region_read(region, offset, count)
    if len(data) != count:
        raise DeviceError(errno.EIO, f"model returned {len(data)} bytes for {count}")
    return data


class AccessContext(ReplyContext, Protocol):
    """What `serve` needs of the connection (a `Session`)."""

    regions: Regions
    model: DeviceModel

    def full_path(
        self, msg_id: int, command: int, flags: int, payload: bytes | memoryview
    ) -> bytes | None:
        """Decode the frame into a message and run its handler (`dispatch.run_frame`)."""


def serve(
    ctx: AccessContext, msg_id: int, command: int, flags: int, payload: bytes | memoryview
) -> bytes | None:
    """Answer one plain REGION_READ / REGION_WRITE (a request with no flag but No_reply, no
    error field, no descriptors) from its header fields and payload."""
    if len(payload) < 16:
        return ctx.full_path(msg_id, command, flags, payload)
    offset, region, count = _ACCESS.unpack_from(payload)
    regions = ctx.regions
    limits = regions.limits
    if region >= len(limits) or count > regions.max_xfer:
        return ctx.full_path(msg_id, command, flags, payload)
    size, readable, writable = limits[region]
    if offset + count > size:
        return ctx.full_path(msg_id, command, flags, payload)
    no_reply = flags != 0
    # `read_model` and the `pack_*` helpers inlined: a Python call per message is ~4% of the
    # serial round trip (measured with callgrind); the rule and the struct are the same
    if command == _READ:
        if not readable or len(payload) != 16:
            return ctx.full_path(msg_id, command, flags, payload)
        try:
            data = ctx.model.region_read(region, offset, count)
            if len(data) != count:
                raise DeviceError(errno.EIO, f"model returned {len(data)} bytes for {count}")
        except Exception as exc:
            return fail(ctx, msg_id, _READ, no_reply, exc)
        regions.rd += count + (1 << 48)  # the one counter: `stats.ONE` (constant-folded)
        if no_reply:
            return None
        return (
            _REPLY_HEAD.pack(msg_id, _READ, 32 + count, _TYPE_REPLY, 0, offset, region, count)
            + data
        )
    if not writable or len(payload) - 16 != count:
        return ctx.full_path(msg_id, command, flags, payload)
    try:
        ctx.model.region_write(region, offset, bytes(payload[16:]))
    except Exception as exc:
        return fail(ctx, msg_id, _WRITE, no_reply, exc)
    regions.wr += count + (1 << 48)
    if no_reply:
        return None
    return _REPLY_HEAD.pack(msg_id, _WRITE, 32, _TYPE_REPLY, 0, offset, region, count)


__all__ = [
    "FAST_COMMANDS",
    "SERIAL_COMMANDS",
    "AccessContext",
    "Regions",
    "pack_read_reply",
    "pack_write_reply",
    "read_model",
    "serve",
]

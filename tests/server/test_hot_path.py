"""The REGION_READ / REGION_WRITE hot path answers exactly like the full decoder + handlers.

One script of well-formed, malformed and out-of-range region accesses (and model failures)
is sent over a raw socket to two servers: one as shipped, one with the hot path switched off
(`access.FAST_COMMANDS` empty, so every frame is decoded into a message and dispatched).
The replies must be byte-for-byte identical, No_reply variants must produce no reply on
either, and both connections must survive the whole script. The script runs once with one
frame per read (the single-frame shortcut) and once pipelined into a few big reads.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import os
import socket
import struct
from collections.abc import Callable
from typing import Any

import pytest
import trio

from devices.sdk.interface import RegionIndex
from protocol import HEADER, Capabilities, Command, HeaderFlags, Version, pack_header
from vfiouser_srv import access as region_access
from vfiouser_srv.client import make_eventfd

from . import models
from .conftest import MakeServer, count_fds, path_of, python_engine_only, settle
from .models import Scratch

pytestmark = [
    pytest.mark.usefixtures("no_fd_leak"),
    python_engine_only(
        "compares the Python engine's hot path with its own full decoder (libvfio-user has "
        "neither; split frames: BEHAVIOUR_DIFFERENCES 'split frames')"
    ),
]

BAR0 = int(RegionIndex.BAR0)
BAR1 = int(RegionIndex.BAR1)
BAR2 = int(RegionIndex.BAR2)
ROM = int(RegionIndex.ROM)
CONFIG = int(RegionIndex.CONFIG)
READ = int(Command.REGION_READ)
WRITE = int(Command.REGION_WRITE)
NO_REPLY = int(HeaderFlags.NO_REPLY)
ERROR_FLAG = int(HeaderFlags.ERROR)
MAX = 1 << 20
ACCESS = struct.Struct("<QII")
SYNC_ID = 0xFFFF


def access(offset: int, region: int, count: int, data: bytes = b"") -> bytes:
    return ACCESS.pack(offset, region, count) + data


def u32(value: int) -> bytes:
    return struct.pack("<I", value)


#: expected value for a case whose answer is only compared between the two paths
PARITY_ONLY = -1

# name -> (command, header flags, payload, header error field, expected errno or 0, or None
# for "no reply at all")
Case = tuple[int, int, bytes, int, int | None]
CASES: dict[str, Case] = {
    # reads
    "read_ok_config": (READ, 0, access(0, CONFIG, 4), 0, 0),
    "read_ok_bar0_reg": (READ, 0, access(models.ID, BAR0, 4), 0, 0),
    "read_ok_bar2_memory": (READ, 0, access(0x2000, BAR2, 16), 0, 0),
    "read_ok_msix_trap": (READ, 0, access(models.MSIX_TABLE, BAR2, 16), 0, 0),
    "read_ok_rom": (READ, 0, access(0, ROM, 12), 0, 0),
    "read_ok_count0": (READ, 0, access(0, CONFIG, 0), 0, 0),
    "read_ok_count0_at_end": (READ, 0, access(256, CONFIG, 0), 0, 0),
    "read_ok_last_bytes": (READ, 0, access(models.BAR2_SIZE - 4, BAR2, 4), 0, 0),
    "read_empty_payload": (READ, 0, b"", 0, errno.EINVAL),
    "read_short_payload": (READ, 0, access(0, CONFIG, 4)[:15], 0, errno.EINVAL),
    "read_trailing_byte": (READ, 0, access(0, CONFIG, 4) + b"\0", 0, errno.EINVAL),
    "read_with_data": (READ, 0, access(0, CONFIG, 4, b"\0" * 4), 0, errno.EINVAL),
    "read_region_9": (READ, 0, access(0, 9, 4), 0, errno.EINVAL),
    "read_region_max": (READ, 0, access(0, 0xFFFF_FFFF, 4), 0, errno.EINVAL),
    "read_region_absent": (READ, 0, access(0, BAR1, 4), 0, errno.EINVAL),
    "read_region_absent_count0": (READ, 0, access(0, BAR1, 0), 0, errno.EINVAL),
    "read_vga_absent": (READ, 0, access(0, 8, 1), 0, errno.EINVAL),
    "read_past_end": (READ, 0, access(models.BAR0_SIZE - 4, BAR0, 8), 0, errno.EINVAL),
    "read_at_end": (READ, 0, access(models.BAR0_SIZE, BAR0, 4), 0, errno.EINVAL),
    "read_wraps": (READ, 0, access((1 << 64) - 4, BAR0, 8), 0, errno.EINVAL),
    "read_offset_huge": (READ, 0, access(1 << 63, CONFIG, 1), 0, errno.EINVAL),
    "read_above_max_xfer": (READ, 0, access(0, BAR2, MAX + 1), 0, errno.EINVAL),
    "read_count_huge": (READ, 0, access(0, BAR2, 0xFFFF_FFFF), 0, errno.EINVAL),
    "read_model_errno": (READ, 0, access(models.READ_ERRNO, BAR0, 4), 0, errno.EBADMSG),
    "read_model_bug": (READ, 0, access(models.READ_BUG, BAR0, 4), 0, errno.EIO),
    "read_model_bug_wide": (READ, 0, access(models.READ_BUG, BAR0, 12), 0, errno.EIO),
    # writes
    "write_ok_reg": (WRITE, 0, access(models.SCRATCH, BAR0, 4, u32(0x1234)), 0, 0),
    "write_ok_bar2": (WRITE, 0, access(0x3000, BAR2, 8, b"hotpath!"), 0, 0),
    "write_ok_config": (WRITE, 0, access(0x3C, CONFIG, 1, b"\x0b"), 0, 0),
    "write_ok_count0": (WRITE, 0, access(0x10, BAR0, 0), 0, 0),
    "write_short_payload": (WRITE, 0, access(0, BAR0, 4)[:12], 0, errno.EINVAL),
    "write_data_short": (WRITE, 0, access(models.SCRATCH, BAR0, 4, b"\1\2\3"), 0, errno.EINVAL),
    "write_data_long": (WRITE, 0, access(models.SCRATCH, BAR0, 4, b"\1" * 5), 0, errno.EINVAL),
    "write_no_data": (WRITE, 0, access(models.SCRATCH, BAR0, 4), 0, errno.EINVAL),
    "write_region_9": (WRITE, 0, access(0, 9, 4, u32(1)), 0, errno.EINVAL),
    "write_region_absent": (WRITE, 0, access(0, BAR1, 4, u32(1)), 0, errno.EINVAL),
    "write_region_absent_count0": (WRITE, 0, access(0, BAR1, 0), 0, errno.EINVAL),
    "write_rom_read_only": (WRITE, 0, access(0, ROM, 4, u32(1)), 0, errno.EINVAL),
    "write_past_end": (WRITE, 0, access(255, CONFIG, 2, b"\1\1"), 0, errno.EINVAL),
    "write_wraps": (WRITE, 0, access((1 << 64) - 2, BAR0, 4, u32(1)), 0, errno.EINVAL),
    "write_above_max_xfer": (
        WRITE,
        0,
        access(0, BAR2, MAX + 1, b"\x77" * (MAX + 1)),
        0,
        errno.EINVAL,
    ),
    "write_model_errno": (WRITE, 0, access(models.FAIL_ERRNO, BAR0, 4, u32(28)), 0, errno.ENOSPC),
    "write_model_oserror": (WRITE, 0, access(models.FAIL_OSERR, BAR0, 4, u32(30)), 0, errno.EROFS),
    "write_model_bug": (WRITE, 0, access(models.FAIL_BUG, BAR0, 4, u32(1)), 0, errno.EIO),
    # header variants: never hot, same answer
    "read_unknown_flag": (READ, 0x40, access(0, CONFIG, 4), 0, errno.EINVAL),
    "write_unknown_flag": (WRITE, 0x80, access(models.SCRATCH, BAR0, 4, u32(9)), 0, errno.EINVAL),
    "read_error_field": (READ, 0, access(0, CONFIG, 4), 5, errno.EINVAL),
    # the Error flag on a command (error value 0): the codec does not reject it today;
    # only parity is checked (PARITY_ONLY)
    "write_error_flag": (
        WRITE,
        ERROR_FLAG,
        access(models.SCRATCH, BAR0, 4, u32(9)),
        0,
        PARITY_ONLY,
    ),
    "read_type_2": (READ, 2, access(0, CONFIG, 4), 0, errno.EINVAL),
}

#: a reply-typed frame from the client answers nothing: no reply in either path
SILENT: dict[str, Case] = {
    "read_as_reply": (READ, int(HeaderFlags.TYPE_REPLY), access(0, CONFIG, 4, b"\0" * 4), 0, None),
}


class RawConn:
    """A bare vfio-user connection: frames in, frames out, nothing interpreted."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.buf = bytearray()

    @classmethod
    async def connect(cls, path: str) -> RawConn:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.connect(path)
        conn = cls(sock)
        payload = Version(0, 0, Capabilities(max_msg_fds=16)).encode()
        await conn.send(frame(1, Command.VERSION, 0, payload))
        head = HEADER.unpack_from(await conn.recv_message())
        assert head[3] == HeaderFlags.TYPE_REPLY, head
        return conn

    async def send(self, data: bytes, fds: list[int] | None = None) -> None:
        view = memoryview(data)
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
            sent = await self.sock.sendmsg([view], anc)
            view = view[sent:]
        while view:
            sent = await self.sock.send(view)
            view = view[sent:]

    async def recv_message(self) -> bytes:
        with trio.fail_after(10):
            while True:
                if len(self.buf) >= 16:
                    size = HEADER.unpack_from(self.buf)[2]
                    if len(self.buf) >= size:
                        msg = bytes(self.buf[:size])
                        del self.buf[:size]
                        return msg
                chunk = await self.sock.recv(1 << 20)
                assert chunk, "server closed the connection"
                self.buf += chunk

    def close(self) -> None:
        self.sock.close()


def frame(msg_id: int, command: int, flags: int, payload: bytes, error: int = 0) -> bytes:
    return pack_header(msg_id, command, 16 + len(payload), flags, error) + payload


SYNC = frame(SYNC_ID, READ, 0, access(models.ID, BAR0, 4))


def script(cases: dict[str, Case]) -> list[tuple[str, bytes, bool]]:
    """(name, frame, expects a reply) for every case, plus its No_reply twin."""
    out: list[tuple[str, bytes, bool]] = []
    msg_id = 100
    for name, (command, flags, payload, error, expected) in cases.items():
        out.append((name, frame(msg_id, command, flags, payload, error), expected is not None))
        msg_id += 1
        out.append(
            (name + "+no_reply", frame(msg_id, command, flags | NO_REPLY, payload, error), False)
        )
        msg_id += 1
    return out


async def run_one_by_one(conn: RawConn, steps: list[tuple[str, bytes, bool]]) -> list[bytes]:
    """Each frame in a read of its own; after a frame that expects no reply, a sync read
    proves none came (the sync reply is the very next message)."""
    replies: list[bytes] = []
    for name, data, expects_reply in steps:
        await conn.send(data)
        if expects_reply:
            replies.append(await conn.recv_message())
        else:
            await conn.send(SYNC)
            msg = await conn.recv_message()
            assert HEADER.unpack_from(msg)[0] == SYNC_ID, f"{name}: got an unexpected reply"
            replies.append(b"(none)")
    await conn.send(SYNC)
    assert HEADER.unpack_from(await conn.recv_message())[0] == SYNC_ID
    return replies


async def run_pipelined(conn: RawConn, steps: list[tuple[str, bytes, bool]]) -> list[bytes]:
    """All frames back to back (a few big reads), then every reply in order."""
    blob = b"".join(data for _, data, _ in steps) + SYNC
    expected = sum(1 for _, _, r in steps if r)

    async def sender() -> None:
        await conn.send(blob)

    replies: list[bytes] = []
    async with trio.open_nursery() as n:
        n.start_soon(sender)
        for _ in range(expected + 1):
            replies.append(await conn.recv_message())
    assert HEADER.unpack_from(replies.pop())[0] == SYNC_ID
    return replies


Runner = Callable[[RawConn, list[tuple[str, bytes, bool]]], Any]


async def run_both(
    make_server: MakeServer,
    monkeypatch: pytest.MonkeyPatch,
    runner: Runner,
    steps: list[tuple[str, bytes, bool]],
) -> tuple[list[bytes], list[bytes], int]:
    """(replies with the hot path, replies without it, frames the hot path handled)."""
    hot_calls = 0
    real_run_hot = region_access.serve

    def counting_run_hot(session: Any, *args: Any) -> bytes | None:
        nonlocal hot_calls
        hot_calls += 1
        return real_run_hot(session, *args)

    srv = await make_server({"hot": Scratch(), "full": Scratch()})
    monkeypatch.setattr(region_access, "serve", counting_run_hot)
    hot = await RawConn.connect(path_of(srv, "hot"))
    try:
        with_hot = await runner(hot, steps)
    finally:
        hot.close()
    handled = hot_calls

    monkeypatch.setattr(region_access, "FAST_COMMANDS", frozenset())
    monkeypatch.setattr(region_access, "SERIAL_COMMANDS", frozenset())
    full = await RawConn.connect(path_of(srv, "full"))
    try:
        without = await runner(full, steps)
    finally:
        full.close()
    assert hot_calls == handled, "the hot path ran while switched off"
    return with_hot, without, handled


def check_expectations(steps: list[tuple[str, bytes, bool]], replies: list[bytes]) -> None:
    """Absolute expectations, so that both paths being equally wrong still fails."""
    expectations = {**CASES, **SILENT}
    for (name, data, expects_reply), reply in zip(steps, replies, strict=True):
        if not expects_reply:
            continue
        command, _flags, payload, _error, err = expectations[name]
        if err == PARITY_ONLY:
            continue
        msg_id, r_command, size, r_flags, r_error = HEADER.unpack_from(reply)
        assert msg_id == HEADER.unpack_from(data)[0], name
        assert r_command == command, name
        if err:
            assert r_flags == HeaderFlags.TYPE_REPLY | HeaderFlags.ERROR, name
            assert (r_error, size) == (err, 16), (name, r_error)
        else:
            assert (r_flags, r_error) == (HeaderFlags.TYPE_REPLY, 0), (name, r_error)
            offset, region, count = ACCESS.unpack_from(payload)
            assert ACCESS.unpack_from(reply, 16) == (offset, region, count), name
            assert size == 32 + (count if command == READ else 0), name


@pytest.mark.parametrize("mode", ["one_by_one", "pipelined"])
async def test_hot_path_replies_like_the_full_path(
    make_server: MakeServer, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    steps = script({**CASES, **SILENT})
    runner: Runner = run_one_by_one if mode == "one_by_one" else run_pipelined
    with_hot, without, handled = await run_both(make_server, monkeypatch, runner, steps)
    assert handled >= len(CASES)  # the hot path really served this script
    replies_of = [name for name, _, r in steps if r or mode == "one_by_one"]
    assert len(with_hot) == len(without) == len(replies_of)
    for name, a, b in zip(replies_of, with_hot, without, strict=True):
        assert a == b, f"{name}: hot path {a[:48]!r} != full path {b[:48]!r}"
    if mode == "one_by_one":
        check_expectations(steps, with_hot)
        for (name, _, expects_reply), reply in zip(steps, with_hot, strict=True):
            assert (reply == b"(none)") == (not expects_reply), name
    else:
        answered = [s for s in steps if s[2]]
        check_expectations(answered, with_hot)


DMA_MAP = int(Command.DMA_MAP)
DMA_UNMAP = int(Command.DMA_UNMAP)
MAP = struct.Struct("<IIQQQ")  # argsz, flags, offset, address, size
UNMAP = struct.Struct("<IIQQ")  # argsz, flags, address, size
RW = 3
WIN = 0x10000

#: DMA_MAP (no descriptor) and DMA_UNMAP as plain frames (`dispatch.serve_plain`), in an
#: order whose state the expectations follow: name -> (command, flags, payload, errno)
DMA_CASES: dict[str, tuple[int, int, bytes, int]] = {
    "map_ok": (DMA_MAP, 0, MAP.pack(32, RW, 0, WIN, 0x1000), 0),
    "map_overlap": (DMA_MAP, 0, MAP.pack(32, RW, 0, WIN - 0x1000, 0x2000), errno.EEXIST),
    "map_unaligned": (DMA_MAP, 0, MAP.pack(32, RW, 0, 0x20001, 0x1000), errno.EINVAL),
    "map_no_access": (DMA_MAP, 0, MAP.pack(32, 0, 0, 0x30000, 0x1000), errno.EINVAL),
    "map_unknown_flag": (DMA_MAP, 0, MAP.pack(32, 0x103, 0, 0x30000, 0x1000), errno.EINVAL),
    "map_size_0": (DMA_MAP, 0, MAP.pack(32, RW, 0, 0x30000, 0), errno.EINVAL),
    "map_wraps": (DMA_MAP, 0, MAP.pack(32, RW, 0, (1 << 64) - 0x1000, 0x2000), errno.EINVAL),
    "map_short": (DMA_MAP, 0, MAP.pack(32, RW, 0, 0x30000, 0x1000)[:31], errno.EINVAL),
    "map_argsz_small": (DMA_MAP, 0, MAP.pack(16, RW, 0, 0x30000, 0x1000), errno.EINVAL),
    "map_argsz_big": (DMA_MAP, 0, MAP.pack(40, RW, 0, 0x40000, 0x1000) + b"\0" * 8, 0),
    "map_flags_read": (DMA_MAP, 0, MAP.pack(32, 1, 0, 0x50000, 0x2000), 0),
    "map_unknown_header_flag": (DMA_MAP, 0x40, MAP.pack(32, RW, 0, 0x60000, 0x1000), errno.EINVAL),
    "unmap_ok": (DMA_UNMAP, 0, UNMAP.pack(24, 0, WIN, 0x1000), 0),
    "unmap_missing": (DMA_UNMAP, 0, UNMAP.pack(24, 0, WIN, 0x1000), errno.ENOENT),
    "unmap_wrong_size": (DMA_UNMAP, 0, UNMAP.pack(24, 0, 0x50000, 0x1000), errno.ENOENT),
    "unmap_unknown_flag": (DMA_UNMAP, 0, UNMAP.pack(24, 4, 0x50000, 0x2000), errno.EINVAL),
    "unmap_all_with_range": (DMA_UNMAP, 0, UNMAP.pack(24, 2, 0x50000, 0x2000), errno.EINVAL),
    "unmap_short": (DMA_UNMAP, 0, UNMAP.pack(24, 0, 0x50000, 0x2000)[:20], errno.EINVAL),
    "unmap_argsz_small": (DMA_UNMAP, 0, UNMAP.pack(8, 0, 0x50000, 0x2000), errno.EINVAL),
    "unmap_read_window": (DMA_UNMAP, 0, UNMAP.pack(24, 0, 0x50000, 0x2000), 0),
    "unmap_all": (DMA_UNMAP, 0, UNMAP.pack(24, 2, 0, 0), 0),
    "unmap_after_all": (DMA_UNMAP, 0, UNMAP.pack(24, 0, 0x40000, 0x1000), errno.ENOENT),
}


@pytest.mark.parametrize("mode", ["one_by_one", "pipelined"])
async def test_plain_dma_replies_like_the_full_path(
    make_server: MakeServer, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """DMA_MAP without a descriptor and DMA_UNMAP taken as plain frames answer exactly as
    decoded messages do: same replies byte for byte, same errnos, same window state."""
    from vfiouser_srv import dispatch

    plain_calls = 0
    real = dispatch.serve_plain

    def counting(*args: Any) -> Any:
        nonlocal plain_calls
        plain_calls += 1
        return real(*args)

    monkeypatch.setattr(dispatch, "serve_plain", counting)
    steps = [
        (name, frame(100 + i, command, flags, payload), True)
        for i, (name, (command, flags, payload, _err)) in enumerate(DMA_CASES.items())
    ]
    runner: Runner = run_one_by_one if mode == "one_by_one" else run_pipelined
    with_hot, without, _ = await run_both(make_server, monkeypatch, runner, steps)
    assert plain_calls >= len(DMA_CASES) - 1  # all but the unknown header flag went plain
    assert len(with_hot) == len(without) == len(steps)
    for (name, data, _), a, b in zip(steps, with_hot, without, strict=True):
        assert a == b, f"{name}: plain path {a!r} != full path {b!r}"
        command, _flags, payload, err = DMA_CASES[name]
        msg_id, r_command, size, r_flags, r_error = HEADER.unpack_from(a)
        assert (msg_id, r_command) == (HEADER.unpack_from(data)[0], command), name
        if err:
            assert (r_flags, r_error, size) == (0x21, err, 16), name
        elif command == DMA_MAP:
            assert (r_flags, r_error, size) == (HeaderFlags.TYPE_REPLY, 0, 16), name
        else:  # the reply echoes the entry
            assert (r_flags, size) == (HeaderFlags.TYPE_REPLY, 40), name
            assert a[16:] == payload, name


async def test_hot_reads_see_the_state_the_script_left(
    make_server: MakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writes applied on one path are visible identically on the other (posted included)."""
    steps = [
        ("w", frame(1, WRITE, NO_REPLY, access(models.SCRATCH, BAR0, 4, u32(0xCAFE))), False),
        ("r", frame(2, READ, 0, access(models.SCRATCH, BAR0, 4)), True),
        ("w2", frame(3, WRITE, NO_REPLY, access(0x5000, BAR2, 4, b"abcd")), False),
        ("r2", frame(4, READ, 0, access(0x5000, BAR2, 4)), True),
    ]
    with_hot, without, handled = await run_both(make_server, monkeypatch, run_pipelined, steps)
    assert with_hot == without
    assert handled == 5  # the four and the closing sync read
    assert with_hot[0][32:] == u32(0xCAFE)
    assert with_hot[1][32:] == b"abcd"


async def test_region_access_with_an_fd_takes_the_full_path_and_closes_it(
    make_server: MakeServer,
) -> None:
    srv = await make_server({"s": Scratch()})
    conn = await RawConn.connect(path_of(srv, "s"))
    try:
        with make_eventfd() as fd:
            before = count_fds()
            await conn.send(frame(7, READ, 0, access(0, CONFIG, 4)), [fd.fileno()])
            reply = await conn.recv_message()
            assert HEADER.unpack_from(reply) == (7, READ, 16, 0x21, errno.EINVAL)
            await conn.send(
                frame(8, WRITE, NO_REPLY, access(4, CONFIG, 2, b"\x02\x00")), [fd.fileno()]
            )
            await conn.send(SYNC)
            assert HEADER.unpack_from(await conn.recv_message())[0] == SYNC_ID
            assert count_fds() == before
            # the refused posted write was not applied
            await conn.send(frame(9, READ, 0, access(4, CONFIG, 2)))
            assert (await conn.recv_message())[32:] == b"\0\0"
    finally:
        conn.close()


async def test_frames_split_across_reads_are_reassembled(make_server: MakeServer) -> None:
    """Short reads: a frame arriving in pieces is one message, even when its last piece
    looks exactly like a complete hot frame of its own."""
    srv = await make_server({"s": Scratch()})
    conn = await RawConn.connect(path_of(srv, "s"))
    try:
        decoy = frame(0x0D, READ, 0, access(models.ID, BAR0, 4))  # 32 bytes, a valid read
        data = b"\x11" * 64 + decoy
        outer = frame(0x0A, WRITE, 0, access(0x4000, BAR2, len(data), data))
        await conn.send(outer[: len(outer) - len(decoy)])
        await settle()  # the server has read (and buffered) everything but the decoy
        await conn.send(decoy)
        reply = await conn.recv_message()
        assert HEADER.unpack_from(reply) == (0x0A, WRITE, 32, HeaderFlags.TYPE_REPLY, 0)
        # byte by byte, each byte in a read of its own
        read = frame(0x0B, READ, 0, access(0x4000, BAR2, len(data)))
        for i in range(len(read)):
            await conn.send(read[i : i + 1])
            await settle()
        reply = await conn.recv_message()
        assert HEADER.unpack_from(reply)[:2] == (0x0B, READ)
        assert reply[32:] == data  # the decoy went to BAR2 as data, and got no reply
        await conn.send(SYNC)
        assert HEADER.unpack_from(await conn.recv_message())[0] == SYNC_ID
    finally:
        conn.close()


async def test_plain_unmap_of_a_pinned_window_waits_and_keeps_order(
    make_server: MakeServer,
) -> None:
    """A DMA_UNMAP the serial loop takes (right behind a read it served) while the device
    holds a pin on the window is not answered until the pin is let go (the spec), and the
    read sent right after it is answered after it, not before."""
    model = Scratch()
    srv = await make_server({"s": model})
    conn = await RawConn.connect(path_of(srv, "s"))
    fd = os.memfd_create("hot-path-pin", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, 0x1000)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        await conn.send(frame(1, DMA_MAP, 0, MAP.pack(32, RW, 0, WIN, 0x1000)), [fd])
        assert HEADER.unpack_from(await conn.recv_message()) == (1, DMA_MAP, 16, 1, 0)
        writes = [
            (models.DMA_ADDR, struct.pack("<Q", WIN)),
            (models.DMA_LEN, u32(16)),
            (models.DMA_CTRL, u32(models.GO | models.PIN)),
        ]
        for msg_id, (reg, value) in enumerate(writes, start=2):
            await conn.send(frame(msg_id, WRITE, 0, access(reg, BAR0, len(value), value)))
            await conn.recv_message()
        with trio.fail_after(5):
            await model.pinned.wait()

        # A blocking client in a thread, so that trio is idle and the server's serial loop
        # is waiting in its read when the unmap arrives right behind the read it answered.
        sync = socket.socket(fileno=os.dup(conn.sock.fileno()))
        sync.setblocking(True)
        sync.settimeout(5)

        def unmap_behind_a_read() -> list[bytes]:
            got: list[bytes] = []
            sync.sendall(SYNC)
            got.append(sync.recv(64))
            sync.sendall(frame(10, DMA_UNMAP, 0, UNMAP.pack(24, 0, WIN, 0x1000)))
            sync.settimeout(0.2)
            with contextlib.suppress(TimeoutError):  # nothing while the window is pinned
                got.append(sync.recv(64))
            sync.sendall(SYNC)
            with contextlib.suppress(TimeoutError):  # nor ahead of the unmap's reply
                got.append(sync.recv(64))
            return got

        try:
            got = await trio.to_thread.run_sync(unmap_behind_a_read)
            assert len(got) == 1, f"answered while DMA was pinned: {got!r}"
            assert HEADER.unpack_from(got[0])[0] == SYNC_ID
            model.unpin.set()
            reply = await conn.recv_message()
            assert HEADER.unpack_from(reply) == (10, DMA_UNMAP, 40, 1, 0)
            assert HEADER.unpack_from(await conn.recv_message())[0] == SYNC_ID
        finally:
            sync.close()
    finally:
        os.close(fd)
        conn.close()


def _memfd(size: int, sealed: bool = True) -> int:
    fd = os.memfd_create("hot-path-map", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if sealed:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    return fd


#: DMA_MAP with a descriptor, each frame alone in its read right behind a served read (so
#: the serial loop takes it): name -> (payload, how to make the fd, errno)
FD_MAP_CASES: dict[str, tuple[bytes, Callable[[], int], int]] = {
    "sealed": (MAP.pack(32, RW, 0, WIN, 0x1000), lambda: _memfd(0x1000), 0),
    "overlap": (MAP.pack(32, RW, 0, WIN, 0x1000), lambda: _memfd(0x1000), errno.EEXIST),
    "unsealed": (MAP.pack(32, RW, 0, 0x20000, 0x1000), lambda: _memfd(0x1000, False), 0),
    "file_too_small": (MAP.pack(32, RW, 0, 0x30000, 0x2000), lambda: _memfd(0x1000), 22),
    "not_a_file": (MAP.pack(32, RW, 0, 0x30000, 0x1000), lambda: make_eventfd().detach(), 22),
    "short": (MAP.pack(32, RW, 0, 0x30000, 0x1000)[:24], lambda: _memfd(0x1000), 22),
    "read_only": (MAP.pack(32, 1, 0x1000, 0x40000, 0x1000), lambda: _memfd(0x2000), 0),
}


async def run_fd_maps(conn: RawConn, steps: list[tuple[str, bytes, bool]]) -> list[bytes]:
    """Each DMA_MAP with its fd sent by a blocking client thread right after a read was
    answered, so that the server's serial loop (trio idle) is the one that reads it."""
    sock = socket.socket(fileno=os.dup(conn.sock.fileno()))
    sock.setblocking(True)
    sock.settimeout(5)

    def recv_message() -> bytes:
        data = b""
        while len(data) < 16 or len(data) < HEADER.unpack_from(data)[2]:
            chunk = sock.recv(4096)
            assert chunk, "server closed the connection"
            data += chunk
        return data

    def run() -> list[bytes]:
        replies = []
        for name, data, _ in steps:
            sock.sendall(SYNC)
            assert HEADER.unpack_from(recv_message())[0] == SYNC_ID
            fd = FD_MAP_CASES[name][1]()
            try:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]
                sock.sendmsg([data], anc)
            finally:
                os.close(fd)
            replies.append(recv_message())
        return replies

    try:
        return await trio.to_thread.run_sync(run)
    finally:
        sock.close()


async def test_dma_map_with_an_fd_in_the_serial_loop_replies_like_the_full_path(
    make_server: MakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A DMA_MAP with its descriptor alone in a read is served by the serial loop: the same
    replies as the full path, every refused descriptor closed (`no_fd_leak`)."""
    from vfiouser_srv import dispatch

    with_fd = 0
    real = dispatch.serve_plain

    def counting(*args: Any) -> Any:
        nonlocal with_fd
        with_fd += len(args) > 5
        return real(*args)

    monkeypatch.setattr(dispatch, "serve_plain", counting)
    steps = [
        (name, frame(200 + i, DMA_MAP, 0, payload), True)
        for i, (name, (payload, _, _)) in enumerate(FD_MAP_CASES.items())
    ]
    with_hot, without, _ = await run_both(make_server, monkeypatch, run_fd_maps, steps)
    assert with_fd >= len(steps) - 1, "the serial loop did not take the maps"
    for (name, data, _), a, b in zip(steps, with_hot, without, strict=True):
        assert a == b, f"{name}: serial loop {a!r} != full path {b!r}"
        err = FD_MAP_CASES[name][2]
        flags = 0x21 if err else 1
        assert HEADER.unpack_from(a) == (HEADER.unpack_from(data)[0], DMA_MAP, 16, flags, err)

"""Every errno row of docs/architecture.md ("Errors"), through the real client over a real socket.

Malformed input goes out with `request_raw` / `send_bytes`; every test also checks that
the connection is still usable afterwards (or, for a broken stream or EBUSY, that exactly
that connection was closed and nothing else was affected).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest
import trio

from devices.edu import BAR_SIZE, Edu, Reg
from devices.sdk.interface import RegionIndex
from protocol import (
    HEADER_SIZE,
    Command,
    DeviceFlags,
    DmaBitmap,
    DmaMapFlags,
    DmaUnmap,
    DmaUnmapFlags,
    DmaUnmapReply,
    ErrorReply,
    HeaderFlags,
    IrqSetFlags,
    Reply,
    Version,
    pack_header,
)
from vfiouser_srv.client import Client, VfioUserError, make_eventfd, wait_eventfd
from vfiouser_srv.fds import OwnedFd, open_fd_count
from vfiouser_srv.objects import OwnerPolicy
from vfiouser_srv.server import Server

from ..engines.params import ENGINE_PARAMS
from . import models
from .conftest import (
    MakeServer,
    container_of,
    count_fds,
    irq_table_of,
    open_client,
    python_engine_only,
    session_of,
    settle,
    small_caps,
)
from .models import NoResetScratch, Scratch

# Parametrized over engines (tests/engines/params.py). libvfio-user decodes and validates
# the protocol itself, so most of these checks of the Python engine's dispatch are
# python_engine_only, each with its reason; the ones that hold on both run on both.
pytestmark = [
    pytest.mark.usefixtures("no_fd_leak"),
    pytest.mark.parametrize("engine", ENGINE_PARAMS),
]
VALIDATION = (
    "checks the Python engine's own protocol validation; libvfio-user validates (or not) "
    "differently (BEHAVIOUR_DIFFERENCES 'protocol validation')"
)

BAR0 = int(RegionIndex.BAR0)
BAR2 = int(RegionIndex.BAR2)
ROM = int(RegionIndex.ROM)
CONFIG = int(RegionIndex.CONFIG)
PAGE = 4096
RW = DmaMapFlags.READ | DmaMapFlags.WRITE

INFO4 = struct.Struct("<IIII")
ACCESS = struct.Struct("<QII")
DMA_MAP = struct.Struct("<IIQQQ")
DMA_UNMAP = struct.Struct("<IIQQ")
SET_IRQS = struct.Struct("<IIIII")
REGION_INFO = struct.Struct("<IIIIQQ")


def error_of(reply: Reply | ErrorReply) -> int:
    assert isinstance(reply, ErrorReply), f"expected an error reply, got {reply!r}"
    return reply.errno


async def assert_alive(c: Client) -> None:
    """The connection still answers, in order, and nothing unexpected came back."""
    info = await c.device_get_info()
    assert info.flags & DeviceFlags.PCI
    assert c.unexpected == []


def u32(value: int) -> bytes:
    return struct.pack("<I", value)


async def expect_errno(err: int, call: Awaitable[object]) -> None:
    with pytest.raises(VfioUserError) as info:
        await call
    assert info.value.errno == err, os.strerror(info.value.errno or 0)


def memfd(size: int = 4 * PAGE) -> OwnedFd:
    fd = OwnedFd(os.memfd_create("errno-test", os.MFD_CLOEXEC))
    os.ftruncate(fd.fileno(), size)
    return fd


# ------------------------------------------------------------------ VERSION first, once


@python_engine_only(VALIDATION)
async def test_commands_before_version_are_einval(server: Server) -> None:
    async with open_client(server, version=False) as c:
        for command, payload in [
            (Command.DEVICE_GET_INFO, INFO4.pack(16, 0, 0, 0)),
            (Command.REGION_READ, ACCESS.pack(0, CONFIG, 4)),  # a hot command, too
            (Command.REGION_WRITE, ACCESS.pack(4, CONFIG, 2) + b"\x07\x00"),
            (Command.DMA_MAP, DMA_MAP.pack(32, RW, 0, 0x10000, PAGE)),
            (Command.DEVICE_RESET, b""),
        ]:
            assert error_of(await c.request_raw(command, payload)) == errno.EINVAL, command
        assert server.devices["edu"].session is None
        await c.version()
        assert session_of(server).attached
        # the REGION_WRITE before VERSION was not applied
        assert await c.region_read(CONFIG, 4, 2) == b"\x00\x00"
        await assert_alive(c)


@python_engine_only(VALIDATION)
async def test_refused_version_can_be_retried(server: Server) -> None:
    async with open_client(server, version=False) as c:
        bad_major = struct.pack("<HH", 1, 0) + b'{"capabilities":{}}\0'
        assert error_of(await c.request_raw(Command.VERSION, bad_major)) == errno.EINVAL
        bad_json = struct.pack("<HH", 0, 0) + b'{"capabilities":\0'
        assert error_of(await c.request_raw(Command.VERSION, bad_json)) == errno.EINVAL
        no_nul = struct.pack("<HH", 0, 0) + b"{}"
        assert error_of(await c.request_raw(Command.VERSION, no_nul)) == errno.EINVAL
        short = b"\x00"
        assert error_of(await c.request_raw(Command.VERSION, short)) == errno.EINVAL
        reply = await c.version()
        assert (reply.major, reply.minor) == (0, 0)
        await assert_alive(c)


async def test_second_version_is_einval_and_connection_kept(server: Server) -> None:
    async with open_client(server) as c:
        caps = c.server_caps
        again = Version(0, 0, c.caps).encode()
        assert error_of(await c.request_raw(Command.VERSION, again)) == errno.EINVAL
        assert c.server_caps == caps
        await assert_alive(c)


# ------------------------------------------------------------------ malformed requests


#: malformed payloads libvfio-user answers instead of refusing
LIBVFIO_USER_ACCEPTS = {"region_read_trailing"}

MALFORMED = {
    "dma_map_short": (Command.DMA_MAP, DMA_MAP.pack(32, RW, 0, 0x10000, PAGE)[:24]),
    "dma_unmap_short": (Command.DMA_UNMAP, b"\x18\x00\x00\x00"),
    "get_info_empty": (Command.DEVICE_GET_INFO, b""),
    "region_info_short": (Command.DEVICE_GET_REGION_INFO, REGION_INFO.pack(32, 0, 0, 0, 0, 0)[:16]),
    "irq_info_short": (Command.DEVICE_GET_IRQ_INFO, b"\x10\x00\x00\x00"),
    "set_irqs_short": (Command.DEVICE_SET_IRQS, SET_IRQS.pack(20, 0x21, 0, 0, 0)[:12]),
    "set_irqs_argsz_past_payload": (Command.DEVICE_SET_IRQS, SET_IRQS.pack(24, 0x22, 0, 0, 1)),
    "region_read_short": (Command.REGION_READ, ACCESS.pack(0, CONFIG, 4)[:15]),
    "region_read_trailing": (Command.REGION_READ, ACCESS.pack(0, CONFIG, 4) + b"\x00"),
    "region_write_short_data": (Command.REGION_WRITE, ACCESS.pack(4, CONFIG, 2) + b"\x01"),
    "region_write_long_data": (Command.REGION_WRITE, ACCESS.pack(4, CONFIG, 2) + b"\x01" * 3),
    "write_multi_count_mismatch": (
        Command.REGION_WRITE_MULTI,
        struct.pack("<Q", 2) + struct.pack("<QII8s", 4, CONFIG, 2, b"\x06"),
    ),
    "write_multi_zero": (Command.REGION_WRITE_MULTI, struct.pack("<Q", 0)),
    "feature_short": (Command.DEVICE_FEATURE, b"\x08\x00\x00\x00"),
    "mig_read_short": (Command.MIG_DATA_READ, b"\x08"),
    "io_fds_flags": (Command.DEVICE_GET_REGION_IO_FDS, INFO4.pack(16, 1, 0, 0)),
}


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, marks=python_engine_only(VALIDATION)) if c in LIBVFIO_USER_ACCEPTS else c
        for c in sorted(MALFORMED)
    ],
)
async def test_malformed_payload_is_einval(server: Server, case: str) -> None:
    command, payload = MALFORMED[case]
    async with open_client(server) as c:
        assert error_of(await c.request_raw(command, payload)) == errno.EINVAL
        await assert_alive(c)
        # nothing was half-applied (the config Command register is still 0)
        assert await c.region_read(CONFIG, 4, 2) == b"\x00\x00"


ARGSZ_TOO_SMALL = {
    "get_info": (Command.DEVICE_GET_INFO, INFO4.pack(15, 0, 0, 0)),
    "region_info": (Command.DEVICE_GET_REGION_INFO, REGION_INFO.pack(31, 0, 0, 0, 0, 0)),
    "irq_info": (Command.DEVICE_GET_IRQ_INFO, INFO4.pack(8, 0, 0, 0)),
    "io_fds": (Command.DEVICE_GET_REGION_IO_FDS, INFO4.pack(0, 0, 0, 0)),
    "dma_map": (Command.DMA_MAP, DMA_MAP.pack(31, RW, 0, 0x10000, PAGE)),
    "dma_unmap": (Command.DMA_UNMAP, DMA_UNMAP.pack(23, 0, 0x10000, PAGE)),
    "set_irqs": (Command.DEVICE_SET_IRQS, SET_IRQS.pack(19, 0x21, 0, 0, 0)),
    "feature": (Command.DEVICE_FEATURE, struct.pack("<II", 7, 1 | 1 << 18)),
    "mig_data_read": (Command.MIG_DATA_READ, struct.pack("<II", 4, 16)),
}


@python_engine_only(VALIDATION)
@pytest.mark.parametrize("case", sorted(ARGSZ_TOO_SMALL))
async def test_argsz_below_minimum_is_einval(server: Server, case: str) -> None:
    command, payload = ARGSZ_TOO_SMALL[case]
    async with open_client(server) as c:
        assert error_of(await c.request_raw(command, payload)) == errno.EINVAL
        await assert_alive(c)
        # a DMA_MAP refused for its argsz must not have mapped anything
        assert len(container_of(server)) == 0


@python_engine_only(VALIDATION)
async def test_unknown_flag_bits_are_einval(server: Server) -> None:
    async with open_client(server) as c:
        info4 = INFO4.pack(16, 0, 0, 0)
        for hdr_flags in (0x40, 0x80, 0x100, 1 << 31, 0x2, 0xF):
            reply = await c.request_raw(Command.DEVICE_GET_INFO, info4, flags=hdr_flags)
            assert error_of(reply) == errno.EINVAL, hex(hdr_flags)
        for cmd, payload in [
            (Command.DMA_MAP, DMA_MAP.pack(32, RW | 4, 0, 0x10000, PAGE)),
            (Command.DMA_MAP, DMA_MAP.pack(32, 1 << 31 | DmaMapFlags.READ, 0, 0x10000, PAGE)),
            (Command.DEVICE_SET_IRQS, SET_IRQS.pack(20, 0x21 | 0x40, 0, 0, 0)),
            (Command.DEVICE_SET_IRQS, SET_IRQS.pack(20, 0x21 | 1 << 31, 0, 0, 0)),
            (Command.DEVICE_FEATURE, struct.pack("<II", 8, 1 | 1 << 18 | 1 << 19)),
        ]:
            assert error_of(await c.request_raw(cmd, payload)) == errno.EINVAL, payload
        assert len(container_of(server)) == 0

        # a command carrying an error value is as malformed as one with unknown flags
        await c.send_bytes(pack_header(0xBEEF, Command.DEVICE_GET_INFO, 32, 0, 5) + info4)
        await c.device_get_info()
        assert len(c.unexpected) == 1
        assert isinstance(c.unexpected[0], ErrorReply)
        assert (c.unexpected[0].msg_id, c.unexpected[0].errno) == (0xBEEF, errno.EINVAL)


@python_engine_only(VALIDATION)
async def test_index_out_of_range_is_einval(server: Server) -> None:
    async with open_client(server) as c:
        for index in (9, 10, 0xFFFF_FFFF):
            await expect_errno(errno.EINVAL, c.region_info(index))
            await expect_errno(errno.EINVAL, c.region_read(index, 0, 4))
            await expect_errno(errno.EINVAL, c.region_write(index, 0, b"\0" * 4))
            await expect_errno(errno.EINVAL, c.region_io_fds(index))
        for index in (5, 6, 0xFFFF_FFFF):
            await expect_errno(errno.EINVAL, c.irq_info(index))
            await expect_errno(
                errno.EINVAL,
                c.set_irqs(index, IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER, 0, 0),
            )
        await assert_alive(c)


@python_engine_only(VALIDATION)
async def test_access_past_region_end_is_einval(server: Server) -> None:
    async with open_client(server) as c:
        for region, offset, count in [
            (BAR0, BAR_SIZE - 2, 4),
            (BAR0, BAR_SIZE, 4),
            (BAR0, BAR_SIZE, 0),  # nothing to read, but it starts past the end
            (BAR0, (1 << 64) - 4, 8),  # offset + count wraps a u64
            (CONFIG, 0x100, 4),  # edu is conventional PCI: 256 bytes
            (CONFIG, 0xFE, 4),
            (1, 0, 4),  # BAR1 does not exist (size 0)
            (ROM, 0, 4),  # neither does edu's ROM
        ]:
            if (region, offset, count) != (BAR0, BAR_SIZE, 0):
                await expect_errno(errno.EINVAL, c.region_read(region, offset, count))
                await expect_errno(errno.EINVAL, c.region_write(region, offset, b"\xff" * count))
        # exactly up to the end is fine (edu answers all ones at offsets without a register)
        assert await c.region_read(BAR0, BAR_SIZE - 4, 4) == b"\xff" * 4
        assert await c.region_read(CONFIG, 0xFC, 4) == b"\0" * 4
        await assert_alive(c)


@python_engine_only(VALIDATION)
async def test_count_above_max_data_xfer_size_is_einval(make_server: MakeServer) -> None:
    limit = 0x10000
    srv = await make_server({"s": Scratch()}, caps=small_caps(max_data_xfer_size=limit))
    async with open_client(srv, "s") as c:
        assert c.server_caps.max_data_xfer_size == limit
        assert await c.region_read(BAR2, 0x2000, limit) == b"\0" * limit
        await expect_errno(errno.EINVAL, c.region_read(BAR2, 0x2000, limit + 1))
        await expect_errno(errno.EINVAL, c.region_write(BAR2, 0x2000, b"\x5a" * (limit + 1)))
        # the refused write changed nothing; one at the limit works
        assert await c.region_read(BAR2, 0x2000, 8) == b"\0" * 8
        await c.region_write(BAR2, 0x2000, b"\x5a" * limit)
        assert await c.region_read(BAR2, 0x2000 + limit - 4, 4) == b"\x5a" * 4
        await assert_alive(c)


# ------------------------------------------------------------------ unknown commands


@python_engine_only(VALIDATION)
@pytest.mark.parametrize("command", [99, 14, 0, 19, 0xFFFF])
async def test_unknown_command_is_enotsup_and_connection_kept(server: Server, command: int) -> None:
    async with open_client(server) as c:
        assert error_of(await c.request_raw(command, b"\0" * 16)) == errno.ENOTSUP
        assert error_of(await c.request_raw(command)) == errno.ENOTSUP
        # posted: no reply at all, and the connection goes on
        await c.post_raw(command, b"\0" * 8)
        await assert_alive(c)
        await c.region_write(BAR0, Reg.LIVENESS, u32(0x1234))
        assert await c.region_read(BAR0, Reg.LIVENESS, 4) == u32(~0x1234 & 0xFFFF_FFFF)


async def test_server_to_client_commands_are_refused(server: Server) -> None:
    async with open_client(server) as c:
        reply = await c.request_raw(Command.DMA_READ, struct.pack("<QQ", 0x1000, 8))
        assert error_of(reply) in (errno.EINVAL, errno.ENOTSUP)
        await assert_alive(c)


# ------------------------------------------------------------------ ownership: EBUSY


@python_engine_only("libvfio-user never answers EBUSY (BEHAVIOUR_DIFFERENCES 'second client')")
async def test_device_already_connected_is_ebusy_then_closed(
    server: Server, autojump_clock: trio.abc.Clock
) -> None:
    async with open_client(server) as first:
        owner = session_of(server)
        async with open_client(server, version=False) as second:
            await expect_errno(errno.EBUSY, second.version())
            with trio.fail_after(5):
                await second.wait_disconnected()
            assert second.closed
        assert session_of(server) is owner
        await assert_alive(first)
        await first.region_write(BAR0, Reg.LIVENESS, u32(7))
        assert await first.region_read(BAR0, Reg.LIVENESS, 4) == u32(~7 & 0xFFFF_FFFF)


@python_engine_only("groups are the Python engine's (BEHAVIOUR_DIFFERENCES 'ownership and groups')")
async def test_group_owned_by_another_client_is_ebusy_then_closed(
    make_server: MakeServer,
) -> None:
    srv = await make_server(
        {"a": Edu(), "b": Edu()},
        groups={"g": OwnerPolicy.CONNECTION},
        members={"a": "g", "b": "g"},
    )
    async with open_client(srv, "a") as a:
        async with open_client(srv, "b", version=False) as b:
            await expect_errno(errno.EBUSY, b.version())
            with trio.fail_after(5):
                await b.wait_disconnected()
        assert srv.devices["b"].session is None
        assert srv.groups["g"].users == 1
        await assert_alive(a)
    released = srv.devices["a"].released
    with trio.fail_after(5):
        await released.wait()
    # the owner went away: the group is free for the next client
    assert srv.groups["g"].owner is None
    async with open_client(srv, "b") as b:
        await assert_alive(b)


# ------------------------------------------------------------------ DMA_MAP / DMA_UNMAP


@python_engine_only(
    "EINVAL on libvfio-user (PARITY_DIFFERENCES 'dma_map.overlap'); checks container_of"
)
async def test_dma_map_overlap_is_eexist(server: Server) -> None:
    async with open_client(server) as c:
        await c.dma_map(0x10000, 4 * PAGE)
        for address, size in [
            (0x10000, 4 * PAGE),  # identical
            (0xF000, 2 * PAGE),  # overlaps the start
            (0x13000, 2 * PAGE),  # overlaps the end
            (0x11000, PAGE),  # inside
            (0x0, 0x100000),  # around
        ]:
            await expect_errno(errno.EEXIST, c.dma_map(address, size))
        await c.dma_map(0xF000, PAGE)  # adjacent below
        await c.dma_map(0x14000, PAGE)  # adjacent above
        assert len(container_of(server)) == 3


@python_engine_only(VALIDATION)
async def test_dma_map_invalid_ranges_are_einval(server: Server) -> None:
    async with open_client(server) as c:
        with memfd(4 * PAGE) as fd:
            cases: list[dict[str, Any]] = [
                {"address": 0x10800, "size": PAGE},  # misaligned address
                {"address": 0x10000, "size": PAGE + 1},  # misaligned size
                {"address": 0x10000, "size": PAGE, "fd": fd, "offset": 0x800},  # offset
                {"address": 0x10000, "size": 0},  # empty
                {"address": (1 << 64) - PAGE, "size": 2 * PAGE},  # wraps
                {"address": 0x10000, "size": PAGE, "flags": 0},  # neither R nor W
                {"address": 0x10000, "size": 8 * PAGE, "fd": fd},  # file too small
                {"address": 0x10000, "size": PAGE, "fd": fd, "offset": 4 * PAGE},  # past end
            ]
            for kwargs in cases:
                await expect_errno(errno.EINVAL, c.dma_map(**kwargs))
            r, w = os.pipe()
            try:  # a descriptor that is not memory
                await expect_errno(errno.EINVAL, c.dma_map(0x10000, PAGE, fd=r))
            finally:
                os.close(r)
                os.close(w)
            assert len(container_of(server)) == 0
            await c.dma_map(0x10000, PAGE, fd=fd, offset=PAGE)
        assert len(container_of(server)) == 1


@python_engine_only(VALIDATION)
async def test_dma_map_past_the_end_of_a_sealed_file_is_einval(server: Server) -> None:
    # A file sealed against shrinking is mmap'd without an fstat of ours: CPython's mmap
    # refuses a window past the end of the file (ValueError, OverflowError for sizes no
    # C type holds), and that must be the same EINVAL, with the descriptor closed.
    fd = OwnedFd(os.memfd_create("errno-sealed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING))
    with fd:
        os.ftruncate(fd.fileno(), 4 * PAGE)
        fcntl.fcntl(fd.fileno(), fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        async with open_client(server) as c:
            before = open_fd_count()
            for offset, size in [
                (0, 8 * PAGE),  # file too small
                (4 * PAGE, PAGE),  # starts at the end
                (3 * PAGE, 2 * PAGE),  # runs past the end
                (0, 1 << 62),  # far too big for the file
                (1 << 63, PAGE),  # an offset no off_t holds
            ]:
                await expect_errno(errno.EINVAL, c.dma_map(0x10000, size, fd=fd, offset=offset))
            assert len(container_of(server)) == 0
            assert open_fd_count() == before  # every descriptor sent was closed
            await c.dma_map(0x10000, 3 * PAGE, fd=fd, offset=PAGE)
            assert next(iter(container_of(server))).mode == "mmap"


@python_engine_only(VALIDATION)
async def test_dma_map_beyond_max_dma_maps_is_enospc(make_server: MakeServer) -> None:
    srv = await make_server(caps=small_caps(max_dma_maps=2))
    async with open_client(srv) as c:
        assert c.server_caps.max_dma_maps == 2
        await c.dma_map(0x10000, PAGE)
        await c.dma_map(0x20000, PAGE)
        await expect_errno(errno.ENOSPC, c.dma_map(0x30000, PAGE))
        await c.dma_unmap(0x10000, PAGE)
        await c.dma_map(0x30000, PAGE)
        await expect_errno(errno.ENOSPC, c.dma_map(0x40000, PAGE))
        await c.dma_unmap_all()
        await c.dma_map(0x40000, PAGE)


async def test_dma_unmap_without_exact_match_is_enoent(server: Server) -> None:
    async with open_client(server) as c:
        await c.dma_map(0x10000, 2 * PAGE)
        for address, size in [
            (0x10000, PAGE),  # part of it
            (0x11000, PAGE),  # the other part
            (0x10000, 3 * PAGE),  # more than it
            (0xF000, 3 * PAGE),  # around it
            (0x20000, PAGE),  # nothing there
        ]:
            await expect_errno(errno.ENOENT, c.dma_unmap(address, size))
        reply = await c.dma_unmap(0x10000, 2 * PAGE)
        assert (reply.address, reply.size, reply.flags) == (0x10000, 2 * PAGE, 0)
        await expect_errno(errno.ENOENT, c.dma_unmap(0x10000, 2 * PAGE))


@python_engine_only(VALIDATION)
async def test_dma_unmap_flags_other_than_0_and_2_are_einval(server: Server) -> None:
    async with open_client(server) as c:
        await c.dma_map(0x10000, PAGE)
        bitmap = DmaBitmap(PAGE, 8, b"\0" * 8)
        for flags, address, size, bm in [
            (DmaUnmapFlags.GET_DIRTY_BITMAP, 0x10000, PAGE, bitmap),
            (4, 0x10000, PAGE, None),
            (DmaUnmapFlags.ALL | 4, 0, 0, None),
            (DmaUnmapFlags.ALL | DmaUnmapFlags.GET_DIRTY_BITMAP, 0, 0, bitmap),
            (DmaUnmapFlags.ALL, 0x10000, PAGE, None),  # unmap-all needs address = size = 0
            (DmaUnmapFlags.ALL, 0, PAGE, None),
        ]:
            body = DmaUnmap(flags, address, size, bitmap=bm)
            await expect_errno(errno.EINVAL, c.call(body, DmaUnmapReply))
        assert len(container_of(server)) == 1
        await c.dma_unmap(0x10000, PAGE)


# ------------------------------------------------------------------ reset and model errors


@python_engine_only(VALIDATION)
async def test_device_reset_without_reset_flag_is_einval(make_server: MakeServer) -> None:
    srv = await make_server({"plain": NoResetScratch(), "resettable": Scratch()})
    async with open_client(srv, "plain") as c:
        assert not (await c.device_get_info()).flags & DeviceFlags.RESET
        await c.region_write(BAR0, models.SCRATCH, u32(0xAB))
        await expect_errno(errno.EINVAL, c.device_reset())
        assert await c.region_read(BAR0, models.SCRATCH, 4) == u32(0xAB)  # not reset
    async with open_client(srv, "resettable") as c:
        assert (await c.device_get_info()).flags & DeviceFlags.RESET
        await c.region_write(BAR0, models.SCRATCH, u32(0xAB))
        await c.device_reset()
        assert await c.region_read(BAR0, models.SCRATCH, 4) == u32(0)


async def test_model_errors_become_their_errno(make_server: MakeServer) -> None:
    srv = await make_server({"s": Scratch()})
    async with open_client(srv, "s") as c:
        await expect_errno(errno.ENOSPC, c.region_write(BAR0, models.FAIL_ERRNO, u32(28)))
        await expect_errno(errno.EROFS, c.region_write(BAR0, models.FAIL_OSERR, u32(30)))
        await expect_errno(errno.EBADMSG, c.region_read(BAR0, models.READ_ERRNO, 4))
        # any other exception is EIO, and the connection is kept
        await expect_errno(errno.EIO, c.region_write(BAR0, models.FAIL_BUG, u32(1)))
        await expect_errno(errno.EIO, c.region_read(BAR0, models.READ_BUG, 4))
        # a DeviceError with errno 0 still fails the request
        await expect_errno(errno.EIO, c.region_write(BAR0, models.FAIL_ERRNO, u32(0)))
        # posted: the failure is logged, no reply is sent
        await c.region_write(BAR0, models.FAIL_BUG, u32(1), posted=True)
        await c.region_write(BAR0, models.FAIL_ERRNO, u32(28), posted=True)
        await assert_alive(c)
        assert await c.region_read(BAR0, models.ID, 4) == u32(models.SCRATCH_ID)


# ------------------------------------------------------------------ broken streams


def _header(command: int, size: int, msg_id: int = 0x4242) -> bytes:
    return pack_header(msg_id, command, size, HeaderFlags.TYPE_COMMAND)


async def _break_size_below_16(c: Client) -> None:
    await c.send_bytes(_header(Command.DEVICE_GET_INFO, 8) + b"\0" * 8)


async def _break_size_zero(c: Client) -> None:
    await c.send_bytes(_header(Command.DEVICE_GET_INFO, 0))


async def _break_size_above_limit(c: Client) -> None:
    await c.send_bytes(_header(Command.REGION_WRITE, HEADER_SIZE + 64 + (1 << 20) + 1))


async def _break_size_huge(c: Client) -> None:
    await c.send_bytes(_header(Command.REGION_WRITE, 0xFFFF_FFFF))


async def _break_too_many_fds(c: Client) -> None:
    fds = [make_eventfd() for _ in range(17)]  # the server takes 16 per message
    try:
        body = SET_IRQS.pack(20, IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER, 2, 0, 17)
        await c.send_bytes(_header(Command.DEVICE_SET_IRQS, 36) + body, fds)
    finally:
        for fd in fds:
            fd.close()


async def _break_fds_without_message_start(c: Client) -> None:
    body = INFO4.pack(16, 0, 0, 0)
    frame = _header(Command.DEVICE_GET_INFO, 32) + body
    with make_eventfd() as fd:
        await c.send_bytes(frame[:20])
        await settle()  # the server has read those 20 bytes: the next read starts mid-message
        await c.send_bytes(frame[20:], [fd])  # fds with bytes that start no message
        # The codec notices when the next message starts (the fds cannot belong to it).
        await c.send_bytes(_header(Command.DEVICE_GET_INFO, 32, 0x4343) + body)


BREAKERS = {
    "size_below_16": _break_size_below_16,
    "size_zero": _break_size_zero,
    "size_above_limit": _break_size_above_limit,
    "size_huge": _break_size_huge,
    "too_many_fds": _break_too_many_fds,
    "fds_without_message_start": _break_fds_without_message_start,
}


@python_engine_only("libvfio-user stalls on a partial frame (BEHAVIOUR_DIFFERENCES 'split frames')")
@pytest.mark.parametrize("breaker", sorted(BREAKERS))
async def test_broken_stream_closes_only_that_connection(
    make_server: MakeServer, breaker: str
) -> None:
    srv = await make_server({"edu": Edu(), "s": Scratch()})
    async with open_client(srv, "edu") as bystander:
        with make_eventfd() as efd, make_eventfd() as victim_fd:
            await bystander.set_irq_eventfds(0, 0, [efd])
            async with open_client(srv, "s") as victim:
                await victim.dma_map(0x10000, PAGE)
                await victim.set_irq_eventfds(0, 0, [victim_fd])
                await BREAKERS[breaker](victim)
                with trio.fail_after(5):
                    await victim.wait_disconnected()
                with pytest.raises(trio.BrokenResourceError):
                    await victim.device_get_info()
            with trio.fail_after(5):
                await srv.devices["s"].released.wait()
            assert srv.devices["s"].session is None
            # the bystander is untouched: its eventfd and connection still work
            await assert_alive(bystander)
            await bystander.region_write(BAR0, Reg.IRQ_RAISE, u32(1))
            assert await wait_eventfd(efd) == 1
    # the victim's device can be used again (state kept)
    async with open_client(srv, "s") as again:
        assert await again.region_read(BAR0, models.ID, 4) == u32(models.SCRATCH_ID)


@python_engine_only("libvfio-user stalls on a partial frame (BEHAVIOUR_DIFFERENCES 'split frames')")
async def test_fds_beyond_negotiated_max_close_the_connection(make_server: MakeServer) -> None:
    # With max_msg_fds=1 the receive buffer still has room for 2 descriptors (CMSG
    # alignment), so this is the codec's own check rather than MSG_CTRUNC.
    srv = await make_server({"s": Scratch()}, caps=small_caps(max_msg_fds=1))
    async with open_client(srv, "s") as c:
        assert c.server_caps.max_msg_fds == 1
        with make_eventfd() as a, make_eventfd() as b:
            body = SET_IRQS.pack(20, IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER, 2, 0, 2)
            await c.send_bytes(_header(Command.DEVICE_SET_IRQS, 36) + body, [a, b])
            with trio.fail_after(5):
                await c.wait_disconnected()
    with trio.fail_after(5):
        await srv.devices["s"].released.wait()


# ------------------------------------------------------------------ fds of rejected messages


def _fd_cases() -> dict[str, tuple[int, bytes]]:
    eventfd_trigger = IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER
    return {
        "get_info": (Command.DEVICE_GET_INFO, INFO4.pack(16, 0, 0, 0)),
        "region_info": (Command.DEVICE_GET_REGION_INFO, REGION_INFO.pack(32, 0, 0, 0, 0, 0)),
        "irq_info": (Command.DEVICE_GET_IRQ_INFO, INFO4.pack(16, 0, 0, 0)),
        "region_read": (Command.REGION_READ, ACCESS.pack(0, CONFIG, 4)),
        "region_write": (Command.REGION_WRITE, ACCESS.pack(0x3C, CONFIG, 1) + b"\x05"),
        "reset": (Command.DEVICE_RESET, b""),
        "dma_unmap": (Command.DMA_UNMAP, DMA_UNMAP.pack(24, 0, 0x10000, PAGE)),
        "dma_map_misaligned": (Command.DMA_MAP, DMA_MAP.pack(32, RW, 0, 0x10800, PAGE)),
        "dma_map_overlap": (Command.DMA_MAP, DMA_MAP.pack(32, RW, 0, 0x80000, PAGE)),
        "set_irqs_data_none": (
            Command.DEVICE_SET_IRQS,
            SET_IRQS.pack(20, IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER, 2, 0, 1),
        ),
        "set_irqs_wrong_count": (
            Command.DEVICE_SET_IRQS,
            SET_IRQS.pack(20, eventfd_trigger, 2, 0, 2),
        ),
        "set_irqs_bad_index": (
            Command.DEVICE_SET_IRQS,
            SET_IRQS.pack(20, eventfd_trigger, 7, 0, 1),
        ),
        "unknown_command": (99, b"\0" * 8),
        "retired_command": (14, b"\0" * 8),
        "feature": (Command.DEVICE_FEATURE, struct.pack("<II", 8, 1 | 1 << 18)),
        "version_again": (Command.VERSION, Version(0, 0).encode()),
    }


@python_engine_only(VALIDATION)
@pytest.mark.parametrize("case", sorted(_fd_cases()))
async def test_fds_of_rejected_messages_are_closed(make_server: MakeServer, case: str) -> None:
    command, payload = _fd_cases()[case]
    srv = await make_server({"s": Scratch()})
    async with open_client(srv, "s") as c:
        await c.dma_map(0x80000, PAGE)
        with make_eventfd() as fd:
            before = count_fds()
            reply = await c.request_raw(command, payload, fds=[fd])
            assert isinstance(reply, ErrorReply), reply
            assert count_fds() == before, "the server kept the descriptor of a refused message"
            # posted: no reply, the descriptor is still closed
            await c.post_raw(command, payload, fds=[fd])
            await assert_alive(c)
            assert count_fds() == before
        assert irq_table_of(srv, "s").open_fds() == 0


@python_engine_only(VALIDATION)
async def test_fds_before_version_are_closed(server: Server) -> None:
    async with open_client(server, version=False) as c:
        with make_eventfd() as fd:
            before = count_fds()
            payload = DMA_MAP.pack(32, RW, 0, 0x10000, PAGE)
            assert error_of(await c.request_raw(Command.DMA_MAP, payload, fds=[fd])) == errno.EINVAL
            assert count_fds() == before
        await c.version()
        await assert_alive(c)


@python_engine_only(VALIDATION)
async def test_non_memory_dma_map_fd_is_closed(tmp_path: Path, server: Server) -> None:
    async with open_client(server) as c:
        with make_eventfd() as fd:
            before = count_fds()
            await expect_errno(errno.EINVAL, c.dma_map(0x10000, PAGE, fd=fd))
            assert count_fds() == before
        # a successful shared map holds at most the mapping's own descriptor (CPython's
        # mmap keeps a dup of it), and the unmap gives that back
        with memfd(PAGE) as fd:
            before = count_fds()
            await c.dma_map(0x10000, PAGE, fd=fd)
            assert count_fds() <= before + 1
            await c.dma_unmap(0x10000, PAGE)
            assert count_fds() == before

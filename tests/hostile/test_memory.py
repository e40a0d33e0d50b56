"""A header is a promise the server must not pay for: nothing is allocated for a message
larger than the server accepts, and a VERSION is bounded before anything is parsed.

Memory is measured on the server process as VmHWM (peak RSS since `reset_peak`), so a
buffer that grew and was freed again before we looked still counts.
"""

from __future__ import annotations

import time

import pytest
import trio

from protocol import Command, pack_header

from ..engines.params import ENGINE_PARAMS
from .conftest import (
    BAR0,
    Closed,
    Raw,
    ServerProcess,
    Spawn,
    good_client,
    python_engine_only,
    raw_connection,
    u32,
    version_frame,
)

pytestmark = pytest.mark.parametrize("engine", ENGINE_PARAMS)

MIB = 1 << 20
#: what the server may gain in peak RSS while refusing (allocator noise, one recv buffer)
TOLERANCE_KIB = 8 << 10
#: bytes pushed after the header: what a server that believed the header would buffer
PUSH = 64 * MIB
EDU_ID = 0x010000ED
#: the largest REGION_WRITE the server accepts carries max_data_xfer_size (1 MiB) of data
OVERSIZED_WRITE = 16 + 16 + MIB + 64 * 1024


async def push_after_header(raw: Raw, header: bytes) -> int:
    """Send `header`, then up to PUSH bytes of body; returns how much went out before the
    server hung up. Then the server must close the connection."""
    sent = 0
    chunk = bytes(256 * 1024)
    try:
        await raw.send(header)
        while sent < PUSH:
            await raw.send(chunk)
            sent += len(chunk)
    except trio.BrokenResourceError:
        pass
    await raw.wait_closed(timeout=5)
    return sent


async def refused_without_allocating(srv: ServerProcess, header: bytes, version: bool) -> int:
    srv.reset_peak()
    before = srv.peak_rss_kib()
    async with raw_connection(srv.sockets["d1"], version=version) as raw:
        with trio.fail_after(30):
            sent = await push_after_header(raw, header)
    grown = srv.peak_rss_kib() - before
    print(f"\nheader {header.hex()}: {sent} body bytes accepted, peak RSS {grown:+d} KiB")
    assert grown < TOLERANCE_KIB
    return grown


FOUR_GIB = pack_header(1, Command.REGION_WRITE, 0xFFFFFFFF, 0)


async def test_a_4_gib_header_before_version_allocates_nothing(spawn: Spawn) -> None:
    srv = spawn(["d1"])
    await refused_without_allocating(srv, FOUR_GIB, version=False)
    assert srv.alive()


@python_engine_only(
    "libvfio-user answers an oversized header after VERSION with an error and goes on "
    "parsing the body as headers instead of disconnecting (BEHAVIOUR_DIFFERENCES "
    "'protocol validation')"
)
async def test_a_4_gib_header_after_version_allocates_nothing(spawn: Spawn) -> None:
    srv = spawn(["d1"])
    await refused_without_allocating(srv, FOUR_GIB, version=True)
    assert srv.alive()


@python_engine_only(
    "libvfio-user reads a body with one recv and parses the rest as headers "
    "(BEHAVIOUR_DIFFERENCES 'large messages'): it never reads what the header announced"
)
async def test_a_header_above_max_data_xfer_size_allocates_nothing(spawn: Spawn) -> None:
    srv = spawn(["d1"])
    header = pack_header(1, Command.REGION_WRITE, OVERSIZED_WRITE, 0)
    header += (0x100).to_bytes(8, "little") + u32(0) + u32(OVERSIZED_WRITE - 32)
    await refused_without_allocating(srv, header, version=True)
    assert srv.alive()


async def refusal_of(raw: Raw) -> str:
    """How the server turned a VERSION down: 'closed' or 'EINVAL'; fails on anything else."""
    try:
        head, _ = await raw.read_frame(timeout=2)
    except Closed:
        return "closed"
    assert head[1] == Command.VERSION and head[3] & 0x20 and head[4] == 22, head
    return "EINVAL"


@python_engine_only(
    "libvfio-user bounds VERSION itself (its own JSON size limit and blocking body recv "
    "('split frames'), not Limits.max_version_size"
)
async def test_a_huge_version_is_refused_before_it_is_read(spawn: Spawn) -> None:
    srv = spawn(["d1", "d2"])
    good = version_frame()
    # exactly 1 MiB, within the frame limit of any other message: only a VERSION bound
    # refuses it. Valid JSON: the padding sits between the last two closing braces.
    body = good[16:-2] + b" " * (MIB - len(good)) + good[-2:]
    huge = pack_header(0, Command.VERSION, MIB, 0) + body
    assert len(huge) == MIB
    async with good_client(srv.sockets["d2"]) as c:
        # header and the first 4 KiB only: a server that means to parse it waits for the rest
        async with raw_connection(srv.sockets["d1"]) as raw:
            start = time.perf_counter()
            await raw.send(huge[: 4096])
            how = await refusal_of(raw)
            took = (time.perf_counter() - start) * 1e3
            print(f"\npartial 1 MiB VERSION: {how} after {took:.1f} ms")
        # the whole message, valid JSON and all: still refused, and d2 is not held up
        worst = 0.0
        for _ in range(5):
            async with raw_connection(srv.sockets["d1"]) as raw:
                try:
                    await raw.send(huge)
                except trio.BrokenResourceError:
                    pass  # hung up on us mid-send: that is a refusal too
                else:
                    await refusal_of(raw)
            start = time.perf_counter()
            assert await c.region_read(BAR0, 0, 4) == u32(EDU_ID)
            worst = max(worst, time.perf_counter() - start)
        print(f"good client of d2: worst read after a huge VERSION {worst * 1e3:.2f} ms")
        assert worst < 0.050
    assert srv.alive()

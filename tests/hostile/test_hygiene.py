"""300 hostile sessions leave the server exactly as they found it, without help from the GC.

Each session below breaks one rule of the protocol (or of good manners) and goes away. The
server runs with the cyclic garbage collector disabled: a descriptor, mapping or buffer kept
alive by a reference cycle stays visible in /proc, and one freed only by `OwnedFd`'s
finalizer logs GC_LEAK. After a warm-up (caches, lazily created helpers) the descriptor
count and the mapping count must come back to their baseline exactly, RSS within a small
tolerance, and the server must still serve a well-behaved client.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
from collections.abc import Awaitable, Callable

import pytest
import trio

from protocol import (
    Capabilities,
    Command,
    DeviceSetIrqs,
    DmaMap,
    DmaWriteReply,
    IrqSetFlags,
    pack_header,
)

from ..engines.params import ENGINE_PARAMS
from .conftest import (
    BAR0,
    EDU_BUFFER,
    EDU_BUFFER_SIZE,
    GC_LEAK,
    Closed,
    Raw,
    ServerProcess,
    Spawn,
    edu_dma_frames,
    frame,
    good_client,
    raw_connection,
    region_read,
    region_write,
    reply_frame,
    u32,
    version_frame,
    wait_for,
)

pytestmark = pytest.mark.parametrize("engine", ENGINE_PARAMS)

SESSIONS = 300
RSS_TOLERANCE_KIB = 8 << 10
RAM = 0x100000
RAM_SIZE = 64 << 10
EDU_ID = 0x010000ED
RW = 3  # DMA_MAP flags READ | WRITE

Session = Callable[[str, int], Awaitable[None]]

#: sessions left out on the libvfio-user engine, with the documented difference that makes
#: them meaningless there (vfiouser_srv/engines/libvfio_user/_parity.py)
NOT_ON_LIBVFIO_USER = {
    # the library reads a body with one blocking recv and never reads the rest: our send of
    # the almost-whole frame blocks forever
    "1 MiB frame minus one byte": "BEHAVIOUR_DIFFERENCES 'large messages'",
}


def eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def memfd(sealed: bool) -> int:
    fd = os.memfd_create("hostile-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, RAM_SIZE)
    if sealed:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


async def send_with(raw: Raw, data: bytes, make: Callable[[], int], count: int = 1) -> None:
    """Send `data` carrying `count` fresh descriptors; our copies are closed at once (the
    server's are the server's to close)."""
    fds = [make() for _ in range(count)]
    try:
        await raw.send(data, fds)
    finally:
        for fd in fds:
            os.close(fd)


async def tolerate_close(coro: Awaitable[object]) -> None:
    """The server is allowed (often expected) to hang up on a hostile session at any point."""
    with contextlib.suppress(Closed, trio.BrokenResourceError):
        await coro


# ------------------------------------------------------------------ the sessions


async def garbage(path: str, n: int) -> None:
    async with raw_connection(path) as raw:
        await tolerate_close(raw.send(random.Random(n).randbytes(4096)))


async def truncated_header(path: str, n: int) -> None:
    async with raw_connection(path) as raw:
        await raw.send(version_frame()[:8])


async def bad_size(size: int) -> Session:
    async def session(path: str, n: int) -> None:
        async with raw_connection(path) as raw:
            await tolerate_close(raw.send(pack_header(n, Command.VERSION, size, 0)))
            await raw.wait_closed()  # a size that cannot be a message ends the stream

    return session


async def command_before_version(path: str, n: int) -> None:
    async with raw_connection(path) as raw:
        await raw.send(region_read(n, BAR0, 0, 4))
        await tolerate_close(raw.read_frame())


async def fds_on_region_read(path: str, n: int) -> None:
    async with raw_connection(path, version=True) as raw:
        await send_with(raw, region_read(n, BAR0, 0, 4), eventfd)
        await tolerate_close(raw.read_frame())


async def too_many_fds(path: str, n: int) -> None:
    # VERSION proposed max_msg_fds=8; the server's own limit is 16: 20 exceeds both
    async with raw_connection(path, version=True) as raw:
        body = DmaMap(RW, 0, RAM, RAM_SIZE).encode()
        await tolerate_close(send_with(raw, frame(n, Command.DMA_MAP, body), eventfd, 20))
        await tolerate_close(raw.read_frame())


async def fds_mid_message(path: str, n: int) -> None:
    async with raw_connection(path, version=True) as raw:
        message = region_write(n, BAR0, 0x04, u32(n))
        await raw.send(message[:20])
        await tolerate_close(send_with(raw, message[20:], eventfd))
        await tolerate_close(raw.read_frame())


async def close_mid_message(path: str, n: int) -> None:
    async with raw_connection(path, version=True) as raw:
        message = region_write(n, BAR0, 0x100, bytes(4096))
        await raw.send(message[: len(message) // 2])


async def almost_one_mib(path: str, n: int) -> None:
    async with raw_connection(path, version=True) as raw:
        size = 1 << 20
        head = pack_header(n, Command.REGION_WRITE, size, 0)
        body = (0x100).to_bytes(8, "little") + u32(0) + u32(size - 32)
        await tolerate_close(raw.send(head + body + bytes(size - 33)))


async def dma_map_memfd(path: str, n: int) -> None:
    async with raw_connection(path, version=True) as raw:
        fd = memfd(sealed=n % 2 == 0)
        try:
            await raw.send(frame(n, Command.DMA_MAP, DmaMap(RW, 0, RAM, RAM_SIZE).encode()), [fd])
        finally:
            os.close(fd)
        await raw.read_frame()


async def set_irqs_then_close(path: str, n: int) -> None:
    async with raw_connection(path, version=True) as raw:
        flags = IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER
        for index in (0, 1):  # INTx and MSI
            body = DeviceSetIrqs(flags, index, 0, 1, fd_list=(0,)).encode()
            await send_with(raw, frame(n + index, Command.DEVICE_SET_IRQS, body), eventfd)
            await raw.read_frame()


async def start_message_dma(raw: Raw, n: int, *, to_ram: bool) -> tuple[tuple[int, ...], bytes]:
    """VERSION done: map RAM without an fd, start an edu DMA, return the server's request."""
    await raw.send(frame(n, Command.DMA_MAP, DmaMap(RW, 0, RAM, RAM_SIZE).encode()))
    src, dst = (EDU_BUFFER, RAM) if to_ram else (RAM, EDU_BUFFER)
    await raw.send(edu_dma_frames(n + 1, src, dst, EDU_BUFFER_SIZE, to_ram))
    command = Command.DMA_WRITE if to_ram else Command.DMA_READ
    return await raw.read_until(command)


def dma_session(to_ram: bool, answer: Callable[[Raw, tuple[int, ...]], Awaitable[None]]) -> Session:
    async def session(path: str, n: int) -> None:
        async with raw_connection(path, version=True) as raw:
            head, _ = await start_message_dma(raw, n, to_ram=to_ram)
            await tolerate_close(answer(raw, head))

    return session


async def no_answer(raw: Raw, head: tuple[int, ...]) -> None:
    """In-flight message DMA: close without answering."""


async def region_info_reply_with_fd(raw: Raw, head: tuple[int, ...]) -> None:
    payload = bytes(32)  # argsz/flags/index/cap_offset/size/offset: a plausible REGION_INFO
    await send_with(raw, reply_frame(head[0], Command.DEVICE_GET_REGION_INFO, payload), eventfd)


async def wrong_id_with_fd(raw: Raw, head: tuple[int, ...]) -> None:
    payload = bytes(16) + bytes(EDU_BUFFER_SIZE)
    await send_with(raw, reply_frame(head[0] ^ 0x5A5A, head[1], payload), eventfd)


async def short_read_reply(raw: Raw, head: tuple[int, ...]) -> None:
    payload = RAM.to_bytes(8, "little") + (16).to_bytes(8, "little") + bytes(16)
    await raw.send(reply_frame(head[0], Command.DMA_READ, payload))


async def short_read_reply_with_fd(raw: Raw, head: tuple[int, ...]) -> None:
    payload = RAM.to_bytes(8, "little") + (16).to_bytes(8, "little") + bytes(16)
    await send_with(raw, reply_frame(head[0], Command.DMA_READ, payload), eventfd)


async def dma_write_reply_with_fds(raw: Raw, head: tuple[int, ...]) -> None:
    payload = DmaWriteReply(RAM, EDU_BUFFER_SIZE).encode()
    await send_with(raw, reply_frame(head[0], Command.DMA_WRITE, payload), eventfd, 3)


async def sessions() -> list[tuple[str, Session]]:
    return [
        ("garbage", garbage),
        ("truncated header", truncated_header),
        ("size 0", await bad_size(0)),
        ("size 15", await bad_size(15)),
        ("size 0xffffffff", await bad_size(0xFFFFFFFF)),
        ("command before VERSION", command_before_version),
        ("fds on REGION_READ", fds_on_region_read),
        ("more fds than negotiated", too_many_fds),
        ("fds mid-message", fds_mid_message),
        ("close mid-message", close_mid_message),
        ("1 MiB frame minus one byte", almost_one_mib),
        ("DMA_MAP memfd then close", dma_map_memfd),
        ("SET_IRQS eventfds then close", set_irqs_then_close),
        ("DMA_READ in flight", dma_session(False, no_answer)),
        ("DMA_WRITE in flight", dma_session(True, no_answer)),
        ("REGION_INFO reply + fd to DMA_READ", dma_session(False, region_info_reply_with_fd)),
        ("REGION_INFO reply + fd to DMA_WRITE", dma_session(True, region_info_reply_with_fd)),
        ("wrong msg_id + fd", dma_session(False, wrong_id_with_fd)),
        ("short DMA_READ reply", dma_session(False, short_read_reply)),
        ("short DMA_READ reply + fd", dma_session(False, short_read_reply_with_fd)),
        ("DMA_WRITE reply + 3 fds", dma_session(True, dma_write_reply_with_fds)),
    ]


async def serves_a_good_client(srv: ServerProcess, name: str) -> None:
    caps = Capabilities(max_msg_fds=8)
    async with good_client(srv.sockets[name], caps=caps) as c:
        assert await c.region_read(BAR0, 0, 4) == u32(EDU_ID)


async def test_hostile_sessions_leave_no_fd_mapping_or_memory_behind(
    spawn: Spawn, engine: str
) -> None:
    srv = spawn(["d1", "d2"])
    path = srv.sockets["d1"]
    kinds = [k for k in await sessions() if engine == "python" or k[0] not in NOT_ON_LIBVFIO_USER]
    fds_at_start = srv.fd_count()

    # warm-up: every kind once, so lazily created state is part of the baseline
    for n, (_name, session) in enumerate(kinds):
        await session(path, n * 16)
    await serves_a_good_client(srv, "d1")
    await wait_for(lambda: srv.fd_count() == fds_at_start)
    fds, maps, rss = srv.fd_count(), len(srv.maps()), srv.rss_kib()

    for n in range(SESSIONS):
        name, session = kinds[n % len(kinds)]
        with trio.fail_after(15):
            try:
                await session(path, (n * 16) & 0xFFFF)
            except Exception as exc:
                raise AssertionError(f"session {n} ({name}): {exc!r}") from exc
    settled = await wait_for(
        lambda: (srv.fd_count(), len(srv.maps())) == (fds, maps), timeout=15
    )
    fds_after, maps_after, rss_after = srv.fd_count(), len(srv.maps()), srv.rss_kib()
    print(
        f"\n{SESSIONS} hostile sessions: fds {fds} -> {fds_after}, mappings {maps} -> "
        f"{maps_after}, RSS {rss} -> {rss_after} KiB ({rss_after - rss:+d} KiB)"
    )
    assert srv.alive(), srv.stderr()[-2000:]
    assert settled, f"fds {fds} -> {fds_after} {srv.fds()}, maps {maps} -> {maps_after}"
    assert fds_after == fds_at_start
    assert rss_after - rss < RSS_TOLERANCE_KIB
    assert GC_LEAK not in srv.stderr()
    await serves_a_good_client(srv, "d1")
    await serves_a_good_client(srv, "d2")

"""Guest memory that shrinks under the server must not kill it (issue 11, finding 2).

A client DMA_MAPs a memfd, keeps its own copy of the descriptor and truncates the file to
zero. An mmap of that window now faults (SIGBUS) on first touch past the new end of file; if
the server touches it, the whole process dies, with every other device it serves. The rule:
such a DMA reaches the device model as a DMA error (edu logs "DMA failed" and moves no data),
the connection and the other devices keep working. The server may also refuse the map up
front (a window it cannot access safely) with an errno: both satisfy the rule.

A memfd sealed against shrinking and growing (what QEMU's memory-backend-memfd creates) can
never fault, and must keep working end to end on every engine.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import pytest
import trio

from vfiouser_srv.client import Client, VfioUserError

from ..engines.params import ENGINE_PARAMS
from .conftest import (
    BAR0,
    CONFIG,
    DMA_CMD,
    DMA_CNT,
    DMA_DST,
    DMA_RUN,
    DMA_SRC,
    DMA_TO_RAM,
    EDU_BUFFER,
    EDU_BUFFER_SIZE,
    MEM_AND_MASTER,
    PCI_COMMAND,
    ServerProcess,
    Spawn,
    good_client,
    python_engine_only,
    u32,
    u64,
)

pytestmark = pytest.mark.parametrize("engine", ENGINE_PARAMS)

WINDOW = 64 << 10
#: guest addresses: a message-mode window the client serves itself, and the hostile one
GOOD_RAM = 0x100000
BAD_RAM = 0x200000
EDU_ID = 0x010000ED
LIVENESS = 0x04
DMA_FAILED = "edu: DMA failed"
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 13 + seed) & 0xFF for i in range(n))


@asynccontextmanager
async def edu_client(srv: ServerProcess, name: str) -> AsyncIterator[Client]:
    async with good_client(srv.sockets[name]) as c:
        await c.region_write(CONFIG, PCI_COMMAND, MEM_AND_MASTER.to_bytes(2, "little"))
        yield c


async def edu_dma(c: Client, src: int, dst: int, count: int, to_ram: bool) -> None:
    """Run one edu DMA and wait until the device has finished it (its RUN bit clears).

    edu reports completion only through an interrupt or that bit; polling the register is
    the one way that needs no IRQ plumbing, and it is bounded.
    """
    await c.region_write(BAR0, DMA_SRC, u64(src))
    await c.region_write(BAR0, DMA_DST, u64(dst))
    await c.region_write(BAR0, DMA_CNT, u64(count))
    await c.region_write(BAR0, DMA_CMD, u64(DMA_RUN | (DMA_TO_RAM if to_ram else 0)))
    with trio.fail_after(10):
        while int.from_bytes(await c.region_read(BAR0, DMA_CMD, 8), "little") & DMA_RUN:
            await trio.sleep(0.001)


def memfd(size: int, *, seals: int = 0) -> int:
    fd = os.memfd_create("hostile-guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


@python_engine_only(
    "libvfio-user mmaps DMA windows itself inside the C library and touches them from C: "
    "a window shrunk under it faults there, where no Python code can turn the SIGBUS into "
    "a DMA error"
)
@pytest.mark.parametrize("to_ram", [False, True], ids=["ram-to-device", "device-to-ram"])
async def test_dma_through_a_shrunk_window_is_a_dma_error_not_sigbus(
    spawn: Spawn, to_ram: bool
) -> None:
    srv = spawn(["d1", "d2"])
    known = pattern(EDU_BUFFER_SIZE, seed=5)
    fd = memfd(WINDOW)
    try:
        async with edu_client(srv, "d1") as c, edu_client(srv, "d2") as other:
            # fill edu's buffer with a known pattern through a window that is always safe
            await c.memory.add_ram(GOOD_RAM, WINDOW, shared=False)
            c.memory.write(GOOD_RAM, known)
            await edu_dma(c, GOOD_RAM, EDU_BUFFER, EDU_BUFFER_SIZE, to_ram=False)

            # refusing a window that can shrink is allowed too: then the DMA below faults
            with suppress(VfioUserError):
                await c.dma_map(BAD_RAM, WINDOW, fd=fd)
            os.ftruncate(fd, 0)  # our copy of the fd: the server's mapping now ends at 0
            failed_before = srv.stderr().count(DMA_FAILED)

            if to_ram:
                await edu_dma(c, EDU_BUFFER, BAD_RAM, EDU_BUFFER_SIZE, to_ram=True)
            else:
                await edu_dma(c, BAD_RAM, EDU_BUFFER, EDU_BUFFER_SIZE, to_ram=False)

            assert srv.alive(), f"server died: {srv.proc.returncode} {srv.stderr()[-2000:]}"
            assert srv.stderr().count(DMA_FAILED) == failed_before + 1, srv.stderr()[-2000:]
            if to_ram:
                # nothing landed: the file was neither written nor grown by the DMA
                assert os.fstat(fd).st_size == 0
            # edu's buffer still holds the pattern: the failed DMA moved nothing into it
            await edu_dma(c, EDU_BUFFER, GOOD_RAM + EDU_BUFFER_SIZE, EDU_BUFFER_SIZE, True)
            assert c.memory.read(GOOD_RAM + EDU_BUFFER_SIZE, EDU_BUFFER_SIZE) == known
            # the connection and the other device work on
            await c.region_write(BAR0, LIVENESS, u32(0x12345678))
            assert await c.region_read(BAR0, LIVENESS, 4) == u32(~0x12345678 & 0xFFFFFFFF)
            assert await other.region_read(BAR0, 0, 4) == u32(EDU_ID)
    finally:
        os.close(fd)
    assert srv.alive()


async def test_sealed_memfd_window_works_end_to_end(spawn: Spawn) -> None:
    srv = spawn(["d1"])
    fd = memfd(WINDOW, seals=SEALS)
    try:
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)  # the seal holds: this window can never fault
        data = pattern(EDU_BUFFER_SIZE, seed=9)
        os.pwrite(fd, data, 0x1000)
        async with edu_client(srv, "d1") as c:
            await c.dma_map(BAD_RAM, WINDOW, fd=fd)
            # the client's GuestMemory knows no RAM here: only the fd can carry the data
            await edu_dma(c, BAD_RAM + 0x1000, EDU_BUFFER, EDU_BUFFER_SIZE, to_ram=False)
            await edu_dma(c, EDU_BUFFER, BAD_RAM + 0x3000, EDU_BUFFER_SIZE, to_ram=True)
            assert os.pread(fd, EDU_BUFFER_SIZE, 0x3000) == data
            assert (c.memory.dma_reads, c.memory.dma_writes, c.memory.dma_errors) == (0, 0, 0)
            assert DMA_FAILED not in srv.stderr()
    finally:
        os.close(fd)

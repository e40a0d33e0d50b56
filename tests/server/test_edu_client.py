"""QEMU's edu device served by the real server and driven by the real client, as a guest
driver would: identification, liveness, factorial, interrupts (INTx and MSI), DMA."""

from __future__ import annotations

import struct

import pytest

from devices.edu import BAR_SIZE, DMA_START, IDENTIFICATION, DmaCmd, IrqBit, Reg, StatusBit
from devices.sdk.interface import RegionIndex
from protocol import DeviceFlags, IrqSetFlags, RegionFlags
from vfiouser_srv.client import Client, make_eventfd, read_eventfd_nowait, wait_eventfd
from vfiouser_srv.server import Server

from ..engines.params import ENGINE_PARAMS
from .conftest import open_client
from .test_irq import (
    CAP_ID_MSI,
    CMD_MASTER,
    CMD_MEMORY,
    PCI_COMMAND,
    PCI_STATUS,
    STATUS_INTERRUPT,
    cfg_read,
    cfg_write,
    find_cap,
)

# Engine-independent: every test runs on both engines (tests/engines/params.py).
pytestmark = [
    pytest.mark.usefixtures("no_fd_leak"),
    pytest.mark.parametrize("engine", ENGINE_PARAMS),
]

BAR0 = int(RegionIndex.BAR0)
CONFIG = int(RegionIndex.CONFIG)
INTX, MSI = 0, 1
UNMASK = IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_UNMASK
RAM = 0x10000
MODES = pytest.mark.parametrize("shared", [True, False], ids=["mmap", "messages"])


async def rd32(c: Client, reg: int) -> int:
    return int.from_bytes(await c.region_read(BAR0, reg, 4), "little")


async def wr32(c: Client, reg: int, value: int) -> None:
    await c.region_write(BAR0, reg, struct.pack("<I", value))


async def wr64(c: Client, reg: int, value: int) -> None:
    await c.region_write(BAR0, reg, struct.pack("<Q", value))


async def rd64(c: Client, reg: int) -> int:
    return int.from_bytes(await c.region_read(BAR0, reg, 8), "little")


async def bus_master(c: Client) -> None:
    await cfg_write(c, PCI_COMMAND, 2, CMD_MEMORY | CMD_MASTER)


async def enable_msi(c: Client, address: int = 0xFEE0_1000, data: int = 0x4041) -> None:
    """What Linux's pci_enable_msi does: program address and data, then set Enable."""
    cap = await find_cap(c, CAP_ID_MSI)
    ctrl = await cfg_read(c, cap + 2, 2)
    assert ctrl & 0x80, "edu's MSI is 64-bit"
    await cfg_write(c, cap + 4, 4, address & 0xFFFF_FFFF)
    await cfg_write(c, cap + 8, 4, address >> 32)
    await cfg_write(c, cap + 0xC, 2, data)
    await cfg_write(c, cap + 2, 2, ctrl | 1)
    assert await cfg_read(c, cap + 2, 2) & 1


# ------------------------------------------------------------------ identity and registers


async def test_identification(server: Server) -> None:
    async with open_client(server) as c:
        info = await c.device_get_info()
        assert info.flags == DeviceFlags.PCI | DeviceFlags.RESET
        assert (info.num_regions, info.num_irqs) == (9, 5)
        assert await rd32(c, Reg.ID) == IDENTIFICATION
        assert await cfg_read(c, 0x00, 4) == 0x11E8_1234  # device << 16 | vendor
        assert await cfg_read(c, 0x08, 4) == 0x00FF_0010  # class 0x00ff00, revision 0x10
        assert await cfg_read(c, 0x2C, 4) == 0x1100_1AF4  # subsystem, subsystem vendor
        assert await cfg_read(c, 0x3D, 1) == 1  # INTA#
        bar0 = await c.region_info(BAR0)
        assert bar0.size == BAR_SIZE
        assert bar0.flags == RegionFlags.READ | RegionFlags.WRITE  # trapped, not mmap-able
        assert bar0.fd is None
        assert (await c.region_info(CONFIG)).size == 256
        for index in (1, 2, 3, 4, 5, 6, 8):
            region = await c.region_info(index)
            assert (region.size, region.flags) == (0, 0), index


async def test_liveness_inverts(server: Server) -> None:
    async with open_client(server) as c:
        for value in (0, 1, 0x12345678, 0xFFFF_FFFF, 0x8000_0000):
            await wr32(c, Reg.LIVENESS, value)
            assert await rd32(c, Reg.LIVENESS) == ~value & 0xFFFF_FFFF
        # an access under 4 bytes reads 0 and its write is ignored, as QEMU's memory core
        # treats it before edu.c (devices/edu.py); 8 bytes below 0x80 reach edu.c: all ones
        assert await c.region_read(BAR0, Reg.LIVENESS, 2) == b"\x00\x00"
        assert await c.region_read(BAR0, Reg.ID, 8) == b"\xff" * 8
        await c.region_write(BAR0, Reg.LIVENESS, b"\x00\x00")
        assert await rd32(c, Reg.LIVENESS) == ~0x8000_0000 & 0xFFFF_FFFF


@pytest.mark.parametrize(
    ("n", "expected"),
    [(0, 1), (1, 1), (5, 120), (10, 3628800), (12, 479001600), (13, 1932053504), (34, 0)],
)
async def test_factorial(server: Server, n: int, expected: int) -> None:
    async with open_client(server) as c:
        await wr32(c, Reg.FACTORIAL, n)
        assert await rd32(c, Reg.STATUS) & StatusBit.COMPUTING == 0
        assert await rd32(c, Reg.FACTORIAL) == expected
        assert await rd32(c, Reg.IRQ_STATUS) == 0  # no interrupt unless asked for


async def test_factorial_with_the_status_irq_bit(server: Server) -> None:
    async with open_client(server) as c:
        with make_eventfd() as intx:
            await c.set_irq_eventfds(INTX, 0, [intx])
            await wr32(c, Reg.STATUS, StatusBit.IRQFACT)
            assert await rd32(c, Reg.STATUS) == StatusBit.IRQFACT
            await wr32(c, Reg.FACTORIAL, 6)
            assert await wait_eventfd(intx, timeout=5) == 1
            assert await rd32(c, Reg.FACTORIAL) == 720
            assert await rd32(c, Reg.IRQ_STATUS) == IrqBit.FACTORIAL
            assert await cfg_read(c, PCI_STATUS, 2) & STATUS_INTERRUPT
            await wr32(c, Reg.IRQ_ACK, IrqBit.FACTORIAL)
            assert await rd32(c, Reg.IRQ_STATUS) == 0
            assert not await cfg_read(c, PCI_STATUS, 2) & STATUS_INTERRUPT
            await c.set_irqs(INTX, UNMASK, 0, 1)
            assert read_eventfd_nowait(intx) == 0  # lowered: the EOI brings nothing new
            # clearing the bit stops the interrupts
            await wr32(c, Reg.STATUS, 0)
            await wr32(c, Reg.FACTORIAL, 7)
            assert await rd32(c, Reg.FACTORIAL) == 5040
            assert read_eventfd_nowait(intx) == 0


# ------------------------------------------------------------------ interrupts


async def test_raise_and_ack_with_intx(server: Server) -> None:
    async with open_client(server) as c:
        with make_eventfd() as intx:
            await c.set_irq_eventfds(INTX, 0, [intx])
            await wr32(c, Reg.IRQ_RAISE, 0x5)
            assert await wait_eventfd(intx, timeout=5) == 1
            assert await rd32(c, Reg.IRQ_STATUS) == 0x5
            await wr32(c, Reg.IRQ_ACK, 0x4)  # one source left: the line stays up
            assert await rd32(c, Reg.IRQ_STATUS) == 0x1
            await c.set_irqs(INTX, UNMASK, 0, 1)
            assert read_eventfd_nowait(intx) == 1
            await wr32(c, Reg.IRQ_ACK, 0x1)
            assert await rd32(c, Reg.IRQ_STATUS) == 0
            await c.set_irqs(INTX, UNMASK, 0, 1)
            assert read_eventfd_nowait(intx) == 0
            await wr32(c, Reg.IRQ_RAISE, 0x100)
            assert read_eventfd_nowait(intx) == 1


async def test_raise_and_ack_with_msi(server: Server) -> None:
    async with open_client(server) as c:
        with make_eventfd() as intx, make_eventfd() as msi:
            await c.set_irq_eventfds(INTX, 0, [intx])
            await enable_msi(c)
            await c.set_irq_eventfds(MSI, 0, [msi])
            # MSI is a memory write: nothing while Bus Master is off
            await wr32(c, Reg.IRQ_RAISE, 0x1)
            assert read_eventfd_nowait(msi) == 0
            await wr32(c, Reg.IRQ_ACK, 0x1)
            await bus_master(c)
            await wr32(c, Reg.IRQ_RAISE, 0x1)
            assert await wait_eventfd(msi, timeout=5) == 1
            assert await rd32(c, Reg.IRQ_STATUS) == 0x1
            await wr32(c, Reg.IRQ_RAISE, 0x2)  # every raise is a new message (an edge)
            assert await wait_eventfd(msi, timeout=5) == 1
            await wr32(c, Reg.IRQ_ACK, 0x3)
            assert await rd32(c, Reg.IRQ_STATUS) == 0
            assert read_eventfd_nowait(msi) == 0
            assert read_eventfd_nowait(intx) == 0  # INTx never fired while MSI was on
            assert not await cfg_read(c, PCI_STATUS, 2) & STATUS_INTERRUPT


# ------------------------------------------------------------------ DMA


@MODES
async def test_dma_both_directions_with_completion_interrupt(server: Server, shared: bool) -> None:
    async with open_client(server) as c:
        await c.memory.add_ram(RAM, 0x4000, shared=shared)
        await bus_master(c)
        with make_eventfd() as intx:
            await c.set_irq_eventfds(INTX, 0, [intx])
            data = bytes(range(256)) * 4

            # RAM -> edu buffer
            c.memory.write(RAM + 0x100, data)
            await wr64(c, Reg.DMA_SRC, RAM + 0x100)
            await wr64(c, Reg.DMA_DST, DMA_START + 0x80)
            await wr64(c, Reg.DMA_CNT, len(data))
            await wr64(c, Reg.DMA_CMD, DmaCmd.RUN | DmaCmd.IRQ)
            assert await wait_eventfd(intx, timeout=5) == 1
            assert await rd32(c, Reg.IRQ_STATUS) == IrqBit.DMA
            assert await rd64(c, Reg.DMA_CMD) & DmaCmd.RUN == 0
            await wr32(c, Reg.IRQ_ACK, IrqBit.DMA)
            await c.set_irqs(INTX, UNMASK, 0, 1)

            # edu buffer -> RAM, elsewhere
            await wr64(c, Reg.DMA_SRC, DMA_START + 0x80)
            await wr64(c, Reg.DMA_DST, RAM + 0x2000)
            await wr64(c, Reg.DMA_CMD, DmaCmd.RUN | DmaCmd.TO_RAM | DmaCmd.IRQ)
            assert await wait_eventfd(intx, timeout=5) == 1
            assert await rd32(c, Reg.IRQ_STATUS) == IrqBit.DMA
            assert c.memory.read(RAM + 0x2000, len(data)) == data
            assert c.memory.read(RAM + 0x2000 + len(data), 16) == bytes(16)
            await wr32(c, Reg.IRQ_ACK, IrqBit.DMA)

        if shared:
            assert (c.memory.dma_reads, c.memory.dma_writes) == (0, 0)
        else:
            assert (c.memory.dma_reads, c.memory.dma_writes) == (1, 1)


@MODES
async def test_dma_with_msi_completion(server: Server, shared: bool) -> None:
    async with open_client(server) as c:
        await c.memory.add_ram(RAM, 0x1000, shared=shared)
        await bus_master(c)
        await enable_msi(c)
        with make_eventfd() as msi:
            await c.set_irq_eventfds(MSI, 0, [msi])
            c.memory.write(RAM, b"edu-dma-msi!" * 10)
            await wr64(c, Reg.DMA_SRC, RAM)
            await wr64(c, Reg.DMA_DST, DMA_START)
            await wr64(c, Reg.DMA_CNT, 120)
            await wr64(c, Reg.DMA_CMD, DmaCmd.RUN | DmaCmd.IRQ)
            assert await wait_eventfd(msi, timeout=5) == 1
            await wr32(c, Reg.IRQ_ACK, IrqBit.DMA)
            c.memory.write(RAM, bytes(120))
            await wr64(c, Reg.DMA_SRC, DMA_START)
            await wr64(c, Reg.DMA_DST, RAM + 0x800)
            await wr64(c, Reg.DMA_CMD, DmaCmd.RUN | DmaCmd.TO_RAM | DmaCmd.IRQ)
            assert await wait_eventfd(msi, timeout=5) == 1
            assert c.memory.read(RAM + 0x800, 120) == b"edu-dma-msi!" * 10


async def test_dma_to_unmapped_memory_completes_without_moving_data(server: Server) -> None:
    async with open_client(server) as c:
        await c.memory.add_ram(RAM, 0x1000, shared=True)
        await bus_master(c)
        with make_eventfd() as intx:
            await c.set_irq_eventfds(INTX, 0, [intx])
            await wr64(c, Reg.DMA_SRC, DMA_START)
            await wr64(c, Reg.DMA_DST, 0x800000)  # nothing mapped there
            await wr64(c, Reg.DMA_CNT, 64)
            await wr64(c, Reg.DMA_CMD, DmaCmd.RUN | DmaCmd.TO_RAM | DmaCmd.IRQ)
            assert await wait_eventfd(intx, timeout=5) == 1  # edu.c completes anyway
            assert await rd64(c, Reg.DMA_CMD) & DmaCmd.RUN == 0
            assert not c.closed
            assert await rd32(c, Reg.ID) == IDENTIFICATION


async def test_reset_returns_registers_to_power_on(server: Server) -> None:
    async with open_client(server) as c:
        await wr32(c, Reg.LIVENESS, 0x1234)
        await wr32(c, Reg.STATUS, StatusBit.IRQFACT)
        await wr64(c, Reg.DMA_SRC, 0x5000)
        await bus_master(c)
        await c.device_reset()
        assert await rd32(c, Reg.LIVENESS) == 0  # edu.c keeps the inverted value; 0 at power-on
        assert await rd32(c, Reg.STATUS) == 0
        assert await rd64(c, Reg.DMA_SRC) == 0
        assert await cfg_read(c, PCI_COMMAND, 2) == 0
        assert await rd32(c, Reg.ID) == IDENTIFICATION

"""The edu model against QEMU's hw/misc/edu.c behaviour."""

from __future__ import annotations

import logging

import pytest
import trio.testing

from devices.edu import (
    BAR_SIZE,
    DMA_SIZE,
    DMA_START,
    DmaCmd,
    Edu,
    IrqBit,
    Reg,
    StatusBit,
    factorial32,
)
from devices.sdk import CapId, Command, IrqIndex, MsiCap, Status
from devices.sdk.interface import RegionIndex

from .fakes import FakeContext
from .helpers import cfg_read, cfg_write, walk_caps


def rd(dev: Edu, offset: int, size: int = 4) -> int:
    return int.from_bytes(dev.region_read(0, offset, size), "little")


def wr(dev: Edu, offset: int, value: int, size: int = 4) -> None:
    dev.region_write(0, offset, value.to_bytes(size, "little"))


@pytest.fixture
def edu(ctx: FakeContext) -> Edu:
    dev = Edu()
    dev.attach(ctx)
    cfg_write(dev, 0x04, 2, Command.MEMORY | Command.MASTER)
    return dev


def enable_msi(dev: Edu) -> None:
    assert dev.msi is not None
    cfg_write(dev, dev.msi.offset + 2, 2, MsiCap.CTRL_ENABLE)


# ------------------------------------------------------------------ PCI identity


def test_config_space_matches_qemu_edu() -> None:
    dev = Edu()
    assert cfg_read(dev, 0x00, 4) == 0x11E8_1234
    assert cfg_read(dev, 0x08, 1) == 0x10
    assert cfg_read(dev, 0x09, 3) == 0x00FF00  # PCI_CLASS_OTHERS
    assert cfg_read(dev, 0x2C, 4) == 0x1100_1AF4
    assert cfg_read(dev, 0x3D, 1) == 1
    assert cfg_read(dev, 0x06, 2) == Status.CAP_LIST
    assert dev.config.size == 256
    # msi_init(pdev, 0, 1, true, false): at 0x40, 64-bit, 1 vector, no masking.
    assert walk_caps(dev) == [(0x40, CapId.MSI)]
    assert cfg_read(dev, 0x42, 2) == MsiCap.CTRL_64BIT
    # BAR0: 1 MiB, 32-bit, non-prefetchable memory.
    cfg_write(dev, 0x10, 4, 0xFFFF_FFFF)
    assert cfg_read(dev, 0x10, 4) == 0xFFF0_0000


def test_command_register_keeps_what_qemu_edu_keeps() -> None:
    """QEMU's pci_init_wmask: a guest setting I/O Space reads back 0x0107, as with -device edu."""
    dev = Edu()
    cfg_write(dev, 0x04, 2, Command.IO | Command.MEMORY | Command.MASTER | Command.SERR)
    assert cfg_read(dev, 0x04, 2) == 0x0107
    cfg_write(dev, 0x04, 2, 0xFFFF)
    assert cfg_read(dev, 0x04, 2) == 0x0507


def test_regions_and_irqs() -> None:
    dev = Edu()
    regions = {r.index: r for r in dev.regions()}
    assert regions[0].size == BAR_SIZE and not regions[0].mmappable
    assert all(regions[i].size == 0 for i in (1, 2, 3, 4, 5, RegionIndex.ROM))
    counts = {i.index: i.count for i in dev.irqs()}
    assert counts == {IrqIndex.INTX: 1, IrqIndex.MSI: 1, IrqIndex.MSIX: 0,
                      IrqIndex.ERR: 1, IrqIndex.REQ: 1}


# ------------------------------------------------------------------ simple registers


async def test_identification_and_liveness(edu: Edu) -> None:
    assert rd(edu, Reg.ID) == 0x010000ED
    wr(edu, Reg.ID, 0)
    assert rd(edu, Reg.ID) == 0x010000ED
    assert rd(edu, Reg.LIVENESS) == 0
    wr(edu, Reg.LIVENESS, 0x12345678)
    assert rd(edu, Reg.LIVENESS) == 0xEDCBA987


@pytest.mark.parametrize(("n", "expected"), [(0, 1), (1, 1), (5, 120), (12, 479001600),
                                             (13, 6227020800 & 0xFFFFFFFF), (33, 0x80000000),
                                             (34, 0), (0xFFFFFFFF, 0)])
async def test_factorial(edu: Edu, n: int, expected: int) -> None:
    wr(edu, Reg.FACTORIAL, n)
    assert not rd(edu, Reg.STATUS) & StatusBit.COMPUTING
    assert rd(edu, Reg.FACTORIAL) == expected


def test_factorial32_matches_uint32_loop() -> None:
    for n in range(40):
        ret = 1
        val = n
        while val > 0:
            ret = (ret * val) & 0xFFFFFFFF
            val -= 1
        assert factorial32(n) == ret


async def test_factorial_irq_on_completion(edu: Edu, ctx: FakeContext) -> None:
    wr(edu, Reg.FACTORIAL, 4)
    assert ctx.irq.intx_history == []  # 0x80 not set: no interrupt
    wr(edu, Reg.STATUS, 0xFF)  # only IRQFACT is writable
    assert rd(edu, Reg.STATUS) == StatusBit.IRQFACT
    wr(edu, Reg.FACTORIAL, 12)
    assert rd(edu, Reg.FACTORIAL) == 479001600
    assert rd(edu, Reg.IRQ_STATUS) == IrqBit.FACTORIAL
    assert ctx.irq.intx_history == [True]
    wr(edu, Reg.STATUS, 0)
    assert rd(edu, Reg.STATUS) == 0


# ------------------------------------------------------------------ interrupts


async def test_raise_and_ack_with_intx(edu: Edu, ctx: FakeContext) -> None:
    wr(edu, Reg.IRQ_RAISE, 0x30)
    assert rd(edu, Reg.IRQ_STATUS) == 0x30
    assert ctx.irq.intx_history == [True]
    assert cfg_read(edu, 0x06, 2) & Status.INTERRUPT
    wr(edu, Reg.IRQ_ACK, 0x10)
    assert rd(edu, Reg.IRQ_STATUS) == 0x20
    assert ctx.irq.intx_history == [True]  # still asserted while status != 0
    wr(edu, Reg.IRQ_ACK, 0x20)
    assert ctx.irq.intx_history == [True, False]
    assert ctx.irq.triggers == []
    wr(edu, Reg.IRQ_STATUS, 0x5)  # RO
    assert rd(edu, Reg.IRQ_STATUS) == 0


async def test_raise_and_ack_with_msi(edu: Edu, ctx: FakeContext) -> None:
    enable_msi(edu)
    wr(edu, Reg.IRQ_RAISE, 0x1)
    wr(edu, Reg.IRQ_RAISE, 0x2)
    assert ctx.irq.triggers == [(IrqIndex.MSI, 0), (IrqIndex.MSI, 0)]
    assert ctx.irq.intx_history == []
    wr(edu, Reg.IRQ_ACK, 0x3)
    assert rd(edu, Reg.IRQ_STATUS) == 0
    assert len(ctx.irq.triggers) == 2


async def test_intx_disable_honoured(edu: Edu, ctx: FakeContext) -> None:
    cfg_write(edu, 0x04, 2, Command.MEMORY | Command.MASTER | Command.INTX_DISABLE)
    wr(edu, Reg.IRQ_RAISE, 1)
    assert ctx.irq.intx_history == []
    assert cfg_read(edu, 0x06, 2) & Status.INTERRUPT


# ------------------------------------------------------------------ DMA


async def test_dma_ram_to_device_and_back(edu: Edu, ctx: FakeContext) -> None:
    payload = bytes(range(100))
    ctx.dma.ram[0x2000:0x2064] = payload
    wr(edu, Reg.DMA_SRC, 0x2000, 8)
    wr(edu, Reg.DMA_DST, DMA_START, 8)
    wr(edu, Reg.DMA_CNT, 100, 8)
    wr(edu, Reg.DMA_CMD, DmaCmd.RUN, 8)
    assert ctx.task_names == ["edu-dma"]
    await trio.testing.wait_all_tasks_blocked()
    assert not rd(edu, Reg.DMA_CMD, 8) & DmaCmd.RUN
    assert bytes(edu.dma_buf[:100]) == payload
    assert ctx.irq.intx_history == []  # no IRQ bit: no interrupt

    wr(edu, Reg.DMA_SRC, DMA_START, 8)
    wr(edu, Reg.DMA_DST, 0x2000 + 100, 8)
    wr(edu, Reg.DMA_CMD, DmaCmd.RUN | DmaCmd.TO_RAM | DmaCmd.IRQ, 8)
    await trio.testing.wait_all_tasks_blocked()
    assert ctx.dma.ram[0x2064:0x20C8] == payload
    assert rd(edu, Reg.DMA_CMD, 8) == DmaCmd.TO_RAM | DmaCmd.IRQ
    assert rd(edu, Reg.IRQ_STATUS) == IrqBit.DMA
    assert ctx.irq.intx_history == [True]


async def test_dma_completion_with_msi(edu: Edu, ctx: FakeContext) -> None:
    enable_msi(edu)
    wr(edu, Reg.DMA_SRC, 0x10, 8)
    wr(edu, Reg.DMA_DST, DMA_START + DMA_SIZE - 8, 8)
    wr(edu, Reg.DMA_CNT, 8, 8)
    wr(edu, Reg.DMA_CMD, DmaCmd.RUN | DmaCmd.IRQ, 8)
    await trio.testing.wait_all_tasks_blocked()
    assert ctx.irq.triggers == [(IrqIndex.MSI, 0)]
    assert ctx.dma.reads == [(0x10, 8)]


async def test_dma_registers_frozen_while_running(edu: Edu, ctx: FakeContext) -> None:
    wr(edu, Reg.DMA_SRC, 0x100, 8)
    wr(edu, Reg.DMA_DST, DMA_START, 8)
    wr(edu, Reg.DMA_CNT, 16, 8)
    wr(edu, Reg.DMA_CMD, DmaCmd.RUN, 8)
    wr(edu, Reg.DMA_SRC, 0x999, 8)  # ignored: running
    wr(edu, Reg.DMA_CMD, DmaCmd.RUN | DmaCmd.TO_RAM, 8)  # ignored: running
    assert rd(edu, Reg.DMA_SRC, 8) == 0x100
    await trio.testing.wait_all_tasks_blocked()
    assert ctx.task_names == ["edu-dma"]
    assert rd(edu, Reg.DMA_CMD, 8) == 0


async def test_dma_command_without_start_bit_ignored(edu: Edu, ctx: FakeContext) -> None:
    wr(edu, Reg.DMA_CMD, DmaCmd.TO_RAM | DmaCmd.IRQ, 8)
    assert rd(edu, Reg.DMA_CMD, 8) == 0
    assert ctx.task_names == []


@pytest.mark.parametrize(
    ("src", "dst", "count", "cmd"),
    [
        (0x1000, DMA_START, DMA_SIZE + 1, DmaCmd.RUN),  # too long
        (0x1000, DMA_START - 4, 8, DmaCmd.RUN),  # starts before the buffer
        (0x1000, DMA_START + DMA_SIZE, 1, DmaCmd.RUN),  # starts past it
        (DMA_START + 4000, 0x1000, 200, DmaCmd.RUN | DmaCmd.TO_RAM),  # runs off the end
        (0xFFFF_FFFF_FFFF_FFF0, 0x1000, 0x20, DmaCmd.RUN | DmaCmd.TO_RAM),  # wraps
    ],
)
async def test_dma_out_of_buffer_ignored_and_logged(
    edu: Edu, ctx: FakeContext, caplog: pytest.LogCaptureFixture,
    src: int, dst: int, count: int, cmd: int,
) -> None:
    wr(edu, Reg.DMA_SRC, src, 8)
    wr(edu, Reg.DMA_DST, dst, 8)
    wr(edu, Reg.DMA_CNT, count, 8)
    with caplog.at_level(logging.WARNING, logger="devices.edu"):
        wr(edu, Reg.DMA_CMD, cmd | DmaCmd.IRQ, 8)
    assert "outside the buffer" in caplog.text
    assert rd(edu, Reg.DMA_CMD, 8) == 0
    assert ctx.task_names == []
    assert rd(edu, Reg.IRQ_STATUS) == 0


async def test_dma_to_unmapped_ram_completes_without_data(
    edu: Edu, ctx: FakeContext
) -> None:
    edu.dma_buf[:4] = b"keep"
    wr(edu, Reg.DMA_SRC, 0x0FFF_FFF0, 8)  # inside dma_mask, outside the 1 MiB fake RAM
    wr(edu, Reg.DMA_DST, DMA_START, 8)
    wr(edu, Reg.DMA_CNT, 4, 8)
    wr(edu, Reg.DMA_CMD, DmaCmd.RUN | DmaCmd.IRQ, 8)
    await trio.testing.wait_all_tasks_blocked()
    assert rd(edu, Reg.DMA_CMD, 8) == DmaCmd.IRQ
    assert bytes(edu.dma_buf[:4]) == b"keep"
    assert rd(edu, Reg.IRQ_STATUS) == IrqBit.DMA  # as in edu.c, the command completes


async def test_dma_address_clamped_to_dma_mask(ctx: FakeContext) -> None:
    dev = Edu(dma_mask=0xFFFF)
    dev.attach(ctx)
    cfg_write(dev, 0x04, 2, Command.MEMORY | Command.MASTER)
    ctx.dma.ram[0x1234:0x1238] = b"abcd"
    wr(dev, Reg.DMA_SRC, 0x7_0000_1234, 8)
    wr(dev, Reg.DMA_DST, DMA_START, 8)
    wr(dev, Reg.DMA_CNT, 4, 8)
    wr(dev, Reg.DMA_CMD, DmaCmd.RUN, 8)
    await trio.testing.wait_all_tasks_blocked()
    assert ctx.dma.reads == [(0x1234, 4)]
    assert bytes(dev.dma_buf[:4]) == b"abcd"


async def test_dma_without_bus_master_moves_nothing(edu: Edu, ctx: FakeContext) -> None:
    cfg_write(edu, 0x04, 2, Command.MEMORY)
    ctx.dma.ram[0:4] = b"data"
    wr(edu, Reg.DMA_DST, DMA_START, 8)
    wr(edu, Reg.DMA_CNT, 4, 8)
    wr(edu, Reg.DMA_CMD, DmaCmd.RUN, 8)
    await trio.testing.wait_all_tasks_blocked()
    assert ctx.dma.reads == []
    assert rd(edu, Reg.DMA_CMD, 8) == 0


def test_dma_without_client_ignored() -> None:
    dev = Edu()
    wr(dev, Reg.DMA_DST, DMA_START, 8)
    wr(dev, Reg.DMA_CMD, DmaCmd.RUN, 8)
    assert rd(dev, Reg.DMA_CMD, 8) == 0


# ------------------------------------------------------------------ access sizes


# What a guest reads through QEMU's built-in edu: the memory core rejects accesses under 4 or
# over 8 bytes and unaligned ones before edu.c sees them (reads 0, writes dropped); edu.c then
# answers the sizes it does not take (8 bytes below 0x80) and offsets without a register with
# all ones. The values are the ones qemu-configs/guest/edu-test.sh (step sizes) reads from
# QEMU 11.1's -device edu.


@pytest.mark.parametrize("size", [1, 2])
@pytest.mark.parametrize("offset", [Reg.ID, Reg.LIVENESS, Reg.FACTORIAL, Reg.STATUS,
                                    Reg.IRQ_STATUS, Reg.DMA_SRC, Reg.DMA_CMD, 0x0C, 0xA0,
                                    DMA_START])
async def test_reads_under_4_bytes_read_zero(edu: Edu, offset: int, size: int) -> None:
    wr(edu, Reg.LIVENESS, 0)  # liveness reads all ones, so a 0 is not the register
    assert edu.region_read(0, offset, size) == bytes(size)
    assert edu.region_read(0, offset + 1, size) == bytes(size)


@pytest.mark.parametrize("size", [3, 5, 16])
async def test_sizes_no_memory_op_has_read_zero_and_are_ignored(edu: Edu, size: int) -> None:
    wr(edu, Reg.DMA_SRC, 0x1234, 8)
    assert edu.region_read(0, Reg.DMA_SRC, size) == bytes(size)
    edu.region_write(0, Reg.DMA_SRC, b"\x01" * size)
    assert rd(edu, Reg.DMA_SRC, 8) == 0x1234


@pytest.mark.parametrize("offset", [Reg.ID, Reg.LIVENESS, Reg.FACTORIAL, Reg.STATUS])
async def test_8_byte_reads_below_0x80(edu: Edu, offset: int) -> None:
    # aligned: the memory core lets it through and edu.c answers all ones; unaligned: 0
    want = b"\xff" * 8 if offset % 8 == 0 else bytes(8)
    assert edu.region_read(0, offset, 8) == want


@pytest.mark.parametrize("offset", [Reg.ID + 1, Reg.ID + 2, Reg.LIVENESS + 2, Reg.DMA_SRC + 2,
                                    Reg.DMA_SRC + 4 + 2])
async def test_unaligned_4_byte_reads_read_zero(edu: Edu, offset: int) -> None:
    assert rd(edu, offset) == 0


async def test_unaligned_8_byte_access_at_a_register(edu: Edu) -> None:
    wr(edu, Reg.DMA_DST, 0x99, 8)
    assert edu.region_read(0, Reg.DMA_DST + 4, 8) == bytes(8)
    edu.region_write(0, Reg.DMA_SRC + 4, (0x77).to_bytes(8, "little"))
    assert rd(edu, Reg.DMA_DST, 8) == 0x99


@pytest.mark.parametrize("size", [1, 2, 8])
async def test_low_registers_ignore_writes_not_4_bytes(edu: Edu, size: int) -> None:
    edu.region_write(0, Reg.LIVENESS, b"\x01" * size)
    assert rd(edu, Reg.LIVENESS) == 0
    edu.region_write(0, Reg.ID, b"\x01" * size)  # 8 bytes at 0x00 would span liveness
    assert rd(edu, Reg.LIVENESS) == 0
    edu.region_write(0, Reg.STATUS, b"\x80" * size)
    assert rd(edu, Reg.STATUS) == 0
    edu.region_write(0, Reg.IRQ_RAISE, b"\x01" * size)
    assert rd(edu, Reg.IRQ_STATUS) == 0
    edu.region_write(0, Reg.FACTORIAL, b"\x05" * size)
    assert rd(edu, Reg.FACTORIAL) == 0


@pytest.mark.parametrize("size", [1, 2])
async def test_dma_registers_ignore_writes_under_4_bytes(edu: Edu, size: int) -> None:
    edu.region_write(0, Reg.DMA_SRC, b"\x01" * size)
    assert rd(edu, Reg.DMA_SRC, 8) == 0


async def test_8_byte_access_to_dma_registers(edu: Edu) -> None:
    wr(edu, Reg.DMA_SRC, 0x1122_3344_5566_7788, 8)
    wr(edu, Reg.DMA_CNT, 0xFEDC_BA98_7654_3210, 8)
    assert rd(edu, Reg.DMA_SRC, 8) == 0x1122_3344_5566_7788
    assert rd(edu, Reg.DMA_CNT, 8) == 0xFEDC_BA98_7654_3210
    assert rd(edu, 0xA0, 8) == 0xFFFF_FFFF_FFFF_FFFF  # no register


async def test_4_byte_access_to_dma_registers(edu: Edu) -> None:
    wr(edu, Reg.DMA_SRC, 0x1122_3344_5566_7788, 8)
    assert rd(edu, Reg.DMA_SRC, 4) == 0x5566_7788
    assert rd(edu, Reg.DMA_SRC + 4, 4) == 0xFFFF_FFFF  # no register at 0x84
    wr(edu, Reg.DMA_SRC + 4, 0xAAAA, 4)  # ignored
    wr(edu, Reg.DMA_SRC, 0x99, 4)  # replaces the whole 64-bit value, as edu.c does
    assert rd(edu, Reg.DMA_SRC, 8) == 0x99


@pytest.mark.parametrize("offset", [0x0C, 0x28, 0x68, 0xA0, DMA_START, BAR_SIZE - 4])
async def test_unknown_offsets_read_all_ones(edu: Edu, offset: int) -> None:
    assert rd(edu, offset) == 0xFFFF_FFFF
    wr(edu, offset, 0)  # ignored, must not crash


# ------------------------------------------------------------------ reset


async def test_reset_mid_state(edu: Edu, ctx: FakeContext) -> None:
    enable_msi(edu)
    wr(edu, Reg.LIVENESS, 0)
    wr(edu, Reg.STATUS, StatusBit.IRQFACT)
    wr(edu, Reg.FACTORIAL, 5)
    wr(edu, Reg.DMA_SRC, 0x100, 8)
    wr(edu, Reg.DMA_DST, DMA_START, 8)
    wr(edu, Reg.DMA_CNT, 8, 8)
    edu.dma_buf[:4] = b"junk"
    edu.reset()
    assert rd(edu, Reg.LIVENESS) == 0
    assert rd(edu, Reg.FACTORIAL) == 0
    assert rd(edu, Reg.STATUS) == 0
    assert rd(edu, Reg.IRQ_STATUS) == 0
    assert rd(edu, Reg.DMA_SRC, 8) == rd(edu, Reg.DMA_CNT, 8) == 0
    assert bytes(edu.dma_buf[:4]) == bytes(4)
    assert not edu.msi_enabled() and not edu.bus_master_enabled()
    assert rd(edu, Reg.ID) == 0x010000ED


async def test_reset_with_intx_asserted_lowers_it(edu: Edu, ctx: FakeContext) -> None:
    wr(edu, Reg.IRQ_RAISE, 1)
    edu.reset()
    assert ctx.irq.intx_history == [True, False]
    assert not cfg_read(edu, 0x06, 2) & Status.INTERRUPT


async def test_cancelled_dma_clears_start_bit() -> None:
    dev = Edu()
    async with trio.open_nursery() as nursery:
        ctx = FakeContext(nursery)
        dev.attach(ctx)
        cfg_write(dev, 0x04, 2, Command.MEMORY | Command.MASTER)
        wr(dev, Reg.DMA_DST, DMA_START, 8)
        wr(dev, Reg.DMA_CNT, 4, 8)
        wr(dev, Reg.DMA_CMD, DmaCmd.RUN | DmaCmd.IRQ, 8)
        assert rd(dev, Reg.DMA_CMD, 8) & DmaCmd.RUN
        nursery.cancel_scope.cancel()  # what the engine does on reset/disconnect/unmap
    assert not rd(dev, Reg.DMA_CMD, 8) & DmaCmd.RUN
    assert ctx.dma.reads == []
    assert rd(dev, Reg.IRQ_STATUS) == 0
    assert ctx.irq.intx_history == []

"""edu's device state: every register and the DMA buffer survive a save and load; a DMA
in flight finishes at quiesce, or is carried and runs after the load."""

from __future__ import annotations

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.edu import DMA_START, DmaCmd, Edu, IrqBit, Reg, StatusBit
from devices.sdk import Command, StateError
from devices.sdk.state import Value

from .fakes import FakeContext, FakeDma
from .helpers import cfg_write
from .state_helpers import check_refused, config_reads, field

EDU_READS = [(0, off, 4) for off in range(0, 0x80, 4)] + [
    (0, off, size) for off in range(0x80, 0xA0, 8) for size in (4, 8)]
WRITABLE = [Reg.LIVENESS, Reg.FACTORIAL, Reg.STATUS, Reg.IRQ_RAISE, Reg.IRQ_ACK,
            Reg.DMA_SRC, Reg.DMA_DST, Reg.DMA_CNT]


def rd(dev: Edu, offset: int, size: int = 4) -> int:
    return int.from_bytes(dev.region_read(0, offset, size), "little")


def wr(dev: Edu, offset: int, value: int, size: int = 4) -> None:
    dev.region_write(0, offset, value.to_bytes(size, "little"))


def all_reads(dev: Edu) -> tuple[list[bytes], list[bytes]]:
    return config_reads(dev), [dev.region_read(r, o, n) for r, o, n in EDU_READS]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(WRITABLE), st.integers(0, (1 << 32) - 1)),
                max_size=20),
       st.binary(min_size=1, max_size=64), st.integers(0, 0xFFFF))
def test_a_loaded_edu_answers_every_read_as_the_original(
        writes: list[tuple[int, int]], buffer: bytes, command: int) -> None:
    src = Edu()
    cfg_write(src, 4, 2, command & 0x7FF)
    for offset, value in writes:
        wr(src, offset, value, 8 if offset >= 0x80 else 4)
    src.dma_buf[: len(buffer)] = buffer
    dst = Edu()
    dst.load_state(src.save_state())
    assert all_reads(dst) == all_reads(src)
    assert dst.dma_buf == src.dma_buf and dst.intx_asserted() == src.intx_asserted()


def test_broken_states_are_refused_and_leave_edu_untouched() -> None:
    dev, other = Edu(), Edu()
    wr(other, Reg.LIVENESS, 5)
    wr(dev, Reg.FACTORIAL, 6)

    def bad_status(p: dict[str, Value]) -> None:
        field(p, "fields")["status"] = -1

    def short_buffer(p: dict[str, Value]) -> None:
        field(p, "fields")["dma_buf"] = b"\0" * 10

    check_refused(dev, other.save_state(), EDU_READS, [
        ("status", bad_status, "field fields.status: -1 is not a 32-bit"),
        ("buffer", short_buffer, "field fields.dma_buf: 10 bytes, expected 4096"),
    ])
    with pytest.raises(StateError, match=r"field fields.dma_mask"):
        dev.load_state(Edu(dma_mask=0xFFFF).save_state())


class GatedDma(FakeDma):
    """DMA reads wait for `gate`: a transfer that is in flight as long as the test wants."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = trio.Event()

    async def read(self, address: int, size: int) -> bytes:
        await self.gate.wait()
        return await super().read(address, size)


def gated(ctx: FakeContext) -> GatedDma:
    dma = GatedDma()
    ctx._dma = dma
    return dma


def start_dma(dev: Edu, src: int, count: int, irq: bool = True) -> None:
    cfg_write(dev, 4, 2, Command.MEMORY | Command.MASTER)
    wr(dev, Reg.DMA_SRC, src, 8)
    wr(dev, Reg.DMA_DST, DMA_START, 8)
    wr(dev, Reg.DMA_CNT, count, 8)
    wr(dev, Reg.DMA_CMD, DmaCmd.RUN | (DmaCmd.IRQ if irq else 0), 8)


async def test_quiesce_lets_a_running_dma_finish(ctx: FakeContext) -> None:
    dma = gated(ctx)
    dma.ram[0x1000:0x1010] = b"0123456789abcdef"
    dev = Edu()
    dev.attach(ctx)
    start_dma(dev, 0x1000, 16)
    done = trio.Event()

    async def quiesce() -> None:
        await dev.quiesce()
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(quiesce)
        await trio.sleep(0.01)
        assert not done.is_set() and rd(dev, Reg.DMA_CMD, 8) & DmaCmd.RUN
        dma.gate.set()
    assert not rd(dev, Reg.DMA_CMD, 8) & DmaCmd.RUN
    assert rd(dev, Reg.IRQ_STATUS) == IrqBit.DMA
    dst = Edu()
    dst.load_state(dev.save_state())
    assert bytes(dst.dma_buf[:16]) == b"0123456789abcdef"
    assert all_reads(dst) == all_reads(dev)


async def test_a_dma_cancelled_while_quiescing_is_carried_and_runs_after_the_load(
        ctx: FakeContext) -> None:
    src = Edu()
    async with trio.open_nursery() as engine:  # the source's connection
        sctx = FakeContext(engine)
        dma = gated(sctx)
        dma.ram[0x2000:0x2004] = b"WXYZ"
        src.attach(sctx)
        start_dma(src, 0x2000, 4)
        with trio.move_on_after(0.02):  # the engine's grace runs out
            await src.quiesce()
        engine.cancel_scope.cancel()
    assert rd(src, Reg.DMA_CMD, 8) & DmaCmd.RUN, "the command is carried"
    state = src.save_state()
    ctx.dma.ram[0x2000:0x2004] = b"WXYZ"
    dst = Edu()
    dst.attach(ctx)
    cfg_write(dst, 4, 2, Command.MEMORY | Command.MASTER)
    dst.load_state(state)
    with trio.fail_after(2):
        while rd(dst, Reg.DMA_CMD, 8) & DmaCmd.RUN:
            await trio.sleep(0.001)
    assert bytes(dst.dma_buf[:4]) == b"WXYZ"
    assert rd(dst, Reg.IRQ_STATUS) == IrqBit.DMA


async def test_a_dma_started_while_quiesced_waits_for_resume(ctx: FakeContext) -> None:
    ctx.dma.ram[0x3000:0x3002] = b"ok"
    dev = Edu()
    dev.attach(ctx)
    await dev.quiesce()
    start_dma(dev, 0x3000, 2, irq=False)
    await trio.sleep(0.01)
    assert "edu-dma" not in ctx.task_names and rd(dev, Reg.DMA_CMD, 8) & DmaCmd.RUN
    detached = Edu()
    detached.load_state(dev.save_state())  # take-over: loaded before a client is back
    dev.resume()
    with trio.fail_after(2):
        while rd(dev, Reg.DMA_CMD, 8) & DmaCmd.RUN:
            await trio.sleep(0.001)
    assert bytes(dev.dma_buf[:2]) == b"ok"
    detached.attach(ctx)  # and the carried command runs on attach
    with trio.fail_after(2):
        while rd(detached, Reg.DMA_CMD, 8) & DmaCmd.RUN:
            await trio.sleep(0.001)
    assert bytes(detached.dma_buf[:2]) == b"ok"


def test_factorial_status_and_interrupt_survive() -> None:
    src = Edu()
    wr(src, Reg.STATUS, StatusBit.IRQFACT)
    wr(src, Reg.FACTORIAL, 5)
    dst = Edu()
    dst.load_state(src.save_state())
    assert rd(dst, Reg.FACTORIAL) == 120 and rd(dst, Reg.IRQ_STATUS) == IrqBit.FACTORIAL
    assert dst.intx_asserted()

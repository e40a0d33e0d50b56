"""A write's thread posts its own completion and raises its MSI-X vector
(`doorbell_io.DoorbellIo._post_from_thread`), with the engine's `thread_signal`; whatever it
may not post (a full CQ, FUA, a reset under it) the trio thread's hand-back posts as before,
and a route that changed under the thread gets its interrupt again on the trio thread."""

from __future__ import annotations

import threading

import pytest
import trio

from devices.nvme.spec import IoOpcode, Reg
from devices.sdk.interface import IrqIndex

from ..fakes import FakeIrq, ThreadIrqs
from .host import DATA, Host
from .test_handler_writes import GatedWrites
from .test_io import rw

IO = IoOpcode


@pytest.fixture
async def io(host: Host) -> tuple[Host, GatedWrites, ThreadIrqs]:
    irqs = ThreadIrqs()
    host.ctx._irq = irqs  # type: ignore[assignment]
    await host.create_io_queues(cq_size=4)
    ns = host.dev.worker.namespaces[1]
    ns.backend.close()
    ns.backend = be = GatedWrites()
    await trio.testing.wait_all_tasks_blocked()
    return host, be, irqs


def msix_raised(irqs: FakeIrq, vector: int = 1) -> int:
    return irqs.triggers.count((int(IrqIndex.MSIX), vector))


async def test_the_write_thread_posts_and_raises_the_interrupt(
        io: tuple[Host, GatedWrites, ThreadIrqs]) -> None:
    h, be, irqs = io
    w = h.dev.worker
    written = w.smart.write_commands
    h.ram[DATA : DATA + 4096] = b"\x5a" * 4096
    cid = h.submit(1, h.sqe(IO.WRITE, nsid=1, prp1=DATA, cdw=rw(8, 8)))
    await h.until(lambda: be.started == 1)
    assert h.poll(1) is None and not irqs.fired
    be.gate.set()
    c = await h.wait(1)
    assert c.cid == cid and c.code == 0
    # raised from the write's own thread, not by the model on the trio thread
    assert [v for v, _ in irqs.fired] == [1]
    assert irqs.fired[0][1] != threading.get_ident()
    await h.until(lambda: not w._inflight)
    assert msix_raised(irqs) == 0 and irqs.settled == 1
    assert not w.carried and not w.writing and w.smart.write_commands == written + 1
    assert h.dev.ctx is not None and h.ctx.dma.pins == 0  # data and ring let go


async def test_a_route_changed_under_the_thread_is_raised_again(
        io: tuple[Host, GatedWrites, ThreadIrqs]) -> None:
    """SET_IRQS (or a mask) while the thread wrote: its signal may have gone to the old
    eventfd, so the hand-back raises the vector again the usual way."""
    h, be, irqs = io
    irqs.same = False
    be.gate.set()
    c = await h.cmd(1, IO.WRITE, nsid=1, prp1=DATA, cdw=rw(0, 8))
    assert c.code == 0
    await h.until(lambda: not h.dev.worker._inflight)
    assert len(irqs.fired) == 1 and msix_raised(irqs) == 1


async def test_a_full_cq_leaves_the_completion_to_the_hand_back(
        io: tuple[Host, GatedWrites, ThreadIrqs]) -> None:
    """CQ of 4 entries holds 3: three reads fill it, the write's thread finds no room and
    posts nothing; its completion lands once the host frees a slot."""
    h, be, irqs = io
    w = h.dev.worker
    for i in range(3):
        h.submit(1, h.sqe(IO.READ, nsid=1, prp1=DATA + 0x10000, cdw=rw(i, 1)))
    await h.until(lambda: w.cqs[1].full)
    cid = h.submit(1, h.sqe(IO.WRITE, nsid=1, prp1=DATA, cdw=rw(0, 8)))
    await h.until(lambda: be.started == 1)
    be.gate.set()
    await h.until(lambda: w._inflight and not w.writing)  # back, and its task waits for room
    assert not irqs.fired and irqs.settled == 1
    got = [await h.wait(1) for _ in range(4)]
    assert got[-1].cid == cid and got[-1].code == 0
    assert not irqs.fired and msix_raised(irqs) >= 1
    await h.until(lambda: not w._inflight and not w.carried)


async def test_fua_and_write_cache_off_are_not_posted_by_the_thread(
        io: tuple[Host, GatedWrites, ThreadIrqs]) -> None:
    """They complete after a flush, which only the hand-back's task does."""
    h, be, irqs = io
    be.gate.set()
    c = await h.cmd(1, IO.WRITE, nsid=1, prp1=DATA, cdw=rw(0, 8, 1 << 30))
    assert c.code == 0 and be.flushes == 1 and not irqs.fired
    assert irqs.settled == 0  # no ThreadIrq was taken at all


async def test_reset_under_the_thread_posts_nothing_and_lets_go(
        io: tuple[Host, GatedWrites, ThreadIrqs]) -> None:
    h, be, irqs = io
    w = h.dev.worker
    h.submit(1, h.sqe(IO.WRITE, nsid=1, prp1=DATA, cdw=rw(0, 8)))
    await h.until(lambda: be.started == 1)
    h.wr(Reg.CC, (6 << 16) | (4 << 20))
    await trio.sleep(0.05)
    be.gate.set()
    await h.until(lambda: not h.rd(Reg.CSTS) & 1)
    assert h.poll(1) is None and not irqs.fired and irqs.settled == 1
    assert not w._inflight and not w.carried and h.ctx.dma.pins == 0

"""NVMe device state: a controller saved with live queues (at any ring position, with
commands submitted and not fetched, or with a completion still owed) is loaded into a new
controller on the same image, which carries on where the first stopped."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.nvme import Nvme
from devices.nvme.spec import IoOpcode, Reg
from devices.sdk import StateError
from devices.sdk.state import Value

from ..fakes import FakeContext
from ..state_helpers import check_refused, config_reads, field
from .host import DATA, QSIZE, RAM, Host

BAR0_READS = [(0, off, 4) for off in range(0, 0x40, 4)]
BLOCK = 512


def reads(dev: Nvme) -> tuple[object, ...]:
    msix = [(4, off, 16) for off in range(0, dev.vectors * 16, 16)]
    return config_reads(dev), [dev.region_read(r, o, n) for r, o, n in BAR0_READS + msix]


async def write_block(host: Host, lba: int, fill: int) -> None:
    buf = DATA + (lba % 16) * 4096
    host.ram[buf : buf + BLOCK] = bytes([fill]) * BLOCK
    c = await host.cmd(1, IoOpcode.WRITE, nsid=1, prp1=buf, cdw=(lba, 0, 0))
    assert c.code == 0


async def read_block(host: Host, lba: int) -> bytes:
    buf = DATA + 0x80000
    host.ram[buf : buf + BLOCK] = bytes(BLOCK)
    c = await host.cmd(1, IoOpcode.READ, nsid=1, prp1=buf, cdw=(lba, 0, 0))
    assert c.code == 0
    return bytes(host.ram[buf : buf + BLOCK])


@asynccontextmanager
async def source(img: Path, cq_size: int | None = None) -> AsyncIterator[tuple[Nvme, Host]]:
    """A controller on its own 'connection' (a nursery the test cancels like an engine
    would), enabled, with I/O queue pair 1."""
    dev = Nvme(backing=str(img), size="1M")
    async with trio.open_nursery() as engine:
        ctx = FakeContext(engine, ram_size=RAM)
        dev.attach(ctx)
        host = Host(dev, ctx)
        host.enable_pci()
        await host.enable()
        await host.create_io_queues(cq_size=cq_size)
        yield dev, host
        engine.cancel_scope.cancel()
    dev.detach()
    dev.close()


def move(host: Host, state: bytes, img: Path, nursery: trio.Nursery,
         attach_first: bool) -> Nvme:
    """A new controller on the same image and guest RAM, loaded with `state` (before the
    client attaches, as a take-over does, or after, as a migration destination does)."""
    dst = Nvme(backing=str(img), size="1M")
    ctx = FakeContext(nursery, ram_size=RAM)
    ctx._dma = host.ctx._dma
    if attach_first:
        dst.attach(ctx)
        dst.load_state(state)
    else:
        dst.load_state(state)
        dst.attach(ctx)
    host.dev, host.ctx = dst, ctx
    return dst


@settings(max_examples=8, deadline=None)
@given(before=st.integers(0, QSIZE + 10), attach_first=st.booleans())
async def test_restored_controller_continues_the_same_queues(
        tmp_path_factory: pytest.TempPathFactory, before: int, attach_first: bool) -> None:
    img = tmp_path_factory.mktemp("nvme") / "ns.img"
    async with trio.open_nursery() as nursery:
        async with source(img) as (src, host):
            for i in range(before):  # moves the rings' positions (and wraps them)
                await write_block(host, i % 8, i & 0xFF)
            await src.quiesce()
            # Submitted after the quiesce: not fetched, so the state must carry it.
            host.ram[DATA : DATA + BLOCK] = b"\x5a" * BLOCK
            cid = host.submit(1, host.sqe(IoOpcode.WRITE, nsid=1, prp1=DATA, cdw=(9, 0, 0)))
            await trio.sleep(0.01)
            assert host.poll(1) is None
            state = src.save_state()
            expected = reads(src)
        dst = move(host, state, img, nursery, attach_first)
        assert reads(dst) == expected
        done = await host.wait(1)
        assert (done.cid, done.code) == (cid, 0)
        assert await read_block(host, 9) == b"\x5a" * BLOCK
        for i in range(min(before, 8)):
            last = max(j for j in range(before) if j % 8 == i)
            assert await read_block(host, i) == bytes([last & 0xFF]) * BLOCK
        await write_block(host, 3, 0x33)  # and new commands keep working
        assert await read_block(host, 3) == b"\x33" * BLOCK
        nursery.cancel_scope.cancel()
    dst.close()


async def test_quiesce_completes_io_in_flight(tmp_path: Path) -> None:
    async with source(tmp_path / "ns.img") as (src, host):
        host.ram[DATA : DATA + BLOCK] = b"\x11" * BLOCK
        cids = [host.submit(1, host.sqe(IoOpcode.WRITE, nsid=1, prp1=DATA, cdw=(lba, 0, 0)))
                for lba in range(4)]
        sq = src.worker.sqs[1]
        while sq.head != sq.tail:  # fetched; the writes run in worker threads
            await trio.sleep(0)
        assert src.worker._inflight
        await src.quiesce()
        assert not src.worker._inflight and not src.worker.carried
        got = [host.poll(1) for _ in cids]
        assert sorted(c.cid for c in got if c is not None) == cids


async def test_a_completion_owed_when_the_engine_cancels_is_carried(tmp_path: Path,
                                                                   nursery: trio.Nursery
                                                                   ) -> None:
    img = tmp_path / "ns.img"
    async with source(img, cq_size=2) as (src, host):  # a CQ of 2 holds one completion
        host.ram[DATA : DATA + BLOCK] = b"\x22" * BLOCK
        first = host.submit(1, host.sqe(IoOpcode.WRITE, nsid=1, prp1=DATA, cdw=(1, 0, 0)))
        second = host.submit(1, host.sqe(IoOpcode.WRITE, nsid=1, prp1=DATA, cdw=(2, 0, 0)))
        while not src.worker.sqs[1].head == src.worker.sqs[1].tail == 2:
            await trio.sleep(0)
        with trio.move_on_after(0.05):  # the second waits for CQ space: grace runs out
            await src.quiesce()
        assert len(src.worker.carried) == 1
        state = src.save_state()
    move(host, state, img, nursery, attach_first=False)
    # Either write may have won the CQ slot; the other is posted by the new controller.
    assert {(await host.wait(1)).cid, (await host.wait(1)).cid} == {first, second}
    assert await read_block(host, 1) == await read_block(host, 2) == b"\x22" * BLOCK
    host.dev.close()


async def test_broken_states_are_refused_and_leave_the_controller_untouched(
        tmp_path: Path) -> None:
    async with source(tmp_path / "a.img") as (src, _host):
        await src.quiesce()
        state = src.save_state()

    def head(p: dict[str, Value]) -> None:
        field(p, "model", "worker", "sqs", 1)["head"] = QSIZE

    def cqid(p: dict[str, Value]) -> None:
        field(p, "model", "worker", "sqs", 1)["cqid"] = 7

    def page(p: dict[str, Value]) -> None:
        field(p, "model", "worker")["page_size"] = 12345

    def sqe(p: dict[str, Value]) -> None:
        field(p, "model", "worker")["carried"] = [{"sqid": 1, "sqe": b"x", "outcome": None}]

    dev = Nvme(backing=str(tmp_path / "b.img"), size="1M")
    check_refused(dev, state, BAR0_READS, [
        ("SQ head", head, "field model.worker.sqs[1].head: 64 is outside 0..63"),
        ("CQ id", cqid, "field model.worker.sqs[1].cqid: SQ 1 posts to CQ 7"),
        ("page size", page, "field model.worker.page_size: 12345"),
        ("carried", sqe, "field model.worker.carried[0].sqe: 1 bytes, expected 64"),
    ])
    with pytest.raises(StateError, match=r"field model.worker.namespaces"):
        Nvme(size="2M").load_state(state)
    with pytest.raises(StateError, match=r"field pci.layout"):
        Nvme(size="1M", queues=8).load_state(state)
    dev.close()


def test_registers_of_a_disabled_controller_round_trip() -> None:
    src = Nvme(size="1M")
    src.region_write(0, Reg.AQA, (0x001F001F).to_bytes(4, "little"))
    src.region_write(0, Reg.ASQ, (0x12345000).to_bytes(8, "little"))
    src.region_write(0, Reg.INTMS, (1).to_bytes(4, "little"))
    dst = Nvme(size="1M")
    dst.load_state(src.save_state())
    assert reads(dst) == reads(src)
    src.close()
    dst.close()


async def test_a_quiesce_the_engine_gives_up_on_still_flushes(tmp_path: Path) -> None:
    """The engine cancels a quiesce that outlives its grace (message-mode DMA cannot finish
    while the read loop is busy): the namespaces are flushed all the same, so completed
    writes are stable before the state moves to another process."""
    async with source(tmp_path / "ns.img") as (src, _host):
        flushes: list[int] = []
        real = src.worker._flush_all

        async def counting() -> None:
            flushes.append(1)
            await real()

        src.worker._flush_all = counting  # type: ignore[method-assign]
        src.worker._inflight[trio.CancelScope()] = 1  # a command that never finishes
        with trio.move_on_after(0.05):
            await src.quiesce()
        src.worker._inflight.clear()
        src.resume()
        assert flushes == [1]

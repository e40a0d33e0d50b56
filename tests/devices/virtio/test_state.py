"""virtio device state: a virtio-blk saved with live queues is loaded into a new device on
the same image and serves the same rings on; virtio-net carries link, counters and frames
read from the TAP but not yet placed; broken states are refused without a trace."""

from __future__ import annotations

import os
import struct
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio

from devices.sdk import StateError
from devices.sdk.bits import BytesLike
from devices.sdk.state import Value
from devices.virtio import transport as t
from devices.virtio.blk import SECTOR, ReqStatus, ReqType, VirtioBlk
from devices.virtio.net import NetFeature, VirtioNet
from devices.virtio.transport import Feature

from ..fakes import FakeContext
from ..state_helpers import check_refused, config_reads, field, payload_of, repack
from .driver import Driver
from .test_blk import BASIC, DATA, STATUS_BYTE, request

COMMON_READS = [(t.VIRTIO_BAR, off, 4) for off in range(0, 0x38, 4)]
DEVCFG_READS = [(t.VIRTIO_BAR, t.DEVICE_OFFSET + off, 4) for off in range(0, 40, 4)]
MSIX_READS = [(t.MSIX_BAR, off, 16) for off in range(0, 48, 16)]
READS = COMMON_READS + DEVCFG_READS + MSIX_READS


def reads(dev: VirtioBlk | VirtioNet) -> tuple[object, ...]:
    return config_reads(dev), [dev.region_read(r, o, n) for r, o, n in READS]


async def blk_source(img: Path, engine: trio.Nursery, before: int
                     ) -> tuple[VirtioBlk, Driver, FakeContext]:
    dev = VirtioBlk(path=str(img), size=1 << 20)
    ctx = FakeContext(engine)
    dev.attach(ctx)
    drv = Driver(dev, ctx.dma.ram)
    drv.setup(BASIC)
    for i in range(before):  # ring positions move (size 8: wraps)
        head = request(drv, 0, ReqType.OUT, i % 4, data=bytes([i]) * SECTOR)
        assert await drv.wait_used(0) == [(head, 1)]
    return dev, drv, ctx


@pytest.mark.parametrize("attach_first", [False, True])
@pytest.mark.parametrize("before", [0, 3, 8, 13])
async def test_restored_virtio_blk_serves_the_same_rings(tmp_path: Path, nursery: trio.Nursery,
                                                         before: int, attach_first: bool
                                                         ) -> None:
    img = tmp_path / "disk.img"
    async with trio.open_nursery() as engine:
        src, drv, sctx = await blk_source(img, engine, before)
        await src.quiesce()
        payload = os.urandom(2 * SECTOR)
        head = request(drv, 0, ReqType.OUT, 20, data=payload)  # after quiesce: not served
        await trio.sleep(0.01)
        assert drv.rings[0].take_used() == []
        state = src.save_state()
        expected = reads(src)
        engine.cancel_scope.cancel()
    src.detach()
    src.close()
    dst = VirtioBlk(path=str(img), size=1 << 20)
    ctx = FakeContext(nursery)
    ctx._dma = sctx.dma  # the same guest RAM
    if attach_first:
        dst.attach(ctx)
        dst.load_state(state)
    else:
        dst.load_state(state)
        dst.attach(ctx)
    drv.dev = dst
    assert reads(dst) == expected
    assert await drv.wait_used(0) == [(head, 1)]
    assert drv.ram[STATUS_BYTE] == ReqStatus.OK
    drv.ram[DATA : DATA + len(payload)] = bytes(len(payload))
    head = request(drv, 0, ReqType.IN, 20, read_len=len(payload))
    assert await drv.wait_used(0) == [(head, len(payload) + 1)]
    assert bytes(drv.ram[DATA : DATA + len(payload)]) == payload
    await drv.reset()
    dst.close()


async def test_blk_quiesce_finishes_the_batch_and_flushes(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    async with trio.open_nursery() as engine:
        src, drv, _ = await blk_source(img, engine, 0)
        src.wce = 1  # write-back: only a flush makes the data stable
        # The thread waits until the test saw the batch held: otherwise it could finish
        # and complete both before the test looked, which then waited forever.
        release = threading.Event()
        write = src.backend.write

        def gated(offset: int, bufs: Sequence[BytesLike]) -> None:
            release.wait(5)
            write(offset, bufs)

        src.backend.write = gated  # type: ignore[method-assign]
        # Two requests (the helper shares one header, so both write sector 1).
        heads = [request(drv, 0, ReqType.OUT, 1, data=b"\x77" * SECTOR) for _ in range(2)]
        with trio.fail_after(5):
            while src.queues[0].in_flight < 2:  # popped: the batch is in a worker thread
                await trio.sleep(0)
        release.set()
        await src.quiesce()
        assert src._live_workers == 0
        assert [h for h, _ in drv.rings[0].take_used()] == heads
        assert img.read_bytes()[SECTOR : 2 * SECTOR] == b"\x77" * SECTOR
        src.resume()  # abandoned: the device serves again
        head = request(drv, 0, ReqType.FLUSH, 0)
        assert await drv.wait_used(0) == [(head, 1)]
        engine.cancel_scope.cancel()
    src.close()


async def test_held_chains_are_given_back_to_the_ring(tmp_path: Path) -> None:
    async with trio.open_nursery() as engine:
        src, _drv, _ = await blk_source(tmp_path / "disk.img", engine, 5)
        await src.quiesce()
        state = src.save_state()
        engine.cancel_scope.cancel()
    src.close()
    dst = VirtioBlk(path=str(tmp_path / "disk.img"), size=1 << 20)
    payload = payload_of(dst, state)
    queue = field(payload, "model", "transport", "queues", 0)
    queue["in_flight"] = [{"head": 2, "at": 3}, {"head": 6, "at": 4}]  # an unfinished batch
    dst.load_state(repack(dst, payload))
    assert dst.queues[0].last_avail_idx == 3 and dst.queues[0].in_flight == 0
    dst.close()


async def test_broken_blk_states_are_refused(tmp_path: Path) -> None:
    async with trio.open_nursery() as engine:
        src, _drv, _ = await blk_source(tmp_path / "a.img", engine, 2)
        await src.quiesce()
        state = src.save_state()
        engine.cancel_scope.cancel()
    src.close()

    def size(p: dict[str, Value]) -> None:
        field(p, "model", "transport", "queues", 0)["size"] = 6

    def vector(p: dict[str, Value]) -> None:
        field(p, "model", "transport", "queues", 0)["msix_vector"] = 9

    def held(p: dict[str, Value]) -> None:
        field(p, "model", "transport", "queues", 0)["in_flight"] = [{"head": 99, "at": 0}]

    def wce(p: dict[str, Value]) -> None:
        field(p, "model", "device")["wce"] = 2

    dev = VirtioBlk(path=str(tmp_path / "b.img"), size=1 << 20)
    check_refused(dev, state, READS, [
        ("queue size", size, "queues[0].size: 6 is not a power of two"),
        ("vector", vector, "queues[0].msix_vector: 9 >= 2 vectors"),
        ("held head", held, "queues[0].in_flight[0].head: 99 is outside 0..7"),
        ("wce", wce, "field model.device.wce: 2 is outside 0..1"),
    ])
    with pytest.raises(StateError, match=r"field model.device.size"):
        VirtioBlk(size=2 << 20).load_state(state)
    with pytest.raises(StateError, match=r"field pci.layout"):
        VirtioBlk(size=1 << 20, queues=2).load_state(state)
    dev.close()


# --------------------------------------------------------------------------- virtio-net

needs_tap = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
    reason="needs root (CAP_NET_ADMIN) and /dev/net/tun to create TAPs",
)
NET_FEATURES = int(Feature.VERSION_1 | NetFeature.MAC | NetFeature.STATUS | NetFeature.MTU
                   | NetFeature.MRG_RXBUF)
RX_BUFS, TX_BUF = 0x40000, 0x50000


def tap_name() -> str:
    return f"vfus{uuid.uuid4().hex[:6]}"


@needs_tap
async def test_virtio_net_quiesce_stops_rx_and_state_carries_frames(nursery: trio.Nursery
                                                                     ) -> None:
    src = await trio.to_thread.run_sync(lambda: VirtioNet(tap=tap_name(), link=False))
    dst = await trio.to_thread.run_sync(lambda: VirtioNet(tap=tap_name()))
    try:
        async with trio.open_nursery() as engine:
            ctx = FakeContext(engine)
            src.attach(ctx)
            drv = Driver(src, ctx.dma.ram)
            drv.setup(NET_FEATURES, size=16)
            with trio.fail_after(2):
                # The RX worker waits for the TAP (or, if the kernel already sent a frame
                # on the new TAP, for receive buffers).
                while src._rx_wait is None and not src.rx_pending:
                    await trio.sleep(0)
            with trio.fail_after(2):  # ... and quiesce must not wait for a frame
                await src.quiesce()
            frame = bytes(12) + b"\xff" * 6 + b"\x52\x54\x00\x12\x34\x56" + b"\x08\x06" + bytes(28)
            # Read from the TAP, not placed yet (replacing any IPv6 neighbour discovery
            # frame the kernel sent on the new TAP meanwhile, to know what must arrive).
            src.rx_pending[:] = [frame]
            src.tx_dropped = 3
            state = src.save_state()
            expected = reads(src)
            engine.cancel_scope.cancel()
        src.detach()
        with pytest.raises(StateError, match=r"field model.device.mac"):
            other = await trio.to_thread.run_sync(
                lambda: VirtioNet(tap=tap_name(), mac="52:54:00:00:00:01"))
            try:
                other.load_state(state)
            finally:
                await trio.to_thread.run_sync(other.close)
        dctx = FakeContext(nursery)
        dctx._dma = ctx._dma
        dst.load_state(state)
        assert reads(dst) == expected and not dst.link_up and dst.tx_dropped == 3
        dst.attach(dctx)
        drv.dev = dst
        rx = drv.rings[0]
        head = rx.add([], [(RX_BUFS, 2048)])
        drv.kick(0)
        got = await drv.wait_used(0)
        assert got == [(head, len(frame))]
        assert bytes(dctx.dma.ram[RX_BUFS + 12 : RX_BUFS + len(frame)]) == frame[12:]
        assert struct.unpack_from("<H", dctx.dma.ram, RX_BUFS + 10)[0] == 1
        await drv.reset()
    finally:
        await trio.to_thread.run_sync(src.close)
        await trio.to_thread.run_sync(dst.close)


async def test_a_blk_quiesce_the_engine_gives_up_on_still_flushes(tmp_path: Path) -> None:
    """As for nvme: cancelled after the engine's grace, the quiesce still flushes."""
    img = tmp_path / "disk.img"
    async with trio.open_nursery() as engine:
        src, _drv, _ = await blk_source(img, engine, 0)
        flushes: list[int] = []
        real = src.backend.flush

        def counting() -> None:
            flushes.append(1)
            real()

        src.backend.flush = counting  # type: ignore[method-assign]
        src._live_workers += 1  # a worker that never stops between batches
        with trio.move_on_after(0.05):
            await src.quiesce()
        src._live_workers -= 1
        src.resume()
        assert flushes == [1]
        engine.cancel_scope.cancel()
    src.close()

"""Placing received frames over mergeable receive buffers (VirtioNet._place): the fast path
(one view of all the buffers a frame needs) and the general one (message-mode DMA) must fill
the same buffers with the same bytes and the same num_buffers, and give buffers back when a
frame does not fit. No TAP needed: the device is built with a stand-in."""

from __future__ import annotations

import os
import struct

import pytest

from devices.virtio import net as net_mod
from devices.virtio.net import NetFeature, VirtioNet
from devices.virtio.spec import Feature

from ..fakes import FakeContext
from .driver import Driver

RX_BUFS = 0x80000
FEATURES = int(Feature.VERSION_1 | Feature.RING_EVENT_IDX | NetFeature.MRG_RXBUF)


class _NoTap:
    """A pipe that never delivers a frame: the receive worker waits on it forever."""

    def __init__(self) -> None:
        self.fd, self._other = os.pipe()

    def set_offload(self, flags: int) -> None:
        pass

    def close(self) -> None:
        os.close(self.fd)
        os.close(self._other)


class _MessageModeDma:
    """The fake DMA port without zero-copy views: the general (async) path."""

    def __init__(self, inner: object) -> None:
        self.inner = inner

    def view(self, address: int, size: int, *, write: bool = False) -> None:
        return None

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


def device(monkeypatch: pytest.MonkeyPatch) -> VirtioNet:
    monkeypatch.setattr(net_mod.Tap, "open", staticmethod(lambda config: _NoTap()))
    return VirtioNet(tap="unused", queue_size=64)


@pytest.mark.parametrize("mapped", [True, False])
async def test_large_frame_spread_over_buffers(ctx: FakeContext, monkeypatch: pytest.MonkeyPatch,
                                               mapped: bool) -> None:
    dev = device(monkeypatch)
    drv = Driver(dev, ctx.dma.ram)
    dev.attach(ctx)
    drv.setup(FEATURES, size=64)
    if not mapped:
        monkeypatch.setattr(type(ctx), "dma", property(lambda self: _MessageModeDma(self._dma)))
    rx = drv.rings[0]
    sizes = [1536, 700, 4096, 1536, 1536, 2048]
    addrs = []
    pos = RX_BUFS
    for size in sizes:
        rx.add([], [(pos, size)])
        addrs.append(pos)
        pos += size + 64  # not contiguous
    frames = [bytes(12) + os.urandom(3000), bytes(12) + os.urandom(100)]
    queue = dev.queues[0]
    assert await dev._place(queue, frames) == 2
    used = rx.take_used()
    got = b""
    # frame 1: 3012 bytes over 1536 + 700 + 776 of 4096; frame 2 in the next buffer
    assert [n for _, n in used] == [1536, 700, 3012 - 1536 - 700, 112]
    for (_, n), addr in zip(used, addrs, strict=False):
        got += bytes(ctx.dma.ram[addr : addr + n])
    first, second = got[:3012], got[3012:]
    assert struct.unpack_from("<H", first, 10)[0] == 3
    assert struct.unpack_from("<H", second, 10)[0] == 1
    assert first[12:] == frames[0][12:] and second[12:] == frames[1][12:]
    # A frame larger than what is left waits, and the buffers stay available.
    start = queue.last_avail_idx
    assert await dev._place(queue, [bytes(12) + os.urandom(9000)]) == 0
    assert queue.last_avail_idx == start and queue.in_flight == 0
    await drv.reset()
    dev.close()


class _WriteLog:
    """The fake DMA port, recording what each write access covers (what a dirty-page log
    would mark while the client logs dirty pages)."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.marked: list[tuple[int, int]] = []

    def view(self, address: int, size: int, *, write: bool = False) -> object:
        if write:
            self.marked.append((address, size))
        return self.inner.view(address, size, write=write)  # type: ignore[attr-defined]

    def pin_ranges(self, ranges: list[tuple[int, int]], *, write: bool = False) -> object:
        if write:
            self.marked.extend(ranges)
        return self.inner.pin_ranges(ranges, write=write)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


async def test_received_frame_marks_only_its_buffers(ctx: FakeContext,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Receive buffers far apart: the frame's write accesses cover the buffers, not the
    span between them (one write view of the span marked all of it dirty: up to 1 GiB per
    frame, and a migration under network load could not converge)."""
    dev = device(monkeypatch)
    drv = Driver(dev, ctx.dma.ram)
    dev.attach(ctx)
    drv.setup(FEATURES, size=64)
    log = _WriteLog(ctx._dma)
    monkeypatch.setattr(type(ctx), "dma", property(lambda self: log))
    rx = drv.rings[0]
    far = RX_BUFS + 0x40000
    rx.add([], [(RX_BUFS, 2048)])
    rx.add([], [(far, 2048)])
    frame = bytes(12) + os.urandom(3000)
    assert await dev._place(dev.queues[0], [frame]) == 1
    buffers = {(RX_BUFS, 2048), (far, 2048)}
    data = [(a, n) for a, n in log.marked if a >= RX_BUFS]  # (the rings lie below)
    assert set(data) <= buffers, log.marked
    assert bytes(ctx.dma.ram[far : far + 3012 - 2048]) == frame[2048:]
    await drv.reset()
    dev.close()

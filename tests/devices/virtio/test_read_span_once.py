"""A cached read in the notify handler through an engine without `pin_ranges` (the
libvfio-user engine): the pieces' span is asked for once, then the pieces are pinned one
by one, still in the handler. Before, `_read_nowait` tried its own span view and then
`storage.read_cached` computed the same bounds and tried the same view again."""

from __future__ import annotations

import contextlib
import errno
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from devices.sdk import storage
from devices.sdk.interface import DmaError
from devices.virtio.blk import SECTOR, ReqStatus, ReqType

from ..fakes import FakeContext, FakeDma
from .driver import count_batches
from .test_blk import DATA, HDR, STATUS_BYTE
from .test_notify_inline import device

#: an unmapped page between the request's two data pieces
HOLE = DATA + 0x1000


class PinOnlyDma:
    """A DMA port with `view` and `pin` but no `pin_ranges`, an unmapped page at `HOLE`;
    records every write view asked for (address, size), refused or not."""

    def __init__(self, inner: FakeDma) -> None:
        self.inner = inner
        self.ram = inner.ram
        self.write_views: list[tuple[int, int]] = []
        self.pinned: list[tuple[int, int]] = []

    @staticmethod
    def _check(address: int, size: int) -> None:
        if address < HOLE + 0x1000 and address + size > HOLE:
            raise DmaError(errno.EFAULT, f"{address:#x}+{size} not mapped")

    def view(self, address: int, size: int, *, write: bool = False) -> memoryview | None:
        if write:
            self.write_views.append((address, size))
        self._check(address, size)
        return self.inner.view(address, size, write=write)

    @contextlib.contextmanager
    def pin(self, address: int, size: int, *,
            write: bool = False) -> Iterator[memoryview | None]:
        self._check(address, size)
        self.pinned.append((address, size))
        with self.inner.pin(address, size, write=write) as view:
            yield view

    async def read(self, address: int, size: int) -> bytes:
        return await self.inner.read(address, size)

    async def write(self, address: int, data: bytes | bytearray | memoryview) -> None:
        await self.inner.write(address, data)


async def kick_read(ctx: FakeContext, tmp_path: Path,
                    pieces: list[tuple[int, int]]) -> tuple[PinOnlyDma, list[int], bytes]:
    """Kick one IN request over `pieces` and wait for its used entry; (port, worker
    batches, the image's first bytes)."""
    dev, drv, payload = await device(ctx, tmp_path)
    dma = PinOnlyDma(ctx.dma)
    ctx._dma = dma  # type: ignore[assignment]
    batches = count_batches(dev)
    struct.pack_into("<IIQ", drv.ram, HDR, ReqType.IN, 0, 0)
    drv.ram[STATUS_BYTE] = 0xFF
    head = drv.rings[0].add([(HDR, 16)], [*pieces, (STATUS_BYTE, 1)])
    drv.kick(0)
    with trio.fail_after(5):
        while not (used := drv.rings[0].take_used()):
            await trio.sleep(0.001)
    assert used == [(head, sum(n for _, n in pieces) + 1)]
    assert drv.ram[STATUS_BYTE] == ReqStatus.OK
    at = 0
    for address, size in pieces:
        assert bytes(drv.ram[address : address + size]) == payload[at : at + size]
        at += size
    dev.close()
    return dma, batches, payload


async def test_span_over_a_hole_is_asked_for_once(tmp_path: Path) -> None:
    pieces = [(DATA, SECTOR), (HOLE + 0x1000, SECTOR)]
    async with trio.open_nursery() as nursery:
        ctx = FakeContext(nursery, ram_size=1 << 20)
        dma, batches, _ = await kick_read(ctx, tmp_path, pieces)
        nursery.cancel_scope.cancel()
    # the status byte's view, then the span (refused: the hole), then no second try
    spans = [v for v in dma.write_views if v[1] > SECTOR]
    assert spans == [(DATA, HOLE + 0x1000 + SECTOR - DATA)]
    assert dma.pinned == pieces  # then a pin per piece
    assert batches == []  # served in the handler


async def test_span_wider_than_the_limit_is_bounded_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    far = DATA + storage.SPAN_LIMIT + 0x1000
    pieces = [(DATA, SECTOR), (far, SECTOR)]
    calls: list[int] = []
    plain = storage.bounds

    def bounds(ranges: list[tuple[int, int]]) -> tuple[int, int]:
        calls.append(len(ranges))
        return plain(ranges)

    monkeypatch.setattr(storage, "bounds", bounds)
    async with trio.open_nursery() as nursery:
        ctx = FakeContext(nursery, ram_size=far + 0x10000)
        dma, batches, _ = await kick_read(ctx, tmp_path, pieces)
        nursery.cancel_scope.cancel()
    assert calls == [2]
    assert all(n <= SECTOR for _, n in dma.write_views)  # no view of the wide span
    assert dma.pinned == pieces
    assert batches == []

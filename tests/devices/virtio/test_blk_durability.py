"""Durability promises of virtio-blk (docs/durability.md, virtio 1.2 5.2.6.1): no completion
before the data reached the backend, write-through whenever the driver has no write-back
cache to flush, and a failed fsync is never forgotten."""

from __future__ import annotations

import errno
import os
import struct
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio

from devices.sdk.bits import BytesLike
from devices.sdk.storage import FileBackend, MemoryBackend
from devices.virtio import transport as t
from devices.virtio.blk import (
    SECTOR,
    WRITEBACK_OFFSET,
    BlkFeature,
    ReqStatus,
    ReqType,
    VirtioBlk,
)
from devices.virtio.transport import Feature

from ..fakes import FakeContext
from .driver import Driver
from .test_blk import BASIC, STATUS_BYTE, attach, request

NO_FLUSH = BASIC & ~int(BlkFeature.FLUSH)
WCE = BASIC | int(BlkFeature.CONFIG_WCE)


class CountingBackend(MemoryBackend):
    """A RAM disk that counts flushes and can make them fail (inline, not threaded)."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.flushes = 0
        self.fail = False

    def flush(self) -> None:
        self.flushes += 1
        if self.fail:
            raise OSError(errno.EIO, "writeback failed")


def counting(dev: VirtioBlk) -> CountingBackend:
    be = CountingBackend(dev.backend.size)
    dev.backend = be
    return be


async def do(drv: Driver, rtype: int, sector: int = 0, *, data: bytes = b"",
             read_len: int = 0) -> int:
    """One request, waited for; returns its status byte."""
    request(drv, 0, rtype, sector, data=data, read_len=read_len)
    await drv.wait_used(0)
    return drv.ram[STATUS_BYTE]


async def test_flush_negotiated_is_write_back(ctx: FakeContext) -> None:
    dev = VirtioBlk(size=1 << 20)
    be = counting(dev)
    drv = attach(dev, ctx)
    drv.setup(BASIC)
    assert drv.devcfg(WRITEBACK_OFFSET, 1) == 1
    assert await do(drv, ReqType.OUT, data=b"\x11" * SECTOR) == ReqStatus.OK
    assert be.flushes == 0  # stable only after FLUSH
    assert await do(drv, ReqType.FLUSH) == ReqStatus.OK
    assert be.flushes == 1


async def test_without_flush_every_write_is_stable_before_it_completes(
        ctx: FakeContext) -> None:
    """5.2.6.1 case 1: FLUSH offered but not negotiated means write-through."""
    dev = VirtioBlk(size=1 << 20)
    be = counting(dev)
    drv = attach(dev, ctx)
    drv.setup(NO_FLUSH)
    assert drv.devcfg(WRITEBACK_OFFSET, 1) == 0
    assert await do(drv, ReqType.OUT, data=b"\x22" * SECTOR) == ReqStatus.OK
    assert be.flushes == 1
    seg = struct.pack("<QII", 0, 1, 0)
    assert await do(drv, ReqType.WRITE_ZEROES, data=seg) == ReqStatus.OK
    assert await do(drv, ReqType.DISCARD, data=seg) == ReqStatus.OK
    assert be.flushes == 3
    assert await do(drv, ReqType.IN, read_len=SECTOR) == ReqStatus.OK
    assert be.flushes == 3  # reads change nothing
    be.fail = True
    assert await do(drv, ReqType.OUT, data=b"\x22" * SECTOR) == ReqStatus.IOERR


async def test_config_wce_switches_to_write_through(ctx: FakeContext) -> None:
    """5.2.6.1 case 2: with CONFIG_WCE the driver's `writeback` = 0 means write-through."""
    dev = VirtioBlk(size=1 << 20)
    be = counting(dev)
    drv = attach(dev, ctx)
    assert drv.features() & BlkFeature.CONFIG_WCE
    drv.setup(WCE)
    bar, base, _ = drv.caps[t.CfgType.DEVICE]
    assert drv.devcfg(WRITEBACK_OFFSET, 1) == 1
    dev.region_write(bar, base + WRITEBACK_OFFSET, b"\x00")
    assert drv.devcfg(WRITEBACK_OFFSET, 1) == 0
    assert await do(drv, ReqType.OUT, data=b"\x33" * SECTOR) == ReqStatus.OK
    assert be.flushes == 1
    dev.region_write(bar, base + WRITEBACK_OFFSET, b"\x01")
    assert await do(drv, ReqType.OUT, data=b"\x33" * SECTOR) == ReqStatus.OK
    assert be.flushes == 1
    dev.region_write(bar, base + WRITEBACK_OFFSET, b"\x07")  # not a cache mode: ignored
    assert drv.devcfg(WRITEBACK_OFFSET, 1) == 1
    await drv.reset()
    drv.setup(BASIC)  # CONFIG_WCE not negotiated: the field is read-only
    dev.region_write(bar, base + WRITEBACK_OFFSET, b"\x00")
    assert drv.devcfg(WRITEBACK_OFFSET, 1) == 1


async def test_a_failed_fsync_fails_every_later_flush(
        ctx: FakeContext, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Linux reports a writeback error to fsync once and then treats the pages as clean:
    a second fsync succeeds although the data never reached the disk."""
    dev = VirtioBlk(path=str(tmp_path / "disk.img"), size=1 << 20)
    real = os.fsync
    failures = [OSError(errno.EIO, os.strerror(errno.EIO))]

    def fsync(fd: int) -> None:
        if failures:
            raise failures.pop()
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    drv = attach(dev, ctx)
    drv.setup(BASIC)
    assert await do(drv, ReqType.OUT, data=b"\x44" * SECTOR) == ReqStatus.OK
    assert await do(drv, ReqType.FLUSH) == ReqStatus.IOERR
    assert await do(drv, ReqType.FLUSH) == ReqStatus.IOERR
    dev.close()


class GatedFile(FileBackend):
    """Writes and flushes wait for `release` (in the worker thread)."""

    def __init__(self, path: str, size: int) -> None:
        super().__init__(path, size, flush_metadata=True)
        self.release = threading.Event()
        self.entered = threading.Event()

    def write(self, offset: int, bufs: Sequence[BytesLike]) -> None:
        self.entered.set()
        assert self.release.wait(5)
        super().write(offset, bufs)

    def flush(self) -> None:
        self.entered.set()
        assert self.release.wait(5)
        super().flush()


@pytest.mark.parametrize("rtype", [ReqType.OUT, ReqType.FLUSH])
async def test_no_completion_before_the_backend_returned(
        ctx: FakeContext, tmp_path: Path, rtype: int) -> None:
    """Guard (held before the fixes too): OUT completes only after `pwrite` returned,
    FLUSH only after `fsync` returned."""
    img = tmp_path / "disk.img"
    dev = VirtioBlk(size=1 << 20)
    be = GatedFile(str(img), 1 << 20)
    dev.backend = be
    drv = attach(dev, ctx)
    drv.setup(BASIC)
    data = b"\x55" * SECTOR
    request(drv, 0, rtype, 2, data=data if rtype == ReqType.OUT else b"")
    with trio.fail_after(5):
        while not be.entered.is_set():
            await trio.sleep(0.001)
    await trio.sleep(0.05)
    assert drv.rings[0].take_used() == [], "completed while the backend call still runs"
    be.release.set()
    await drv.wait_used(0)
    assert drv.ram[STATUS_BYTE] == ReqStatus.OK
    if rtype == ReqType.OUT:
        assert img.read_bytes()[2 * SECTOR : 3 * SECTOR] == data
    dev.close()


def test_a_new_or_grown_image_is_synced_with_its_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    img = tmp_path / "disk.img"
    FileBackend(str(img), 1 << 20).close()
    assert synced == [img.stat().st_ino, tmp_path.stat().st_ino]
    synced.clear()
    FileBackend(str(img), 1 << 20).close()  # unchanged: nothing to sync
    FileBackend(str(img), 0, readonly=True).close()
    assert synced == []
    FileBackend(str(img), 2 << 20).close()  # grown
    assert synced == [img.stat().st_ino, tmp_path.stat().st_ino]


def test_transport_features_still_offered() -> None:
    """CONFIG_WCE joined the offer; nothing else changed."""
    dev = VirtioBlk(size=1 << 20)
    assert dev.offered_features & Feature.VERSION_1
    offered = dev.offered_features
    assert offered & BlkFeature.FLUSH and offered & BlkFeature.CONFIG_WCE

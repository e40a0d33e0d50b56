"""Durability promises of the NVMe model (docs/durability.md): no completion before the data
reached the file, Flush/FUA/write-cache-off mean fdatasync, and a failed fdatasync is never
forgotten."""

from __future__ import annotations

import errno
import os
import struct
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
import trio

from devices.nvme import Nvme
from devices.nvme.backend import FileBackend, MemoryBackend
from devices.nvme.spec import AdminOpcode, FeatureId, IoOpcode, Reg, Status
from devices.sdk.bits import BytesLike

from ..fakes import FakeContext
from .host import DATA, Host
from .test_io import CountingBackend, rw, use_counting_backend

IO = IoOpcode
FUA = 1 << 30


@pytest.fixture
async def io(host: Host) -> Host:
    await host.create_io_queues()
    return host


@pytest.fixture
async def file_io(tmp_path: Path, nvme_ctx: FakeContext) -> AsyncIterator[Host]:
    dev = Nvme(backing=str(tmp_path / "disk.img"), size="1M")
    dev.attach(nvme_ctx)
    h = Host(dev, nvme_ctx)
    h.enable_pci()
    await h.enable()
    await h.create_io_queues()
    yield h
    dev.detach()
    dev.close()


class GatedBackend(MemoryBackend):
    """Writes and flushes wait for `release` in their worker thread, so a test can look at
    the completion queue while the data has not reached the backend yet."""

    threaded = True

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.release = threading.Event()
        self.entered = threading.Event()
        self.writes_done = 0
        self.flushes_done = 0

    def readinto_nowait(self, offset: int, bufs: Sequence[memoryview]) -> int:
        return 0

    def write(self, offset: int, bufs: Sequence[BytesLike]) -> None:
        self.entered.set()
        assert self.release.wait(5)
        super().write(offset, bufs)
        self.writes_done += 1

    def flush(self) -> None:
        self.entered.set()
        assert self.release.wait(5)
        self.flushes_done += 1


@pytest.mark.parametrize("opcode", [IO.WRITE, IO.FLUSH])
async def test_no_completion_before_the_backend_returned(io: Host, opcode: int) -> None:
    """Guard (held before the fixes too): a write completes only after `pwritev` returned,
    a flush only after `fdatasync` returned."""
    ns = io.dev.worker.namespaces[1]
    ns.backend.close()
    be = GatedBackend(4 << 20)
    ns.backend = be
    io.ram[DATA : DATA + 512] = b"\x77" * 512
    cdw = rw(0, 1) if opcode == IO.WRITE else ()
    io.submit(1, io.sqe(opcode, nsid=1, prp1=DATA, cdw=cdw))
    await io.until(be.entered.is_set)
    await trio.sleep(0.05)
    assert io.poll(1) is None, "completion posted while the backend call still runs"
    be.release.set()
    c = await io.wait(1)
    assert c.code == 0
    assert (be.writes_done, be.flushes_done) == ((1, 0) if opcode == IO.WRITE else (0, 1))


async def test_write_zeroes_with_fua_is_flushed(io: Host) -> None:
    be = use_counting_backend(io.dev)
    assert (await io.cmd(1, IO.WRITE_ZEROES, nsid=1, cdw=rw(0, 8))).code == 0
    assert be.flushes == 0  # write-back cache: Flush makes it stable
    assert (await io.cmd(1, IO.WRITE_ZEROES, nsid=1, cdw=rw(0, 8, FUA))).code == 0
    assert be.flushes == 1


async def test_write_cache_off_flushes_every_data_change(io: Host) -> None:
    be = use_counting_backend(io.dev)
    c = await io.admin(AdminOpcode.SET_FEATURES, cdw=(FeatureId.VOLATILE_WRITE_CACHE, 0))
    assert c.code == 0 and be.flushes == 1  # what the cache held is made stable
    # already off: no second flush for the feature itself
    await io.admin(AdminOpcode.SET_FEATURES, cdw=(FeatureId.VOLATILE_WRITE_CACHE, 0))
    assert be.flushes == 1
    assert (await io.cmd(1, IO.WRITE, nsid=1, prp1=DATA, cdw=rw(0, 1))).code == 0
    assert be.flushes == 2
    assert (await io.cmd(1, IO.WRITE_ZEROES, nsid=1, cdw=rw(0, 8))).code == 0
    assert be.flushes == 3
    io.ram[DATA : DATA + 16] = struct.pack("<IIQ", 0, 8, 16)  # deallocate LBAs 16..23
    c = await io.cmd(1, IO.DATASET_MANAGEMENT, nsid=1, prp1=DATA, cdw=(0, 1 << 2))
    assert c.code == 0 and be.flushes == 4


class FailingFlush(CountingBackend):
    def flush(self) -> None:
        super().flush()
        raise OSError(errno.EIO, "writeback failed")


async def test_write_cache_off_with_a_failing_flush_is_an_error(io: Host) -> None:
    ns = io.dev.worker.namespaces[1]
    ns.backend.close()
    ns.backend = FailingFlush(4 << 20)
    c = await io.admin(AdminOpcode.SET_FEATURES, cdw=(FeatureId.VOLATILE_WRITE_CACHE, 0))
    assert c.code == Status.INTERNAL_ERROR
    assert io.dev.worker.running  # the worker survived it


async def test_failed_shutdown_flush_is_not_reported_complete(io: Host) -> None:
    ns = io.dev.worker.namespaces[1]
    ns.backend.close()
    ns.backend = FailingFlush(4 << 20)
    io.wr(Reg.CC, io.rd(Reg.CC) | 1 << 14)  # CC.SHN = normal shutdown
    await io.until(lambda: io.rd(Reg.CSTS) & 2)  # CFS
    assert (io.rd(Reg.CSTS) >> 2) & 3 != 2, "SHST = complete although the flush failed"


async def test_a_failed_fdatasync_fails_every_later_flush(
        file_io: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    """Linux reports a writeback error to fdatasync once and then treats the pages as
    clean: a second fdatasync succeeds although the data never reached the disk."""
    real = os.fdatasync
    failures = [OSError(errno.EIO, os.strerror(errno.EIO))]

    def fdatasync(fd: int) -> None:
        if failures:
            raise failures.pop()
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    h = file_io
    assert (await h.cmd(1, IO.WRITE, nsid=1, prp1=DATA, cdw=rw(0, 1))).code == 0
    assert (await h.cmd(1, IO.FLUSH, nsid=1)).code == Status.WRITE_FAULT
    assert (await h.cmd(1, IO.FLUSH, nsid=1)).code == Status.WRITE_FAULT
    c = await h.cmd(1, IO.WRITE, nsid=1, prp1=DATA, cdw=rw(0, 1, FUA))
    assert c.code == Status.WRITE_FAULT
    # shutdown does not claim the data is safe either
    h.wr(Reg.CC, h.rd(Reg.CC) | 1 << 14)
    await h.until(lambda: h.rd(Reg.CSTS) & 2)


def test_a_new_or_grown_image_is_synced_with_its_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    img = tmp_path / "disk.img"
    FileBackend(img, 1 << 20).close()
    assert synced == [img.stat().st_ino, tmp_path.stat().st_ino]
    synced.clear()
    FileBackend(img, 1 << 20).close()  # unchanged: nothing to sync
    assert synced == []
    FileBackend(img, 2 << 20).close()  # grown
    assert synced == [img.stat().st_ino, tmp_path.stat().st_ino]

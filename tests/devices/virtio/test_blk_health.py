"""virtio-blk: a backing file returning EIO fails the device, not only the request
(docs/operations.md, "Health"): the request gets VIRTIO_BLK_S_IOERR and the model calls
`ctx.report_failure` (on the trio thread, also when the file is served from a thread)."""

from __future__ import annotations

import errno
from collections.abc import Sequence
from pathlib import Path

import pytest

from devices.sdk.bits import BytesLike
from devices.sdk.storage import FileBackend
from devices.virtio.blk import SECTOR, ReqStatus, ReqType, VirtioBlk

from ..fakes import FakeContext
from .test_blk import BASIC, attach
from .test_blk_durability import NO_FLUSH, do


class EioFile(FileBackend):
    """A file whose pwrite fails as a dying disk's does (in the worker thread)."""

    def write(self, offset: int, bufs: Sequence[BytesLike]) -> None:
        raise OSError(errno.EIO, "Input/output error")


async def test_eio_on_write_reports_a_device_failure(ctx: FakeContext, tmp_path: Path) -> None:
    dev = VirtioBlk(size=1 << 20)
    dev.backend.close()
    dev.backend = EioFile(str(tmp_path / "disk.img"), 1 << 20)
    drv = attach(dev, ctx)
    drv.setup(BASIC)
    assert await do(drv, ReqType.IN, read_len=SECTOR) == ReqStatus.OK
    assert ctx.failures == []
    assert await do(drv, ReqType.OUT, data=b"\x11" * SECTOR) == ReqStatus.IOERR
    assert len(ctx.failures) == 1 and "Input/output error" in ctx.failures[0]
    dev.close()


@pytest.mark.parametrize("features", [BASIC, NO_FLUSH], ids=["flush", "write-through"])
async def test_eio_on_flush_reports_a_device_failure(ctx: FakeContext, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     features: int) -> None:
    dev = VirtioBlk(backing=str(tmp_path / "disk.img"), size=1 << 20)

    def fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    drv = attach(dev, ctx)
    drv.setup(features)
    monkeypatch.setattr("os.fsync", fsync)
    monkeypatch.setattr("os.fdatasync", fsync)
    rtype = ReqType.FLUSH if features == BASIC else ReqType.OUT
    assert await do(drv, rtype, data=b"\x22" * SECTOR if rtype == ReqType.OUT else b"") \
        == ReqStatus.IOERR
    assert ctx.failures
    monkeypatch.undo()
    dev.close()

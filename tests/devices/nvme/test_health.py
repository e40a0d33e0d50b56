"""A backing file that fails with EIO fails the device, not only the command
(docs/operations.md, "Health"): the command completes with its error status, the model calls
`ctx.report_failure`, and behind the real server the device is unhealthy, the client's ERR
eventfd fires and the group is non-viable until DEVICE_RESET."""

from __future__ import annotations

import errno
from collections.abc import Sequence
from pathlib import Path

import trio

from devices.nvme import Nvme
from devices.nvme.backend import MemoryBackend
from devices.nvme.spec import AdminOpcode, FeatureId, IoOpcode, Reg, Status
from devices.sdk.bits import BytesLike
from devices.sdk.interface import IrqIndex
from vfiouser_srv.client import make_eventfd, read_eventfd_nowait

from ..fakes import FakeContext
from .host import DATA, Host
from .test_over_socket import DATA as SOCKET_DATA
from .test_over_socket import served


class EioBackend(MemoryBackend):
    """A disk whose writes and flushes fail as a dying drive's pwrite/fdatasync do."""

    def write(self, offset: int, bufs: Sequence[BytesLike]) -> None:
        raise OSError(errno.EIO, "Input/output error")

    def flush(self) -> None:
        raise OSError(errno.EIO, "Input/output error")


def failing(dev: Nvme) -> None:
    ns = dev.worker.namespaces[1]
    ns.backend.close()
    ns.backend = EioBackend(4 << 20)


async def test_eio_on_write_reports_a_device_failure(host: Host, nvme_ctx: FakeContext) -> None:
    await host.create_io_queues()
    failing(host.dev)
    c = await host.cmd(1, IoOpcode.WRITE, nsid=1, prp1=DATA, cdw=(0, 0, 0))
    assert c.code == Status.WRITE_FAULT
    assert len(nvme_ctx.failures) == 1 and "Input/output error" in nvme_ctx.failures[0]
    assert host.dev.worker.running  # the other commands are still served


async def test_eio_on_a_write_cache_off_flush_reports_a_device_failure(
        host: Host, nvme_ctx: FakeContext) -> None:
    await host.create_io_queues()
    failing(host.dev)
    c = await host.admin(AdminOpcode.SET_FEATURES, cdw=(FeatureId.VOLATILE_WRITE_CACHE, 0))
    assert c.code == Status.INTERNAL_ERROR
    assert nvme_ctx.failures


async def test_eio_on_the_shutdown_flush_reports_a_device_failure(
        host: Host, nvme_ctx: FakeContext) -> None:
    failing(host.dev)
    host.wr(Reg.CC, host.rd(Reg.CC) | 1 << 14)  # CC.SHN = normal shutdown
    await host.until(lambda: host.rd(Reg.CSTS) & 2)  # CFS
    assert nvme_ctx.failures


async def test_eio_behind_the_server_raises_err_and_makes_the_group_non_viable(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    model = Nvme(size="4M")
    failing(model)
    async with served(nursery, tmp_path, True, model) as (srv, d, _):
        device = srv.devices["nvme"]
        err = make_eventfd()
        try:
            await d.c.set_irq_eventfds(int(IrqIndex.ERR), 0, [err])
            assert device.healthy and device.group.viable
            _, status = await d.cmd(1, IoOpcode.WRITE, nsid=1, prp1=SOCKET_DATA, cdw=(0, 0, 0))
            assert status & 0x3FFF == Status.WRITE_FAULT
            assert not device.healthy and not device.group.viable
            assert device.health_reason is not None and "backing file" in device.health_reason
            assert read_eventfd_nowait(err) == 1  # the ERR interrupt
            await d.c.device_reset()
            assert device.healthy and device.group.viable  # DEVICE_RESET: healthy again
        finally:
            err.close()

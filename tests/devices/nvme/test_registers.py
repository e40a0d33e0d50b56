"""PCI identity, BAR0 register surface, enable/disable/shutdown handshakes, INTMS/INTMC."""

from __future__ import annotations

import pytest

from devices.nvme import Nvme, parse_size
from devices.nvme.spec import CSTS_CFS, CSTS_RDY, Reg, Shst
from devices.sdk import CapId
from devices.sdk.interface import IrqIndex

from ..fakes import FakeContext
from ..helpers import cfg_read, walk_caps
from .host import Host


def test_pci_identity_and_bars() -> None:
    dev = Nvme(size="1M")
    try:
        assert cfg_read(dev, 0x09, 3) == 0x010802
        assert cfg_read(dev, 0x10, 4) & 0x7 == 0x4  # 64-bit memory BAR0
        assert cfg_read(dev, 0x3D, 1) == 1  # INTA
        assert {cap for _, cap in walk_caps(dev)} == {CapId.PCIE, CapId.MSIX}
        assert dev.msix is not None and dev.msix.table_bar == 4 and dev.msix.pba_bar == 4
        assert dev.msix.vectors == 65
        regions = {r.index: r.size for r in dev.regions()}
        assert regions[0] >= 0x1000 + 2 * 65 * 4 and regions[4] >= 65 * 16
    finally:
        dev.close()


async def test_register_power_on_values(dev: Nvme, nvme_ctx: FakeContext) -> None:
    h = Host(dev, nvme_ctx)
    cap = h.rd(Reg.CAP, 8)
    assert cap & 0xFFFF == 4095  # MQES
    assert cap >> 16 & 1  # CQR
    assert cap >> 32 & 0xF == 0  # DSTRD
    assert cap >> 37 & 1  # NVM command set
    assert (h.rd(Reg.CAP) | h.rd(Reg.CAP + 4) << 32) == cap  # lo/hi dword reads agree
    assert h.rd(Reg.VS) == 0x10400
    assert h.rd(Reg.CSTS) == 0
    assert h.rd(Reg.CMBLOC) == 0 and h.rd(Reg.CMBSZ) == 0
    h.wr(Reg.NSSR, 0x4E564D65)
    assert h.rd(Reg.NSSR) == 0 and h.rd(Reg.CSTS) == 0


def test_doorbell_stride_option() -> None:
    dev = Nvme(size="1M", dstrd=2)
    try:
        assert (int.from_bytes(dev.region_read(0, 0, 8), "little") >> 32) & 0xF == 2
        assert dev.stride == 16
    finally:
        dev.close()


async def test_enable_disable_handshake(host: Host) -> None:
    assert host.rd(Reg.CSTS) & CSTS_RDY
    await host.disable()
    assert host.rd(Reg.CSTS) == 0
    await host.enable()
    assert host.rd(Reg.CSTS) == CSTS_RDY


async def test_bad_page_size_is_fatal(dev: Nvme, nvme_ctx: FakeContext) -> None:
    h = Host(dev, nvme_ctx)
    h.enable_pci()
    h.wr(Reg.AQA, 0x003F003F)
    h.wr(Reg.CC, 1 | (15 << 7))  # MPS 15 > MPSMAX
    await h.until(lambda: h.rd(Reg.CSTS) & CSTS_CFS)
    assert not h.rd(Reg.CSTS) & CSTS_RDY
    h.wr(Reg.CC, 0)
    await h.until(lambda: not h.rd(Reg.CSTS) & CSTS_CFS)


async def test_shutdown_reports_complete(host: Host) -> None:
    host.wr(Reg.CC, host.rd(Reg.CC) | 1 << 14)
    await host.until(lambda: (host.rd(Reg.CSTS) >> 2) & 3 == Shst.COMPLETE)
    await host.disable()
    await host.enable()
    assert (host.rd(Reg.CSTS) >> 2) & 3 == Shst.NORMAL


async def test_intms_intmc_and_intx_fallback(dev: Nvme, nvme_ctx: FakeContext) -> None:
    h = Host(dev, nvme_ctx)
    h.enable_pci(msix=False)
    await h.enable()
    h.wr(Reg.INTMS, 1)
    assert h.rd(Reg.INTMS) == 1 and h.rd(Reg.INTMC) == 1
    cid = h.submit(0, h.sqe(0x18))  # keep alive
    await h.until(lambda: dev.worker.cqs[0].outstanding)
    assert not dev.intx_asserted()  # masked
    h.wr(Reg.INTMC, 1)
    assert h.rd(Reg.INTMS) == 0
    assert dev.intx_asserted()
    cqe = await h.wait(0)
    assert cqe.cid == cid
    assert not dev.intx_asserted()  # head doorbell consumed everything
    assert nvme_ctx.irq.intx_history[-2:] == [True, False]
    assert not [t for t in nvme_ctx.irq.triggers if t[0] == IrqIndex.MSIX]


async def test_msix_vector_per_cq(host: Host, nvme_ctx: FakeContext) -> None:
    await host.admin(0x18)
    assert nvme_ctx.irq.triggers[-1] == (IrqIndex.MSIX, 0)
    await host.create_io_queues(vector=3)
    await host.cmd(1, 0x00, nsid=1)  # flush
    assert nvme_ctx.irq.triggers[-1] == (IrqIndex.MSIX, 3)


async def test_function_reset_returns_to_power_on(dev: Nvme) -> None:
    dev.region_write(0, Reg.AQA, (0x1F001F).to_bytes(4, "little"))
    dev.reset()
    assert dev.region_read(0, Reg.AQA, 4) == bytes(4)
    assert not dev.worker.enabled and not dev.worker.sqs


@pytest.mark.parametrize(("text", "value"), [("1G", 1 << 30), ("64M", 64 << 20),
                                             ("512k", 512 << 10), ("4096", 4096),
                                             ("2GiB", 2 << 30)])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("kwargs", [
    {"queues": 0}, {"dstrd": 9}, {"lba_size": 1024}, {"serial": "x" * 21},
    {"size": "1M:2M:3M", "namespaces": 2}, {"size": "1000"}, {"size": "lots"},
])
def test_bad_options(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Nvme(**kwargs)  # type: ignore[arg-type]


async def test_csts_poll_restarts_a_cancelled_worker(dev: Nvme, nvme_ctx: FakeContext) -> None:
    """The engine may cancel device tasks (quiesce); a pending enable must still complete
    when the guest only polls CSTS afterwards."""
    h = Host(dev, nvme_ctx)
    h.enable_pci()
    real_ctx = dev.ctx
    dev.ctx = None  # no task group: the CC write cannot start the worker
    h.wr(Reg.AQA, 0x003F003F)
    h.wr(Reg.CC, 1 | (6 << 16) | (4 << 20))
    assert not dev.worker.running
    dev.ctx = real_ctx
    await h.until(lambda: h.rd(Reg.CSTS) & CSTS_RDY)

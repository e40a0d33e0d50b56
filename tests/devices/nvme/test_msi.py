"""`interrupts=msi`: the nvme function with one MSI vector and no MSI-X (no BAR4).

Why it exists: QEMU 11.1's vfio-user-pci aborts when a guest ejects any function with MSI-X
(docs/operations.md, "Hot-plug with QEMU"); with MSI the same controller hot-unplugs
cleanly. These tests pin what the guest sees and that completions interrupt through MSI.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from devices.nvme import Nvme
from devices.nvme.spec import AdminOpcode, Status
from devices.sdk import IrqIndex, MsiCap

from ..fakes import FakeContext
from ..helpers import cfg_read, cfg_write
from .host import IOCQ, Host


@pytest.fixture
async def msi_host(nvme_ctx: FakeContext) -> AsyncIterator[Host]:
    dev = Nvme(size="4M", interrupts="msi")
    dev.attach(nvme_ctx)
    h = Host(dev, nvme_ctx)
    h.enable_pci(msix=False)
    assert dev.msi is not None
    ctrl = dev.msi.offset + MsiCap.CONTROL
    cfg_write(dev, ctrl, 2, cfg_read(dev, ctrl, 2) | MsiCap.CTRL_ENABLE)
    await h.enable()
    yield h
    dev.detach()
    dev.close()


def test_msi_function_has_no_msix_and_no_bar4() -> None:
    dev = Nvme(size="4M", interrupts="msi")
    try:
        assert dev.msix is None and dev.msi is not None and dev.vectors == 1
        assert 4 not in dev.bars and 0 in dev.bars
    finally:
        dev.close()
    with pytest.raises(ValueError, match="interrupts"):
        Nvme(size="4M", interrupts="msi-x")


async def test_completions_raise_msi_vector_0(msi_host: Host) -> None:
    irq = msi_host.ctx.irq
    before = len(irq.triggers)
    await msi_host.create_io_queues(vector=0)
    assert (int(IrqIndex.MSI), 0) in irq.triggers[before:]
    assert all(index == int(IrqIndex.MSI) for index, _ in irq.triggers)


async def test_a_cq_on_a_vector_msi_does_not_have_is_refused(msi_host: Host) -> None:
    msi_host.ram[IOCQ : IOCQ + 64 * 16] = bytes(64 * 16)
    c = await msi_host.admin(AdminOpcode.CREATE_CQ, prp1=IOCQ, cdw=(63 << 16 | 1, 1 << 16 | 3))
    assert c.code == Status.INVALID_INTERRUPT_VECTOR


async def test_shadow_doorbells_accepted_with_msi(msi_host: Host) -> None:
    with trio.fail_after(5):
        c = await msi_host.admin(AdminOpcode.DOORBELL_BUFFER_CONFIG, prp1=0x50000, prp2=0x51000)
    assert c.code == 0

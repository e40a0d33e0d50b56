"""raise_irq / lower_irq: mechanism choice, INTx gating, MSI masking, no-client safety."""

from __future__ import annotations

import pytest

from devices.sdk import Bar, Command, IrqIndex, MsiCap, MsixCap, PciDevice, PciIdentity, Status

from .fakes import FakeContext
from .helpers import cfg_read, cfg_write


class Dev(PciDevice):
    name = "irqdev"
    identity = PciIdentity(vendor_id=0x1234, device_id=0x0004)

    def __init__(self) -> None:
        self.msi_cap = MsiCap(4, per_vector_mask=True)
        self.msix_cap = MsixCap(4, table_bar=0)
        super().__init__(bars=[Bar(0, 0x1000)], caps=[self.msi_cap, self.msix_cap])

    def enable_msi(self, vectors_log2: int = 2) -> None:
        ctrl = MsiCap.CTRL_ENABLE | (vectors_log2 << MsiCap.CTRL_MME_SHIFT)
        cfg_write(self, self.msi_cap.offset + 2, 2, ctrl)

    def enable_msix(self) -> None:
        cfg_write(self, self.msix_cap.offset + 2, 2, MsixCap.CTRL_ENABLE)

    def master(self, extra: int = 0) -> None:
        cfg_write(self, 0x04, 2, Command.MEMORY | Command.MASTER | extra)


@pytest.fixture
def dev(ctx: FakeContext) -> Dev:
    d = Dev()
    d.attach(ctx)
    return d


async def test_intx_level_and_status_bit(dev: Dev, ctx: FakeContext) -> None:
    dev.raise_irq()
    assert ctx.irq.intx_history == [True]
    assert cfg_read(dev, 0x06, 2) & Status.INTERRUPT
    dev.raise_irq()  # already asserted: no new edge
    assert ctx.irq.intx_history == [True]
    dev.lower_irq()
    assert ctx.irq.intx_history == [True, False]
    assert not cfg_read(dev, 0x06, 2) & Status.INTERRUPT
    assert ctx.irq.triggers == []


async def test_intx_disable_gates_the_line_not_the_status(dev: Dev, ctx: FakeContext) -> None:
    dev.master(Command.INTX_DISABLE)
    dev.raise_irq()
    assert ctx.irq.intx_history == []
    assert cfg_read(dev, 0x06, 2) & Status.INTERRUPT
    dev.master()  # INTx enabled again: the pending level reaches the line
    assert ctx.irq.intx_history == [True]
    dev.master(Command.INTX_DISABLE)
    assert ctx.irq.intx_history == [True, False]


async def test_msi_when_enabled(dev: Dev, ctx: FakeContext) -> None:
    dev.master()
    dev.enable_msi()
    dev.raise_irq(3)
    assert ctx.irq.triggers == [(IrqIndex.MSI, 3)]
    assert ctx.irq.intx_history == []


async def test_msi_vector_beyond_enabled_count_dropped(dev: Dev, ctx: FakeContext) -> None:
    dev.master()
    dev.enable_msi(vectors_log2=0)
    dev.raise_irq(1)
    assert ctx.irq.triggers == []


async def test_msi_per_vector_mask_sets_pending_and_unmask_delivers(
    dev: Dev, ctx: FakeContext
) -> None:
    dev.master()
    dev.enable_msi()
    mask = dev.msi_cap.offset + dev.msi_cap.mask_offset
    pending = dev.msi_cap.offset + dev.msi_cap.pending_offset
    cfg_write(dev, mask, 4, 0b0100)
    dev.raise_irq(2)
    assert ctx.irq.triggers == []
    assert cfg_read(dev, pending, 4) == 0b0100
    cfg_write(dev, mask, 4, 0)
    assert ctx.irq.triggers == [(IrqIndex.MSI, 2)]
    assert cfg_read(dev, pending, 4) == 0


async def test_msix_preferred_over_msi(dev: Dev, ctx: FakeContext) -> None:
    dev.master()
    dev.enable_msi()
    dev.enable_msix()
    dev.raise_irq(2)
    assert ctx.irq.triggers == [(IrqIndex.MSIX, 2)]
    dev.raise_irq(9)  # out of range: dropped
    assert len(ctx.irq.triggers) == 1


async def test_messages_need_bus_master(dev: Dev, ctx: FakeContext) -> None:
    cfg_write(dev, 0x04, 2, Command.MEMORY)
    dev.enable_msix()
    dev.raise_irq(0)
    assert ctx.irq.triggers == []


async def test_enabling_msi_deasserts_intx(dev: Dev, ctx: FakeContext) -> None:
    dev.raise_irq()
    dev.master()
    dev.enable_msi()
    assert ctx.irq.intx_history == [True, False]
    assert not dev.intx_asserted()


async def test_reset_deasserts_intx(dev: Dev, ctx: FakeContext) -> None:
    dev.raise_irq()
    dev.reset()
    assert ctx.irq.intx_history == [True, False]
    assert not cfg_read(dev, 0x06, 2) & Status.INTERRUPT


async def test_no_client_is_safe_and_intx_redriven_on_attach(ctx: FakeContext) -> None:
    dev = Dev()
    dev.raise_irq()  # no ctx: level kept, nothing sent
    assert dev.intx_asserted()
    dev.attach(ctx)
    assert ctx.irq.intx_history == [True]
    dev.detach()
    dev.master()
    dev.enable_msix()
    dev.raise_irq(1)  # dropped without a client
    assert ctx.irq.triggers == []

"""The ergonomics target: identity, register BAR, MSI-X, DMA and reset in ~50 lines."""

from __future__ import annotations

import trio.testing

from devices.sdk import (
    Access,
    Bar,
    Field,
    IrqIndex,
    MsixCap,
    PciDevice,
    PcieCap,
    PciIdentity,
    Register,
    RegisterBank,
)

from .fakes import FakeContext
from .helpers import cfg_write, walk_caps


class CopyEngine(PciDevice):
    """Copies LEN bytes from SRC to DST in guest memory, then signals MSI-X vector 0."""

    name = "copyengine"
    identity = PciIdentity(vendor_id=0x1234, device_id=0xC0DE, class_code=0x088000)

    def __init__(self) -> None:
        self.regs = RegisterBank([
            Register("SRC", 0x00, size=8),
            Register("DST", 0x08, size=8),
            Register("LEN", 0x10),
            Register("CTRL", 0x14, fields=[Field("GO", 0, access=Access.WO), Field("IRQ", 1)],
                     on_write=self._ctrl),
            Register("STATUS", 0x18, fields=[Field("BUSY", 0, access=Access.RO),
                                             Field("DONE", 1, access=Access.RW1C)]),
        ])
        self.msix = MsixCap(1, table_bar=0, table_offset=0x800)
        super().__init__(bars=[Bar(0, 0x1000, backing=self.regs)], caps=[PcieCap(), self.msix])

    def _ctrl(self, value: int) -> None:
        if value & 1 and not self.regs.get_field("STATUS", "BUSY") and self.ctx:
            self.regs.set_field("STATUS", "BUSY", 1)
            self.ctx.start_task(self._copy, name="copy")

    async def _copy(self) -> None:
        assert self.ctx is not None
        data = await self.ctx.dma.read(self.regs["SRC"], self.regs["LEN"])
        await self.ctx.dma.write(self.regs["DST"], data)
        self.regs["STATUS"] = 0b10  # DONE, not BUSY
        if self.regs.get_field("CTRL", "IRQ"):
            self.raise_irq(0)

    def on_reset(self) -> None:
        """Banks, config space and the MSI-X table are reset by PciDevice already."""


def write(dev: CopyEngine, offset: int, size: int, value: int) -> None:
    dev.region_write(0, offset, value.to_bytes(size, "little"))


async def test_copy_engine_end_to_end(ctx: FakeContext) -> None:
    dev = CopyEngine()
    dev.attach(ctx)
    assert [cap_id for _, cap_id in walk_caps(dev)] == [0x10, 0x11]
    cfg_write(dev, 0x04, 2, 0x6)  # memory + bus master
    assert dev.msix is not None
    cfg_write(dev, dev.msix.offset + 2, 2, MsixCap.CTRL_ENABLE)
    ctx.dma.ram[0x1000:0x1010] = b"0123456789abcdef"
    write(dev, 0x00, 8, 0x1000)
    write(dev, 0x08, 8, 0x3000)
    write(dev, 0x10, 4, 16)
    write(dev, 0x14, 4, 0b11)  # GO | IRQ
    await trio.testing.wait_all_tasks_blocked()
    assert ctx.dma.ram[0x3000:0x3010] == b"0123456789abcdef"
    assert ctx.irq.triggers == [(IrqIndex.MSIX, 0)]
    assert dev.region_read(0, 0x18, 4) == (0b10).to_bytes(4, "little")
    write(dev, 0x18, 4, 0b10)  # W1C DONE
    assert dev.region_read(0, 0x18, 4) == bytes(4)
    assert dev.region_read(0, 0x14, 4) == (0b10).to_bytes(4, "little")  # GO reads 0
    dev.reset()
    assert dev.regs["SRC"] == 0 and not dev.msix_enabled()

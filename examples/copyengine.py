"""The README's example device: copies guest memory, then raises MSI-X vector 0.

Serve it with `vfiouser-srv serve examples/copyengine.py:CopyEngine --socket-path /tmp/ce.sock`
(or `python examples/copyengine.py /tmp/ce.sock`, which registers it and runs the server).
"""

from __future__ import annotations

import sys

from devices.sdk import (
    Access,
    Bar,
    Field,
    MsixCap,
    PciDevice,
    PcieCap,
    PciIdentity,
    Register,
    RegisterBank,
)


class CopyEngine(PciDevice):
    name = "copyengine"
    description = "copies guest memory, then raises MSI-X vector 0"
    identity = PciIdentity(vendor_id=0x1234, device_id=0xC0DE, class_code=0x088000)

    def __init__(self) -> None:
        self.regs = RegisterBank([
            Register("SRC", 0x00, size=8),
            Register("DST", 0x08, size=8),
            Register("LEN", 0x10),
            Register("CTRL", 0x14, fields=[Field("GO", 0, access=Access.WO)],
                     on_write=self._ctrl),
        ])
        self.msix = MsixCap(1, table_bar=0, table_offset=0x800)
        super().__init__(bars=[Bar(0, 0x1000, backing=self.regs)],
                         caps=[PcieCap(), self.msix])

    def _ctrl(self, value: int) -> None:          # synchronous: just start the work
        if value & 1 and self.ctx is not None:
            self.ctx.start_task(self._copy)

    async def _copy(self) -> None:                # runs after the register write's reply
        assert self.ctx is not None
        data = await self.ctx.dma.read(self.regs["SRC"], self.regs["LEN"])
        await self.ctx.dma.write(self.regs["DST"], data)
        self.raise_irq(0)


if __name__ == "__main__":
    import devices
    from vfiouser_srv.cli import main

    devices.MODELS[CopyEngine.name] = CopyEngine
    sys.exit(main(["serve", "copyengine", "--socket-path", sys.argv[1]]))

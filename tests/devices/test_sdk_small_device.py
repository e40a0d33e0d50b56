"""The ergonomics target: identity, register BAR, MSI-X, DMA and reset in ~50 lines.

The device is the README's example, `examples/copyengine.py`, imported rather than copied, so
the example a newcomer reads is the one these tests keep working.
"""

from __future__ import annotations

import sys
from pathlib import Path

import trio.testing

from devices.sdk import IrqIndex, MsixCap

from .fakes import FakeContext
from .helpers import cfg_write, walk_caps

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from copyengine import CopyEngine


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
    write(dev, 0x14, 4, 1)  # GO
    await trio.testing.wait_all_tasks_blocked()
    assert ctx.dma.ram[0x3000:0x3010] == b"0123456789abcdef"
    assert ctx.irq.triggers == [(IrqIndex.MSIX, 0)]
    assert dev.region_read(0, 0x14, 4) == bytes(4)  # GO is write-only: reads 0
    dev.reset()
    assert dev.regs["SRC"] == 0 and not dev.msix_enabled()

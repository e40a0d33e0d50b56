"""`Probe`: a test device for engine tests, covering what edu does not.

Layout::

    BAR0  0x1000, callbacks; every access trapped
          0x00 ID        RO  PROBE_ID
          0x04 FAIL      WO  raises DeviceError(value)
          0x08 BUG       WO  raises RuntimeError (a model bug: EIO, logged with traceback)
          0x0C HANG      WO  starts a device task that waits until cancelled
          0x10 MSIX      WO  raise_irq(value): MSI-X vector `value`
          0x14 PIN       WO  starts a task that pins guest RAM at PIN_ADDR until `unpin`
    BAR2  2 MiB SharedMemory (memfd, mmap-able) with the MSI-X table at 0x1000 and PBA at
          0x1800 trapped, so the sparse areas are [0, 0x1000) and [0x2000, 2 MiB)
    ROM   2 KiB, read-only
    MSI-X 4 vectors; INTx pin A
"""

from __future__ import annotations

import logging

import trio

from devices.sdk import Bar, CallbackHandler, MsixCap, PciDevice, PciIdentity, Rom, SharedMemory
from devices.sdk.interface import DeviceError, pinned_view

log = logging.getLogger(__name__)

PROBE_ID = 0x9B0BE0
ID, FAIL, BUG, HANG, MSIX, PIN = 0x00, 0x04, 0x08, 0x0C, 0x10, 0x14
PIN_ADDR = 0x100000
BAR2_SIZE = 2 << 20
MSIX_TABLE, MSIX_PBA = 0x1000, 0x1800
ROM_DATA = b"PROBE-ROM" * 16


class Probe(PciDevice):
    name = "probe"
    description = "engine test device"
    identity = PciIdentity(vendor_id=0x1234, device_id=0x9B0B, class_code=0xFF0000)

    def __init__(self) -> None:
        self.mem = SharedMemory("probe-bar2")
        self.msix = MsixCap(4, table_bar=2, table_offset=MSIX_TABLE, pba_offset=MSIX_PBA)
        super().__init__(
            bars=[
                Bar(0, 0x1000, backing=CallbackHandler(self._read, self._write)),
                Bar(2, BAR2_SIZE, backing=self.mem),
            ],
            caps=[self.msix],
            rom=Rom(ROM_DATA),
        )
        self.hung = trio.Event()
        self.cancelled = 0
        self.pinned = trio.Event()
        self.unpin = trio.Event()
        self.resets = 0

    def _read(self, offset: int, count: int) -> bytes:
        value = PROBE_ID if offset == ID else 0
        return value.to_bytes(8, "little")[:count]

    def _write(self, offset: int, data: bytes) -> None:
        value = int.from_bytes(data, "little")
        if offset == FAIL:
            raise DeviceError(value, "asked to fail")
        if offset == BUG:
            raise RuntimeError("probe: a model bug")
        if offset == HANG:
            assert self.ctx is not None
            self.ctx.start_task(self._hang)
        elif offset == MSIX:
            self.raise_irq(value)
        elif offset == PIN:
            assert self.ctx is not None
            self.ctx.start_task(self._pin)

    async def _hang(self) -> None:
        self.hung.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            self.cancelled += 1
            raise

    async def _pin(self) -> None:
        assert self.ctx is not None
        with pinned_view(self.ctx.dma, PIN_ADDR, 16, write=True) as view:
            if view is None:
                log.warning("probe: engine cannot pin")
                return
            self.pinned.set()
            await self.unpin.wait()
            view[:4] = b"PIN!"

    def on_reset(self) -> None:
        self.resets += 1


__all__ = ["BAR2_SIZE", "BUG", "FAIL", "HANG", "ID", "MSIX", "PIN", "PIN_ADDR", "PROBE_ID", "Probe"]

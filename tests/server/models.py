"""`Scratch`: a test-only PCI device that exercises every server path edu does not.

Layout::

    BAR0  0x1000 bytes, registers (RegisterBank), every access trapped
          0x00 ID          RO   SCRATCH_ID
          0x04 SCRATCH     RW   plain storage (posted-write ordering tests)
          0x08 DMA_ADDR    RW   8 bytes: guest (IOVA) address
          0x10 DMA_LEN     RW   bytes to move
          0x14 DMA_OFF     RW   offset in BAR2 of the device side of the transfer
          0x18 DMA_CTRL    WO   GO | TO_RAM | IRQ | PIN; GO starts a device task
          0x1C DMA_STATUS       BUSY (RO), DONE (RW1C), ERR (RW1C)
          0x20 DMA_ERRNO   RO   errno of the last failed transfer
          0x24 IRQ_RAISE   WO   raise_irq(value): MSI-X vector `value`, or assert INTx
          0x28 IRQ_LOWER   WO   deassert INTx
          0x30 FAIL_ERRNO  WO   raises DeviceError(value)
          0x34 FAIL_OSERR  WO   raises OSError(value)
          0x38 FAIL_BUG    WO   raises RuntimeError (a model bug: EIO)
          0x3C READ_ERRNO  RO   reading raises DeviceError(EBADMSG)
          0x40 READ_BUG    RO   reading raises LookupError (a model bug: EIO)
    BAR2  2 MiB SharedMemory (memfd, mmap-able); the page at 0x1000 is trapped for the
          MSI-X table (0x1000) and PBA (0x1800), so the sparse areas are
          [0, 0x1000) and [0x2000, 2 MiB)
    ROM   2 KiB, read-only
    MSI-X 4 vectors; INTx pin A; no MSI

A DMA (GO) copies DMA_LEN bytes between guest memory at DMA_ADDR and BAR2 at DMA_OFF
(TO_RAM: BAR2 -> guest, else guest -> BAR2) in a task started through the context; with
PIN it instead pins DMA_ADDR..+DMA_LEN (`pinned_view`, the engine's pin API) until the test
sets `unpin`, then (with TO_RAM) copies BAR2 into guest memory through the pinned view.
`dma_done` is set when a transfer ends (the test waits on it: no polling).
"""

from __future__ import annotations

import errno
import logging

import trio

from devices.sdk import (
    Access,
    Bar,
    DmaError,
    Field,
    MsixCap,
    PciDevice,
    PciIdentity,
    Register,
    RegisterBank,
    Rom,
    SharedMemory,
)
from devices.sdk.interface import DeviceError, pinned_view

log = logging.getLogger(__name__)

SCRATCH_ID = 0x5C7A7C40
BAR0_SIZE = 0x1000
BAR2_SIZE = 2 << 20
MSIX_VECTORS = 4
MSIX_TABLE = 0x1000
MSIX_PBA = 0x1800
ROM_DATA = b"SCRATCH-ROM\0" * 8

# register offsets
ID = 0x00
SCRATCH = 0x04
DMA_ADDR = 0x08
DMA_LEN = 0x10
DMA_OFF = 0x14
DMA_CTRL = 0x18
DMA_STATUS = 0x1C
DMA_ERRNO = 0x20
IRQ_RAISE = 0x24
IRQ_LOWER = 0x28
FAIL_ERRNO = 0x30
FAIL_OSERR = 0x34
FAIL_BUG = 0x38
READ_ERRNO = 0x3C
READ_BUG = 0x40

# DMA_CTRL bits
GO = 1 << 0
TO_RAM = 1 << 1
IRQ = 1 << 2
PIN = 1 << 3

# DMA_STATUS bits
BUSY = 1 << 0
DONE = 1 << 1
ERR = 1 << 2


class Scratch(PciDevice):
    name = "scratch"
    description = "test device: register BAR0, shared BAR2 with MSI-X, DMA task, faults"
    identity = PciIdentity(vendor_id=0x1234, device_id=0x5C7A, class_code=0xFF0000)

    def __init__(self) -> None:
        self.regs = RegisterBank(
            [
                Register("ID", ID, access=Access.RO, reset=SCRATCH_ID),
                Register("SCRATCH", SCRATCH),
                Register("DMA_ADDR", DMA_ADDR, size=8),
                Register("DMA_LEN", DMA_LEN),
                Register("DMA_OFF", DMA_OFF),
                Register("DMA_CTRL", DMA_CTRL, access=Access.WO, on_write=self._dma_ctrl),
                Register(
                    "DMA_STATUS",
                    DMA_STATUS,
                    fields=[
                        Field("BUSY", 0, access=Access.RO),
                        Field("DONE", 1, access=Access.RW1C),
                        Field("ERR", 2, access=Access.RW1C),
                    ],
                ),
                Register("DMA_ERRNO", DMA_ERRNO, access=Access.RO),
                Register("IRQ_RAISE", IRQ_RAISE, access=Access.WO, on_write=self.raise_irq),
                Register("IRQ_LOWER", IRQ_LOWER, access=Access.WO, on_write=self._lower),
                Register("FAIL_ERRNO", FAIL_ERRNO, access=Access.WO, on_write=self._fail_errno),
                Register("FAIL_OSERR", FAIL_OSERR, access=Access.WO, on_write=self._fail_oserr),
                Register("FAIL_BUG", FAIL_BUG, access=Access.WO, on_write=self._fail_bug),
                Register("READ_ERRNO", READ_ERRNO, access=Access.RO, on_read=self._read_errno),
                Register("READ_BUG", READ_BUG, access=Access.RO, on_read=self._read_bug),
            ],
            size=BAR0_SIZE,
        )
        self.mem = SharedMemory("scratch-bar2")
        self.msix = MsixCap(MSIX_VECTORS, table_bar=2, table_offset=MSIX_TABLE, pba_offset=MSIX_PBA)
        super().__init__(
            bars=[
                Bar(0, BAR0_SIZE, backing=self.regs),
                Bar(2, BAR2_SIZE, backing=self.mem),
            ],
            caps=[self.msix],
            rom=Rom(ROM_DATA),
        )
        self.dma_done = trio.Event()
        self.pinned = trio.Event()
        self.unpin = trio.Event()
        self.pinned_view = False
        self.dma_runs = 0
        self.dma_cancelled = 0

    # ------------------------------------------------------------------ registers

    def _lower(self, _value: int) -> None:
        self.lower_irq()

    def _fail_errno(self, value: int) -> None:
        raise DeviceError(value, f"scratch: asked to fail with errno {value}")

    def _fail_oserr(self, value: int) -> None:
        raise OSError(value, f"scratch: OSError {value}")

    def _fail_bug(self, _value: int) -> None:
        raise RuntimeError("scratch: a model bug")

    def _read_errno(self) -> int:
        raise DeviceError(errno.EBADMSG, "scratch: read fails")

    def _read_bug(self) -> int:
        raise LookupError("scratch: read bug")

    # ------------------------------------------------------------------ DMA

    def _dma_ctrl(self, value: int) -> None:
        if not value & GO or self.regs.get_field("DMA_STATUS", "BUSY") or self.ctx is None:
            return
        self.regs["DMA_STATUS"] = BUSY
        self.dma_done = trio.Event()
        self.pinned = trio.Event()
        self.unpin = trio.Event()
        self.ctx.start_task(self._dma, value, name="scratch-dma")

    async def _dma(self, ctrl: int) -> None:
        ctx = self.ctx
        assert ctx is not None
        address, length, off = self.regs["DMA_ADDR"], self.regs["DMA_LEN"], self.regs["DMA_OFF"]
        err = 0
        finished = False
        try:
            if ctrl & PIN:
                write = bool(ctrl & TO_RAM)
                with pinned_view(ctx.dma, address, max(length, 1), write=write) as view:
                    self.pinned_view = view is not None
                    self.pinned.set()
                    await self.unpin.wait()
                    if view is not None and write:  # still valid: the unmap waits for us
                        view[:length] = self.mem.buf[off : off + length]
            elif ctrl & TO_RAM:
                await ctx.dma.write(address, bytes(self.mem.buf[off : off + length]))
            else:
                data = await ctx.dma.read(address, length)
                self.mem.buf[off : off + length] = data
            finished = True
        except DmaError as exc:
            err = exc.errno
            finished = True
        finally:
            self.dma_runs += 1
            if not finished:
                self.dma_cancelled += 1
            self.regs["DMA_ERRNO"] = err
            self.regs["DMA_STATUS"] = (ERR if err else DONE) if finished else 0
            self.dma_done.set()
        if ctrl & IRQ:
            self.raise_irq(0)

    def on_reset(self) -> None:
        self.dma_done = trio.Event()


class NoResetScratch(Scratch):
    """Scratch without VFIO_DEVICE_FLAGS_RESET: DEVICE_RESET must be EINVAL."""

    name = "scratch-noreset"
    supports_reset = False


__all__ = ["NoResetScratch", "Scratch"]

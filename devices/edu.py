"""QEMU's educational PCI device (`-device edu`), served over vfio-user.

Behaviour follows QEMU's hw/misc/edu.c (spec: docs/specs/edu.rst) register for register,
so guest drivers written against QEMU's edu work unchanged. Where edu.c misbehaves we
deviate, and say so here:

* **DMA outside the 4 KiB buffer.** edu.c only logs the range error and then copies out of
  bounds of its buffer. We log it and ignore the command: the command register keeps its
  previous value, so the start bit never sets, and no interrupt is raised.
* **Factorial** is computed synchronously inside the register write (edu.c uses a thread).
  The "computing" status bit is therefore already clear when the write returns, and the
  result and the completion interrupt (if status bit 0x80 is set) are there at once.
* **DMA** runs in a task through `ctx.dma` as soon as the command is written (edu.c fires a
  timer 100 ms later). A DMA error (unmapped address) or Bus Master being off makes the
  transfer not happen, but the command still completes, as it does in edu.c. A DMA task
  cancelled by the engine (reset, disconnect, unmap) clears the start bit without an
  interrupt, so the device is never left wedged with the start bit set.
* **Reset.** edu.c has no reset handler, so its registers survive a PCI reset. Ours return to
  their power-on values (all zero), because a function-level reset should, and because the
  engine cancels a DMA in flight before the reset.

The Command register keeps I/O Space once a guest sets it (0x0107, not 0x0106), because
QEMU's PCI core gives every device the same write mask (``devices.sdk.pci.COMMAND_WMASK``).

Access sizes follow what a guest sees of QEMU's edu, which is two layers of rules (the guest
program qemu-configs/guest/edu-test.sh checks both, step ``sizes``, against the built-in edu):

* **QEMU's memory core first.** edu_mmio_ops declares ``.valid`` 4 to 8 bytes, and
  ``memory_region_access_valid`` (system/memory.c) also rejects an access not aligned to its
  size. A rejected access never reaches edu.c: ``memory_region_dispatch_read`` answers it
  with ``unassigned_mem_read``, which reads **0**, and a rejected write is dropped. So an 8- or
  16-bit read of the identification register reads 0x00 / 0x0000, not all ones.
* **Then edu.c's own checks.** Offsets below 0x80 take only 4-byte accesses, the rest 4 or 8
  bytes; anything else the memory core let through (an aligned 8-byte access below 0x80)
  reads all ones and its write is ignored, and so does an offset with no register
  (including the DMA buffer, which edu.c never maps).

Behind vfio-user-pci we must apply the memory core's rule ourselves: QEMU's vfio region ops
accept 1 to 8 bytes, so the guest's 1- and 2-byte accesses arrive here as they are. An access
that is not aligned reaches neither device whole under TCG (it is split into aligned pieces
before either memory region sees it); one a vfio-user client sends us directly is rejected
here the way the memory core would reject it.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable

import trio

from devices.sdk import (
    INTA,
    Bar,
    Blob,
    CallbackHandler,
    DeviceContext,
    DmaError,
    MsiCap,
    OptionSpec,
    PciDevice,
    PciIdentity,
    UInt,
)

log = logging.getLogger(__name__)

VENDOR_ID_QEMU = 0x1234
DEVICE_ID_EDU = 0x11E8
REVISION = 0x10
CLASS_OTHERS = 0x00FF00  # PCI_CLASS_OTHERS (0x00ff) with programming interface 0
SUBSYSTEM_VENDOR_ID_REDHAT_QUMRANET = 0x1AF4  # QEMU's default subsystem IDs
SUBSYSTEM_ID_QEMU = 0x1100

BAR_SIZE = 1 << 20
IDENTIFICATION = 0x010000ED
#: edu.c's default dma_mask: 28 bits (256 MiB)
DEFAULT_DMA_MASK = (1 << 28) - 1
DMA_START = 0x40000
DMA_SIZE = 4096
#: offsets below this accept only 4-byte accesses, the rest 4 or 8
WIDE_REGS_START = 0x80
#: edu_mmio_ops.valid: what QEMU's memory core lets through to edu.c at all
VALID_MIN_ACCESS, VALID_MAX_ACCESS = 4, 8
U32 = 0xFFFF_FFFF
U64 = 0xFFFF_FFFF_FFFF_FFFF
#: n! mod 2**32 is 0 for every n >= 34 (34! has 32 factors of two)
FACTORIAL_ZERO_FROM = 34


class Reg(enum.IntEnum):
    ID = 0x00
    LIVENESS = 0x04
    FACTORIAL = 0x08
    STATUS = 0x20
    IRQ_STATUS = 0x24
    IRQ_RAISE = 0x60
    IRQ_ACK = 0x64
    DMA_SRC = 0x80
    DMA_DST = 0x88
    DMA_CNT = 0x90
    DMA_CMD = 0x98


class StatusBit(enum.IntFlag):
    COMPUTING = 0x01
    IRQFACT = 0x80


class DmaCmd(enum.IntFlag):
    RUN = 0x1
    TO_RAM = 0x2  # direction: 0 = RAM -> edu buffer, 1 = edu buffer -> RAM
    IRQ = 0x4


class IrqBit(enum.IntFlag):
    FACTORIAL = 0x00000001
    DMA = 0x00000100


def factorial32(n: int) -> int:
    """n! truncated to 32 bits, as edu.c's uint32_t loop computes it."""
    if n >= FACTORIAL_ZERO_FROM:
        return 0
    result = 1
    for i in range(2, n + 1):
        result = (result * i) & U32
    return result


class Edu(PciDevice):
    name = "edu"
    description = "QEMU's educational PCI device (factorial, interrupts, DMA)"
    options = (
        OptionSpec("dma_mask", int, DEFAULT_DMA_MASK,
                   "mask applied to guest DMA addresses (edu.c default: 28 bits)"),
    )
    identity = PciIdentity(
        vendor_id=VENDOR_ID_QEMU,
        device_id=DEVICE_ID_EDU,
        class_code=CLASS_OTHERS,
        revision=REVISION,
        subsystem_vendor_id=SUBSYSTEM_VENDOR_ID_REDHAT_QUMRANET,
        subsystem_id=SUBSYSTEM_ID_QEMU,
    )
    interrupt_pin = INTA
    # Device state (docs/device-state.md): every register and the DMA buffer. A DMA whose
    # start bit is set in a saved state had not finished; it runs again after the load.
    state_version = 1
    state_fields = (
        UInt("dma_mask", 64, match=True),
        UInt("liveness", 32),
        UInt("fact", 32),
        UInt("status", 32, convert=StatusBit),
        UInt("irq_status", 32),
        UInt("dma_src", 64),
        UInt("dma_dst", 64),
        UInt("dma_cnt", 64),
        UInt("dma_cmd", 64),
        Blob("dma_buf"),
    )

    def __init__(self, dma_mask: int = DEFAULT_DMA_MASK) -> None:
        if not 0 < dma_mask <= U64:
            raise ValueError("dma_mask must be a non-zero 64-bit mask")
        self.dma_mask = dma_mask
        # msi_init(pdev, 0, 1, true, false): one vector, 64-bit, no per-vector masking.
        super().__init__(
            bars=[Bar(0, BAR_SIZE, backing=CallbackHandler(self._mmio_read, self._mmio_write))],
            caps=[MsiCap(1, addr64=True, per_vector_mask=False)],
        )
        self.dma_buf = bytearray(DMA_SIZE)
        # offset -> current value; a table built once keeps the MMIO read path short
        self._readers: dict[int, Callable[[], int]] = {
            Reg.ID: lambda: IDENTIFICATION,
            Reg.LIVENESS: lambda: self.liveness,
            Reg.FACTORIAL: lambda: self.fact,
            Reg.STATUS: lambda: int(self.status),
            Reg.IRQ_STATUS: lambda: self.irq_status,
            Reg.DMA_SRC: lambda: self.dma_src,
            Reg.DMA_DST: lambda: self.dma_dst,
            Reg.DMA_CNT: lambda: self.dma_cnt,
            Reg.DMA_CMD: lambda: self.dma_cmd,
        }
        #: quiesce: a DMA command is recorded (start bit set) but not started
        self._quiescing = False
        self._dma_running = False
        self._dma_done = trio.Event()
        self.on_reset()

    def on_reset(self) -> None:
        self.liveness = 0
        self.fact = 0
        self.status = StatusBit(0)
        self.irq_status = 0
        self.dma_src = 0
        self.dma_dst = 0
        self.dma_cnt = 0
        self.dma_cmd = 0
        self.dma_buf[:] = bytes(DMA_SIZE)
        self._quiescing = False

    # ------------------------------------------------------------------ device state

    async def quiesce(self) -> None:
        """Let a running DMA finish; a DMA started from now on waits in the state."""
        self._quiescing = True
        while self._dma_running:
            await self._dma_done.wait()

    def resume(self) -> None:
        self._quiescing = False
        self._restart_dma()

    def state_loaded(self) -> None:
        self._quiescing = False
        self._restart_dma()

    def attach(self, ctx: DeviceContext) -> None:
        super().attach(ctx)
        self._quiescing = False
        self._restart_dma()

    def _restart_dma(self) -> None:
        """A start bit with no DMA running: a command the state carried (or one held back
        by quiesce); run it now if a client is attached, else on attach."""
        if self.ctx is not None and self.dma_cmd & DmaCmd.RUN and not self._dma_running:
            self._launch_dma()

    def _launch_dma(self) -> None:
        assert self.ctx is not None
        self._dma_running = True
        self._dma_done = trio.Event()
        try:
            self.ctx.start_task(self._run_dma, name="edu-dma")
        except BaseException:
            self._dma_running = False
            self._dma_done.set()
            raise

    # ------------------------------------------------------------------ MMIO

    @staticmethod
    def _core_accepts(offset: int, count: int) -> bool:
        """memory_region_access_valid for edu_mmio_ops: 4 or 8 bytes, aligned to the size.

        Sizes other than powers of two never come from QEMU (a MemOp is one); from any other
        client they are rejected like the sizes out of range."""
        return count in (VALID_MIN_ACCESS, VALID_MAX_ACCESS) and not offset & (count - 1)

    @staticmethod
    def _edu_accepts(offset: int, count: int) -> bool:
        """edu_mmio_read/edu_mmio_write's own size check, after the memory core's."""
        return count == 4 or (offset >= WIDE_REGS_START and count == 8)

    def _mmio_read(self, offset: int, count: int) -> bytes:
        if count == 4 and not offset & 3:
            # The common case first (one aligned register read): both layers accept it.
            getter = self._readers.get(offset)
            return ((getter() & U32) if getter is not None else U32).to_bytes(4, "little")
        if not self._core_accepts(offset, count):
            # unassigned_mem_read: the memory core answers an invalid access with 0.
            log.debug("edu: %d-byte read at 0x%x rejected (reads 0)", count, offset)
            return bytes(count)
        if not self._edu_accepts(offset, count):
            log.debug("edu: %d-byte read at 0x%x rejected (reads all ones)", count, offset)
            return b"\xff" * count
        getter = self._readers.get(offset)
        value = getter() if getter is not None else U64
        return (value & U64).to_bytes(count, "little")

    def _mmio_write(self, offset: int, data: bytes) -> None:
        if not (self._core_accepts(offset, len(data)) and self._edu_accepts(offset, len(data))):
            log.debug("edu: %d-byte write at 0x%x ignored", len(data), offset)
            return
        value = int.from_bytes(data, "little")
        if offset == Reg.LIVENESS:
            self.liveness = ~value & U32
        elif offset == Reg.FACTORIAL:
            self._start_factorial(value & U32)
        elif offset == Reg.STATUS:
            if value & StatusBit.IRQFACT:
                self.status |= StatusBit.IRQFACT
            else:
                self.status &= ~StatusBit.IRQFACT
        elif offset == Reg.IRQ_RAISE:
            self._raise(value & U32)
        elif offset == Reg.IRQ_ACK:
            self._lower(value & U32)
        elif offset in (Reg.DMA_SRC, Reg.DMA_DST, Reg.DMA_CNT):
            if self.dma_cmd & DmaCmd.RUN:
                log.debug("edu: DMA register 0x%x written while running, ignored", offset)
            elif offset == Reg.DMA_SRC:
                self.dma_src = value
            elif offset == Reg.DMA_DST:
                self.dma_dst = value
            else:
                self.dma_cnt = value
        elif offset == Reg.DMA_CMD:
            self._start_dma(value)

    # ------------------------------------------------------------------ interrupts

    def _raise(self, bits: int) -> None:
        self.irq_status |= bits
        if self.irq_status:
            self.raise_irq(0)

    def _lower(self, bits: int) -> None:
        self.irq_status &= ~bits
        if not self.irq_status:
            self.lower_irq()

    # ------------------------------------------------------------------ factorial

    def _start_factorial(self, n: int) -> None:
        if self.status & StatusBit.COMPUTING:
            return
        self.status |= StatusBit.COMPUTING
        self.fact = factorial32(n)
        self.status &= ~StatusBit.COMPUTING
        if self.status & StatusBit.IRQFACT:
            self._raise(IrqBit.FACTORIAL)

    # ------------------------------------------------------------------ DMA

    def _buffer_range_ok(self, start: int, count: int) -> bool:
        return start >= DMA_START and start + count <= DMA_START + DMA_SIZE

    def _clamp(self, address: int) -> int:
        clamped = address & self.dma_mask
        if clamped != address:
            log.warning("edu: clamping DMA 0x%016x to 0x%016x", address, clamped)
        return clamped

    def _start_dma(self, value: int) -> None:
        if not value & DmaCmd.RUN or self.dma_cmd & DmaCmd.RUN:
            return
        buffer_addr = self.dma_src if value & DmaCmd.TO_RAM else self.dma_dst
        if not self._buffer_range_ok(buffer_addr, self.dma_cnt):
            log.warning(
                "edu: DMA range 0x%x+0x%x outside the buffer 0x%x+0x%x, command ignored",
                buffer_addr, self.dma_cnt, DMA_START, DMA_SIZE,
            )
            return
        if self.ctx is None:
            log.warning("edu: DMA command with no client attached, ignored")
            return
        self.dma_cmd = value
        if not self._quiescing:
            self._launch_dma()

    async def _run_dma(self) -> None:
        cmd, count = self.dma_cmd, self.dma_cnt
        completed = False
        try:
            ctx = self.ctx
            if ctx is None:
                return
            if not self.bus_master_enabled():
                log.warning("edu: DMA with Bus Master disabled; no data moved")
            elif cmd & DmaCmd.TO_RAM:
                start = self.dma_src - DMA_START
                await ctx.dma.write(self._clamp(self.dma_dst),
                                    bytes(self.dma_buf[start : start + count]))
            else:
                start = self.dma_dst - DMA_START
                data = await ctx.dma.read(self._clamp(self.dma_src), count)
                if len(data) != count:
                    raise DmaError(0, f"short DMA read: {len(data)} of {count} bytes")
                self.dma_buf[start : start + count] = data
            completed = True
        except DmaError as exc:
            log.warning("edu: DMA failed (%s); no data moved", exc)
            completed = True
        finally:
            # Cancelled while quiescing: the start bit stays, so the saved state carries
            # the command and it runs again after the load (or `resume`).
            if completed or not self._quiescing:
                self.dma_cmd &= ~DmaCmd.RUN
            self._dma_running = False
            self._dma_done.set()
        if completed and cmd & DmaCmd.IRQ:
            self._raise(IrqBit.DMA)

"""libvfio-user's sample device (`samples/server.c`), so that its unmodified sample client
(`samples/client.c`) runs its whole script against our server, migration included.

What server.c does, and what this model does:

* **IDs** 0xdead:0xbeef, subsystem 0xcafe:0xbabe; INTx (pin A) is its only interrupt.
* **BAR0** holds a `time_t`: writing it (8 bytes at offset 0, anything else is EINVAL) sets
  an alarm for that wall-clock second, reading it returns `now - bar0`. At the alarm the
  device pulses INTx and does DMA: to the second DMA window directly (4 x 1 KiB written, read
  back 2 KiB at a time; those pages become dirty while logging is on) and to the first one
  through DMA_WRITE/DMA_READ messages (the client logs those). Windows are taken in address
  order, where server.c keeps them in registration order: for the client's script (windows
  mapped in ascending order) the two agree.
* **BAR1** is the data the client writes and migrates. server.c asks for 0x3000 bytes, which
  libvfio-user now refuses (a BAR must be a power of two), so this BAR1 is 0x4000 bytes whose
  first 0x3000 are the data; pages 0 and 2 are mmap-able (sparse areas, as in server.c), 1
  and 3 are trapped. server.c's BAR1 read ignores the offset (a bug); ours honours it.
* **Migration data** has server.c's layout: pre-copy is BAR1's 0x3000 bytes, stop-and-copy
  is those plus BAR0 (8 bytes, little endian). The destination takes the last 0x3008 bytes
  it was given (a client may or may not send the pre-copy data too). The alarm stops when
  the device is stopped (quiesce) and is armed again from BAR0 when it runs (resume, load).
"""

from __future__ import annotations

import errno
import logging
import struct
import time

import trio

from devices.sdk import (
    INTA,
    Bar,
    BarKind,
    CallbackHandler,
    PciDevice,
    PciIdentity,
    SharedMemory,
    Trap,
)
from devices.sdk.interface import DeviceContext, DeviceError, DmaError, StateError

log = logging.getLogger(__name__)

BAR1_SIZE = 0x4000
#: what server.c calls bar1_size: the bytes the client writes, checks and migrates
DATA_SIZE = 0x3000
_TIME = struct.Struct("<q")
STATE_SIZE = DATA_SIZE + _TIME.size
DMA_CHUNK = 1024
DMA_COUNT = 4


class LvuSample(PciDevice):
    name = "libvfio-user-sample"
    description = "libvfio-user's samples/server.c device (for its unmodified samples/client.c)"
    identity = PciIdentity(
        vendor_id=0xDEAD, device_id=0xBEEF, subsystem_vendor_id=0xCAFE, subsystem_id=0xBABE
    )
    interrupt_pin = INTA
    state_version = 1

    def __init__(self) -> None:
        self.bar0 = 0
        self.data = SharedMemory("lvu-sample-bar1", clear_on_reset=False)
        traps = (Trap(0x1000, 0x1000, self._page(0x1000)), Trap(0x3000, 0x1000, self._page(0x3000)))
        self._alarm: trio.CancelScope | None = None
        self._stopped = False
        super().__init__(
            bars=[
                Bar(0, 8, BarKind.IO, backing=CallbackHandler(self._bar0_read, self._bar0_write)),
                Bar(1, BAR1_SIZE, backing=self.data, traps=traps),
            ]
        )

    # ------------------------------------------------------------------ registers

    def _page(self, base: int) -> CallbackHandler:
        """A trapped page of BAR1: the same memory, reached by message only."""
        return CallbackHandler(
            lambda off, n: self.data.read(base + off, n),
            lambda off, data: self.data.write(base + off, data),
        )

    def _bar0_read(self, offset: int, count: int) -> bytes:
        if offset != 0 or count != _TIME.size:
            raise DeviceError(errno.EINVAL, f"bad BAR0 access {offset:#x}+{count}")
        return _TIME.pack(int(time.time()) - self.bar0)

    def _bar0_write(self, offset: int, data: bytes) -> None:
        if offset != 0 or len(data) != _TIME.size:
            raise DeviceError(errno.EINVAL, f"bad BAR0 access {offset:#x}+{len(data)}")
        (self.bar0,) = _TIME.unpack(data)
        if not self._stopped:
            self._arm()

    # ------------------------------------------------------------------ the alarm

    def _arm(self) -> None:
        """setitimer for `bar0`: replaces a pending alarm; a time already past disarms."""
        if self._alarm is not None:
            self._alarm.cancel()
            self._alarm = None
        ctx = self.ctx
        if ctx is not None and self.bar0 > time.time():
            scope = self._alarm = trio.CancelScope()
            ctx.start_task(self._ring, ctx, scope, self.bar0, name="lvu-sample-alarm")

    async def _ring(self, ctx: DeviceContext, scope: trio.CancelScope, when: int) -> None:
        with scope:
            await trio.sleep(max(0.0, when - time.time()))
            self._alarm = None
            self.raise_irq()
            self.lower_irq()
            log.info("alarm: interrupt raised; doing DMA")
            try:
                await self._dma_io(ctx)
            except DmaError as exc:
                log.warning("alarm DMA failed: %s", exc)

    async def _dma_io(self, ctx: DeviceContext) -> None:
        """server.c's do_dma_io: the second window directly, then the first by messages."""
        container = getattr(ctx.dma, "container", None)
        windows = sorted(w.address for w in container) if container is not None else []
        if len(windows) < 2:
            log.warning("alarm: fewer than two DMA windows mapped; no DMA")
            return
        dma = ctx.dma
        write = getattr(dma, "message_write", dma.write)
        read = getattr(dma, "message_read", dma.read)
        for base, (put, get) in ((windows[1], (dma.write, dma.read)), (windows[0], (write, read))):
            sent = b"".join(bytes([0x41 + i]) * DMA_CHUNK for i in range(DMA_COUNT))
            for i in range(DMA_COUNT):
                await put(base + i * DMA_CHUNK, sent[i * DMA_CHUNK : (i + 1) * DMA_CHUNK])
            got = b"".join([await get(base + i * DMA_CHUNK, 2 * DMA_CHUNK)
                            for i in range(0, DMA_COUNT, 2)])
            if got != sent:
                log.error("DMA write and DMA read mismatch at %#x", base)

    # ------------------------------------------------------------------ life cycle

    def attach(self, ctx: DeviceContext) -> None:
        super().attach(ctx)
        self._stopped = False
        self._arm()

    def on_reset(self) -> None:
        self._alarm = None  # its task was cancelled; BAR0 and BAR1 survive, as in server.c

    def detach(self) -> None:
        self._alarm = None
        super().detach()

    # ------------------------------------------------------------------ state

    async def quiesce(self) -> None:
        self._stopped = True  # the engine cancels the alarm's task

    def resume(self) -> None:
        self._stopped = False
        self._arm()

    def save_precopy(self) -> bytes:
        return bytes(self.data.buf[:DATA_SIZE])

    def save_state(self) -> bytes:
        return bytes(self.data.buf[:DATA_SIZE]) + _TIME.pack(self.bar0)

    def load_state(self, data: bytes) -> None:
        if len(data) < STATE_SIZE or (len(data) - STATE_SIZE) % DATA_SIZE:
            raise StateError(f"{self.name}: {len(data)} bytes of state, expected {STATE_SIZE} "
                             f"(optionally after pre-copy data of {DATA_SIZE} bytes each)")
        state = data[-STATE_SIZE:]
        self.data.buf[:DATA_SIZE] = state[:DATA_SIZE]
        (self.bar0,) = _TIME.unpack(state[DATA_SIZE:])
        self._stopped = False
        self._arm()

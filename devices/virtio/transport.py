"""The virtio 1.x modern PCI transport (virtio 1.2, 4.1) on top of `PciDevice`.

Why a base class: virtio-blk and virtio-net differ only in their device-specific config,
their feature bits and what a queue's chains mean. Everything else (the four
vendor-specific capabilities, feature negotiation, device status and reset, per-queue
registers, notification, MSI-X vectors with INTx fallback, workers per queue) lives here.

BAR layout (the same as QEMU's virtio-pci, so guest-visible resources look alike)::

    BAR1 (32-bit, 4 KiB)            MSI-X table at 0x000, PBA at 0x800
    BAR4 (64-bit, prefetchable, 16 KiB)
        0x0000  common configuration   (VIRTIO_PCI_CAP_COMMON_CFG)
        0x1000  ISR status             (VIRTIO_PCI_CAP_ISR_CFG)
        0x2000  device configuration   (VIRTIO_PCI_CAP_DEVICE_CFG)
        0x3000  notifications          (VIRTIO_PCI_CAP_NOTIFY_CFG), queue i at 4 * i

Common configuration (its field table is in `spec`): any access width works (Linux writes
the 64-bit fields as two 32-bit halves); an access is split over the fields it touches and
each field merges the written bytes into its value.

Concurrency: register handlers are synchronous and never wait. A notify sets the queue's
kick event for its worker task (started through `ctx.start_task` at DRIVER_OK), after
`serve_inline` may serve a sleeping worker's ring in the handler. Status 0 cancels the
workers; the status reads non-zero until they are gone (each waits for what it started)
and only then is the reset applied: a driver polls for 0 before it reuses the rings
(4.1.4.3.2), so nothing touches memory the driver already took back.

Error handling: a malformed ring (`VirtqueueError`) stops that device's queues and sets
DEVICE_NEEDS_RESET with a configuration-change interrupt (2.1.2); the guest driver decides
what to do, the server never crashes.

Not implemented: VIRTIO_PCI_CAP_PCI_CFG (the config-space window onto the BARs; Linux never
uses it), packed virtqueues, notification data, per-queue reset.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import ClassVar

import trio

from devices.sdk import (
    INTA,
    Apply,
    Bar,
    BarKind,
    CallbackHandler,
    DeviceContext,
    MsixCap,
    PciDevice,
    PciIdentity,
    Record,
    Value,
)
from devices.sdk.bits import get_le
from devices.sdk.interface import DmaPort
from devices.sdk.state import apply_all

from .guestmem import VirtqueueError
from .spec import (
    COMMON_OFFSET,
    CONFIG_GENERATION,
    CONFIG_MSIX_VECTOR,
    DEVICE_FEATURE,
    DEVICE_FEATURE_SELECT,
    DEVICE_OFFSET,
    DEVICE_STATUS,
    DRIVER_FEATURE,
    DRIVER_FEATURE_SELECT,
    ISR_OFFSET,
    MODERN_DEVICE_ID_BASE,
    MODERN_REVISION,
    MSIX_BAR,
    MSIX_BAR_SIZE,
    MSIX_PBA_OFFSET,
    NO_VECTOR,
    NOTIFY_MULTIPLIER,
    NOTIFY_OFFSET,
    NUM_QUEUES,
    QUEUE_DESC,
    QUEUE_DEVICE,
    QUEUE_DRIVER,
    QUEUE_ENABLE,
    QUEUE_MSIX_VECTOR,
    QUEUE_NOTIFY_OFF,
    QUEUE_SELECT,
    QUEUE_SIZE,
    REGION_SIZE,
    TRANSPORT_FEATURES,
    VENDOR_ID_REDHAT_QUMRANET,
    VIRTIO_BAR,
    VIRTIO_BAR_SIZE,
    CfgType,
    Feature,
    Isr,
    Status,
    virtio_cap,
)
from .state import prepare_transport, save_transport
from .virtqueue import Chain, Virtqueue
from .worker import PollWindow, serve_requests

log = logging.getLogger(__name__)

#: default of the `poll_us` option: how long a queue worker polls its avail ring after the
#: last request before it re-enables notifications and sleeps (`serve_requests`)
DEFAULT_POLL_US = 200
MAX_POLL_US = 100_000


class VirtioPciDevice(PciDevice):
    """Base of modern virtio PCI devices; subclasses fill in the device-specific parts.

    Subclass contract:

    * class attributes `virtio_id`, `class_code`;
    * `device_features()` (device bits; transport bits are added here);
    * `read_device_config(offset, count)` / `write_device_config(offset, data)`;
    * `queue_worker(queue)`: the async loop serving one queue (default `serve_requests`,
      which hands every batch of chains to `process_batch` and completes them);
    * `on_virtio_reset()`: drop device state on a virtio reset.
    """

    virtio_id: ClassVar[int]
    class_code: ClassVar[int] = 0xFF0000
    interrupt_pin = INTA

    def __init__(self, num_queues: int, queue_size: int = 256,
                 poll_us: int = DEFAULT_POLL_US) -> None:
        if not 1 <= num_queues <= 1024:
            raise ValueError("num_queues must be 1..1024")
        if not 0 <= poll_us <= MAX_POLL_US:
            raise ValueError(f"poll_us must be 0..{MAX_POLL_US}")
        #: how long a worker keeps polling its avail ring after its last request (s)
        self.poll_window = poll_us / 1e6
        if queue_size & (queue_size - 1) or not 2 <= queue_size <= 32768:
            raise ValueError("queue_size must be a power of two in 2..32768")
        self.queues = [Virtqueue(i, queue_size) for i in range(num_queues)]
        self._kicks = [trio.Event() for _ in self.queues]
        self._parked = [False] * num_queues
        self.polls: list[PollWindow | None] = [None] * num_queues
        vectors = num_queues + 1
        self.msix_cap = MsixCap(vectors, table_bar=MSIX_BAR, table_offset=0,
                                pba_bar=MSIX_BAR, pba_offset=MSIX_PBA_OFFSET)
        caps = [
            self.msix_cap,
            virtio_cap(CfgType.COMMON, VIRTIO_BAR, COMMON_OFFSET, REGION_SIZE),
            virtio_cap(CfgType.ISR, VIRTIO_BAR, ISR_OFFSET, REGION_SIZE),
            virtio_cap(CfgType.DEVICE, VIRTIO_BAR, DEVICE_OFFSET, REGION_SIZE),
            virtio_cap(CfgType.NOTIFY, VIRTIO_BAR, NOTIFY_OFFSET, REGION_SIZE,
                       NOTIFY_MULTIPLIER.to_bytes(4, "little")),
        ]
        identity = PciIdentity(
            vendor_id=VENDOR_ID_REDHAT_QUMRANET,
            device_id=MODERN_DEVICE_ID_BASE + self.virtio_id,
            class_code=self.class_code,
            revision=MODERN_REVISION,
            subsystem_vendor_id=VENDOR_ID_REDHAT_QUMRANET,
            subsystem_id=MODERN_DEVICE_ID_BASE + self.virtio_id,
        )
        super().__init__(
            bars=[
                Bar(MSIX_BAR, MSIX_BAR_SIZE),
                Bar(VIRTIO_BAR, VIRTIO_BAR_SIZE, BarKind.MEM64, prefetchable=True,
                    backing=CallbackHandler(self._bar_read, self._bar_write)),
            ],
            caps=caps,
            identity=identity,
        )
        self._fields: list[tuple[int, int, Callable[[], int], Callable[[int], None] | None]] = [
            (DEVICE_FEATURE_SELECT, 4, lambda: self.device_feature_select,
             self._set_dfselect),
            (DEVICE_FEATURE, 4, self._device_feature_word, None),
            (DRIVER_FEATURE_SELECT, 4, lambda: self.driver_feature_select,
             self._set_drv_select),
            (DRIVER_FEATURE, 4, self._driver_feature_word, self._set_driver_feature_word),
            (CONFIG_MSIX_VECTOR, 2, lambda: self.config_vector, self._set_config_vector),
            (NUM_QUEUES, 2, lambda: len(self.queues), None),
            (DEVICE_STATUS, 1, self._read_status, self._write_status),
            (CONFIG_GENERATION, 1, lambda: self.config_generation, None),
            (QUEUE_SELECT, 2, lambda: self.queue_select, self._set_queue_select),
            (QUEUE_SIZE, 2, lambda: self._q_get("size"), self._set_queue_size),
            (QUEUE_MSIX_VECTOR, 2, lambda: self._q_get("msix_vector"),
             self._set_queue_vector),
            (QUEUE_ENABLE, 2, lambda: int(self._q_get("enabled")), self._set_queue_enable),
            (QUEUE_NOTIFY_OFF, 2, lambda: self.queue_select if self._sel() else 0, None),
            (QUEUE_DESC, 8, lambda: self._q_get("desc_addr"),
             lambda v: self._q_set("desc_addr", v)),
            (QUEUE_DRIVER, 8, lambda: self._q_get("avail_addr"),
             lambda v: self._q_set("avail_addr", v)),
            (QUEUE_DEVICE, 8, lambda: self._q_get("used_addr"),
             lambda v: self._q_set("used_addr", v)),
        ]
        self._workers: set[trio.CancelScope] = set()
        self._live_workers = 0
        self._epoch = 0
        self.reset_pending = False
        #: quiesce: workers stop at their next batch boundary (docs/device-state.md)
        self.quiescing = False
        self._virtio_power_on()

    # ------------------------------------------------------------------ state

    def _virtio_power_on(self) -> None:
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.status = Status(0)
        self.config_vector = NO_VECTOR
        self.config_generation = 0
        self.queue_select = 0
        self.isr = Isr(0)
        for q in self.queues:
            q.reset()
        self._kicks = [trio.Event() for _ in self.queues]

    @property
    def offered_features(self) -> int:
        return int(TRANSPORT_FEATURES) | self.device_features()

    def negotiated(self, bits: int) -> bool:
        """True when every bit of `bits` was accepted by the driver (FEATURES_OK set)."""
        return (self.driver_features & bits) == bits

    # ------------------------------------------------------------------ subclass API

    def device_features(self) -> int:
        return 0

    def read_device_config(self, offset: int, count: int) -> bytes:
        return bytes(count)

    def write_device_config(self, offset: int, data: bytes) -> None:
        """Most device config is read-only; writes are ignored unless a device says not."""

    def on_virtio_reset(self) -> None:
        """Device state back to power-on (queues and transport are reset by the base)."""

    def on_driver_ok(self) -> None:
        """The driver finished initialisation (after the queue workers were started)."""

    async def queue_worker(self, queue: Virtqueue) -> None:
        await self.serve_requests(queue)

    # ------------------------------------------------------------------ worker helpers

    async def wait_kick(self, queue: Virtqueue) -> None:
        """Sleep until the driver notifies `queue` (notifications re-enabled first)."""
        dma = self.dma
        kick = self._kicks[queue.index] = trio.Event()
        if await queue.enable_notify(dma) or self.quiescing:
            # Work arrived meanwhile. Still a checkpoint: on the mmap path nothing above
            # awaits for real, and a worker must never monopolise the trio thread.
            await trio.lowlevel.checkpoint()
            return
        self._parked[queue.index] = True  # a notify may serve the ring now (`serve_inline`)
        try:
            await kick.wait()
        finally:
            self._parked[queue.index] = False

    def serve_inline(self, queue: Virtqueue) -> bool | None:
        """Hook (blk): serve `queue`'s first requests now, by a notify while the worker sleeps
        (`serve_notify`) or by the worker; True if any, None if none available."""
        return False

    def serve_notify(self, queue: Virtqueue) -> bool:  # hook (blk): served, re-armed
        return False

    async def settle(self, queue: Virtqueue) -> bool:
        """Hook: wait for what `serve_inline` left running (blk: writes); True if any."""
        return False

    async def wait_more(self, queue: Virtqueue) -> None:
        """Sleep until the driver adds buffers beyond those available now."""
        kick = self._kicks[queue.index] = trio.Event()
        if await queue.enable_notify_for_more(self.dma) or self.quiescing:
            await trio.lowlevel.checkpoint()
            return
        await kick.wait()

    @property
    def dma(self) -> DmaPort:
        """The DMA port of the attached client (workers run only while one is attached)."""
        if self.ctx is None:
            raise RuntimeError("no client attached")
        return self.ctx.dma

    async def complete(self, queue: Virtqueue, done: list[tuple[int, int]]) -> None:
        """Return chains (head, bytes written) and interrupt the driver if it asks for it."""
        if not done:
            return
        dma = self.dma
        await queue.push_many(dma, done)
        if await queue.should_interrupt(dma):
            self.notify_queue(queue)

    def notify_queue(self, queue: Virtqueue) -> None:
        """Used-buffer notification: the queue's MSI-X vector, or ISR bit 0 and INTx."""
        if self.msix_enabled():
            if queue.msix_vector != NO_VECTOR:
                self.raise_irq(queue.msix_vector)
            return
        self.isr |= Isr.QUEUE
        self.raise_irq(0)

    def notify_config(self) -> None:
        """Configuration-change notification (e.g. link status, NEEDS_RESET)."""
        self.config_generation = (self.config_generation + 1) & 0xFF
        if not self.status & Status.DRIVER_OK:
            return
        if self.msix_enabled():
            if self.config_vector != NO_VECTOR:
                self.raise_irq(self.config_vector)
            return
        self.isr |= Isr.CONFIG
        self.raise_irq(0)

    def needs_reset(self, reason: str) -> None:
        """The driver broke the rules: stop serving, set DEVICE_NEEDS_RESET, tell it."""
        if self.status & Status.DEVICE_NEEDS_RESET:
            return
        log.warning("%s: %s; DEVICE_NEEDS_RESET", self.name, reason)
        self.status |= Status.DEVICE_NEEDS_RESET
        self._cancel_workers()
        self.notify_config()

    # ------------------------------------------------------------------ BAR4

    def _bar_read(self, offset: int, count: int) -> bytes:
        if offset < COMMON_OFFSET + REGION_SIZE:
            return self._common_read(offset, count)
        if offset < ISR_OFFSET + REGION_SIZE:
            value = int(self.isr) if offset == ISR_OFFSET else 0
            if offset == ISR_OFFSET:
                # Reading the ISR acknowledges it and deasserts INTx (4.1.4.5).
                self.isr = Isr(0)
                self.lower_irq()
            return value.to_bytes(count, "little")
        if offset < DEVICE_OFFSET + REGION_SIZE:
            return self.read_device_config(offset - DEVICE_OFFSET, count)
        return bytes(count)

    def _bar_write(self, offset: int, data: bytes) -> None:
        if offset >= NOTIFY_OFFSET:
            index, rem = divmod(offset - NOTIFY_OFFSET, NOTIFY_MULTIPLIER)
            if (rem == 0 and index < len(self.queues)
                    and not (self._parked[index] and not self.quiescing
                             and self.serve_notify(self.queues[index]))):
                self._kicks[index].set()  # (served and re-armed: the worker sleeps on)
            return
        if offset < COMMON_OFFSET + REGION_SIZE:
            self._common_write(offset, data)
        elif DEVICE_OFFSET <= offset < DEVICE_OFFSET + REGION_SIZE:
            self.write_device_config(offset - DEVICE_OFFSET, data)

    def _common_read(self, offset: int, count: int) -> bytes:
        out = bytearray(count)
        end = offset + count
        for start, size, getter, _ in self._fields:
            if start < end and offset < start + size:
                raw = (getter() & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
                lo, hi = max(start, offset), min(start + size, end)
                out[lo - offset : hi - offset] = raw[lo - start : hi - start]
        return bytes(out)

    def _common_write(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        for start, size, getter, setter in self._fields:
            if setter is None or not (start < end and offset < start + size):
                continue
            raw = bytearray((getter() & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
            lo, hi = max(start, offset), min(start + size, end)
            raw[lo - start : hi - start] = data[lo - offset : hi - offset]
            setter(get_le(raw, 0, size))

    # ------------------------------------------------------------------ common fields

    def _sel(self) -> Virtqueue | None:
        return self.queues[self.queue_select] if self.queue_select < len(self.queues) else None

    def _q_get(self, attr: str) -> int:
        q = self._sel()
        return int(getattr(q, attr)) if q is not None else 0

    def _q_set(self, attr: str, value: int) -> None:
        q = self._sel()
        if q is None or q.enabled:
            return  # the spec forbids changing an enabled queue; ignore it
        setattr(q, attr, value)

    def _set_dfselect(self, value: int) -> None:
        self.device_feature_select = value

    def _set_drv_select(self, value: int) -> None:
        self.driver_feature_select = value

    def _device_feature_word(self) -> int:
        if self.device_feature_select > 1:
            return 0
        return (self.offered_features >> (32 * self.device_feature_select)) & 0xFFFF_FFFF

    def _driver_feature_word(self) -> int:
        if self.driver_feature_select > 1:
            return 0
        return (self.driver_features >> (32 * self.driver_feature_select)) & 0xFFFF_FFFF

    def _set_driver_feature_word(self, value: int) -> None:
        if self.status & Status.FEATURES_OK or self.driver_feature_select > 1:
            return  # features are frozen once FEATURES_OK is accepted
        shift = 32 * self.driver_feature_select
        self.driver_features = (self.driver_features & ~(0xFFFF_FFFF << shift)) | (value << shift)

    def _valid_vector(self, value: int) -> int:
        # A vector the device cannot use reads back as NO_VECTOR (4.1.5.1.2).
        return value if value < self.msix_cap.vectors else NO_VECTOR

    def _set_config_vector(self, value: int) -> None:
        self.config_vector = self._valid_vector(value)

    def _set_queue_select(self, value: int) -> None:
        self.queue_select = value

    def _set_queue_size(self, value: int) -> None:
        q = self._sel()
        if q is None or q.enabled:
            return
        if value == 0 or value > q.max_size or value & (value - 1):
            log.warning("%s: queue %d size %d refused", self.name, q.index, value)
            return
        q.size = value

    def _set_queue_vector(self, value: int) -> None:
        q = self._sel()
        if q is not None:
            q.msix_vector = self._valid_vector(value)

    def _set_queue_enable(self, value: int) -> None:
        q = self._sel()
        if q is None or value != 1 or q.enabled:
            return  # writing 0 is not allowed (only a reset disables a queue)
        q.enabled = True
        if self.status & Status.DRIVER_OK:
            self._start_worker(q)

    # ------------------------------------------------------------------ status

    def _read_status(self) -> int:
        if self.reset_pending:
            if self._live_workers:
                return int(self.status)  # still quiescing: the driver keeps polling
            self._finish_reset()
        return int(self.status)

    def _write_status(self, value: int) -> None:
        if value == 0:
            self._cancel_workers()
            self.reset_pending = True
            self._read_status()
            return
        new = Status(value & 0xFF)
        old = self.status
        if (new & Status.FEATURES_OK and not old & Status.FEATURES_OK
                and not self._features_acceptable()):
            new &= ~Status.FEATURES_OK  # the driver sees it did not stick (3.1.1)
        new |= old & Status.DEVICE_NEEDS_RESET
        self.status = new
        if new & Status.DRIVER_OK and not old & Status.DRIVER_OK:
            self._driver_ok()

    def _features_acceptable(self) -> bool:
        extra = self.driver_features & ~self.offered_features
        if extra:
            log.warning("%s: driver accepted unoffered features %#x", self.name, extra)
            return False
        if not self.driver_features & Feature.VERSION_1:
            log.warning("%s: driver did not accept VERSION_1 (legacy is not offered)",
                        self.name)
            return False
        return self.features_ok_hook()

    def features_ok_hook(self) -> bool:
        """A subclass may refuse a feature combination or configure backends (True = ok)."""
        return True

    def _driver_ok(self) -> None:
        event_idx = self.negotiated(Feature.RING_EVENT_IDX)
        indirect = self.negotiated(Feature.RING_INDIRECT_DESC)
        for q in self.queues:
            q.event_idx = event_idx
            q.indirect = indirect
        for q in self.queues:
            if q.enabled:
                self._start_worker(q)
        self.on_driver_ok()

    def _finish_reset(self) -> None:
        self.reset_pending = False
        self.lower_irq()
        self._virtio_power_on()
        self.on_virtio_reset()

    # ------------------------------------------------------------------ workers

    def _start_worker(self, q: Virtqueue) -> None:
        if self.ctx is None or self.status & Status.DEVICE_NEEDS_RESET:
            return
        self._live_workers += 1
        try:
            self.ctx.start_task(self._worker_main, q, self._epoch,
                                name=f"{self.name}-q{q.index}")
        except BaseException:
            self._live_workers -= 1
            raise

    async def _worker_main(self, q: Virtqueue, epoch: int) -> None:
        try:
            if epoch != self._epoch:
                return  # cancelled (reset, NEEDS_RESET) before the task got to run
            with trio.CancelScope() as scope:
                self._workers.add(scope)
                try:
                    await self.queue_worker(q)
                except VirtqueueError as exc:
                    self.needs_reset(str(exc))
                finally:
                    self._workers.discard(scope)
        finally:
            self._live_workers -= 1

    def _cancel_workers(self) -> None:
        self._epoch += 1
        for scope in list(self._workers):
            scope.cancel()

    # ------------------------------------------------------------------ PciDevice hooks

    def attach(self, ctx: DeviceContext) -> None:
        super().attach(ctx)
        self.quiescing = False
        self._restart_workers()

    def _restart_workers(self) -> None:
        """The guest driver still runs (a reconnect, resume or load): serve its queues."""
        if self.status & Status.DRIVER_OK and not self.reset_pending and not self._live_workers:
            for q in self.queues:
                if q.enabled:
                    self._start_worker(q)

    # ------------------------------------------------------------------ device state

    async def quiesce(self) -> None:
        """Workers finish the batch they hold and return (`quiescing` is checked where one
        would wait or take a new batch; net wakes its own waits, blk flushes afterwards)."""
        self.quiescing = True
        for kick in self._kicks:
            kick.set()
        while self._live_workers:
            await trio.sleep(0.001)

    def resume(self) -> None:
        self.quiescing = False
        self._restart_workers()

    def save_model_state(self) -> dict[str, Value]:
        return {"transport": save_transport(self), "device": self.save_device_state()}

    def prepare_model_state(self, rec: Record) -> Apply:
        return apply_all([prepare_transport(self, rec.record("transport")),
                          self.prepare_device_state(rec.record("device"))])

    def save_device_state(self) -> dict[str, Value]:
        """Subclass hooks: device-specific state (blk: cache mode; net: link, frames)."""
        return {}

    def prepare_device_state(self, rec: Record) -> Apply:
        return lambda: None

    def state_loaded(self) -> None:
        self.quiescing = False
        self._kicks = [trio.Event() for _ in self.queues]
        self._restart_workers()

    def on_reset(self) -> None:
        # The engine cancelled every task before calling reset(); nothing is live.
        self._cancel_workers()
        self.reset_pending = False
        self._virtio_power_on()
        self.on_virtio_reset()

    async def serve_requests(self, queue: Virtqueue) -> None:
        """The generic request loop: batches, polling, sleep (`worker.serve_requests`)."""
        await serve_requests(self, queue)

    async def process_batch(self, queue: Virtqueue,
                            chains: list[Chain]) -> list[tuple[int, int]]:
        """Serve a batch of chains; return (head, bytes written) per completed chain."""
        raise NotImplementedError

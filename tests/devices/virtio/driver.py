"""A virtio-pci driver in miniature (what Linux's virtio_pci_modern does), for device tests."""

from __future__ import annotations

import trio

from devices.sdk import Command
from devices.sdk.caps import CapId, MsixCap
from devices.virtio import transport as t
from devices.virtio.transport import Status, VirtioPciDevice
from devices.virtio.virtqueue import Chain, Virtqueue

from ..helpers import cfg_read, cfg_write, walk_caps
from .ring import DriverRing

BAR = t.VIRTIO_BAR


class Driver:
    def __init__(self, dev: VirtioPciDevice, ram: bytearray) -> None:
        self.dev = dev
        self.ram = ram
        self.rings: list[DriverRing] = []
        self.caps: dict[int, tuple[int, int, int]] = {}
        for pos, cap_id in walk_caps(dev):
            if cap_id == CapId.VENDOR:
                cfg_type = cfg_read(dev, pos + 3, 1)
                self.caps[cfg_type] = (cfg_read(dev, pos + 4, 1), cfg_read(dev, pos + 8, 4),
                                       cfg_read(dev, pos + 12, 4))
                if cfg_type == t.CfgType.NOTIFY:
                    self.notify_mult = cfg_read(dev, pos + 16, 4)

    # register access on the common / device / notify windows
    def rd(self, off: int, size: int) -> int:
        bar, base, _ = self.caps[t.CfgType.COMMON]
        return int.from_bytes(self.dev.region_read(bar, base + off, size), "little")

    def wr(self, off: int, size: int, value: int) -> None:
        bar, base, _ = self.caps[t.CfgType.COMMON]
        self.dev.region_write(bar, base + off, value.to_bytes(size, "little"))

    def devcfg(self, off: int, size: int) -> int:
        bar, base, _ = self.caps[t.CfgType.DEVICE]
        return int.from_bytes(self.dev.region_read(bar, base + off, size), "little")

    def isr(self) -> int:
        bar, base, _ = self.caps[t.CfgType.ISR]
        return self.dev.region_read(bar, base, 1)[0]

    def kick(self, q: int) -> None:
        bar, base, _ = self.caps[t.CfgType.NOTIFY]
        self.wr(t.QUEUE_SELECT, 2, q)
        off = self.rd(t.QUEUE_NOTIFY_OFF, 2)
        self.dev.region_write(bar, base + off * self.notify_mult, q.to_bytes(2, "little"))

    def features(self) -> int:
        self.wr(t.DEVICE_FEATURE_SELECT, 4, 0)
        lo = self.rd(t.DEVICE_FEATURE, 4)
        self.wr(t.DEVICE_FEATURE_SELECT, 4, 1)
        return lo | self.rd(t.DEVICE_FEATURE, 4) << 32

    def status(self) -> int:
        return self.rd(t.DEVICE_STATUS, 1)

    def negotiate(self, features: int) -> bool:
        self.wr(t.DEVICE_STATUS, 1, 0)
        self.wr(t.DEVICE_STATUS, 1, Status.ACKNOWLEDGE)
        self.wr(t.DEVICE_STATUS, 1, Status.ACKNOWLEDGE | Status.DRIVER)
        # 64-bit value as two 32-bit halves, the way Linux writes it
        self.wr(t.DRIVER_FEATURE_SELECT, 4, 0)
        self.wr(t.DRIVER_FEATURE, 4, features & 0xFFFF_FFFF)
        self.wr(t.DRIVER_FEATURE_SELECT, 4, 1)
        self.wr(t.DRIVER_FEATURE, 4, features >> 32)
        self.wr(t.DEVICE_STATUS, 1, Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK)
        return bool(self.status() & Status.FEATURES_OK)

    def enable_msix(self) -> None:
        msix = next(c for c in self.dev.caps if isinstance(c, MsixCap))
        cfg_write(self.dev, msix.offset + MsixCap.CONTROL, 2, MsixCap.CTRL_ENABLE)

    def setup(self, features: int, *, size: int = 8, msix: bool = True) -> None:
        cfg_write(self.dev, 4, 2, Command.MEMORY | Command.MASTER)
        if msix:
            self.enable_msix()
        assert self.negotiate(features)
        base = 0x10000
        for q in range(self.rd(t.NUM_QUEUES, 2)):
            ring = DriverRing(self.ram, base, size)
            base = ring.end
            self.rings.append(ring)
            self.wr(t.QUEUE_SELECT, 2, q)
            self.wr(t.QUEUE_SIZE, 2, size)
            self.wr(t.QUEUE_DESC, 4, ring.desc)  # low half ...
            self.wr(t.QUEUE_DESC + 4, 4, 0)      # ... and high half
            self.wr(t.QUEUE_DRIVER, 8, ring.avail)
            self.wr(t.QUEUE_DEVICE, 8, ring.used)
            self.wr(t.QUEUE_MSIX_VECTOR, 2, q + 1 if msix else t.NO_VECTOR)
            self.wr(t.QUEUE_ENABLE, 2, 1)
        if msix:
            self.wr(t.CONFIG_MSIX_VECTOR, 2, 0)
        self.wr(t.DEVICE_STATUS, 1, Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK
                | Status.DRIVER_OK)

    async def wait_used(self, q: int, count: int = 1) -> list[tuple[int, int]]:
        got: list[tuple[int, int]] = []
        with trio.fail_after(5):
            while len(got) < count:
                got += self.rings[q].take_used()
                await trio.sleep(0.001)
        return got

    async def reset(self) -> None:
        self.wr(t.DEVICE_STATUS, 1, 0)
        with trio.fail_after(5):
            while self.status():
                await trio.sleep(0.001)
        self.rings.clear()


def count_batches(dev: VirtioPciDevice) -> list[int]:
    """Record the size of every batch the worker's `process_batch` gets (an empty list
    afterwards: everything was served the handler's synchronous way)."""
    batches: list[int] = []
    process_batch = dev.process_batch

    async def counted(queue: Virtqueue, chains: list[Chain]) -> list[tuple[int, int]]:
        batches.append(len(chains))
        return await process_batch(queue, chains)

    dev.process_batch = counted  # type: ignore[method-assign]
    return batches

"""A virtio-pci driver in miniature over the real socket: registers by REGION_READ/WRITE
through our client, rings in the client's guest RAM (tests/devices/virtio/ring.py's
`DriverRing` on the RAM window's mmap). Polling only: no MSI-X, no interrupts.

Guest RAM is one window at address 0, so a guest address is an offset into the mmap; after
a migration `attach` points the rings at the destination's copy of that RAM.
"""

from __future__ import annotations

import mmap
import struct

import trio

from devices.sdk import Command
from devices.sdk.caps import CapId
from devices.virtio import spec as t
from devices.virtio.blk import SECTOR, ReqType
from devices.virtio.spec import Status
from vfiouser_srv.client import Client, RamWindow

from ..devices.virtio.ring import DriverRing

CONFIG_REGION = 7  # VFIO_PCI_CONFIG_REGION_INDEX
CAP_PTR = 0x34
_OUTHDR = struct.Struct("<IIQ")  # type, reserved, sector


def ram_of(window: RamWindow) -> mmap.mmap:
    """The client's own mapping of a RAM window (what `DriverRing` packs into)."""
    return window._map


class SocketVirtio:
    """Discovery, negotiation, one split queue and notification, over `client`."""

    def __init__(self, client: Client, ram: mmap.mmap) -> None:
        self.c = client
        self.ram = ram
        self.caps: dict[int, tuple[int, int]] = {}  # cfg_type -> (bar, offset)
        self.notify_mult = 0
        self.rings: list[DriverRing] = []

    def attach(self, client: Client, ram: mmap.mmap) -> None:
        """Carry on with another connection and RAM (a migration's destination)."""
        self.c, self.ram = client, ram
        for ring in self.rings:
            ring.ram = ram  # type: ignore[assignment]  # an mmap is a writable buffer too

    async def cfg(self, off: int, size: int) -> int:
        return int.from_bytes(await self.c.region_read(CONFIG_REGION, off, size), "little")

    async def discover(self) -> None:
        """Walk the capability list for the four virtio structures (as virtio_pci_modern)."""
        pos = await self.cfg(CAP_PTR, 1)
        for _ in range(48):
            if pos < 0x40:
                break
            ent = await self.cfg(pos & ~3, 2)
            if ent & 0xFF == CapId.VENDOR:
                cfg_type = await self.cfg(pos + 3, 1)
                self.caps[cfg_type] = (await self.cfg(pos + 4, 1), await self.cfg(pos + 8, 4))
                if cfg_type == t.CfgType.NOTIFY:
                    self.notify_mult = await self.cfg(pos + 16, 4)
            pos = ent >> 8
        assert {t.CfgType.COMMON, t.CfgType.NOTIFY} <= set(self.caps)

    async def rd(self, off: int, size: int) -> int:
        bar, base = self.caps[t.CfgType.COMMON]
        return int.from_bytes(await self.c.region_read(bar, base + off, size), "little")

    async def wr(self, off: int, size: int, value: int) -> None:
        bar, base = self.caps[t.CfgType.COMMON]
        await self.c.region_write(bar, base + off, value.to_bytes(size, "little"))

    async def setup(self, features: int, *, size: int, base: int) -> None:
        """Reset, negotiate `features`, lay out and enable every queue, DRIVER_OK."""
        await self.discover()
        cmd = Command.MEMORY | Command.MASTER
        await self.c.region_write(CONFIG_REGION, 4, cmd.to_bytes(2, "little"))
        await self.wr(t.DEVICE_STATUS, 1, 0)
        status = Status.ACKNOWLEDGE | Status.DRIVER
        await self.wr(t.DEVICE_STATUS, 1, status)
        await self.wr(t.DEVICE_FEATURE_SELECT, 4, 0)
        offered = await self.rd(t.DEVICE_FEATURE, 4)
        await self.wr(t.DEVICE_FEATURE_SELECT, 4, 1)
        offered |= await self.rd(t.DEVICE_FEATURE, 4) << 32
        assert features & offered == features, f"{features:#x} not all in {offered:#x}"
        await self.wr(t.DRIVER_FEATURE_SELECT, 4, 0)
        await self.wr(t.DRIVER_FEATURE, 4, features & 0xFFFF_FFFF)
        await self.wr(t.DRIVER_FEATURE_SELECT, 4, 1)
        await self.wr(t.DRIVER_FEATURE, 4, features >> 32)
        status |= Status.FEATURES_OK
        await self.wr(t.DEVICE_STATUS, 1, status)
        assert await self.rd(t.DEVICE_STATUS, 1) & Status.FEATURES_OK
        for q in range(await self.rd(t.NUM_QUEUES, 2)):
            ring = DriverRing(self.ram, base, size)  # type: ignore[arg-type]
            base = ring.end
            self.rings.append(ring)
            await self.wr(t.QUEUE_SELECT, 2, q)
            await self.wr(t.QUEUE_SIZE, 2, size)
            await self.wr(t.QUEUE_DESC, 8, ring.desc)
            await self.wr(t.QUEUE_DRIVER, 8, ring.avail)
            await self.wr(t.QUEUE_DEVICE, 8, ring.used)
            await self.wr(t.QUEUE_MSIX_VECTOR, 2, t.NO_VECTOR)
            await self.wr(t.QUEUE_ENABLE, 2, 1)
        await self.wr(t.DEVICE_STATUS, 1, status | Status.DRIVER_OK)
        assert await self.rd(t.DEVICE_STATUS, 1) == status | Status.DRIVER_OK

    async def kick(self, q: int = 0) -> None:
        bar, base = self.caps[t.CfgType.NOTIFY]
        await self.wr(t.QUEUE_SELECT, 2, q)
        off = await self.rd(t.QUEUE_NOTIFY_OFF, 2)
        await self.c.region_write(bar, base + off * self.notify_mult, q.to_bytes(2, "little"))

    async def wait_used(self, count: int, q: int = 0) -> list[tuple[int, int]]:
        """The next `count` used elements (head, bytes written), in the order used."""
        got: list[tuple[int, int]] = []
        with trio.fail_after(5):
            while len(got) < count:
                got += self.rings[q].take_used()
                if len(got) < count:
                    await trio.sleep(0.001)
        assert len(got) == count, f"{len(got) - count} completions more than requests"
        return got


class BlkRequests:
    """virtio-blk requests on queue 0, each in a slot of its own: header, status byte and
    one 4 KiB data buffer at fixed guest addresses, so they can be checked after a move."""

    BLOCK = 4096

    def __init__(self, dev: SocketVirtio, *, headers: int, statuses: int, data: int) -> None:
        self.dev = dev
        self.headers, self.statuses, self.data = headers, statuses, data
        self.by_head: dict[int, int] = {}  # outstanding: descriptor head -> slot

    def buffer(self, slot: int) -> int:
        return self.data + slot * self.BLOCK

    def status(self, slot: int) -> int:
        return self.dev.ram[self.statuses + slot]

    def publish(self, slot: int, rtype: int, block: int, payload: bytes = b"") -> int:
        """Make request `slot` available (no notification); returns its head."""
        ring = self.dev.rings[0]
        hdr, st, buf = self.headers + 16 * slot, self.statuses + slot, self.buffer(slot)
        _OUTHDR.pack_into(self.dev.ram, hdr, rtype, 0, block * self.BLOCK // SECTOR)
        self.dev.ram[st] = 0xFF  # not a status: shows a request the device never finished
        readable, writable = [(hdr, _OUTHDR.size)], [(st, 1)]
        if rtype == ReqType.OUT:
            self.dev.ram[buf : buf + self.BLOCK] = payload
            readable.append((buf, self.BLOCK))
        elif rtype == ReqType.IN:
            self.dev.ram[buf : buf + self.BLOCK] = bytes(self.BLOCK)
            writable.insert(0, (buf, self.BLOCK))
        head = ring.add(readable, writable)
        assert head not in self.by_head, "descriptor reused while outstanding"
        self.by_head[head] = slot
        return head

    def write(self, slot: int, block: int, payload: bytes) -> int:
        assert len(payload) == self.BLOCK
        return self.publish(slot, ReqType.OUT, block, payload)

    def read(self, slot: int, block: int) -> int:
        return self.publish(slot, ReqType.IN, block)

    def flush(self, slot: int) -> int:
        return self.publish(slot, ReqType.FLUSH, 0)

    async def complete(self, count: int) -> dict[int, int]:
        """Wait for `count` completions: {slot: bytes written}; each outstanding request
        completes once, and only outstanding ones do."""
        done: dict[int, int] = {}
        for head, written in await self.dev.wait_used(count):
            assert head in self.by_head, f"head {head} completed but was not outstanding"
            done[self.by_head.pop(head)] = written
        return done

    async def run(self, slot: int, rtype: int, block: int, payload: bytes = b"") -> int:
        """One request, notified and waited for; returns its status byte."""
        self.publish(slot, rtype, block, payload)
        await self.dev.kick()
        assert list(await self.complete(1)) == [slot]
        return self.status(slot)

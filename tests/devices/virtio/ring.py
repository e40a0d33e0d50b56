"""A driver-side split virtqueue in a bytearray (what Linux's virtio_ring does), for tests."""

from __future__ import annotations

import struct

from devices.virtio.virtqueue import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE

_DESC = struct.Struct("<QIHH")


class DriverRing:
    """Rings laid out at `base` in `ram`: descriptors, avail, used (each 4 KiB aligned)."""

    def __init__(self, ram: bytearray, base: int, size: int) -> None:
        self.ram = ram
        self.size = size
        self.desc = base
        self.avail = base + 16 * size
        self.used = (self.avail + 6 + 2 * size + 4095) & ~4095
        self.end = (self.used + 6 + 8 * size + 4095) & ~4095
        self.avail_idx = 0
        self.last_used = 0
        self.free = 0

    def u16(self, addr: int) -> int:
        return int(struct.unpack_from("<H", self.ram, addr)[0])

    def put_u16(self, addr: int, value: int) -> None:
        struct.pack_into("<H", self.ram, addr, value & 0xFFFF)

    def write_desc(self, table: int, index: int, addr: int, length: int, flags: int,
                   nxt: int = 0) -> None:
        _DESC.pack_into(self.ram, table + 16 * index, addr, length, flags, nxt)

    def add(self, readable: list[tuple[int, int]], writable: list[tuple[int, int]],
            *, indirect_at: int | None = None) -> int:
        """Make a chain available; returns its head. Descriptors are taken round-robin."""
        segs = [(a, n, 0) for a, n in readable] + [(a, n, DESC_F_WRITE) for a, n in writable]
        if indirect_at is not None:
            for i, (a, n, f) in enumerate(segs):
                last = i == len(segs) - 1
                self.write_desc(indirect_at, i, a, n, f | (0 if last else DESC_F_NEXT), i + 1)
            head = self.free
            self.write_desc(self.desc, head, indirect_at, 16 * len(segs), DESC_F_INDIRECT)
            self.free = (self.free + 1) % self.size
        else:
            idx = [(self.free + i) % self.size for i in range(len(segs))]
            head = idx[0]
            for i, (a, n, f) in enumerate(segs):
                last = i == len(segs) - 1
                nxt = 0 if last else idx[i + 1]
                self.write_desc(self.desc, idx[i], a, n, f | (0 if last else DESC_F_NEXT), nxt)
            self.free = (self.free + len(segs)) % self.size
        self.publish(head)
        return head

    def publish(self, head: int) -> None:
        self.put_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.put_u16(self.avail + 2, self.avail_idx)

    def used_idx(self) -> int:
        return self.u16(self.used + 2)

    def take_used(self) -> list[tuple[int, int]]:
        out = []
        while self.last_used != self.used_idx():
            slot = self.last_used % self.size
            out.append(struct.unpack_from("<II", self.ram, self.used + 4 + 8 * slot))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return [(int(a), int(b)) for a, b in out]

    def set_used_event(self, value: int) -> None:
        self.put_u16(self.avail + 4 + 2 * self.size, value)

    def avail_event(self) -> int:
        return self.u16(self.used + 4 + 8 * self.size)

"""A tiny NVMe host driver over the fake DMA port, shaped after what Linux's nvme does.

Guest memory layout (IOVAs in FakeDma's RAM)::

    0x010000  admin SQ (64 entries)    0x020000  admin CQ
    0x030000  I/O SQ 1                 0x040000  I/O CQ 1
    0x050000  shadow doorbells         0x051000  event indexes
    0x060000  PRP list pages           0x100000  data buffers
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import trio

from devices.nvme import Nvme
from devices.nvme.spec import CQE, SQE, AdminOpcode, Reg
from devices.sdk import Command as PciCommand
from devices.sdk import MsixCap

from ..fakes import FakeContext
from ..helpers import cfg_read, cfg_write

ASQ, ACQ, IOSQ, IOCQ = 0x10000, 0x20000, 0x30000, 0x40000
DBS, EIS = 0x50000, 0x51000
PRP_LISTS = 0x60000
DATA = 0x100000
QSIZE = 64
PAGE = 4096
RAM = 8 << 20


@dataclass
class Cqe:
    result: int
    sqhd: int
    sqid: int
    cid: int
    status: int  # status field without phase: SCT << 8 | SC, plus DNR bit 14

    @property
    def code(self) -> int:
        return self.status & 0x3FFF


@dataclass
class Queue:
    qid: int
    sq: int
    cq: int
    size: int
    tail: int = 0
    head: int = 0
    phase: int = 1
    shadow: bool = False
    cq_size: int = 0

    def __post_init__(self) -> None:
        self.cq_size = self.cq_size or self.size


class Host:
    def __init__(self, dev: Nvme, ctx: FakeContext) -> None:
        self.dev = dev
        self.ctx = ctx
        self.ram = ctx.dma.ram
        self.cid = 0
        self.queues: dict[int, Queue] = {}
        self.mmio_doorbells = 0

    # --- registers
    def rd(self, off: int, size: int = 4) -> int:
        return int.from_bytes(self.dev.region_read(0, off, size), "little")

    def wr(self, off: int, value: int, size: int = 4) -> None:
        self.dev.region_write(0, off, value.to_bytes(size, "little"))

    def enable_pci(self, msix: bool = True) -> None:
        cfg_write(self.dev, 0x04, 2, PciCommand.MEMORY | PciCommand.MASTER)
        if msix:
            assert self.dev.msix is not None
            off = self.dev.msix.offset + 2
            cfg_write(self.dev, off, 2, cfg_read(self.dev, off, 2) | MsixCap.CTRL_ENABLE)

    async def until(self, pred: object, timeout: float = 5.0) -> None:
        """Poll a condition the device reaches on its own (threads do not block trio)."""
        with trio.fail_after(timeout):
            while not pred():  # type: ignore[operator]
                await trio.sleep(0.001)

    async def enable(self, cc_extra: int = 0) -> None:
        self.ram[ACQ : ACQ + QSIZE * 16] = bytes(QSIZE * 16)  # as a driver allocates it
        self.wr(Reg.AQA, (QSIZE - 1) | (QSIZE - 1) << 16)
        self.wr(Reg.ASQ, ASQ, 8)
        self.wr(Reg.ACQ, ACQ, 8)
        self.wr(Reg.CC, 1 | (6 << 16) | (4 << 20) | cc_extra)
        await self.until(lambda: self.rd(Reg.CSTS) & 1)
        self.queues[0] = Queue(0, ASQ, ACQ, QSIZE)

    async def disable(self) -> None:
        self.wr(Reg.CC, (6 << 16) | (4 << 20))
        await self.until(lambda: not self.rd(Reg.CSTS) & 1)
        self.queues.clear()

    # --- commands
    def sqe(self, opcode: int, *, nsid: int = 0, prp1: int = 0, prp2: int = 0,
            cdw: tuple[int, ...] = (), flags: int = 0, cid: int | None = None) -> bytes:
        if cid is None:
            self.cid = (self.cid + 1) & 0xFFFF
            cid = self.cid
        dws = (*cdw, *(0,) * (6 - len(cdw)))
        return SQE.pack(opcode, flags, cid, nsid, 0, prp1, prp2, *dws)

    def submit(self, qid: int, entry: bytes, ring: bool = True) -> int:
        q = self.queues[qid]
        off = q.sq + q.tail * 64
        self.ram[off : off + 64] = entry
        q.tail = (q.tail + 1) % q.size
        if q.shadow:
            db = DBS + 2 * qid * self.dev.stride
            old = int.from_bytes(self.ram[db : db + 4], "little")
            self.ram[db : db + 4] = q.tail.to_bytes(4, "little")
            ei_addr = EIS + 2 * qid * self.dev.stride
            ei = int.from_bytes(self.ram[ei_addr : ei_addr + 4], "little")
            ring = ring and ((q.tail - ei - 1) & 0xFFFF) < ((q.tail - old) & 0xFFFF)
        if ring:
            self.mmio_doorbells += 1
            self.wr(0x1000 + 2 * qid * self.dev.stride, q.tail)
        return int(struct.unpack_from("<H", entry, 2)[0])

    def poll(self, qid: int) -> Cqe | None:
        q = self.queues[qid]
        off = q.cq + q.head * 16
        result, _, sqhd, sqid, cid, st = CQE.unpack_from(self.ram, off)
        if st & 1 != q.phase:
            return None
        q.head = (q.head + 1) % q.cq_size
        if q.head == 0:
            q.phase ^= 1
        if q.shadow:
            db = DBS + (2 * qid + 1) * self.dev.stride
            self.ram[db : db + 4] = q.head.to_bytes(4, "little")
        self.wr(0x1000 + (2 * qid + 1) * self.dev.stride, q.head)
        return Cqe(result, sqhd, sqid, cid, st >> 1)

    async def wait(self, qid: int, timeout: float = 5.0) -> Cqe:
        found: list[Cqe] = []

        def ready() -> bool:
            c = self.poll(qid)
            if c is not None:
                found.append(c)
            return bool(found)

        await self.until(ready, timeout)
        return found[0]

    async def cmd(self, qid: int, opcode: int, **kw: object) -> Cqe:
        cid = self.submit(qid, self.sqe(opcode, **kw))  # type: ignore[arg-type]
        cqe = await self.wait(qid)
        assert cqe.cid == cid and cqe.sqid == qid
        return cqe

    async def admin(self, opcode: int, **kw: object) -> Cqe:
        return await self.cmd(0, opcode, **kw)

    async def create_io_queues(self, qid: int = 1, size: int = QSIZE, vector: int = 1,
                               cq_size: int | None = None) -> None:
        cq_size = cq_size or size
        self.ram[IOCQ : IOCQ + cq_size * 16] = bytes(cq_size * 16)
        c = await self.admin(AdminOpcode.CREATE_CQ, prp1=IOCQ,
                             cdw=((cq_size - 1) << 16 | qid, vector << 16 | 0x3))
        assert c.code == 0, hex(c.status)
        c = await self.admin(AdminOpcode.CREATE_SQ, prp1=IOSQ, cdw=((size - 1) << 16 | qid,
                                                                   qid << 16 | 0x1))
        assert c.code == 0, hex(c.status)
        self.queues[qid] = Queue(qid, IOSQ, IOCQ, size, cq_size=cq_size)

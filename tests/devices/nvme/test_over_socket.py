"""The NVMe model behind the real server, driven by the real client over a socket.

Covers what the fake context cannot: guest RAM as mmap'd memfd windows (zero-copy views,
`pin_ranges`) or as DMA_READ/DMA_WRITE messages (chunked, one request at a time), and a
DMA_UNMAP that has to wait while a read into guest memory is still in a worker thread.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from devices.nvme import Nvme
from devices.nvme.backend import MemoryBackend
from devices.nvme.spec import CQE, SQE, AdminOpcode, IoOpcode, Reg
from devices.sdk import Command as PciCommand
from devices.sdk.interface import IrqIndex
from devices.sdk.msi import MsixCap
from vfiouser_srv.client import Client, open_client
from vfiouser_srv.server import Server

RAM_SIZE = 8 << 20
ASQ, ACQ, IOSQ, IOCQ, LISTS, DATA = 0x10000, 0x20000, 0x30000, 0x40000, 0x60000, 0x100000
PAGE = 4096
CONFIG = 7
MODES = pytest.mark.parametrize("shared", [True, False], ids=["mmap", "messages"])


class Driver:
    """Just enough of an NVMe host over the client (polling, no interrupts)."""

    def __init__(self, c: Client) -> None:
        self.c = c
        self.tails = {0: 0, 1: 0}
        self.heads = {0: 0, 1: 0}
        self.phase = {0: 1, 1: 1}
        self.cid = 0

    async def wr(self, off: int, value: int, size: int = 4) -> None:
        await self.c.region_write(0, off, value.to_bytes(size, "little"))

    async def rd(self, off: int) -> int:
        return int.from_bytes(await self.c.region_read(0, off, 4), "little")

    async def start(self) -> None:
        cmd = PciCommand.MEMORY | PciCommand.MASTER
        await self.c.region_write(CONFIG, 4, cmd.to_bytes(2, "little"))
        await self.wr(Reg.AQA, 63 | 63 << 16)
        await self.wr(Reg.ASQ, ASQ, 8)
        await self.wr(Reg.ACQ, ACQ, 8)
        await self.wr(Reg.CC, 1 | 6 << 16 | 4 << 20)
        with trio.fail_after(5):
            while not await self.rd(Reg.CSTS) & 1:
                await trio.sleep(0.001)
        assert (await self.cmd(0, AdminOpcode.CREATE_CQ, prp1=IOCQ, cdw=(1 | 63 << 16, 1)))[1] == 0
        assert (await self.cmd(0, AdminOpcode.CREATE_SQ, prp1=IOSQ,
                               cdw=(1 | 63 << 16, 1 << 16 | 1)))[1] == 0

    async def submit(self, qid: int, opcode: int, *, nsid: int = 0, prp1: int = 0,
                     prp2: int = 0, cdw: tuple[int, ...] = ()) -> int:
        self.cid += 1
        dws = (*cdw, *(0,) * (6 - len(cdw)))
        sq = ASQ if qid == 0 else IOSQ
        self.c.memory.write(sq + self.tails[qid] * 64,
                            SQE.pack(opcode, 0, self.cid, nsid, 0, prp1, prp2, *dws))
        self.tails[qid] = (self.tails[qid] + 1) % 64
        await self.wr(0x1000 + 8 * qid, self.tails[qid])
        return self.cid

    async def reap(self, qid: int) -> tuple[int, int]:
        cq = ACQ if qid == 0 else IOCQ
        with trio.fail_after(5):
            while True:
                _, _, _, _, cid, st = CQE.unpack(self.c.memory.read(cq + self.heads[qid] * 16,
                                                                    16))
                if st & 1 == self.phase[qid]:
                    break
                await trio.sleep(0.001)
        self.heads[qid] = (self.heads[qid] + 1) % 64
        if self.heads[qid] == 0:
            self.phase[qid] ^= 1
        await self.wr(0x1000 + 8 * qid + 4, self.heads[qid])
        return cid, st >> 1

    async def msix_queues(self, m: Nvme) -> int:
        """MSI-X on, vector 1 wired to a new eventfd (SET_IRQS, as QEMU does), and the I/O
        queue pair created again with its CQ interrupting on vector 1 (as Linux does);
        returns the client's end of the eventfd (the caller closes it)."""
        assert m.msix is not None
        off = m.msix.offset + 2
        ctrl = int.from_bytes(await self.c.region_read(CONFIG, off, 2), "little")
        await self.c.region_write(CONFIG, off, (ctrl | MsixCap.CTRL_ENABLE).to_bytes(2, "little"))
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        await self.c.set_irq_eventfds(IrqIndex.MSIX, 1, [efd])
        assert (await self.cmd(0, AdminOpcode.DELETE_SQ, cdw=(1,)))[1] == 0
        assert (await self.cmd(0, AdminOpcode.DELETE_CQ, cdw=(1,)))[1] == 0
        assert (await self.cmd(0, AdminOpcode.CREATE_CQ, prp1=IOCQ,
                               cdw=(1 | 63 << 16, 1 | 2 | 1 << 16)))[1] == 0
        assert (await self.cmd(0, AdminOpcode.CREATE_SQ, prp1=IOSQ,
                               cdw=(1 | 63 << 16, 1 << 16 | 1)))[1] == 0
        self.tails[1] = self.heads[1] = 0
        self.phase[1] = 1
        return efd

    async def cmd(self, qid: int, opcode: int, **kw: object) -> tuple[int, int]:
        cid = await self.submit(qid, opcode, **kw)  # type: ignore[arg-type]
        got = await self.reap(qid)
        assert got[0] == cid
        return got


@asynccontextmanager
async def served(nursery: trio.Nursery, tmp_path: Path, shared: bool,
                 dev: Nvme | None = None) -> AsyncIterator[tuple[Server, Driver, Nvme]]:
    model = dev or Nvme(size="4M")
    srv = Server()
    sock = tmp_path / "nvme.sock"
    srv.add_device("nvme", model, socket_path=str(sock))
    await nursery.start(srv.serve)
    async with open_client(sock, reply_timeout=10) as c:
        await c.memory.add_ram(0, RAM_SIZE, shared=shared)
        d = Driver(c)
        await d.start()
        yield srv, d, model


def prp_list(c: Client, base: int, pages: int) -> int:
    entries = [base + i * PAGE for i in range(1, pages)]
    c.memory.write(LISTS, struct.pack(f"<{len(entries)}Q", *entries))
    return LISTS


@MODES
async def test_large_io_round_trip(nursery: trio.Nursery, tmp_path: Path, shared: bool) -> None:
    async with served(nursery, tmp_path, shared) as (srv, d, _model):
        data = os.urandom(512 << 10)  # 128 pages: a PRP list, 8 message-mode chunks
        d.c.memory.write(DATA, data)
        prp2 = prp_list(d.c, DATA, 128)
        assert (await d.cmd(1, IoOpcode.WRITE, nsid=1, prp1=DATA, prp2=prp2,
                            cdw=(8, 0, 1023)))[1] == 0
        dst = DATA + (1 << 20)
        prp2 = prp_list(d.c, dst, 128)
        assert (await d.cmd(1, IoOpcode.READ, nsid=1, prp1=dst, prp2=prp2,
                            cdw=(8, 0, 1023)))[1] == 0
        assert d.c.memory.read(dst, len(data)) == data
        container = srv.devices["nvme"].session.container  # type: ignore[union-attr]
        assert container is not None and all(w.pins == 0 for w in container)


class GatedBackend(MemoryBackend):
    threaded = True

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.entered = threading.Event()
        self.gate = threading.Event()

    def readinto_nowait(self, offset: int, bufs: Sequence[memoryview]) -> int:
        return 0

    def readinto(self, offset: int, bufs: Sequence[memoryview]) -> None:
        self.entered.set()
        self.gate.wait(5)
        super().readinto(offset, bufs)


async def test_unmap_waits_for_a_read_in_flight(nursery: trio.Nursery, tmp_path: Path) -> None:
    model = Nvme(size="4M")
    ns = model.worker.namespaces[1]
    ns.backend.close()
    backend = ns.backend = GatedBackend(4 << 20)
    backend.write(0, [b"\x77" * PAGE])
    async with served(nursery, tmp_path, True, model) as (srv, d, _):
        await d.submit(1, IoOpcode.READ, nsid=1, prp1=DATA, cdw=(0, 0, 7))
        await trio.to_thread.run_sync(backend.entered.wait, 5)
        container = srv.devices["nvme"].session.container  # type: ignore[union-attr]
        assert container is not None and any(w.pins for w in container)
        unmapped = trio.Event()

        async def unmap() -> None:
            await d.c.dma_unmap(0, RAM_SIZE)
            unmapped.set()

        nursery.start_soon(unmap)
        await trio.sleep(0.1)
        assert not unmapped.is_set()  # held by the pin
        backend.gate.set()
        with trio.fail_after(5):
            await unmapped.wait()
        # the data landed in guest RAM before the window went away
        assert d.c.memory.read(DATA, PAGE) == b"\x77" * PAGE

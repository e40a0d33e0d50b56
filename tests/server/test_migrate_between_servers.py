"""A device migrated from one server to another by our client (save_device on the source,
guest RAM copied the way a VMM would, restore_device on the destination); afterwards the
device answers as it would have without the migration."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
import trio

from devices.edu import DMA_START, DmaCmd, Edu, Reg
from devices.nvme import Nvme
from devices.nvme.spec import IoOpcode
from vfiouser_srv.client import Client

from ..devices.nvme.test_over_socket import DATA, RAM_SIZE, Driver
from .conftest import MakeServer, open_client, python_engine_only
from .test_edu_client import bus_master, rd64, wr64

pytestmark = [pytest.mark.usefixtures("no_fd_leak"), python_engine_only("migration v2")]

RAM = 0x10000


async def move_ram(src: Client, dst: Client, address: int, size: int, shared: bool) -> None:
    """What the VMM does with guest RAM: the destination gets the same contents."""
    await dst.memory.add_ram(address, size, shared=shared)
    dst.memory.write(address, src.memory.read(address, size))


@pytest.mark.parametrize("shared", [True, False], ids=["mmap", "messages"])
async def test_edu_mid_dma(make_server: MakeServer, shared: bool) -> None:
    srv = await make_server({"src": Edu(), "dst": Edu()})
    data = os.urandom(4096)
    async with open_client(srv, "src") as a, open_client(srv, "dst") as b:
        await a.memory.add_ram(RAM, 0x4000, shared=shared)
        a.memory.write(RAM, data)
        await bus_master(a)
        await wr64(a, Reg.DMA_SRC, RAM)
        await wr64(a, Reg.DMA_DST, DMA_START)
        await wr64(a, Reg.DMA_CNT, len(data))
        await wr64(a, Reg.DMA_CMD, DmaCmd.RUN)  # RAM -> edu's buffer, in a device task
        state = await a.save_device(chunk=1000)  # quiesce lets the DMA finish or carries it
        await move_ram(a, b, RAM, 0x4000, shared)
        await b.restore_device(state, chunk=1000)
        with trio.fail_after(5):
            while await rd64(b, Reg.DMA_CMD) & DmaCmd.RUN:
                await trio.sleep(0.001)
        # the buffer holds what the DMA read, on the destination: copy it back out
        await wr64(b, Reg.DMA_SRC, DMA_START)
        await wr64(b, Reg.DMA_DST, RAM + 0x2000)
        await wr64(b, Reg.DMA_CMD, DmaCmd.RUN | DmaCmd.TO_RAM)
        with trio.fail_after(5):
            while await rd64(b, Reg.DMA_CMD) & DmaCmd.RUN:
                await trio.sleep(0.001)
        assert b.memory.read(RAM + 0x2000, len(data)) == data
        # the factorial register and liveness answer as before
        await b.region_write(0, Reg.FACTORIAL, struct.pack("<I", 5))
        assert await b.region_read(0, Reg.FACTORIAL, 4) == struct.pack("<I", 120)




@pytest.mark.parametrize(
    "shared", [True, False], ids=["mmap", "messages"]
)
async def test_nvme_with_queued_io(make_server: MakeServer, tmp_path: Path, shared: bool) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4 << 20))
    srv = await make_server({"src": Nvme(backing=str(disk)), "dst": Nvme(backing=str(disk))})
    blocks = [os.urandom(4096) for _ in range(8)]
    async with open_client(srv, "src") as a, open_client(srv, "dst") as b:
        await a.memory.add_ram(0, RAM_SIZE, shared=shared)
        d = Driver(a)
        await d.start()
        cids = []
        for i, block in enumerate(blocks):  # queued: rung, not reaped
            a.memory.write(DATA + i * 4096, block)
            cids.append(await d.submit(1, IoOpcode.WRITE, nsid=1, prp1=DATA + i * 4096,
                                       cdw=(i * 8, 0, 7)))
        state = await a.save_device()
        await move_ram(a, b, 0, RAM_SIZE, shared)
        e = Driver(b)
        e.tails, e.heads, e.phase, e.cid = d.tails, d.heads, d.phase, d.cid
        done: set[int] = set()
        await b.restore_device(state)
        for _ in blocks:
            cid, status = await e.reap(1)
            assert status == 0
            done.add(cid)
        assert done == set(cids)
        for i, block in enumerate(blocks):
            dst = DATA + (1 << 20) + i * 4096
            assert (await e.cmd(1, IoOpcode.READ, nsid=1, prp1=dst, cdw=(i * 8, 0, 7)))[1] == 0
            assert b.memory.read(dst, 4096) == block

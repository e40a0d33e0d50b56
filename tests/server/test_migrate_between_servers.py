"""A device migrated from one server to another by our client (save_device on the source,
guest RAM copied the way a VMM would, restore_device on the destination); afterwards the
device answers as it would have without the migration."""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio

from devices.edu import DMA_START, DmaCmd, Edu, Reg
from devices.nvme import Nvme
from devices.nvme.spec import IoOpcode
from devices.virtio.blk import BlkFeature, ReqStatus, ReqType, VirtioBlk
from devices.virtio.spec import Feature
from vfiouser_srv.client import Client

from ..devices.nvme.test_over_socket import DATA, RAM_SIZE, Driver
from .conftest import MakeServer, open_client, python_engine_only
from .test_edu_client import bus_master, rd64, wr64
from .virtio_socket_driver import BlkRequests, SocketVirtio, ram_of

pytestmark = [pytest.mark.usefixtures("no_fd_leak"), python_engine_only("migration v2")]

RAM = 0x10000


async def move_ram(src: Client, dst: Client, address: int, size: int, shared: bool) -> None:
    """What the VMM does with guest RAM: the destination gets the same contents."""
    await dst.memory.add_ram(address, size, shared=shared)
    dst.memory.write(address, src.memory.read(address, size))


@pytest.mark.parametrize("shared", [True, False], ids=["mmap", "messages"])
async def test_edu_mid_dma(make_server: MakeServer, shared: bool) -> None:
    srv = await make_server({"src": Edu(), "dst": Edu()})
    async with open_client(srv, "src") as a, open_client(srv, "dst") as b:
        await migrate_edu_mid_dma(a, b, shared)


async def migrate_edu_mid_dma(a: Client, b: Client, shared: bool) -> None:
    """edu's DMA started on `a`'s device, the device migrated to `b`'s mid-transfer."""
    data = os.urandom(4096)
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
    async with open_client(srv, "src") as a, open_client(srv, "dst") as b:
        await migrate_nvme_with_queued_io(a, b, shared)


async def migrate_nvme_with_queued_io(a: Client, b: Client, shared: bool) -> None:
    """Eight writes rung on `a`'s nvme but not reaped; after the migration `b`'s nvme (same
    image) completes each once and reads the data back."""
    blocks = [os.urandom(4096) for _ in range(8)]
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


@pytest.mark.parametrize("shared", [True, False], ids=["mmap", "messages"])
async def test_virtio_blk_with_queued_io(make_server: MakeServer, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch, shared: bool) -> None:
    """Requests in flight and requests only made available (and notified) at the source
    complete once each on the destination, which shares the image; no notification is
    repeated there (the source took it), so the destination must find them in the ring.

    The source's image writes are held at a gate while its worker has the first batch, so
    the second batch is certainly still in the avail ring when the save begins: with mmap'd
    RAM the first batch finishes during the quiesce; by message its DMA waits for the read
    loop (busy with the SET) until the grace ends, and it is carried as popped heads."""
    disk = tmp_path / "blk.img"
    disk.write_bytes(bytes(1 << 20))
    src = VirtioBlk(path=str(disk))
    a_srv = await make_server({"src": src})
    b_srv = await make_server({"dst": VirtioBlk(path=str(disk))})
    block = BlkRequests.BLOCK
    pattern = [os.urandom(block) for _ in range(4)]  # blocks 0..3
    new = [os.urandom(block) for _ in range(4)]  # blocks 8..11, written while queued
    features = int(Feature.VERSION_1 | BlkFeature.FLUSH)
    async with open_client(a_srv, "src") as a, open_client(b_srv, "dst") as b:
        win = await a.memory.add_ram(0, RAM_SIZE, shared=shared)
        dev = SocketVirtio(a, ram_of(win))
        await dev.setup(features, size=64, base=0x10000)
        reqs = BlkRequests(dev, headers=0x20000, statuses=0x30000, data=0x100000)
        for i, data in enumerate(pattern):  # the pattern, written and completed
            reqs.write(i, i, data)
        await dev.kick()
        assert await reqs.complete(4) == dict.fromkeys(range(4), 1)
        assert [reqs.status(i) for i in range(4)] == [ReqStatus.OK] * 4

        entered, gate = threading.Event(), threading.Event()
        write = src.backend.write

        def gated_write(offset: int, bufs: Sequence[bytes | bytearray | memoryview]) -> None:
            entered.set()
            gate.wait(5)
            write(offset, bufs)

        monkeypatch.setattr(src.backend, "write", gated_write)
        # queued: slots 4..11 alternate a write of new[k] to block 8 + k and a read of
        # pattern[k] from block k; 4..7 are in the worker's hands, 8..11 in the avail ring
        state = b""
        try:
            for k in range(4):
                if k == 2:
                    await dev.kick()
                    assert await trio.to_thread.run_sync(entered.wait, 5)
                reqs.write(4 + 2 * k, 8 + k, new[k])
                reqs.read(5 + 2 * k, k)
            await dev.kick()  # taken by the source, whose worker is busy: not repeated

            async def save() -> None:
                nonlocal state
                state = await a.save_device()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(save)
                with trio.fail_after(5):
                    while not src.quiescing:
                        await trio.sleep(0.001)
                gate.set()
        finally:
            gate.set()
        used_at_save = dev.rings[0].used_idx()
        assert 4 <= used_at_save <= 8, "the second batch was still queued at the save"
        assert all(reqs.status(s) == 0xFF for s in range(8, 12))

        await move_ram(a, b, 0, RAM_SIZE, shared)
        dev.attach(b, ram_of(b.memory.windows[0]))
        await b.restore_device(state)
        done = await reqs.complete(8)  # whatever the source finished, and the rest
        assert done == {s: 1 if s % 2 == 0 else block + 1 for s in range(4, 12)}
        assert [reqs.status(s) for s in range(4, 12)] == [ReqStatus.OK] * 8
        for k in range(4):
            assert b.memory.read(reqs.buffer(5 + 2 * k), block) == pattern[k]

        # new requests on the destination: the queued writes are on the disk, I/O goes on
        for k in range(4):
            reqs.read(12 + k, 8 + k)
        await dev.kick()
        assert await reqs.complete(4) == dict.fromkeys(range(12, 16), block + 1)
        for k in range(4):
            assert reqs.status(12 + k) == ReqStatus.OK
            assert b.memory.read(reqs.buffer(12 + k), block) == new[k]
        last = os.urandom(block)
        assert await reqs.run(16, ReqType.OUT, 12, last) == ReqStatus.OK
        assert await reqs.run(17, ReqType.FLUSH, 0) == ReqStatus.OK
        assert await reqs.run(18, ReqType.IN, 12) == ReqStatus.OK
        assert b.memory.read(reqs.buffer(18), block) == last
    image = disk.read_bytes()
    blocks = [image[i * block : (i + 1) * block] for i in range(len(image) // block)]
    assert blocks[:4] == pattern and blocks[8:12] == new and blocks[12] == last
    assert blocks[4:8] == [bytes(block)] * 4 and set(blocks[13:]) == {bytes(block)}

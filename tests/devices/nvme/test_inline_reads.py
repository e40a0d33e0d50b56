"""Cached reads served inside the doorbell's register write: bounded per doorbell, left
to the command's task when guest memory is not mmap'd, nothing left behind for a reset."""

from __future__ import annotations

import os
import struct

import pytest
import trio

from devices.nvme.spec import IoOpcode, Reg

from ..fakes import FakeContext
from .host import DATA, PAGE, PRP_LISTS, Host
from .test_io import MessageDma, rw

IO = IoOpcode


@pytest.fixture
async def io(host: Host) -> Host:
    await host.create_io_queues()
    return host


def fill(io: Host, size: int) -> bytes:
    data = os.urandom(size)
    io.dev.worker.namespaces[1].backend.write(0, [data])
    return data


def read_sqe(io: Host, dst: int, offset: int, size: int, lists: int) -> bytes:
    """A read of `size` bytes at byte `offset` into the contiguous buffer at `dst`."""
    pages = [dst + i * PAGE for i in range(1, size // PAGE)]
    if len(pages) > 1:
        io.ram[lists : lists + 8 * len(pages)] = struct.pack(f"<{len(pages)}Q", *pages)
        prp2 = lists
    else:
        prp2 = pages[0] if pages else 0
    return io.sqe(IO.READ, nsid=1, prp1=dst, prp2=prp2, cdw=rw(offset // 512, size // 512))


def drain(io: Host) -> list[int]:
    """Completions already posted (nothing awaited): their command ids."""
    out = []
    while (c := io.poll(1)) is not None:
        assert c.code == 0, hex(c.status)
        out.append(c.cid)
    return out


async def test_one_doorbell_reads_at_most_inline_bytes(io: Host) -> None:
    """Five cached 512 KiB reads behind one doorbell: the register write serves reads
    until INLINE_BYTES are spent (two), one interrupt for them; the tasks read the rest."""
    from devices.nvme.doorbell_io import INLINE_BYTES

    size = 512 << 10
    n = 2 * INLINE_BYTES // size + 1
    data = fill(io, n * size)
    await trio.testing.wait_all_tasks_blocked()
    triggers = io.ctx.irq.triggers
    before = len(triggers)
    cids = [io.submit(1, read_sqe(io, DATA + i * size, i * size, size, PRP_LISTS + i * PAGE),
                      ring=i == n - 1) for i in range(n)]
    inline = drain(io)
    assert inline == cids[: INLINE_BYTES // size]
    assert triggers[before:] == [(2, 1)]
    assert len(io.dev.worker._inflight) == n - len(inline)
    rest = [(await io.wait(1)).cid for _ in cids[len(inline) :]]
    assert sorted(rest) == cids[len(inline) :]
    assert bytes(io.ram[DATA : DATA + n * size]) == data


async def test_small_reads_are_bounded_by_count_not_bytes(io: Host) -> None:
    """Many 4 KiB reads: the command bound (FETCH_NOW_LIMIT) ends the handler's part."""
    from devices.nvme.doorbell_io import FETCH_NOW_LIMIT

    data = fill(io, 40 * PAGE)
    await trio.testing.wait_all_tasks_blocked()
    cids = [io.submit(1, read_sqe(io, DATA + i * PAGE, i * PAGE, PAGE, 0), ring=i == 39)
            for i in range(40)]
    assert drain(io) == cids[:FETCH_NOW_LIMIT]
    rest = [(await io.wait(1)).cid for _ in range(40 - FETCH_NOW_LIMIT)]
    assert sorted(rest) == cids[FETCH_NOW_LIMIT:]
    assert bytes(io.ram[DATA : DATA + 40 * PAGE]) == data


class DataByMessage(MessageDma):
    """Rings and PRP lists mmap'd, data buffers (from DATA on) only by DMA messages."""

    def view(self, address: int, size: int, *, write: bool = False) -> memoryview | None:
        if address + size > DATA:
            return super().view(address, size, write=write)
        return self.inner.view(address, size, write=write)  # type: ignore[attr-defined, no-any-return]


async def test_data_not_mmapped_goes_to_the_task(io: Host, nvme_ctx: FakeContext) -> None:
    """The doorbell still fetches (the ring is mmap'd), but a read whose buffers are not
    is completed by its task through DMA_WRITE messages."""
    data = fill(io, 4 * PAGE)
    nvme_ctx._dma = DataByMessage(nvme_ctx._dma)  # type: ignore[assignment]
    await trio.testing.wait_all_tasks_blocked()
    cid = io.submit(1, read_sqe(io, DATA, 0, 4 * PAGE, PRP_LISTS))
    assert io.dev.worker.sqs[1].pending == 0  # fetched by the register write
    assert io.poll(1) is None and len(io.dev.worker._inflight) == 1
    c = await io.wait(1)
    assert c.cid == cid and c.code == 0
    assert bytes(io.ram[DATA : DATA + 4 * PAGE]) == data


async def test_reset_after_inline_reads(io: Host) -> None:
    """An inline read holds nothing once the register write returns: a reset right after
    finds no command in flight or carried, and the next queues start clean (phase 1)."""
    data = fill(io, 8 * PAGE)
    await trio.testing.wait_all_tasks_blocked()
    for i in range(3):
        io.submit(1, read_sqe(io, DATA + i * 2 * PAGE, i * 2 * PAGE, 2 * PAGE, 0),
                  ring=i == 2)
    assert len(drain(io)) == 3
    w = io.dev.worker
    assert not w._inflight and not w.carried
    io.wr(Reg.CC, (6 << 16) | (4 << 20))
    await io.until(lambda: not io.rd(Reg.CSTS) & 1)
    io.queues.clear()
    assert not w.sqs and not w.carried
    await io.enable()
    await io.create_io_queues()
    io.ram[DATA : DATA + 8 * PAGE] = bytes(8 * PAGE)
    await trio.testing.wait_all_tasks_blocked()
    cid = io.submit(1, read_sqe(io, DATA, 0, 8 * PAGE, PRP_LISTS))
    assert drain(io) == [cid]
    assert bytes(io.ram[DATA : DATA + 8 * PAGE]) == data

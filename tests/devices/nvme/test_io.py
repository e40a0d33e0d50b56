"""NVM I/O commands over PRPs, status paths, backpressure, shadow doorbells, reset mid-I/O."""

from __future__ import annotations

import os
import select
import statistics
import struct
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import trio

from devices.nvme import Nvme
from devices.nvme.backend import FileBackend, MemoryBackend
from devices.nvme.spec import DNR, AdminOpcode, FeatureId, IoOpcode, Reg, Status
from devices.sdk.bits import BytesLike
from devices.sdk.interface import IrqIndex
from vfiouser_srv.idlewait import HOT_WAIT

from ..fakes import FakeContext
from .host import DATA, DBS, EIS, PAGE, PRP_LISTS, Host

IO = IoOpcode
BLOCKS = (4 << 20) // 512


def rw(slba: int, nlb: int, extra: int = 0) -> tuple[int, int, int]:
    return slba & 0xFFFFFFFF, slba >> 32, (nlb - 1) | extra


async def write_read(h: Host, data: bytes, slba: int = 0, *, prp2: int = 0,
                     dst: int = DATA + 0x80000) -> bytes:
    n = len(data)
    h.ram[DATA : DATA + n] = data

    def prp2_for(base: int, lists: int) -> int:
        if n <= 2 * PAGE:
            return base + PAGE
        pages = [base + i * PAGE for i in range(1, -(-n // PAGE))]
        h.ram[lists : lists + 8 * len(pages)] = struct.pack(f"<{len(pages)}Q", *pages)
        return lists

    c = await h.cmd(1, IO.WRITE, nsid=1, prp1=DATA, prp2=prp2 or prp2_for(DATA, PRP_LISTS),
                    cdw=rw(slba, n // 512))
    assert c.code == 0, hex(c.status)
    c = await h.cmd(1, IO.READ, nsid=1, prp1=dst, prp2=prp2_for(dst, PRP_LISTS + PAGE),
                    cdw=rw(slba, n // 512))
    assert c.code == 0, hex(c.status)
    return bytes(h.ram[dst : dst + n])


@pytest.fixture
async def io(host: Host) -> Host:
    await host.create_io_queues()
    return host


async def test_write_read_two_pages(io: Host) -> None:
    data = os.urandom(2 * PAGE)
    assert await write_read(io, data, slba=40) == data


async def test_write_read_with_prp_list_scattered(io: Host) -> None:
    pages = [DATA + 0x40000 + i * 3 * PAGE for i in range(6)]
    data = os.urandom(6 * PAGE)
    for i, p in enumerate(pages):
        io.ram[p : p + PAGE] = data[i * PAGE : (i + 1) * PAGE]
    io.ram[PRP_LISTS : PRP_LISTS + 40] = struct.pack("<5Q", *pages[1:])
    c = await io.cmd(1, IO.WRITE, nsid=1, prp1=pages[0], prp2=PRP_LISTS, cdw=rw(8, 48))
    assert c.code == 0
    ns = io.dev.worker.namespaces[1].backend
    out = memoryview(bytearray(6 * PAGE))
    ns.readinto(8 * 512, [out])
    assert bytes(out) == data


async def test_unaligned_prp1_offset(io: Host) -> None:
    io.ram[DATA + 512 : DATA + 1024] = b"x" * 512
    c = await io.cmd(1, IO.WRITE, nsid=1, prp1=DATA + 512, cdw=rw(0, 1))
    assert c.code == 0
    c = await io.cmd(1, IO.READ, nsid=1, prp1=DATA + 0x10000 + 3584, prp2=DATA + 0x20000,
                     cdw=rw(0, 2))
    assert c.code == 0
    assert io.ram[DATA + 0x10000 + 3584 : DATA + 0x10000 + 4096] == b"x" * 512


@pytest.mark.parametrize(("nsid", "opcode", "cdw", "flags", "want"), [
    (2, IO.READ, rw(0, 1), 0, Status.INVALID_NAMESPACE),
    (0, IO.WRITE, rw(0, 1), 0, Status.INVALID_NAMESPACE),
    (1, IO.READ, rw(BLOCKS - 1, 2), 0, Status.LBA_OUT_OF_RANGE),
    (1, IO.WRITE, rw(1 << 40, 1), 0, Status.LBA_OUT_OF_RANGE),
    (1, IO.WRITE_ZEROES, rw(BLOCKS, 1), 0, Status.LBA_OUT_OF_RANGE),
    (1, IO.READ, rw(0, 1), 1 << 6, Status.INVALID_FIELD),       # SGL asked for
    (1, IO.READ, rw(0, 2049 * 2), 0, Status.INVALID_FIELD),     # > MDTS (1 MiB)
    (1, IO.COMPARE, rw(0, 1), 0, Status.INVALID_OPCODE),
    (1, 0x7E, (), 0, Status.INVALID_OPCODE),
])
async def test_io_errors(io: Host, nsid: int, opcode: int, cdw: tuple[int, ...], flags: int,
                         want: Status) -> None:
    c = await io.cmd(1, opcode, nsid=nsid, prp1=DATA, prp2=DATA + PAGE, cdw=cdw, flags=flags)
    assert c.code == want and c.status & DNR


async def test_bad_prps_and_unmapped_memory(io: Host) -> None:
    c = await io.cmd(1, IO.READ, nsid=1, prp1=DATA + 2, cdw=rw(0, 1))
    assert c.code == Status.INVALID_PRP_OFFSET
    c = await io.cmd(1, IO.READ, nsid=1, prp1=DATA, prp2=DATA + 0x10 + PAGE, cdw=rw(0, 16))
    assert c.code == Status.INVALID_PRP_OFFSET
    c = await io.cmd(1, IO.READ, nsid=1, prp1=1 << 40, cdw=rw(0, 1))
    assert c.code == Status.DATA_TRANSFER_ERROR
    c = await io.cmd(1, IO.WRITE, nsid=1, prp1=DATA, prp2=1 << 40, cdw=rw(0, 16))
    assert c.code == Status.DATA_TRANSFER_ERROR  # PRP list itself unreachable
    # the controller is still fine
    assert await write_read(io, b"ok" * 256) == b"ok" * 256


async def test_write_zeroes_and_deallocate(io: Host) -> None:
    data = b"\xaa" * (4 * PAGE)
    await write_read(io, data, slba=0)
    assert (await io.cmd(1, IO.WRITE_ZEROES, nsid=1, cdw=rw(0, 8))).code == 0
    ranges = struct.pack("<IIQ", 0, 8, 16) + struct.pack("<IIQ", 0, 0, 999999)  # 2nd: empty
    io.ram[DATA : DATA + 32] = ranges
    c = await io.cmd(1, IO.DATASET_MANAGEMENT, nsid=1, prp1=DATA, cdw=(1, 1 << 2))
    assert c.code == 0
    out = memoryview(bytearray(4 * PAGE))
    io.dev.worker.namespaces[1].backend.readinto(0, [out])
    assert bytes(out[: 8 * 512]) == bytes(8 * 512)
    assert bytes(out[8 * 512 : 16 * 512]) == b"\xaa" * 8 * 512
    assert bytes(out[16 * 512 : 24 * 512]) == bytes(8 * 512)
    assert bytes(out[24 * 512 :]) == b"\xaa" * 8 * 512
    # a range out of bounds fails the whole command; no attribute = a hint, success
    io.ram[DATA : DATA + 16] = struct.pack("<IIQ", 0, 8, BLOCKS - 4)
    c = await io.cmd(1, IO.DATASET_MANAGEMENT, nsid=1, prp1=DATA, cdw=(0, 1 << 2))
    assert c.code == Status.LBA_OUT_OF_RANGE
    assert (await io.cmd(1, IO.DATASET_MANAGEMENT, nsid=1, prp1=DATA, cdw=(0, 0))).code == 0


class CountingBackend(MemoryBackend):
    threaded = True

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.flushes = 0
        self.gate: threading.Event | None = None
        #: reads that entered `readinto` (in a worker thread)
        self.reads_started = 0

    def flush(self) -> None:
        self.flushes += 1

    def readinto_nowait(self, offset: int, bufs: Sequence[memoryview]) -> int:
        return 0

    def readinto(self, offset: int, bufs: Sequence[memoryview]) -> None:
        self.reads_started += 1
        if self.gate is not None:
            self.gate.wait(5)
        super().readinto(offset, bufs)

    def write(self, offset: int, bufs: Sequence[BytesLike]) -> None:
        super().write(offset, bufs)


def use_counting_backend(dev: Nvme) -> CountingBackend:
    ns = dev.worker.namespaces[1]
    ns.backend.close()
    ns.backend = CountingBackend(4 << 20)
    return ns.backend


async def test_flush_fua_and_write_cache_off(io: Host) -> None:
    be = use_counting_backend(io.dev)
    assert (await io.cmd(1, IO.FLUSH, nsid=1)).code == 0
    assert (await io.cmd(1, IO.FLUSH, nsid=0xFFFFFFFF)).code == 0
    assert (await io.cmd(1, IO.FLUSH, nsid=7)).code == Status.INVALID_NAMESPACE
    assert be.flushes == 2
    c = await io.cmd(1, IO.WRITE, nsid=1, prp1=DATA, cdw=rw(0, 1, 1 << 30))  # FUA
    assert c.code == 0 and be.flushes == 3
    await io.admin(AdminOpcode.SET_FEATURES, cdw=(0x06, 0))  # write cache off: flushed
    assert be.flushes == 4
    await io.cmd(1, IO.WRITE, nsid=1, prp1=DATA, cdw=rw(0, 1))
    assert be.flushes == 5


async def test_shutdown_flushes(io: Host) -> None:
    be = use_counting_backend(io.dev)
    io.wr(Reg.CC, io.rd(Reg.CC) | 1 << 14)
    await io.until(lambda: (io.rd(Reg.CSTS) >> 2) & 3 == 2)
    assert be.flushes == 1


async def test_controller_reset_in_the_middle_of_io(io: Host) -> None:
    """Disable while reads sit in worker threads: RDY stays 1 until they return, no
    completion is ever posted for them, and the controller comes back clean."""
    be = use_counting_backend(io.dev)
    be.gate = threading.Event()
    for i in range(3):
        io.submit(1, io.sqe(IO.READ, nsid=1, prp1=DATA + i * PAGE, cdw=rw(i * 8, 8)))
    await io.until(lambda: be.reads_started == 3)
    io.wr(Reg.CC, (6 << 16) | (4 << 20))
    await trio.sleep(0.05)
    assert io.rd(Reg.CSTS) & 1  # still draining
    be.gate.set()
    await io.until(lambda: not io.rd(Reg.CSTS) & 1)
    assert io.poll(1) is None and not io.dev.worker.sqs
    await io.enable()
    await io.create_io_queues()
    be.gate = None
    assert await write_read(io, b"\x5a" * 1024) == b"\x5a" * 1024


async def test_cq_full_backpressure(host: Host) -> None:
    """A CQ of 2 entries holds one completion; the next waits for the head doorbell."""
    await host.create_io_queues(size=8, cq_size=2)
    for _ in range(3):
        host.submit(1, host.sqe(IO.FLUSH, nsid=1))
    cq = host.dev.worker.cqs[1]
    await host.until(lambda: cq.outstanding == 1)
    await trio.sleep(0.02)
    assert cq.outstanding == 1  # still one: full
    seen = [await host.wait(1) for _ in range(3)]  # each poll rings the head doorbell
    assert [c.code for c in seen] == [0, 0, 0]


async def test_shadow_doorbells_skip_mmio(io: Host) -> None:
    c = await io.admin(AdminOpcode.DOORBELL_BUFFER_CONFIG, prp1=DBS, prp2=EIS)
    assert c.code == 0
    io.queues[1].shadow = True
    before = io.mmio_doorbells
    # a burst written to the shadow tail, then one MMIO doorbell carrying an older tail
    # (MMIO values of shadowed queues are only wake-ups): all five are fetched
    cids = [io.submit(1, io.sqe(IO.FLUSH, nsid=1), ring=False) for i in range(5)]
    io.mmio_doorbells += 1
    io.wr(0x1000 + 8, 1)
    got = [await io.wait(1) for _ in cids]
    assert sorted(c.cid for c in got) == sorted(cids)
    assert io.mmio_doorbells - before == 1
    ei = int.from_bytes(io.ram[EIS + 8 : EIS + 12], "little")
    assert ei == io.queues[1].tail  # the device published how far it has read
    # idle: the next submission crosses the event index, so the host rings again
    c = await io.cmd(1, IO.FLUSH, nsid=1)
    assert c.code == 0 and io.mmio_doorbells - before == 2


async def test_invalid_doorbell_values_are_ignored(io: Host) -> None:
    io.wr(0x1000 + 8, 64)  # SQ 1 tail == size
    io.wr(0x1000 + 12, 5)  # CQ 1 head beyond tail
    io.wr(0x1000 + 8 * 9, 1)  # a queue that does not exist
    io.wr(0x1000 + 2, 1)  # misaligned
    assert io.dev.worker.sqs[1].tail == 0
    assert await write_read(io, b"z" * 512) == b"z" * 512


class MessageDma:
    """A DMA port without mmap (view() is None, no pinning): the DMA_READ/WRITE path."""

    def __init__(self, inner: object) -> None:
        self.inner = inner

    def view(self, address: int, size: int, *, write: bool = False) -> memoryview | None:
        self.inner._range(address, size)  # type: ignore[attr-defined]
        return None

    async def read(self, address: int, size: int) -> bytes:
        return await self.inner.read(address, size)  # type: ignore[attr-defined, no-any-return]

    async def write(self, address: int, data: bytes | bytearray | memoryview) -> None:
        await self.inner.write(address, data)  # type: ignore[attr-defined]


async def test_message_mode_dma(io: Host, nvme_ctx: FakeContext) -> None:
    nvme_ctx._dma = MessageDma(nvme_ctx._dma)  # type: ignore[assignment]
    data = os.urandom(3 * PAGE)
    io.ram[PRP_LISTS : PRP_LISTS + 16] = struct.pack("<2Q", DATA + PAGE, DATA + 2 * PAGE)
    io.ram[DATA : DATA + len(data)] = data
    c = await io.cmd(1, IO.WRITE, nsid=1, prp1=DATA, prp2=PRP_LISTS, cdw=rw(0, 24))
    assert c.code == 0
    c = await io.cmd(1, IO.READ, nsid=1, prp1=DATA + 0x80000, prp2=PRP_LISTS, cdw=rw(0, 8))
    assert c.code == 0 and io.ram[DATA + 0x80000 : DATA + 0x80000 + 4096] == data[:4096]


async def test_file_backed_namespace(tmp_path: Path, nvme_ctx: FakeContext) -> None:
    img = tmp_path / "sub" / "disk.img"
    dev = Nvme(backing=str(img), size="1M")
    try:
        assert img.stat().st_size == 1 << 20
        dev.attach(nvme_ctx)
        h = Host(dev, nvme_ctx)
        h.enable_pci()
        await h.enable()
        await h.create_io_queues()
        data = os.urandom(8 * PAGE)
        h.ram[PRP_LISTS : PRP_LISTS + 56] = struct.pack(
            "<7Q", *(DATA + i * PAGE for i in range(1, 8)))
        h.ram[DATA : DATA + len(data)] = data
        c = await h.cmd(1, IO.WRITE, nsid=1, prp1=DATA, prp2=PRP_LISTS, cdw=rw(64, 64))
        assert c.code == 0
        assert (await h.cmd(1, IO.FLUSH, nsid=1)).code == 0
        assert img.read_bytes()[64 * 512 : 64 * 512 + len(data)] == data
        c = await h.cmd(1, IO.READ, nsid=1, prp1=DATA + 0x80000, prp2=PRP_LISTS,
                        cdw=rw(64, 64))
        assert c.code == 0
        h.ram[PRP_LISTS : PRP_LISTS + 56] = struct.pack(
            "<7Q", *(DATA + 0x80000 + i * PAGE for i in range(1, 8)))
        ranges = struct.pack("<IIQ", 0, 64, 64)
        h.ram[DATA : DATA + 16] = ranges
        c = await h.cmd(1, IO.DATASET_MANAGEMENT, nsid=1, prp1=DATA, cdw=(0, 1 << 2))
        assert c.code == 0
        assert img.read_bytes()[64 * 512 : 128 * 512] == bytes(64 * 512)
        dev.detach()
    finally:
        dev.close()
    # reopened without a size: the file's size, data kept
    again = FileBackend(img)
    assert again.size == 1 << 20
    again.close()


def test_two_namespaces_from_options(tmp_path: Path) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    dev = Nvme(backing=f"{a}:{b}", size="1M:2M")
    try:
        assert [ns.blocks for ns in dev.worker.namespaces.values()] == [2048, 4096]
        assert dev.worker.info.num_namespaces == 2
    finally:
        dev.close()
    mem = Nvme(namespaces=3, size="1M")
    try:
        assert len(mem.worker.namespaces) == 3
    finally:
        mem.close()


@pytest.mark.parametrize("dstrd", [1, 3])
async def test_doorbell_stride(nvme_ctx: FakeContext, dstrd: int) -> None:
    dev = Nvme(size="1M", dstrd=dstrd)
    try:
        dev.attach(nvme_ctx)
        h = Host(dev, nvme_ctx)
        h.enable_pci()
        await h.enable()
        await h.create_io_queues()
        assert await write_read(h, b"s" * 1024) == b"s" * 1024
        dev.detach()
    finally:
        dev.close()


# ------------------------------------------------------------------ doorbells served at once


async def test_cached_read_completes_inside_the_doorbell_write(io: Host) -> None:
    """With the worker parked, a read the backend has at hand is fetched, read and
    completed (entry and MSI-X vector) by the doorbell's register write itself: no task,
    no scheduler round between the guest's doorbell and its interrupt."""
    assert await write_read(io, b"\x33" * 4096) == b"\x33" * 4096
    await trio.testing.wait_all_tasks_blocked()
    triggers = io.ctx.irq.triggers
    before = len(triggers)
    cid = io.submit(1, io.sqe(IO.READ, nsid=1, prp1=DATA + 0x10000, cdw=rw(0, 8)))
    c = io.poll(1)  # nothing awaited since the doorbell
    assert c is not None and c.cid == cid and c.code == 0
    assert bytes(io.ram[DATA + 0x10000 : DATA + 0x11000]) == b"\x33" * 4096
    assert triggers[before:] == [(2, 1)]  # MSI-X vector 1, once
    assert not io.dev.worker._inflight and not io.dev.worker.carried


async def test_doorbell_batch_raises_one_interrupt_and_errors_complete_at_once(
        io: Host) -> None:
    """Several reads behind one doorbell: every entry is posted before a single interrupt;
    a command that fails its checks (LBA out of range) completes at once too."""
    await trio.testing.wait_all_tasks_blocked()
    triggers = io.ctx.irq.triggers
    before = len(triggers)
    cids = [io.submit(1, io.sqe(IO.READ, nsid=1, prp1=DATA + i * PAGE, cdw=rw(i * 8, 8)),
                      ring=False) for i in range(3)]
    cids.append(io.submit(1, io.sqe(IO.READ, nsid=1, prp1=DATA, cdw=rw(BLOCKS, 1))))
    got = [io.poll(1) for _ in cids]
    assert [c.cid if c else None for c in got] == cids
    assert [c.code if c else None for c in got] == [0, 0, 0, Status.LBA_OUT_OF_RANGE]
    assert triggers[before:] == [(2, 1)]


async def test_writes_and_uncached_reads_still_go_to_tasks(io: Host) -> None:
    """What needs a thread (a write; a read the page cache does not have) is fetched by
    the doorbell but completes from its task, with the PRPs walked once."""
    be = use_counting_backend(io.dev)  # threaded, and readinto_nowait finds nothing
    await trio.testing.wait_all_tasks_blocked()
    w = io.submit(1, io.sqe(IO.WRITE, nsid=1, prp1=DATA, cdw=rw(0, 8)))
    r = io.submit(1, io.sqe(IO.READ, nsid=1, prp1=DATA + PAGE, cdw=rw(0, 8)))
    assert io.poll(1) is None and len(io.dev.worker._inflight) == 2
    got = [await io.wait(1), await io.wait(1)]
    assert sorted(c.cid for c in got) == sorted([w, r]) and all(c.code == 0 for c in got)
    assert be.reads_started == 1


async def test_doorbell_fetch_is_bounded(io: Host) -> None:
    """One doorbell fetches at most FETCH_NOW_LIMIT commands in the register handler; the
    worker fetches the rest, and every command completes."""
    from devices.nvme.doorbell_io import FETCH_NOW_LIMIT

    await trio.testing.wait_all_tasks_blocked()
    n = FETCH_NOW_LIMIT + 8
    assert n < 64
    cids = [io.submit(1, io.sqe(IO.READ, nsid=1, prp1=DATA, cdw=rw(0, 1)), ring=(i == n - 1))
            for i in range(n)]
    assert io.dev.worker.sqs[1].pending == n - FETCH_NOW_LIMIT
    got = [await io.wait(1) for _ in cids]
    assert [c.cid for c in got[:FETCH_NOW_LIMIT]] == cids[:FETCH_NOW_LIMIT]  # in order
    assert sorted(c.cid for c in got) == cids


async def test_doorbell_while_the_worker_is_busy_is_left_to_it(io: Host) -> None:
    """While the worker is inside its step (here: reset requested, not yet carried out),
    a doorbell only records and wakes it."""
    await trio.testing.wait_all_tasks_blocked()
    io.dev.worker.stepping = True
    try:
        io.submit(1, io.sqe(IO.READ, nsid=1, prp1=DATA, cdw=rw(0, 1)))
        assert io.dev.worker.sqs[1].pending == 1 and io.poll(1) is None
    finally:
        io.dev.worker.stepping = False
    c = await io.wait(1)
    assert c.code == 0


async def test_backend_threads_are_bounded_per_controller(io: Host) -> None:
    """A guest queueing many uncached reads gets at most IO_THREADS backend calls in
    threads at once; the rest wait their turn and all complete."""
    from devices.nvme.core import IO_THREADS

    be = use_counting_backend(io.dev)
    be.gate = threading.Event()
    n = IO_THREADS + 12
    cids = [io.submit(1, io.sqe(IO.READ, nsid=1, prp1=DATA + i * PAGE, cdw=rw(i * 8, 8)),
                      ring=(i == n - 1)) for i in range(n)]
    await io.until(lambda: be.reads_started == IO_THREADS)
    await trio.sleep(0.05)
    assert be.reads_started == IO_THREADS
    be.gate.set()
    got = [await io.wait(1) for _ in cids]
    assert sorted(c.cid for c in got) == sorted(cids) and all(c.code == 0 for c in got)


class SlowWrites(MemoryBackend):
    """A backend whose writes run in a thread and take a moment (a real disk's pwritev)."""

    threaded = True

    def write(self, offset: int, bufs: Sequence[BytesLike]) -> None:
        time.sleep(0.001)
        super().write(offset, bufs)


async def test_a_thread_completion_wakes_the_only_connection_at_once(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one client, the engine's serial loop may block in recvmsg on that client's
    socket for a scheduler tick, and a backend call finishing in a thread reaches only
    trio's epoll: the write's completion would wait for the tick. While a call is in
    flight (`devices.sdk.threads.in_flight`) the loop must not start a read that can block
    (it waits on both descriptors instead), so the worker resumes at once.

    The client runs in a trio run of its own in another thread: in this run it would be a
    second connection, which takes the other path anyway."""
    from devices.nvme import core, io_commands
    from devices.sdk.threads import in_flight, run_in_thread
    from vfiouser_srv.client import open_client
    from vfiouser_srv.server import Server

    from .test_over_socket import DATA as GUEST_DATA
    from .test_over_socket import RAM_SIZE, Driver

    model = Nvme(size="4M")
    ns = model.worker.namespaces[1]
    ns.backend.close()
    ns.backend = SlowWrites(4 << 20)
    srv = Server()
    sock = tmp_path / "nvme.sock"
    srv.add_device("nvme", model, socket_path=str(sock))
    await nursery.start(srv.serve)

    late: list[float] = []  # from the call's end in its thread to its caller running again

    async def timed(fn: Callable[[], None]) -> None:
        ended: list[float] = []

        def call() -> None:
            fn()
            ended.append(time.perf_counter())

        await run_in_thread(call)
        late.append(time.perf_counter() - ended[0])

    monkeypatch.setattr(core, "run_in_thread", timed)
    # a write the register handler started has its hand-back (`_write_done`) instead
    write_ended: list[float] = []
    write = ns.backend.write

    def timed_write(offset: int, bufs: Sequence[BytesLike]) -> None:
        write(offset, bufs)
        write_ended.append(time.perf_counter())

    ns.backend.write = timed_write  # type: ignore[method-assign]
    write_done = io_commands.IoCommands._write_done

    def timed_done(self: io_commands.IoCommands, job: object, result: object) -> None:
        late.append(time.perf_counter() - write_ended[-1])
        write_done(self, job, result)  # type: ignore[arg-type]

    monkeypatch.setattr(io_commands.IoCommands, "_write_done", timed_done)
    ready, go = threading.Event(), threading.Event()
    writes = 20

    def client() -> None:
        async def drive() -> None:
            async with open_client(sock, reply_timeout=10) as c:
                await c.memory.add_ram(0, RAM_SIZE, shared=True)
                d = Driver(c)
                await d.start()
                ready.set()
                go.wait(5)
                for i in range(writes):
                    cid = await d.submit(1, IO.WRITE, nsid=1, prp1=GUEST_DATA, cdw=rw(i * 8, 8))
                    await d.rd(Reg.CSTS)  # a vCPU's access while the write is in its thread
                    assert await d.reap(1) == (cid, 0)

        trio.run(drive)

    blocking_reads: list[int] = []  # reads started with a call in flight and nothing to read

    async def watch() -> None:
        await trio.to_thread.run_sync(ready.wait, 5)
        session = srv.devices["nvme"].session
        assert session is not None
        stream = session.stream
        read = stream.read_waiting

        def watched() -> tuple[int, list[tuple[int, int, bytes]], int, object]:
            if in_flight[0] and not select.select([stream.sock], [], [], 0)[0]:
                blocking_reads.append(in_flight[0])
            return read()

        stream.read_waiting = watched  # type: ignore[assignment]
        go.set()

    nursery.start_soon(watch)
    await trio.to_thread.run_sync(client)
    assert len(late) == writes
    assert blocking_reads == []
    # a tick (4 ms at HZ=250) without the wake-up; well under one with it
    assert statistics.median(late) < HOT_WAIT, sorted(late)


class GatedWrites(MemoryBackend):
    """Writes that run in a thread and wait for `gate`; `entered` once one started."""

    threaded = True

    def __init__(self, size: int, fail: bool = False) -> None:
        super().__init__(size)
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.fail = fail
        self.calls: list[str] = []

    def write(self, offset: int, bufs: Sequence[BytesLike]) -> None:
        self.entered.set()
        self.gate.wait(5)
        if self.fail:
            raise OSError(5, "injected write error")
        super().write(offset, bufs)
        self.calls.append("write")

    def flush(self) -> None:
        self.calls.append("flush")


def use_gated_writes(dev: Nvme, fail: bool = False) -> GatedWrites:
    ns = dev.worker.namespaces[1]
    ns.backend.close()
    ns.backend = GatedWrites(4 << 20, fail)
    return ns.backend


async def test_a_doorbell_starts_a_write_thread_before_the_handler_returns(io: Host) -> None:
    """A write fetched in the register handler has its backend call started right there,
    not after a task of its own got scheduled (each trio round was guest-visible latency),
    and its completion is posted by the thread's hand-back, with its interrupt."""
    from devices.sdk.threads import in_flight

    be = use_gated_writes(io.dev)
    await trio.testing.wait_all_tasks_blocked()
    data = os.urandom(PAGE)
    io.ram[DATA : DATA + PAGE] = data
    irqs = len(io.ctx.irq.triggers)
    io.submit(1, io.sqe(IO.WRITE, nsid=1, prp1=DATA, cdw=rw(16, 8)))
    # no checkpoint since the doorbell: only a thread started by the handler can be here
    assert be.entered.wait(2)
    assert in_flight[0] == 1  # the serial loop watches trio's epoll until it is back
    assert io.poll(1) is None
    be.gate.set()
    c = await io.wait(1)
    assert c.code == 0 and in_flight[0] == 0
    assert io.ctx.irq.triggers[irqs:] == [(IrqIndex.MSIX, 1)]
    out = memoryview(bytearray(PAGE))
    be.readinto(16 * 512, [out])
    assert bytes(out) == data
    assert not io.dev.worker.carried and not io.dev.worker._inflight
    assert io.dev.worker.smart.write_commands == 1


async def test_a_handler_started_fua_write_completes_after_its_flush(io: Host) -> None:
    be = use_gated_writes(io.dev)
    await trio.testing.wait_all_tasks_blocked()
    be.gate.set()
    c = await io.cmd(1, IO.WRITE, nsid=1, prp1=DATA, cdw=rw(0, 1, 1 << 30))  # FUA
    assert c.code == 0 and be.calls == ["write", "flush"]
    # the host turned the write cache off: every write is flushed before it completes
    assert (await io.admin(AdminOpcode.SET_FEATURES, cdw=(FeatureId.VOLATILE_WRITE_CACHE, 0))
            ).code == 0
    be.calls.clear()
    c = await io.cmd(1, IO.WRITE, nsid=1, prp1=DATA, cdw=rw(0, 1))
    assert c.code == 0 and be.calls == ["write", "flush"]


async def test_a_handler_started_write_that_fails_reports_a_write_fault(io: Host) -> None:
    be = use_gated_writes(io.dev, fail=True)
    await trio.testing.wait_all_tasks_blocked()
    be.gate.set()
    c = await io.cmd(1, IO.WRITE, nsid=1, prp1=DATA, cdw=rw(0, 1))
    assert c.code == Status.WRITE_FAULT and c.status & DNR
    assert io.ctx.failures  # a backing file error marks the device unhealthy


async def test_reset_while_a_handler_started_write_runs(io: Host) -> None:
    """Controller reset waits for the write's thread, posts no completion for it, and lets
    go of its guest memory; the controller comes back and serves I/O."""
    be = use_gated_writes(io.dev)
    await trio.testing.wait_all_tasks_blocked()
    io.submit(1, io.sqe(IO.WRITE, nsid=1, prp1=DATA, cdw=rw(0, 8)))
    assert be.entered.wait(2)
    io.wr(Reg.CC, (6 << 16) | (4 << 20))
    await trio.sleep(0.05)
    assert io.rd(Reg.CSTS) & 1  # still waiting for the write in its thread
    be.gate.set()
    await io.until(lambda: not io.rd(Reg.CSTS) & 1)
    assert io.poll(1) is None
    assert io.ctx.dma.pins == 0
    io.queues.clear()
    await io.enable()
    await io.create_io_queues()
    assert (await io.cmd(1, IO.WRITE, nsid=1, prp1=DATA, cdw=rw(0, 8))).code == 0


async def shadow_io(io: Host, poll_us: int = 1000) -> None:
    c = await io.admin(AdminOpcode.DOORBELL_BUFFER_CONFIG, prp1=DBS, prp2=EIS)
    assert c.code == 0
    io.queues[1].shadow = True
    io.dev.worker.poller.limit = poll_us / 1e6  # the `poll_us` option (default off)


def event_index(io: Host) -> int:
    return int.from_bytes(io.ram[EIS + 8 : EIS + 12], "little")


async def test_polling_catches_a_quick_next_submission_without_mmio(io: Host) -> None:
    """A host whose next command comes soon after the last completion: the poll window
    grows (each MMIO doorbell came within `poll_us` of the event index being published);
    while we poll, the event index stays behind and a command is served without the host
    ringing. Once the window ends, the index is published again and the host rings."""
    await shadow_io(io)
    poller = io.dev.worker.poller
    assert poller.limit > 0 and poller.window == 0
    poller.limit = 0.05  # this host looks at its CQ every ms: a window well above that
    await trio.testing.wait_all_tasks_blocked()
    for _ in range(3):
        assert (await io.cmd(1, IO.READ, nsid=1, prp1=DATA, cdw=rw(0, 1))).code == 0
    assert poller.window > 0  # grew
    await io.until(lambda: not poller.running)
    poller.window = poller.limit
    assert (await io.cmd(1, IO.READ, nsid=1, prp1=DATA, cdw=rw(0, 1))).code == 0
    before, hits = io.mmio_doorbells, poller.hits
    for i in range(3):
        c = await io.cmd(1, IO.READ, nsid=1, prp1=DATA, cdw=rw(8 * i, 1))
        assert c.code == 0
    assert io.mmio_doorbells == before and poller.hits == hits + 3  # no MMIO: polled
    # idle: the window ends, the event index catches up, the poll task is gone
    await io.until(lambda: not poller.running)
    assert event_index(io) == io.queues[1].tail
    c = await io.cmd(1, IO.READ, nsid=1, prp1=DATA, cdw=rw(16, 1))
    assert c.code == 0 and io.mmio_doorbells == before + 1


async def test_polling_shrinks_when_the_host_is_slow(io: Host) -> None:
    await shadow_io(io)
    poller = io.dev.worker.poller
    poller.window = poller.limit
    for _ in range(12):
        c = await io.cmd(1, IO.READ, nsid=1, prp1=DATA, cdw=rw(0, 1))
        assert c.code == 0
        await io.until(lambda: not poller.running)
        await trio.sleep(poller.limit * 1.5)  # the next command comes after the window
    assert poller.window == 0


async def test_quiesce_stops_polling_and_publishes_the_event_index(io: Host) -> None:
    await shadow_io(io)
    poller = io.dev.worker.poller
    poller.window = poller.limit = 5.0  # a long window: only quiesce ends it
    c = await io.cmd(1, IO.READ, nsid=1, prp1=DATA, cdw=rw(0, 1))
    assert c.code == 0 and poller.until
    assert event_index(io) != io.queues[1].tail
    await io.dev.worker.quiesce()
    assert not poller.until and event_index(io) == io.queues[1].tail
    io.dev.worker.resume()
    await io.until(lambda: not poller.running)
    c = await io.cmd(1, IO.READ, nsid=1, prp1=DATA, cdw=rw(0, 1))
    assert c.code == 0


async def test_reset_while_polling(io: Host) -> None:
    await shadow_io(io)
    poller = io.dev.worker.poller
    poller.window = poller.limit = 5.0
    c = await io.cmd(1, IO.READ, nsid=1, prp1=DATA, cdw=rw(0, 1))
    assert c.code == 0 and poller.until
    await io.disable()
    await io.until(lambda: not poller.running)
    await io.enable()
    await io.create_io_queues()
    assert (await io.cmd(1, IO.READ, nsid=1, prp1=DATA, cdw=rw(0, 1))).code == 0


def test_poll_us_option() -> None:
    assert Nvme(size="4M").worker.poller.limit == 0  # off unless asked for
    assert Nvme(size="4M", poll_us=500).worker.poller.limit == 0.0005
    with pytest.raises(ValueError):
        Nvme(size="4M", poll_us=-1)

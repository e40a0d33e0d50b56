"""Writes started by the doorbell's register write (`_write_now`): the thread's hand-back
posts the completion with no task of their own; reset, a cancelled worker and FUA keep
their meaning."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest
import trio

from devices.nvme.spec import IoOpcode, Reg
from devices.sdk.bits import BytesLike
from devices.sdk.storage import MemoryBackend

from .host import DATA, Host
from .test_io import rw

IO = IoOpcode


class GatedWrites(MemoryBackend):
    """Writes run in a thread (a file's pwritev) and wait for the test's gate."""

    threaded = True

    def __init__(self) -> None:
        super().__init__(4 << 20)
        self.gate = threading.Event()
        self.started = 0
        self.flushes = 0

    def write(self, offset: int, bufs: Sequence[BytesLike]) -> None:
        self.started += 1
        self.gate.wait(5)
        super().write(offset, bufs)

    def readinto_nowait(self, offset: int, bufs: Sequence[memoryview]) -> int:
        return 0

    def flush(self) -> None:
        self.flushes += 1


@pytest.fixture
async def io(host: Host) -> tuple[Host, GatedWrites]:
    await host.create_io_queues()
    ns = host.dev.worker.namespaces[1]
    ns.backend.close()
    ns.backend = be = GatedWrites()
    await trio.testing.wait_all_tasks_blocked()
    return host, be


def tasks(h: Host) -> int:
    nursery = h.dev.worker._nursery
    assert nursery is not None
    return len(nursery.child_tasks)


async def test_a_handler_write_has_no_task_and_its_hand_back_posts_it(
        io: tuple[Host, GatedWrites]) -> None:
    h, be = io
    w = h.dev.worker
    before = tasks(h)
    h.ram[DATA : DATA + 4096] = b"\x77" * 4096
    cid = h.submit(1, h.sqe(IO.WRITE, nsid=1, prp1=DATA, cdw=rw(8, 8)))
    await h.until(lambda: be.started == 1)
    assert tasks(h) == before  # in flight (reset waits for it), but no task
    assert len(w._inflight) == 1 and w.writing
    be.gate.set()
    c = await h.wait(1)
    assert c.cid == cid and c.code == 0
    assert not w._inflight and not w.carried and not w.writing
    assert tasks(h) == before
    out = memoryview(bytearray(4096))
    be.readinto(8 * 512, [out])
    assert bytes(out) == b"\x77" * 4096


async def test_fua_write_gets_its_task_to_flush_first(io: tuple[Host, GatedWrites]) -> None:
    h, be = io
    be.gate.set()
    c = await h.cmd(1, IO.WRITE, nsid=1, prp1=DATA, cdw=rw(0, 8, 1 << 30))
    assert c.code == 0 and be.flushes == 1
    assert not h.dev.worker._inflight and not h.dev.worker.carried


async def test_reset_waits_for_a_handler_write_and_posts_nothing(
        io: tuple[Host, GatedWrites]) -> None:
    h, be = io
    w = h.dev.worker
    h.submit(1, h.sqe(IO.WRITE, nsid=1, prp1=DATA, cdw=rw(0, 8)))
    await h.until(lambda: be.started == 1)
    h.wr(Reg.CC, (6 << 16) | (4 << 20))
    await trio.sleep(0.05)
    assert h.rd(Reg.CSTS) & 1  # RDY: the reset waits for the write's thread
    be.gate.set()
    await h.until(lambda: not h.rd(Reg.CSTS) & 1)
    assert h.poll(1) is None
    assert not w._inflight and not w.carried and not w.writing


async def test_worker_restarted_while_a_write_is_out_posts_it_once(
        io: tuple[Host, GatedWrites]) -> None:
    """The engine cancels the worker (its task is gone at once now, no task waits for
    the write) and a register write starts it again while the thread still writes: the
    restart does not run the write a second time, and one completion is posted."""
    h, be = io
    w = h.dev.worker
    cid = h.submit(1, h.sqe(IO.WRITE, nsid=1, prp1=DATA, cdw=rw(0, 8)))
    await h.until(lambda: be.started == 1)
    nursery = w._nursery
    assert nursery is not None
    nursery.cancel_scope.cancel()
    await h.until(lambda: not w.running)
    w.kick()  # e.g. the next doorbell or CSTS poll
    await h.until(lambda: w._nursery is not None)
    await trio.testing.wait_all_tasks_blocked()
    assert be.started == 1
    be.gate.set()
    c = await h.wait(1)
    assert c.cid == cid and c.code == 0
    await trio.sleep(0.05)
    assert h.poll(1) is None and be.started == 1
    assert not w._inflight and not w.carried and not w.writing

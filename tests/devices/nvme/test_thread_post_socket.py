"""The NVMe write that posts from its thread, behind the real server: guest RAM as memfd
windows, MSI-X vector 1 wired to an eventfd by SET_IRQS as QEMU does. The client sees the
completion and the eventfd signalled without the model raising on the trio thread, and
nothing is left open or pinned afterwards."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import trio

from devices.nvme import Nvme
from devices.nvme.spec import IoOpcode

from .test_over_socket import DATA, prp_list, served


async def test_a_write_signals_the_eventfd_from_its_thread(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    model = Nvme(backing=str(tmp_path / "disk.img"), size="8M")  # a file: a threaded write
    async with served(nursery, tmp_path, True, model) as (srv, d, m):
        efd = await d.msix_queues(m)
        try:
            raised: list[int] = []
            raise_irq = m.raise_irq

            def counted(vector: int = 0) -> None:
                raised.append(vector)
                raise_irq(vector)

            m.raise_irq = counted  # type: ignore[method-assign]
            fds_before = len(os.listdir("/proc/self/fd"))
            data = os.urandom(256 << 10)
            d.c.memory.write(DATA, data)
            prp2 = prp_list(d.c, DATA, 64)
            cid = await d.submit(1, IoOpcode.WRITE, nsid=1, prp1=DATA, prp2=prp2,
                                 cdw=(16, 0, 511))
            with trio.fail_after(5):
                await trio.lowlevel.wait_readable(efd)
            assert int.from_bytes(os.read(efd, 8), "little") == 1
            assert (await d.reap(1)) == (cid, 0)
            with trio.fail_after(5):
                while m.worker._inflight:
                    await trio.sleep(0.001)
            assert raised == []  # the thread signalled, the model did not
            assert len(os.listdir("/proc/self/fd")) == fds_before  # its dup is closed
            container = srv.devices["nvme"].session.container  # type: ignore[union-attr]
            assert container is not None and all(w.pins == 0 for w in container)
            out = memoryview(bytearray(len(data)))
            m.worker.namespaces[1].backend.readinto(16 * 512, [out])
            assert bytes(out) == data
        finally:
            os.close(efd)


async def test_threads_and_the_trio_thread_post_to_one_cq_without_loss(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    """Writes posted by their threads and cached reads posted by the doorbell handler
    share one CQ: 400 commands, up to 16 in flight, each completes exactly once and
    successfully, every CQE in its slot with its phase (the driver reaps in ring order
    and would stall on a slot left behind or see a cid twice). This is the mixed flow end
    to end; it does not catch a missing `_cq_lock` (tried: 0 failures in 20 runs without
    it, the GIL makes the window tiny), which is there for the switch that could fall
    inside it."""
    model = Nvme(backing=str(tmp_path / "disk.img"), size="8M")
    interval = sys.getswitchinterval()
    async with served(nursery, tmp_path, True, model) as (_srv, d, m):
        efd = await d.msix_queues(m)
        # the GIL changes hands every microsecond: a thread's post and the handler's
        # interleave inside their critical sections, not only between them
        sys.setswitchinterval(1e-6)
        try:
            d.c.memory.write(DATA, os.urandom(16 * 4096))
            seen: list[int] = []
            expected: list[int] = []
            for burst in range(25):
                for i in range(16):
                    lba = ((burst * 16 + i) % 64) * 8
                    if i % 2:  # a 4 KiB write from one of 16 data pages
                        cid = await d.submit(1, IoOpcode.WRITE, nsid=1,
                                             prp1=DATA + i * 4096, cdw=(lba, 0, 7))
                    else:  # a cached read of the image's first pages
                        cid = await d.submit(1, IoOpcode.READ, nsid=1,
                                             prp1=DATA + (16 + i) * 4096, cdw=(i * 8, 0, 7))
                    expected.append(cid)
                for _ in range(16):
                    cid, status = await d.reap(1)
                    assert status == 0, (cid, hex(status))
                    seen.append(cid)
            assert sorted(seen) == sorted(expected) and len(set(seen)) == len(seen)
            with trio.fail_after(5):
                while m.worker._inflight:
                    await trio.sleep(0.001)
            assert not m.worker.carried
        finally:
            sys.setswitchinterval(interval)
            os.close(efd)

"""In-process cost of one 1 MiB cached virtio-blk read (or write: ``--op write``), from the
driver's notify to the used entry (no QEMU, no socket): what the server spends on the
critical path of a guest's request.

Why: the guest benchmark (`virtio_guest.py`) is noisy and slow; this isolates the model's
path so old and new trees can be compared exactly, by instruction counts under callgrind
(difference of two run lengths: per request) or by wall time per request.

Modes: ``parked``: the queue's worker sleeps when the request is kicked (poll_us=0; the
path of a read after a pause); ``busy``: the worker polls (poll window 5 s) and each request
is kicked as soon as the previous one completed (a guest reading back to back).

    .venv/bin/python benchmarks/virtio_blk_read.py --mode parked --requests 200
    # per request instructions, old tree vs new (PYTHONHASHSEED=0):
    cd TREE && PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p \\
        /work/main/.venv/bin/python benchmarks/virtio_blk_read.py --mode parked --requests 50
    # ... again with --requests 150; (Ir(150) - Ir(50)) / 100

The request is what Linux sends for a 1 MiB O_DIRECT read: a 16-byte header, 256 page-sized
data pieces and the status byte, in one indirect table. The image is written first, so
every read hits the page cache. A write has the same shape with the pieces readable; its
``pwritev`` runs in a thread, so its wall time includes that thread's round trip and the
harness's own wait (a `trio.sleep(0)` loop): compare trees by same-run wall times, not by
instruction counts. Uses the device tests' fake context and driver; run this file from the
top directory of the tree under test (an old worktree included).

    cd /tmp/base && /work/main/.venv/bin/python /work/main/benchmarks/virtio_blk_read.py \
        --op write --mode parked --requests 300
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio
import trio.testing

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(Path.cwd()))  # the tree under test (run from its top directory)

from devices.virtio.blk import BlkFeature, VirtioBlk  # noqa: E402
from devices.virtio.spec import Feature  # noqa: E402
from tests.devices.fakes import FakeContext  # noqa: E402
from tests.devices.virtio.driver import Driver  # noqa: E402

HDR, STATUS, TABLE, DATA = 0x40000, 0x50000, 0x60000, 0x100000
PAGE, PAGES = 4096, 256
FEATURES = int(Feature.VERSION_1 | Feature.RING_EVENT_IDX | Feature.RING_INDIRECT_DESC
               | BlkFeature.FLUSH)


async def run(mode: str, requests: int, image: Path, op: str = "read") -> list[float]:
    """Per-request wall seconds from the kick to the used entry."""
    times: list[float] = []
    async with trio.open_nursery() as nursery:
        ctx = FakeContext(nursery, ram_size=DATA + PAGES * PAGE)
        dev = VirtioBlk(backing=str(image), poll_us=0 if mode == "parked" else 1000)
        if mode == "busy":
            dev.poll_window = 5.0
        drv = Driver(dev, ctx.dma.ram)
        dev.attach(ctx)
        drv.setup(FEATURES, size=8)
        ring = drv.rings[0]
        pages = [(DATA + i * PAGE, PAGE) for i in range(PAGES)]
        if op == "write":
            readable, writable = [(HDR, 16), *pages], [(STATUS, 1)]
        else:
            readable, writable = [(HDR, 16)], [*pages, (STATUS, 1)]
        rtype = 1 if op == "write" else 0  # OUT / IN
        for i in range(requests):
            ctx.dma.ram[HDR : HDR + 16] = rtype.to_bytes(8, "little") + \
                (i % 16 * 2048).to_bytes(8, "little")  # type, sector (1 MiB steps)
            ring.set_used_event(ring.last_used)
            if mode == "parked":
                await trio.testing.wait_all_tasks_blocked()
            ring.add(readable, writable, indirect_at=TABLE)
            t0 = time.perf_counter()
            drv.kick(0)
            while not ring.take_used():
                await trio.sleep(0)
            times.append(time.perf_counter() - t0)
            assert ctx.dma.ram[STATUS] == 0
        dev.close()
        nursery.cancel_scope.cancel()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("parked", "busy"), default="parked")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--op", choices=("read", "write"), default="read")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="vfu-blkread-") as tmp:
        image = Path(tmp) / "disk.img"
        image.write_bytes(os.urandom(16 << 20))
        times = trio.run(run, args.mode, args.requests, image, args.op)
    kept = times[len(times) // 10 :]
    what = "cached reads" if args.op == "read" else "writes"
    print(f"{args.mode}: {len(times)} x 1 MiB {what}, kick to used entry: median "
          f"{statistics.median(kept) * 1e6:.1f} us, min {min(kept) * 1e6:.1f} us")


if __name__ == "__main__":
    main()

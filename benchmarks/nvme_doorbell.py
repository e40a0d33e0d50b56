"""NVMe doorbell -> completion time of one command, in process (no guest, no QEMU).

What the guest benchmark cannot isolate: how long our server takes from an I/O doorbell to
the completion's interrupt. A real server and client run in one trio process over a socket
(tests/devices/nvme/test_over_socket.py's `served`: guest RAM is a memfd window, so data
moves by mmap), the namespace is a raw image file in a temporary folder (page cache), and
each command is written to the SQ, its doorbell rung straight into the worker
(`sq_doorbell`, as the register handler does) and the time to the interrupt (the worker's
`_notify`) taken. One command at a time; median, p10, p90 of `--count` commands.

    .venv/bin/python benchmarks/nvme_doorbell.py [--count 2000] read4k write4k read512k write512k

Run it from a tree's root to measure that tree (`cd /tmp/old-tree && .../python
/work/main/benchmarks/nvme_doorbell.py`): old and new right after each other, since the
host's load moves these numbers more than most changes do.

Instructions instead of time (deterministic, what a change saves however loaded the host):
`--scatter` spreads a transfer's pages over every other page (a guest's usual PRP list,
no merged segments), and `--inline` runs cached reads back to back inside one
`functools.reduce` call without awaiting (each must complete inside its doorbell), so
callgrind counts just the doorbells:

    PYTHONHASHSEED=0 valgrind --tool=callgrind --collect-atstart=no \
        --toggle-collect=functools_reduce .venv/bin/python benchmarks/nvme_doorbell.py \
        --inline --scatter --count 200 read4k      # Ir / 200 = per doorbell, harness included

Writes wait for their thread, so count the whole process at two `--count`s and divide the
difference (`--count 100` and `400`: (Ir(400) - Ir(100)) / 300, PYTHONHASHSEED=0).

`--at-signal` adds the server's own time from the doorbell to its eventfd write (with
`--msix`): with the client in this process, a write's thread that signals the eventfd
itself (since 2026-12-08) hands the GIL to the client's trio thread before it can look,
a wait QEMU in its own process does not have, so compare trees by this line.

`--msix` measures the path a Linux guest takes: MSI-X on, the I/O CQ created with interrupts
enabled (vector 1, an eventfd assigned as QEMU does), and the command counted done at the
model's `raise_irq`. Without it the CQ has interrupts off, the model is in INTx mode and the
worker's `_notify` is replaced, so no interrupt is raised at all (the README numbers before
2026-12-07 22:00 were taken that way). `--shadow` adds what Linux also turns on: shadow
doorbells (Doorbell Buffer Config), so each command's tail is written to the shadow page
before the MMIO doorbell and the CQ head only to the shadow page (no CQ doorbell).
"""

from __future__ import annotations

import argparse
import functools
import os
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, os.getcwd())  # the tree we are run from, not this file's

KINDS = {"read4k": 1, "write4k": 1, "read512k": 128, "write512k": 128}


#: shadow doorbell and event index pages (free pages of the test driver's guest RAM)
SHADOW, EVENTS = 0x50000, 0x51000


async def msix_queues(d: Any, m: Any) -> int:
    """The test driver's `msix_queues` (tests/devices/nvme/test_over_socket.py), also for
    a tree from before it had one: then this checkout's is run on that tree's driver (it
    uses only the client and the driver's queue counters, which every tree has)."""
    if hasattr(d, "msix_queues"):
        return int(await d.msix_queues(m))
    import importlib.util

    here = Path(__file__).resolve().parents[1] / "tests/devices/nvme/test_over_socket.py"
    spec = importlib.util.spec_from_file_location("_this_checkouts_driver", here)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "tests.devices.nvme"  # its relative imports resolve in the tree
    spec.loader.exec_module(mod)
    return int(await mod.Driver.msix_queues(d, m))


async def use_msix(d: Any, m: Any, box: list[trio.Event], shadow: bool) -> int:
    """Re-create the I/O queue pair with an interrupt-enabled CQ on MSI-X vector 1 and
    count a command done when the model raises an interrupt (see the module docstring).
    Returns vector 1's eventfd (the client's end): the timed loop waits for it, as QEMU
    does, since a write's thread signals it without the model's `raise_irq`."""
    from devices.nvme.spec import AdminOpcode

    efd: int = await msix_queues(d, m)
    if shadow:
        assert (await d.cmd(0, AdminOpcode.DOORBELL_BUFFER_CONFIG, prp1=SHADOW,
                            prp2=EVENTS))[1] == 0
    raise_irq = m.raise_irq

    def counted(vector: int = 0) -> None:
        raise_irq(vector)
        if vector == 1:
            box[0].set()

    m.raise_irq = counted
    return efd


async def measure(kind: str, count: int, scatter: bool = False, inline: bool = False,
                  msix: bool = False, shadow: bool = False) -> str:
    from devices.nvme import Nvme
    from devices.nvme.spec import SQE, IoOpcode
    from tests.devices.nvme.test_over_socket import DATA, IOCQ, IOSQ, LISTS, PAGE, served

    pages = KINDS[kind]
    op = IoOpcode.READ if kind.startswith("read") else IoOpcode.WRITE
    with tempfile.TemporaryDirectory(prefix="nvme-doorbell-") as tmp:
        model = Nvme(backing=str(Path(tmp) / "disk.img"), size="64M")
        async with (trio.open_nursery() as nursery,
                    served(nursery, Path(tmp), True, model) as (_srv, d, m)):
                mem, w = d.c.memory, m.worker
                step = 2 if scatter else 1
                entries = [DATA + i * step * PAGE for i in range(1, pages)]
                if entries:
                    mem.write(LISTS, struct.pack(f"<{len(entries)}Q", *entries))
                prp2 = LISTS if pages > 2 else entries[0] if entries else 0
                # the range is in the page cache before we time reads
                await d.cmd(1, IoOpcode.WRITE, nsid=1, prp1=DATA, prp2=prp2,
                            cdw=(0, 0, pages * 8 - 1))
                box = [trio.Event()]
                efd = -1
                if msix or shadow:
                    efd = await use_msix(d, m, box, shadow)
                else:
                    w._notify = lambda cq: box[0].set()  # type: ignore[method-assign]

                def ring_sq(t: int) -> None:
                    if shadow:
                        mem.write(SHADOW + 8, t.to_bytes(4, "little"))  # SQ 1's shadow tail
                    w.sq_doorbell(1, t)

                def ring_cq(h: int) -> None:
                    if shadow:
                        mem.write(SHADOW + 12, h.to_bytes(4, "little"))  # CQ 1's shadow head
                    else:
                        w.cq_doorbell(1, h)
                tail, head, phase = d.tails[1], d.heads[1], d.phase[1]
                lat: list[int] = []
                if inline:
                    if op != IoOpcode.READ:
                        raise SystemExit("--inline: reads only (a write waits for its thread)")
                    ring = {"tail": tail, "head": head}

                    def doorbell(acc: int, i: int) -> int:
                        t = ring["tail"]
                        mem.write(IOSQ + t * 64, SQE.pack(op, 0, i & 0xFFFF, 1, 0, DATA, prp2,
                                                          0, 0, pages * 8 - 1, 0, 0, 0))
                        ring["tail"] = (t + 1) % 64
                        t0 = time.perf_counter_ns()
                        ring_sq(ring["tail"])
                        lat.append(time.perf_counter_ns() - t0)
                        if not box[0].is_set():
                            raise SystemExit(f"{kind}: command {i} not served in its doorbell")
                        box[0] = trio.Event()
                        ring["head"] = (ring["head"] + 1) % 64
                        ring_cq(ring["head"])
                        return acc

                    functools.reduce(doorbell, range(count), 0)
                    count = 0  # the loop below has nothing left to do
                for i in range(count):
                    mem.write(IOSQ + tail * 64, SQE.pack(op, 0, i & 0xFFFF, 1, 0, DATA, prp2,
                                                         0, 0, pages * 8 - 1, 0, 0, 0))
                    tail = (tail + 1) % 64
                    t0 = time.perf_counter_ns()
                    ring_sq(tail)
                    with trio.fail_after(5):
                        if efd >= 0:  # the interrupt as the client sees it
                            await trio.lowlevel.wait_readable(efd)
                        else:
                            await box[0].wait()
                    lat.append(time.perf_counter_ns() - t0)
                    if efd >= 0:
                        os.read(efd, 8)
                    box[0] = trio.Event()
                    st = struct.unpack_from("<H", mem.read(IOCQ + head * 16 + 14, 2))[0]
                    if st & 1 != phase or st >> 1:
                        raise SystemExit(f"{kind}: command {i} failed: status {st >> 1:#x}")
                    head = (head + 1) % 64
                    phase ^= head == 0
                    ring_cq(head)
                nursery.cancel_scope.cancel()
                if efd >= 0:
                    os.close(efd)
    lat.sort()
    count = len(lat)
    return (f"{kind:9} n={count} median {lat[count // 2] / 1e3:7.1f} µs  p10 "
            f"{lat[count // 10] / 1e3:7.1f}  p90 {lat[9 * count // 10] / 1e3:7.1f}")


def at_signal() -> list[tuple[int, int]]:
    """Time stamps of the server's side, for `--at-signal`: (ns, 0) at each SQ doorbell,
    (ns, 1) when an interrupt's eventfd has been written (by the model's `raise_irq`
    path or, in trees that have it, a write's own thread: `irq.DupSignal.fire`). Why:
    with the client in this process, a signal from a worker thread reaches the client's
    trio thread only after a GIL hand-over that QEMU, a process of its own, never waits
    for; the server-side time is what a separate client sees."""
    from devices.nvme import core
    from vfiouser_srv import irq

    marks: list[tuple[int, int]] = []

    def stamped(fn: Any, edge: int, after: bool) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not after:
                marks.append((time.perf_counter_ns(), edge))
            try:
                return fn(*args, **kwargs)
            finally:
                if after:
                    marks.append((time.perf_counter_ns(), edge))
        return wrapper

    core.WorkerCore.sq_doorbell = stamped(  # type: ignore[method-assign]
        core.WorkerCore.sq_doorbell, 0, False)
    irq.signal_eventfd = stamped(irq.signal_eventfd, 1, True)
    dup = getattr(irq, "DupSignal", None)
    if dup is not None:
        dup.fire = stamped(dup.fire, 1, True)
    return marks


def signal_summary(kind: str, marks: list[tuple[int, int]]) -> str:
    """Doorbell to the first eventfd write after it, per command (see `at_signal`)."""
    lat: list[int] = []
    start: int | None = None
    for ns, edge in marks:
        if edge == 0:
            start = ns
        elif start is not None:
            lat.append(ns - start)
            start = None
    lat = sorted(lat[len(lat) // 10:])  # the first tenth warms up
    n = len(lat)
    if not n:
        return f"{kind:9} at the signal: no interrupts (use --msix)"
    return (f"{kind:9} at the signal: median {lat[n // 2] / 1e3:7.1f} µs  p10 "
            f"{lat[n // 10] / 1e3:7.1f}  p90 {lat[9 * n // 10] / 1e3:7.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--scatter", action="store_true", help="every other page (no merging)")
    p.add_argument("--inline", action="store_true",
                   help="cached reads back to back inside one call, no awaiting (callgrind)")
    p.add_argument("--msix", action="store_true",
                   help="MSI-X on, interrupt-enabled CQ: the interrupt path a Linux guest takes")
    p.add_argument("--shadow", action="store_true",
                   help="--msix and shadow doorbells, as Linux sets the device up")
    p.add_argument("--at-signal", action="store_true",
                   help="also the server-side time, doorbell to its eventfd write")
    p.add_argument("kinds", nargs="*", help=f"any of {', '.join(KINDS)} (default: all)")
    args = p.parse_args()
    bad = set(args.kinds) - set(KINDS)
    if bad:
        p.error(f"unknown kind(s) {', '.join(sorted(bad))}")
    print(f"tree {os.getcwd()}")
    marks = at_signal() if args.at_signal else None
    for kind in args.kinds or KINDS:
        print(trio.run(measure, kind, args.count, args.scatter, args.inline, args.msix,
                             args.shadow))
        if marks is not None:
            print(signal_summary(kind, marks))
            marks.clear()


if __name__ == "__main__":
    main()

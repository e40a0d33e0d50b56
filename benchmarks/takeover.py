"""Live upgrade: how long a client waits while ``serve --take-over`` replaces the server.

Two measurements, each over ``--takeovers`` upgrades (default 20) of one nvme server
(``serve nvme --control``) by a new process started with the same arguments plus
``--take-over``:

* ``client``: our Python client hammers the nvme device with serial BAR0 reads (CSTS) and
  timestamps every reply; the pause of one upgrade is the longest gap between two replies
  while it runs: from the last reply by the old process to the first by the new one, as the
  client sees it.
* ``guest`` (``--guest``): a Linux guest runs an O_DIRECT write/read/verify loop on the
  nvme disk while the server is upgraded; the pause is what the old process reports when
  it hands over (sessions parked -> commit received). Slower: one boot.

The new process's start-up (Python, imports, models) happens before it asks for the
take-over, so it is not part of the pause. Results (JSON) go to
``benchmarks/results/takeover-<time>.json``; a summary is printed.

    .venv/bin/python benchmarks/takeover.py [--takeovers 20] [--guest]
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from vfiouser_srv.client import open_client

RESULTS = Path(__file__).resolve().parent / "results"
CSTS = 0x1C
TARGET_MS = 100.0


async def start_server(argv: list[str], log: Path) -> trio.Process:
    out = log.open("ab")
    try:
        proc = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, stderr=out)
    finally:
        out.close()
    assert proc.stdout is not None
    buf = b""
    with trio.fail_after(30):
        while b"READY " not in buf:
            chunk = await proc.stdout.receive_some()
            if not chunk:
                raise RuntimeError(f"server {argv} exited; see {log}")
            buf += chunk
    return proc


def server_args(sock: Path, ctl: Path, img: Path) -> list[str]:
    return [sys.executable, "-m", "vfiouser_srv", "serve", "nvme", "--socket-path", str(sock),
            "--control", str(ctl), "--set", f"backing={img}", "--set", f"size={64 << 20}"]


async def upgrade(argv: list[str], old: trio.Process, log: Path) -> trio.Process:
    new = await start_server([*argv, "--take-over"], log)
    with trio.fail_after(10):
        status = await old.wait()
    if status != 0:
        raise RuntimeError(f"old server exited {status}")
    return new


async def client_mode(n: int, workdir: Path) -> dict[str, Any]:
    sock, ctl, img, log = (workdir / "n.sock", workdir / "c.sock", workdir / "disk.img",
                           workdir / "server.log")
    argv = server_args(sock, ctl, img)
    proc = await start_server(argv, log)
    stamps: list[float] = []
    pauses: list[float] = []
    try:
        async with open_client(sock, reply_timeout=10) as c:
            done = False

            async def hammer() -> None:
                while not done:
                    await c.region_read(0, CSTS, 4)
                    stamps.append(time.monotonic())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(hammer)
                await trio.sleep(0.2)
                for _ in range(n):
                    t0 = time.monotonic()
                    proc = await upgrade(argv, proc, log)
                    await trio.sleep(0.1)
                    window = [t for t in stamps if t >= t0]
                    gaps = [b - a for a, b in itertools.pairwise(window)]
                    pauses.append(max(gaps) * 1000 if gaps else float("nan"))
                done = True
            replies = len(stamps)
    finally:
        proc.terminate()
        await proc.wait()
    reported = [float(m) for m in re.findall(r"after ([0-9.]+) ms; exiting", log.read_text())]
    return {"pauses_ms": pauses, "old_process_reported_ms": reported, "replies": replies}


async def guest_mode(n: int, workdir: Path) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.integration import test_takeover as tt
    from vfiouser_srv.qemu import load_configs, run_guest
    from vfiouser_srv.qemu.launcher import new_run_dir

    configs = load_configs()
    run_dir = await new_run_dir("bench-takeover")
    sock, ctl, img, log = (workdir / "n.sock", workdir / "c.sock", workdir / "disk.img",
                           run_dir / "server.log")
    argv = server_args(sock, ctl, img)
    proc = await start_server(argv, log)
    console: list[str] = []
    started = trio.Event()

    def on_line(line: str) -> None:
        console.append(line)
        if line.startswith("STAGE loop"):
            started.set()

    script = tt.BLOCK_SCRIPT.replace(f"+ {tt.LOOP_SECONDS}))", f"+ {int(n * 1.5) + 10}))")
    try:
        async with trio.open_nursery() as nursery:
            async def upgrader() -> None:
                nonlocal proc
                await started.wait()
                for _ in range(n):
                    proc = await upgrade(argv, proc, log)
                    await trio.sleep(0.5)

            nursery.start_soon(upgrader)
            await run_guest("nvme", configs=configs, run_dir=run_dir, socket_path=sock,
                            test=script.encode(), guest_env={"disk": "nvme0n1", "irq": "nvme"},
                            on_line=on_line, timeout=600)
            nursery.cancel_scope.cancel()
    finally:
        proc.terminate()
        await proc.wait()
    reported = [float(m) for m in re.findall(r"after ([0-9.]+) ms; exiting", log.read_text())]
    results = {line[7:].partition("=")[0]: line[7:].partition("=")[2]
               for line in console if line.startswith("RESULT ")}
    return {"old_process_reported_ms": reported, "guest": results, "run_dir": str(run_dir)}


def summary(values: list[float]) -> str:
    if not values:
        return "no data"
    return (f"median {statistics.median(values):.1f} ms, max {max(values):.1f} ms over "
            f"{len(values)} (target < {TARGET_MS:.0f} ms)")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--takeovers", type=int, default=20)
    ap.add_argument("--guest", action="store_true", help="also measure under guest I/O")
    args = ap.parse_args()
    out: dict[str, Any] = {"host": platform.node(), "python": platform.python_version(),
                           "takeovers": args.takeovers}
    with tempfile.TemporaryDirectory(prefix="vfu-bench-") as d:
        out["client"] = await client_mode(args.takeovers, Path(d))
    print(f"client-seen pause:       {summary(out['client']['pauses_ms'])}")
    print(f"old process's own view: {summary(out['client']['old_process_reported_ms'])}")
    if args.guest:
        with tempfile.TemporaryDirectory(prefix="vfu-bench-") as d:
            out["guest"] = await guest_mode(args.takeovers, Path(d))
        g = out["guest"]
        print(f"under guest I/O (old process's view): {summary(g['old_process_reported_ms'])}")
        print(f"guest: {g['guest'].get('blocks')} blocks, bad {g['guest'].get('bad')}, "
              f"kernel errors {g['guest'].get('kernel_errors')}")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"takeover-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"results: {path}")


if __name__ == "__main__":
    trio.run(main)

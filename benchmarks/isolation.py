"""Isolation: how much hostile clients of one device slow a good client of another.

Starts one server (``python -m vfiouser_srv serve --config``) with two edu devices, ``d1``
and ``d2``. A well-behaved client of ``d2`` times serial 4-byte REGION_READs, first with
nothing else going on (quiet), then while an attacker process hits ``d1`` (under attack):
one owner pipelining REGION_READs as fast as the server answers, connections that send
random bytes and hang up, in a loop, and slow-loris connections that send their VERSION (and
then a request) one byte per 100 ms. Both phases come from the same run, so the ratio of
the percentiles is the figure to compare across changes. Results (JSON) go to
``benchmarks/results/isolation-<time>.json``; a summary is printed.

    .venv/bin/python benchmarks/isolation.py [--reads 2000] [--engine libvfio-user]
    .venv/bin/python benchmarks/isolation.py attack SOCKET   # the attacker alone

The attacker runs until its stdin closes, prints ``ATTACKING`` once every attack is under
way, and its counters (JSON) when it stops; tests/hostile/test_isolation.py uses it too.
Stdlib only, like the rest of this directory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import wire

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
EDU_ID = 0x010000ED
#: slow-loris connections and their pace (seconds per byte)
LORIS = 3
LORIS_PACE = 0.1
#: requests the flooder keeps in flight
FLOOD_DEPTH = 64


# ------------------------------------------------------------------------------ attacker


class Attack:
    """The attacks on one socket, each in a thread, until `stop` is set."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.stop = threading.Event()
        self.counts = {"flood_replies": 0, "garbage_connections": 0, "loris_bytes": 0}
        self._lock = threading.Lock()

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counts[key] += n

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        sock.connect(self.path)
        return sock

    def flood(self, ready: threading.Event) -> None:
        """The device's owner: REGION_READs pipelined FLOOD_DEPTH deep, replies drained."""
        sock = self._connect()
        try:
            sock.sendall(wire.pack_version(0))
            head = sock.recv(wire.HEADER_SIZE, socket.MSG_WAITALL)
            sock.recv(wire.unpack_header(head).size - wire.HEADER_SIZE, socket.MSG_WAITALL)
            ready.set()
            batch = b"".join(wire.pack_region_read(i, 0, 0, 4) for i in range(FLOOD_DEPTH))
            reply = wire.HEADER_SIZE + 16 + 4
            while not self.stop.is_set():
                sock.sendall(batch)
                want = reply * FLOOD_DEPTH
                got = 0
                while got < want:
                    chunk = sock.recv(want - got)
                    if not chunk:
                        return
                    got += len(chunk)
                self._count("flood_replies", FLOOD_DEPTH)
        except OSError:
            ready.set()
        finally:
            sock.close()

    def garbage(self, seed: int) -> None:
        """Connect, send 4 KiB of random bytes, hang up; again."""
        rng = random.Random(seed)
        while not self.stop.is_set():
            try:
                sock = self._connect()
                try:
                    sock.sendall(rng.randbytes(4096))
                finally:
                    sock.close()
                self._count("garbage_connections")
            except OSError:
                time.sleep(0.001)

    def loris(self) -> None:
        """VERSION, then a REGION_READ, one byte per LORIS_PACE; reconnect when dropped."""
        message = wire.pack_version(0) + wire.pack_region_read(1, 0, 0, 4)
        while not self.stop.is_set():
            try:
                sock = self._connect()
            except OSError:
                time.sleep(LORIS_PACE)
                continue
            try:
                for i in range(len(message)):
                    if self.stop.wait(LORIS_PACE):
                        return
                    sock.send(message[i : i + 1])
                    self._count("loris_bytes")
                self.stop.wait(LORIS_PACE)
            except OSError:
                pass
            finally:
                sock.close()

    def run(self) -> None:
        ready = threading.Event()
        threads = [threading.Thread(target=self.flood, args=(ready,), daemon=True)]
        threads[0].start()
        ready.wait(10)  # the flooder must own d1 before the others reach VERSION
        threads += [threading.Thread(target=self.garbage, args=(i,), daemon=True) for i in (1, 2)]
        threads += [threading.Thread(target=self.loris, daemon=True) for _ in range(LORIS)]
        for t in threads[1:]:
            t.start()
        # let every attack get going (the slow-loris clients are a few bytes into VERSION)
        self.stop.wait(5 * LORIS_PACE)
        print("ATTACKING", flush=True)
        sys.stdin.read()  # until our parent closes it
        self.stop.set()
        for t in threads:
            t.join(5)
        print(json.dumps(self.counts), flush=True)


# ------------------------------------------------------------------------------ good client


def serial_reads(sock: socket.socket, n: int) -> list[float]:
    """`n` serial REGION_READs of edu's ID register; the round trip of each, in seconds."""
    out: list[float] = []
    for i in range(n):
        start = time.perf_counter()
        sock.sendall(wire.pack_region_read(i, 0, 0, 4))
        data = sock.recv(wire.HEADER_SIZE + 20, socket.MSG_WAITALL)
        out.append(time.perf_counter() - start)
        head = wire.unpack_header(data)
        if head.is_error or int.from_bytes(data[-4:], "little") != EDU_ID:
            raise RuntimeError(f"bad reply to read {i}: {head}")
    return out


def summary(samples: list[float]) -> dict[str, float]:
    us = sorted(s * 1e6 for s in samples)
    return {
        "p50_us": statistics.median(us),
        "p99_us": us[min(len(us) - 1, int(0.99 * len(us)))],
        "max_us": us[-1],
    }


def start_server(tmp: Path, engine: str) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    socks = {name: str(tmp / f"{name}.sock") for name in ("d1", "d2")}
    config = tmp / "devices.toml"
    config.write_text(
        f'[server]\nengine = "{engine}"\n'
        + "".join(
            f'[[device]]\nname = "{n}"\nmodel = "edu"\nsocket = "{p}"\n' for n, p in socks.items()
        )
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "vfiouser_srv", "serve", "--config", str(config)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=open(tmp / "server.log", "wb"),  # noqa: SIM115
    )
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + 20
    while seen.count(b"READY") < len(socks):
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise SystemExit(f"server did not start: {(tmp / 'server.log').read_text()}")
        if select.select([proc.stdout], [], [], 0.5)[0]:
            seen += os.read(proc.stdout.fileno(), 4096)
    return proc, socks


def measure(reads: int, engine: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmpdir:
        proc, socks = start_server(Path(tmpdir), engine)
        try:
            good = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            good.settimeout(10)
            good.connect(socks["d2"])
            good.sendall(wire.pack_version(0))
            head = good.recv(wire.HEADER_SIZE, socket.MSG_WAITALL)
            good.recv(wire.unpack_header(head).size - wire.HEADER_SIZE, socket.MSG_WAITALL)
            serial_reads(good, 200)  # warm-up
            quiet = serial_reads(good, reads)
            attacker = subprocess.Popen(
                [sys.executable, __file__, "attack", socks["d1"]],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            )
            assert attacker.stdout is not None and attacker.stdin is not None
            if attacker.stdout.readline().strip() != b"ATTACKING":
                raise SystemExit("attacker did not start")
            attacked = serial_reads(good, reads)
            attacker.stdin.close()
            counts = json.loads(attacker.stdout.readline() or b"{}")
            attacker.wait(10)
            good.close()
        finally:
            proc.terminate()
            proc.wait(10)
    return {"quiet": summary(quiet), "attack": summary(attacked), "attacker": counts}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("mode", nargs="?", choices=("measure", "attack"), default="measure")
    p.add_argument("socket", nargs="?", help="attack: the socket to attack")
    p.add_argument("--reads", type=int, default=2000, help="serial reads per phase")
    p.add_argument("--engine", choices=("python", "libvfio-user"), default="python")
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    if a.mode == "attack":
        if not a.socket:
            p.error("attack needs SOCKET")
        Attack(a.socket).run()
        return 0
    result = measure(a.reads, a.engine)
    result["meta"] = {
        "reads": a.reads, "engine": a.engine, "host": platform.node(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    a.results_dir.mkdir(parents=True, exist_ok=True)
    out = a.results_dir / f"isolation-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    q, k = result["quiet"], result["attack"]
    print(f"good client of d2, {a.reads} serial 4-byte REGION_READs per phase ({a.engine})")
    print(f"{'':8}{'p50 us':>10}{'p99 us':>10}{'max us':>10}")
    for name, s in (("quiet", q), ("attack", k)):
        print(f"{name:8}{s['p50_us']:10.1f}{s['p99_us']:10.1f}{s['max_us']:10.1f}")
    print(f"ratio   {k['p50_us'] / q['p50_us']:10.2f}{k['p99_us'] / q['p99_us']:10.2f}")
    print(f"attacker: {result['attacker']}")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

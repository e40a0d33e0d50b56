#!/usr/bin/env python3
"""Scale: does the cost per message stay flat as one server process hosts more devices?

For each N in ``--devices`` (default 1, 8, 64) it starts one ``vfiouser-srv serve --config``
process (``python -m vfiouser_srv``, under ``taskset -c --server-cpu``) with N edu devices,
opens one client connection per device (VERSION each), and lets every client issue serial
4-byte REGION_READs of BAR0 offset 0 at the same time: each connection has exactly one
request in flight and sends the next as soon as its reply arrived. Over a timed window it
records the server's CPU time (first field of ``/proc/PID/task/*/schedstat``, all threads)
divided by the replies received, and the median round trip. Rounds interleave the Ns
(1, 8, 64, 1, 8, 64, ...) with a fresh server each time, so drift hits every N alike.

Then a DMA phase on the last server with the largest N: every connection maps ``--windows``
DMA windows (default 8, so 64 x 8 = 512 windows in one process), one DMA_MAP at a time,
round robin over the devices (window 0 of every device, then window 1, ...), and unmaps
them in the same order; once without a descriptor and once with a sealed memfd sent in
SCM_RIGHTS (the server mmaps it). Each map and unmap is timed and the server's CPU is read
around every block of N maps, so the cost at the start (few windows mapped) and at the end
(all mapped) can be compared.

    .venv/bin/python benchmarks/scale.py                           # server CPU 0, clients CPU 1
    .venv/bin/python benchmarks/scale.py --client-cpu 0            # everything on CPU 0
    .venv/bin/python benchmarks/scale.py --devices 1,2 --rounds 1 --duration 0.3 --quick

The clients: one process (``--client-procs``, default 1) pinned to ``--client-cpu`` drives
all connections from one ``epoll`` loop, sockets non-blocking. Threads would fight over
the GIL (64 threads each waking for one reply is mostly futex traffic), and one process per
client would put 64 schedulable processes on the client CPU, whose context switches cost
more than the messages; one epoll loop answers every ready reply in a single pass. Its own
CPU share in the window (``client_busy``) is reported next to the server's
(``server_busy``): with the clients on their own CPU, the server should be the busier one,
otherwise the clients are the bottleneck and the figures say little. The server's CPU is
read from /proc, so the client's work is never counted in it.

Results: ``benchmarks/results/scale-YYYYmmdd-HHMMSS.json`` and a printed summary with the
ratios 8 vs 1 and 64 vs 1 (per-message server CPU, median round trip) and, for DMA, the
last block over the first. Stdlib only, like the rest of this directory.
"""

from __future__ import annotations

import argparse
import array
import fcntl
import json
import os
import platform
import select
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import wire

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
EDU_ID = 0x010000ED
#: one REGION_READ reply: header, region access (offset, region, count), 4 data bytes
REPLY_SIZE = wire.HEADER_SIZE + wire.REGION_ACCESS.size + 4
DMA_BASE = 0x10_0000_0000
#: address distance between a device's windows (the windows themselves are --window-size)
DMA_STRIDE = 16 << 20

Result = dict[str, Any]


# ---------------------------------------------------------------------------- server CPU


def read_cpu(pid: int) -> tuple[int, int]:
    """Summed (ns on CPU, times scheduled in) over every thread of `pid`."""
    total = runs = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                fields = f.read().split()
        except OSError:
            continue  # the thread exited
        total += int(fields[0])
        runs += int(fields[2])
    return total, runs


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ---------------------------------------------------------------------------- client worker


def _connect(path: str, timeout: float = 10.0) -> socket.socket:
    """A blocking connection that has done its VERSION exchange."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(wire.pack_version(0))
        head = wire.unpack_header(sock.recv(wire.HEADER_SIZE, socket.MSG_WAITALL))
        rest = sock.recv(head.size - wire.HEADER_SIZE, socket.MSG_WAITALL)
        if head.is_error or head.command != wire.CMD_VERSION or len(rest) + 16 != head.size:
            raise RuntimeError(f"{path}: VERSION failed: {head}")
    except BaseException:
        sock.close()
        raise
    return sock


def drive(
    socks: Sequence[socket.socket], start_ns: int, end_ns: int, reads: int = 0,
    round_robin: bool = False,
) -> Result:
    """Every connection in serial REGION_READs, all at once, from one epoll loop, until
    `end_ns` (CLOCK_MONOTONIC), or until each connection got `reads` replies if not 0.
    `round_robin`: one request in flight in all, each to the next connection in turn.
    Counts the replies that arrived in [start_ns, end_ns) and their round trips (request
    sent at or after `start_ns`), and this thread's CPU time in that window. Every reply is
    compared byte for byte with the one edu must send."""
    n = len(socks)
    reqs = [wire.pack_region_read(i, 0, 0, 4) for i in range(256)]
    expect = [
        wire.pack_header(i, wire.CMD_REGION_READ, REPLY_SIZE - wire.HEADER_SIZE, wire.F_TYPE_REPLY)
        + wire.REGION_ACCESS.pack(0, 0, 4)
        + EDU_ID.to_bytes(4, "little")
        for i in range(256)
    ]
    ep = select.epoll(n)
    index: dict[int, int] = {}
    for i, s in enumerate(socks):
        s.setblocking(False)
        ep.register(s.fileno(), select.EPOLLIN)
        index[s.fileno()] = i
    bufs = [bytearray(REPLY_SIZE) for _ in range(n)]
    views = [memoryview(b) for b in bufs]
    got = [0] * n
    seq = [0] * n
    sent_at = [0] * n
    rtts: list[int] = []
    clock = time.monotonic_ns
    cpu = time.thread_time_ns
    counted = 0
    cpu0 = cpu1 = None
    active = n
    now = clock()
    for i, s in enumerate(socks[:1] if round_robin else socks):
        s.send(reqs[0])
        sent_at[i] = now
    while active:
        for fd, _ev in ep.poll():
            i = index[fd]
            k = socks[i].recv_into(views[i][got[i] :])
            if not k:
                raise ConnectionError(f"connection {i}: the server closed it")
            got[i] += k
            if got[i] < REPLY_SIZE:
                continue
            now = clock()
            if bufs[i] != expect[seq[i] & 0xFF]:
                raise RuntimeError(f"connection {i}: bad reply {bytes(bufs[i]).hex()}")
            got[i] = 0
            if sent_at[i] >= start_ns and now < end_ns:
                rtts.append(now - sent_at[i])
                counted += 1
            if cpu0 is None and now >= start_ns:
                cpu0 = cpu()
            if round_robin:
                seq[i] += 1
                if now >= end_ns or (reads and seq[-1] == reads):
                    active = 0
                    break
                i = (i + 1) % n
            elif now >= end_ns or seq[i] + 1 == reads:
                ep.unregister(fd)
                active -= 1
                continue
            else:
                seq[i] += 1
            sent_at[i] = clock()
            socks[i].send(reqs[seq[i] & 0xFF])
    cpu1 = cpu()
    ep.close()
    window_s = (end_ns - start_ns) / 1e9
    return {
        "replies": counted,
        "rtt_ns": rtts,
        "client_cpu_s": (cpu1 - (cpu0 if cpu0 is not None else cpu1)) / 1e9,
        "window_s": window_s,
    }


def worker_main(cpu: int | None, paths: Sequence[str]) -> int:
    """`scale.py worker`: connect to `paths`, print READY, read `GO start_ns end_ns reads`
    from stdin, drive them, print the result as one JSON line."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    socks = [_connect(p) for p in paths]
    print("READY", flush=True)
    line = sys.stdin.readline().split()
    if len(line) != 5 or line[0] != "GO":
        return 1
    res = drive(socks, int(line[1]), int(line[2]), int(line[3]), line[4] == "1")
    for s in socks:
        s.close()
    print(json.dumps(res), flush=True)
    return 0


# ---------------------------------------------------------------------------- server


class Server:
    """One `vfiouser-srv serve --config` process with `n` edu devices."""

    def __init__(
        self, tmp: Path, n: int, cpu: int | None, tag: str,
        repo: Path = REPO, env: dict[str, str] | None = None, prefix: Sequence[str] = (),
        start_timeout: float = 60.0,
    ) -> None:
        self.sockets = [str(tmp / f"{tag}-d{i}.sock") for i in range(n)]
        config = tmp / f"{tag}.toml"
        config.write_text(
            "".join(
                f'[[device]]\nname = "d{i}"\nmodel = "edu"\nsocket = "{p}"\n'
                for i, p in enumerate(self.sockets)
            )
        )
        self.log = tmp / f"{tag}.log"
        cmd = [*prefix, sys.executable, "-m", "vfiouser_srv", "serve", "--config", str(config)]
        if cpu is not None:
            cmd = ["taskset", "-c", str(cpu), *cmd]  # taskset execs: same pid
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(
                cmd, cwd=repo, stdout=subprocess.PIPE, stderr=err, env={**os.environ, **(env or {})}
            )
        self.pid = self.proc.pid
        assert self.proc.stdout is not None
        seen = b""
        deadline = time.monotonic() + start_timeout + n / 4
        while seen.count(b"READY") < n:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise SystemExit(f"server did not start: {self.log.read_text()[-2000:]}")
            if select.select([self.proc.stdout], [], [], 0.5)[0]:
                seen += os.read(self.proc.stdout.fileno(), 65536)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(120)  # under valgrind, writing its profile takes a while
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------------------- read phase


def read_phase(srv: Server, a: argparse.Namespace) -> Result:
    """All of `srv`'s devices read serially at once; server CPU per reply, round trips."""
    procs = 1 if a.round_robin else max(1, min(a.client_procs, len(srv.sockets)))
    parts = [srv.sockets[i::procs] for i in range(procs)]
    cmd = [sys.executable, str(Path(__file__).resolve()), "worker"]
    if a.client_cpu is not None:
        cmd += ["--cpu", str(a.client_cpu)]
    workers = [
        subprocess.Popen([*cmd, *part], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for part in parts
    ]
    try:
        for w in workers:
            assert w.stdout is not None
            if w.stdout.readline().strip() != "READY":
                raise SystemExit("a client worker failed to connect")
        # the workers read from GO on; only [start, end) counts (--reads: everything)
        if a.reads:
            start, end = time.monotonic_ns(), 1 << 62
        else:
            start = time.monotonic_ns() + int(a.warmup * 1e9)
            end = start + int(a.duration * 1e9)
        for w in workers:
            assert w.stdin is not None
            w.stdin.write(f"GO {start} {end} {a.reads} {int(a.round_robin)}\n")
            w.stdin.flush()
        time.sleep(max(0.0, (start - time.monotonic_ns()) / 1e9))
        cpu0 = read_cpu(srv.pid)
        t0 = time.monotonic_ns()
        if not a.reads:
            time.sleep(max(0.0, (end - time.monotonic_ns()) / 1e9))
        results = []
        for w in workers:
            assert w.stdout is not None
            line = w.stdout.readline()
            if w.wait(3600) != 0 or not line:
                raise SystemExit("a client worker failed")
            results.append(json.loads(line))
        if a.reads:
            for r in results:
                r["window_s"] = (time.monotonic_ns() - t0) / 1e9
        cpu1 = read_cpu(srv.pid)
        t1 = time.monotonic_ns()
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    replies = sum(r["replies"] for r in results)
    rtts = sorted(x for r in results for x in r["rtt_ns"])
    window = (t1 - t0) / 1e9
    server_ns = cpu1[0] - cpu0[0]
    return {
        "devices": len(srv.sockets),
        "client_procs": procs,
        "replies": replies,
        "window_s": window,
        "msgs_per_s": replies / window,
        "server_cpu_us_per_msg": server_ns / max(1, replies) / 1000,
        "server_runs_per_msg": (cpu1[1] - cpu0[1]) / max(1, replies),
        "server_busy": server_ns / 1e9 / window,
        "client_busy": max(r["client_cpu_s"] / r["window_s"] for r in results),
        "rtt_median_us": _median(rtts) / 1000,
        "rtt_p99_us": rtts[min(len(rtts) - 1, int(0.99 * len(rtts)))] / 1000 if rtts else None,
    }


# ---------------------------------------------------------------------------- DMA phase


def _sealed_memfd(size: int) -> int:
    """Guest memory as QEMU's memory-backend-memfd gives it: sealed, so the server mmaps it."""
    fd = os.memfd_create("scale-dma", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


def _request(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    """Send one command, wait for its reply, fail on an error reply."""
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sock.sendmsg([data], anc)
    else:
        sock.sendall(data)
    head = wire.unpack_header(sock.recv(wire.HEADER_SIZE, socket.MSG_WAITALL))
    if head.size > wire.HEADER_SIZE:
        sock.recv(head.size - wire.HEADER_SIZE, socket.MSG_WAITALL)
    if head.is_error or not head.is_reply or head.command != wire.unpack_header(data).command:
        raise RuntimeError(f"DMA request failed: {head} ({os.strerror(head.error)})")


def dma_cycle(
    socks: Sequence[socket.socket], windows: int, size: int, pid: int, memfds: Sequence[int]
) -> Result:
    """Map `windows` windows on every connection, round robin, then unmap them in the same
    order. Per-request round trips (ns, in order) and server CPU per block of len(socks)."""
    n = len(socks)
    clock = time.monotonic_ns
    out: Result = {"map_ns": [], "unmap_ns": [], "map_cpu_ns": [], "unmap_cpu_ns": []}
    for kind in ("map", "unmap"):
        for w in range(windows):
            address = DMA_BASE + w * DMA_STRIDE
            cpu0 = read_cpu(pid)[0]
            for d in range(n):
                if kind == "map":
                    msg = wire.pack_dma_map(w, address, size, offset=w * size)
                    fds: Sequence[int] = (memfds[d],) if memfds else ()
                else:
                    msg = wire.pack_dma_unmap(w, address, size)
                    fds = ()
                t0 = clock()
                _request(socks[d], msg, fds)
                out[f"{kind}_ns"].append(clock() - t0)
            out[f"{kind}_cpu_ns"].append(read_cpu(pid)[0] - cpu0)
    return out


def dma_phase(srv: Server, a: argparse.Namespace) -> Result:
    """`dma_cycle` `--dma-cycles` times (after one discarded) without and with a memfd."""
    if a.client_cpu is not None:
        os.sched_setaffinity(0, {a.client_cpu})
    socks = [_connect(p) for p in srv.sockets]
    n, windows, size = len(socks), a.windows, a.window_size
    memfds: list[int] = []
    out: Result = {"devices": n, "windows_per_device": windows, "window_size": size}
    try:
        for variant in ("no_fd", "fd"):
            if variant == "fd":
                memfds = [_sealed_memfd(windows * size) for _ in range(n)]
            cycles = [
                dma_cycle(socks, windows, size, srv.pid, memfds) for _ in range(a.dma_cycles + 1)
            ][1:]
            res: Result = {}
            for kind in ("map", "unmap"):
                # per position (k-th request of the cycle), the median over the cycles
                per_req = [
                    _median([c[f"{kind}_ns"][k] for c in cycles]) / 1000 for k in range(n * windows)
                ]
                per_block_cpu = [
                    _median([c[f"{kind}_cpu_ns"][b] for c in cycles]) / n / 1000
                    for b in range(windows)
                ]
                first, last = per_req[:n], per_req[-n:]
                res[kind] = {
                    "median_us_by_block": [_median(per_req[b * n : (b + 1) * n])
                                           for b in range(windows)],
                    "server_cpu_us_by_block": per_block_cpu,
                    "first_block_median_us": _median(first),
                    "last_block_median_us": _median(last),
                    "last_over_first": _median(last) / _median(first),
                    "server_cpu_us_first_block": per_block_cpu[0],
                    "server_cpu_us_last_block": per_block_cpu[-1],
                    "server_cpu_last_over_first": per_block_cpu[-1] / per_block_cpu[0],
                    "server_cpu_us_per_request": statistics.fmean(per_block_cpu),
                }
            out[variant] = res
    finally:
        for fd in memfds:
            os.close(fd)
        for s in socks:
            s.close()
    return out


# ---------------------------------------------------------------------------- main


def summarize(rounds: list[dict[str, Result]], ns: Sequence[int]) -> Result:
    keys = ("server_cpu_us_per_msg", "rtt_median_us", "msgs_per_s", "server_busy",
            "client_busy", "server_runs_per_msg")
    summary: Result = {}
    for n in ns:
        summary[str(n)] = {k: _median([r[str(n)][k] for r in rounds]) for k in keys}
    base = summary[str(ns[0])]
    ratios: Result = {}
    for n in ns[1:]:
        s = summary[str(n)]
        ratios[f"{n}_vs_{ns[0]}"] = {
            "server_cpu_per_msg": s["server_cpu_us_per_msg"] / base["server_cpu_us_per_msg"],
            "rtt_median": s["rtt_median_us"] / base["rtt_median_us"],
        }
    return {"by_devices": summary, "ratios": ratios}


def print_summary(result: Result) -> None:
    meta = result["meta"]
    print(f"scale: server CPU {meta['server_cpu']}, clients CPU {meta['client_cpu']}, "
          f"{meta['rounds']} round(s) of {meta['duration_s']} s, medians over rounds")
    print(f"{'devices':>8}{'srv µs/msg':>12}{'rtt p50 µs':>12}{'msgs/s':>10}"
          f"{'srv busy':>10}{'cli busy':>10}{'srv runs/msg':>14}")
    for n, s in result["summary"]["by_devices"].items():
        print(f"{n:>8}{s['server_cpu_us_per_msg']:12.2f}{s['rtt_median_us']:12.1f}"
              f"{s['msgs_per_s']:10,.0f}{s['server_busy']:10.2f}{s['client_busy']:10.2f}"
              f"{s['server_runs_per_msg']:14.2f}")
    for name, r in result["summary"]["ratios"].items():
        print(f"{name.replace('_', ' '):>12}: server CPU per message "
              f"{r['server_cpu_per_msg']:.2f}x, median round trip {r['rtt_median']:.2f}x")
    dma = result.get("dma")
    if dma:
        print(f"DMA: {dma['devices']} devices x {dma['windows_per_device']} windows of "
              f"{dma['window_size'] >> 10} KiB; block = one window on every device")
        for variant in ("no_fd", "fd"):
            for kind in ("map", "unmap"):
                r = dma[variant][kind]
                print(f"  {kind:>5} {variant:>5}: median {r['first_block_median_us']:7.1f} -> "
                      f"{r['last_block_median_us']:7.1f} µs ({r['last_over_first']:.2f}x), "
                      f"server CPU {r['server_cpu_us_first_block']:6.1f} -> "
                      f"{r['server_cpu_us_last_block']:6.1f} µs "
                      f"({r['server_cpu_last_over_first']:.2f}x)")
    print(f"results: {result['file']}")


def git_commit(repo: Path) -> str | None:
    if shutil.which("git") is None:
        return None
    r = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                       capture_output=True, text=True, check=False)
    return r.stdout.strip() or None


def run(a: argparse.Namespace) -> Result:
    ns = sorted({int(x) for x in a.devices.split(",") if x})
    if not ns or ns[0] < 1:
        raise SystemExit("--devices needs positive counts")
    if a.client_cpu is not None:
        os.sched_setaffinity(0, {a.client_cpu})
    env = dict(kv.split("=", 1) for kv in a.server_env)
    rounds: list[dict[str, Result]] = []
    dma: Result | None = None
    with tempfile.TemporaryDirectory(prefix="vfu-scale-") as tmpdir:
        tmp = Path(tmpdir)
        for rnd in range(a.rounds):
            this: dict[str, Result] = {}
            for n in ns:
                srv = Server(tmp, n, a.server_cpu, f"r{rnd}n{n}", a.repo, env,
                             shlex.split(a.server_prefix), a.start_timeout)
                try:
                    this[str(n)] = read_phase(srv, a)
                    if not a.no_dma and rnd == a.rounds - 1 and n == ns[-1]:
                        dma = dma_phase(srv, a)
                finally:
                    srv.stop()
            rounds.append(this)
    result: Result = {
        "meta": {
            "devices": ns, "rounds": a.rounds, "duration_s": a.duration, "warmup_s": a.warmup,
            "server_cpu": a.server_cpu, "client_cpu": a.client_cpu,
            "client_procs": a.client_procs, "commit": git_commit(a.repo),
            "repo": str(a.repo), "server_env": a.server_env, "reads": a.reads,
            "round_robin": a.round_robin,
            "server_prefix": a.server_prefix,
            "host": platform.node(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
        "rounds": rounds,
        "summary": summarize(rounds, ns),
    }
    if dma is not None:
        result["dma"] = dma
    return result


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:
        w = argparse.ArgumentParser(prog="scale.py worker")
        w.add_argument("--cpu", type=int, default=None)
        w.add_argument("sockets", nargs="+")
        wa = w.parse_args(argv[1:])
        return worker_main(wa.cpu, wa.sockets)
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--devices", default="1,8,64", help="comma-separated device counts")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (fresh servers)")
    p.add_argument("--duration", type=float, default=2.0, help="timed window per N, s")
    p.add_argument("--warmup", type=float, default=0.5, help="untimed reads before it, s")
    p.add_argument("--server-cpu", type=int, default=0, help="taskset CPU of the server")
    p.add_argument("--client-cpu", type=int, default=1, help="CPU of the clients")
    p.add_argument("--no-pin", action="store_true", help="pin neither (for curiosity)")
    p.add_argument("--client-procs", type=int, default=1,
                   help="client processes sharing the connections (each one epoll loop)")
    p.add_argument("--windows", type=int, default=8, help="DMA windows per device")
    p.add_argument("--window-size", type=lambda s: int(s, 0), default=1 << 20)
    p.add_argument("--dma-cycles", type=int, default=5,
                   help="map-all/unmap-all cycles per variant (after one discarded)")
    p.add_argument("--no-dma", action="store_true", help="skip the DMA phase")
    p.add_argument("--repo", type=Path, default=REPO,
                   help="run the server from this checkout (e.g. a git worktree)")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for the server (e.g. VFIOUSER_SRV_IDLE_WAIT=0)")
    p.add_argument("--reads", type=int, default=0,
                   help="instead of a timed window: exactly this many reads per connection "
                        "(for instruction counts under --server-prefix valgrind)")
    p.add_argument("--round-robin", action="store_true",
                   help="one request in flight in all, each to the next device in turn "
                        "(the same path per message whatever N: for instruction counts)")
    p.add_argument("--server-prefix", default="",
                   help="command the server runs under, e.g. 'valgrind --tool=callgrind'")
    p.add_argument("--start-timeout", type=float, default=60.0, help="s to wait for READY")
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    if any("=" not in kv for kv in a.server_env):
        p.error("--server-env takes KEY=VALUE")
    if a.no_pin:
        a.server_cpu = a.client_cpu = None
    result = run(a)
    a.results_dir.mkdir(parents=True, exist_ok=True)
    out = a.results_dir / f"scale-{time.strftime('%Y%m%d-%H%M%S')}.json"
    result["file"] = str(out)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print_summary(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Run vfio-user servers side by side, in one run, and compare them.

Starts every server itself (pinned with ``taskset -c CPU``), pins this client to the same
CPU, runs ``vfu_bench`` against each server in alternating rounds, takes the median of the
rounds and prints a table with ratios against a reference server. Writes JSON, a text
summary and the servers' logs to ``benchmarks/results/``.

Servers are preset names or ``NAME=CMD`` (``{sock}`` is replaced by the socket path)::

    python benchmarks/compare.py c-gpio py-edu vfu-edu
    python benchmarks/compare.py c-gpio --server 'mine=./my-server --socket-path={sock}'
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import vfu_bench

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
GPIO_SAMPLE = "gpio-pci-idio-16"

Result = dict[str, Any]


@dataclass
class ServerSpec:
    name: str
    argv: list[str]  # may contain "{sock}"
    region: int = 0
    offset: int = 0
    ready_line: str | None = None  # a stdout line starting with this means "listening"
    cwd: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    missing: str | None = None  # why this server cannot run, if known up front


def gpio_sample_path(samples: str | None) -> tuple[str | None, str | None]:
    """(path to the gpio sample, or None and the reason)."""
    src = samples or os.environ.get("LIBVFIO_USER_SAMPLES")
    if not src:
        return None, ("no libvfio-user samples: set LIBVFIO_USER_SAMPLES=/path/to/build/samples "
                      "or pass --libvfio-user-samples")
    p = Path(src)
    if p.is_dir():
        p = p / GPIO_SAMPLE
    if not (p.is_file() and os.access(p, os.X_OK)):
        return None, f"{p} is not an executable file"
    return str(p), None


def preset(name: str, samples: str | None) -> ServerSpec:
    if name == "c-gpio":
        path, why = gpio_sample_path(samples)
        # The sample re-attaches after each disconnect by default (-R would make it exit),
        # which the connect+VERSION test needs. BAR2 is its only region (0x100 bytes).
        return ServerSpec(name, [path or GPIO_SAMPLE, "{sock}"], region=2, offset=0, missing=why)
    if name == "py-edu":
        missing = None
        if not (REPO / "vfiouser_srv" / "__main__.py").is_file():
            missing = f"{REPO / 'vfiouser_srv' / '__main__.py'} does not exist (yet)"
        return ServerSpec(
            name,
            [sys.executable, "-m", "vfiouser_srv", "serve", "edu", "--socket-path", "{sock}"],
            region=0, offset=0, ready_line="READY", cwd=REPO,
            env={"PYTHONUNBUFFERED": "1"}, missing=missing,
        )
    if name == "vfu-edu":
        # Our edu model, protocol handled by libvfio-user through our ctypes engine: the same
        # device as py-edu, so the two rows compare the engines and nothing else.
        return ServerSpec(
            name,
            [sys.executable, "-m", "vfiouser_srv", "serve", "edu", "--engine", "libvfio-user",
             "--socket-path", "{sock}"],
            region=0, offset=0, ready_line="READY", cwd=REPO,
            env={"PYTHONUNBUFFERED": "1"}, missing=libvfio_user_engine_missing(),
        )
    raise KeyError(name)


def libvfio_user_engine_missing() -> str | None:
    """Why `--engine libvfio-user` cannot run here (the engine's own message), or None."""
    probe = subprocess.run(
        [sys.executable, "-c",
         "from vfiouser_srv.engines import load_engine; load_engine('libvfio-user')"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    if probe.returncode == 0:
        return None
    lines = probe.stderr.strip().splitlines()
    return lines[-1] if lines else f"engine probe exited with {probe.returncode}"


PRESETS = ("c-gpio", "py-edu", "vfu-edu")


def parse_server(arg: str, samples: str | None) -> ServerSpec:
    if arg in PRESETS:
        return preset(arg, samples)
    name, sep, cmd = arg.partition("=")
    if not sep or not name or not cmd:
        raise argparse.ArgumentTypeError(
            f"server {arg!r}: expected a preset ({', '.join(PRESETS)}) or NAME=CMD")
    argv = shlex.split(cmd)
    if not any("{sock}" in a for a in argv):
        raise argparse.ArgumentTypeError(f"server {name!r}: command has no {{sock}} placeholder")
    return ServerSpec(name, argv)


# --------------------------------------------------------------------------- servers


class Server:
    """One server process we started, in its own session; stopped through its own pid."""

    def __init__(self, spec: ServerSpec, cpu: int | None, sock_dir: Path, log_path: Path) -> None:
        self.spec = spec
        self.cpu = cpu
        self.sock = str(sock_dir / f"{spec.name}.sock")
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: IO[bytes] | None = None
        self.starts = 0

    def argv(self) -> list[str]:
        cmd = [a.replace("{sock}", self.sock) for a in self.spec.argv]
        if self.cpu is not None:
            cmd = ["taskset", "-c", str(self.cpu), *cmd]
        return cmd

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float) -> None:
        """Start and wait until it listens; raises RuntimeError with the reason."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sock)
        self.log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop())
        self.log.write(f"--- start: {shlex.join(self.argv())}\n".encode())
        self.log.flush()
        env = {**os.environ, **self.spec.env}
        try:
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=self.log,
                                         stderr=subprocess.STDOUT, cwd=self.spec.cwd, env=env,
                                         start_new_session=True)
        except OSError as e:
            raise RuntimeError(f"cannot start: {e}") from e
        self.starts += 1
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited with status {self.proc.returncode} before listening; "
                                   f"log tail:\n{self.log_tail()}")
            if self._ready():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"not listening on {self.sock} after {timeout_s:.0f} s; "
                                   f"log tail:\n{self.log_tail()}")
            time.sleep(0.02)

    def _ready(self) -> bool:
        if self.spec.ready_line is not None:
            with contextlib.suppress(OSError):
                for line in self.log_path.read_text(errors="replace").splitlines():
                    if line.startswith(self.spec.ready_line):
                        return True
        if not os.path.exists(self.sock):
            return False
        # Probe with a full VERSION exchange: libvfio-user's samples exit if their first
        # client hangs up before negotiating.
        try:
            with vfu_bench.Conn(self.sock, timeout_s=5.0) as conn:
                conn.negotiate()
            return True
        except (OSError, vfu_bench.ServerError, vfu_bench.ProtocolError):
            return False

    def log_tail(self, n: int = 15) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join("    " + ln for ln in lines[-n:])

    def affinity(self) -> str | None:
        if self.proc is None:
            return None
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("Cpus_allowed_list:"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return None

    def _signal_group(self, sig: int) -> bool:
        """Signal the process group we created for this server (its pid is the group id),
        so a wrapper script's children go too. False if the group is gone."""
        if self.proc is None:
            return False
        try:
            os.killpg(self.proc.pid, sig)
            return True
        except ProcessLookupError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait(5)
            deadline = time.monotonic() + 2
            while self._signal_group(0) and time.monotonic() < deadline:
                time.sleep(0.05)
            self._signal_group(signal.SIGKILL)  # leftovers of a wrapper, if any
        if self.log is not None:
            self.log.close()
            self.log = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sock)


# --------------------------------------------------------------------------- aggregation

# (test, metric, label, kind): kind "lat" = lower is better, "thr" = higher is better
ROWS: list[tuple[str, str, str, str]] = [
    ("connect", "median_us", "connect + VERSION, µs", "lat"),
    ("serial", "median_us", "serial REGION_READ median, µs", "lat"),
    ("serial", "p99_us", "serial REGION_READ p99, µs", "lat"),
    ("serial", "msgs_per_s", "serial msgs/s", "thr"),
    ("pipelined", "msgs_per_s", "pipelined msgs/s", "thr"),
    ("dma", "map_median_us", "DMA_MAP no fd, µs", "lat"),
    ("dma", "unmap_median_us", "DMA_UNMAP no fd, µs", "lat"),
    ("dma_fd", "map_median_us", "DMA_MAP memfd, µs", "lat"),
    ("dma_fd", "unmap_median_us", "DMA_UNMAP memfd, µs", "lat"),
    ("serial", "server_cpu_us_per_msg", "server CPU/msg serial, µs", "lat"),
    ("pipelined", "server_cpu_us_per_msg", "server CPU/msg pipelined, µs", "lat"),
    ("connect", "server_cpu_us_per_msg", "server CPU/connect, µs", "lat"),
]


def aggregate(rounds: list[Result]) -> Result:
    """Per test and numeric metric: median over rounds, plus all round values."""
    agg: Result = {}
    for r in rounds:
        for test, metrics in r["tests"].items():
            t = agg.setdefault(test, {"errors": [], "values": {}})
            if "error" in metrics:
                t["errors"].append(metrics["error"])
                continue
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    t["values"].setdefault(k, []).append(v)
    for t in agg.values():
        t["median"] = {k: statistics.median(v) for k, v in t["values"].items()}
    return agg


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.2f}"


def summary_table(names: list[str], aggs: dict[str, Result], ref: str | None,
                  depth: int) -> str:
    others = [n for n in names if n != ref] if ref in names else []
    head = ["metric", *names] + [f"{o}/{ref}" for o in others]
    rows: list[list[str]] = []
    for test, metric, label, _kind in ROWS:
        if test == "pipelined" and metric == "msgs_per_s":
            label = f"pipelined msgs/s (depth {depth})"
        vals: dict[str, float | None] = {}
        for n in names:
            vals[n] = aggs[n].get(test, {}).get("median", {}).get(metric)
        if all(v is None for v in vals.values()):
            continue
        row = [label] + [_fmt(vals[n]) for n in names]
        for o in others:
            a, b = vals[o], vals[ref] if ref is not None else None
            row.append(f"{a / b:.2f}x" if a is not None and b else "-")
        rows.append(row)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(r, widths, strict=True))) for r in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def pinning(cpu: int | None, server_cpu: int | None) -> str:
    if cpu is None:
        return "none"
    if server_cpu == cpu:
        return f"client and servers on CPU {cpu}"
    return f"client on CPU {cpu}, servers on CPU {server_cpu}"


def environment(cpu: int | None) -> Result:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=5).stdout.strip()
    return {"kernel": platform.release(), "cpus": os.cpu_count(), "cpu_model": model,
            "python": platform.python_version(), "pinned_cpu": cpu, "repo_commit": commit,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="presets: c-gpio (libvfio-user's gpio-pci-idio-16 sample, "
                                       "BAR2), py-edu (python -m vfiouser_srv serve edu, BAR0) "
                                       "and vfu-edu (the same edu, --engine libvfio-user; needs "
                                       "LIBVFIO_USER_PATH or a system libvfio-user)")
    p.add_argument("servers", nargs="*",
                   help="preset name or NAME=CMD with {sock}; default: c-gpio py-edu vfu-edu")
    p.add_argument("--server", action="append", default=[], metavar="NAME=CMD",
                   help="another server command ({sock} = socket path); repeatable")
    p.add_argument("--region", action="append", default=[], metavar="NAME=IDX[:OFFSET]",
                   help="region (and offset) REGION_READ uses for that server; default 0:0")
    p.add_argument("--reference", default=None,
                   help="server the ratios divide by (default: c-gpio if run, else the first)")
    p.add_argument("--libvfio-user-samples", default=None, metavar="DIR",
                   help="libvfio-user build/samples dir (default: $LIBVFIO_USER_SAMPLES)")
    p.add_argument("--rounds", type=int, default=6, help="measured rounds per server")
    p.add_argument("--warmup-rounds", type=int, default=1, help="discarded rounds per server")
    p.add_argument("--cpu", type=int, default=0, help="CPU for client and servers")
    p.add_argument("--server-cpu", type=int, default=None, metavar="N",
                   help="pin the servers to CPU N instead (the client stays on --cpu): the "
                   "topology of QEMU and a device server on CPUs of their own")
    p.add_argument("--no-pin", action="store_true", help="do not pin (numbers get bimodal)")
    p.add_argument("--ready-timeout", type=float, default=20.0)
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    p.add_argument("--quick", action="store_true", help="fewer iterations (smoke test)")
    p.add_argument("--syscalls", action="store_true",
                   help="after the rounds, count server syscalls per serial REGION_READ with "
                        "strace (separate, untimed run)")
    vfu_bench.add_bench_args(p)
    a = p.parse_args(argv)

    if a.quick:
        a.connect_iters, a.serial_iters, a.serial_warmup = 50, 2000, 200
        a.pipeline_msgs, a.dma_iters = 10000, 200

    samples = a.libvfio_user_samples
    try:
        specs = [parse_server(s, samples) for s in (a.servers + a.server or list(PRESETS))]
    except (argparse.ArgumentTypeError, KeyError) as e:
        p.error(str(e))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        p.error(f"duplicate server names: {names}")
    by_name = {s.name: s for s in specs}
    for r in a.region:
        name, _, where = r.partition("=")
        if name not in by_name:
            p.error(f"--region {r}: no server named {name!r}")
        idx, _, off = where.partition(":")
        by_name[name].region = int(idx, 0)
        by_name[name].offset = int(off, 0) if off else 0

    cpu = None if a.no_pin else a.cpu
    if cpu is not None:
        if shutil.which("taskset") is None:
            p.error("taskset not found (util-linux); use --no-pin")
        os.sched_setaffinity(0, {cpu})
    server_cpu = cpu if a.server_cpu is None or cpu is None else a.server_cpu

    a.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = a.results_dir / f"compare-{stamp}"
    sock_dir = Path(tempfile.mkdtemp(prefix="vfu-compare-"))
    servers: dict[str, Server] = {}
    skipped: dict[str, str] = {}
    rounds: dict[str, list[Result]] = {}
    syscalls: dict[str, float | None] = {}
    try:
        for spec in specs:
            if spec.missing:
                skipped[spec.name] = spec.missing
                continue
            srv = Server(spec, server_cpu, sock_dir, Path(f"{base}-{spec.name}.log"))
            try:
                srv.start(a.ready_timeout)
            except RuntimeError as e:
                skipped[spec.name] = str(e)
                srv.stop()
                continue
            servers[spec.name] = srv
            rounds[spec.name] = []
        for n, why in skipped.items():
            print(f"not run: {n}: {why}", file=sys.stderr)

        ran = list(servers)
        total = a.warmup_rounds + a.rounds
        for rnd in range(total):
            order = ran if rnd % 2 == 0 else ran[::-1]  # ABBA: cancel slow drift
            for n in order:
                srv = servers[n]
                if not srv.alive():
                    print(f"{n}: died (status {srv.proc.returncode if srv.proc else '?'}), "
                          f"restarting", file=sys.stderr)
                    srv.stop()
                    try:
                        srv.start(a.ready_timeout)
                    except RuntimeError as e:
                        print(f"{n}: restart failed: {e}", file=sys.stderr)
                        continue
                cfg = vfu_bench.config_from_args(a, srv.sock, srv.spec.region, srv.spec.offset)
                res = vfu_bench.run_benchmarks(cfg)
                res["round"] = rnd
                res["warmup"] = rnd < a.warmup_rounds
                res["server_affinity"] = srv.affinity()
                res["launcher_pid"] = srv.proc.pid if srv.proc else None
                tag = "warmup" if res["warmup"] else f"round {rnd - a.warmup_rounds + 1}/{a.rounds}"
                ser = res["tests"].get("serial", {})
                brief = (f"serial {ser['median_us']:.2f} µs" if "median_us" in ser
                         else f"serial {ser.get('error', 'not run')}")
                print(f"[{tag}] {n}: {brief}", file=sys.stderr)
                rounds[n].append(res)
        if a.syscalls:
            for n in ran:
                srv = servers[n]
                pid = next((r["server_pid"] for r in rounds[n] if r.get("server_pid")), None)
                if pid is None or not srv.alive():
                    continue
                cfg = vfu_bench.config_from_args(a, srv.sock, srv.spec.region, srv.spec.offset)
                try:
                    syscalls[n] = vfu_bench.strace_syscalls_per_msg(cfg, pid)
                except (OSError, vfu_bench.ServerError, vfu_bench.ProtocolError,
                        subprocess.SubprocessError) as e:
                    print(f"{n}: strace failed: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted; stopping servers", file=sys.stderr)
    finally:
        for srv in servers.values():
            srv.stop()
        with contextlib.suppress(OSError):
            sock_dir.rmdir()

    ran = [n for n in names if n in servers]
    aggs = {n: aggregate([r for r in rounds[n] if not r["warmup"]]) for n in ran}
    ref = a.reference or ("c-gpio" if "c-gpio" in ran else (ran[0] if ran else None))
    if ref is not None and ref not in ran:
        print(f"reference {ref!r} did not run: absolute numbers only", file=sys.stderr)
        ref = None

    text: list[str] = [
        f"vfio-user server comparison, {time.strftime('%Y-%m-%d %H:%M:%S')}",
        f"pinning: {pinning(cpu, server_cpu)}; "
        f"{a.rounds} rounds (+{a.warmup_rounds} warm-up) per server, alternating; "
        "medians of rounds",
    ]
    for n in ran:
        s = servers[n].spec
        text.append(f"  {n}: {shlex.join(servers[n].argv())}  (region {s.region} "
                    f"offset {s.offset:#x}, started {servers[n].starts}x)")
    for n, why in skipped.items():
        lines = [ln.strip() for ln in why.splitlines() if ln.strip()]
        last = f" ... {lines[-1]}" if len(lines) > 1 else ""
        text.append(f"  {n}: NOT RUN: {lines[0] if lines else '?'}{last}")
    text.append("")
    if ran:
        text.append(summary_table(ran, aggs, ref, a.depth))
        for n, per_msg in syscalls.items():
            text.append(f"  {n}: server syscalls per serial REGION_READ (strace): "
                        f"{per_msg if per_msg is None else round(per_msg, 2)}")
        for n in ran:
            for test, t in aggs[n].items():
                if t["errors"]:
                    text.append(f"  {n} {test}: {len(t['errors'])} round(s) failed: "
                                f"{t['errors'][0]}")
        if ref is not None and len(ran) > 1:
            text.append("")
            text.append(f"ratios are other/{ref}: for µs rows >1 means slower than {ref}, "
                        f"for msgs/s rows <1 means slower than {ref}")
        elif len(ran) == 1:
            text.append("")
            text.append("only one server ran: no ratios")
    else:
        text.append("no server ran")
    summary = "\n".join(text)
    print(summary)

    env = {**environment(cpu), "server_cpu": server_cpu}
    doc = {"environment": env, "reference": ref, "skipped": skipped,
           "servers": {n: {"argv": servers[n].argv(), "region": servers[n].spec.region,
                           "offset": servers[n].spec.offset, "starts": servers[n].starts}
                       for n in ran},
           "median": {n: {t: v["median"] for t, v in aggs[n].items()} for n in ran},
           "errors": {n: {t: v["errors"] for t, v in aggs[n].items() if v["errors"]}
                      for n in ran},
           "syscalls_per_msg": syscalls,
           "rounds": rounds,
           "bench_args": {k: v for k, v in vars(a).items() if k != "results_dir"}}
    Path(f"{base}.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    Path(f"{base}.txt").write_text(summary + "\n")
    print(f"\nwrote {base}.json and {base}.txt", file=sys.stderr)
    return 0 if ran else 1


if __name__ == "__main__":
    sys.exit(main())

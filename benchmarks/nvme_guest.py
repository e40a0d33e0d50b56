"""Guest-measured NVMe throughput: QEMU's built-in nvme against ours, as ratios.

Boots the test guest once with QEMU's `-device nvme` and once with our NVMe model behind
vfio-user-pci (shared RAM, so DMA goes through mmap), both on a fresh raw image file of the
same size. The guest (`qemu-configs/guest/nvme-test.sh`, `vfu_bench=N`) runs N rounds of:

* sequential write: busybox `dd bs=1M oflag=direct`, MIB MiB from /dev/zero;
* sequential read: the same range back with `iflag=direct`;
* 4 KiB random reads: 200 single-block `dd iflag=direct` runs at scattered offsets. A
  busybox `dd` per read is what the guest can do without a compiler; its start-up in a TCG
  guest costs more than the read, so IOPS here are per `dd`. The same 200 runs without I/O
  are timed too, and the difference (what the read adds) is shown as a median; it is a
  small difference of two noisy numbers, so no ratio is drawn from it when it is <= 0.

Timing is the guest's nanosecond clock (`/proc/timer_list`). For every metric the best
round is taken (first rounds are always slower) and the ratio ours / QEMU's is reported
(> 1 means ours is faster; for times, QEMU's / ours). Boots alternate when `--boots` > 1.

CPU: the guest prints `PHASE <name> start|end` around each measurement and counts the I/Os
the disk completed (/sys/block/X/stat); at each marker this script samples the CPU time of
its child processes (sum of `/proc/PID/task/*/schedstat`), so every phase gets our server's
CPU per guest I/O and QEMU's (the whole process: vCPU thread, main loop, its own nvme
emulation for the built-in device) per I/O, medians over the rounds, and per MiB for the
sequential phases (the guest's request size changes between boots). After the rounds the
guest sits idle for a few seconds (`--idle`), and the server's CPU over that period is
reported as a share of one core: it must be ~0 (no polling without I/O).

Why the guest waits longer with ours (devices/nvme/README.md), per guest I/O and phase: the
guest's summed I/O latency (/sys/block/X/stat), its interrupts, context switches and CPU
ticks (`DIAG` lines), our server's messages by command (`query-stats` on its control
socket: REGION_WRITE is the guest's MMIO doorbells), its run delay and minor faults, and
QEMU's CPU by thread (TCG vCPU: the guest's own running time; main loop; the rest), with
the vCPU thread's wait for a CPU, its kernel time and its sleeps.
`--base DIR` also runs our server from another source tree (a `git worktree` of the old
code) in the same alternation, for old/new ratios from one run.

    .venv/bin/python benchmarks/nvme_guest.py [--rounds 5] [--mib 32] [--boots 1] [--idle 5]
                                              [--base /tmp/base-tree] [--set poll_us=1000]

Results go to benchmarks/results/nvme-guest-<stamp>.{json,txt}. Run it alone on the
machine (one QEMU at a time): `flock /tmp/vfiouser-qemu.lock .venv/bin/python ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio
from guest_cpu import CpuSampler, children, minor_faults

from vfiouser_srv.qemu import run_config
from vfiouser_srv.qemu.launcher import new_run_dir, serve_device

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 1 << 20
IMAGE_SIZE = 128 * MIB
_BENCH = re.compile(r"^BENCH round=(\d+) (\S+) (.*)$")
_DIAG = re.compile(r"^DIAG round=(\d+) phase=(\S+) (.*)$")
_PHASE = re.compile(r"^PHASE (\S+) (start|end)$")

Metrics = dict[str, float]


def parse_bench(lines: list[str]) -> list[Metrics]:
    """One dict per round: seq_write / seq_read MiB/s, rand_read_4k IOPS and latency µs."""
    rounds: dict[int, Metrics] = {}
    for line in lines:
        m = _BENCH.match(line.strip())
        if not m:
            continue
        rnd, kind = int(m.group(1)), m.group(2)
        if kind == "idle":
            continue
        fields = {k: int(v) for k, v in (kv.split("=") for kv in m.group(3).split())}
        out = rounds.setdefault(rnd, {})
        if kind in ("seq_write", "seq_read"):
            out[f"{kind}_mib_s"] = fields["bytes"] / MIB / (fields["ns"] / 1e9)
        elif kind == "rand_read_4k":
            per_dd_ns = fields["ns"] / fields["ops"]
            out["rand_read_4k_iops"] = 1e9 / per_dd_ns
            out["rand_read_4k_dd_us"] = per_dd_ns / 1e3
            # what the read adds to an I/O-less dd: small against dd's start-up, so noisy
            extra_ns = fields["ns"] - fields["baseline_ns"]
            out["rand_read_4k_extra_us"] = extra_ns / fields["ops"] / 1e3
        out[f"{kind}_ios"] = fields.get("ios", 0)
    return [rounds[k] for k in sorted(rounds)]


def parse_diag(lines: list[str]) -> dict[str, dict[str, int]]:
    """The guest's own counters per phase (`DIAG` lines), summed over the rounds."""
    out: dict[str, dict[str, int]] = {}
    for line in lines:
        m = _DIAG.match(line.strip())
        if m:
            acc = out.setdefault(m.group(2), {})
            for k, v in (kv.split("=") for kv in m.group(3).split()):
                acc[k] = acc.get(k, 0) + int(v)
    return out


def query_stats(path: Path) -> dict[str, int]:
    """Our server's message counters (`query-stats` on its control socket), blocking: it is
    called from a console callback, outside the CPU-sampled span of a phase."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(path))
        f = s.makefile("rwb")
        f.readline()
        f.write(b'{"execute": "query-stats"}\n')
        f.flush()
        reply = json.loads(f.readline())["return"]
    out: dict[str, int] = {}
    for dev in reply.values():
        for name, n in dev["messages"].items():
            out[name] = out.get(name, 0) + n
        out["interrupts"] = out.get("interrupts", 0) + dev["interrupts"]
    return out


def qemu_threads_ns(pid: int) -> dict[str, int]:
    """CPU ns of QEMU's threads by kind: `vcpu` (the TCG vCPU thread: the guest's own
    running time, idle guest excluded), `main` (the main loop: our interrupts and its own
    nvme's queue processing) and `other` (its block-layer worker threads, vfio-user's)."""
    out = {"qemu_vcpu_ns": 0, "qemu_main_ns": 0, "qemu_other_ns": 0}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                comm = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                ns, delay = (int(v) for v in f.read().split()[:2])
        except (OSError, ValueError, IndexError):
            continue
        vcpu = "/TCG" in comm or "/KVM" in comm
        kind = ("qemu_vcpu_ns" if vcpu
                else "qemu_main_ns" if tid == str(pid) else "qemu_other_ns")
        out[kind] += ns
        if vcpu:
            out.update(vcpu_detail(pid, tid, delay))
    return out


def vcpu_detail(pid: int, tid: str, delay: int) -> dict[str, int]:
    """Where the vCPU thread's time goes besides running guest code: its wait for a CPU
    (schedstat run_delay), its kernel time (stime, clock ticks: coarse) and how often it
    slept (voluntary context switches: a halted guest, or a wait for QEMU's big lock)."""
    out = {"qemu_vcpu_run_delay_ns": delay}
    try:
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        out["qemu_vcpu_utime_ticks"] = int(fields[11])
        out["qemu_vcpu_stime_ticks"] = int(fields[12])
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    key, value = line.split(":")
                    out[f"qemu_vcpu_{key.split('_')[0]}_switches"] = int(value)
    except (OSError, ValueError, IndexError):
        pass
    return out


def server_waits(pid: int) -> dict[str, int]:
    """Our server's time runnable but not running (schedstat run_delay, all threads: the
    host's other load delaying us) and its minor page faults (first touches of guest
    memory through our mapping)."""
    delay = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        tids = []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                delay += int(f.read().split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return {"server_run_delay_ns": delay, "server_minflt": minor_faults(pid)}


class StatsSampler:
    """Message counts of our server and QEMU's CPU by thread kind, per phase, around the
    CPU samples (taken before a phase's CPU start sample and after its end sample, so the
    query costs the phase no server CPU); summed over the rounds."""

    def __init__(self, cpu: CpuSampler, control: Path | None) -> None:
        self.cpu, self.control = cpu, control
        self._open: dict[str, dict[str, int]] = {}
        self.totals: dict[str, dict[str, int]] = {}

    def _sample(self) -> dict[str, int]:
        out = query_stats(self.control) if self.control is not None else {}
        if "qemu" not in self.cpu.pids:
            self.cpu.pids = children()
        if "qemu" in self.cpu.pids:
            out.update(qemu_threads_ns(self.cpu.pids["qemu"]))
        if "server" in self.cpu.pids:
            out.update(server_waits(self.cpu.pids["server"]))
        return out

    def on_line(self, line: str) -> None:
        m = _PHASE.match(line.strip())
        if not m:
            self.cpu.on_line(line)
            return
        name, edge = m.group(1), m.group(2)
        if edge == "start":
            self._open[name] = self._sample()
            self.cpu.on_line(line)
            return
        self.cpu.on_line(line)
        if name in self._open:
            start, now = self._open.pop(name), self._sample()
            acc = self.totals.setdefault(name, {})
            for k, v in now.items():
                acc[k] = acc.get(k, 0) + v - start.get(k, 0)


def cpu_metrics(sampler: CpuSampler, rounds: list[Metrics], mib: int) -> Metrics:
    """Median CPU µs per guest I/O by phase and role, and per MiB for the sequential
    phases (`mib` MiB each: the guest sends 512 KiB or 1 MiB requests depending on how its
    buffer's pages happen to lie, which changes between boots, so only per MiB compares
    two boots); idle: server CPU share of one core."""
    out: Metrics = {}
    for kind in ("seq_write", "seq_read", "rand_read_4k"):
        spans = sampler.spans.get(kind, [])
        for role in ("server", "qemu"):
            per_io = [span[role] / 1e3 / r[f"{kind}_ios"]
                      for span, r in zip(spans, rounds, strict=False)
                      if role in span and r.get(f"{kind}_ios")]
            if per_io:
                out[f"{kind}_{role}_cpu_us_per_io"] = statistics.median(per_io)
            per_mib = [span[role] / 1e3 / mib for span in spans if role in span]
            if per_mib and kind != "rand_read_4k":
                out[f"{kind}_{role}_cpu_us_per_mib"] = statistics.median(per_mib)
    for span in sampler.spans.get("idle", []):
        for role in ("server", "qemu"):
            if role in span and span["wall"] > 0:
                out[f"idle_{role}_cpu_share"] = span[role] / span["wall"]
    return out


def best(rounds: list[Metrics]) -> Metrics:
    """Best round per metric; the noisy difference `*_extra_us` takes the median instead."""
    out: Metrics = {}
    for key in rounds[0]:
        values = [r[key] for r in rounds if key in r]
        if key.endswith("_extra_us"):
            out[key] = statistics.median(values)
        else:
            out[key] = min(values) if key.endswith("_us") else max(values)
    return out


async def run_one(which: str, workdir: Path, args: argparse.Namespace
                  ) -> tuple[list[Metrics], Metrics]:
    """One boot: the BENCH rounds and the CPU metrics of that boot."""
    img = workdir / f"{which}.img"
    with img.open("wb") as f:
        f.truncate(IMAGE_SIZE)
    env = {"nvme_steps": "ident", "bench": str(args.rounds), "bench_mib": str(args.mib),
           "bench_idle": str(args.idle)}
    sampler = CpuSampler()
    if which == "qemu":
        stats = StatsSampler(sampler, None)
        run = await run_config("qemu-nvme", placeholders={"DISK": str(img)}, guest_env=env,
                               timeout=900, on_line=stats.on_line)
    else:
        run_dir = await new_run_dir("nvme-bench-server")
        sock, control = run_dir / "nvme.sock", run_dir / "control.sock"
        stats = StatsSampler(sampler, control)
        python = None
        if which == "base":  # the same interpreter, importing the other tree's code
            python = str(workdir / "base-python.sh")
            Path(python).write_text(f'#!/bin/sh\ncd "{args.base}" && exec "{sys.executable}"'
                                    ' "$@"\n')
            Path(python).chmod(0o755)
        async with serve_device("nvme", sock, run_dir=run_dir, python=python,
                                sets=[f"backing={img}", "size=128M",
                                      *(args.set if which == "ours" else [])],
                                extra_args=["--control", str(control)]) as server:
            run = await run_config("nvme", socket_path=sock, guest_env=env, timeout=900,
                                   on_line=stats.on_line)
            await server.stop()
    res = run.guest
    if not res.ok:
        raise SystemExit(f"{which}: guest run failed; logs in {res.run_dir}")
    parsed = parse_bench(res.console)
    if len(parsed) != args.rounds:
        raise SystemExit(f"{which}: expected {args.rounds} BENCH rounds; logs in {res.run_dir}")
    used = cpu_metrics(sampler, parsed, args.mib)
    # per guest I/O: the guest's interrupts, CPU ticks and context switches, and the
    # messages our server received (REGION_WRITE: the guest's MMIO writes)
    for kind, counts in parse_diag(res.console).items():
        ios = sum(r.get(f"{kind}_ios", 0) for r in parsed)
        for key, n in [*counts.items(), *stats.totals.get(kind, {}).items()]:
            if ios:
                used[f"{kind}_{key}_per_io"] = n / ios
    info = [line for line in res.console if line.startswith("INFO queue:")]
    print(f"{which}: {info[0] if info else 'no queue line'}")
    return parsed, used


def ratio(b: dict[str, Metrics], num: str, den: str) -> Metrics:
    """`num` / `den` per metric, > 1 meaning `num` is faster (for times: den / num)."""
    return {key: (b[den][key] / b[num][key] if key.endswith("_us") else b[num][key] / b[den][key])
            for key in b[den]
            if not key.endswith("_ios") and b[den][key] > 0 and b[num].get(key, 0) > 0}


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    kinds = ["qemu", "ours", *(["base"] if args.base else [])]
    per: dict[str, list[Metrics]] = {k: [] for k in kinds}
    cpu: dict[str, list[Metrics]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory(prefix="nvme-bench-") as tmp:
        for boot in range(args.boots):
            order = kinds if boot % 2 == 0 else kinds[::-1]
            for which in order:
                t0 = time.monotonic()
                got, used = await run_one(which, Path(tmp), args)
                per[which] += got
                cpu[which].append(used)
                print(f"[boot {boot + 1}] {which}: {len(got)} rounds in "
                      f"{time.monotonic() - t0:.1f} s; best {best(got)}; cpu {used}")
    b = {k: best(v) for k, v in per.items()}
    ratios = ratio(b, "ours", "qemu")
    cpu_med = {k: {key: statistics.median(m[key] for m in v if key in m)
                   for key in {key for m in v for key in m}} for k, v in cpu.items()}
    out = {"rounds": args.rounds, "boots": args.boots, "mib": args.mib, "idle_s": args.idle,
           "ours_sets": args.set,
           "image_bytes": IMAGE_SIZE, "per_round": per, "best": b,
           "ratio_ours_over_qemu": ratios, "cpu_per_boot": cpu, "cpu": cpu_med}
    if args.base:
        out["base_tree"] = args.base
        out["ratio_base_over_qemu"] = ratio(b, "base", "qemu")
        out["ratio_ours_over_base"] = ratio(b, "ours", "base")
    return out


def render(out: dict[str, object]) -> str:
    b: dict[str, Metrics] = out["best"]  # type: ignore[assignment]
    ratios: Metrics = out["ratio_ours_over_qemu"]  # type: ignore[assignment]
    base: Metrics | None = out.get("ratio_ours_over_base")  # type: ignore[assignment]
    rows = [("sequential write, 1 MiB O_DIRECT", "seq_write_mib_s", "MiB/s"),
            ("sequential read, 1 MiB O_DIRECT", "seq_read_mib_s", "MiB/s"),
            ("random read 4 KiB, one dd per read", "rand_read_4k_iops", "IOPS"),
            ("  the same, time per dd", "rand_read_4k_dd_us", "µs"),
            ("  of which the read (median, noisy)", "rand_read_4k_extra_us", "µs")]
    lines = [f"NVMe in the guest (TCG, 1 vCPU), best of {out['rounds']} rounds x "
             f"{out['boots']} boot(s), {out['mib']} MiB sequential",
             f"  {'':42} {'QEMU nvme':>12} {'ours':>12} {'ours/QEMU':>10}"
             + (f" {'base':>12} {'base/QEMU':>10} {'ours/base':>10}" if base else "")]
    for label, key, unit in rows:
        ratio = f"{ratios[key]:>9.2f}x" if key in ratios else "      n/a"
        line = (f"  {label:42} {b['qemu'][key]:>8.1f} {unit:<5} {b['ours'][key]:>8.1f} "
                f"{unit:<5} {ratio}")
        if base:
            bq: Metrics = out["ratio_base_over_qemu"]  # type: ignore[assignment]
            line += (f" {b['base'][key]:>8.1f} {unit:<5}"
                     + (f" {bq[key]:>9.2f}x" if key in bq else "       n/a")
                     + (f" {base[key]:>9.2f}x" if key in base else "       n/a"))
        lines.append(line)
    cpu: dict[str, Metrics] = out["cpu"]  # type: ignore[assignment]
    lines.append("  CPU per guest I/O, µs (median of rounds): QEMU process / our server")
    for kind in ("seq_write", "seq_read", "rand_read_4k"):
        q = cpu["qemu"].get(f"{kind}_qemu_cpu_us_per_io", 0.0)
        line = f"    {kind:14} QEMU nvme: qemu {q:8.1f}"
        for who in ("ours", *(["base"] if base else [])):
            oq = cpu[who].get(f"{kind}_qemu_cpu_us_per_io", 0.0)
            os_ = cpu[who].get(f"{kind}_server_cpu_us_per_io", 0.0)
            ios = b[who].get(f"{kind}_ios", 0.0)
            line += f"   {who}: qemu {oq:8.1f} + server {os_:7.1f} ({ios:.0f} I/Os/round)"
        lines.append(line)
    lines.append("  CPU per MiB, µs (median of rounds; compares boots whose request sizes"
                 " differ): QEMU process / our server")
    for kind in ("seq_write", "seq_read"):
        q = cpu["qemu"].get(f"{kind}_qemu_cpu_us_per_mib", 0.0)
        line = f"    {kind:14} QEMU nvme: qemu {q:8.1f}"
        for who in ("ours", *(["base"] if base else [])):
            oq = cpu[who].get(f"{kind}_qemu_cpu_us_per_mib", 0.0)
            os_ = cpu[who].get(f"{kind}_server_cpu_us_per_mib", 0.0)
            line += f"   {who}: qemu {oq:8.1f} + server {os_:7.1f}"
        lines.append(line)
    lines.append("  per guest I/O (sums over rounds / I/Os): the guest's summed I/O latency"
                 " (ms), nvme interrupts, MMIO doorbells (REGION_WRITE), QEMU vCPU µs")
    for kind in ("seq_write", "seq_read", "rand_read_4k"):
        line = f"    {kind:14}"
        for who in cpu:
            m = cpu[who]
            line += (f" {who}: {m.get(f'{kind}_io_ms_per_io', 0.0):.3f} ms"
                     f" {m.get(f'{kind}_nvme_irqs_per_io', 0.0):.2f} irq"
                     f" {m.get(f'{kind}_REGION_WRITE_per_io', 0.0):.2f} db"
                     f" {m.get(f'{kind}_qemu_vcpu_ns_per_io', 0.0) / 1e3:.0f} µs"
                     f" (waiting for a CPU"
                     f" {m.get(f'{kind}_qemu_vcpu_run_delay_ns_per_io', 0.0) / 1e3:.0f} µs,"
                     f" {m.get(f'{kind}_qemu_vcpu_voluntary_switches_per_io', 0.0):.1f}"
                     " sleeps);")
        lines.append(line)
    idle = cpu["ours"].get("idle_server_cpu_share", float("nan"))
    lines.append(f"  idle guest ({out['idle_s']} s): our server used {idle * 100:.2f}% of one core"
                 f" (QEMU: {cpu['ours'].get('idle_qemu_cpu_share', float('nan')) * 100:.1f}%"
                 f" with ours, {cpu['qemu'].get('idle_qemu_cpu_share', float('nan')) * 100:.1f}%"
                 " with its own nvme)")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5, help="bench rounds per boot")
    p.add_argument("--mib", type=int, default=32, help="MiB per sequential measurement")
    p.add_argument("--boots", type=int, default=1, help="boots per device (alternating)")
    p.add_argument("--idle", type=int, default=5, help="seconds of idle guest measured")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an option for our server (not base's), e.g. poll_us=1000")
    p.add_argument("--base", default="", help="also run our server from this source tree "
                   "(e.g. a `git worktree` of the old code), for old/new ratios in one run")
    args = p.parse_args()
    out = trio.run(main_async, args)
    text = render(out)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"nvme-guest-{stamp}.json").write_text(json.dumps(out, indent=2) + "\n")
    (RESULTS / f"nvme-guest-{stamp}.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()

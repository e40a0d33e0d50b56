#!/usr/bin/env python3
"""Guest-measured virtio throughput: our virtio-blk / virtio-net against QEMU's built-in ones.

Why in the guest: what matters is what a real driver gets, and on our TCG hosts the guest is
a large part of the cost, so host-side numbers would flatter both. The guest scripts time
themselves (busybox ``dd`` reports its own rate for 32 MiB O_DIRECT writes and reads;
``virtio-net-test.sh`` times ``nc`` transfers each way with /proc/timer_list; 40 MiB by
default: 10 MiB rounds, as in the CI test, vary by up to 10x on a shared host).

Method: ours and QEMU's alternate, one QEMU at a time
(``flock /tmp/vfiouser-qemu.lock``), several rounds per boot; the first round is dropped
(cold caches), the best remaining round counts, and every round's data is checked (blk: the
guest's checks; net: checksums both ways). Ratios are ours / QEMU's; the goal is >= 1.0 (issue 15).
``ratio`` compares the best boots; ``paired`` is the median over boots of the ratio within a
boot (ours and QEMU's back to back), which is steadier on a shared host.

    flock /tmp/vfiouser-qemu.lock .venv/bin/python benchmarks/virtio_guest.py [--boots 2]
        [--rounds 4] [--only blk|net] [--idle 3] [--base OLD_TREE]

Server CPU: the guest prints ``PHASE <name> start|end`` around each timed part (blk:
``write``, ``read``; net: ``rx``, ``tx``) and, after the rounds, around ``--idle`` seconds
without I/O. At each marker this script samples the CPU time of its child processes (the sum
of ``/proc/PID/task/*/schedstat``, exact ns): our server's CPU per request (blk: requests
the guest's disk completed, ``/sys/block/vda/stat``) and per MiB, and QEMU's (the whole
process: vCPU, main loop and, for the built-in device, its emulation) per MiB for both
configurations; idle: each process's CPU as a share of one core over the idle period (the
server's must be ~0: no polling without I/O). Medians over the rounds after the first.
The guest also counts its interrupts on the device's vectors around each phase
(``/proc/interrupts``): the table's last column is interrupts per request (blk) or per MiB
(net), ours / QEMU's. The blk script prints the queue limits its driver chose (INFO line).

``VFU_NET_SETS=queue_size=256`` passes extra ``--set`` options to our virtio-net (e.g. QEMU's
default ring size instead of our 1024). Writes ``benchmarks/results/virtio-guest-<stamp>.json``
and ``.txt``. Needs root for the
network part (namespace and TAP).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import trio
from guest_cpu import CpuSampler

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from tests.integration.test_virtio_guest import (  # noqa: E402
    check_blk,
    check_net,
    run_blk,
    run_net,
)

_DD = re.compile(r"BENCH round=(\d+) bytes=(\d+) write_ns=(\d+) read_ns=(\d+)")
_NET = re.compile(r"BENCH round=(\d+) bytes=(\d+) rx_ns=(\d+) tx_ns=(\d+)")
_IOS = re.compile(r"BENCH round=\d+ .* write_ios=(\d+) read_ios=(\d+)")
_IRQS = re.compile(r"(\w+)_irqs=(\d+)")
MIB = 1 << 20
#: bytes per timed phase of the blk guest script (32 MiB dd)
BLK_BYTES = 32 * MIB


def cpu_metrics(sampler: CpuSampler, console: list[str], nbytes: int) -> dict[str, float]:
    """Median over rounds (first dropped) of CPU µs per MiB (and per request for blk) by
    phase and process; idle: CPU share of one core per process."""
    ios: dict[str, list[int]] = {"write": [], "read": []}
    for line in console:
        m = _IOS.search(line)
        if m:
            ios["write"].append(int(m.group(1)))
            ios["read"].append(int(m.group(2)))
    out: dict[str, float] = {}
    # Guest interrupts per request (blk) or per MiB (net), from /proc/interrupts around
    # each phase: completions batched into fewer interrupts show here.
    irqs: dict[str, list[int]] = {}
    for line in console:
        if line.startswith("BENCH"):
            for phase, count in _IRQS.findall(line):
                irqs.setdefault(phase, []).append(int(count))
    for phase, counts in irqs.items():
        kept_counts = list(enumerate(counts))[1:] if len(counts) > 1 else list(enumerate(counts))
        reqs = ios.get(phase, [])
        per = [c / reqs[i] for i, c in kept_counts if i < len(reqs) and reqs[i]] if reqs \
            else [c / (nbytes / MIB) for _, c in kept_counts]
        if per:
            out[f"{phase}_irqs_per_{'req' if reqs else 'mib'}"] = round(statistics.median(per), 2)
    for phase, spans in sampler.spans.items():
        if phase == "idle":
            for span in spans:
                for role in ("server", "qemu"):
                    if role in span and span["wall"] > 0:
                        out[f"idle_{role}_cpu_share"] = round(span[role] / span["wall"], 4)
            continue
        kept = list(enumerate(spans))[1:] if len(spans) > 1 else list(enumerate(spans))
        faults = [s["server_minflt"] / (nbytes / MIB) for _, s in kept if "server_minflt" in s]
        if faults:
            out[f"{phase}_server_faults_per_mib"] = round(statistics.median(faults), 1)
        for role in ("server", "qemu"):
            per_mib = [s[role] / 1e3 / (nbytes / MIB) for _, s in kept if role in s]
            if per_mib:
                out[f"{phase}_{role}_us_per_mib"] = round(statistics.median(per_mib), 1)
            counts = ios.get(phase, [])
            per_req = [s[role] / 1e3 / counts[i] for i, s in kept
                       if role in s and i < len(counts) and counts[i]]
            if per_req:
                out[f"{phase}_{role}_us_per_req"] = round(statistics.median(per_req), 1)
    return out


def blk_rates(console: list[str]) -> dict[str, list[float]]:
    """MiB/s per round for O_DIRECT write and read (guest clock around busybox dd)."""
    out: dict[str, list[float]] = {"write": [], "read": []}
    for line in console:
        m = _DD.search(line)
        if m:
            n = int(m.group(2)) / MIB
            out["write"].append(n / (int(m.group(3)) / 1e9))
            out["read"].append(n / (int(m.group(4)) / 1e9))
    return out


def net_rates(console: list[str]) -> dict[str, list[float]]:
    """MiB/s per round: host->guest (rx) and guest->host (tx), guest clock."""
    out: dict[str, list[float]] = {"rx": [], "tx": []}
    for line in console:
        m = _NET.search(line)
        if m:
            n = int(m.group(2)) / MIB
            out["rx"].append(n / (int(m.group(3)) / 1e9))
            out["tx"].append(n / (int(m.group(4)) / 1e9))
    return out


def best(values: list[float]) -> float:
    """Best round after dropping the first (warm-up) when there are several."""
    kept = values[1:] if len(values) > 1 else values
    return max(kept) if kept else 0.0


async def bench(boots: int, rounds: int, only: str | None, net_mib: int,
                idle: int, variants: list[str], base: str = "") -> dict[str, Any]:
    results: dict[str, Any] = {"rounds": rounds, "boots": boots, "net_mib": net_mib,
                               "idle_s": idle, "variants": variants, "base": base,
                               "runs": []}
    python = None
    if base:  # the same interpreter, importing the other tree's code (blk only)
        python = str(Path(tempfile.mkdtemp(prefix="vfu-base-")) / "base-python.sh")
        Path(python).write_text(f'#!/bin/sh\ncd "{base}" && exec "{sys.executable}" "$@"\n')
        Path(python).chmod(0o755)
    samples: dict[str, dict[str, list[float]]] = {}
    cpu: dict[str, list[dict[str, float]]] = {}
    knobs = {"idle": str(idle)} if idle else {}

    def record(boot: int, config: str, rates: dict[str, list[float]], run_dir: Path,
               sampler: CpuSampler, console: list[str], nbytes: int) -> None:
        for k, v in rates.items():
            samples.setdefault(config, {}).setdefault(k, []).append(best(v))
        used = cpu_metrics(sampler, console, nbytes)
        cpu.setdefault(config, []).append(used)
        results["runs"].append({"boot": boot, "config": config, "rates": rates,
                                "cpu": used, "run_dir": str(run_dir)})
        print(f"boot {boot} {config}: " + ", ".join(
            f"{k} {best(v):.1f} MiB/s" for k, v in rates.items()) + " | "
            + ", ".join(f"{k} {v}" for k, v in used.items()), flush=True)

    def configs(ours: str, ref: str) -> list[tuple[str, str, tuple[str, ...]]]:
        """(label, config, extra server options): ours once per --variant, then QEMU's."""
        mine = [(f"{ours}[{v}]" if v else ours, ours, tuple(x for x in v.split(",") if x))
                for v in variants]
        old = [(f"{ours}[base]", ours, ())] if base and ours == "virtio-blk" else []
        return [*old, *mine, (ref, ref, ())]

    for boot in range(boots):
        for label, config, sets in configs("virtio-blk", "qemu-virtio-blk") \
                if only != "net" else ():
            sampler = CpuSampler()
            with tempfile.TemporaryDirectory(prefix="vfu-bench-") as tmp:
                res, data, after = await run_blk(
                    config, Path(tmp), guest_env={"bench": str(rounds), **knobs},
                    on_line=sampler.on_line, sets=sets,
                    python=python if label.endswith("[base]") else None)
            check_blk(res, data, after)
            record(boot, label, blk_rates(res.console), res.run_dir, sampler, res.console,
                   BLK_BYTES)
        for label, config, sets in configs("virtio-net", "qemu-virtio-net") \
                if only != "blk" else ():
            sampler = CpuSampler()
            run = await run_net(config, rounds=rounds, nbytes=net_mib * MIB, timeout=300,
                                guest_env=knobs, on_line=sampler.on_line, sets=sets)
            check_net(run, rounds, net_mib * MIB)
            record(boot, label, net_rates(run.guest.console), run.guest.run_dir, sampler,
                   run.guest.console, net_mib * MIB)
    summary: dict[str, Any] = {}
    pairs = [(f"{o}[{v}]" if v else o, r) for o, r in (("virtio-blk", "qemu-virtio-blk"),
                                                       ("virtio-net", "qemu-virtio-net"))
             for v in variants]
    if base:
        pairs.insert(0, ("virtio-blk[base]", "qemu-virtio-blk"))
    for ours, ref in pairs:
        if ours not in samples or ref not in samples:
            continue
        for k in samples[ours]:
            o, r = max(samples[ours][k]), max(samples[ref][k])
            # Per boot, ours and QEMU's ran back to back: their ratio cancels load drift.
            paired = [a / b for a, b in zip(samples[ours][k], samples[ref][k], strict=True)
                      if b]
            row: dict[str, float] = {
                "ours_mib_s": round(o, 1), "qemu_mib_s": round(r, 1),
                "ratio": round(o / r, 2) if r else 0.0,
                "paired_median": round(statistics.median(paired), 2) if paired else 0.0}
            for label, config in (("", ours), ("ref_", ref)):
                for metric in ("server_us_per_req", "server_us_per_mib", "qemu_us_per_mib",
                               "irqs_per_req", "irqs_per_mib"):
                    vals = [c[f"{k}_{metric}"] for c in cpu.get(config, [])
                            if f"{k}_{metric}" in c]
                    if vals:
                        row[label + metric] = round(statistics.median(vals), 1)
            summary[f"{ours} {k}"] = row
        for config in (ours, ref):
            for role in ("server", "qemu"):
                vals = [c[f"idle_{role}_cpu_share"] for c in cpu.get(config, [])
                        if f"idle_{role}_cpu_share" in c]
                if vals:
                    summary.setdefault(f"{config} idle", {})[f"{role}_cpu_share"] = max(vals)
    if base and "virtio-blk[base]" in samples and "virtio-blk" in samples:
        # new / old from the same boots: the ratio the change made
        for k in samples["virtio-blk"]:
            new, old = samples["virtio-blk"][k], samples["virtio-blk[base]"][k]
            paired = [a / b for a, b in zip(new, old, strict=True) if b]
            summary[f"new/base {k}"] = {"ratio": round(max(new) / max(old), 2),
                                        "paired_median": round(statistics.median(paired), 2)}
    results["summary"] = summary
    return results


def _irqs(row: dict[str, float]) -> str:
    """Guest interrupts per request (blk) or per MiB (net), ours / QEMU's."""
    for unit in ("req", "mib"):
        if f"irqs_per_{unit}" in row or f"ref_irqs_per_{unit}" in row:
            return (f"{row.get(f'irqs_per_{unit}', '-')}/{row.get(f'ref_irqs_per_{unit}', '-')}"
                    f" per {unit}")
    return "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--boots", type=int, default=2, help="boots per device (alternating)")
    ap.add_argument("--rounds", type=int, default=4, help="rounds per boot (first dropped)")
    ap.add_argument("--only", choices=("blk", "net"))
    ap.add_argument("--net-mib", type=int, default=40,
                    help="MiB per nc transfer (40 is steadier than the CI test's 10; the "
                    "guest->host stalls 40 MiB once showed were the used.idx bug, fixed: "
                    "devices/virtio/README.md)")
    ap.add_argument("--idle", type=int, default=3,
                    help="seconds the guest stays idle after the rounds (server CPU then)")
    ap.add_argument("--variant", action="append", default=None,
                    help="extra --set options for our server, comma-separated (e.g. "
                    "poll_us=0); repeat to run several variants in the same boots (default: "
                    "ours as configured)")
    ap.add_argument("--base", default="",
                    help="also run our virtio-blk from this source tree (a `git worktree` of "
                    "the old commit) in the same boots: old / new / QEMU from one run")
    args = ap.parse_args()
    results = trio.run(bench, args.boots, args.rounds, args.only, args.net_mib, args.idle,
                       args.variant or [""], args.base)
    lines = [f"{'measurement':<32} {'ours MiB/s':>11} {'QEMU MiB/s':>11} {'ratio':>6} "
             f"{'paired':>7} {'srv us/req':>10} {'srv us/MiB':>10} {'qemu us/MiB':>11} "
             f"{'ref qemu us/MiB':>15} {'irqs ours/ref':>13}"]
    for name, row in results["summary"].items():
        if name.endswith(" idle"):
            continue
        if name.startswith("new/base"):
            lines.append(f"{name:<32} best {row['ratio']} paired {row['paired_median']}")
            continue
        lines.append(f"{name:<32} {row['ours_mib_s']:>11} {row['qemu_mib_s']:>11} "
                     f"{row['ratio']:>6} {row['paired_median']:>7} "
                     f"{row.get('server_us_per_req', '-'):>10} "
                     f"{row.get('server_us_per_mib', '-'):>10} "
                     f"{row.get('qemu_us_per_mib', '-'):>11} "
                     f"{row.get('ref_qemu_us_per_mib', '-'):>15} "
                     f"{_irqs(row):>13}")
    for name, row in results["summary"].items():
        if name.endswith(" idle"):
            lines.append(f"{name} ({args.idle} s, share of one core): " + ", ".join(
                f"{k.removesuffix('_cpu_share')} {v}" for k, v in row.items()))
    text = "\n".join(lines)
    print(text)
    HERE.joinpath("results").mkdir(exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    (HERE / "results" / f"virtio-guest-{stamp}.json").write_text(json.dumps(results, indent=2))
    (HERE / "results" / f"virtio-guest-{stamp}.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()

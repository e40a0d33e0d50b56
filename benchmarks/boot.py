"""Guest boot cost of our device: boot-to-poweroff with and without it, side by side.

Runs the same empty guest (no test script: init powers off at once) alternately with the
`none` configuration and with a device configuration (default `edu`: our server behind
vfio-user-pci, shared RAM), and reports the median wall time from QEMU start to QEMU exit
for each and their ratio. Rounds alternate so machine noise hits both sides alike; the first
round of each is a warm-up (page cache, CPU frequency) and is not counted.

    .venv/bin/python benchmarks/boot.py [--rounds 5] [--config edu] [--baseline none]

Results go to benchmarks/results/boot-<stamp>.{json,txt}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import trio

from vfiouser_srv.qemu import run_config

RESULTS = Path(__file__).resolve().parent / "results"


async def boot_once(config: str) -> tuple[float, float]:
    # test=b"": no test script at all (None would mean the configuration's default test)
    run = await run_config(config, test=b"", echo=False, timeout=120.0)
    res = run.guest
    if not res.ok:
        raise SystemExit(f"{config}: guest run failed; logs in {res.run_dir}")
    if run.server_returncode not in (None, 0):
        code, log = run.server_returncode, run.server_log
        raise SystemExit(f"{config}: server exited with {code}; see {log}")
    return res.wall_seconds, res.boot_seconds or 0.0


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    configs = [args.baseline, args.config]
    walls: dict[str, list[float]] = {c: [] for c in configs}
    inits: dict[str, list[float]] = {c: [] for c in configs}
    for rnd in range(args.rounds + 1):
        for cfg in configs if rnd % 2 == 0 else reversed(configs):
            wall, init = await boot_once(cfg)
            tag = "warm-up" if rnd == 0 else f"round {rnd}/{args.rounds}"
            print(f"[{tag}] {cfg}: QEMU start->exit {wall:.2f}s (init after {init:.2f}s)")
            if rnd:
                walls[cfg].append(wall)
                inits[cfg].append(init)
    med = {c: statistics.median(v) for c, v in walls.items()}
    med_init = {c: statistics.median(v) for c, v in inits.items()}
    return {
        "baseline": args.baseline,
        "config": args.config,
        "rounds": args.rounds,
        "wall_seconds": walls,
        "init_seconds": inits,
        "median_wall": med,
        "median_init": med_init,
        "ratio_wall": med[args.config] / med[args.baseline],
        "ratio_init": med_init[args.config] / med_init[args.baseline],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--config", default="edu", help="configuration with the device")
    p.add_argument("--baseline", default="none", help="configuration without it")
    args = p.parse_args()
    out = trio.run(main_async, args)
    lines = [
        f"guest boot to poweroff, medians of {args.rounds} alternating rounds (TCG, 1 vCPU)",
        f"  {args.baseline:>10}: {out['median_wall'][args.baseline]:.2f} s"  # type: ignore[index]
        f"  (init after {out['median_init'][args.baseline]:.2f} s)",  # type: ignore[index]
        f"  {args.config:>10}: {out['median_wall'][args.config]:.2f} s"  # type: ignore[index]
        f"  (init after {out['median_init'][args.config]:.2f} s)",  # type: ignore[index]
        f"  ratio {args.config}/{args.baseline}: {out['ratio_wall']:.3f} (start->exit), "
        f"{out['ratio_init']:.3f} (start->init)",
    ]
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"boot-{stamp}.json").write_text(json.dumps(out, indent=2))
    (RESULTS / f"boot-{stamp}.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Encode and decode cost of representative vfio-user bodies, old tree against new, in one run.

Every command but the hot MMIO ones goes through ``protocol``'s full decode path
(`decode_body`), so a slower codec is paid on every DMA_MAP, SET_IRQS and REGION_INFO. This
times ``body.encode()`` and ``decode_body(...)`` of a few representative bodies in a worker
process per tree, alternating the trees round by round (the machine is shared: each case
keeps its best round), and prints per-case ratios new/old::

    git worktree add --detach /tmp/proto-old <commit before the change>
    .venv/bin/python benchmarks/protocol_codec.py --baseline /tmp/proto-old

Without ``--baseline`` only the working tree is timed. JSON and the printed summary go to
``benchmarks/results/protocol_codec-<time>.{json,txt}``. Only the public ``protocol`` API is
used, so any two trees with that API can be compared.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
import timeit
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"

Timings = dict[str, dict[str, float]]  # case -> {"encode": ns, "decode": ns}


def _cases() -> dict[str, tuple[Any, tuple[Any, ...]]]:
    """(body, fds it travels with) per case; built inside the worker, from its own tree."""
    import protocol as p

    fd = object()  # descriptors are opaque to the codec: any object will do
    caps = p.Capabilities(max_msg_fds=16, max_data_xfer_size=1 << 20, write_multiple=True,
                          migration=p.MigrationCaps())
    info = p.RegionInfo(
        0, 0xF, 0x1_0000, 0x40_0000,
        (p.SparseMmapCap(((0, 0x1000), (0x3000, 0x2000))), p.TypeCap(0x8086_0000, 3)), fd=fd,
    ).fit(4096)
    irq_fds = (object(), object(), object())
    return {
        "DMA_MAP (fd)": (p.DmaMap(3, 0, 0x1_0000_0000, 0x20_0000, fd=fd), (fd,)),
        "DMA_UNMAP": (p.DmaUnmap(0, 0x1_0000_0000, 0x20_0000), ()),
        "DMA_UNMAP reply": (p.DmaUnmapReply(0, 0x1_0000_0000, 0x20_0000), ()),
        "DEVICE_GET_INFO": (p.DeviceGetInfo(), ()),
        "GET_REGION_INFO": (p.DeviceGetRegionInfo(2, argsz=0x100), ()),
        "REGION_INFO reply (caps, fd)": (info, (fd,)),
        "GET_IRQ_INFO reply": (p.IrqInfo(4, 0xB, 2048), ()),
        "SET_IRQS (3 eventfds)": (
            p.DeviceSetIrqs(0x24, 4, 0, 3, fd_list=irq_fds), irq_fds),
        "VERSION": (p.Version(0, 0, caps), ()),
        "REGION_WRITE (4 B)": (p.RegionWrite(0x10, 0, b"\x01\x02\x03\x04"), ()),
        "REGION_WRITE reply": (p.RegionWriteReply(0x10, 0, 4), ()),
        "DMA_READ reply (64 B)": (p.DmaReadReply(0x1000, bytes(64)), ()),
        "DEVICE_FEATURE": (p.DeviceFeature(2 | 1 << 16), ()),
    }


def worker(tree: Path, number: int, repeat: int) -> Timings:
    """Best-of-`repeat` ns per call, importing `protocol` from `tree`."""
    sys.path.insert(0, str(tree))
    import protocol as p

    assert Path(p.__file__).resolve().is_relative_to(tree.resolve()), p.__file__
    out: Timings = {}
    for name, (body, fds) in _cases().items():
        wire = body.encode()
        view = memoryview(wire)
        cmd, is_reply = body.COMMAND, body.IS_REPLY
        decode_body = p.decode_body
        assert decode_body(cmd, is_reply, view, fds) is not None
        enc = min(timeit.repeat(body.encode, number=number, repeat=repeat))
        dec = min(timeit.repeat(lambda: decode_body(cmd, is_reply, view, fds),  # noqa: B023
                                number=number, repeat=repeat))
        out[name] = {"encode": enc / number * 1e9, "decode": dec / number * 1e9}
    return out


def _run_worker(tree: Path, number: int, repeat: int) -> Timings:
    argv = [sys.executable, __file__, "--worker", str(tree), "--number", str(number),
            "--repeat", str(repeat)]
    done = subprocess.run(argv, check=True, capture_output=True, text=True, cwd="/")
    result: Timings = json.loads(done.stdout)
    return result


def _best(rounds: list[Timings]) -> Timings:
    return {case: {op: min(r[case][op] for r in rounds) for op in rounds[0][case]}
            for case in rounds[0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", type=Path, help="a tree (worktree) with the old protocol/")
    ap.add_argument("--tree", type=Path, default=REPO, help="the tree to measure (this one)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds per tree")
    ap.add_argument("--number", type=int, default=20_000, help="calls per timing")
    ap.add_argument("--repeat", type=int, default=3, help="timings per round (best kept)")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.number, args.repeat)))
        return 0

    trees = {"new": args.tree} | ({"old": args.baseline} if args.baseline else {})
    rounds: dict[str, list[Timings]] = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            rounds[name].append(_run_worker(tree, args.number, args.repeat))
    best = {name: _best(r) for name, r in rounds.items()}

    lines = [f"protocol codec, ns per call (best of {args.rounds} rounds x {args.repeat}, "
             f"{args.number} calls each); ratio = new / old"]
    if "old" in best:
        lines.append(f"{'case':30} {'enc old':>8} {'enc new':>8} {'ratio':>6}   "
                     f"{'dec old':>8} {'dec new':>8} {'ratio':>6}")
        ratios: dict[str, list[float]] = {"encode": [], "decode": []}
        for case, new in best["new"].items():
            old = best["old"][case]
            r = {op: new[op] / old[op] for op in ("encode", "decode")}
            for op in r:
                ratios[op].append(r[op])
            lines.append(f"{case:30} {old['encode']:8.0f} {new['encode']:8.0f} "
                         f"{r['encode']:6.2f}   {old['decode']:8.0f} {new['decode']:8.0f} "
                         f"{r['decode']:6.2f}")
        enc, dec = (statistics.geometric_mean(ratios[op]) for op in ("encode", "decode"))
        lines.append(f"{'geometric mean':30} {'':8} {'':8} {enc:6.2f}   {'':8} {'':8} {dec:6.2f}")
    else:
        lines.append(f"{'case':30} {'encode':>8} {'decode':>8}")
        for case, new in best["new"].items():
            lines.append(f"{case:30} {new['encode']:8.0f} {new['decode']:8.0f}")
    summary = "\n".join(lines)
    print(summary)

    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    meta = {"python": platform.python_version(), "machine": platform.machine(),
            "trees": {k: str(v) for k, v in trees.items()}, "rounds": args.rounds,
            "number": args.number, "repeat": args.repeat}
    (RESULTS / f"protocol_codec-{stamp}.json").write_text(
        json.dumps({"meta": meta, "best": best, "rounds": rounds}, indent=1) + "\n")
    (RESULTS / f"protocol_codec-{stamp}.txt").write_text(summary + "\n")
    print(f"results: benchmarks/results/protocol_codec-{stamp}.{{json,txt}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

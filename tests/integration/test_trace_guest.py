"""Record a real QEMU guest's session with `serve --trace`, then replay it without QEMU.

edu (the guest's edu program) and nvme (a dd through the Linux driver) are recorded once
each; the replay against the same model finds no difference and a planted bug in edu's
liveness register is found at the reply that carries it. The nvme run also measures what
tracing costs the guest (its BENCH lines, traced and not; printed, not asserted).
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

import devices
from devices.edu import Edu, Reg
from vfiouser_srv.qemu import ConfigFile, RunResult, run_guest, serve_device
from vfiouser_srv.qemu.launcher import new_run_dir
from vfiouser_srv.replay import replay
from vfiouser_srv.trace import IN, OUT, read_trace

pytestmark = [pytest.mark.qemu, pytest.mark.usefixtures("qemu_ready")]

EDU_STEPS = "ident,regs,fact,dma,irq"


class BuggyEdu(Edu):
    """edu with a planted bug: the liveness register reads back one bit off."""

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        data = super().region_read(index, offset, count)
        if index == 0 and offset == Reg.LIVENESS:
            return bytes([data[0] ^ 1]) + data[1:]
        return data


def describe(res: RunResult) -> str:
    tail = "\n".join(res.console[-25:])
    return f"{res.summary()}\n--- console tail ---\n{tail}"


async def traced_run(
    model: str,
    config: str,
    configs: ConfigFile,
    env: dict[str, str],
    *,
    sets: tuple[str, ...] = (),
    trace: bool = True,
) -> tuple[RunResult, Path]:
    run_dir = await new_run_dir(f"trace-{model}")
    sock = run_dir / "vfu.sock"
    path = run_dir / f"{model}.trace"
    extra = ["--trace", str(path)] if trace else []
    async with serve_device(model, sock, run_dir=run_dir, sets=sets, extra_args=extra) as server:
        res = await run_guest(
            config, configs=configs, socket_path=sock, run_dir=run_dir, guest_env=env, timeout=180
        )
        await server.stop()  # the trace is flushed and closed when the server exits
    assert res.ok, describe(res)
    return res, path


def first_liveness_reply(path: Path) -> int:
    t = read_trace(str(path))
    asked: set[int] = set()
    for r in t.records:
        head = r.header()
        if head is None:
            continue
        if r.kind == IN and head[1] == 9 and r.data[16:28] == struct.pack("<QI", Reg.LIVENESS, 0):
            asked.add(head[0])
        elif r.kind == OUT and head[0] in asked:
            return r.index
    raise AssertionError("the guest never read the liveness register")


async def test_edu_guest_session_replays_and_a_planted_bug_is_found(
    qemu_configs: ConfigFile,
) -> None:
    res, path = await traced_run("edu", "edu", qemu_configs, {"edu_steps": EDU_STEPS})
    assert res.result_dict.get("failed") == "0", describe(res)
    trace = read_trace(str(path))
    assert sum(r.kind == IN for r in trace.records) > 50
    same = await replay(trace, Edu())
    assert same.divergence is None, same.divergence.report()
    assert same.messages_compared == sum(r.kind == OUT for r in trace.records)
    buggy = await replay(trace, BuggyEdu())
    assert buggy.divergence is not None
    assert buggy.divergence.record.index == first_liveness_reply(path), buggy.divergence.report()


def bench(res: RunResult) -> dict[str, float]:
    """MiB/s per BENCH measurement (sequential) of a guest run, summed over rounds."""
    total: dict[str, list[float]] = {}
    for line in res.console:
        m = re.search(r"BENCH round=\d+ (\w+) bytes=(\d+) ns=(\d+)", line)
        if m:
            total.setdefault(m[1], []).append(int(m[2]) / int(m[3]) * 1e9 / (1 << 20))
    return {k: sum(v) / len(v) for k, v in total.items()}


async def test_nvme_guest_session_replays(qemu_configs: ConfigFile, tmp_path: Path) -> None:
    env = {"nvme_steps": "ident,pattern,bench", "seed": "1", "bench": "1", "bench_mib": "16"}
    sets = (f"backing={tmp_path / 'disk.img'}", "size=64M")
    res, path = await traced_run("nvme", "nvme", qemu_configs, env, sets=sets)
    plain, _ = await traced_run(
        "nvme",
        "nvme",
        qemu_configs,
        env,
        sets=(f"backing={tmp_path / 'b.img'}", "size=64M"),
        trace=False,
    )
    trace = read_trace(str(path))
    n = sum(r.kind in (IN, OUT) for r in trace.records)
    print(
        f"\nnvme trace: {n} messages, {path.stat().st_size} bytes, "
        f"{path.stat().st_size / max(n, 1):.1f} bytes/message; "
        f"guest MiB/s traced {bench(res)} untraced {bench(plain)}"
    )
    model = devices.create("nvme", {"backing": str(tmp_path / "replay.img"), "size": "64M"})
    result = await replay(trace, model)
    assert result.divergence is None, result.divergence.report()
    assert result.messages_compared >= sum(r.kind == OUT for r in trace.records)

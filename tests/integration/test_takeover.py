"""Live upgrade under a running guest (docs/live-upgrade.md): while a real Linux guest loops
over its device, the host upgrades the server with ``serve --take-over`` three times; QEMU's
vfio-user client cannot reconnect, so the guest only keeps its device if nothing is lost.

* nvme and virtio-blk: the guest writes a distinct 64 KiB block with O_DIRECT, reads it back
  and compares, over and over; every block must verify, the kernel must log no I/O error,
  timeout or reset, and the device's interrupt count must keep growing (completions arrive
  by interrupt: a lost one would stall the loop into a timeout).
* edu: the guest program's factorial and interrupt steps (raise, factorial completion, DMA
  completion), repeated; every step must pass.
* a new process killed with SIGKILL in the middle of a take-over (it has the snapshot and
  every descriptor, and has not committed): the old one keeps serving, the guest never
  notices.

One boot per case. Skip/fail policy: as for every ``qemu`` test (see conftest).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from vfiouser_srv.qemu import ConfigFile, run_guest
from vfiouser_srv.qemu.launcher import new_run_dir, results_of, server_argv

pytestmark = [pytest.mark.qemu, pytest.mark.usefixtures("qemu_ready")]

UPGRADES = 3
#: rounds of edu's factorial/DMA/interrupt steps the guest runs
ROUNDS = 25
TIMEOUT = 240.0
READY_TIMEOUT = 30.0
LOOP_SECONDS = 30
#: seconds between two upgrades (a new server process needs about a second to start)
INTERVAL = 3.0

BLOCK_SCRIPT = f"""#!/bin/sh
# test_takeover.py's guest: write, read back and compare 64 KiB blocks until time is up.
res() {{ echo "RESULT $1=$2"; }}
DISK=/dev/$vfu_disk
i=0
while [ ! -b $DISK ] && [ $i -lt 200 ]; do usleep 100000; i=$((i + 1)); done
[ -b $DISK ] || {{ res disk "FAIL no $DISK"; exit 1; }}
irqs() {{ grep -E "$vfu_irq" /proc/interrupts | awk '{{ s += $2 }} END {{ print s + 0 }}'; }}
res irqs_before "$(irqs)"
echo "STAGE loop"
end=$(($(cut -d. -f1 /proc/uptime) + {LOOP_SECONDS}))
n=0
bad=0
while [ "$(cut -d. -f1 /proc/uptime)" -lt $end ]; do
    yes "takeover block $n" | head -c 65536 > /tmp/w
    dd if=/tmp/w of=$DISK bs=65536 seek=$((n % 256)) count=1 oflag=direct 2>/dev/null ||
        {{ bad=$((bad + 1)); echo "INFO write $n failed"; }}
    dd if=$DISK of=/tmp/r bs=65536 skip=$((n % 256)) count=1 iflag=direct 2>/dev/null ||
        {{ bad=$((bad + 1)); echo "INFO read $n failed"; }}
    cmp -s /tmp/w /tmp/r || {{ bad=$((bad + 1)); echo "INFO block $n differs"; }}
    n=$((n + 1))
done
res blocks "$n"
res bad "$bad"
res irqs_after "$(irqs)"
res kernel_errors "$(dmesg | grep -ciE 'i/o error|timeout|resetting|abort')"
dmesg | grep -iE 'i/o error|timeout|resetting|abort' | head -5 | sed 's/^/INFO dmesg: /'
"""

#: a new process that asks for the take-over, receives the snapshot and every descriptor,
#: then is killed by SIGKILL before it commits
DIES_MID_WAY = '''
import os, signal, socket, sys, trio
from vfiouser_srv.control import LineChannel
from vfiouser_srv.transport import SCM_MAX_FD, FdStream
async def main():
    s = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await s.connect(sys.argv[1])
    ch = LineChannel(FdStream(socket.socket(fileno=s.detach()), max_fds=SCM_MAX_FD), 1 << 30)
    await ch.receive()
    await ch.send({"execute": "take-over", "id": 1})
    while (await ch.receive()).get("event") != "TAKE_OVER_STATE":
        pass
    print("READY got", len(ch.fds), "fds", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
trio.run(main)
'''


@dataclass
class Run:
    console: list[str] = field(default_factory=list)
    upgrades: list[float] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def results(self) -> dict[str, str]:
        return results_of(self.console)

    def describe(self) -> str:
        tail = "\n".join(self.console[-40:])
        return f"upgrades {self.upgrades}, statuses {self.statuses}, {self.notes}\n{tail}"


@asynccontextmanager
async def short_dir() -> AsyncIterator[Path]:
    path = Path(await trio.to_thread.run_sync(tempfile.mkdtemp, "", "vfu-up-"))
    try:
        yield path
    finally:
        await trio.to_thread.run_sync(shutil.rmtree, path, True)


class Server:
    """One `serve` process; its output goes to a log in the run directory."""

    def __init__(self, proc: trio.Process, log: Path) -> None:
        self.proc = proc
        self.log = log

    @classmethod
    async def start(cls, argv: list[str], log: Path) -> Server:
        out = await trio.to_thread.run_sync(lambda: log.open("wb"))
        try:
            proc = await trio.lowlevel.open_process(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=out
            )
        finally:
            out.close()
        return cls(proc, log)

    async def ready(self) -> bool:
        """Read stdout until READY (True) or EOF (False)."""
        assert self.proc.stdout is not None
        buf = b""
        with trio.fail_after(READY_TIMEOUT):
            while b"READY " not in buf:
                chunk = await self.proc.stdout.receive_some()
                if not chunk:
                    return False
                buf += chunk
        return True

    async def stop(self) -> None:
        with trio.CancelScope(shield=True):
            if self.proc.returncode is None:
                self.proc.terminate()
                with trio.move_on_after(5):
                    await self.proc.wait()
            if self.proc.returncode is None:
                self.proc.kill()
            await self.proc.wait()


async def upgrade_during_guest(
    config: str,
    configs: ConfigFile,
    sets: list[str],
    *,
    trigger: str,
    guest_env: dict[str, str],
    test: bytes | None = None,
    kill_new: bool = False,
) -> Run:
    """Boot `config`; from the first console line starting with `trigger` on, upgrade
    the server `UPGRADES` times, `INTERVAL` seconds apart (or, with `kill_new`, start a new
    one and SIGKILL it during its take-over)."""
    run = Run()
    run_dir = await new_run_dir(f"takeover-{config}")
    async with short_dir() as d:
        sock, ctl = d / "vfu.sock", d / "ctl.sock"
        argv = [*server_argv(config_server(configs, config), sock, sets), "--control", str(ctl)]
        servers = [await Server.start(argv, run_dir / "server0.log")]
        try:
            assert await servers[0].ready(), (run_dir / "server0.log").read_text()
            triggered = trio.Event()

            def on_line(line: str) -> None:
                run.console.append(line)
                if line.startswith(trigger):
                    triggered.set()

            async def upgrader() -> None:
                await triggered.wait()
                for k in range(1, UPGRADES + 1):
                    if k > 1:
                        await trio.sleep(INTERVAL)
                    t0 = trio.current_time()
                    if kill_new:
                        new = await Server.start([sys.executable, "-c", DIES_MID_WAY, str(ctl)],
                                                 run_dir / f"server{k}.log")
                        servers.append(new)
                        run.statuses.append(await new.proc.wait())
                        run.notes.append(f"old alive: {servers[0].proc.returncode is None}")
                        continue
                    new = await Server.start([*argv, "--take-over"],
                                             run_dir / f"server{k}.log")
                    servers.append(new)
                    ok = await new.ready()
                    old = servers[-2]
                    with trio.fail_after(10):
                        run.statuses.append(await old.proc.wait())
                    run.upgrades.append(trio.current_time() - t0)
                    if not ok:
                        run.notes.append(f"server{k} did not become ready")
                        return

            async with trio.open_nursery() as nursery:
                nursery.start_soon(upgrader)
                await run_guest(config, configs=configs, run_dir=run_dir, socket_path=sock,
                                test=test, guest_env=guest_env, on_line=on_line,
                                timeout=TIMEOUT)
                nursery.cancel_scope.cancel()
        finally:
            for s in servers:
                await s.stop()
    return run


def config_server(configs: ConfigFile, config: str) -> str:
    server = configs.get(config).server
    assert server is not None
    return server


@pytest.mark.parametrize(("config", "disk", "option", "irq"), [
    ("nvme", "nvme0n1", "backing", "nvme"),
    ("virtio-blk", "vda", "backing", "virtio"),
])
async def test_block_loop_survives_three_upgrades(qemu_configs: ConfigFile, tmp_path: Path,
                                                  config: str, disk: str, option: str,
                                                  irq: str) -> None:
    img = tmp_path / "disk.img"
    run = await upgrade_during_guest(
        config, qemu_configs, [f"{option}={img}", f"size={32 << 20}"], trigger="STAGE loop",
        test=BLOCK_SCRIPT.encode(), guest_env={"disk": disk, "irq": irq})
    why = run.describe()
    print(f"{run.results()} upgrades {run.upgrades} statuses {run.statuses}")
    got = run.results()
    assert run.statuses == [0] * UPGRADES, why
    assert int(got.get("blocks", 0)) > 20, why
    assert got.get("bad") == "0" and got.get("kernel_errors") == "0", why
    assert int(got["irqs_after"]) > int(got["irqs_before"]), why


async def test_edu_loop_survives_three_upgrades(qemu_configs: ConfigFile) -> None:
    steps = ",".join(["ident"] + ["fact,irq"] * ROUNDS)
    run = await upgrade_during_guest("edu", qemu_configs, [], trigger="INFO step irq",
                                     guest_env={"edu_steps": steps})
    why = run.describe()
    print(f"{run.results()} upgrades {run.upgrades} statuses {run.statuses}")
    assert run.statuses == [0] * UPGRADES, why
    got = run.results()
    assert got.get("failed") == "0", why
    fails = [line for line in run.console if "FAIL" in line]
    assert not fails, why
    assert sum(line.startswith("RESULT irq_dma=") for line in run.console) == ROUNDS, why


async def test_new_server_killed_mid_handover_guest_keeps_device(
        qemu_configs: ConfigFile) -> None:
    steps = ",".join(["ident"] + ["fact,irq"] * ROUNDS)
    run = await upgrade_during_guest("edu", qemu_configs, [], trigger="INFO step irq",
                                     guest_env={"edu_steps": steps}, kill_new=True)
    why = run.describe()
    print(f"{run.results()} upgrades {run.upgrades} statuses {run.statuses}")
    assert run.statuses == [-signal.SIGKILL] * UPGRADES, why
    assert all(n == "old alive: True" for n in run.notes), why
    assert run.results().get("failed") == "0", why
    assert not [line for line in run.console if "FAIL" in line], why


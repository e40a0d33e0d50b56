"""CPU time of the processes behind a guest benchmark, sampled at the guest's phase lines.

Shared by `nvme_guest.py` and `virtio_guest.py`: the guest prints `PHASE name start|end`,
and `CpuSampler.on_line` (a console callback) reads the schedstat CPU time of our children
(`server`: `vfiouser_srv serve`, `qemu`) and the server's minor faults at each edge, so a
benchmark can divide a phase's CPU by the I/Os the guest did in it. Stdlib only.
"""

from __future__ import annotations

import os
import re
import time

_PHASE = re.compile(r"^PHASE (\S+) (start|end)$")


def process_cpu_ns(pid: int) -> int:
    """CPU time of every live thread of `pid` in ns (schedstat: exact, unlike clock ticks;
    trio keeps its worker threads alive between uses, so their time is counted)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # the thread ended between listdir and open
    return total


def minor_faults(pid: int) -> int:
    """Minor page faults of `pid` so far (/proc/PID/stat field 10): first touches of guest
    memory through our mapping of it cost one each."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[7])
    except (OSError, ValueError, IndexError):
        return 0


def children() -> dict[str, int]:
    """Our child processes by role: ``server`` (vfiouser_srv serve) and ``qemu``."""
    found: dict[str, int] = {}
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != me:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if b"vfiouser_srv" in argv and b"serve" in argv:
            found["server"] = int(entry)
        elif any(b"qemu-system" in a for a in argv):  # also behind the provisioned loader
            found["qemu"] = int(entry)
    return found


class CpuSampler:
    """Samples the children's CPU time at each ``PHASE`` console line (module docstring)."""

    def __init__(self) -> None:
        self.pids: dict[str, int] = {}
        self._open: dict[str, dict[str, int]] = {}
        #: per phase name, one {role: cpu ns, "server_minflt": n, "wall": ns} per start/end
        #: pair, in order
        self.spans: dict[str, list[dict[str, int]]] = {}

    def sample(self) -> dict[str, int]:
        if "qemu" not in self.pids:
            self.pids = children()
        out = {role: process_cpu_ns(pid) for role, pid in self.pids.items()}
        if "server" in self.pids:
            out["server_minflt"] = minor_faults(self.pids["server"])
        out["wall"] = time.monotonic_ns()
        return out

    def on_line(self, line: str) -> None:
        m = _PHASE.match(line.strip())
        if not m:
            return
        name, edge = m.group(1), m.group(2)
        now = self.sample()
        if edge == "start":
            self._open[name] = now
        elif name in self._open:
            start = self._open.pop(name)
            self.spans.setdefault(name, []).append(
                {k: now[k] - start[k] for k in now if k in start})

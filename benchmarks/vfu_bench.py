#!/usr/bin/env python3
"""Benchmark client for any vfio-user server socket (Python stdlib only).

Measures, over blocking AF_UNIX sockets:

* ``connect``    -- connect + VERSION negotiation round trip (fresh socket each time)
* ``serial``     -- serial REGION_READ round trips (median, p99, msgs/s)
* ``pipelined``  -- REGION_READ throughput with N requests kept in flight
* ``dma``        -- DMA_MAP / DMA_UNMAP round trips without an fd
* ``dma_fd``     -- DMA_MAP / DMA_UNMAP round trips passing a memfd (SCM_RIGHTS)

and, when the server's pid is known (SO_PEERCRED), the server's CPU time per message from
``/proc/PID/task/*/schedstat``.  Usable as a library (``run_benchmarks``) or as a CLI::

    python benchmarks/vfu_bench.py --socket /tmp/gpio.sock --region 2 --offset 0
"""

from __future__ import annotations

import argparse
import array
import fcntl
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import wire

ALL_TESTS = ("connect", "serial", "pipelined", "dma", "dma_fd")

Result = dict[str, Any]


class ServerError(Exception):
    """The server answered with an error reply."""

    def __init__(self, command: int, errno_: int) -> None:
        super().__init__(f"command {command}: error reply, errno {errno_} ({os.strerror(errno_)})")
        self.command = command
        self.errno = errno_


class ProtocolError(Exception):
    """The server sent something we did not expect."""


@dataclass
class BenchConfig:
    socket_path: str
    region: int = 0
    offset: int = 0
    count: int = 4
    tests: Sequence[str] = ALL_TESTS
    connect_iters: int = 200
    connect_gap_ms: float = 0.0
    serial_warmup: int = 1000
    serial_iters: int = 20000
    pipeline_depth: int = 128
    pipeline_msgs: int = 100000
    dma_iters: int = 2000
    dma_size: int = 1 << 20
    dma_address: int = 0x10_0000_0000
    timeout_s: float = 10.0
    server_pid: int | None = None  # overrides SO_PEERCRED if set
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- connection


def _set_timeouts(sock: socket.socket, timeout_s: float) -> None:
    """Kernel-side timeouts (SO_RCVTIMEO/SO_SNDTIMEO): no extra poll() per recv, unlike
    ``sock.settimeout`` which would add a syscall to every round trip we measure."""
    sec = int(timeout_s)
    tv = struct.pack("ll", sec, int((timeout_s - sec) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def peer_pid(sock: socket.socket) -> int | None:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid: int = struct.unpack("3i", creds)[0]
    return pid if pid > 0 else None


# One receive buffer for every connection (the client is single-threaded). sock.recv(1 << 20)
# would malloc (mmap) and free a megabyte per call, and a fresh buffer per connection would
# page-fault on first use; both cost more than the round trips being measured.
_RVIEW = memoryview(bytearray(256 << 10))


class Conn:
    """A blocking vfio-user client connection with a receive buffer."""

    def __init__(self, path: str, timeout_s: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            _set_timeouts(self.sock, timeout_s)
            self.sock.connect(path)
        except BaseException:
            self.sock.close()
            raise
        self.buf = bytearray()
        self.rview = _RVIEW
        self.next_id = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def msg_id(self) -> int:
        i = self.next_id
        self.next_id = (i + 1) & 0xFFFF
        return i

    def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        if not fds:
            self.sock.sendall(data)
            return
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sent = self.sock.sendmsg([data], anc)
        if sent < len(data):
            self.sock.sendall(data[sent:])

    def fill(self) -> None:
        try:
            n = self.sock.recv_into(self.rview)
        except BlockingIOError as e:  # SO_RCVTIMEO expired
            raise TimeoutError("timed out waiting for the server") from e
        if not n:
            raise ConnectionError("server closed the connection")
        self.buf += self.rview[:n]

    def recv_msg(self) -> tuple[wire.Header, bytes]:
        buf = self.buf
        while len(buf) < wire.HEADER_SIZE:
            self.fill()
        hdr = wire.unpack_header(buf)
        if hdr.size < wire.HEADER_SIZE:
            raise ProtocolError(f"bad message size {hdr.size}")
        while len(buf) < hdr.size:
            self.fill()
        payload = bytes(buf[wire.HEADER_SIZE : hdr.size])
        del buf[: hdr.size]
        return hdr, payload

    def request(self, data: bytes, fds: Sequence[int] = ()) -> tuple[wire.Header, bytes]:
        """Send one command and wait for its reply; raises ServerError on an error reply."""
        want_id, want_cmd = wire.unpack_header(data)[:2]
        self.send(data, fds)
        hdr, payload = self.recv_msg()
        if not hdr.is_reply:
            raise ProtocolError(f"expected a reply, got {hdr}")
        if hdr.msg_id != want_id or hdr.command != want_cmd:
            raise ProtocolError(
                f"reply id/cmd {hdr.msg_id}/{hdr.command}, expected {want_id}/{want_cmd}"
            )
        if hdr.is_error:
            raise ServerError(hdr.command, hdr.error)
        return hdr, payload

    def negotiate(self) -> tuple[int, int, dict[str, Any]]:
        _, payload = self.request(wire.pack_version(self.msg_id()))
        return wire.unpack_version(payload)


# --------------------------------------------------------------------------- server CPU


def read_cpu(pid: int | None) -> tuple[int, int] | None:
    """Summed (cpu_ns, times_scheduled) over all threads of ``pid``, or None."""
    if pid is None:
        return None
    total_ns = 0
    runs = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                fields = f.read().split()
        except OSError:
            continue  # thread exited
        total_ns += int(fields[0])
        runs += int(fields[2])
    return total_ns, runs


def cpu_delta(before: tuple[int, int] | None, pid: int | None, n: int) -> Result:
    after = read_cpu(pid)
    if before is None or after is None or n <= 0:
        return {}
    return {
        "server_cpu_us_per_msg": (after[0] - before[0]) / n / 1000.0,
        "server_runs_per_msg": (after[1] - before[1]) / n,
    }


# --------------------------------------------------------------------------- benchmarks


def _percentile(sorted_ns: Sequence[int], p: float) -> float:
    if not sorted_ns:
        return float("nan")
    k = min(len(sorted_ns) - 1, max(0, round(p / 100.0 * (len(sorted_ns) - 1))))
    return sorted_ns[k] / 1000.0


def _latency_stats(samples_ns: list[int], prefix: str = "") -> Result:
    s = sorted(samples_ns)
    return {
        f"{prefix}median_us": statistics.median(s) / 1000.0,
        f"{prefix}p99_us": _percentile(s, 99),
        f"{prefix}min_us": s[0] / 1000.0,
        f"{prefix}mean_us": statistics.fmean(s) / 1000.0,
    }


def bench_connect(cfg: BenchConfig, pid: int | None) -> Result:
    """Fresh socket, connect, VERSION, parse the reply; close untimed. Back to back by
    default, so each sample also contains whatever the server still does for the previous
    disconnect (an optional gap leaves the CPU idle, which made the numbers noisier here)."""
    samples: list[int] = []
    reply: tuple[int, int, dict[str, Any]] | None = None
    gap = cfg.connect_gap_ms / 1000.0
    req = wire.pack_version(0)
    cpu0: tuple[int, int] | None = None
    for i in range(cfg.connect_iters + 1):  # the first connection is a warm-up
        t0 = time.perf_counter_ns()
        conn = Conn(cfg.socket_path, cfg.timeout_s)
        try:
            _, payload = conn.request(req)
            reply = wire.unpack_version(payload)
            t1 = time.perf_counter_ns()
            if i == 0:
                pid = pid if pid is not None else peer_pid(conn.sock)
        finally:
            conn.close()
        if i == 0:
            cpu0 = read_cpu(pid)
            continue
        samples.append(t1 - t0)
        if gap > 0:
            time.sleep(gap)
    res = _latency_stats(samples)
    res["iters"] = len(samples)
    res["peer_pid"] = pid
    res.update(cpu_delta(cpu0, pid, len(samples)))
    if reply is not None:
        res["server_version"] = f"{reply[0]}.{reply[1]}"
        res["server_caps"] = reply[2]
    return res


def bench_serial(conn: Conn, cfg: BenchConfig, pid: int | None) -> Result:
    reqs = [wire.pack_region_read(i, cfg.region, cfg.offset, cfg.count) for i in range(256)]
    want_size = wire.HEADER_SIZE + wire.REGION_ACCESS.size + cfg.count
    send = conn.sock.sendall
    recv_msg = conn.recv_msg

    def one(i: int) -> None:
        send(reqs[i & 0xFF])
        hdr, _ = recv_msg()
        if hdr.flags & wire.F_ERROR:
            raise ServerError(hdr.command, hdr.error)
        if hdr.size != want_size or hdr.msg_id != (i & 0xFF):
            raise ProtocolError(f"unexpected REGION_READ reply {hdr}")

    for i in range(cfg.serial_warmup):
        one(i)
    samples = [0] * cfg.serial_iters
    clock = time.perf_counter_ns
    cpu0 = read_cpu(pid)
    start = clock()
    for i in range(cfg.serial_iters):
        t0 = clock()
        one(i)
        samples[i] = clock() - t0
    elapsed = clock() - start
    res = _latency_stats(samples)
    res["iters"] = cfg.serial_iters
    res["msgs_per_s"] = cfg.serial_iters / (elapsed / 1e9)
    res.update(cpu_delta(cpu0, pid, cfg.serial_iters))
    return res


def bench_pipelined(conn: Conn, cfg: BenchConfig, pid: int | None) -> Result:
    """Keep ``depth`` REGION_READs outstanding: read whatever replies have arrived, then
    send as many new requests (in one write) as replies were consumed."""
    depth = max(1, cfg.pipeline_depth)
    total = cfg.pipeline_msgs
    reqs = [wire.pack_region_read(i, cfg.region, cfg.offset, cfg.count) for i in range(1 << 16)]
    sock = conn.sock
    rview = conn.rview
    unpack = wire.HEADER.unpack_from
    hsz = wire.HEADER_SIZE
    f_err = wire.F_ERROR
    buf = bytearray()
    sent = min(depth, total)
    received = 0
    out_of_order = 0
    recv_calls = 0
    cpu0 = read_cpu(pid)
    start = time.perf_counter_ns()
    sock.sendall(b"".join(reqs[:sent]))
    while received < total:
        nread = sock.recv_into(rview)
        recv_calls += 1
        if not nread:
            raise ConnectionError("server closed the connection")
        buf += rview[:nread]
        pos = 0
        n = len(buf)
        got = 0
        while n - pos >= hsz:
            msg_id, cmd, size, flags, err = unpack(buf, pos)
            if n - pos < size:
                break
            if flags & f_err:
                raise ServerError(cmd, err)
            if msg_id != ((received + got) & 0xFFFF):
                out_of_order += 1
            pos += size
            got += 1
        if pos:
            del buf[:pos]
        received += got
        k = min(got, total - sent)
        if k:
            lo = sent & 0xFFFF
            hi = lo + k
            if hi <= len(reqs):
                sock.sendall(b"".join(reqs[lo:hi]))
            else:
                sock.sendall(b"".join(reqs[lo:] + reqs[: hi - len(reqs)]))
            sent += k
    elapsed = time.perf_counter_ns() - start
    res: Result = {
        "depth": depth,
        "msgs": total,
        "msgs_per_s": total / (elapsed / 1e9),
        "replies_per_recv": total / max(1, recv_calls),
        "out_of_order": out_of_order,
    }
    res.update(cpu_delta(cpu0, pid, total))
    return res


def bench_dma(conn: Conn, cfg: BenchConfig, pid: int | None, with_fd: bool) -> Result:
    page = os.sysconf("SC_PAGE_SIZE")
    size = max(page, (cfg.dma_size + page - 1) // page * page)
    addr = cfg.dma_address // page * page
    fd = -1
    if with_fd:
        # sealed like QEMU's memory-backend-memfd: the Python server mmaps only a file that
        # cannot shrink (docs/security.md), so this measures the path QEMU takes
        fd = os.memfd_create("vfu-bench-dma", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    fds = (fd,) if with_fd else ()
    map_ns: list[int] = []
    unmap_ns: list[int] = []
    clock = time.perf_counter_ns
    try:
        warm = min(50, cfg.dma_iters)
        cpu0: tuple[int, int] | None = None
        for i in range(warm + cfg.dma_iters):
            if i == warm:
                cpu0 = read_cpu(pid)
            m = wire.pack_dma_map(conn.msg_id(), addr, size, offset=0)
            u = wire.pack_dma_unmap(conn.msg_id(), addr, size)
            t0 = clock()
            conn.request(m, fds)
            t1 = clock()
            conn.request(u)
            t2 = clock()
            if i >= warm:
                map_ns.append(t1 - t0)
                unmap_ns.append(t2 - t1)
    finally:
        if fd >= 0:
            os.close(fd)
    res: Result = {"iters": cfg.dma_iters, "size": size, "address": hex(addr)}
    res.update(_latency_stats(map_ns, "map_"))
    res.update(_latency_stats(unmap_ns, "unmap_"))
    cpu = cpu_delta(cpu0, pid, 2 * cfg.dma_iters)
    if cpu:
        res["server_cpu_us_per_msg"] = cpu["server_cpu_us_per_msg"]
    return res


_ERRORS = (ServerError, ProtocolError, OSError, ValueError)


class _Runner:
    """Holds the shared connection and the server pid across tests."""

    def __init__(self, cfg: BenchConfig, out: Result) -> None:
        self.cfg = cfg
        self.out = out
        self.pid = cfg.server_pid
        self.conn: Conn | None = None

    def get_conn(self) -> Conn:
        if self.conn is None:
            c = Conn(self.cfg.socket_path, self.cfg.timeout_s)
            try:
                if self.pid is None:
                    self.pid = peer_pid(c.sock)
                major, minor, caps = c.negotiate()
            except BaseException:
                c.close()
                raise
            self.out.setdefault("server_version", f"{major}.{minor}")
            self.out.setdefault("server_caps", caps)
            self.conn = c
        return self.conn

    def drop_conn(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def run(self, name: str) -> Result:
        cfg = self.cfg
        if name == "connect":
            res = bench_connect(cfg, self.pid)
            if self.pid is None and isinstance(res.get("peer_pid"), int):
                self.pid = res["peer_pid"]
            return res
        conn = self.get_conn()
        if name == "serial":
            return bench_serial(conn, cfg, self.pid)
        if name == "pipelined":
            return bench_pipelined(conn, cfg, self.pid)
        if name in ("dma", "dma_fd"):
            return bench_dma(conn, cfg, self.pid, name == "dma_fd")
        raise ValueError(f"unknown test {name!r}")


def run_benchmarks(cfg: BenchConfig) -> Result:
    """Run the selected tests against ``cfg.socket_path``; never raises for server faults:
    a failing test gets ``{"error": ...}`` and the next test uses a fresh connection."""
    out: Result = {"socket": cfg.socket_path, "region": cfg.region, "offset": cfg.offset,
                   "count": cfg.count, "tests": {}}
    runner = _Runner(cfg, out)
    try:
        for name in cfg.tests:
            try:
                out["tests"][name] = runner.run(name)
            except _ERRORS as e:
                out["tests"][name] = {"error": f"{type(e).__name__}: {e}"}
                runner.drop_conn()  # the stream may be out of sync; start over
    finally:
        runner.drop_conn()
    out["server_pid"] = runner.pid
    return out


# --------------------------------------------------------------------------- CLI


def format_result(res: Result) -> str:
    lines = [f"socket {res['socket']}  region {res['region']} offset {res['offset']:#x} "
             f"count {res['count']}  server pid {res.get('server_pid')}"]
    for name, r in res["tests"].items():
        if "error" in r:
            lines.append(f"  {name:<10} ERROR {r['error']}")
            continue
        parts = []
        for k, v in r.items():
            if isinstance(v, float):
                parts.append(f"{k}={v:,.2f}")
            elif isinstance(v, int) and not isinstance(v, bool):
                parts.append(f"{k}={v}")
        lines.append(f"  {name:<10} " + " ".join(parts))
    return "\n".join(lines)


def add_bench_args(p: argparse.ArgumentParser) -> None:
    d = BenchConfig(socket_path="")
    p.add_argument("--tests", default=",".join(ALL_TESTS),
                   help=f"comma-separated subset of {','.join(ALL_TESTS)}")
    p.add_argument("--count", type=int, default=d.count, help="bytes per REGION_READ")
    p.add_argument("--connect-iters", type=int, default=d.connect_iters)
    p.add_argument("--connect-gap-ms", type=float, default=d.connect_gap_ms,
                   help="untimed pause between connect+VERSION iterations")
    p.add_argument("--serial-iters", type=int, default=d.serial_iters)
    p.add_argument("--serial-warmup", type=int, default=d.serial_warmup)
    p.add_argument("--depth", type=int, default=d.pipeline_depth,
                   help="requests in flight for the pipelined test")
    p.add_argument("--pipeline-msgs", type=int, default=d.pipeline_msgs)
    p.add_argument("--dma-iters", type=int, default=d.dma_iters)
    p.add_argument("--dma-size", type=lambda s: int(s, 0), default=d.dma_size)
    p.add_argument("--timeout", type=float, default=d.timeout_s, help="socket timeout, s")


def config_from_args(a: argparse.Namespace, socket_path: str, region: int, offset: int,
                     server_pid: int | None = None) -> BenchConfig:
    return BenchConfig(
        socket_path=socket_path, region=region, offset=offset, count=a.count,
        tests=[t for t in a.tests.split(",") if t], connect_iters=a.connect_iters,
        connect_gap_ms=a.connect_gap_ms, serial_warmup=a.serial_warmup,
        serial_iters=a.serial_iters, pipeline_depth=a.depth, pipeline_msgs=a.pipeline_msgs,
        dma_iters=a.dma_iters, dma_size=a.dma_size, timeout_s=a.timeout, server_pid=server_pid,
    )


def strace_syscalls_per_msg(cfg: BenchConfig, pid: int, n: int = 2000) -> float | None:
    """Attach ``strace -c -f`` to the server during ``n`` serial REGION_READs and return
    syscalls per message. Perturbs timing heavily, so it runs separately from the timed tests."""
    import shutil
    import signal
    import tempfile

    if shutil.which("strace") is None:
        return None
    with Conn(cfg.socket_path, cfg.timeout_s) as conn:
        conn.negotiate()
        with tempfile.NamedTemporaryFile("r", suffix=".strace") as out:
            proc = subprocess.Popen(["strace", "-c", "-f", "-o", out.name, "-p", str(pid)],
                                    stderr=subprocess.PIPE)
            assert proc.stderr is not None
            proc.stderr.readline()  # "strace: Process N attached"
            time.sleep(0.2)
            for i in range(n):
                conn.request(wire.pack_region_read(i & 0xFFFF, cfg.region, cfg.offset, cfg.count))
            proc.send_signal(signal.SIGINT)
            proc.wait(10)
            text = Path(out.name).read_text()
    for line in text.splitlines():
        cols = line.split()
        if cols and cols[-1] == "total":
            # "100.00 0.0 0 6001 12 total": calls is the first integer column after usecs
            nums = [c for c in cols[:-1] if c.isdigit()]
            if len(nums) >= 2:
                return int(nums[1]) / n
    return None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--socket", required=True, help="vfio-user server socket path")
    p.add_argument("--region", type=int, default=0, help="region index for REGION_READ")
    p.add_argument("--offset", type=lambda s: int(s, 0), default=0)
    p.add_argument("--pid", type=int, default=None, help="server pid (default: SO_PEERCRED)")
    p.add_argument("--pin", type=int, default=None, help="pin this client to CPU N")
    p.add_argument("--strace", action="store_true",
                   help="also count server syscalls per message with strace (slow, separate)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_bench_args(p)
    a = p.parse_args(argv)
    if a.pin is not None:
        os.sched_setaffinity(0, {a.pin})
    cfg = config_from_args(a, a.socket, a.region, a.offset, a.pid)
    res = run_benchmarks(cfg)
    if a.strace and res.get("server_pid"):
        try:
            res["syscalls_per_msg"] = strace_syscalls_per_msg(cfg, res["server_pid"])
        except (OSError, ServerError, ProtocolError, subprocess.SubprocessError) as e:
            res["syscalls_per_msg_error"] = str(e)
    print(json.dumps(res, indent=2) if a.json else format_result(res))
    if a.strace and "syscalls_per_msg" in res:
        print(f"  server syscalls per serial REGION_READ: {res['syscalls_per_msg']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

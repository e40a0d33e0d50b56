"""Real guests drive our virtio-blk and virtio-net; QEMU's built-in devices are the reference.

virtio-blk: the host writes 4 MiB of seeded data into a raw image, the guest
(``qemu-configs/guest/virtio-blk-test.sh``) checksums it, copies it with O_DIRECT, writes
through the page cache with fsync and discards a range; afterwards the image on the host
must hold the copies. virtio-net: the test makes a network namespace, the TAP lives in it
with 10.99.0.1/24, and a peer process there pings the guest and moves 10 MiB each way with
the guest's busybox ``nc`` (``virtio-net-test.sh``). Both run against our devices and
QEMU's; their ``RESULT`` lines must be equal.

Skip/fail policy: as for every ``qemu`` test (see conftest); the network tests also need
root (CAP_NET_ADMIN) and skip with that reason otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from vfiouser_srv.qemu import ConfigFile, QemuCommand, RunResult, find_qemu, run_config
from vfiouser_srv.qemu.launcher import new_run_dir, serve_device

pytestmark = [pytest.mark.qemu, pytest.mark.usefixtures("qemu_ready")]

DISK_SIZE = 64 << 20
SEED_BYTES = 4 << 20
MIB = 1 << 20
HOST_ADDR = "10.99.0.1"
GUEST_ADDR = "10.99.0.2"
PREFIX = 24
NET_BYTES = 10 * MIB
GUEST_MAC = "52:54:00:12:34:56"
#: a console-line callback (`run_guest`'s on_line)
LineHook = Callable[[str], Awaitable[None] | None]
#: extra `--set` options for our virtio-net (benchmarks: VFU_NET_SETS=queue_size=256)
EXTRA_SETS: list[str] = [s for s in os.environ.get("VFU_NET_SETS", "").split(",") if s]
#: the same for our virtio-blk (benchmarks: VFU_BLK_SETS=poll_us=0)
BLK_SETS: list[str] = [s for s in os.environ.get("VFU_BLK_SETS", "").split(",") if s]


def seed_data(n: int = SEED_BYTES, seed: int = 5) -> bytes:
    return random.Random(seed).randbytes(n)


def make_disk(path: Path) -> bytes:
    data = seed_data()
    with path.open("wb") as f:
        f.write(data)
        f.truncate(DISK_SIZE)
    return data


def describe(res: RunResult) -> str:
    tail = "\n".join(res.console[-30:])
    return f"{res.summary()}\n--- console tail ---\n{tail}"


def diff(ref: RunResult, ours: RunResult) -> str:
    import difflib

    return "\n".join(difflib.unified_diff(ref.result_lines, ours.result_lines,
                                          ref.config, ours.config, lineterm=""))


# ------------------------------------------------------------------ virtio-blk

async def run_blk(config: str, workdir: Path, configs: ConfigFile | None = None,
                  guest_env: dict[str, str] | None = None,
                  append_extra: tuple[str, ...] = (),
                  on_line: LineHook | None = None,
                  sets: tuple[str, ...] = (),
                  python: str | None = None) -> tuple[RunResult, bytes, bytes]:
    """Boot `config` on a fresh seeded image; returns (run, seed data, image afterwards).

    `on_line` sees each console line as it arrives (the benchmark samples the server's CPU
    time at the guest's PHASE lines); `sets` are extra options for our server; `python`
    runs our server with another interpreter command (the benchmark's `--base` tree)."""
    img = workdir / f"{config}.img"
    data = await trio.to_thread.run_sync(make_disk, img)
    ours = not config.startswith("qemu-")
    server_sets = [f"backing={img}", *BLK_SETS, *sets] if ours else []
    kwargs = dict(configs=configs, guest_env=guest_env or {}, timeout=240,
                  append_extra=append_extra, on_line=on_line,
                  placeholders={} if ours else {"DISK": os.fspath(img)})
    if python is not None and ours:
        run_dir = await new_run_dir(f"{config}-base")
        sock = run_dir / "blk.sock"
        async with serve_device("virtio-blk", sock, run_dir=run_dir, python=python,
                                sets=server_sets) as server:
            run = await run_config(config, socket_path=sock, **kwargs)  # type: ignore[arg-type]
            await server.stop()
    else:
        run = await run_config(config, server_sets=server_sets, **kwargs)  # type: ignore[arg-type]
    after = await trio.to_thread.run_sync(img.read_bytes)
    return run.guest, data, after


def check_blk(res: RunResult, data: bytes, after: bytes) -> None:
    assert res.ok, describe(res)
    got = res.result_dict
    want = hashlib.md5(data).hexdigest()
    assert got.get("read_md5") == want, describe(res)
    assert got.get("copy_md5") == want, describe(res)
    assert got.get("buffered_md5") == hashlib.md5(data[:MIB]).hexdigest(), describe(res)
    assert got.get("sectors") == str(DISK_SIZE // 512)
    assert got.get("discard_zeroes") == "yes", describe(res)
    # the host's view of the backing file
    assert after[8 * MIB : 12 * MIB] == data, "O_DIRECT copy not in the backing file"
    assert after[12 * MIB : 13 * MIB] == data[:MIB], "fsync'd write not in the backing file"
    assert after[16 * MIB : 17 * MIB] == bytes(MIB), "discarded range not zero"


@pytest.mark.parametrize("config", ["virtio-blk", "virtio-blk-noshare"])
async def test_our_virtio_blk_in_guest(qemu_configs: ConfigFile, tmp_path: Path,
                                       config: str) -> None:
    """Shared guest RAM (rings and data through mmap) and private (DMA messages)."""
    res, data, after = await run_blk(config, tmp_path, qemu_configs)
    check_blk(res, data, after)
    assert res.result_dict.get("driver") == "virtio-pci"


async def test_our_virtio_blk_with_intx_only(qemu_configs: ConfigFile, tmp_path: Path) -> None:
    """`pci=nomsi`: the driver falls back to INTx and acknowledges through the ISR register."""
    res, data, after = await run_blk("virtio-blk", tmp_path, qemu_configs,
                                     append_extra=("pci=nomsi",))
    check_blk(res, data, after)
    assert any("msi_irqs=0" in line for line in res.console), describe(res)


async def test_our_virtio_blk_matches_builtin(qemu_configs: ConfigFile, tmp_path: Path) -> None:
    ref, ref_data, ref_after = await run_blk("qemu-virtio-blk", tmp_path, qemu_configs)
    check_blk(ref, ref_data, ref_after)
    ours, data, after = await run_blk("virtio-blk", tmp_path, qemu_configs)
    check_blk(ours, data, after)
    assert ours.result_lines == ref.result_lines, diff(ref, ours)


# ------------------------------------------------------------------ virtio-net

#: The host-side peer, run inside the namespace (``ip netns exec``): ping the guest until it
#: answers, then per round send NET bytes to guest:5001 (retrying the connect until the guest
#: listens) and receive one connection on :5002. Prints PING/SENT/RECV lines.
PEER = r"""
import hashlib, random, socket, struct, sys, time
guest, nbytes, rounds, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
data = random.Random(7).randbytes(nbytes)
deadline = time.monotonic() + timeout
lsock = socket.socket()
lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
lsock.bind(("0.0.0.0", 5002))
lsock.listen(1)
print("READY", flush=True)
def csum(b):
    b += b"\0" * (len(b) & 1)
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    s = (s >> 16) + (s & 0xFFFF)
    return ~(s + (s >> 16)) & 0xFFFF
def ping(seq):  # ICMP echo over a raw socket (the host has no ping binary)
    icmp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    icmp.settimeout(1)
    body = struct.pack("!HH", 0x7675, seq) + b"vfiouser-ping"
    try:
        icmp.sendto(struct.pack("!BBH", 8, 0, csum(b"\x08\0\0\0" + body)) + body, (guest, 0))
        while True:
            pkt, addr = icmp.recvfrom(2048)
            ihl = (pkt[0] & 0xF) * 4
            if addr[0] == guest and pkt[ihl] == 0 and pkt[ihl + 4 : ihl + 8] == body[:4]:
                return True
    except OSError:
        return False
    finally:
        icmp.close()
seq, ok = 0, 0
while time.monotonic() < deadline and ok < 3:
    seq += 1
    if ping(seq):
        ok += 1
    else:
        time.sleep(0.2)
print("PING ok" if ok == 3 else "PING timeout", flush=True)
for r in range(1, rounds + 1):
    while True:
        try:
            s = socket.create_connection((guest, 5001), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                print("SENT timeout", flush=True); sys.exit(1)
            time.sleep(0.01)
    s.settimeout(max(1.0, deadline - time.monotonic()))  # message-mode DMA is slow
    s.sendall(data)
    s.close()
    print(f"SENT {r} {hashlib.md5(data).hexdigest()}", flush=True)
    lsock.settimeout(max(1.0, deadline - time.monotonic()))
    c, _ = lsock.accept()
    h, n = hashlib.md5(), 0
    while chunk := c.recv(1 << 16):
        h.update(chunk); n += len(chunk)
    c.close()
    print(f"RECV {r} {n} {h.hexdigest()}", flush=True)
"""


def have_net_admin() -> tuple[bool, str]:
    if os.geteuid() != 0:
        return False, "needs root (CAP_NET_ADMIN) to create a network namespace and a TAP"
    if not os.path.exists("/dev/net/tun"):
        return False, "no /dev/net/tun on this host"
    if shutil.which("ip") is None:
        return False, "needs iproute2's `ip` (ip netns exec) on the host"
    return True, ""


def netns_add(name: str) -> None:
    from pyroute2 import netns

    netns.create(name)


def netns_del(name: str) -> None:
    from pyroute2 import netns

    with contextlib.suppress(OSError):
        netns.remove(name)


def configure_tap(ns: str, ifname: str, timeout: float = 30.0) -> None:
    """Wait for `ifname` in `ns` (QEMU creates it), then give it the host address, up."""
    import time

    from pyroute2 import IPRoute, NetlinkError

    deadline = time.monotonic() + timeout
    with IPRoute(netns=ns) as ipr:
        while not (found := ipr.link_lookup(ifname=ifname)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{ifname} never appeared in netns {ns}")
            time.sleep(0.05)
        try:
            ipr.addr("add", index=found[0], address=HOST_ADDR, prefixlen=PREFIX)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise
        ipr.link("set", index=found[0], state="up")


async def _configure_tap(ns: str, tap: str) -> None:
    await trio.to_thread.run_sync(configure_tap, ns, tap)


@contextlib.asynccontextmanager
async def namespace() -> AsyncIterator[str]:
    """A fresh network namespace, always deleted (pyroute2 runs in worker threads)."""
    name = f"vfutest-{uuid.uuid4().hex[:6]}"
    await trio.to_thread.run_sync(netns_add, name)
    try:
        yield name
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(netns_del, name)


@dataclass
class PeerReport:
    lines: list[str] = field(default_factory=list)

    @property
    def pinged(self) -> bool:
        return "PING ok" in self.lines

    def sent(self) -> list[str]:
        return [line.split()[2] for line in self.lines if line.startswith("SENT ")
                and len(line.split()) == 3]

    def received(self) -> list[tuple[int, str]]:
        return [(int(p[2]), p[3]) for line in self.lines
                if line.startswith("RECV ") and len(p := line.split()) == 4]


@contextlib.asynccontextmanager
async def peer(ns: str, rounds: int, timeout: float = 200.0,
               nbytes: int = NET_BYTES) -> AsyncIterator[PeerReport]:
    """The host-side peer process in `ns`; its report fills in while it runs."""
    report = PeerReport()
    argv = ["ip", "netns", "exec", ns, sys.executable, "-c", PEER, GUEST_ADDR,
            str(nbytes), str(rounds), str(timeout)]
    proc = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    ready = trio.Event()

    async def pump() -> None:
        assert proc.stdout is not None
        buf = b""
        async for chunk in _chunks(proc.stdout):
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace").strip()
                report.lines.append(line)
                if line == "READY":
                    ready.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump)
            with trio.fail_after(30):
                await ready.wait()
            yield report
            with trio.move_on_after(30):
                await proc.wait()
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


async def _chunks(stream: trio.abc.ReceiveStream) -> AsyncIterator[bytes]:
    while True:
        try:
            chunk = await stream.receive_some(65536)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return
        if not chunk:
            return
        yield bytes(chunk)


def in_netns(qemu: QemuCommand, ns: str) -> QemuCommand:
    """QEMU started inside `ns`, so the TAP its netdev creates lives there."""
    return QemuCommand(("ip", "netns", "exec", ns, *qemu.argv), qemu.env, qemu.version,
                       qemu.source)


@dataclass
class NetRun:
    guest: RunResult
    peer: PeerReport


async def run_net(config: str, configs: ConfigFile | None = None, rounds: int = 1,
                  timeout: float = 120.0, nbytes: int = NET_BYTES,
                  guest_env: dict[str, str] | None = None,
                  on_line: LineHook | None = None, sets: tuple[str, ...] = ()) -> NetRun:
    """Boot `config` with its TAP in a fresh namespace and the peer running there
    (`guest_env` adds guest knobs, `on_line` sees each console line as it arrives, `sets`
    are extra options for our server)."""
    tap = f"vfu{uuid.uuid4().hex[:8]}"
    env = {"host": HOST_ADDR, "guest": GUEST_ADDR, "rounds": str(rounds), **(guest_env or {})}
    async with namespace() as ns:
        if config.startswith("qemu-"):
            qemu = in_netns(await trio.to_thread.run_sync(find_qemu, None), ns)
            async with peer(ns, rounds, timeout, nbytes) as report, \
                    trio.open_nursery() as nursery:
                nursery.start_soon(_configure_tap, ns, tap)
                run = await run_config(config, configs=configs, qemu=qemu, guest_env=env,
                                       placeholders={"TAP": tap}, timeout=timeout,
                                       on_line=on_line)
        else:
            server_sets = [f"tap={tap}", f"netns={ns}", f"address={HOST_ADDR}/{PREFIX}",
                           *EXTRA_SETS, *sets, f"mac={GUEST_MAC}"]
            async with peer(ns, rounds, timeout, nbytes) as report:
                run = await run_config(config, configs=configs, server_sets=server_sets,
                                       guest_env=env, timeout=timeout, on_line=on_line)
        return NetRun(run.guest, report)


def check_net(run: NetRun, rounds: int = 1, nbytes: int = NET_BYTES) -> None:
    res = run.guest
    assert res.ok, describe(res) + "\npeer: " + "; ".join(run.peer.lines)
    got = res.result_dict
    want = hashlib.md5(random.Random(7).randbytes(nbytes)).hexdigest()
    assert got.get("ping_host") == "ok", describe(res)
    assert run.peer.pinged, f"the host could not ping the guest: {run.peer.lines}"
    assert got.get("rx_md5") == want and got.get("rx_bytes") == str(nbytes), describe(res)
    assert run.peer.sent() == [want] * rounds
    assert run.peer.received() == [(nbytes, want)] * rounds, run.peer.lines
    assert got.get("mac") == GUEST_MAC and got.get("carrier") == "1"


def _need_root() -> None:
    ok, why = have_net_admin()
    if not ok:
        pytest.skip(why)


@pytest.mark.parametrize("config", ["virtio-net", "virtio-net-noshare"])
async def test_our_virtio_net_in_guest(qemu_configs: ConfigFile, config: str) -> None:
    _need_root()
    run = await run_net(config, qemu_configs)
    check_net(run)
    assert run.guest.result_dict.get("driver") == "virtio-pci"


async def test_our_virtio_net_matches_builtin(qemu_configs: ConfigFile) -> None:
    _need_root()
    ref = await run_net("qemu-virtio-net", qemu_configs)
    check_net(ref)
    ours = await run_net("virtio-net", qemu_configs)
    check_net(ours)
    assert ours.guest.result_lines == ref.guest.result_lines, diff(ref.guest, ours.guest)

"""Flushed data survives SIGKILL of the server: a real guest writes, flushes, and the host
kills ``vfiouser-srv serve`` the moment the guest says so (docs/durability.md).

Per device (our NVMe and our virtio-blk, one boot each) the guest writes distinct 512 KiB
slots of a 32 MiB disk: seven with ``O_DIRECT`` and one through its page cache, then
``sync <disk>`` (fsync of the block device: the kernel sends NVMe Flush / virtio FLUSH); a
last slot is written with ``O_DIRECT`` and *not* flushed. Then it prints ``STAGE
kill-server`` and the host sends SIGKILL to the server process at once and stops QEMU.

What the host asserts on the backing file afterwards, and what each assertion can catch:

* every slot, flushed or not, holds its pattern and the rest of the disk is zero. The page
  cache outlives a killed process, so this holds whenever the server handed each write to
  the kernel (``pwrite``) before it posted the completion; a server that acknowledged
  writes it still held in user space (a queue, a write-back buffer, a write "in flight" in
  a thread) loses them here. The unflushed slot checks this without any flush to help;
* no page of a flushed slot is dirty or under writeback in the host's page cache
  (``cachestat(2)``, Linux >= 6.5): the flush reached ``fsync``/``fdatasync`` before its
  completion. A server whose flush did nothing leaves those pages dirty: the kernel writes
  dirty pages back only after ``vm.dirty_expire_centisecs`` (30 s by default), and the kill
  comes within a second or so of the writes. (Anything that syncs the whole host meanwhile,
  e.g. a ``sync`` in another shell, can hide such a bug; it cannot make a good server
  fail.) This is the part a SIGKILL alone cannot show: surviving a host power loss.

Skip/fail policy: as for every ``qemu`` test (see conftest); CI=true never skips.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import tempfile
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from vfiouser_srv.qemu import ConfigFile, run_guest, serve_device
from vfiouser_srv.qemu.launcher import new_run_dir, results_of

pytestmark = [pytest.mark.qemu, pytest.mark.usefixtures("qemu_ready")]

MIB = 1 << 20
DISK_SIZE = 32 * MIB
SLOT = 512 << 10
#: O_DIRECT writes, then a flush
DIRECT_SLOTS = (0, 5, 11, 18, 26, 33, 41)
#: written through the guest's page cache (dd conv=fsync: writeback, then a flush)
BUFFERED_SLOT = 50
#: O_DIRECT, no flush afterwards; its own 2 MiB-aligned region (slots 60-63), so no large
#: folio of the host's page cache spans it and a flushed slot
UNSYNCED_SLOT = 60
SYNCED_SLOTS = (*DIRECT_SLOTS, BUFFERED_SLOT)
KILL_STAGE = "STAGE kill-server"
TIMEOUT = 180.0

GUEST_SCRIPT = f"""#!/bin/sh
# test_durability.py's guest: write slots, flush, write one more, ask to be killed.
res() {{ echo "RESULT $1=$2"; }}
DISK=/dev/$vfu_disk
i=0
while [ ! -b $DISK ] && [ $i -lt 200 ]; do usleep 100000; i=$((i + 1)); done
[ -b $DISK ] || {{ res disk "FAIL no $DISK"; exit 1; }}
res write_cache "$(tr ' ' _ < /sys/block/$vfu_disk/queue/write_cache)"
slot() {{ yes "vfiouser durability slot $1" | head -c {SLOT} > /tmp/slot; }}
ok=yes
for s in {" ".join(map(str, DIRECT_SLOTS))}; do
    slot $s
    dd if=/tmp/slot of=$DISK bs={SLOT} seek=$s count=1 oflag=direct 2>/dev/null || ok=no
done
slot {BUFFERED_SLOT}
dd if=/tmp/slot of=$DISK bs={SLOT} seek={BUFFERED_SLOT} count=1 conv=fsync 2>/dev/null || ok=no
sync $DISK || ok=no
res synced $ok
slot {UNSYNCED_SLOT}
dd if=/tmp/slot of=$DISK bs={SLOT} seek={UNSYNCED_SLOT} count=1 oflag=direct 2>/dev/null &&
    res unsynced ok || res unsynced FAIL
echo "{KILL_STAGE}"
sleep 600
""".encode()


def slot_pattern(slot: int) -> bytes:
    """What the guest's `yes "vfiouser durability slot N" | head -c SLOT` produces."""
    line = f"vfiouser durability slot {slot}\n".encode()
    return (line * (SLOT // len(line) + 1))[:SLOT]


# --- cachestat(2): dirty pages of a file range ---------------------------------------------

SYS_CACHESTAT = 451  # the same number on every architecture (added in Linux 6.5)


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [("nr_cache", ctypes.c_uint64), ("nr_dirty", ctypes.c_uint64),
                ("nr_writeback", ctypes.c_uint64), ("nr_evicted", ctypes.c_uint64),
                ("nr_recently_evicted", ctypes.c_uint64)]


def unstable_pages(path: Path, offset: int, length: int) -> int | None:
    """Pages of the range that are dirty or under writeback in the host's page cache, or
    None when the kernel has no cachestat."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = _Stat()
        rng = _Range(offset, length)
        if libc.syscall(SYS_CACHESTAT, fd, ctypes.byref(rng), ctypes.byref(st), 0) != 0:
            err = ctypes.get_errno()
            if err in (errno.ENOSYS, errno.EPERM):
                return None
            raise OSError(err, os.strerror(err))
        return int(st.nr_dirty + st.nr_writeback)
    finally:
        os.close(fd)


# --- the run -------------------------------------------------------------------------------


@dataclass
class KillRun:
    console: list[str] = field(default_factory=list)
    killed_at: float | None = None
    server_status: int | None = None
    wall_seconds: float = 0.0
    run_dir: Path | None = None

    def results(self) -> dict[str, str]:
        return results_of(self.console)

    def describe(self) -> str:
        tail = "\n".join(self.console[-30:])
        return (f"killed at {self.killed_at}, server status {self.server_status}, "
                f"{self.wall_seconds:.1f}s, logs in {self.run_dir}\n--- console tail ---\n"
                f"{tail}")


@asynccontextmanager
async def short_socket_dir() -> AsyncIterator[Path]:
    """sun_path is short (108 bytes); pytest's tmp_path can be long."""
    path = Path(await trio.to_thread.run_sync(tempfile.mkdtemp, "", "vfu-dur-"))
    try:
        yield path
    finally:
        await trio.to_thread.run_sync(shutil.rmtree, path, True)


async def write_flush_kill(config: str, disk: str, sets: list[str],
                           configs: ConfigFile) -> KillRun:
    """Boot `config` with the guest script above; SIGKILL the server on `KILL_STAGE`, wait
    until it is gone, then stop QEMU (the guest has nothing left to say)."""
    run = KillRun()
    run.run_dir = await new_run_dir(f"durability-{config}")
    t0 = trio.current_time()
    async with short_socket_dir() as sock_dir:
        sock = sock_dir / "vfu.sock"
        async with serve_device(config, sock, run_dir=run.run_dir, sets=sets) as server:
            killed = trio.Event()

            def on_line(line: str) -> None:
                run.console.append(line)
                if line.strip() == KILL_STAGE and not killed.is_set():
                    server.kill()  # SIGKILL, now: no chance to flush or close anything
                    run.killed_at = trio.current_time() - t0
                    killed.set()

            async with trio.open_nursery() as nursery:
                async def guest() -> None:
                    await run_guest(config, configs=configs, run_dir=run.run_dir,
                                    socket_path=sock, test=GUEST_SCRIPT,
                                    guest_env={"disk": disk}, on_line=on_line,
                                    timeout=TIMEOUT)
                    if not killed.is_set():  # QEMU ended before the kill stage
                        nursery.cancel_scope.cancel()

                nursery.start_soon(guest)
                await killed.wait()
                run.server_status = await server.wait()
                nursery.cancel_scope.cancel()  # run_guest stops QEMU on its way out
    run.wall_seconds = trio.current_time() - t0
    return run


async def check_durability(img: Path, run: KillRun) -> None:
    why = run.describe()
    assert run.killed_at is not None, f"the guest never asked for the kill\n{why}"
    assert run.server_status == -9, f"server not ended by SIGKILL\n{why}"
    got = run.results()
    assert got.get("synced") == "yes" and got.get("unsynced") == "ok", why
    assert got.get("write_cache") == "write_back", why
    unstable = {s: await trio.to_thread.run_sync(unstable_pages, img, s * SLOT, SLOT)
                for s in SYNCED_SLOTS}
    data = await trio.to_thread.run_sync(img.read_bytes)
    assert len(data) == DISK_SIZE
    lost = [s for s in (*SYNCED_SLOTS, UNSYNCED_SLOT)
            if data[s * SLOT : (s + 1) * SLOT] != slot_pattern(s)]
    assert not lost, f"slots {lost} do not hold their pattern after the kill\n{why}"
    written = set((*SYNCED_SLOTS, UNSYNCED_SLOT))
    stray = [s for s in range(DISK_SIZE // SLOT)
             if s not in written and data[s * SLOT : (s + 1) * SLOT].count(0) != SLOT]
    assert not stray, f"slots {stray} were never written but are not zero\n{why}"
    if None in unstable.values():
        warnings.warn("no cachestat(2) on this host kernel: cannot check that flushed slots "
                      "reached stable storage, only that they reached the kernel",
                      stacklevel=2)
        return
    dirty = {s: n for s, n in unstable.items() if n}
    assert not dirty, (f"flushed slots still dirty in the host page cache (pages per slot): "
                       f"{dirty}: the flush completed before fsync\n{why}")


@pytest.mark.parametrize(("config", "disk", "option"), [
    ("nvme", "nvme0n1", "backing"),
    ("virtio-blk", "vda", "backing"),
])
async def test_flushed_data_survives_server_sigkill(qemu_configs: ConfigFile, tmp_path: Path,
                                                    config: str, disk: str,
                                                    option: str) -> None:
    img = tmp_path / "disk.img"  # created and sized by the server
    run = await write_flush_kill(config, disk, [f"{option}={img}", f"size={DISK_SIZE}"],
                                 qemu_configs)
    print(f"{config}: kill at {run.killed_at:.1f}s, whole run {run.wall_seconds:.1f}s"
          if run.killed_at is not None else f"{config}: no kill")
    await check_durability(img, run)

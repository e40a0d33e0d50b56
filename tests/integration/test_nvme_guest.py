"""A real Linux guest's nvme driver uses our NVMe controller; QEMU's built-in nvme is the
reference.

The guest program is ``qemu-configs/guest/nvme-test.sh``: it checks that the driver bound,
the namespace sizes, writes a pattern (O_DIRECT and through the page cache with fsync),
reads it back, discards a range and reads zeros. The host then checks the backing file
after poweroff, and a second boot reads the pattern back. QEMU's ``-device nvme`` on an
image of the same size must give the same ``RESULT`` lines.

Skip/fail policy: as for every ``qemu`` test (see conftest).
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
from pathlib import Path

import pytest
import trio

from vfiouser_srv.qemu import ConfigFile, RunResult, run_config, run_guest, serve_device
from vfiouser_srv.qemu.launcher import new_run_dir

pytestmark = [pytest.mark.qemu, pytest.mark.usefixtures("qemu_ready")]

MIB = 1 << 20
DISK_SIZE = 64 * MIB
SEED = "1"
STEPS = "ident,pattern,discard"


def pattern(seed: str = SEED) -> bytes:
    """What the guest's `yes "vfiouser nvme pattern seed $SEED" | head -c 4M` produces."""
    line = f"vfiouser nvme pattern seed {seed}\n".encode()
    return (line * (4 * MIB // len(line) + 1))[: 4 * MIB]


def describe(res: RunResult) -> str:
    tail = "\n".join(res.console[-30:])
    return f"{res.summary()}\n--- console tail ---\n{tail}"


def diff(ref: RunResult, ours: RunResult) -> str:
    return "\n".join(difflib.unified_diff(ref.result_lines, ours.result_lines,
                                          ref.config, ours.config, lineterm=""))


async def boot(config: str, configs: ConfigFile, *, image: Path | None = None,
               sets: tuple[str, ...] = (), steps: str = STEPS,
               append: tuple[str, ...] = (), qemu_args: tuple[str, ...] = ()) -> RunResult:
    env = {"nvme_steps": steps, "seed": SEED}
    if config.startswith("qemu-"):
        assert image is not None
        run = await run_config(config, configs=configs, timeout=240, guest_env=env,
                               placeholders={"DISK": os.fspath(image)}, append_extra=append,
                               extra_qemu_args=qemu_args)
    else:
        run = await run_config(config, configs=configs, timeout=240, guest_env=env,
                               server_sets=list(sets), append_extra=append,
                               extra_qemu_args=qemu_args)
    return run.guest


def check_io(res: RunResult) -> None:
    assert res.ok, describe(res)
    got = res.result_dict
    want = hashlib.md5(pattern()).hexdigest()
    assert got.get("driver") == "nvme", describe(res)
    assert got.get("ns1_bytes") == str(DISK_SIZE), describe(res)
    assert got.get("pattern_md5") == want, describe(res)
    assert got.get("readback_md5") == want, describe(res)
    assert got.get("readback_fsync_md5") == want, describe(res)
    assert got.get("discard") == "ok" and got.get("discard_zeroes") == "yes", describe(res)


def check_image(data: bytes) -> None:
    assert len(data) == DISK_SIZE
    assert data[: 4 * MIB] == pattern(), "O_DIRECT write not in the backing file"
    assert data[8 * MIB : 12 * MIB] == pattern(), "fsync'd write not in the backing file"
    assert data[16 * MIB : 17 * MIB] == bytes(MIB), "discarded range is not zero"


async def test_our_nvme_file_backed_and_persistent(qemu_configs: ConfigFile,
                                                   tmp_path: Path) -> None:
    img = tmp_path / "disk.img"  # does not exist: the server creates and sizes it
    sets = (f"backing={img}", "size=64M")
    res = await boot("nvme", qemu_configs, sets=sets)
    check_io(res)
    check_image(await trio.to_thread.run_sync(img.read_bytes))
    again = await boot("nvme", qemu_configs, sets=sets, steps="ident,verify")
    assert again.ok, describe(again)
    assert again.result_dict.get("verify_md5") == hashlib.md5(pattern()).hexdigest(), \
        describe(again)


async def test_our_nvme_matches_builtin(qemu_configs: ConfigFile, tmp_path: Path) -> None:
    ref_img = tmp_path / "ref.img"
    with ref_img.open("wb") as f:
        f.truncate(DISK_SIZE)
    ref = await boot("qemu-nvme", qemu_configs, image=ref_img)
    check_io(ref)
    check_image(await trio.to_thread.run_sync(ref_img.read_bytes))
    img = tmp_path / "ours.img"
    ours = await boot("nvme", qemu_configs, sets=(f"backing={img}", "size=64M"))
    check_io(ours)
    assert ours.result_lines == ref.result_lines, diff(ref, ours)


async def test_guest_driver_uses_shadow_doorbells(qemu_configs: ConfigFile,
                                                  tmp_path: Path) -> None:
    """Linux's nvme driver configures Doorbell Buffer Config when OACS bit 8 says so, and
    then rings an MMIO doorbell only when it passes our event index: far fewer doorbell
    writes reach the server than the two per command it takes without them."""
    run_dir = await new_run_dir("nvme", None)
    sock = run_dir / "vfu.sock"
    sets = [f"backing={tmp_path / 'ours.img'}", "size=64M"]
    env = {"nvme_steps": STEPS, "seed": SEED}
    async with serve_device("nvme", sock, run_dir=run_dir, sets=sets,
                            extra_args=["-v"]) as server:
        res = await run_guest("nvme", configs=qemu_configs, socket_path=sock, run_dir=run_dir,
                              guest_env=env, timeout=240)
        await server.stop()
    check_io(res)
    log = await trio.to_thread.run_sync(server.log_path.read_text)
    assert "nvme: shadow doorbells on" in log, log[-3000:]
    m = re.search(r"shutdown complete \((\d+) I/O commands, (\d+) I/O doorbell writes\)", log)
    assert m, log[-3000:]
    commands, doorbells = int(m.group(1)), int(m.group(2))
    # without shadow doorbells: an SQ tail and a CQ head write per command
    assert commands > 20 and doorbells < 1.5 * commands, (commands, doorbells)


async def test_our_nvme_message_mode_dma(qemu_configs: ConfigFile, tmp_path: Path) -> None:
    """Private guest RAM: no fds, every transfer goes through DMA_READ/DMA_WRITE."""
    img = tmp_path / "disk.img"
    res = await boot("nvme-noshare", qemu_configs, sets=(f"backing={img}", "size=64M"))
    check_io(res)
    check_image(await trio.to_thread.run_sync(img.read_bytes))


async def test_two_namespaces(qemu_configs: ConfigFile, tmp_path: Path) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    res = await boot("nvme", qemu_configs, sets=(f"backing={a}:{b}", "size=64M:32M"),
                     steps="ident,ns2")
    assert res.ok, describe(res)
    got = res.result_dict
    assert got.get("namespaces") == "2", describe(res)
    assert got.get("ns1_bytes") == str(DISK_SIZE), describe(res)
    assert got.get("ns2_bytes") == str(32 * MIB), describe(res)
    assert got.get("ns2_md5") == hashlib.md5(pattern()[: 2 * MIB]).hexdigest(), describe(res)
    assert got.get("ns1_untouched") == "yes"
    data = await trio.to_thread.run_sync(b.read_bytes)
    assert data[: 2 * MIB] == pattern()[: 2 * MIB]
    assert await trio.to_thread.run_sync(lambda: a.stat().st_size) == DISK_SIZE


async def test_intx_fallback(qemu_configs: ConfigFile, tmp_path: Path) -> None:
    """`pci=nomsi`: the driver runs on INTx; no interrupt storm ("nobody cared")."""
    img = tmp_path / "disk.img"
    res = await boot("nvme", qemu_configs, sets=(f"backing={img}", "size=64M"),
                     append=("pci=nomsi",))
    check_io(res)
    assert any("msi_irqs=0" in line for line in res.console), describe(res)
    assert not any("nobody cared" in line for line in res.console), describe(res)


async def test_controller_reset_under_io(qemu_configs: ConfigFile, tmp_path: Path) -> None:
    """Controller reset (CC.EN 1->0->1) while a write is in flight, then a PCI function
    reset with the driver bound (DEVICE_RESET): the driver recovers and I/O is intact."""
    img = tmp_path / "disk.img"
    res = await boot("nvme", qemu_configs, sets=(f"backing={img}", "size=64M"),
                     steps="ident,reset,flr")
    assert res.ok, describe(res)
    got = res.result_dict
    assert got.get("reset_io") == "ok" and got.get("reset_data") == "ok", describe(res)
    assert got.get("reset_state") == "live", describe(res)
    assert got.get("flr_state") == "live" and got.get("flr_io") == "ok", describe(res)
    data = await trio.to_thread.run_sync(img.read_bytes)
    assert data[24 * MIB : 40 * MIB] == pattern() * 4


async def test_two_vcpus_two_io_queues(qemu_configs: ConfigFile, tmp_path: Path) -> None:
    """`-smp 2`: the driver makes one I/O queue pair per CPU, each CQ with its own vector."""
    img = tmp_path / "disk.img"
    res = await boot("nvme", qemu_configs, sets=(f"backing={img}", "size=64M"),
                     qemu_args=("-smp", "2"))
    check_io(res)
    info = " ".join(line for line in res.console if line.startswith("INFO"))
    assert "queues=2" in info and "msi_irqs=3" in info, describe(res)

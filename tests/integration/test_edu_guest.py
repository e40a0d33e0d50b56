"""A real Linux guest drives edu through QEMU: built-in edu is the reference, ours must match.

Each test boots QEMU (TCG, ~5-12 s). The guest program is ``qemu-configs/guest/edu-test.sh``;
its ``RESULT key=value`` lines are compared value by value, then line by line. Its ``command``
and ``sizes`` steps read back every Command register bit and 8/16/32/64-bit accesses at and
between the register offsets, so a difference in the PCI write mask or in the access-size
rules (QEMU's memory core in front of edu.c) fails here, not only in a guest driver.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest
import trio

from vfiouser_srv.qemu import ConfigFile, RunResult, run_config, run_guest, serve_device
from vfiouser_srv.qemu.launcher import new_run_dir

from .conftest import RefRunner

pytestmark = [pytest.mark.qemu, pytest.mark.usefixtures("qemu_ready")]

STEPS = "ident,command,regs,fact,dma,irq,sizes"
RESET_STEPS = "ident,regs,reset,ident,command,fact,dma,irq"

EXPECTED = {
    "found": "yes",
    "vendor": "0x1234",
    "device": "0x11e8",
    "class": "0x00ff00",
    "id": "010000ed",
    "liveness(12345678)": "edcba987",
    "fact(0)": "00000001",
    "fact(5)": "00000078",
    "fact(12)": "1c8cfc00",
    "fact(13)": "7328cc00",
    "dma": "ok",
    "irq": "1",
    "irq_status": "00000001",
    "irq_status_acked": "00000000",
    "irq_fact": "2",
    "irq_dma": "3",
    "irq_dma_status": "00000100",
    "failed": "0",
    # command: QEMU's generic PCI write mask (hw/pci/pci.c pci_init_wmask) keeps I/O Space,
    # Memory Space, Bus Master, SERR# Enable and Interrupt Disable, nothing else
    "command(ffff)": "0507",
    "command(0000)": "0000",
    # sizes: QEMU's memory core rejects edu accesses under 4 bytes or unaligned (reads 0);
    # edu.c answers 8 bytes below 0x80 and offsets without a register with all ones
    "rd8(0x00)": "0x00",
    "rd16(0x00)": "0x0000",
    "rd32(0x00)": "0x010000ed",
    "rd64(0x00)": "0xffffffffffffffff",
    "rd32(0x02)": "0x00000000",
    "rd32(0x04)": "0xedcba987",
    "rd16(0x80)": "0x0000",
    "rd32(0x80)": "0x55667788",
    "rd64(0x80)": "0x1122334455667788",
    "rd32(0x84)": "0xffffffff",
    "rd32(0x40000)": "0xffffffff",
    "liveness(wr8)": "edcba987",
    "liveness(wr16)": "edcba987",
    "liveness(wr64@0)": "edcba987",
    "irq_status(wr16)": "00000000",
    "dma_src(wr16)": "0x1122334455667788",
    "dma_src(wr32)": "0x00000000aabbccdd",
    "dma_cnt(wr64)": "0xfedcba9876543210",
}


def describe(res: RunResult) -> str:
    tail = "\n".join(res.console[-25:])
    return f"{res.summary()}\n--- console tail ---\n{tail}"


def assert_ok(res: RunResult) -> None:
    assert res.ok, describe(res)


def diff(ref: RunResult, ours: RunResult) -> str:
    import difflib

    return "\n".join(difflib.unified_diff(ref.result_lines, ours.result_lines,
                                          "qemu-edu", ours.config, lineterm=""))


def differences(ref: RunResult, ours: RunResult) -> list[str]:
    """Every key whose value differs or that only one side printed, in the guest's order."""
    want, got = ref.result_dict, ours.result_dict
    missing = "<missing>"
    return [f"{key}: {ref.config}={want.get(key, missing)} {ours.config}={got.get(key, missing)}"
            for key in dict.fromkeys([*want, *got]) if want.get(key) != got.get(key)]


def assert_same_results(ref: RunResult, ours: RunResult) -> None:
    """Value by value first (each differing value named), then the lines and their order."""
    wrong = differences(ref, ours)
    assert not wrong, f"{len(wrong)} values differ from QEMU's edu:\n" + "\n".join(wrong)
    assert ours.result_lines == ref.result_lines, diff(ref, ours)


# (a) ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", ["qemu-edu", "qemu-edu-noshare"])
def test_builtin_edu_reference(reference: RefRunner, config: str) -> None:
    res = reference(config, STEPS)
    assert_ok(res)
    got = res.result_dict
    for key, want in EXPECTED.items():
        assert got.get(key) == want, f"{key}: {got.get(key)!r} != {want!r}\n{describe(res)}"
    # one line per key, so comparing values by key compares every line
    assert len(got) == len(res.result_lines), describe(res)
    # Parity Error Response is not in QEMU's write mask; I/O Space is, BAR or not
    assert got["command(+0040)"] == got["command_restored"]
    assert int(got["command(+0001)"], 16) & 0x1
    assert res.boot_seconds is not None


def test_builtin_edu_shared_and_private_agree(reference: RefRunner) -> None:
    assert reference("qemu-edu", STEPS).result_lines == \
        reference("qemu-edu-noshare", STEPS).result_lines


# (b) ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("ours", "ref"), [("edu", "qemu-edu"),
                                           ("edu-noshare", "qemu-edu-noshare")])
async def test_our_edu_matches_builtin(reference: RefRunner, qemu_configs: ConfigFile,
                                       ours: str, ref: str) -> None:
    want = await trio.to_thread.run_sync(reference, ref, STEPS)
    run = await run_config(ours, configs=qemu_configs, guest_env={"edu_steps": STEPS},
                           timeout=120)
    assert_ok(run.guest)
    assert_same_results(want, run.guest)
    if ours == "edu":
        # QEMU's memory-backend-memfd seals guest RAM against shrinking (F_SEAL_SHRINK), so
        # the server mmaps it; an unsealed file would be served by pread/pwrite, with a
        # warning in the server's log (docs/security.md, "Guest memory").
        assert run.server_log is not None
        log = run.server_log.read_text()
        assert "READY" in log or "$ " in log  # it is the server's log
        assert "not sealed against shrinking" not in log


# (c) ---------------------------------------------------------------------------------------

async def test_server_killed_qemu_survives_and_restart_works(
        reference: RefRunner, qemu_configs: ConfigFile) -> None:
    run_dir = await new_run_dir("edu-kill")
    sock = run_dir / "vfu.sock"
    killed_at: list[float] = []

    async with serve_device("edu", sock, run_dir=run_dir) as server:
        async def on_line(line: str) -> None:
            if line.startswith("STAGE pause") and not killed_at:
                server.kill(signal.SIGKILL)   # a crash, not a clean shutdown
                await server.wait()
                killed_at.append(trio.current_time())

        res = await run_guest("edu", configs=qemu_configs, socket_path=sock,
                              run_dir=run_dir, on_line=on_line, timeout=120,
                              guest_env={"edu_steps": "ident,pause,regs", "pause": "3"})
    assert killed_at, f"the guest never reached the pause stage\n{describe(res)}"
    # QEMU kept running after the server died: the guest finished its script and powered off.
    assert res.powered_off and res.returncode == 0 and not res.timed_out, describe(res)
    assert any(line.startswith("STAGE resume") for line in res.console), describe(res)
    assert res.result_dict.get("id") == "010000ed"

    # A new server on the same socket path serves a new QEMU normally.
    want = await trio.to_thread.run_sync(reference, "qemu-edu", STEPS)
    run_dir2 = await new_run_dir("edu-restart")
    async with serve_device("edu", sock, run_dir=run_dir2, log_name="server2.log"):
        res2 = await run_guest("edu", configs=qemu_configs, socket_path=sock, run_dir=run_dir2,
                               guest_env={"edu_steps": STEPS}, timeout=120)
    assert_ok(res2)
    assert_same_results(want, res2)


# (d) ---------------------------------------------------------------------------------------

_DEVICE_RESET = 0xD


def trace_commands(trace: Path) -> list[int]:
    """Commands of the messages QEMU received (``vfio_user_recv_hdr ... cmd 0x..``)."""
    return [int(m.group(1), 16) for m in
            re.finditer(r"vfio_user_recv_hdr .*? cmd (0x[0-9a-f]+)", trace.read_text())]


async def test_guest_reset_goes_through_device_reset(reference: RefRunner,
                                                     qemu_configs: ConfigFile) -> None:
    want = await trio.to_thread.run_sync(reference, "qemu-edu", RESET_STEPS)
    assert_ok(want)
    run = await run_config("edu", configs=qemu_configs, guest_env={"edu_steps": RESET_STEPS},
                           trace=True, timeout=120)
    assert_ok(run.guest)
    assert run.guest.result_dict.get("reset") == "ok"
    assert_same_results(want, run.guest)
    assert run.guest.trace_path is not None
    assert _DEVICE_RESET in trace_commands(run.guest.trace_path), \
        "the guest's reset did not reach the server as DEVICE_RESET"


# (e) ---------------------------------------------------------------------------------------

_ERROR_FLAG = 0x20  # vfio-user header flag: the reply carries an errno


def trace_problems(trace: Path, stderr: Path) -> list[str]:
    """Error replies and error/timeout lines in QEMU's vfio-user trace and stderr."""
    problems = []
    for line in trace.read_text(errors="replace").splitlines():
        m = re.search(r"vfio_user_recv_hdr .* flags (0x[0-9a-f]+)", line)
        if (m and int(m.group(1), 16) & _ERROR_FLAG) or re.search(r"error|timed? ?out", line,
                                                                  re.I):
            problems.append(line)
    problems += [f"stderr: {line}" for line in stderr.read_text(errors="replace").splitlines()
                 if re.search(r"error|timed? ?out|vfio", line, re.I)]
    return problems


@pytest.mark.parametrize("config", ["edu", "edu-noshare"])
async def test_vfio_user_trace_is_clean(qemu_configs: ConfigFile, config: str) -> None:
    run = await run_config(config, configs=qemu_configs, guest_env={"edu_steps": STEPS},
                           trace=True, timeout=120)
    assert_ok(run.guest)
    assert run.guest.trace_path is not None and run.guest.trace_path.exists()
    assert trace_commands(run.guest.trace_path), "trace is empty: was -trace applied?"
    problems = trace_problems(run.guest.trace_path, run.guest.stderr_path)
    assert not problems, "\n".join(problems[:30])

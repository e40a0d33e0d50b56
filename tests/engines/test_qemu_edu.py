"""A QEMU guest drives our edu served by the libvfio-user engine: same RESULT lines as with
the Python engine (and QEMU's built-in edu, whose expected values tests/integration holds).

The server is the real CLI, `python -m vfiouser_srv serve edu --engine libvfio-user`, started
here (the launcher's `serve_device` knows only the default engine) and handed to
`run_config(..., socket_path=...)`, which then boots the guest against it. Run QEMU tests
under `flock /tmp/vfiouser-qemu.lock` on shared hosts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from vfiouser_srv.qemu import is_provisioned, run_config
from vfiouser_srv.qemu.launcher import new_run_dir

from .conftest import libvfio_user_unavailable

STEPS = "ident,regs,fact,dma,irq"
RESET_STEPS = "ident,regs,reset,ident,fact,dma,irq"

_UNAVAILABLE = libvfio_user_unavailable()
_READY, _WHY = is_provisioned()

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.libvfio_user,
    pytest.mark.skipif(_UNAVAILABLE is not None, reason=_UNAVAILABLE or ""),
    pytest.mark.skipif(not _READY, reason=f"QEMU guest cache not provisioned ({_WHY})"),
]


@asynccontextmanager
async def libvfio_user_server(sock: Path, log_path: Path) -> AsyncIterator[None]:
    """`vfiouser-srv serve edu --engine libvfio-user` until the block ends (SIGTERM)."""
    argv = [
        sys.executable,
        "-m",
        "vfiouser_srv",
        "-v",
        "serve",
        "edu",
        "--engine",
        "libvfio-user",
        "--socket-path",
        os.fspath(sock),
    ]
    with open(log_path, "wb") as log:
        proc = await trio.lowlevel.open_process(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log
        )
        try:
            assert proc.stdout is not None
            line = b""
            with trio.fail_after(30):
                while not line.endswith(b"\n"):
                    chunk = await proc.stdout.receive_some(1)
                    if not chunk:
                        break
                    line += chunk
            assert line.decode().strip() == f"READY {sock}", log_path.read_text()
            yield
        finally:
            proc.terminate()
            with trio.move_on_after(10):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def _guest_results(config: str, steps: str, engine: str) -> list[str]:
    env = {"edu_steps": steps}
    if engine == "python":
        run = await run_config(config, guest_env=env, timeout=120)
    else:
        run_dir = await new_run_dir(f"{config}-libvfio-user")
        sock = run_dir / "vfu.sock"
        async with libvfio_user_server(sock, run_dir / "server.log"):
            run = await run_config(config, guest_env=env, timeout=120, socket_path=sock)
    res = run.guest
    assert res.ok, f"{engine}: {res.summary()}\n" + "\n".join(res.console[-25:])
    return res.result_lines


@pytest.mark.parametrize("steps", [STEPS, RESET_STEPS], ids=["basic", "reset"])
async def test_guest_edu_same_results_on_both_engines(steps: str) -> None:
    """Shared guest RAM (DMA through the mmap'd window), as QEMU is normally run."""
    ours = await _guest_results("edu", steps, "python")
    theirs = await _guest_results("edu", steps, "libvfio-user")
    assert theirs == ours
    assert "RESULT dma=ok" in theirs and "RESULT failed=0" in theirs

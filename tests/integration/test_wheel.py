"""The installed package works on its own: build the wheel, install it (not editable) into a
fresh venv, and run ``vfiouser-srv qemu setup`` and ``vfiouser-srv qemu run edu --demo`` from
a folder outside the checkout, with nothing of the checkout on the path.

What it guards: the QEMU configurations and guest scripts travel in the wheel as package data
(``vfiouser_srv/qemu/data/``, mapped from the top-level ``qemu-configs/`` by pyproject.toml),
and the launcher finds them there. The cache is the shared one (setup is warm after the
session's provisioning), so the cost is the build, the venv and one TCG boot.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.qemu

REPO = Path(__file__).resolve().parents[2]


def _run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float) -> str:
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, (
        f"{' '.join(argv)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
        f"\n--- stderr\n{proc.stderr[-4000:]}"
    )
    return proc.stdout


def test_installed_wheel_runs_the_demo(qemu_ready: None, tmp_path: Path) -> None:
    t0 = time.monotonic()
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VFIOUSER_SRV_QEMU_CONFIGS", "VIRTUAL_ENV")}
    dist, venv, elsewhere = tmp_path / "dist", tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()
    # hatchling comes with the test extra, so the build needs no isolated environment
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
          "-w", str(dist), str(REPO)], cwd=elsewhere, env=env, timeout=300)
    (wheel,) = dist.glob("vfiouser_srv-*.whl")
    _run([sys.executable, "-m", "venv", str(venv)], cwd=elsewhere, env=env, timeout=300)
    _run([str(venv / "bin/python"), "-m", "pip", "install", "-q", str(wheel)],
         cwd=elsewhere, env=env, timeout=600)
    built = time.monotonic() - t0

    # The installed copy is what runs, and its configurations are its own package data.
    where = _run([str(venv / "bin/python"), "-c",
                  "import vfiouser_srv.qemu.configs as c; print(c.__file__); "
                  "print(c.configs_dir())"], cwd=elsewhere, env=env, timeout=60).split()
    assert all(Path(p).is_relative_to(venv) for p in where), where
    assert (Path(where[1]) / "guest" / "edu-test.sh").is_file()

    exe = str(venv / "bin/vfiouser-srv")
    setup = _run([exe, "qemu", "setup"], cwd=elsewhere, env=env, timeout=900)
    assert "qemu:" in setup and "initrd:" in setup, setup
    demo = _run([exe, "qemu", "run", "edu", "--demo"], cwd=elsewhere, env=env, timeout=300)
    for line in ("RESULT dma=ok", "RESULT failed=0", "edu: ok"):
        assert line in demo, demo
    print(f"wheel test: build+install {built:.1f}s, total {time.monotonic() - t0:.1f}s")

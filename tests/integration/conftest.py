"""Fixtures for the QEMU integration tests.

Skip policy: the pytest plugin's (vfiouser_srv/pytest_plugin.py, ``vfu_qemu_ready``), the one
device authors get: outside CI (``CI`` unset) an unprovisioned cache skips the ``qemu`` tests
with the command to run; in CI (``CI=true``) the session provisions the cache itself and a
failure to do so fails the tests, so a broken CI image can never look green. Set
``VFIOUSER_SRV_AUTO_SETUP=1`` to provision automatically outside CI too.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio

from vfiouser_srv.pytest_plugin import in_ci
from vfiouser_srv.qemu import ConfigFile, RunResult, load_configs, run_config

__all__ = ["RefRunner", "in_ci"]


@pytest.fixture(scope="session")
def qemu_ready(vfu_qemu_ready: None) -> None:
    """The plugin's ``vfu_qemu_ready`` under the name these tests use."""


@pytest.fixture(scope="session")
def qemu_configs() -> ConfigFile:
    return load_configs()


RefRunner = Callable[[str, str], RunResult]


@pytest.fixture(scope="session")
def reference(qemu_ready: None, qemu_configs: ConfigFile) -> RefRunner:
    """``reference(config, steps)``: QEMU's built-in edu run once per session and cached.

    Sync on purpose: pytest-trio fixtures cannot be session-scoped, and the reference runs
    are shared by many tests (one QEMU at a time on our 2-core hosts).
    """
    cache: dict[tuple[str, str], RunResult] = {}

    def run(config: str, steps: str) -> RunResult:
        key = (config, steps)
        if key not in cache:
            res = trio.run(lambda: run_config(config, configs=qemu_configs,
                                              guest_env={"edu_steps": steps}, timeout=120))
            cache[key] = res.guest
        return cache[key]

    return run

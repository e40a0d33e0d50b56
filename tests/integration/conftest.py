"""Fixtures for the QEMU integration tests.

Skip policy: outside CI (``CI`` unset) an unprovisioned cache skips the ``qemu`` tests with the
command to run; in CI (``CI=true``) the session provisions the cache itself and a failure to
do so fails the tests, so a broken CI image can never look green. Set
``VFIOUSER_SRV_AUTO_SETUP=1`` to provision automatically outside CI too.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import trio

from vfiouser_srv.qemu import (
    ConfigFile,
    ProvisionError,
    RunResult,
    is_provisioned,
    load_configs,
    provision,
    run_config,
)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="session")
def qemu_ready() -> None:
    """Make sure QEMU and the guest are provisioned (see the module docstring)."""
    ready, reason = is_provisioned()
    if ready:
        return
    if in_ci() or os.environ.get("VFIOUSER_SRV_AUTO_SETUP") == "1":
        try:
            provision(log=lambda m: print(f"setup: {m}"))
        except ProvisionError as exc:
            pytest.fail(f"provisioning failed in CI: {exc}")
        ready, reason = is_provisioned()
        if not ready:
            pytest.fail(f"provisioned, yet not ready: {reason}")
        return
    pytest.skip(f"QEMU guest cache not provisioned ({reason}); run `make setup` or "
                "`python -m vfiouser_srv.qemu setup` (CI=true provisions automatically)")


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

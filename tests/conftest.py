"""Shared by every test folder: the engine marker (`python_engine_only`).

The hook lives here, once, so that a test folder run on its own gets the same deselection
as the whole suite.
"""

from __future__ import annotations

import pytest


def python_engine_only(reason: str) -> pytest.MarkDecorator:
    """Mark a test (or, in `pytestmark`, a module) as run on the Python engine only.

    `reason` is one line: the Python-engine internals it checks (`session_of`, container or
    IRQ tables, groups and ownership policies, the fast path), or the documented difference
    (`vfiouser_srv.engines.libvfio_user.BEHAVIOUR_DIFFERENCES` / `PARITY_DIFFERENCES`) that
    makes its expectation Python-only. In a module parametrized over engines its other
    engines' cases are deselected (see `pytest_collection_modifyitems`), and `engine` is
    "python" for it even under `VFIOUSER_TEST_ENGINE`.
    """
    return pytest.mark.python_engine_only(reason=reason)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the non-Python engine cases of `python_engine_only` tests."""
    keep: list[pytest.Item] = []
    drop: list[pytest.Item] = []
    for item in items:
        callspec = getattr(item, "callspec", None)
        engine = callspec.params.get("engine", "python") if callspec is not None else "python"
        if engine != "python" and item.get_closest_marker("python_engine_only") is not None:
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep

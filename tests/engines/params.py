"""Engine parametrization shared by tests/engines and tests/server.

`ENGINE_PARAMS` is "python" and "libvfio-user"; without the library the latter skips with one
reason, the engine's own `EngineUnavailable` message (what to install, which variable to
set). A test module opts in with `pytestmark = pytest.mark.parametrize("engine",
ENGINE_PARAMS)` over fixtures that take `engine` (tests/server's `server` does).
"""

from __future__ import annotations

import pytest

from vfiouser_srv.engines import EngineUnavailable, load_engine

ENGINES = ("python", "libvfio-user")


def libvfio_user_unavailable() -> str | None:
    """None if the libvfio-user engine loads here, else why not (the skip reason)."""
    try:
        load_engine("libvfio-user")
    except EngineUnavailable as exc:
        return f"libvfio-user engine unavailable: {exc}"
    return None


def engine_param(name: str) -> object:
    """A pytest param for `name`; the libvfio-user one skips (one reason) without the library."""
    if name == "python":
        return pytest.param(name, id=name)
    why = libvfio_user_unavailable()
    return pytest.param(
        name,
        id=name,
        marks=[pytest.mark.libvfio_user, pytest.mark.skipif(why is not None, reason=why or "")],
    )


#: every engine, for `@pytest.mark.parametrize("engine", ENGINE_PARAMS)` outside this package
ENGINE_PARAMS = [engine_param(e) for e in ENGINES]

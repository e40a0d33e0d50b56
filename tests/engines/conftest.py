"""Engine parametrization: the same tests against the Python engine and libvfio-user.

`engine` is "python" or "libvfio-user". Without the library every libvfio-user case skips
with one reason (the engine's own `EngineUnavailable` message, which says what to install or
which variable to set). Point the tests at a library with
`LIBVFIO_USER_PATH=/path/to/libvfio-user.so.0`.

`serve_edu(engine)` runs a `Server` with edu registered under that engine in the test's
nursery, exactly as `vfiouser-srv serve edu --engine ...` would.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from devices.edu import Edu
from devices.sdk.interface import DeviceModel
from vfiouser_srv.server import Server

from .params import ENGINE_PARAMS, ENGINES, engine_param, libvfio_user_unavailable


@pytest.fixture(params=ENGINE_PARAMS)
def engine(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


ServeEdu = Callable[..., Awaitable[tuple[Server, str]]]


@pytest.fixture
def serve_model(nursery: trio.Nursery, tmp_path: Path) -> ServeEdu:
    """`await serve_model(engine, model=None)` -> (server, socket path), serving."""

    async def serve(engine: str, model: DeviceModel | None = None) -> tuple[Server, str]:
        path = str(tmp_path / f"edu-{engine}.sock")
        srv = Server()
        srv.add_device("edu", model or Edu(), socket_path=path, engine=engine)
        await nursery.start(srv.serve)
        return srv, path

    return serve


__all__ = ["ENGINES", "ENGINE_PARAMS", "engine_param", "libvfio_user_unavailable"]

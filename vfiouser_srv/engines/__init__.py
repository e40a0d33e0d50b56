"""Engines that serve `devices/` models: the pure-Python one (`vfiouser_srv.session`) is
built in; others are loaded by name so that a missing C library only matters when asked for.
"""

from __future__ import annotations

from types import ModuleType


class EngineUnavailable(RuntimeError):
    """The engine cannot run here; the message says why and what to do."""


def load_engine(name: str) -> ModuleType:
    if name == "python":
        from .. import session

        return session
    if name == "libvfio-user":
        import importlib

        try:
            return importlib.import_module(f"{__name__}.libvfio_user")
        except ImportError as exc:
            raise EngineUnavailable(f"libvfio-user engine is not available: {exc}") from None
    raise EngineUnavailable(f"unknown engine {name!r}")

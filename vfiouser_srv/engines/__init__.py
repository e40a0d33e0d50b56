"""Engines that serve `devices/` models, loaded by name so that a missing C library only
matters when asked for. Each engine module exports `create_device` (`engines.contract`):
`python` (this package's own, `engines/python.py`) and `libvfio-user` (ctypes).
"""

from __future__ import annotations

from types import ModuleType


class EngineUnavailable(RuntimeError):
    """The engine cannot run here; the message says why and what to do."""


def load_engine(name: str) -> ModuleType:
    if name == "python":
        from . import python

        return python
    if name == "libvfio-user":
        import importlib

        try:
            return importlib.import_module(f"{__name__}.libvfio_user")
        except ImportError as exc:
            raise EngineUnavailable(f"libvfio-user engine is not available: {exc}") from None
    raise EngineUnavailable(f"unknown engine {name!r}")

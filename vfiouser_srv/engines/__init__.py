"""Engines that serve `devices/` models, loaded by name so that a missing C library only
matters when asked for. Each engine module exports `create_device` (the contract in
`vfiouser_srv.contract`): `python` (this package's own, `engines/python.py`) and
`libvfio-user` (the C library through ctypes, `engines/libvfio_user/`).

What the server must know about an engine before loading it is in `ENGINES`, so that a
configuration an engine cannot honour is refused with the real reason even where the
engine itself could not be loaded.

See docs/architecture.md, "Engines".
"""

from __future__ import annotations

import errno
import importlib
from dataclasses import dataclass
from types import ModuleType

from ..objects import ObjectError
from ..sockets import SocketAccess


class EngineUnavailable(RuntimeError):
    """The engine cannot run here; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class EngineInfo:
    module: str
    #: accepts connections itself and can refuse a peer before serving it (allow-lists)
    checks_peers: bool
    #: can serve an inherited socket (`--fd`)
    adopts_fds: bool


ENGINES: dict[str, EngineInfo] = {
    "python": EngineInfo(f"{__name__}.python", checks_peers=True, adopts_fds=True),
    # libvfio-user accepts and reads VERSION inside one library call and binds its own
    # socket (BEHAVIOUR_DIFFERENCES "allow-list" and "--fd")
    "libvfio-user": EngineInfo(f"{__name__}.libvfio_user", checks_peers=False, adopts_fds=False),
}


def check_endpoint(engine: str, name: str, fd: int | None, access: SocketAccess) -> None:
    """Refuse what `engine` cannot do, before it is loaded (`ObjectError`, EINVAL)."""
    info = ENGINES.get(engine)
    if info is None:
        raise EngineUnavailable(f"unknown engine {engine!r} (known: {', '.join(ENGINES)})")
    if fd is not None and not info.adopts_fds:
        raise ObjectError(
            errno.EINVAL, f"engine {engine!r} creates its own socket: give a path, not fd {fd}"
        )
    if access.restricted and not info.checks_peers:
        raise ObjectError(
            errno.EINVAL,
            f"device {name!r}: engine {engine!r} accepts connections itself, so "
            "allow_uids/allow_gids cannot be enforced; use the python engine or drop the "
            "allow-list (the socket mode and group still apply)",
        )


def load_engine(name: str) -> ModuleType:
    info = ENGINES.get(name)
    if info is None:
        raise EngineUnavailable(f"unknown engine {name!r} (known: {', '.join(ENGINES)})")
    try:
        return importlib.import_module(info.module)
    except ImportError as exc:
        raise EngineUnavailable(f"{name} engine is not available: {exc}") from None


__all__ = ["ENGINES", "EngineInfo", "EngineUnavailable", "check_endpoint", "load_engine"]

"""`create_device` for the libvfio-user engine: the library's socket under our access rules.

The library creates, binds and listens on its socket inside `vfu_create_ctx` and accepts
(and reads VERSION) inside one call, so two rules of docs/access.md need care here:

* mode and group: the context is created under a restrictive umask (owner bits of the
  configured mode only), then the file gets its group and mode, as the Python engine's
  sockets do;
* allow-lists cannot be enforced (a peer could only be checked after it was served), so a
  device with one is refused at start-up rather than served without it.
"""

from __future__ import annotations

import errno

from ...contract import Endpoint, EngineHost
from ...objects import Device, ObjectError
from ...sockets import apply_access, check_path, clear_stale, creation_umask
from ._engine import LibvfioUserDevice


def create_device(host: EngineHost, device: Device, endpoint: Endpoint) -> LibvfioUserDevice:
    name, path, access = device.name, endpoint.path, endpoint.access
    if path is None:
        raise ObjectError(
            errno.EINVAL,
            f"engine 'libvfio-user' creates its own socket: give a path, not fd {endpoint.fd}",
        )
    if access.restricted:
        raise ObjectError(
            errno.EINVAL,
            f"device {name!r}: engine 'libvfio-user' accepts connections itself, so "
            "allow_uids/allow_gids cannot be enforced; use the python engine or drop the "
            "allow-list (the socket mode and group still apply)",
        )
    check_path(path)
    clear_stale(path)
    try:
        with creation_umask(access.mode):
            served = LibvfioUserDevice(name, device.model, path)
    except ObjectError:
        raise
    except OSError as exc:  # EngineError: the library's errno and what it was doing
        raise ObjectError(
            exc.errno or errno.EINVAL,
            f"cannot serve {name!r} with libvfio-user on {path}: {exc.strerror or exc}",
        ) from None
    try:
        apply_access(path, access)
    except BaseException:
        served.close()  # unlinks the socket file too
        raise
    return served


__all__ = ["create_device"]

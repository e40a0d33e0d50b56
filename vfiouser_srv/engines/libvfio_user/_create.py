"""`create_device` for the libvfio-user engine: the library's socket under our access rules.

The library creates, binds and listens on its socket inside `vfu_create_ctx` and accepts
(and reads VERSION) inside one call, so two rules of docs/access.md need care here:

* mode and group: the context is created under a restrictive umask (owner bits of the
  configured mode only), then the file gets its group and mode, as the Python engine's
  sockets do;
* allow-lists cannot be enforced (a peer could only be checked after it was served), so a
  device with one is refused at start-up rather than served without it
  (`engines.check_endpoint`, which the server also calls before loading the library).
"""

from __future__ import annotations

import errno

from ...contract import Endpoint, EngineHost
from ...objects import Device, ObjectError
from ...sockets import apply_access, check_path, clear_stale, creation_umask
from .. import check_endpoint
from ._device import LibvfioUserDevice


def create_device(host: EngineHost, device: Device, endpoint: Endpoint) -> LibvfioUserDevice:
    name, path, access = device.name, endpoint.path, endpoint.access
    check_endpoint("libvfio-user", name, endpoint.fd, access)
    assert path is not None  # check_endpoint refused an fd
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

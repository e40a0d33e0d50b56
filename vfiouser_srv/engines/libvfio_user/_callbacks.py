"""The boundary between the library's C callbacks and Python, for one context.

A Python exception must never unwind into C, and a ctypes function object must outlive
every call the library may make to it, so each callback the device registers goes through
`Callbacks.wrap` (and `keep`):

* a model's `DeviceError`/`DmaError`/`OSError` becomes the callback's errno (logged as a
  warning), as `errors.fail` answers it in the Python engine (docs/architecture.md,
  "Errors");
* anything else is returned to C as EIO, stored, and re-raised by `raise_errors()` right
  after the library call returns; the device's connection loop then logs it with its
  traceback and keeps the connection, as the Python engine does for a model bug.
"""

from __future__ import annotations

import ctypes
import errno
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from devices.sdk.interface import DeviceError, DmaError

from ...errors import errno_of
from . import _bindings as b

log = logging.getLogger(__name__)
#: the library's own log lines (vfiouser_srv.engines.libvfio_user.lib)
lib_log = logging.getLogger(__name__.rsplit(".", 1)[0] + ".lib")

_SYSLOG_TO_LOGGING = {
    b.LOG_ERR: logging.ERROR,
    b.LOG_WARNING: logging.WARNING,
    b.LOG_NOTICE: logging.INFO,
    b.LOG_INFO: logging.INFO,
    b.LOG_DEBUG: logging.DEBUG,
}

T = TypeVar("T")


class Callbacks:
    """Wraps, keeps alive and collects the errors of one context's callbacks."""

    def __init__(self, name: str) -> None:
        self.name = name
        #: exceptions caught in callbacks, not yet re-raised (`raise_errors`)
        self.errors: list[BaseException] = []
        self._refs: list[Any] = []  # ctypes callbacks and arrays: must outlive the context

    def keep(self, obj: T) -> T:
        """Hold `obj` (a ctypes callback or an array the library keeps a pointer to) for
        the context's lifetime."""
        self._refs.append(obj)
        return obj

    def wrap(self, fn: Callable[..., Any], *, void: bool = False) -> Callable[..., Any]:
        """`fn` made safe to call from C: nothing escapes; errors become errno (see the
        module docstring). `void` callbacks return None, the others -1 on error."""

        def tramp(*args: Any) -> Any:
            try:
                return fn(*args)
            except (DeviceError, DmaError, OSError) as exc:
                err = errno_of(exc)
                log.warning(
                    "%s: %s failed: %s (errno %d)",
                    self.name,
                    getattr(fn, "__name__", "callback"),
                    exc,
                    err,
                )
            except BaseException as exc:
                err = errno.EIO
                self.errors.append(exc)
            ctypes.set_errno(err)
            return None if void else -1

        return tramp

    def raise_errors(self) -> None:
        """Re-raise what a callback caught, now that the C call has returned."""
        if not self.errors:
            return
        errors, self.errors = self.errors, []
        for extra in errors[1:]:
            log.error("%s: further callback error", self.name, exc_info=extra)
        raise errors[0]

    @staticmethod
    def log_level() -> int:
        """The syslog level to give `vfu_setup_log`: debug lines only when they are shown."""
        return b.LOG_DEBUG if lib_log.isEnabledFor(logging.DEBUG) else b.LOG_INFO

    def on_log(self, _ctx: int, level: int, msg: bytes | None) -> None:
        """The library's log callback: its lines go to the `...libvfio_user.lib` logger."""
        try:
            text = (msg or b"").decode(errors="replace")
            lib_log.log(_SYSLOG_TO_LOGGING.get(level, logging.DEBUG), "%s: %s", self.name, text)
        except BaseException as exc:  # a log line must never unwind into C
            self.errors.append(exc)


__all__ = ["Callbacks", "lib_log"]

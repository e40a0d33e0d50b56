"""ctypes bindings for the part of libvfio-user's API the engine uses.

Why ctypes and not a compiled extension: the library is in no package registry we can reach,
so the engine must work with whatever `libvfio-user.so.0` the host has (a distribution's
package, SPDK's build, a local build), found at run time. Every function used is declared
here with `argtypes`/`restype` and `use_errno=True`, so a wrong argument type fails in Python
instead of corrupting the C stack, and `ctypes.get_errno()` after a call is the call's errno.

No vfio-user wire struct crosses this boundary: the library decodes the wire itself and hands
us plain arguments (region index, offset, count, buffer). The only structs shared are
`struct iovec` and `vfu_dma_info_t`, declared below exactly as in `libvfio-user.h`. Index
numbers (regions, IRQs) are the VFIO ones that `devices.sdk.interface` already names.

The header has no run-time version query (`LIB_VFIO_USER_MAJOR/MINOR` are compile-time
macros), so the ABI check is by symbol: the library must export every function below. The
newest of them (`vfu_sgl_read`, `vfu_setup_irq_state_callback`, `vfu_device_quiesced`,
`dma_sg_size`) arrived with the 0.2 API (2023); an older library lacks them and is refused
with a message naming what is missing.

See docs/architecture.md, "Engines".
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    c_bool,
    c_char_p,
    c_int,
    c_int64,
    c_size_t,
    c_ssize_t,
    c_uint8,
    c_uint16,
    c_uint32,
    c_uint64,
    c_void_p,
)
from typing import Any

from .. import EngineUnavailable

#: environment variable naming the shared library (a path); else the system search path
LIBRARY_ENV = "LIBVFIO_USER_PATH"
#: what `ctypes.util.find_library` looks for
LIBRARY_NAME = "vfio-user"

# ----------------------------------------------------------------- constants (libvfio-user.h)

VFU_TRANS_SOCK = 0
VFU_DEV_TYPE_PCI = 0
LIBVFIO_USER_FLAG_ATTACH_NB = 1 << 0

VFU_REGION_FLAG_READ = 1 << 0
VFU_REGION_FLAG_WRITE = 1 << 1
VFU_REGION_FLAG_MEM = 1 << 2
VFU_REGION_FLAG_ALWAYS_CB = 1 << 3

VFU_RESET_DEVICE = 0
VFU_RESET_LOST_CONN = 1
VFU_RESET_PCI_FLR = 2

VFU_PCI_TYPE_CONVENTIONAL = 0
VFU_PCI_TYPE_EXPRESS = 3
PCI_HEADER_TYPE_NORMAL = 0

#: VFU_DEV_INTX_IRQ .. VFU_DEV_REQ_IRQ: the same numbers as VFIO's IRQ indices
VFU_DEV_NUM_IRQS = 5

# syslog(3) levels, which the library's log callback receives
LOG_ERR = 3
LOG_WARNING = 4
LOG_NOTICE = 5
LOG_INFO = 6
LOG_DEBUG = 7


class Iovec(Structure):
    """`struct iovec` (sys/uio.h)."""

    _fields_ = (("iov_base", c_void_p), ("iov_len", c_size_t))


class DmaInfo(Structure):
    """`vfu_dma_info_t`: one DMA region the client registered (vaddr NULL: no fd)."""

    _fields_ = (
        ("iova", Iovec),
        ("vaddr", c_void_p),
        ("mapping", Iovec),
        ("page_size", c_size_t),
        ("prot", c_uint32),
    )


class EngineError(OSError):
    """A libvfio-user call failed; carries the call's errno."""


def check(ret: int, what: str) -> int:
    """`ret` of a call that returns -1 and sets errno on failure; EngineError names `what`."""
    if ret < 0:
        err = ctypes.get_errno()
        raise EngineError(err, f"{what}: {os.strerror(err)}")
    return ret


# ----------------------------------------------------------------- callback types
# Pointers the library hands us (ctx, buffers) are c_void_p, never c_char_p: ctypes would turn
# a c_char_p argument into a bytes copy that stops at the first NUL.

LOG_CB = CFUNCTYPE(None, c_void_p, c_int, c_char_p, use_errno=True)
REGION_ACCESS_CB = CFUNCTYPE(
    c_ssize_t, c_void_p, c_void_p, c_size_t, c_int64, c_bool, use_errno=True
)
RESET_CB = CFUNCTYPE(c_int, c_void_p, c_int, use_errno=True)
QUIESCE_CB = CFUNCTYPE(c_int, c_void_p, use_errno=True)
DMA_CB = CFUNCTYPE(None, c_void_p, POINTER(DmaInfo), use_errno=True)
IRQ_STATE_CB = CFUNCTYPE(None, c_void_p, c_uint32, c_uint32, c_bool, use_errno=True)

# name -> (restype, argtypes)
_SIGNATURES: dict[str, tuple[Any, tuple[Any, ...]]] = {
    "dma_sg_size": (c_size_t, ()),
    "vfu_create_ctx": (c_void_p, (c_int, c_char_p, c_int, c_void_p, c_int)),
    "vfu_realize_ctx": (c_int, (c_void_p,)),
    "vfu_attach_ctx": (c_int, (c_void_p,)),
    "vfu_get_poll_fd": (c_int, (c_void_p,)),
    "vfu_run_ctx": (c_int, (c_void_p,)),
    "vfu_destroy_ctx": (None, (c_void_p,)),
    "vfu_setup_log": (c_int, (c_void_p, LOG_CB, c_int)),
    "vfu_setup_region": (
        c_int,
        (
            c_void_p,
            c_int,
            c_size_t,
            REGION_ACCESS_CB,
            c_int,
            POINTER(Iovec),
            c_uint32,
            c_int,
            c_uint64,
        ),
    ),
    "vfu_setup_device_reset_cb": (c_int, (c_void_p, RESET_CB)),
    "vfu_setup_device_quiesce_cb": (None, (c_void_p, QUIESCE_CB)),
    "vfu_device_quiesced": (c_int, (c_void_p, c_int)),
    "vfu_setup_device_dma": (c_int, (c_void_p, c_size_t, DMA_CB, DMA_CB)),
    "vfu_setup_device_nr_irqs": (c_int, (c_void_p, c_int, c_uint32)),
    "vfu_setup_irq_state_callback": (c_int, (c_void_p, c_int, IRQ_STATE_CB)),
    "vfu_irq_trigger": (c_int, (c_void_p, c_uint32)),
    "vfu_addr_to_sgl": (c_int, (c_void_p, c_void_p, c_size_t, c_void_p, c_size_t, c_int)),
    "vfu_sgl_read": (c_int, (c_void_p, c_void_p, c_size_t, c_void_p, c_int)),
    "vfu_sgl_write": (c_int, (c_void_p, c_void_p, c_size_t, c_void_p, c_int)),
    "vfu_pci_init": (c_int, (c_void_p, c_int, c_int, c_int)),
    "vfu_pci_set_id": (None, (c_void_p, c_uint16, c_uint16, c_uint16, c_uint16)),
    "vfu_pci_set_class": (None, (c_void_p, c_uint8, c_uint8, c_uint8)),
    "vfu_pci_get_config_space": (c_void_p, (c_void_p,)),
}

#: symbols whose absence means "too old" rather than "not libvfio-user at all"
_NEWER_API = ("vfu_sgl_read", "vfu_setup_irq_state_callback", "vfu_device_quiesced", "dma_sg_size")


def _locate() -> str:
    path = os.environ.get(LIBRARY_ENV)
    if path:
        if not os.path.exists(path):
            raise EngineUnavailable(f"{LIBRARY_ENV}={path}: no such file")
        return path
    found = ctypes.util.find_library(LIBRARY_NAME)
    if found is None:
        raise EngineUnavailable(
            "libvfio-user is not installed: no libvfio-user.so on the system library path; "
            f"install it (e.g. Fedora's libvfio-user package) or set {LIBRARY_ENV} to the "
            "path of libvfio-user.so.0"
        )
    return found


def open_library() -> ctypes.CDLL:
    """Load and type the library; EngineUnavailable says why when it cannot be used."""
    path = _locate()
    try:
        lib = ctypes.CDLL(path, use_errno=True)
    except OSError as exc:
        raise EngineUnavailable(f"cannot load libvfio-user from {path}: {exc}") from None
    missing = [name for name in _SIGNATURES if not hasattr(lib, name)]
    if missing:
        if "vfu_create_ctx" in missing:
            raise EngineUnavailable(f"{path} is not libvfio-user (no vfu_create_ctx)")
        too_old = [m for m in missing if m in _NEWER_API]
        why = "too old (need the 0.2 API, 2023 or newer)" if too_old else "incompatible"
        raise EngineUnavailable(f"libvfio-user at {path} is {why}: lacks {', '.join(missing)}")
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    lib._vfiouser_path = path  # type: ignore[attr-defined]  # for messages only
    return lib


_LIBRARY: ctypes.CDLL | None = None


def library() -> ctypes.CDLL:
    """The process-wide typed library (loaded on first use)."""
    global _LIBRARY
    if _LIBRARY is None:
        _LIBRARY = open_library()
    return _LIBRARY


__all__ = [
    "DMA_CB",
    "IRQ_STATE_CB",
    "LIBRARY_ENV",
    "LOG_CB",
    "QUIESCE_CB",
    "REGION_ACCESS_CB",
    "RESET_CB",
    "DmaInfo",
    "EngineError",
    "Iovec",
    "check",
    "library",
    "open_library",
]

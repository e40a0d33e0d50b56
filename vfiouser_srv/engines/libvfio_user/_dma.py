"""Guest memory for a model served by libvfio-user: the model's `DmaPort`.

The library checks DMA_MAP/DMA_UNMAP and mmaps the client's file itself, then reports each
window through its register/unregister callbacks (`vfu_dma_info_t`; `vaddr` is NULL for a
window without an fd). Those windows go into the Python engine's own window table
(`container.Container`), with a memoryview of the library's mapping as the window's `view`,
so finding a window, checking its permission, splitting an access across windows and
copying (`Container.spans`, `view`, `read`, `write`) is one piece of code for both engines.

What stays here, and why:

* Windows without an fd are served with `vfu_addr_to_sgl` + `vfu_sgl_read/write`: the
  library owns the socket, so the Python engine's `DmaRequests` cannot send on it. The call
  blocks until the client answers, so it runs in a worker thread under the device lock (the
  library is not thread-safe).
* Pins are counted for the whole device, not per window (`Container.pin`/`drain` are the
  Python engine's per-window wait at DMA_UNMAP): the library quiesces the whole device
  before any DMA_MAP or DMA_UNMAP, and the quiesce waits until no pin is left.
* There are no `file` windows (pread/pwrite): the library mmaps every window with an fd,
  whether its file can shrink or not (`BEHAVIOUR_DIFFERENCES`, "guest memory that shrinks").

See docs/architecture.md, "Engines".
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import mmap
import os
from collections.abc import Iterator
from typing import Protocol

import trio

from devices.sdk.interface import DmaError, DmaPort

from ...container import Container, DmaWindow
from . import _bindings as b

log = logging.getLogger(__name__)

#: DMA_MAP limit we give the library (the Python engine's default max_dma_maps)
MAX_DMA_REGIONS = 65535


class DmaHost(Protocol):
    """What DMA needs of the device that owns it (`LibvfioUserDevice`), declared here so that
    this module does not import the device's."""

    name: str
    lib: ctypes.CDLL
    lock: trio.Lock

    def ctx_for_dma(self) -> int:
        """The attached context; DmaError(ENOTCONN) once the client is gone."""
        ...

    def note_idle(self) -> None:
        """A pin was released: a waiting quiesce may go on."""
        ...


def window_of(info: b.DmaInfo) -> DmaWindow:
    """The table's window for what the library registered.

    The view covers the library's own mapping, which it unmaps only after the unregister
    callback, so the view is valid exactly as long as the window is in the table. It is
    read-only when the client did not grant write, as a PROT_READ `mmap` is in the Python
    engine: a model writing through it gets TypeError, not a fault.
    """
    address, size, vaddr = info.iova.iov_base or 0, info.iova.iov_len, info.vaddr or 0
    readable, writable = bool(info.prot & mmap.PROT_READ), bool(info.prot & mmap.PROT_WRITE)
    view: memoryview | None = None
    if vaddr:
        view = memoryview((ctypes.c_char * size).from_address(vaddr)).cast("B")
        if not writable:
            view = view.toreadonly()
    return DmaWindow(address, size, readable, writable, view=view)


class VfuDma(DmaPort):
    """The model's DmaPort (and `pin`): zero-copy through the library's mappings, the rest
    by DMA_READ/WRITE messages the library sends (see the module docstring)."""

    def __init__(self, host: DmaHost) -> None:
        self._host = host
        #: the client's windows, as the library registered them
        self.container = Container(max_maps=MAX_DMA_REGIONS)
        #: served message-mode transfers, for tests that check which path was taken
        self.messages = 0
        #: views handed out by `pin` and not yet released
        self.pins = 0

    # ------------------------------------------------------------ table (callbacks)

    def add(self, info: b.DmaInfo) -> None:
        w = self.container.add(window_of(info))
        log.debug("%s: DMA window %#x+%#x %s", self._host.name, w.address, w.size, w.mode)

    def remove(self, info: b.DmaInfo) -> None:
        # only the library calls this, for a window it registered: a miss is our bug
        self.container.take(info.iova.iov_base or 0, info.iova.iov_len).release()

    def clear(self) -> None:
        self.container.release_all()

    # ------------------------------------------------------------ DmaPort

    def view(self, address: int, size: int, *, write: bool = False) -> memoryview | None:
        return self.container.view(address, size, write=write)

    @contextlib.contextmanager
    def pin(self, address: int, size: int, *, write: bool = False) -> Iterator[memoryview | None]:
        """`view` that stays valid across awaits: while pinned, quiescing (which comes
        before any DMA_UNMAP) waits, so the library cannot unmap under the view."""
        view = self.view(address, size, write=write)
        if view is None:
            yield None
            return
        self.pins += 1
        try:
            yield view
        finally:
            with contextlib.suppress(BufferError):
                view.release()
            self.pins -= 1
            self._host.note_idle()

    async def read(self, address: int, size: int) -> bytes:
        return await self.container.read(address, size, self._read_message)

    async def write(self, address: int, data: bytes | bytearray | memoryview) -> None:
        await self.container.write(address, data, self._write_message)

    async def _read_message(self, w: DmaWindow, offset: int, size: int) -> bytes:
        return await self._message(False, w.address + offset, size, None)

    async def _write_message(self, w: DmaWindow, offset: int, data: memoryview) -> None:
        await self._message(True, w.address + offset, len(data), bytes(data))

    async def _message(self, write: bool, address: int, size: int, data: bytes | None) -> bytes:
        host = self._host
        lib = host.lib
        async with host.lock:
            ctx = host.ctx_for_dma()
            sgl = ctypes.create_string_buffer(lib.dma_sg_size())
            prot = mmap.PROT_WRITE if write else mmap.PROT_READ
            n = lib.vfu_addr_to_sgl(ctx, address, size, sgl, 1, prot)
            if n != 1:
                err = ctypes.get_errno() if n == -1 else errno.EFAULT
                raise DmaError(err or errno.EFAULT, f"DMA {address:#x}+{size:#x} not one window")
            buf = ctypes.create_string_buffer(data or b"", size)
            fn = lib.vfu_sgl_write if write else lib.vfu_sgl_read

            def transfer() -> tuple[int, int]:
                ret = fn(ctx, sgl, 1, buf, 0)
                return ret, ctypes.get_errno()

            # Blocks until the client answers: off the trio thread, still under the lock.
            ret, err = await trio.to_thread.run_sync(transfer)
            self.messages += 1
        if ret < 0:
            raise DmaError(
                err or errno.EIO,
                f"DMA_{'WRITE' if write else 'READ'} failed: {os.strerror(err or errno.EIO)}",
            )
        return b"" if write else buf.raw[:size]


__all__ = ["MAX_DMA_REGIONS", "DmaHost", "VfuDma", "window_of"]

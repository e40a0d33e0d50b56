"""One device served by libvfio-user: the C library speaks the protocol, our model answers.

Concepts
    *Context.* One `vfu_ctx_t` per device, created in non-blocking attach mode; it listens on
    the socket path from construction (QEMU must find it listening) until `close()`. The
    library serves one client at a time; after a client leaves we attach the next one.

    *Threads.* Everything that touches the context runs on the trio thread, except two
    blocking calls: `vfu_attach_ctx` (accepts, then reads the client's VERSION with a
    blocking `recv`) and message-mode DMA (`vfu_sgl_read/write` send a DMA_READ/WRITE and
    block until the client answers). Both run in a worker thread while `lock` is held, so
    no other call enters the library meanwhile (it is not thread-safe). Callbacks fire on
    whichever thread is inside the library; the ones that can fire on a worker thread
    (lost connection, DMA unregister) only touch plain Python state.

    *Quiescence.* The library asks the device to quiesce before DMA_MAP, DMA_UNMAP, reset
    and a lost connection. With no device task running we are quiesced at once: callbacks
    run on the trio thread, so no task is between checkpoints, and a `DmaPort.view` is valid
    only until the next checkpoint anyway. With tasks running we answer EBUSY, give them
    `QUIESCE_GRACE` seconds to finish, cancel the rest (a model expects that: the device
    interface, devices/sdk/interface.py, has the engine cancel its tasks on reset, on
    disconnect and before a window they may use is unmapped) and then call
    `vfu_device_quiesced`, which runs the waiting command.

    *Deadlock rule* (docs/architecture.md, "Deadlock rule"). Region callbacks are
    synchronous and never wait for the client; message-mode DMA runs only in device tasks,
    never in a callback.

Errors
    Every callback goes through `Callbacks.wrap` (`_callbacks`): a model's error is the
    errno of the reply; anything else is EIO, re-raised after the library call returns, and
    the connection loop logs it with its traceback and counts it in `callback_errors`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import socket
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from devices.sdk.interface import (
    NUM_PCI_IRQS,
    DeviceContext,
    DeviceError,
    DeviceModel,
    DmaError,
    DmaPort,
    IrqIndex,
    IrqPort,
    RegionIndex,
    RegionSpec,
)

from ...idlewait import IdleWaiter
from ...tasks import TaskGroup
from . import _bindings as b
from ._bindings import EngineError
from ._callbacks import Callbacks
from ._dma import MAX_DMA_REGIONS, VfuDma
from ._irq import VfuIrq

log = logging.getLogger(__name__)

#: how long quiescing waits for device tasks to finish before cancelling them (the Python
#: engine's unmap drain uses the same)
QUIESCE_GRACE = 1.0
#: how often a cancelled attach retries shutting down the connection being negotiated
ABORT_RETRY = 0.01
#: PCI config space sizes: conventional and extended
CFG_SIZE = 256
CFG_EXP_SIZE = 4096
#: the bits of a BAR register that say "I/O space"
BAR_IO_SPACE = 0x1
BAR0_OFFSET = 0x10


class LibvfioUserDevice(DeviceContext):
    """A `devices/` model served by libvfio-user on `socket_path`; also its DeviceContext.

    Resource handling: the constructor creates, sets up and realizes the context, so the
    socket listens when it returns; `close()` destroys it (the library unlinks nothing: we
    do). Its `Callbacks` keep the C callbacks alive for the context's whole lifetime. `serve()`
    runs in the server's nursery and owns each client's task group.
    """

    def __init__(self, name: str, model: DeviceModel, socket_path: str) -> None:
        self.name = name
        self.model = model
        self.socket_path = socket_path
        self.lib = b.library()
        self.lock = trio.Lock()
        self.tasks = TaskGroup(f"{name}(libvfio-user)")
        self.attached = False
        self.callback_errors = 0
        self.clients = 0
        self._dma = VfuDma(self)
        self._irq = VfuIrq(self, model.irqs())
        self._regions: dict[int, RegionSpec] = {r.index: r for r in model.regions() if r.size}
        self._cb = Callbacks(name)
        self._active = 0
        self._idle = trio.Event()
        self._quiesce_done: trio.Event | None = None
        self._nursery: trio.Nursery | None = None
        self._trio_thread: int | None = None
        self._listen_fd = -1
        self._ctx: int | None = None
        self._ctx = self._create()

    # ------------------------------------------------------------ DeviceContext

    @property
    def dma(self) -> DmaPort:
        return self._dma

    @property
    def irq(self) -> IrqPort:
        return self._irq

    def start_task(self, fn: Callable[..., Awaitable[Any]], *args: Any, name: str = "") -> None:
        self.tasks.start_soon(self._counted, fn, *args, name=name or getattr(fn, "__name__", ""))

    async def _counted(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        self._active += 1
        try:
            await fn(*args)
        finally:
            self._active -= 1
            self.note_idle()

    def note_idle(self) -> None:
        """A task ended or a pin was released: wake a waiting quiesce if nothing is left."""
        if not self._active and not self._dma.pins:
            self._idle.set()

    def ctx_or_none(self) -> int | None:
        return self._ctx if self.attached else None

    def ctx_for_dma(self) -> int:
        if self._ctx is None or not self.attached:
            raise DmaError(errno.ENOTCONN, "client is gone")
        return self._ctx

    # ------------------------------------------------------------ setup

    def _create(self) -> int:
        lib = self.lib
        ctx = lib.vfu_create_ctx(
            b.VFU_TRANS_SOCK,
            os.fsencode(self.socket_path),
            b.LIBVFIO_USER_FLAG_ATTACH_NB,
            None,
            b.VFU_DEV_TYPE_PCI,
        )
        if not ctx:
            err = ctypes.get_errno()
            raise EngineError(err, f"vfu_create_ctx({self.socket_path}): {os.strerror(err)}")
        try:
            self._setup(ctx)
            b.check(lib.vfu_realize_ctx(ctx), "vfu_realize_ctx")
            self._listen_fd = os.dup(b.check(lib.vfu_get_poll_fd(ctx), "vfu_get_poll_fd"))
        except BaseException:
            lib.vfu_destroy_ctx(ctx)
            with contextlib.suppress(OSError):
                os.unlink(self.socket_path)
            raise
        self._cb.raise_errors()
        return int(ctx)

    def _setup(self, ctx: int) -> None:
        lib = self.lib
        log_cb = self._cb.keep(b.LOG_CB(self._cb.on_log))
        b.check(lib.vfu_setup_log(ctx, log_cb, self._cb.log_level()), "vfu_setup_log")
        cfg = self._regions.get(RegionIndex.CONFIG)
        if cfg is None or cfg.size not in (CFG_SIZE, CFG_EXP_SIZE):
            raise EngineError(errno.EINVAL, f"{self.name}: region 7 must be 256 or 4096 bytes")
        pci_type = (
            b.VFU_PCI_TYPE_EXPRESS if cfg.size == CFG_EXP_SIZE else (b.VFU_PCI_TYPE_CONVENTIONAL)
        )
        b.check(lib.vfu_pci_init(ctx, pci_type, b.PCI_HEADER_TYPE_NORMAL, 0), "vfu_pci_init")
        header = self.model.region_read(RegionIndex.CONFIG, 0, 64)
        # The model's config space is authoritative (ALWAYS_CB below); the library's copy is
        # seeded with the same header only so that its own logs and checks agree.

        def u16(off: int) -> int:
            return int.from_bytes(header[off : off + 2], "little")

        lib.vfu_pci_set_id(ctx, u16(0x00), u16(0x02), u16(0x2C), u16(0x2E))
        lib.vfu_pci_set_class(ctx, header[0x0B], header[0x0A], header[0x09])
        for _, spec in sorted(self._regions.items()):
            self._setup_region(ctx, spec, header)
        for index in range(NUM_PCI_IRQS):
            count = self._irq.lines[index].spec.count
            b.check(lib.vfu_setup_device_nr_irqs(ctx, index, count), f"nr_irqs({index})")
            if index in (IrqIndex.INTX, IrqIndex.MSI, IrqIndex.MSIX) and count:
                cb = self._cb.keep(b.IRQ_STATE_CB(self._cb.wrap(self._irq_state_for(index))))
                b.check(lib.vfu_setup_irq_state_callback(ctx, index, cb), "irq_state_cb")
        b.check(
            lib.vfu_setup_device_dma(
                ctx,
                MAX_DMA_REGIONS,
                self._cb.keep(b.DMA_CB(self._cb.wrap(self._on_dma_register, void=True))),
                self._cb.keep(b.DMA_CB(self._cb.wrap(self._on_dma_unregister, void=True))),
            ),
            "vfu_setup_device_dma",
        )
        b.check(
            lib.vfu_setup_device_reset_cb(
                ctx, self._cb.keep(b.RESET_CB(self._cb.wrap(self._on_reset)))
            ),
            "vfu_setup_device_reset_cb",
        )
        lib.vfu_setup_device_quiesce_cb(ctx, self._cb.keep(b.QUIESCE_CB(self._on_quiesce)))

    def _setup_region(self, ctx: int, spec: RegionSpec, header: bytes) -> None:
        flags = (b.VFU_REGION_FLAG_READ if spec.readable else 0) | (
            b.VFU_REGION_FLAG_WRITE if spec.writable else 0
        )
        if not flags:
            log.warning(
                "%s: region %d is neither readable nor writable; not offered", self.name, spec.index
            )
            return
        if spec.index == RegionIndex.CONFIG:
            flags = b.VFU_REGION_FLAG_READ | b.VFU_REGION_FLAG_WRITE | b.VFU_REGION_FLAG_ALWAYS_CB
        elif spec.index <= RegionIndex.BAR5:
            bar = int.from_bytes(header[BAR0_OFFSET + 4 * spec.index :][:4], "little")
            if not bar & BAR_IO_SPACE:
                flags |= b.VFU_REGION_FLAG_MEM
        elif spec.index == RegionIndex.ROM:
            flags |= b.VFU_REGION_FLAG_MEM
        cb = self._cb.keep(b.REGION_ACCESS_CB(self._cb.wrap(self._region_cb_for(spec))))
        areas = None
        nr = 0
        if spec.fd is not None and spec.mmap_areas:
            nr = len(spec.mmap_areas)
            arr = (b.Iovec * nr)(*(b.Iovec(a.offset, a.size) for a in spec.mmap_areas))
            areas = self._cb.keep(arr)
        fd = spec.fd if spec.fd is not None else -1
        b.check(
            self.lib.vfu_setup_region(
                ctx,
                spec.index,
                spec.size,
                cb,
                flags,
                areas,
                nr,
                fd,
                spec.fd_offset if spec.fd is not None else 0,
            ),
            f"vfu_setup_region({spec.index})",
        )

    # ------------------------------------------------------------ callbacks (wrapped)

    def _region_cb_for(self, spec: RegionSpec) -> Callable[..., int]:
        index, size, model = spec.index, spec.size, self.model

        def region_access(_ctx: int, buf: int, count: int, offset: int, is_write: bool) -> int:
            if offset < 0 or offset + count > size:
                raise DeviceError(errno.EINVAL, f"region {index}: {offset:#x}+{count} past end")
            if is_write:
                if not spec.writable:
                    raise DeviceError(errno.EINVAL, f"region {index} is not writable")
                model.region_write(index, offset, ctypes.string_at(buf, count))
            else:
                if not spec.readable:
                    raise DeviceError(errno.EINVAL, f"region {index} is not readable")
                data = model.region_read(index, offset, count)
                if len(data) != count:
                    raise DeviceError(errno.EIO, f"model returned {len(data)} bytes for {count}")
                ctypes.memmove(buf, data, count)
            return count

        region_access.__name__ = f"region{index}_access"
        return region_access

    def _irq_state_for(self, index: int) -> Callable[..., None]:
        def irq_state(_ctx: int, start: int, count: int, mask: bool) -> None:
            for _, v in self._irq.set_masked(index, range(start, start + count), mask):
                self.model.irq_unmasked(index, v)

        irq_state.__name__ = f"irq{index}_state"
        return irq_state

    def _on_dma_register(self, _ctx: int, info: Any) -> None:
        self._dma.add(info.contents)

    def _on_dma_unregister(self, _ctx: int, info: Any) -> None:
        self._dma.remove(info.contents)

    def _on_reset(self, _ctx: int, kind: int) -> int:
        if kind == b.VFU_RESET_LOST_CONN:
            log.info("%s: client connection lost", self.name)
            return 0
        if not self.model.supports_reset:
            raise DeviceError(errno.EINVAL, "device does not support reset")
        # quiesce ran first (DEVICE_RESET needs it): no device task is left
        self.model.reset()
        return 0

    def _on_quiesce(self, _ctx: int) -> int:
        try:
            busy = self._active or self._dma.pins
            if not busy or threading.get_ident() != self._trio_thread:
                return 0  # see "Quiescence" in the module docstring
            if self._nursery is None:
                return 0
            self._quiesce_done = trio.Event()
            self._nursery.start_soon(self._quiesce, self._quiesce_done)
            ctypes.set_errno(errno.EBUSY)
            return -1
        except BaseException as exc:
            self._cb.errors.append(exc)
            ctypes.set_errno(errno.EIO)
            return -1

    async def _quiesce(self, done: trio.Event) -> None:
        try:
            with trio.move_on_after(QUIESCE_GRACE):
                while self._active or self._dma.pins:
                    self._idle = trio.Event()
                    await self._idle.wait()
            if self._active:
                log.info("%s: cancelling %d device task(s) to quiesce", self.name, self._active)
                await self.tasks.cancel_all()
            # The run loop holds the lock and waits for `done`: nobody else is in the library.
            assert self._ctx is not None
            ret = self.lib.vfu_device_quiesced(self._ctx, 0)
            if ret < 0:
                log.warning(
                    "%s: vfu_device_quiesced: %s", self.name, os.strerror(ctypes.get_errno())
                )
        finally:
            done.set()

    # ------------------------------------------------------------ serving

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve clients one after another until cancelled."""
        self._trio_thread = threading.get_ident()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                # closed (e.g. hot removed before this task first ran): nothing to serve
                while self._ctx is not None:
                    if not await self._attach(nursery):
                        continue
                    try:
                        await self._serve_client()
                    finally:
                        with trio.CancelScope(shield=True):
                            await self._detach()
            finally:
                self._nursery = None
                nursery.cancel_scope.cancel()

    async def _attach(self, nursery: trio.Nursery) -> bool:
        await trio.lowlevel.wait_readable(self._listen_fd)
        async with self.lock:
            ret, err = await self._attach_in_thread()
            self._cb.raise_errors()
        if ret < 0:
            if err not in (errno.EAGAIN, errno.EWOULDBLOCK):
                log.warning("%s: attach failed: %s", self.name, os.strerror(err))
            return False
        # one task group per client, as the Python engine's sessions (closed at detach)
        self.tasks = TaskGroup(f"{self.name}(libvfio-user)")
        await nursery.start(self.tasks.run)
        self.attached = True
        self.clients += 1
        self._irq.close()
        self.model.attach(self)
        log.info("%s: client attached (libvfio-user)", self.name)
        return True

    async def _attach_in_thread(self) -> tuple[int, int]:
        """`vfu_attach_ctx` accepts, then blocks reading VERSION: run it in a thread.

        A thread cannot be cancelled, so if we are cancelled meanwhile (shutdown while a
        client connected but sent nothing) the half-open connection is shut down, which
        makes the library's `recv` return and the thread finish.
        """
        assert self._ctx is not None
        ctx, lib = self._ctx, self.lib
        finished = False

        def attach() -> tuple[int, int]:
            ret = lib.vfu_attach_ctx(ctx)
            return ret, ctypes.get_errno()

        async def watchdog() -> None:
            try:
                await trio.sleep_forever()
            finally:
                # The thread may not have accepted yet (then there is no connection to shut
                # down, and it would then block reading VERSION): retry until it returns.
                with trio.CancelScope(shield=True):
                    while not finished:
                        self._abort_negotiation()
                        await trio.sleep(ABORT_RETRY)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watchdog)
            try:
                result = await trio.to_thread.run_sync(attach)
            finally:
                finished = True
                nursery.cancel_scope.cancel()
        return result

    def _abort_negotiation(self) -> None:
        assert self._ctx is not None
        fd = self.lib.vfu_get_poll_fd(self._ctx)
        if fd < 0 or fd == self._listen_fd:
            return
        with contextlib.suppress(OSError):
            dup = os.dup(fd)
            with socket.socket(fileno=dup) as s:
                s.shutdown(socket.SHUT_RDWR)

    async def _serve_client(self) -> None:
        assert self._ctx is not None
        # The poll fd changes at attach; wait on our own duplicate so that the library
        # closing its descriptor can never leave trio watching a recycled number.
        wait_fd = os.dup(b.check(self.lib.vfu_get_poll_fd(self._ctx), "vfu_get_poll_fd"))
        # one poll() instead of a scheduler round while trio is idle (see idlewait)
        waiter = IdleWaiter(wait_fd)
        try:
            while True:
                await waiter.wait()
                async with self.lock:
                    try:
                        if not await self._drain():
                            return
                    except EngineError:
                        raise
                    except Exception:
                        self.callback_errors += 1
                        log.exception("%s: error in a device callback", self.name)
        finally:
            trio.lowlevel.notify_closing(wait_fd)
            os.close(wait_fd)

    async def _drain(self) -> bool:
        """Run the context until the socket is empty; False once the client is gone."""
        assert self._ctx is not None
        while True:
            ret = self.lib.vfu_run_ctx(self._ctx)
            err = ctypes.get_errno() if ret < 0 else 0
            self._cb.raise_errors()
            if ret > 0:
                continue
            if ret == 0:
                return True
            if err == errno.EBUSY and self._quiesce_done is not None:
                await self._quiesce_done.wait()
                self._quiesce_done = None
                self._cb.raise_errors()
                continue
            if err == errno.ENOTCONN:
                log.info("%s: client left", self.name)
                return False
            raise EngineError(err, f"vfu_run_ctx: {os.strerror(err)}")

    async def _detach(self) -> None:
        if not self.attached:
            return
        # Closed, not restarted: at shutdown the group's own task is cancelled with us and
        # would never start again, so `cancel_all` (which waits for that) would hang.
        await self.tasks.close()
        self.attached = False
        self._dma.clear()
        self._irq.close()
        try:
            self.model.detach()
        except Exception:
            log.exception("%s: model detach failed", self.name)
        log.info("%s: detached", self.name)

    def stop_accepting(self) -> None:
        """Hot remove: unlink the socket file so that no new client finds the device; the
        library keeps serving the current one until the server cancels `serve`."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)

    def close(self) -> None:
        """Destroy the context (the current client, if any, is disconnected)."""
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            self.attached = False
            self.lib.vfu_destroy_ctx(ctx)
        if self._listen_fd >= 0:
            with contextlib.suppress(RuntimeError):
                trio.lowlevel.notify_closing(self._listen_fd)
            os.close(self._listen_fd)
            self._listen_fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        try:
            self._cb.raise_errors()
        except Exception:
            log.exception("%s: error in a callback during destroy", self.name)


__all__ = ["QUIESCE_GRACE", "LibvfioUserDevice"]

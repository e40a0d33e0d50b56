"""The contract between an engine (pure Python or libvfio-user) and a device model.

Both engines serve the same `DeviceModel` objects through this interface and nothing else, so
a model never learns which engine serves it, and an engine never learns device specifics.

Rules the interface encodes, and why:

* Region access is **synchronous**: `region_read` / `region_write` return at once. The
  libvfio-user engine calls them from a C callback that cannot await, and QEMU holds its big
  lock while a vCPU waits for the reply, so a handler must never wait for the client (a
  handler that needs a DMA reply from QEMU would deadlock it). Long work is started with
  `DeviceContext.start_task` and runs after the reply has gone out.
* DMA goes through `DeviceContext.dma`. Windows backed by a file descriptor are mmap'd and
  give zero-copy memoryviews; windows without one are served with DMA_READ/DMA_WRITE
  messages, hence the async `read`/`write`.
* Interrupts go through `DeviceContext.irq`; the engine owns eventfds, masks and pending bits.
* Tasks started through the context are cancelled by the engine on reset, on disconnect and
  before a DMA window they might use is unmapped, so no task outlives its mappings.
"""

from __future__ import annotations

import contextlib
import enum
import errno
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, cast, runtime_checkable


class RegionIndex(enum.IntEnum):
    """VFIO PCI region indices (linux/vfio.h VFIO_PCI_*_REGION_INDEX)."""

    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


class IrqIndex(enum.IntEnum):
    """VFIO PCI IRQ indices (linux/vfio.h VFIO_PCI_*_IRQ_INDEX)."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


#: Number of regions and IRQ indices every PCI device reports (QEMU needs >= 9 and >= 5).
NUM_PCI_REGIONS = 9
NUM_PCI_IRQS = 5


class DeviceError(Exception):
    """Raised by a model to fail a request with a specific errno (e.g. EINVAL, EIO)."""

    def __init__(self, errno: int, message: str = "") -> None:
        super().__init__(message or f"device error errno={errno}")
        self.errno = errno


class StateError(DeviceError):
    """A device state that cannot be loaded (foreign, corrupt, truncated, another version,
    another configuration); the message says what and where. The device is untouched."""

    def __init__(self, message_or_errno: str | int, message: str = "") -> None:
        # StateError("why") or, like DeviceError, StateError(errno.EINVAL, "why")
        if isinstance(message_or_errno, str):
            super().__init__(errno.EINVAL, message_or_errno)
        else:
            super().__init__(message_or_errno, message)


@dataclass(frozen=True)
class MmapArea:
    """A sub-range of a region that the client may mmap (sparse mmap capability)."""

    offset: int
    size: int


@dataclass(frozen=True)
class RegionSpec:
    """What GET_REGION_INFO reports for one region index.

    `fd` is a file descriptor the model owns (usually a memfd) that backs the region for
    mmap; `fd_offset` is where the region starts in that file. When `fd` is set and
    `mmap_areas` is empty the whole region is mmap-able. Regions of size 0 do not exist.
    """

    index: int
    size: int
    readable: bool = True
    writable: bool = True
    fd: int | None = None
    fd_offset: int = 0
    mmap_areas: tuple[MmapArea, ...] = ()

    @property
    def mmappable(self) -> bool:
        return self.fd is not None


@dataclass(frozen=True)
class IrqSpec:
    """What GET_IRQ_INFO reports for one IRQ index. count 0 means the index is unused."""

    index: int
    count: int
    maskable: bool = True
    automasked: bool = False
    noresize: bool = False


class DmaError(Exception):
    """A DMA access hit an unmapped, unpermitted or vanished window."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno


class DmaPort(Protocol):
    """The device's view of the client's DMA address space (an IOVA space)."""

    def view(self, address: int, size: int, *, write: bool = False) -> memoryview | None:
        """Zero-copy view of [address, address+size) if it lies in one mmap'd window.

        Returns None when the range is mapped but has no fd (message mode) or spans windows;
        raises DmaError when it is not mapped or the permission is missing. The view is only
        valid until the next checkpoint (an unmap may follow); copy out before awaiting.
        """
        ...

    async def read(self, address: int, size: int) -> bytes:
        """Read guest memory: mmap'd windows directly, otherwise DMA_READ messages."""
        ...

    async def write(self, address: int, data: bytes | bytearray | memoryview) -> None:
        """Write guest memory: mmap'd windows directly, otherwise DMA_WRITE messages."""
        ...


@runtime_checkable
class PinningDmaPort(Protocol):
    """A `DmaPort` that can also keep a zero-copy view valid across awaits.

    Optional on purpose: an engine without it still works, `pinned_view` then returns None
    and the model copies instead.
    """

    def pin(
        self, address: int, size: int, *, write: bool = False
    ) -> contextlib.AbstractContextManager[memoryview | None]:
        """Like `view`, but the view stays valid until the context exits, across awaits
        (e.g. a file read in a worker thread straight into guest memory): an unmap of its
        window waits for the pin to go (vfiouser_srv/container.py; if the pin outlives the
        engine's patience the engine cancels the device's tasks instead, which releases it)."""
        ...


def pinned_views(
    dma: DmaPort, ranges: Sequence[tuple[int, int]], *, write: bool = False
) -> contextlib.AbstractContextManager[list[memoryview] | None]:
    """Zero-copy views of many (address, size) ranges, all valid across awaits, or None
    when any range is not in one mmap'd window (or the engine cannot pin): then copy.

    For scatter-gather I/O (a PRP or descriptor list of a hundred pages) this pins each
    window once instead of once per range, which is what makes it cheap. Engines offer it
    as `pin_ranges(ranges, write=...)`; looked up by name so the check costs nothing, and
    its context manager is handed over as it is (wrapping it in another generator was a
    few microseconds per transfer).
    """
    pin_ranges = getattr(dma, "pin_ranges", None)
    if pin_ranges is not None:
        return cast("contextlib.AbstractContextManager[list[memoryview] | None]",
                    pin_ranges(ranges, write=write))
    return _pinned_one_by_one(dma, ranges, write)


@contextlib.contextmanager
def _pinned_one_by_one(
    dma: DmaPort, ranges: Sequence[tuple[int, int]], write: bool
) -> Iterator[list[memoryview] | None]:
    """`pinned_views` for an engine without `pin_ranges`: a pin per range, if it can pin."""
    if not isinstance(dma, PinningDmaPort):
        yield None
        return
    with contextlib.ExitStack() as pins:  # an engine with only `pin`: one pin per range
        out: list[memoryview] = []
        for address, size in ranges:
            view = pins.enter_context(dma.pin(address, size, write=write))
            if view is None:
                break
            out.append(view)
        else:
            yield out
            return
    yield None


@contextlib.contextmanager
def pinned_view(
    dma: DmaPort, address: int, size: int, *, write: bool = False
) -> Iterator[memoryview | None]:
    """`dma.pin(...)` when the engine supports pinning, else None (the caller copies)."""
    if isinstance(dma, PinningDmaPort):
        with dma.pin(address, size, write=write) as view:
            yield view
    else:
        yield None


class IrqPort(Protocol):
    """Raise interrupts. The engine decides eventfd vs pending bit from the client's setup."""

    def trigger(self, index: int, vector: int = 0) -> bool:
        """Signal an edge interrupt (MSI, MSI-X, ERR, REQ). Returns True if delivered now,
        False if it was masked (pending bit set) or no eventfd is assigned."""
        ...

    def set_intx(self, level: bool) -> None:
        """Drive the INTx line. Asserting signals the INTx eventfd (the client then masks
        INTx until it unmasks); while the line stays asserted an unmask re-signals."""
        ...

    def pending(self, index: int, vector: int) -> bool:
        """Pending bit of a masked vector (what an MSI-X PBA read reports)."""
        ...

    def enabled(self, index: int) -> bool:
        """True if the client has assigned at least one eventfd for this index."""
        ...

    # optional (looked up with getattr, as `pin_ranges`): an engine whose library owns the
    # eventfds (libvfio-user) answers None or has none, and its models keep raising on the
    # trio thread
    # def thread_signal(self, index: int, vector: int) -> ThreadIrq | None:
    #     """A `ThreadIrq` for one unmasked vector with an eventfd, else None."""


class ThreadIrq(Protocol):
    """One vector's interrupt, raisable from a worker thread (`IrqPort.thread_signal`).

    Why: handing a finished I/O back to the trio thread only to raise its interrupt cost a
    thread wake-up and a GIL hand-over on the guest's latency (~70-170 µs measured per
    write); a backend thread that also posts the completion raises the interrupt itself.
    The engine gives the thread its own copy of the eventfd (a dup), so SET_IRQS closing
    the client's descriptor meanwhile cannot make the thread write into a reused fd number.
    """

    def fire(self) -> None:
        """Raise the vector (any thread; at most once)."""
        ...

    def settle(self) -> bool:
        """On the trio thread, once the thread is back: let go of the copy; True when the
        vector's route (eventfd, mask) did not change since `thread_signal`, so the signal
        the thread sent was the right one; False when the caller must raise the vector
        again through `trigger` (a spurious interrupt is harmless, a lost one is not)."""
        ...


class DeviceContext(Protocol):
    """What an engine gives a model while a client is attached."""

    @property
    def dma(self) -> DmaPort: ...

    @property
    def irq(self) -> IrqPort: ...

    def start_task(self, fn: Callable[..., Awaitable[Any]], *args: Any, name: str = "") -> None:
        """Run `fn(*args)` in the connection's task group (called from sync handlers)."""
        ...

    def report_failure(self, reason: str) -> None:
        """The device's backend failed (EIO from its file, its TAP gone): the engine marks
        the device unhealthy, as VFIO does on a hardware error. Call from the trio thread.
        The default does nothing, so an engine without health still runs the model."""
        return None


@dataclass(frozen=True)
class OptionSpec:
    """One `--set KEY=VALUE` option a model accepts (listed by `vfiouser-srv devices`)."""

    name: str
    type: type
    default: Any
    help: str
    #: old names still accepted, with a deprecation warning (devices/sdk/options.py)
    aliases: tuple[str, ...] = ()


class DeviceModel:
    """Base class of every device model served over vfio-user.

    Subclasses normally derive from `devices.sdk.pci.PciDevice`, which implements all of
    this from declarations. Device *state* lives here and survives disconnects; session
    state (eventfds, DMA windows) lives in the engine.
    """

    #: name used on the command line (`vfiouser-srv serve NAME`)
    name: ClassVar[str] = ""
    #: one-line description for `vfiouser-srv devices`
    description: ClassVar[str] = ""
    #: accepted `--set` options
    options: ClassVar[tuple[OptionSpec, ...]] = ()
    #: whether DEVICE_GET_INFO advertises VFIO_DEVICE_FLAGS_RESET
    supports_reset: ClassVar[bool] = True

    #: version of the layout `save_state` writes; 0 means the model cannot save its state
    #: (engines then refuse migration and take-over with ENOTSUP). docs/device-state.md
    state_version: ClassVar[int] = 0

    #: set by `attach`, cleared by `detach`
    ctx: DeviceContext | None = None

    def regions(self) -> list[RegionSpec]:
        """Every region the device has; indices not listed are reported with size 0."""
        raise NotImplementedError

    def irqs(self) -> list[IrqSpec]:
        """Every IRQ index the device has; indices not listed are reported with count 0."""
        raise NotImplementedError

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        """Synchronous read; the engine has checked offset+count against the region size."""
        raise NotImplementedError

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        """Synchronous write; the engine has checked offset+len(data) against the size."""
        raise NotImplementedError

    def attach(self, ctx: DeviceContext) -> None:
        """A client finished VERSION and may now use the device."""
        self.ctx = ctx

    def detach(self) -> None:
        """The client is gone; its tasks are already cancelled. State is kept."""
        self.ctx = None

    def reset(self) -> None:
        """DEVICE_RESET (function-level reset). Tasks were cancelled before this call."""

    def irq_unmasked(self, index: int, vector: int) -> None:
        """The client unmasked a vector (e.g. INTx after EOI); a hook for level semantics."""

    def close(self) -> None:
        """The server is shutting down or the device was hot-removed: free backends/fds."""

    # ------------------------------------------------------------------ device state

    async def quiesce(self) -> None:
        """Before `save_state`, with the device attached: stop starting new work and wait
        for the work in flight to finish. The engine bounds the wait and cancels what is
        left; a model must keep such work in its state (docs/device-state.md)."""

    def resume(self) -> None:
        """Undo `quiesce` when no state change follows (a take-over or migration was
        abandoned). `load_state`, `reset` and a new `attach` end a quiesce as well."""

    def save_state(self) -> bytes:
        """The complete device state, self-describing (magic, model name, state_version,
        payload; docs/device-state.md). Does not change the device."""
        raise DeviceError(errno.ENOTSUP, f"{self.name or type(self).__name__} cannot save "
                          "its state")

    def load_state(self, data: bytes) -> None:
        """Replace the device's state with `data` from `save_state`. Raises StateError and
        leaves the device untouched if `data` is foreign, corrupt, truncated, of another
        version or configuration. Works detached (take-over) and attached (migration
        destination): work the state carries restarts now if attached, else on attach."""
        raise DeviceError(errno.ENOTSUP, f"{self.name or type(self).__name__} cannot load "
                          "a state")

"""Interrupts: eventfds, masks and pending bits per IRQ index (INTx, MSI, MSI-X, ERR, REQ).

The client hands us eventfds with SET_IRQS; raising an interrupt is writing 1 to one
(the message-based interrupt left the spec). Validation follows the spec, Linux vfio-pci and
libvfio-user's `lib/irq.c` (`device_set_irqs_validate`); the errnos are in
docs/architecture.md, "Errors".

INTx is level-triggered on a PCI bus but an eventfd is an edge: like the kernel's vfio-pci,
INTx is *automasked* when signalled, and the client unmasks it after the guest's EOI. If the
device still asserts the line at unmask time, we signal again. MSI and MSI-X vectors that are
masked collect a pending bit (what an MSI-X PBA read reports) and fire on unmask.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from dataclasses import dataclass, field

from devices.sdk.interface import IrqIndex, IrqSpec
from protocol import (
    IRQ_SET_ACTION_MASK,
    IRQ_SET_DATA_MASK,
    DeviceSetIrqs,
    IrqInfoFlags,
    IrqSetFlags,
    RemoteProtocolError,
)

from .fds import OwnedFd, close_all, is_eventfd

log = logging.getLogger(__name__)

_ONE = (1).to_bytes(8, "little")


def signal_eventfd(fd: OwnedFd) -> bool:
    try:
        os.write(fd.fileno(), _ONE)
        return True
    except (OSError, ValueError) as exc:  # EAGAIN: counter saturated; EBADF: closed
        log.warning("signalling eventfd %r failed: %s", fd, exc)
        return False


@dataclass
class IrqLine:
    """State of one IRQ index."""

    spec: IrqSpec
    triggers: list[OwnedFd | None] = field(default_factory=list)
    mask_fds: list[OwnedFd | None] = field(default_factory=list)
    unmask_fds: list[OwnedFd | None] = field(default_factory=list)
    masked: list[bool] = field(default_factory=list)
    pending: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = self.spec.count
        self.triggers = [None] * n
        self.mask_fds = [None] * n
        self.unmask_fds = [None] * n
        self.masked = [False] * n
        self.pending = [False] * n

    @property
    def flags(self) -> int:
        if not self.spec.count:
            return 0  # an unused index has no capabilities to report
        f = IrqInfoFlags.EVENTFD
        if self.spec.maskable:
            f |= IrqInfoFlags.MASKABLE
        if self.spec.automasked:
            f |= IrqInfoFlags.AUTOMASKED
        if self.spec.noresize:
            f |= IrqInfoFlags.NORESIZE
        return int(f)

    def all_fds(self) -> list[OwnedFd]:
        return [f for lst in (self.triggers, self.mask_fds, self.unmask_fds) for f in lst if f]


class DupSignal:
    """`IrqTable.thread_signal`'s answer: its own dup of the vector's eventfd, and the
    eventfd object and line it was taken from, to tell at `settle` whether SET_IRQS
    changed the vector's route while the thread ran."""

    __slots__ = ("_fd", "_line", "_same", "_source", "_table", "_vector")

    def __init__(self, table: IrqTable, line: IrqLine, vector: int, source: OwnedFd) -> None:
        self._table, self._line, self._vector, self._source = table, line, vector, source
        self._fd = os.dup(source.fileno())
        self._same: bool | None = None  # `settle`'s answer, once given

    def fire(self) -> None:
        """Any thread. EAGAIN (the counter is saturated: the client has not read the
        earlier signals yet) still leaves the eventfd readable, so nothing is lost."""
        try:
            os.write(self._fd, _ONE)
        except OSError as exc:
            log.debug("signalling a dup of eventfd %r failed: %s", self._source, exc)

    def settle(self) -> bool:
        """Trio thread. Closes the dup; True (and counted as fired) when the vector still
        signals through the same eventfd and is not masked (asked again: the same answer)."""
        if self._same is not None:
            return self._same
        os.close(self._fd)
        self._fd = -1
        line, v = self._line, self._vector
        same = (self._table.lines[self._line.spec.index] is line
                and line.triggers[v] is self._source and not line.masked[v])
        if same:
            self._table.fired += 1
        self._same = same
        return same

    def __del__(self) -> None:  # a settle that never came (the run ended under the thread)
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)


class IrqTable:
    """Implements the device-facing `IrqPort` and the client-facing SET_IRQS."""

    def __init__(self, specs: list[IrqSpec], num_irqs: int = 5) -> None:
        by_index = {s.index: s for s in specs}
        self.lines = [IrqLine(by_index.get(i, IrqSpec(i, 0))) for i in range(num_irqs)]
        self.intx_level = False
        #: called with (index, vector) when the client unmasks a vector
        self.on_unmask: list[object] = []
        self.fired = 0

    # ----------------------------------------------------------------- IrqPort

    def trigger(self, index: int, vector: int = 0) -> bool:
        if not 0 <= index < len(self.lines):
            return False
        line = self.lines[index]
        if not 0 <= vector < line.spec.count:
            return False
        if line.masked[vector]:
            line.pending[vector] = True
            return False
        sent = self.signal(line, index, vector)
        if sent is None:
            return False
        if line.spec.automasked:
            line.masked[vector] = True
        self.fired += 1
        return sent

    def signal(self, line: IrqLine, index: int, vector: int) -> bool | None:
        """Raise one unmasked vector: None when there is nothing to signal (no eventfd; the
        vector is then neither automasked nor counted), else whether the signal went out.

        The one step an engine whose library owns the eventfds (libvfio-user) replaces;
        masks, pending bits and the INTx level stay here for both engines.
        """
        fd = line.triggers[vector]
        if fd is None:
            return None
        return signal_eventfd(fd)

    def thread_signal(self, index: int, vector: int) -> DupSignal | None:
        """A `devices.sdk.interface.ThreadIrq` for one unmasked edge vector (MSI, MSI-X)
        with an eventfd: a dup of that eventfd, which only the thread writes and only
        `DupSignal.settle` closes. None otherwise (the caller raises on the trio thread)."""
        if index not in (IrqIndex.MSI, IrqIndex.MSIX):
            return None
        line = self.lines[index]
        if not 0 <= vector < line.spec.count or line.masked[vector] or line.spec.automasked:
            return None
        fd = line.triggers[vector]
        if fd is None:
            return None
        return DupSignal(self, line, vector, fd)

    def set_intx(self, level: bool) -> None:
        rising = level and not self.intx_level
        self.intx_level = level
        if rising:
            self.trigger(IrqIndex.INTX, 0)
        elif not level and self.lines[IrqIndex.INTX].spec.count:
            self.lines[IrqIndex.INTX].pending[0] = False

    def pending(self, index: int, vector: int) -> bool:
        line = self.lines[index] if 0 <= index < len(self.lines) else None
        return bool(line and 0 <= vector < line.spec.count and line.pending[vector])

    def enabled(self, index: int) -> bool:
        return 0 <= index < len(self.lines) and any(self.lines[index].triggers)

    # ----------------------------------------------------------------- SET_IRQS

    def set_irqs(self, req: DeviceSetIrqs) -> list[tuple[int, int]]:
        """Validate and apply. Consumes the request's fds (kept or closed).

        Returns the (index, vector) pairs the client unmasked, for the model's hook.
        """
        fds = list(req.fd_list)
        try:
            unmasked = self._set_irqs(req, fds)
        except BaseException:
            close_all(fds)
            raise
        return unmasked

    def _set_irqs(self, req: DeviceSetIrqs, fds: list[OwnedFd]) -> list[tuple[int, int]]:
        flags = req.flags
        if flags & ~int(IRQ_SET_DATA_MASK | IRQ_SET_ACTION_MASK):
            raise RemoteProtocolError(f"SET_IRQS: unknown flags {flags:#x}")
        data, action = flags & IRQ_SET_DATA_MASK, flags & IRQ_SET_ACTION_MASK
        if data.bit_count() != 1 or action.bit_count() != 1:
            raise RemoteProtocolError(f"SET_IRQS: flags {flags:#x} need one data and one action")
        if not 0 <= req.index < len(self.lines):
            raise RemoteProtocolError(f"SET_IRQS: index {req.index} out of range")
        line = self.lines[req.index]
        if req.index in (IrqIndex.ERR, IrqIndex.REQ) and action != IrqSetFlags.ACTION_TRIGGER:
            raise RemoteProtocolError("SET_IRQS: ERR and REQ take TRIGGER only")
        if req.count == 0:
            if flags != IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER or req.start:
                raise RemoteProtocolError("SET_IRQS: count 0 only with NONE|TRIGGER, start 0")
            if fds:
                raise RemoteProtocolError("SET_IRQS: descriptors with count 0")
            self.disable(req.index)
            return []
        if req.start + req.count > line.spec.count:
            raise RemoteProtocolError(
                f"SET_IRQS: {req.start}+{req.count} exceeds {line.spec.count} vectors of index "
                f"{req.index}"
            )
        if action in (IrqSetFlags.ACTION_MASK, IrqSetFlags.ACTION_UNMASK) and (
            not line.spec.maskable
        ):
            raise RemoteProtocolError(f"SET_IRQS: index {req.index} is not maskable")
        if data != IrqSetFlags.DATA_EVENTFD and fds:
            raise RemoteProtocolError("SET_IRQS: descriptors need DATA_EVENTFD")
        vectors = range(req.start, req.start + req.count)
        if data == IrqSetFlags.DATA_BOOL:
            if len(req.data) != req.count:
                raise RemoteProtocolError(
                    f"SET_IRQS: {len(req.data)} bool bytes for {req.count} vectors"
                )
            vectors = range(0)
            chosen = [req.start + i for i, b in enumerate(req.data) if b]
        elif data == IrqSetFlags.DATA_NONE:
            if len(req.data):
                raise RemoteProtocolError("SET_IRQS: DATA_NONE with data")
            chosen = list(vectors)
        else:
            return self._assign(line, req, fds, action)
        return self._act(line, req.index, chosen, action)

    def _assign(
        self, line: IrqLine, req: DeviceSetIrqs, fds: list[OwnedFd], action: int
    ) -> list[tuple[int, int]]:
        if fds and len(fds) != req.count:
            raise RemoteProtocolError(f"SET_IRQS: {len(fds)} eventfds for {req.count} vectors")
        for fd in fds:
            if not is_eventfd(fd.fileno()):
                raise RemoteProtocolError(f"SET_IRQS: fd {fd.fd} is not an eventfd")
        table = {
            IrqSetFlags.ACTION_TRIGGER: line.triggers,
            IrqSetFlags.ACTION_MASK: line.mask_fds,
            IrqSetFlags.ACTION_UNMASK: line.unmask_fds,
        }[IrqSetFlags(action)]
        for i, v in enumerate(range(req.start, req.start + req.count)):
            old = table[v]
            table[v] = fds[i] if fds else None
            if old is not None:
                old.close()
        fds.clear()  # ownership moved into the table
        if action == IrqSetFlags.ACTION_TRIGGER and req.index == IrqIndex.INTX and self.intx_level:
            # The line is already asserted: the new eventfd must learn about it.
            self.trigger(IrqIndex.INTX, 0)
        return []

    def _act(
        self, line: IrqLine, index: int, vectors: list[int], action: int
    ) -> list[tuple[int, int]]:
        unmasked: list[tuple[int, int]] = []
        for v in vectors:
            if action == IrqSetFlags.ACTION_TRIGGER:
                fd = line.triggers[v]
                if fd is not None:
                    signal_eventfd(fd)
            elif action == IrqSetFlags.ACTION_MASK:
                if not line.masked[v] and line.mask_fds[v] is not None:
                    signal_eventfd(line.mask_fds[v])  # type: ignore[arg-type]
                line.masked[v] = True
            else:
                was = line.masked[v]
                line.masked[v] = False
                if was and line.unmask_fds[v] is not None:
                    signal_eventfd(line.unmask_fds[v])  # type: ignore[arg-type]
                unmasked.append((index, v))
                if index == IrqIndex.INTX:
                    if self.intx_level:
                        self.trigger(index, v)
                elif line.pending[v]:
                    line.pending[v] = False
                    self.trigger(index, v)
        return unmasked

    def set_masked(self, index: int, vectors: range, masked: bool) -> list[tuple[int, int]]:
        """Apply a MASK or UNMASK that was validated elsewhere (libvfio-user checks SET_IRQS
        itself and reports only the outcome), with the same effects as one sent to us:
        pending vectors fire and a still-asserted INTx is signalled again at unmask.
        Vectors past the index's count are ignored. Returns the (index, vector) unmasked."""
        line = self.lines[index]
        chosen = [v for v in vectors if 0 <= v < line.spec.count]
        action = IrqSetFlags.ACTION_MASK if masked else IrqSetFlags.ACTION_UNMASK
        return self._act(line, index, chosen, action)

    # ----------------------------------------------------------------- lifecycle

    def disable(self, index: int) -> None:
        line = self.lines[index]
        for fd in line.all_fds():
            fd.close()
        n = line.spec.count
        line.triggers, line.mask_fds, line.unmask_fds = [None] * n, [None] * n, [None] * n
        line.masked, line.pending = [False] * n, [False] * n

    def close(self) -> None:
        """Disconnect: close every eventfd the client gave us."""
        for i in range(len(self.lines)):
            self.disable(i)

    def open_fds(self) -> int:
        return sum(len(line.all_fds()) for line in self.lines)


__all__ = ["DupSignal", "IrqLine", "IrqTable", "errno", "signal_eventfd"]

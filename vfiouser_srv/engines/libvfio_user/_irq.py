"""Interrupts for a model served by libvfio-user: the Python engine's `IrqTable`, raising
through `vfu_irq_trigger` instead of eventfds of its own.

Masks, pending bits, INTx automasking and the re-signal of a still-asserted INTx at unmask
are `irq.IrqTable`'s, shared with the Python engine. The library receives SET_IRQS itself:
it keeps the eventfds (one array, for whichever of INTx/MSI/MSI-X the client set last) and
reports only MASK/UNMASK, through the IRQ state callback, which lands in
`IrqTable.set_masked`. So the table's eventfd columns stay empty here, and two steps differ:

* raising a vector (`signal`) is `vfu_irq_trigger`; ERR and REQ cannot be raised through
  the library's API at all;
* `enabled` cannot look at eventfds the library does not show us;
* no `thread_signal`: a backend thread cannot raise through the library.

See docs/architecture.md, "Engines".
"""

from __future__ import annotations

import ctypes
import logging
from typing import Protocol

from devices.sdk.interface import NUM_PCI_IRQS, IrqIndex, IrqSpec

from ...irq import IrqLine, IrqTable

log = logging.getLogger(__name__)


class IrqHost(Protocol):
    """What raising an interrupt needs of the device (`LibvfioUserDevice`), declared here so
    that this module does not import the device's."""

    name: str
    lib: ctypes.CDLL

    def ctx_or_none(self) -> int | None:
        """The context while a client is attached, else None."""
        ...


class VfuIrq(IrqTable):
    """The model's IrqPort: `IrqTable` with the library raising the vectors.

    `IrqTable.set_irqs` and the eventfd bookkeeping are never used here (the library
    validates SET_IRQS and owns the eventfds); the state callback calls `set_masked`.
    """

    def __init__(self, host: IrqHost, specs: list[IrqSpec]) -> None:
        super().__init__(specs, NUM_PCI_IRQS)
        self._host = host

    def signal(self, line: IrqLine, index: int, vector: int) -> bool | None:
        """`vfu_irq_trigger`; None (not raised: neither automasked nor counted) when the
        library cannot: ERR/REQ, no client, or no eventfd assigned (ENOENT), which the
        library does not let us tell apart from a failed write."""
        if index in (IrqIndex.ERR, IrqIndex.REQ):
            log.debug(
                "%s: IRQ index %d cannot be raised through libvfio-user", self._host.name, index
            )
            return None
        ctx = self._host.ctx_or_none()
        if ctx is None or self._host.lib.vfu_irq_trigger(ctx, vector) < 0:
            return None
        return True

    def thread_signal(self, index: int, vector: int) -> None:
        """None: the library owns the eventfds, and `vfu_irq_trigger` from a backend thread
        would race its SET_IRQS handling on the trio thread, so models served here raise
        on the trio thread (their threads hand back as before)."""
        return None

    def enabled(self, index: int) -> bool:
        # The library does not say which index holds eventfds; a device that has the index
        # is assumed enabled (a trigger without an eventfd is dropped and returns False).
        return 0 <= index < len(self.lines) and self.lines[index].spec.count > 0


__all__ = ["IrqHost", "VfuIrq"]

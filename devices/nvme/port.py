"""What the worker needs from the PCI function: the seam that keeps worker -> controller
one-way.

The controller (`controller.Nvme`) owns the registers and the PCI function and creates the
worker; the worker reads CC/AQA/ASQ/ACQ, sets CSTS and raises interrupts through the few
members listed in `ControllerPort`, which `Nvme` provides. The worker never imports the
controller, so each can be read (and tested) on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from devices.sdk.interface import DeviceContext, ThreadIrq


@dataclass(frozen=True)
class CcFields:
    """CC, AQA, ASQ and ACQ as the worker needs them at enable and queue creation."""

    css: int
    mps: int
    iosqes: int
    iocqes: int
    asqs: int
    acqs: int
    asq: int
    acq: int


class ControllerPort(Protocol):
    """The controller as the worker sees it (implemented by `controller.Nvme`)."""

    @property
    def ctx(self) -> DeviceContext | None: ...

    @property
    def intmask(self) -> int:
        """INTMS/INTMC: bit 0 masks INTx."""
        ...

    @property
    def mqes(self) -> int:
        """CAP.MQES: largest queue size minus one."""
        ...

    @property
    def mps_max(self) -> int:
        """CAP.MPSMAX: largest memory page size exponent (4 KiB << n)."""
        ...

    @property
    def vectors(self) -> int:
        """Message-signalled vectors the function has (MSI-X, or 1 with MSI)."""
        ...

    @property
    def csts_cfs(self) -> bool: ...

    def cc_fields(self) -> CcFields: ...

    def set_csts(self, *, rdy: bool | None = None, cfs: bool | None = None,
                 shst: int | None = None) -> None: ...

    def msix_enabled(self) -> bool: ...

    def msi_enabled(self) -> bool: ...

    def raise_irq(self, vector: int = 0) -> None: ...

    def thread_irq(self, vector: int = 0) -> ThreadIrq | None: ...

    def thread_irq_stands(self, irq: ThreadIrq) -> bool: ...

    def lower_irq(self) -> None: ...

    def intx_asserted(self) -> bool:
        """The INTx level `raise_irq`/`lower_irq` last set."""
        ...

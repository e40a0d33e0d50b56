"""A fake DeviceContext: guest RAM in a bytearray, an IRQ port that records everything."""

from __future__ import annotations

import contextlib
import errno
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import trio

from devices.sdk.interface import DmaError, IrqIndex


class FakeDma:
    """DMA over a bytearray at IOVA `base`; anything outside it raises DmaError(EFAULT)."""

    def __init__(self, size: int = 1 << 20, base: int = 0) -> None:
        self.base = base
        self.ram = bytearray(size)
        self.reads: list[tuple[int, int]] = []
        self.writes: list[tuple[int, int]] = []
        self.pins = 0

    def _range(self, address: int, size: int) -> slice:
        start = address - self.base
        if start < 0 or start + size > len(self.ram):
            raise DmaError(errno.EFAULT, f"0x{address:x}+{size} not mapped")
        return slice(start, start + size)

    def view(self, address: int, size: int, *, write: bool = False) -> memoryview | None:
        return memoryview(self.ram)[self._range(address, size)]

    @contextlib.contextmanager
    def pin(self, address: int, size: int, *, write: bool = False) -> Iterator[memoryview | None]:
        self.pins += 1
        try:
            yield memoryview(self.ram)[self._range(address, size)]
        finally:
            self.pins -= 1

    @contextlib.contextmanager
    def pin_ranges(
        self, ranges: list[tuple[int, int]], *, write: bool = False
    ) -> Iterator[list[memoryview] | None]:
        self.pins += 1
        try:
            yield [memoryview(self.ram)[self._range(a, n)] for a, n in ranges]
        finally:
            self.pins -= 1

    async def read(self, address: int, size: int) -> bytes:
        await trio.lowlevel.checkpoint()
        data = bytes(self.ram[self._range(address, size)])
        self.reads.append((address, size))
        return data

    async def write(self, address: int, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        self.ram[self._range(address, len(data))] = data
        self.writes.append((address, len(data)))


class FakeIrq:
    def __init__(self) -> None:
        self.triggers: list[tuple[int, int]] = []
        self.intx_history: list[bool] = []
        self.pending_vectors: set[tuple[int, int]] = set()

    @property
    def intx(self) -> bool:
        return bool(self.intx_history) and self.intx_history[-1]

    def trigger(self, index: int, vector: int = 0) -> bool:
        self.triggers.append((int(index), vector))
        return True

    def set_intx(self, level: bool) -> None:
        self.intx_history.append(level)

    def pending(self, index: int, vector: int) -> bool:
        return (int(index), vector) in self.pending_vectors

    def enabled(self, index: int) -> bool:
        return index in (IrqIndex.INTX, IrqIndex.MSI, IrqIndex.MSIX)


class RecordingSignal:
    """A `ThreadIrq` that records which thread fired it; `settle` answers `owner.same`."""

    def __init__(self, owner: ThreadIrqs, vector: int) -> None:
        self.owner, self.vector = owner, vector

    def fire(self) -> None:
        self.owner.fired.append((self.vector, threading.get_ident()))

    def settle(self) -> bool:
        self.owner.settled += 1
        return self.owner.same


class ThreadIrqs(FakeIrq):
    """FakeIrq with the optional `thread_signal` (MSI-X only), as the Python engine has."""

    def __init__(self) -> None:
        super().__init__()
        self.fired: list[tuple[int, int]] = []
        self.settled = 0
        self.same = True

    def thread_signal(self, index: int, vector: int) -> RecordingSignal | None:
        return RecordingSignal(self, vector) if index == IrqIndex.MSIX else None


class FakeContext:
    def __init__(self, nursery: trio.Nursery, ram_size: int = 1 << 20) -> None:
        self.nursery = nursery
        self._dma = FakeDma(ram_size)
        self._irq = FakeIrq()
        self.task_names: list[str] = []
        self.failures: list[str] = []

    @property
    def dma(self) -> FakeDma:
        return self._dma

    @property
    def irq(self) -> FakeIrq:
        return self._irq

    def start_task(self, fn: Callable[..., Awaitable[Any]], *args: Any, name: str = "") -> None:
        self.task_names.append(name)
        self.nursery.start_soon(fn, *args, name=name or None)

    def report_failure(self, reason: str) -> None:
        self.failures.append(reason)

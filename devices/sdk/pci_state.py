"""What `PciDevice` saves without being told: config space, register banks and shared
memory behind BARs, the MSI-X table and its pending bits, the INTx level.

Why this is automatic: all of it is declared already (bars, caps), so a model's own state
is only what lives in its attributes. The parts are checked against this device's layout
first (a digest of the power-on config space, its masks and the BARs), so a state from a
device built with other options (another queue count, another BAR size) is refused as a
whole instead of being half-applied.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from .bars import Bar, SharedMemory, Trap
from .config import ConfigSpace
from .msi import MsixCap
from .regs import RegisterBank
from .state import Record, Value

#: bytes of the layout digest kept in the state
DIGEST_SIZE = 16


def layout_digest(config: ConfigSpace, power_on: bytes, bars: Mapping[int, Bar],
                  msix: MsixCap | None) -> bytes:
    """What must be equal for a saved config space to mean the same thing here."""
    h = hashlib.sha256()
    h.update(power_on)
    h.update(bytes(config.wmask))
    h.update(bytes(config.w1cmask))
    for index in sorted(bars):
        bar = bars[index]
        h.update(f"{index}:{bar.size}:{bar.kind.value}:{type(bar.backing).__name__};".encode())
    h.update(f"msix:{msix.vectors if msix is not None else 0}".encode())
    return h.digest()[:DIGEST_SIZE]


def _trap_key(bar: int, trap: Trap) -> str:
    return f"{bar}@{trap.offset:#x}"


def _memories(bars: Mapping[int, Bar], traps: Mapping[int, tuple[Trap, ...]]
              ) -> dict[str, RegisterBank | SharedMemory]:
    """Every bank or shared memory a BAR or a trap is served by, under a stable key."""
    out: dict[str, RegisterBank | SharedMemory] = {}
    for index in sorted(bars):
        backing = bars[index].backing
        if isinstance(backing, (RegisterBank, SharedMemory)):
            out[f"bar{index}"] = backing
        for trap in traps.get(index, ()):
            if isinstance(trap.handler, RegisterBank):
                out[_trap_key(index, trap)] = trap.handler
    return out


def save_pci(config: ConfigSpace, power_on: bytes, bars: Mapping[int, Bar],
             traps: Mapping[int, tuple[Trap, ...]], msix: MsixCap | None, intx: bool,
             pending: list[int]) -> dict[str, Value]:
    memories: dict[str, Value] = {}
    for key, mem in _memories(bars, traps).items():
        memories[key] = mem.snapshot() if isinstance(mem, RegisterBank) else mem.read(0, mem.size)
    return {
        "layout": layout_digest(config, power_on, bars, msix),
        "config": config.snapshot(),
        "intx": intx,
        "memories": memories,
        "msix_table": msix.table.snapshot() if msix is not None else None,
        "msix_pending": list(pending),
    }


@dataclass
class PciImage:
    """A checked PCI section, ready to apply (nothing here can fail any more)."""

    config: bytes
    intx: bool
    memories: list[tuple[RegisterBank | SharedMemory, bytes]]
    msix_table: bytes | None
    msix_pending: list[int]

    def apply(self, config: ConfigSpace, msix: MsixCap | None) -> None:
        config.restore(self.config)
        for mem, data in self.memories:
            if isinstance(mem, RegisterBank):
                mem.restore(data)
            else:
                mem.write(0, data)
        if msix is not None and self.msix_table is not None:
            msix.table.restore(self.msix_table)


def check_pci(rec: Record, config: ConfigSpace, power_on: bytes, bars: Mapping[int, Bar],
              traps: Mapping[int, tuple[Trap, ...]], msix: MsixCap | None) -> PciImage:
    digest = rec.blob("layout", DIGEST_SIZE)
    if digest != layout_digest(config, power_on, bars, msix):
        raise rec.fail("layout", "the state is from a device with another PCI layout (other "
                       "IDs, BARs, capabilities or vector count): start the device with the "
                       "same options")
    image = rec.blob("config", config.size)
    mems = rec.record("memories")
    memories: list[tuple[RegisterBank | SharedMemory, bytes]] = []
    for key, mem in _memories(bars, traps).items():
        memories.append((mem, mems.blob(key, mem.size)))
    table: bytes | None = None
    if msix is not None:
        table = rec.blob("msix_table", msix.table.size)
    elif rec.get("msix_table") is not None:
        raise rec.fail("msix_table", "present, but this device has no MSI-X")
    pending = rec.uints("msix_pending", 11)
    vectors = msix.vectors if msix is not None else 0
    for vector in pending:
        if vector >= vectors:
            raise rec.fail("msix_pending", f"vector {vector} >= {vectors} vectors")
    return PciImage(image, rec.flag("intx"), memories, table, pending)

"""`PciDevice`: a `DeviceModel` derived entirely from declarations.

A model states its identity, BARs, capabilities and (optionally) a ROM; this class builds
the type-0 config space with the right masks, places the capabilities, serves regions 0-8,
derives GET_REGION_INFO / GET_IRQ_INFO answers, and picks the interrupt mechanism the
guest enabled. Sketch::

    class Tiny(PciDevice):
        name = "tiny"
        identity = PciIdentity(vendor_id=0x1234, device_id=0x0001, class_code=0xFF0000)

        def __init__(self) -> None:
            self.regs = RegisterBank([Register("DOORBELL", 0, on_write=self._ring)])
            self.msix = MsixCap(4, table_bar=0, table_offset=0x800)
            super().__init__(bars=[Bar(0, 0x1000, backing=self.regs)], caps=[self.msix])

        def _ring(self, value: int) -> None:
            self.raise_irq(value)

Interrupt delivery (`raise_irq`): MSI-X if enabled, else MSI, else INTx. MSI and MSI-X are
memory writes, so they are dropped while Bus Master is off (QEMU drops them the same way).
INTx is a level: `raise_irq` asserts it, `lower_irq` deasserts it; the Status interrupt bit
follows the level, and the line the engine sees is the level gated by the Command
INTx-disable bit. Enabling MSI or MSI-X deasserts INTx, as QEMU's msi/msix code does.
Anything raised while no client is attached is dropped (INTx keeps its level and is
re-driven on attach).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, TypeVar, cast

from . import config as cfg
from .bars import Bar, BarHandler, BarKind, CallbackHandler, Rom, SharedMemory, Trap
from .capability import Capability, ExtendedCapability, place_capabilities
from .caps import PcieCap
from .config import Command, ConfigSpace, Status
from .interface import (
    DeviceContext,
    DeviceError,
    DeviceModel,
    IrqIndex,
    IrqSpec,
    RegionIndex,
    RegionSpec,
    ThreadIrq,
)
from .msi import MsiCap, MsixCap
from .pci_state import check_pci, save_pci
from .regs import RegisterBank
from .state import (
    Apply,
    Record,
    StateField,
    Value,
    pack_state,
    prepare_fields,
    save_fields,
    unpack_state,
)

log = logging.getLogger(__name__)

#: The Command bits a guest can change: QEMU's generic PCI write mask (hw/pci/pci.c,
#: pci_init_wmask), the same for every emulated device whatever its BARs. vfio-user-pci reads
#: Command back from us, so a guest compares our device with QEMU's own twin bit for bit:
#: I/O Space stays set on a device without an I/O BAR (the PCI spec allows hardwiring it to
#: 0; QEMU does not), and Parity Error Response stays clear (QEMU leaves it read-only).
COMMAND_WMASK = (Command.IO | Command.MEMORY | Command.MASTER | Command.SERR
                 | Command.INTX_DISABLE)

_CapT = TypeVar("_CapT", bound=Capability)

#: Interrupt pin values (Interrupt Pin register): 0 none, 1..4 INTA#..INTD#.
INTX_NONE = 0
#: plain ints for the region-read fast path (an IntEnum member lookup costs ~0.1 µs)
_CONFIG = int(RegionIndex.CONFIG)
_ROM = int(RegionIndex.ROM)
#: plain ints for the interrupt path (see `bus_master_enabled`)
_MASTER = int(Command.MASTER)
_INTX_DISABLE = int(Command.INTX_DISABLE)
INTA = 1
INTD = 4


@dataclass(frozen=True)
class PciIdentity:
    """The read-only identification fields of the header.

    `class_code` is 24 bits: base class << 16 | subclass << 8 | programming interface.
    """

    vendor_id: int
    device_id: int
    class_code: int = 0xFF0000
    revision: int = 0
    subsystem_vendor_id: int = 0
    subsystem_id: int = 0

    def __post_init__(self) -> None:
        for name in ("vendor_id", "device_id", "subsystem_vendor_id", "subsystem_id"):
            if not 0 <= getattr(self, name) <= 0xFFFF:
                raise ValueError(f"{name} must fit in 16 bits")
        if not 0 <= self.class_code <= 0xFFFFFF or not 0 <= self.revision <= 0xFF:
            raise ValueError("class_code is 24 bits and revision 8 bits")


class PciDevice(DeviceModel):
    """Base class of PCI device models; see the module docstring."""

    #: set on the subclass (or passed to __init__)
    identity: PciIdentity
    #: 0 for no INTx, 1..4 for INTA#..INTD#
    interrupt_pin: int = INTA
    #: model attributes saved and loaded with the device state (docs/device-state.md)
    state_fields: ClassVar[tuple[StateField, ...]] = ()

    def __init__(
        self,
        *,
        bars: Sequence[Bar] = (),
        caps: Sequence[Capability] = (),
        ext_caps: Sequence[ExtendedCapability] = (),
        rom: Rom | None = None,
        identity: PciIdentity | None = None,
    ) -> None:
        if identity is not None:
            self.identity = identity
        if not INTX_NONE <= self.interrupt_pin <= INTD:
            raise ValueError("interrupt_pin must be 0..4")
        self.bars: dict[int, Bar] = {}
        for bar in bars:
            for slot in range(bar.index, bar.index + bar.slots):
                if any(slot in range(b.index, b.index + b.slots) for b in self.bars.values()):
                    raise ValueError(f"BAR slot {slot} declared twice")
            self.bars[bar.index] = bar
        self.rom = rom
        self.caps = list(caps)
        self.ext_caps = list(ext_caps)
        self.msi: MsiCap | None = self._single(MsiCap)
        self.msix: MsixCap | None = self._single(MsixCap)
        self.pcie: PcieCap | None = self._single(PcieCap)
        if self.ext_caps and self.pcie is None:
            raise ValueError("extended capabilities need a PcieCap")

        size = cfg.PCIE_CONFIG_SIZE if self.pcie is not None else cfg.PCI_CONFIG_SIZE
        self.config = ConfigSpace(size)
        self._build_header()
        place_capabilities(self.config, self.caps, self.ext_caps)
        self._power_on_config = self.config.snapshot()

        self._traps: dict[int, tuple[Trap, ...]] = {i: b.traps for i, b in self.bars.items()}
        if self.msix is not None:
            self._add_msix_traps(self.msix)
        for bar in self.bars.values():
            if isinstance(bar.backing, SharedMemory) and bar.backing.fd < 0:
                bar.backing.allocate(bar.size)
        # BAR index -> (size, read function) for BARs without traps: the region-read fast
        # path is one dict lookup and one call (a CallbackHandler's own function, not its
        # forwarding method). Bars are frozen and traps are only added above, so this holds.
        self._fast_read: dict[int, tuple[int, Callable[[int, int], bytes]]] = {}
        for index, bar in self.bars.items():
            if self._traps[index] or bar.backing is None:
                continue
            backing = bar.backing
            reader = backing.read_fn if isinstance(backing, CallbackHandler) else backing.read
            self._fast_read[index] = (bar.size, reader)

        self._intx_level = False
        self._intx_out = False
        #: MSI-X vectors a loaded state had pending, raised again once a client is attached
        self._replay_pending: list[int] = []

    # ------------------------------------------------------------------ building

    def _single(self, kind: type[_CapT]) -> _CapT | None:
        found = [c for c in self.caps if isinstance(c, kind)]
        if len(found) > 1:
            raise ValueError(f"more than one {kind.__name__}")
        return found[0] if found else None

    def _build_header(self) -> None:
        c = self.config
        ident = self.identity
        c.define(cfg.VENDOR_ID, 2, ident.vendor_id)
        c.define(cfg.DEVICE_ID, 2, ident.device_id)
        c.define(cfg.REVISION_ID, 1, ident.revision)
        c.define(cfg.CLASS_CODE, 3, ident.class_code)
        c.define(cfg.SUBSYSTEM_VENDOR_ID, 2, ident.subsystem_vendor_id)
        c.define(cfg.SUBSYSTEM_ID, 2, ident.subsystem_id)
        c.define(cfg.HEADER_TYPE, 1, cfg.HEADER_TYPE_NORMAL)

        c.define(cfg.COMMAND, 2, 0, COMMAND_WMASK)
        c.define(cfg.STATUS, 2, 0, w1c=cfg.STATUS_RW1C)
        c.define(cfg.CACHE_LINE_SIZE, 1, 0, 0xFF)
        c.define(cfg.INTERRUPT_LINE, 1, 0, 0xFF)
        c.define(cfg.INTERRUPT_PIN, 1, self.interrupt_pin)

        for bar in self.bars.values():
            reg = cfg.BAR0 + bar.index * cfg.BAR_STRIDE
            size_mask = ~(bar.size - 1)
            if bar.kind is BarKind.IO:
                c.define(reg, 4, cfg.BAR_SPACE_IO, size_mask & cfg.BAR_IO_ADDR_MASK)
                continue
            flags = cfg.BAR_MEM_PREFETCH if bar.prefetchable else 0
            if bar.kind is BarKind.MEM64:
                flags |= cfg.BAR_MEM_TYPE_64
                c.define(reg + cfg.BAR_STRIDE, 4, 0, (size_mask >> 32) & 0xFFFF_FFFF)
            c.define(reg, 4, flags, size_mask & cfg.BAR_MEM_ADDR_MASK)
        if self.rom is not None:
            rom_mask = ~(self.rom.size - 1) & cfg.ROM_ADDR_MASK
            c.define(cfg.ROM_ADDRESS, 4, 0, rom_mask | cfg.ROM_ENABLE)

    def _add_msix_traps(self, msix: MsixCap) -> None:
        placements: list[tuple[int, int, BarHandler]] = [
            (msix.table_bar, msix.table_offset, msix.table),
            (msix.pba_bar, msix.pba_offset, msix.pba),
        ]
        for bar_index, offset, handler in placements:
            bar = self.bars.get(bar_index)
            size = msix.table.size if handler is msix.table else msix.pba.size
            if bar is None or bar.kind is BarKind.IO or offset + size > bar.size:
                raise ValueError(f"MSI-X structure does not fit in memory BAR{bar_index}")
            self._traps[bar_index] = (*self._traps[bar_index], Trap(offset, size, handler))
        msix.pending_source = self._msix_pending

    def _msix_pending(self, vector: int) -> bool:
        if self.ctx is None:
            return False
        return self.ctx.irq.pending(IrqIndex.MSIX, vector)

    # ------------------------------------------------------------------ DeviceModel

    def regions(self) -> list[RegionSpec]:
        specs: list[RegionSpec] = []
        for index in range(cfg.NUM_BARS):
            bar = self.bars.get(index)
            if bar is None:
                specs.append(RegionSpec(index, 0))
            elif isinstance(bar.backing, SharedMemory):
                traps = self._traps[index]
                areas = bar.mmap_areas(traps) if traps else ()
                specs.append(RegionSpec(index, bar.size, fd=bar.backing.fd, mmap_areas=areas))
            else:
                specs.append(RegionSpec(index, bar.size))
        rom_size = self.rom.size if self.rom is not None else 0
        specs.append(RegionSpec(int(RegionIndex.ROM), rom_size, writable=False))
        specs.append(RegionSpec(int(RegionIndex.CONFIG), self.config.size))
        specs.append(RegionSpec(int(RegionIndex.VGA), 0))
        return specs

    def irqs(self) -> list[IrqSpec]:
        # Flags follow Linux vfio-pci: INTx is maskable and automasked; MSI is NORESIZE.
        # MSI-X is maskable so QEMU masks through SET_IRQS and forwards PBA reads.
        return [
            IrqSpec(int(IrqIndex.INTX), 1 if self.interrupt_pin else 0, automasked=True),
            IrqSpec(int(IrqIndex.MSI), self.msi.vectors if self.msi else 0, maskable=False,
                    noresize=True),
            IrqSpec(int(IrqIndex.MSIX), self.msix.vectors if self.msix else 0),
            IrqSpec(int(IrqIndex.ERR), 1, maskable=False),
            IrqSpec(int(IrqIndex.REQ), 1, maskable=False),
        ]

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        if index == _CONFIG:
            self._check(offset, count, self.config.size, index)
            return self.config.read(offset, count)
        if index == _ROM:
            if self.rom is None:
                raise DeviceError(errno.EINVAL, "the device has no expansion ROM")
            self._check(offset, count, self.rom.size, index)
            return self.rom.read(offset, count)
        fast = self._fast_read.get(index)
        if fast is not None and offset >= 0 and count >= 0 and offset + count <= fast[0]:
            # Fast path: most BARs have no traps, and a guest's MMIO reads are the hottest
            # messages a server sees.
            return fast[1](offset, count)
        bar = self._bar(index, offset, count)
        if not self._traps[index]:
            return bar.backing.read(offset, count) if bar.backing is not None else bytes(count)
        out = bytearray()
        for handler, rel, length in self._segments(bar, offset, count):
            out += handler.read(rel, length) if handler is not None else bytes(length)
        return bytes(out)

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        if index == RegionIndex.CONFIG:
            self._check(offset, len(data), self.config.size, index)
            self._config_write(offset, data)
            return
        bar = self._bar(index, offset, len(data))
        if not self._traps[index]:
            if bar.backing is not None:
                bar.backing.write(offset, data)
            return
        pos = 0
        for handler, rel, length in self._segments(bar, offset, len(data)):
            if handler is not None:
                handler.write(rel, data[pos : pos + length])
            pos += length

    def attach(self, ctx: DeviceContext) -> None:
        super().attach(ctx)
        self._intx_out = False
        self._drive_intx()
        self._replay_msix_pending()

    def reset(self) -> None:
        """Function-level reset: config space, banks, MSI-X table and memory to power-on.

        Tasks were cancelled by the engine before this call; `on_reset` then resets the
        model's own state.
        """
        self._set_intx_level(False)
        self._replay_pending = []
        self.config.restore(self._power_on_config)
        if self.msix is not None:
            self.msix.table.reset()
        for bar in self.bars.values():
            if isinstance(bar.backing, RegisterBank):
                bar.backing.reset()
            elif isinstance(bar.backing, SharedMemory) and bar.backing.clear_on_reset:
                bar.backing.clear()
            for trap in bar.traps:
                if isinstance(trap.handler, RegisterBank):
                    trap.handler.reset()
        self.on_reset()

    def on_reset(self) -> None:
        """Subclass hook: put model state (beyond config space and banks) to power-on."""

    # ------------------------------------------------------------------ device state

    def save_state(self) -> bytes:
        """Config space, BAR banks and shared memory, MSI-X table and pending bits, INTx
        (automatic), then `state_fields`, then `save_model_state()`."""
        if not self.state_version:
            return super().save_state()
        pending = list(self._replay_pending)
        if self.ctx is not None and self.msix is not None:
            pending = [v for v in range(self.msix.vectors)
                       if self.ctx.irq.pending(IrqIndex.MSIX, v)]
        payload: dict[str, Value] = {
            "pci": save_pci(self.config, self._power_on_config, self.bars, self._traps,
                            self.msix, self._intx_level, pending),
            "fields": save_fields(self, self.state_fields),
            "model": self.save_model_state(),
        }
        return pack_state(self.name, self.state_version, payload)

    def load_state(self, data: bytes) -> None:
        """Check every part (`check_pci`, the fields, `prepare_model_state`) and refuse
        fields nobody read, then apply them all: a StateError leaves the device as it was."""
        if not self.state_version:
            super().load_state(data)
            return
        root = Record(unpack_state(data, self.name, self.state_version), "")
        image = check_pci(root.record("pci"), self.config, self._power_on_config, self.bars,
                          self._traps, self.msix)
        fields = prepare_fields(self, self.state_fields, root.record("fields"))
        model = self.prepare_model_state(root.record("model"))
        root.check_consumed()
        image.apply(self.config, self.msix)
        self._set_intx_level(image.intx)
        self._replay_pending = image.msix_pending
        fields()
        model()
        self._replay_msix_pending()
        self.state_loaded()

    def save_model_state(self) -> dict[str, Value]:
        """Subclass hook: state `state_fields` cannot express (queues, in-flight work)."""
        return {}

    def prepare_model_state(self, rec: Record) -> Apply:
        """Subclass hook: read and check everything `save_model_state` wrote (raise
        `rec.fail(...)` on anything wrong) and return a step that only assigns it."""
        return lambda: None

    def state_loaded(self) -> None:
        """Subclass hook, after a load was applied: restart carried work if attached
        (`self.ctx`), else remember to do it in `attach`."""

    def _replay_msix_pending(self) -> None:
        """A pending bit of the saved device lives in the engine, which may not have it:
        raising the vector again sets it there (masked) or delivers it (unmasked), which
        is what the pending interrupt would have done."""
        if self.ctx is None or not self._replay_pending:
            return
        vectors, self._replay_pending = self._replay_pending, []
        for vector in vectors:
            if not self.ctx.irq.pending(IrqIndex.MSIX, vector):
                self.ctx.irq.trigger(IrqIndex.MSIX, vector)

    def close(self) -> None:
        for bar in self.bars.values():
            if isinstance(bar.backing, SharedMemory):
                bar.backing.close()

    # ------------------------------------------------------------------ helpers

    def command(self) -> Command:
        return Command(self.config.get(cfg.COMMAND, 2))

    def bus_master_enabled(self) -> bool:
        # plain ints, not `Command.MASTER in self.command()`: building the flag and testing
        # it was ~0.7 us per interrupt (every MSI/MSI-X raise asks)
        return self.config.get(cfg.COMMAND, 2) & _MASTER != 0

    def msi_enabled(self) -> bool:
        return self.msi is not None and self.msi.enabled

    def msix_enabled(self) -> bool:
        return self.msix is not None and self.msix.enabled

    def intx_asserted(self) -> bool:
        """The device's INTx level (what the Status interrupt bit shows)."""
        return self._intx_level

    def raise_irq(self, vector: int = 0) -> None:
        """Interrupt the guest through whichever mechanism it enabled (see module doc)."""
        if self.msix_enabled():
            assert self.msix is not None
            if vector >= self.msix.vectors:
                log.warning("%s: MSI-X vector %d out of range, dropped", self.name, vector)
            elif self._may_send_message("MSI-X"):
                self._trigger(IrqIndex.MSIX, vector)
        elif self.msi_enabled():
            assert self.msi is not None
            if vector >= self.msi.enabled_vectors:
                log.warning("%s: MSI vector %d not enabled, dropped", self.name, vector)
            elif self.msi.masked(vector):
                self.msi.set_pending(vector, True)
            elif self._may_send_message("MSI"):
                self._trigger(IrqIndex.MSI, vector)
        elif self.interrupt_pin:
            self._set_intx_level(True)
        else:
            log.debug("%s: interrupt with no mechanism enabled, dropped", self.name)

    def thread_irq(self, vector: int = 0) -> ThreadIrq | None:
        """`vector`'s MSI-X interrupt as a `ThreadIrq` a backend thread may raise itself,
        or None: MSI-X off, Bus Master off, no client, or an engine that cannot (then raise
        on the trio thread as usual). Give it back with `thread_irq_stands`."""
        msix, ctx = self.msix, self.ctx
        if (msix is None or not msix.enabled or vector >= msix.vectors or ctx is None
                or not self.bus_master_enabled()):
            return None
        get = getattr(ctx.irq, "thread_signal", None)
        return None if get is None else cast("ThreadIrq | None", get(IrqIndex.MSIX, vector))

    def thread_irq_stands(self, irq: ThreadIrq) -> bool:
        """On the trio thread, after the thread that held `irq` is back: let go of it, and
        True when the signal the thread sent was the right one; False when the interrupt's
        route changed meanwhile (MSI-X or Bus Master turned off, SET_IRQS, a mask) and the
        caller must raise it again the usual way (at worst a spurious one, never a lost
        one)."""
        return irq.settle() and self.msix_enabled() and self.bus_master_enabled()

    def lower_irq(self) -> None:
        """Deassert INTx (MSI and MSI-X are edges; nothing to lower)."""
        self._set_intx_level(False)

    # ------------------------------------------------------------------ internals

    def _may_send_message(self, kind: str) -> bool:
        if self.bus_master_enabled():
            return True
        log.debug("%s: %s while Bus Master is off, dropped", self.name, kind)
        return False

    def _trigger(self, index: IrqIndex, vector: int) -> None:
        if self.ctx is None:
            log.debug("%s: interrupt %s/%d with no client, dropped", self.name, index.name,
                      vector)
            return
        self.ctx.irq.trigger(index, vector)

    def _set_intx_level(self, level: bool) -> None:
        self._intx_level = level
        self.config.set_bits(cfg.STATUS, 2, Status.INTERRUPT, level)
        self._drive_intx()

    def _drive_intx(self) -> None:
        line = self._intx_level and not self.config.get(cfg.COMMAND, 2) & _INTX_DISABLE
        if self.ctx is None or line == self._intx_out:
            return
        self._intx_out = line
        self.ctx.irq.set_intx(line)

    def _config_write(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        touched = [
            (cap, self.config.read(cap.offset, cap.size))
            for cap in (*self.caps, *self.ext_caps)
            if cap.offset < end and offset < cap.offset + cap.size
        ]
        msi_was, msix_was = self.msi_enabled(), self.msix_enabled()
        self.config.write(offset, data)
        for cap, old in touched:
            cap.after_write(old)
        if (self.msi_enabled() and not msi_was) or (self.msix_enabled() and not msix_was):
            self._set_intx_level(False)
        self._drive_intx()
        if self.msi is not None and any(cap is self.msi for cap, _ in touched):
            self._deliver_unmasked_msi()

    def _deliver_unmasked_msi(self) -> None:
        msi = self.msi
        if msi is None or not msi.per_vector_mask or not msi.enabled:
            return
        for vector in range(msi.enabled_vectors):
            if msi.pending(vector) and not msi.masked(vector):
                msi.set_pending(vector, False)
                if self._may_send_message("MSI"):
                    self._trigger(IrqIndex.MSI, vector)

    @staticmethod
    def _check(offset: int, count: int, size: int, index: int) -> None:
        if offset < 0 or count < 0 or offset + count > size:
            raise DeviceError(errno.EINVAL, f"region {index}: 0x{offset:x}+{count} past end")

    def _bar(self, index: int, offset: int, count: int) -> Bar:
        bar = self.bars.get(index)
        if bar is None:
            raise DeviceError(errno.EINVAL, f"region {index} does not exist")
        self._check(offset, count, bar.size, index)
        return bar

    def _segments(
        self, bar: Bar, offset: int, count: int
    ) -> list[tuple[BarHandler | None, int, int]]:
        """Split an access into (handler, handler-relative offset, length) pieces."""
        traps = sorted(self._traps[bar.index], key=lambda t: t.offset)
        pieces: list[tuple[BarHandler | None, int, int]] = []
        pos, end = offset, offset + count
        while pos < end:
            trap = next((t for t in traps if t.offset <= pos < t.offset + t.size), None)
            if trap is not None:
                length = min(end, trap.offset + trap.size) - pos
                pieces.append((trap.handler, pos - trap.offset, length))
            else:
                nxt = min((t.offset for t in traps if t.offset > pos), default=end)
                length = min(end, nxt) - pos
                pieces.append((bar.backing, pos, length))
            pos += length
        return pieces

"""Declarative register banks for BARs.

A model lists its registers once, with fields and their access kinds, and the bank turns
that into the same per-byte masks config space uses (`bits.masked_write`), so any access
width or alignment behaves per field without the model writing decode logic::

    regs = RegisterBank([
        Register("CTRL", 0x00, fields=[Field("EN", 0), Field("RST", 1, access=Access.WO)],
                 on_write=self._ctrl_written),
        Register("STATUS", 0x04, fields=[Field("RDY", 0, access=Access.RO),
                                         Field("ERR", 1, access=Access.RW1C)]),
        Register("DOORBELL", 0x08, access=Access.WO, on_write=self._ring),
    ])

Access kinds:

* ``RW``   - the guest reads back what it wrote.
* ``RO``   - guest writes are ignored; the device changes it with `set`/`set_field`.
* ``RW1C`` - the device sets bits; the guest clears them by writing 1.
* ``WO``   - write-only pulses: the write hook sees the bits, then they clear; reads give 0.

Hooks run synchronously inside the region access (they must not block; start a task through
`ctx.start_task` for long work). Offsets no register covers read 0 and ignore writes.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .bits import BytesLike, get_le, masked_write, set_le


class Access(enum.Enum):
    RW = "rw"
    RO = "ro"
    RW1C = "rw1c"
    WO = "wo"


@dataclass(frozen=True)
class Field:
    """A bit field inside a register: `width` bits starting at bit `lsb`."""

    name: str
    lsb: int
    width: int = 1
    access: Access = Access.RW
    reset: int = 0

    @property
    def mask(self) -> int:
        return ((1 << self.width) - 1) << self.lsb


#: Called after a guest write with the register's new value (WO bits still visible).
WriteHook = Callable[[int], None]
#: Called before a guest read; returns the register's current value.
ReadHook = Callable[[], int]


class Register:
    """One register of 1, 2, 4 or 8 bytes.

    Without `fields` the whole register has one access kind (`access`) and power-on value
    `reset`; with fields, bits no field covers are reserved (read 0, ignore writes).
    """

    def __init__(
        self,
        name: str,
        offset: int,
        size: int = 4,
        *,
        access: Access = Access.RW,
        reset: int = 0,
        fields: Iterable[Field] | None = None,
        on_write: WriteHook | None = None,
        on_read: ReadHook | None = None,
    ) -> None:
        if size not in (1, 2, 4, 8):
            raise ValueError(f"register {name}: size {size} is not 1, 2, 4 or 8")
        if offset % size:
            raise ValueError(f"register {name}: offset 0x{offset:x} not aligned to {size}")
        self.name = name
        self.offset = offset
        self.size = size
        self.on_write = on_write
        self.on_read = on_read
        width = 8 * size
        all_bits = (1 << width) - 1
        if fields is None:
            fields = [Field(name, 0, width, access, reset)]
        self.fields: dict[str, Field] = {}
        self.masks: dict[Access, int] = dict.fromkeys(Access, 0)
        self.reset_value = 0
        taken = 0
        for f in fields:
            if f.mask & ~all_bits or f.mask & taken:
                raise ValueError(f"register {name}: field {f.name} overlaps or overflows")
            if f.reset & ~((1 << f.width) - 1):
                raise ValueError(f"register {name}: field {f.name} reset value too wide")
            taken |= f.mask
            self.fields[f.name] = f
            self.masks[f.access] |= f.mask
            self.reset_value |= f.reset << f.lsb

    @property
    def wmask(self) -> int:
        return self.masks[Access.RW] | self.masks[Access.WO]

    @property
    def w1cmask(self) -> int:
        return self.masks[Access.RW1C]

    @property
    def read_mask(self) -> int:
        return ((1 << (8 * self.size)) - 1) & ~self.masks[Access.WO]


class RegisterBank:
    """A block of registers served as a BAR (or part of one) through `read`/`write`."""

    def __init__(self, registers: Iterable[Register], size: int | None = None) -> None:
        self.registers: dict[str, Register] = {}
        regs = sorted(registers, key=lambda r: r.offset)
        end = 0
        for reg in regs:
            if reg.offset < end:
                raise ValueError(f"register {reg.name} overlaps the previous register")
            if reg.name in self.registers:
                raise ValueError(f"duplicate register name {reg.name}")
            self.registers[reg.name] = reg
            end = reg.offset + reg.size
        self.size = end if size is None else size
        if self.size < end:
            raise ValueError(f"bank size 0x{self.size:x} smaller than its registers")
        self._ordered = regs
        self._data = bytearray(self.size)
        self._wmask = bytearray(self.size)
        self._w1cmask = bytearray(self.size)
        self._rmask = bytearray(self.size)
        for reg in regs:
            set_le(self._wmask, reg.offset, reg.size, reg.wmask)
            set_le(self._w1cmask, reg.offset, reg.size, reg.w1cmask)
            set_le(self._rmask, reg.offset, reg.size, reg.read_mask)
        self.reset()

    def reset(self) -> None:
        """Every register back to its power-on value (hooks are not called)."""
        self._data[:] = bytes(self.size)
        for reg in self._ordered:
            set_le(self._data, reg.offset, reg.size, reg.reset_value)

    def snapshot(self) -> bytes:
        """Every register's current value, as the bank's bytes (for device state)."""
        return bytes(self._data)

    def restore(self, image: bytes) -> None:
        """Put back a `snapshot` of a bank of the same layout (hooks are not called)."""
        if len(image) != self.size:
            raise ValueError(f"bank image of {len(image)} bytes for a {self.size}-byte bank")
        self._data[:] = image

    # --- device side (no masks: hardware may change any bit) ---

    def __getitem__(self, name: str) -> int:
        reg = self.registers[name]
        return get_le(self._data, reg.offset, reg.size)

    def __setitem__(self, name: str, value: int) -> None:
        reg = self.registers[name]
        set_le(self._data, reg.offset, reg.size, value)

    def get_field(self, reg_name: str, field_name: str) -> int:
        f = self.registers[reg_name].fields[field_name]
        return (self[reg_name] & f.mask) >> f.lsb

    def set_field(self, reg_name: str, field_name: str, value: int) -> None:
        f = self.registers[reg_name].fields[field_name]
        if value & ~((1 << f.width) - 1):
            raise ValueError(f"{reg_name}.{field_name}: value {value:#x} too wide")
        self[reg_name] = (self[reg_name] & ~f.mask) | (value << f.lsb)

    # --- guest side ---

    def _touched(self, offset: int, count: int) -> list[Register]:
        end = offset + count
        return [r for r in self._ordered if r.offset < end and offset < r.offset + r.size]

    def read(self, offset: int, count: int) -> bytes:
        """Guest read of any width/alignment; bytes outside the bank read 0."""
        inside = max(0, min(count, self.size - offset))
        for reg in self._touched(offset, inside):
            if reg.on_read is not None:
                set_le(self._data, reg.offset, reg.size, reg.on_read())
        out = bytearray(count)
        for i in range(inside):
            out[i] = self._data[offset + i] & self._rmask[offset + i]
        return bytes(out)

    def write(self, offset: int, data: BytesLike) -> None:
        """Guest write of any width/alignment; bytes outside the bank are ignored."""
        inside = max(0, min(len(data), self.size - offset))
        if inside == 0:
            return
        masked_write(self._data, self._wmask, self._w1cmask, offset, memoryview(data)[:inside])
        for reg in self._touched(offset, inside):
            value = get_le(self._data, reg.offset, reg.size)
            try:
                if reg.on_write is not None:
                    reg.on_write(value)
            finally:
                wo = reg.masks[Access.WO]
                if wo:
                    # Pulses: a later partial write elsewhere must not re-trigger them.
                    current = get_le(self._data, reg.offset, reg.size)
                    set_le(self._data, reg.offset, reg.size, current & ~wo)

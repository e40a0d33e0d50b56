"""The interrupt capabilities, MSI and MSI-X, with the MSI-X table and PBA they point at.

They only describe and decode their registers; `PciDevice` drives them (delivery, masking,
pending bits), because which interrupt mechanism is live depends on all of them and on
INTx.
"""

from __future__ import annotations

from collections.abc import Callable

from .bits import BytesLike, get_le, is_power_of_two, masked_write
from .capability import Capability, CapId, align_up

# --------------------------------------------------------------------------- MSI


class MsiCap(Capability):
    """MSI capability (PCI 3.0, 6.8.1), 32- or 64-bit, with optional per-vector masking.

    ::

        31                           16 15            8 7             0
       +-------------------------------+---------------+---------------+
       |       Message Control         |   Next Ptr    |  Cap ID 0x05  | +0
       +-------------------------------+---------------+---------------+
       |                 Message Address [31:2]                    |00 | +4
       +---------------------------------------------------------------+
       |        Message Upper Address [63:32] (64-bit only)            | +8
       +-------------------------------+-------------------------------+
       |       (reserved, RO 0)        |         Message Data          | +8 / +0xc
       +-------------------------------+-------------------------------+
       |                  Mask Bits (per-vector masking only)          | +0xc / +0x10
       +---------------------------------------------------------------+
       |                  Pending Bits (per-vector masking only, RO)   | +0x10 / +0x14
       +---------------------------------------------------------------+

    Message Control: Enable[0] RW, Multiple Message Capable[3:1] RO, Multiple Message
    Enable[6:4] RW, 64-bit[7] RO, Per-vector masking[8] RO.
    """

    cap_id = CapId.MSI

    CONTROL = 2
    ADDRESS_LO = 4
    CTRL_ENABLE = 1 << 0
    CTRL_MMC_SHIFT = 1
    CTRL_MME_SHIFT = 4
    CTRL_MME_MASK = 0x7 << 4
    CTRL_64BIT = 1 << 7
    CTRL_MASKBIT = 1 << 8
    ADDRESS_LO_MASK = 0xFFFF_FFFC
    DATA_MASK = 0xFFFF
    MAX_VECTORS = 32

    def __init__(self, vectors: int = 1, *, addr64: bool = True, per_vector_mask: bool = False):
        super().__init__()
        if not is_power_of_two(vectors) or vectors > self.MAX_VECTORS:
            raise ValueError("MSI vectors must be a power of two up to 32")
        self.vectors = vectors
        self.addr64 = addr64
        self.per_vector_mask = per_vector_mask
        self.data_offset = 0xC if addr64 else 0x8
        self.mask_offset = self.data_offset + 4
        self.pending_offset = self.mask_offset + 4
        if per_vector_mask:
            self.size = self.pending_offset + 4
        else:
            self.size = self.data_offset + 2

    def build(self) -> None:
        ctrl = (self.vectors.bit_length() - 1) << self.CTRL_MMC_SHIFT
        ctrl |= self.CTRL_64BIT if self.addr64 else 0
        ctrl |= self.CTRL_MASKBIT if self.per_vector_mask else 0
        self.define(self.CONTROL, 2, ctrl, self.CTRL_ENABLE | self.CTRL_MME_MASK)
        self.define(self.ADDRESS_LO, 4, 0, self.ADDRESS_LO_MASK)
        if self.addr64:
            self.define(self.ADDRESS_LO + 4, 4, 0, 0xFFFF_FFFF)
        self.define(self.data_offset, 2, 0, self.DATA_MASK)
        if self.per_vector_mask:
            self.define(self.data_offset + 2, 2, 0)
            self.define(self.mask_offset, 4, 0, (1 << self.vectors) - 1)
            self.define(self.pending_offset, 4, 0)

    @property
    def enabled(self) -> bool:
        return bool(self.get(self.CONTROL, 2) & self.CTRL_ENABLE)

    @property
    def enabled_vectors(self) -> int:
        """Vectors the guest allocated (Multiple Message Enable), capped at what we offer."""
        mme = (self.get(self.CONTROL, 2) & self.CTRL_MME_MASK) >> self.CTRL_MME_SHIFT
        return min(1 << mme, self.vectors)

    @property
    def address(self) -> int:
        addr = self.get(self.ADDRESS_LO, 4)
        if self.addr64:
            addr |= self.get(self.ADDRESS_LO + 4, 4) << 32
        return addr

    @property
    def data(self) -> int:
        return self.get(self.data_offset, 2)

    def masked(self, vector: int) -> bool:
        return self.per_vector_mask and bool(self.get(self.mask_offset, 4) >> vector & 1)

    def pending(self, vector: int) -> bool:
        return self.per_vector_mask and bool(self.get(self.pending_offset, 4) >> vector & 1)

    def set_pending(self, vector: int, on: bool) -> None:
        if self.per_vector_mask:
            self.space.set_bits(self.offset + self.pending_offset, 4, 1 << vector, on)


# --------------------------------------------------------------------------- MSI-X


class MsixCap(Capability):
    """MSI-X capability (PCI 3.0, 6.8.2); the device serves its table and PBA in BARs.

    ::

        31                           16 15            8 7             0
       +-------------------------------+---------------+---------------+
       |       Message Control         |   Next Ptr    |  Cap ID 0x11  | +0
       +-------------------------------+---------------+-----------+---+
       |                 Table Offset [31:3]                       |BIR| +4
       +-----------------------------------------------------------+---+
       |                 PBA Offset [31:3]                         |BIR| +8
       +-----------------------------------------------------------+---+

    Message Control: Table Size[10:0] RO (N-1), Function Mask[14] RW, Enable[15] RW.

    Table entry (16 bytes each)::

       +-------------------+-------------------+-------------------+-------------------+
       | Msg Address [31:2]| Msg Upper Address |   Message Data    |  Vector Control   |
       +-------------------+-------------------+-------------------+-------------------+

    The table is plain memory here (QEMU emulates it itself and never forwards table
    accesses; a conforming client may still read it). Masking and pending state belong to
    the engine (SET_IRQS MASK/UNMASK), so PBA reads report `ctx.irq.pending`.
    """

    cap_id = CapId.MSIX
    size = 12

    CONTROL = 2
    TABLE = 4
    PBA = 8
    CTRL_TABLE_SIZE_MASK = 0x7FF
    CTRL_FUNCTION_MASK = 1 << 14
    CTRL_ENABLE = 1 << 15
    BIR_MASK = 0x7
    ENTRY_SIZE = 16
    ENTRY_ADDR_LO = 0
    ENTRY_ADDR_HI = 4
    ENTRY_DATA = 8
    ENTRY_CTRL = 12
    ENTRY_CTRL_MASKED = 1
    MAX_VECTORS = 2048
    QWORD = 8

    def __init__(
        self,
        vectors: int,
        *,
        table_bar: int,
        table_offset: int = 0,
        pba_bar: int | None = None,
        pba_offset: int | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= vectors <= self.MAX_VECTORS:
            raise ValueError("MSI-X vectors must be 1..2048")
        self.vectors = vectors
        self.table_bar = table_bar
        self.table_offset = table_offset
        self.table_size = vectors * self.ENTRY_SIZE
        self.pba_bar = table_bar if pba_bar is None else pba_bar
        if pba_offset is None:
            pba_offset = table_offset + self.table_size if self.pba_bar == table_bar else 0
        self.pba_offset = pba_offset
        self.pba_size = align_up(vectors, 64) // 8
        if table_offset % self.QWORD or pba_offset % self.QWORD:
            raise ValueError("MSI-X table and PBA offsets must be 8-byte aligned")
        if self.pba_bar == table_bar and (
            pba_offset < table_offset + self.table_size
            and table_offset < pba_offset + self.pba_size
        ):
            raise ValueError("MSI-X table and PBA overlap")
        self.table = MsixTable(vectors)
        #: set by PciDevice: where PBA reads get pending bits from
        self.pending_source: Callable[[int], bool] = lambda vector: False
        self.pba = MsixPba(self)

    def build(self) -> None:
        ctrl = self.vectors - 1
        self.define(self.CONTROL, 2, ctrl, self.CTRL_FUNCTION_MASK | self.CTRL_ENABLE)
        self.define(self.TABLE, 4, self.table_offset | self.table_bar)
        self.define(self.PBA, 4, self.pba_offset | self.pba_bar)

    @property
    def enabled(self) -> bool:
        return bool(self.get(self.CONTROL, 2) & self.CTRL_ENABLE)

    @property
    def function_masked(self) -> bool:
        return bool(self.get(self.CONTROL, 2) & self.CTRL_FUNCTION_MASK)


class MsixTable:
    """The MSI-X table as plain memory with the spec's per-field write masks."""

    def __init__(self, vectors: int) -> None:
        entry = MsixCap.ENTRY_SIZE
        self.size = vectors * entry
        self._data = bytearray(self.size)
        self._wmask = bytearray(self.size)
        self._w1c = bytes(self.size)
        for v in range(vectors):
            base = v * entry
            self._wmask[base : base + entry] = (
                (0xFFFF_FFFC).to_bytes(4, "little")
                + (0xFFFF_FFFF).to_bytes(4, "little")
                + (0xFFFF_FFFF).to_bytes(4, "little")
                + MsixCap.ENTRY_CTRL_MASKED.to_bytes(4, "little")
            )
        self.reset()

    def reset(self) -> None:
        """Power-on state: every vector masked, everything else 0 (PCI 3.0 6.8.2.9)."""
        self._data[:] = bytes(self.size)
        for base in range(0, self.size, MsixCap.ENTRY_SIZE):
            self._data[base + MsixCap.ENTRY_CTRL] = MsixCap.ENTRY_CTRL_MASKED

    def snapshot(self) -> bytes:
        return bytes(self._data)

    def restore(self, image: bytes) -> None:
        if len(image) != self.size:
            raise ValueError(f"MSI-X table image of {len(image)} bytes, expected {self.size}")
        self._data[:] = image

    def entry(self, vector: int) -> tuple[int, int, bool]:
        """(address, data, masked) of one vector."""
        base = vector * MsixCap.ENTRY_SIZE
        addr = get_le(self._data, base + MsixCap.ENTRY_ADDR_LO, 8)
        data = get_le(self._data, base + MsixCap.ENTRY_DATA, 4)
        ctrl = get_le(self._data, base + MsixCap.ENTRY_CTRL, 4)
        return addr, data, bool(ctrl & MsixCap.ENTRY_CTRL_MASKED)

    def read(self, offset: int, count: int) -> bytes:
        return bytes(self._data[offset : offset + count])

    def write(self, offset: int, data: BytesLike) -> None:
        masked_write(self._data, self._wmask, self._w1c, offset, data)


class MsixPba:
    """The Pending Bit Array: read-only, built from the engine's pending state."""

    def __init__(self, cap: MsixCap) -> None:
        self.cap = cap
        self.size = cap.pba_size

    def read(self, offset: int, count: int) -> bytes:
        bits = 0
        for vector in range(self.cap.vectors):
            if self.cap.pending_source(vector):
                bits |= 1 << vector
        image = bits.to_bytes(self.size, "little")
        return image[offset : offset + count]

    def write(self, offset: int, data: BytesLike) -> None:
        """The PBA is read-only; writes are ignored."""


# --------------------------------------------------------------------------- PCIe


"""NVMe controller: the PCI function and its register surface (BAR0), nothing more.

Why this split: a register access must be answered at once (QEMU holds its big lock while
the vCPU waits for our reply, and the engine serves it synchronously), so this module only
decodes it, records what the guest asked for and wakes the worker (`worker.Worker`), which
runs the queues and commands. It mirrors openvmm's `pci.rs`. The worker sees this class
only through `port.ControllerPort`.

PCI function::

    class 01:08:02 (mass storage / NVM / NVMe), INTA for the INTx fallback
    BAR0/1  64-bit memory, controller registers at 0x0, doorbells from 0x1000
    BAR4    MSI-X table at 0x0 and PBA right after it (their own BAR)
    caps    PCI Express endpoint, MSI-X (one vector per completion queue)

With ``interrupts=msi`` the function has one MSI vector instead (every CQ on vector 0) and
no BAR4: QEMU 11.1's vfio-user-pci aborts when the guest ejects a function with MSI-X, so
this is the variant to hot-unplug there (docs/operations.md, "Hot-plug with QEMU").

Register layout and field meanings: `spec`. Behaviour of the registers here:

* CC.EN 0->1 asks the worker to enable (it reads AQA/ASQ/ACQ/CC then, builds the admin
  queues and sets CSTS.RDY); 1->0 asks for a controller reset (in-flight commands are
  aborted, queues deleted, then RDY clears). The guest polls RDY, so nothing here waits.
* CC.SHN != 0 sets CSTS.SHST = occurring at once; the worker completes outstanding I/O,
  flushes every backend and sets SHST = complete (CSTS.CFS instead if a flush fails).
* INTMS/INTMC set and clear the INTx mask (ignored by the spec while MSI-X is on); both
  read back the mask.
* A doorbell write records the new SQ tail or CQ head and wakes the worker; an invalid
  value is logged and ignored (the spec's asynchronous "invalid doorbell" event is not
  generated).
* NSSR is reserved (CAP.NSSRS = 0): writes are ignored, reads return 0.
"""

from __future__ import annotations

import logging
from pathlib import Path

from devices.sdk import (
    INTA,
    Access,
    Apply,
    Bank,
    Bar,
    BarKind,
    CallbackHandler,
    DeviceContext,
    Field,
    Flag,
    IrqIndex,
    MsiCap,
    MsixCap,
    OptionSpec,
    PciDevice,
    PcieCap,
    PciIdentity,
    Record,
    Register,
    RegisterBank,
    SizeList,
    UInt,
    Value,
)
from devices.sdk.options import parse_size
from devices.sdk.storage import BlockBackend, FileBackend, MemoryBackend

from . import identify as idf
from .command import Namespace
from .port import CcFields
from .queue import MAX_QUEUE_ENTRIES, doorbell_decode
from .spec import (
    CAP_CQR,
    CAP_CSS_NVM,
    CAP_DSTRD_SHIFT,
    CAP_MPSMAX_SHIFT,
    CAP_MPSMIN_SHIFT,
    CAP_TO_SHIFT,
    CC_EN,
    CC_SHN_MASK,
    CC_SHN_SHIFT,
    DOORBELL_BASE,
    VERSION_1_4,
    Reg,
    Shst,
)
from .state import prepare_worker, save_worker
from .worker import Worker

log = logging.getLogger(__name__)

VENDOR_ID = 0x1234  # QEMU's "unassigned" vendor ID, as edu uses
DEVICE_ID = 0x4E56  # "NV"
CLASS_NVME = 0x010802
SUBSYSTEM_VENDOR_ID = 0x1AF4
SUBSYSTEM_ID = 0x1100
MSIX_BAR = 4
#: CAP.TO: worst case time to RDY in 500 ms units (the worker needs milliseconds)
TIMEOUT_UNITS = 20
MPS_MAX = 4  # 64 KiB pages
DEFAULT_SIZE = 64 << 20
DEFAULT_SERIAL = "VFUNVME0001"
AERL = 3
ACL = 3


#: default `poll_us`: off. Polling the shadow SQ tail (devices/nvme/polling.py) caught ~80%
#: of a TCG guest's sequential reads without a doorbell, but on a 2-CPU host the spinning
#: server took the CPU from QEMU's main loop and vCPU and reads got slower (README.md);
#: worth trying with `poll_us=1000` where the server has a CPU of its own.
POLL_US = 0
MAX_POLL_US = 100_000


def _pow2_at_least(n: int, minimum: int) -> int:
    size = minimum
    while size < n:
        size <<= 1
    return size


class Nvme(PciDevice):
    """NVMe 1.4 controller with file- or memory-backed namespaces (see module docstring)."""

    name = "nvme"
    description = "NVMe 1.4 controller; namespaces backed by raw image files or memory"
    options = (
        OptionSpec("backing", str, "",
                   "raw image file(s), ':'-separated, one namespace each (created and sized "
                   "on demand); empty: memory"),
        OptionSpec("size", SizeList, "",
                   "namespace size(s), ':'-separated or one for all (e.g. 1G); default: the "
                   "file's size, or 64M"),
        OptionSpec("namespaces", int, 0,
                   "number of namespaces (default: one per backing file, or 1)"),
        OptionSpec("serial", str, DEFAULT_SERIAL, "controller serial number (20 chars max)"),
        OptionSpec("queues", int, 64, "I/O queue pairs offered (MSI-X vectors: queues + 1)"),
        OptionSpec("dstrd", int, 0, "doorbell stride exponent CAP.DSTRD (stride 4 << n)"),
        OptionSpec("mdts", int, 8, "maximum data transfer size, 2^n pages (0: no limit)"),
        OptionSpec("lba_size", int, 512, "logical block size: 512 or 4096"),
        OptionSpec("poll_us", int, POLL_US,
                   "after a doorbell, poll the shadow SQ tail up to this many µs (adaptive; "
                   "0: off)"),
        OptionSpec("interrupts", str, "msix",
                   "msix (one vector per completion queue, in BAR4) or msi (one vector, "
                   "no BAR4: for QEMU <= 11.1 hot-unplug, see docs/operations.md)"),
    )
    identity = PciIdentity(
        vendor_id=VENDOR_ID,
        device_id=DEVICE_ID,
        class_code=CLASS_NVME,
        revision=0x02,
        subsystem_vendor_id=SUBSYSTEM_VENDOR_ID,
        subsystem_id=SUBSYSTEM_ID,
    )
    interrupt_pin = INTA
    # Device state (docs/device-state.md): PCI config, MSI-X and BAR4 are saved by the
    # SDK; BAR0's registers sit behind our own handler, so the bank is declared here; the
    # worker's queues, features and carried commands are `state.save_worker`'s.
    state_version = 1
    state_fields = (
        UInt("stride", 16, match=True),
        Bank("regs"),
        UInt("intmask", 32),
        Flag("_cc_en"),
        Flag("_cc_shn"),
    )

    def __init__(
        self,
        backing: str = "",
        size: str = "",
        namespaces: int = 0,
        serial: str = DEFAULT_SERIAL,
        queues: int = 64,
        dstrd: int = 0,
        mdts: int = 8,
        lba_size: int = 512,
        interrupts: str = "msix",
        poll_us: int = POLL_US,
    ) -> None:
        if not 1 <= queues <= 1024:
            raise ValueError("queues must be 1..1024")
        if not 0 <= dstrd <= 8:
            raise ValueError("dstrd must be 0..8")
        if lba_size not in (512, 4096):
            raise ValueError("lba_size must be 512 or 4096")
        if not 0 <= mdts <= 12:
            raise ValueError("mdts must be 0..12")
        if not serial or len(serial) > 20 or not serial.isascii():
            raise ValueError("serial must be 1..20 ASCII characters")
        if interrupts not in ("msix", "msi"):
            raise ValueError("interrupts must be msix or msi")
        if not 0 <= poll_us <= MAX_POLL_US:
            raise ValueError(f"poll_us must be 0..{MAX_POLL_US}")
        self.stride = 4 << dstrd
        self.mqes = MAX_QUEUE_ENTRIES - 1
        self.mps_max = MPS_MAX
        # With MSI the function has one vector: Linux then puts every CQ on vector 0.
        self.vectors = min(queues + 1, MsixCap.MAX_VECTORS) if interrupts == "msix" else 1
        self.intmask = 0
        self._cc_en = False
        self._cc_shn = False
        lba_shift = lba_size.bit_length() - 1
        ns_map = self._build_namespaces(backing, size, namespaces, serial, lba_shift)

        cap = (
            self.mqes
            | CAP_CQR
            | (TIMEOUT_UNITS << CAP_TO_SHIFT)
            | (dstrd << CAP_DSTRD_SHIFT)
            | CAP_CSS_NVM
            | (0 << CAP_MPSMIN_SHIFT)
            | (MPS_MAX << CAP_MPSMAX_SHIFT)
        )
        self.regs = RegisterBank([
            Register("CAP", Reg.CAP, 8, access=Access.RO, reset=cap),
            Register("VS", Reg.VS, access=Access.RO, reset=VERSION_1_4),
            Register("INTMS", Reg.INTMS, on_write=self._intms, on_read=self._read_intmask),
            Register("INTMC", Reg.INTMC, on_write=self._intmc, on_read=self._read_intmask),
            Register("CC", Reg.CC, fields=[
                Field("EN", 0), Field("CSS", 4, 3), Field("MPS", 7, 4), Field("AMS", 11, 3),
                Field("SHN", 14, 2), Field("IOSQES", 16, 4), Field("IOCQES", 20, 4),
            ], on_write=self._cc_written),
            Register("CSTS", Reg.CSTS, fields=[
                Field("RDY", 0, access=Access.RO), Field("CFS", 1, access=Access.RO),
                Field("SHST", 2, 2, access=Access.RO), Field("NSSRO", 4, access=Access.RW1C),
                Field("PP", 5, access=Access.RO),
            ], on_read=self._csts_read),
            Register("NSSR", Reg.NSSR, access=Access.RO),
            Register("AQA", Reg.AQA, fields=[Field("ASQS", 0, 12), Field("ACQS", 16, 12)]),
            Register("ASQ", Reg.ASQ, 8, fields=[Field("ASQB", 12, 52)]),
            Register("ACQ", Reg.ACQ, 8, fields=[Field("ACQB", 12, 52)]),
            Register("CMBLOC", Reg.CMBLOC, access=Access.RO),
            Register("CMBSZ", Reg.CMBSZ, access=Access.RO),
        ])
        bar0_size = _pow2_at_least(DOORBELL_BASE + 2 * (queues + 1) * self.stride, 0x4000)
        bars = [Bar(0, bar0_size, BarKind.MEM64,
                    backing=CallbackHandler(self._mmio_read, self._mmio_write))]
        irq_cap: MsixCap | MsiCap
        if interrupts == "msix":
            irq_cap = MsixCap(self.vectors, table_bar=MSIX_BAR, table_offset=0)
            bars.append(Bar(MSIX_BAR, _pow2_at_least(irq_cap.pba_offset + irq_cap.pba_size,
                                                     0x1000)))
        else:
            irq_cap = MsiCap(1)
        super().__init__(bars=bars, caps=[PcieCap(), irq_cap])
        info = idf.ControllerInfo(
            vendor_id=VENDOR_ID,
            subsystem_vendor_id=SUBSYSTEM_VENDOR_ID,
            serial=serial,
            model="vfiouser-srv NVMe",
            firmware="1.0",
            mdts=mdts,
            num_namespaces=max(ns_map),
            aerl=AERL,
            acl=ACL,
        )
        self.worker = Worker(self, ns_map, info, max_queues=queues, stride=self.stride,
                             poll_us=poll_us)

    @staticmethod
    def _build_namespaces(backing: str, size: str, count: int, serial: str,
                          lba_shift: int) -> dict[int, Namespace]:
        paths = [p for p in backing.split(":") if p] if backing else []
        n = count or len(paths) or 1
        if paths and len(paths) != n:
            raise ValueError(f"{len(paths)} backing files for {n} namespaces")
        sizes_text = [s for s in size.split(":") if s] if size else []
        if len(sizes_text) not in (0, 1, n):
            raise ValueError(f"{len(sizes_text)} sizes for {n} namespaces")
        sizes = [parse_size(s) for s in sizes_text]
        if len(sizes) == 1:
            sizes *= n
        out: dict[int, Namespace] = {}
        try:
            for i in range(n):
                want = sizes[i] if sizes else 0
                if want % (1 << lba_shift):
                    raise ValueError(f"size {want} is not a multiple of the block size")
                backend: BlockBackend
                if paths:
                    backend = FileBackend(Path(paths[i]), want or (
                        0 if Path(paths[i]).exists() and Path(paths[i]).stat().st_size
                        else DEFAULT_SIZE))
                else:
                    backend = MemoryBackend(want or DEFAULT_SIZE)
                nsid = i + 1
                out[nsid] = Namespace(nsid, backend, lba_shift,
                                      idf.namespace_guid(serial, nsid),
                                      idf.namespace_uuid(serial, nsid))
        except BaseException:
            for ns in out.values():
                ns.backend.close()
            raise
        return out

    # ------------------------------------------------------------------ BAR0

    def _mmio_read(self, offset: int, count: int) -> bytes:
        if offset >= DOORBELL_BASE:
            return bytes(count)  # doorbells are write-only
        return self.regs.read(offset, count)

    def _mmio_write(self, offset: int, data: bytes) -> None:
        if offset < DOORBELL_BASE:
            self.regs.write(offset, data)
            return
        if len(data) != 4:
            log.debug("nvme: %d-byte doorbell write at %#x ignored", len(data), offset)
            return
        where = doorbell_decode(offset - DOORBELL_BASE, self.stride)
        if where is None:
            return
        qid, completion = where
        value = int.from_bytes(data, "little")
        if completion:
            self.worker.cq_doorbell(qid, value)
        else:
            self.worker.sq_doorbell(qid, value)

    def _csts_read(self) -> int:
        """The guest polls CSTS while it waits for us: if a state change is still owed and
        the worker is not running (the engine cancelled it since), start it again."""
        w = self.worker
        if not w.running and (w.reset_pending or w.shutdown_pending
                              or w.want_enable != w.enabled):
            w.kick()
        return self.regs["CSTS"]

    def _read_intmask(self) -> int:
        return self.intmask

    def _intms(self, value: int) -> None:
        self.intmask |= value
        self.worker.update_intx()

    def _intmc(self, value: int) -> None:
        self.intmask &= ~value
        self.worker.update_intx()

    def _cc_written(self, value: int) -> None:
        en = bool(value & CC_EN)
        shn = bool((value >> CC_SHN_SHIFT) & CC_SHN_MASK)
        if en != self._cc_en:
            self._cc_en = en
            if en:
                self.set_csts(shst=Shst.NORMAL)
                self.worker.request_enable()
            else:
                self.worker.request_disable()
        if shn and not self._cc_shn:
            self.set_csts(shst=Shst.OCCURRING)
            self.worker.request_shutdown()
        self._cc_shn = shn

    # ------------------------------------------------------------------ worker side

    def cc_fields(self) -> CcFields:
        r = self.regs
        return CcFields(
            css=r.get_field("CC", "CSS"),
            mps=r.get_field("CC", "MPS"),
            iosqes=r.get_field("CC", "IOSQES"),
            iocqes=r.get_field("CC", "IOCQES"),
            asqs=r.get_field("AQA", "ASQS") + 1,
            acqs=r.get_field("AQA", "ACQS") + 1,
            asq=r.get_field("ASQ", "ASQB") << 12,
            acq=r.get_field("ACQ", "ACQB") << 12,
        )

    @property
    def csts_cfs(self) -> bool:
        return bool(self.regs.get_field("CSTS", "CFS"))

    def set_csts(self, *, rdy: bool | None = None, cfs: bool | None = None,
                 shst: int | None = None) -> None:
        if rdy is not None:
            self.regs.set_field("CSTS", "RDY", int(rdy))
        if cfs is not None:
            self.regs.set_field("CSTS", "CFS", int(cfs))
        if shst is not None:
            self.regs.set_field("CSTS", "SHST", shst)

    # ------------------------------------------------------------------ device state

    async def quiesce(self) -> None:
        """Stop fetching commands, let those in flight complete, flush every namespace."""
        await self.worker.quiesce()

    def resume(self) -> None:
        self.worker.resume()

    def save_model_state(self) -> dict[str, Value]:
        return {"worker": save_worker(self.worker)}

    def prepare_model_state(self, rec: Record) -> Apply:
        return prepare_worker(self.worker, rec.record("worker"), vectors=self.vectors,
                              mps_max=self.mps_max)

    def state_loaded(self) -> None:
        """The loaded queues may hold submissions nobody will ring for again: run the
        worker now, or as soon as a client is attached."""
        if self.ctx is not None:
            self.worker.kick()
        else:
            self.worker.restart_on_attach = True

    def attach(self, ctx: DeviceContext) -> None:
        super().attach(ctx)
        self.worker.quiescing = False
        if self.worker.restart_on_attach:
            self.worker.restart_on_attach = False
            self.worker.kick()

    # ------------------------------------------------------------------ DeviceModel

    def irq_unmasked(self, index: int, vector: int) -> None:
        if index == IrqIndex.INTX:
            self.worker.update_intx()

    def on_reset(self) -> None:
        """Function-level reset: tasks are gone; registers and queues back to power-on."""
        self.regs.reset()
        self.intmask = 0
        self._cc_en = False
        self._cc_shn = False
        self.worker.power_on()

    def close(self) -> None:
        """Close the backends. No fdatasync here: this may run on the trio thread, and what
        the guest asked to be durable already is (Flush, FUA, shutdown); the rest stays in
        the host's page cache, which outlives this process."""
        for ns in self.worker.namespaces.values():
            ns.backend.close()
        super().close()

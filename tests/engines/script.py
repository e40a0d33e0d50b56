"""The scripted client session that both engines must answer alike.

`run_script(path)` connects like QEMU would and walks the device through its life: VERSION,
DEVICE_GET_INFO, every region and IRQ info, config space, edu's registers, DMA_MAP of a
shared (mmap-able) and an unshared (message-mode) window, device DMA in both directions on
both, SET_IRQS with an INTx eventfd and the interrupt that DMA completion raises, reset, and
unmap. Every reply is recorded as plain data under a step name, so two runs compare with ==
and a difference points at the step.

Synchronisation never sleeps: after starting a DMA the script waits for the device's
interrupt before sending anything else. That is also what keeps message-mode DMA sound on
libvfio-user, whose blocking DMA_READ/WRITE expects the next message on the socket to be
its reply (see PARITY_DIFFERENCES).
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from devices.edu import DMA_START, Reg
from protocol import IrqSetFlags, Version
from vfiouser_srv.client import (
    Client,
    VfioUserError,
    make_eventfd,
    open_client,
    read_eventfd_nowait,
    wait_eventfd,
)

BAR0 = 0
CONFIG = 7
INTX = 0
#: guest RAM: a shared window (mmap on the server) and an unshared one (DMA messages)
SHARED_RAM = (0x100000, 0x10000)
MESSAGE_RAM = (0x200000, 0x1000)
DMA_LEN = 64
#: edu DMA command bits
RUN, TO_RAM, RAISE = 0x1, 0x2, 0x4
PCI_COMMAND = 0x04
MEMORY_AND_BUS_MASTER = 0x6

Record = dict[str, Any]


def _u32(value: int) -> bytes:
    return struct.pack("<I", value)


def _u64(value: int) -> bytes:
    return struct.pack("<Q", value)


async def _errno_of(call: Awaitable[Any]) -> Any:
    """The reply, or ("errno", n) for an error reply: errors are replies too."""
    try:
        return await call
    except VfioUserError as exc:
        return ("errno", exc.errno)


def _caps(v: Version) -> dict[str, Any]:
    c = v.capabilities
    return {
        "max_msg_fds": c.max_msg_fds,
        "max_data_xfer_size": c.max_data_xfer_size,
        "pgsizes": c.pgsizes,
        "max_dma_maps": c.max_dma_maps,
    }


async def run_script(path: str, on_step: Callable[[str], None] | None = None) -> Record:
    out: Record = {}

    def note(step: str, value: Any) -> None:
        out[step] = value
        if on_step is not None:
            on_step(step)

    async with open_client(path, version=False, reply_timeout=10.0) as c:
        v = await c.version()
        note("version", {"major": v.major, "minor": v.minor})
        note("version.caps", _caps(v))
        info = await c.device_get_info()
        note(
            "device_info",
            {"flags": info.flags, "num_regions": info.num_regions, "num_irqs": info.num_irqs},
        )
        for i in range(9):
            r = await c.region_info(i)
            if r.fd is not None:
                r.fd.close()
            note(
                f"region_info.{i}",
                {
                    "flags": r.flags,
                    "size": r.size,
                    "offset": r.offset,
                    "caps": r.caps,
                    "fd": r.fd is not None,
                },
            )
        for i in range(5):
            q = await c.irq_info(i)
            note(f"irq_info.{i}", {"flags": q.flags, "count": q.count})
        note("config.header", (await c.region_read(CONFIG, 0, 64)).hex())
        note("config.all", (await c.region_read(CONFIG, 0, 256)).hex())
        await _registers(c, note)
        await _errors(c, note)
        await _dma_and_irq(c, note)
        await c.device_reset()
        note("reset", "ok")
        note("after_reset.liveness", await c.region_read(BAR0, Reg.LIVENESS, 4))
        note("after_reset.dma_buf_cmd", await c.region_read(BAR0, Reg.DMA_CMD, 8))
        note("unmap.one", await _errno_of(c.dma_unmap(*MESSAGE_RAM)))
        note("unmap.missing", await _errno_of(c.dma_unmap(0x900000, 0x1000)))
        note("unmap.all", await _errno_of(c.dma_unmap_all()))
    return out


async def _registers(c: Client, note: Callable[[str, Any], None]) -> None:
    note("edu.id", await c.region_read(BAR0, Reg.ID, 4))
    await c.region_write(BAR0, Reg.LIVENESS, _u32(0x12345678))
    note("edu.liveness", await c.region_read(BAR0, Reg.LIVENESS, 4))
    await c.region_write(BAR0, Reg.FACTORIAL, _u32(10))
    note("edu.factorial", await c.region_read(BAR0, Reg.FACTORIAL, 4))
    await c.region_write(BAR0, Reg.LIVENESS, _u32(1), posted=True)
    note("edu.posted_write", await c.region_read(BAR0, Reg.LIVENESS, 4))
    note("edu.wide_read", await c.region_read(BAR0, Reg.DMA_SRC, 8))
    note("edu.odd_size_read", await c.region_read(BAR0, Reg.ID, 2))


async def _errors(c: Client, note: Callable[[str, Any], None]) -> None:
    note("err.read_past_end", await _errno_of(c.region_read(BAR0, (1 << 20) - 2, 4)))
    note("err.read_missing_region", await _errno_of(c.region_read(3, 0, 4)))
    note("err.region_info_index", await _errno_of(c.region_info(42)))
    note("err.irq_info_index", await _errno_of(c.irq_info(9)))


async def _dma_and_irq(c: Client, note: Callable[[str, Any], None]) -> None:
    await c.memory.add_ram(*SHARED_RAM, shared=True)
    note("dma_map.shared", "ok")
    await c.memory.add_ram(*MESSAGE_RAM, shared=False)
    note("dma_map.message", "ok")
    note("dma_map.overlap", await _errno_of(c.dma_map(SHARED_RAM[0], 0x1000)))
    # Memory space + Bus Master on, as the guest driver does before DMA.
    await c.region_write(CONFIG, PCI_COMMAND, struct.pack("<H", MEMORY_AND_BUS_MASTER))
    note("config.command", await c.region_read(CONFIG, PCI_COMMAND, 2))
    efd = make_eventfd()
    try:
        await c.set_irq_eventfds(INTX, 0, [efd])
        note("set_irqs.intx", "ok")
        pattern = bytes(range(DMA_LEN))
        c.memory.write(SHARED_RAM[0], pattern)
        c.memory.write(MESSAGE_RAM[0], pattern[::-1])
        # RAM -> device buffer (read from the mmap'd window), interrupt on completion
        await _edu_dma(c, efd, SHARED_RAM[0], DMA_START, RUN | RAISE)
        note("dma.irq_status", await c.region_read(BAR0, Reg.IRQ_STATUS, 4))
        await _ack(c)
        # device buffer -> RAM in the message-mode window (DMA_WRITE messages)
        await _edu_dma(c, efd, DMA_START, MESSAGE_RAM[0] + 0x100, RUN | TO_RAM | RAISE)
        await _ack(c)
        note("dma.to_message_ram", c.memory.read(MESSAGE_RAM[0] + 0x100, DMA_LEN) == pattern)
        # message-mode window -> device buffer (DMA_READ messages), then back to shared RAM
        await _edu_dma(c, efd, MESSAGE_RAM[0], DMA_START, RUN | RAISE)
        await _ack(c)
        await _edu_dma(c, efd, DMA_START, SHARED_RAM[0] + 0x800, RUN | TO_RAM | RAISE)
        await _ack(c)
        note("dma.round_trip", c.memory.read(SHARED_RAM[0] + 0x800, DMA_LEN) == pattern[::-1])
        note("dma.served_messages", (c.memory.dma_reads > 0, c.memory.dma_writes > 0))
        # A raised interrupt with INTx masked by the client stays pending until unmasked.
        await c.set_irqs(INTX, IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_MASK, 0, 1)
        await c.region_write(BAR0, Reg.IRQ_RAISE, _u32(0x1000))
        note("irq.masked_raise", read_eventfd_nowait(efd))
        await c.set_irqs(INTX, IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_UNMASK, 0, 1)
        with trio.fail_after(5):
            note("irq.after_unmask", await wait_eventfd(efd))
        await c.region_write(BAR0, Reg.IRQ_ACK, _u32(0x1000))
        await c.disable_irqs(INTX)
        note("set_irqs.disable", "ok")
    finally:
        efd.close()


async def _edu_dma(c: Client, efd: Any, src: int, dst: int, cmd: int) -> None:
    await c.region_write(BAR0, Reg.DMA_SRC, _u64(src))
    await c.region_write(BAR0, Reg.DMA_DST, _u64(dst))
    await c.region_write(BAR0, Reg.DMA_CNT, _u64(DMA_LEN))
    await c.region_write(BAR0, Reg.DMA_CMD, _u64(cmd))
    await wait_eventfd(efd, timeout=5.0)


async def _ack(c: Client) -> None:
    """Acknowledge edu's DMA interrupt and let INTx fire again (the guest's EOI)."""
    await c.region_write(BAR0, Reg.IRQ_ACK, _u32(0x100))
    await c.set_irqs(INTX, IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_UNMASK, 0, 1)

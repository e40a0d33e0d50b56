"""Interrupts through the real client: GET_IRQ_INFO, SET_IRQS validation, eventfds that
really fire, MSI-X masking with PBA pending bits, INTx automask, de-assign and disable."""

from __future__ import annotations

import errno
import os
import struct

import pytest
import trio

from devices.sdk.interface import IrqIndex, RegionIndex
from protocol import IrqInfoFlags, IrqSetFlags
from vfiouser_srv.client import (
    Client,
    VfioUserError,
    make_eventfd,
    read_eventfd_nowait,
    wait_eventfd,
)
from vfiouser_srv.fds import OwnedFd
from vfiouser_srv.server import Server

from ..engines.params import ENGINE_PARAMS
from . import models
from .conftest import (
    MakeServer,
    count_fds,
    irq_table_of,
    open_client,
    python_engine_only,
    settle,
)
from .models import Scratch

# Every test runs on both engines (tests/engines/params.py) unless marked python_engine_only;
# where the engines differ (vfiouser_srv/engines/libvfio_user/_parity.py) the test asserts
# what each engine does.
pytestmark = [
    pytest.mark.usefixtures("no_fd_leak"),
    pytest.mark.parametrize("engine", ENGINE_PARAMS),
]
LIBVFIO_USER = "libvfio-user"

BAR0 = int(RegionIndex.BAR0)
BAR2 = int(RegionIndex.BAR2)
CONFIG = int(RegionIndex.CONFIG)
INTX, MSI, MSIX, ERR, REQ = (int(i) for i in IrqIndex)

NONE = IrqSetFlags.DATA_NONE
BOOL = IrqSetFlags.DATA_BOOL
EVENTFD = IrqSetFlags.DATA_EVENTFD
MASK = IrqSetFlags.ACTION_MASK
UNMASK = IrqSetFlags.ACTION_UNMASK
TRIGGER = IrqSetFlags.ACTION_TRIGGER

CAP_PTR = 0x34
CAP_ID_MSI = 0x05
CAP_ID_MSIX = 0x11
PCI_COMMAND = 0x04
PCI_STATUS = 0x06
CMD_MEMORY = 0x2
CMD_MASTER = 0x4
CMD_INTX_DISABLE = 0x400
STATUS_INTERRUPT = 0x8
MSIX_ENABLE = 0x8000


def u32(value: int) -> bytes:
    return struct.pack("<I", value)


async def cfg_read(c: Client, offset: int, size: int) -> int:
    return int.from_bytes(await c.region_read(CONFIG, offset, size), "little")


async def cfg_write(c: Client, offset: int, size: int, value: int) -> None:
    await c.region_write(CONFIG, offset, value.to_bytes(size, "little"))


async def find_cap(c: Client, cap_id: int) -> int:
    """Walk the capability list as a guest does."""
    pos = await cfg_read(c, CAP_PTR, 1)
    for _ in range(48):
        if pos < 0x40:
            break
        header = await cfg_read(c, pos, 2)
        if header & 0xFF == cap_id:
            return pos
        pos = header >> 8
    raise AssertionError(f"capability {cap_id:#x} not found")


async def enable_bus_master(c: Client) -> None:
    cmd = await cfg_read(c, PCI_COMMAND, 2)
    await cfg_write(c, PCI_COMMAND, 2, cmd | CMD_MEMORY | CMD_MASTER)


async def enable_msix(c: Client) -> None:
    """What a guest driver does: Bus Master on, then MSI-X Enable in Message Control."""
    await enable_bus_master(c)
    cap = await find_cap(c, CAP_ID_MSIX)
    ctrl = await cfg_read(c, cap + 2, 2)
    await cfg_write(c, cap + 2, 2, ctrl | MSIX_ENABLE)


async def raise_vector(c: Client, vector: int) -> None:
    await c.region_write(BAR0, models.IRQ_RAISE, u32(vector))


async def pba(c: Client) -> int:
    return int.from_bytes(await c.region_read(BAR2, models.MSIX_PBA, 8), "little")


def fired(fds: list[OwnedFd]) -> list[int]:
    """Counter of every eventfd (and reset them); eventfds are written synchronously by the
    register write that raised them, so after its reply this is exact."""
    return [read_eventfd_nowait(fd) for fd in fds]


class Eventfds:
    """A few eventfds, closed at the end of the test."""

    def __init__(self, n: int) -> None:
        self.fds = [make_eventfd() for _ in range(n)]

    def __enter__(self) -> list[OwnedFd]:
        return self.fds

    def __exit__(self, *exc: object) -> None:
        for fd in self.fds:
            fd.close()


async def scratch(make_server: MakeServer) -> tuple[Server, Scratch]:
    model = Scratch()
    return await make_server({"s": model}), model


# ------------------------------------------------------------------ GET_IRQ_INFO


async def check_irq_info(c: Client, expected: dict[int, tuple[int, int]], engine: str) -> None:
    for index, (count, flags) in expected.items():
        info = await c.irq_info(index)
        assert (info.index, info.count) == (index, count), index
        if engine == LIBVFIO_USER:
            # PARITY_DIFFERENCES "irq_info.0/1/2": EVENTFD only, also for an unused index
            assert info.flags == IrqInfoFlags.EVENTFD, index
        elif count:
            assert info.flags == flags, index
        else:  # an unused index: whatever else it says, it takes no eventfds
            assert not info.flags & IrqInfoFlags.EVENTFD, index


async def test_irq_info_of_edu(server: Server, engine: str) -> None:
    async with open_client(server) as c:
        expected = {
            INTX: (1, IrqInfoFlags.EVENTFD | IrqInfoFlags.MASKABLE | IrqInfoFlags.AUTOMASKED),
            MSI: (1, IrqInfoFlags.EVENTFD | IrqInfoFlags.NORESIZE),
            MSIX: (0, 0),
            ERR: (1, IrqInfoFlags.EVENTFD),
            REQ: (1, IrqInfoFlags.EVENTFD),
        }
        await check_irq_info(c, expected, engine)


async def test_irq_info_of_scratch(make_server: MakeServer, engine: str) -> None:
    srv, _ = await scratch(make_server)
    async with open_client(srv, "s") as c:
        expected = {
            INTX: (1, IrqInfoFlags.EVENTFD | IrqInfoFlags.MASKABLE | IrqInfoFlags.AUTOMASKED),
            MSI: (0, 0),
            MSIX: (models.MSIX_VECTORS, IrqInfoFlags.EVENTFD | IrqInfoFlags.MASKABLE),
            ERR: (1, IrqInfoFlags.EVENTFD),
            REQ: (1, IrqInfoFlags.EVENTFD),
        }
        await check_irq_info(c, expected, engine)


# ------------------------------------------------------------------ SET_IRQS validation


def _memfd() -> OwnedFd:
    return OwnedFd(os.memfd_create("not-an-eventfd", os.MFD_CLOEXEC))


#: (index, flags, start, count, bool data, fds: number of eventfds or "memfd" / "pipe")
INVALID: dict[str, tuple[int, int, int, int, bytes, int | str]] = {
    "two_data_types": (MSIX, NONE | BOOL | TRIGGER, 0, 1, b"", 0),
    "all_data_types": (MSIX, NONE | BOOL | EVENTFD | TRIGGER, 0, 1, b"", 0),
    "two_actions": (MSIX, NONE | MASK | TRIGGER, 0, 1, b"", 0),
    "no_data_type": (MSIX, TRIGGER, 0, 1, b"", 0),
    "no_action": (MSIX, NONE, 0, 1, b"", 0),
    "no_flags": (MSIX, 0, 0, 1, b"", 0),
    "past_count": (MSIX, NONE | TRIGGER, 3, 2, b"", 0),
    "start_at_count": (MSIX, NONE | TRIGGER, 4, 1, b"", 0),
    "start_huge": (MSIX, NONE | TRIGGER, 0xFFFF_FFFF, 1, b"", 0),
    "count_huge": (MSIX, NONE | TRIGGER, 1, 0xFFFF_FFFF, b"", 0),
    "unused_index": (MSI, NONE | TRIGGER, 0, 1, b"", 0),
    "err_mask": (ERR, NONE | MASK, 0, 1, b"", 0),
    "err_unmask": (ERR, NONE | UNMASK, 0, 1, b"", 0),
    "req_mask_eventfd": (REQ, EVENTFD | MASK, 0, 1, b"", 1),
    "err_two_vectors": (ERR, NONE | TRIGGER, 0, 2, b"", 0),
    "req_start_1": (REQ, EVENTFD | TRIGGER, 1, 1, b"", 1),
    "count0_eventfd": (MSIX, EVENTFD | TRIGGER, 0, 0, b"", 0),
    "count0_mask": (MSIX, NONE | MASK, 0, 0, b"", 0),
    "count0_bool": (MSIX, BOOL | TRIGGER, 0, 0, b"", 0),
    "count0_start1": (MSIX, NONE | TRIGGER, 1, 0, b"", 0),
    "count0_with_fd": (MSIX, NONE | TRIGGER, 0, 0, b"", 1),
    "fd_with_data_none": (MSIX, NONE | TRIGGER, 0, 1, b"", 1),
    "fd_with_data_bool": (MSIX, BOOL | TRIGGER, 0, 1, b"\x01", 1),
    "fewer_fds_than_count": (MSIX, EVENTFD | TRIGGER, 0, 2, b"", 1),
    "more_fds_than_count": (MSIX, EVENTFD | TRIGGER, 0, 1, b"", 2),
    "memfd_not_eventfd": (MSIX, EVENTFD | TRIGGER, 0, 1, b"", "memfd"),
    "pipe_not_eventfd": (MSIX, EVENTFD | TRIGGER, 0, 1, b"", "pipe"),
    "bool_too_short": (MSIX, BOOL | TRIGGER, 0, 2, b"\x01", 0),
    "bool_too_long": (MSIX, BOOL | TRIGGER, 0, 1, b"\x01\x01", 0),
    "bool_missing": (MSIX, BOOL | MASK, 0, 1, b"", 0),
    "none_with_data": (MSIX, NONE | TRIGGER, 0, 1, b"\x01", 0),
}


@python_engine_only(
    "irq_table_of is the Python engine's IRQ table; libvfio-user validates SET_IRQS itself "
    "(BEHAVIOUR_DIFFERENCES 'SET_IRQS validation')"
)
@pytest.mark.parametrize("case", sorted(INVALID))
async def test_set_irqs_validation(make_server: MakeServer, case: str) -> None:
    index, flags, start, count, data, nfds = INVALID[case]
    srv, _ = await scratch(make_server)
    async with open_client(srv, "s") as c:
        with Eventfds(4) as assigned:
            await c.set_irq_eventfds(MSIX, 0, assigned)
            table = irq_table_of(srv, "s")
            assert table is not None and table.open_fds() == 4
            fds: list[OwnedFd | int] = []
            extra: list[int] = []
            if nfds == "memfd":
                fds = [_memfd()]
            elif nfds == "pipe":
                r, w = os.pipe()
                fds, extra = [r], [w]
            else:
                fds = [make_eventfd() for _ in range(int(nfds))]
            try:
                before = count_fds()
                with pytest.raises(VfioUserError) as info:
                    await c.set_irqs(index, flags, start, count, data=data, fds=fds)
                assert info.value.errno == errno.EINVAL
                assert count_fds() == before  # the server closed what it was sent
            finally:
                for fd in fds:
                    fd.close() if isinstance(fd, OwnedFd) else os.close(fd)
                for fd in extra:
                    os.close(fd)
            # nothing changed: the four vectors are still assigned and nothing fired
            assert table.open_fds() == 4
            assert fired(assigned) == [0, 0, 0, 0]
            await c.set_irqs(MSIX, NONE | TRIGGER, 0, 4)
            assert fired(assigned) == [1, 1, 1, 1]


async def test_mask_on_a_non_maskable_index_is_einval(server: Server, engine: str) -> None:
    async with open_client(server) as c:
        for flags in (NONE | MASK, NONE | UNMASK):
            if engine == LIBVFIO_USER:  # BEHAVIOUR_DIFFERENCES "SET_IRQS validation"
                await c.set_irqs(MSI, flags, 0, 1)
                continue
            with pytest.raises(VfioUserError) as info:
                await c.set_irqs(MSI, flags, 0, 1)
            assert info.value.errno == errno.EINVAL
        # INTx is maskable
        await c.set_irqs(INTX, NONE | MASK, 0, 1)
        await c.set_irqs(INTX, NONE | UNMASK, 0, 1)


# ------------------------------------------------------------------ eventfds fire


async def test_msix_vector_n_signals_eventfd_n(make_server: MakeServer) -> None:
    srv, _ = await scratch(make_server)
    async with open_client(srv, "s") as c:
        await enable_msix(c)
        with Eventfds(4) as fds:
            await c.set_irq_eventfds(MSIX, 0, fds)
            for n in range(4):
                await raise_vector(c, n)
                assert await wait_eventfd(fds[n], timeout=5) == 1
                assert fired(fds) == [0, 0, 0, 0], f"vector {n} signalled another eventfd"
            # out of range vectors are dropped
            await raise_vector(c, 4)
            assert fired(fds) == [0, 0, 0, 0]


async def test_msix_vectors_assigned_one_at_a_time_like_qemu(make_server: MakeServer) -> None:
    srv, _ = await scratch(make_server)
    async with open_client(srv, "s") as c:
        await enable_msix(c)
        with Eventfds(4) as fds, Eventfds(1) as (replacement,):
            for n in reversed(range(4)):
                await c.set_irq_eventfds(MSIX, n, [fds[n]])
            await raise_vector(c, 2)
            assert fired(fds) == [0, 0, 1, 0]
            # re-assigning a vector replaces (and closes) the server's old eventfd
            before = count_fds()
            await c.set_irq_eventfds(MSIX, 2, [replacement])
            assert count_fds() == before
            await raise_vector(c, 2)
            assert fired(fds) == [0, 0, 0, 0]
            assert read_eventfd_nowait(replacement) == 1


async def test_raise_follows_the_mechanism_the_guest_enabled(make_server: MakeServer) -> None:
    srv, _ = await scratch(make_server)
    async with open_client(srv, "s") as c:
        with Eventfds(4) as msix, Eventfds(1) as (intx,):
            await c.set_irq_eventfds(MSIX, 0, msix)
            await c.set_irq_eventfds(INTX, 0, [intx])
            # MSI-X not enabled yet: the device falls back to INTx
            await raise_vector(c, 1)
            assert read_eventfd_nowait(intx) == 1
            assert fired(msix) == [0, 0, 0, 0]
            await c.region_write(BAR0, models.IRQ_LOWER, u32(0))
            await c.set_irqs(INTX, NONE | UNMASK, 0, 1)
            # MSI-X enabled but Bus Master off: a message interrupt is dropped
            cap = await find_cap(c, CAP_ID_MSIX)
            await cfg_write(c, cap + 2, 2, await cfg_read(c, cap + 2, 2) | MSIX_ENABLE)
            await raise_vector(c, 1)
            assert fired(msix) == [0, 0, 0, 0]
            assert read_eventfd_nowait(intx) == 0
            await enable_bus_master(c)
            await raise_vector(c, 1)
            assert fired(msix) == [0, 1, 0, 0]
            assert read_eventfd_nowait(intx) == 0


# ------------------------------------------------------------------ masking, PBA


async def test_masked_vector_is_pending_in_the_pba_and_unmask_delivers(
    make_server: MakeServer,
) -> None:
    srv, _ = await scratch(make_server)
    async with open_client(srv, "s") as c:
        await enable_msix(c)
        with Eventfds(4) as fds:
            await c.set_irq_eventfds(MSIX, 0, fds)
            await c.set_irqs(MSIX, NONE | MASK, 1, 1)
            await c.set_irqs(MSIX, BOOL | MASK, 2, 2, data=b"\x00\x01")  # masks vector 3
            assert await pba(c) == 0
            await raise_vector(c, 1)
            await raise_vector(c, 1)
            await raise_vector(c, 3)
            await raise_vector(c, 0)
            assert fired(fds) == [1, 0, 0, 0]
            assert await pba(c) == 0b1010
            await c.set_irqs(MSIX, NONE | UNMASK, 1, 1)
            assert await wait_eventfd(fds[1], timeout=5) == 1  # once: pending is one bit
            assert await pba(c) == 0b1000
            await c.set_irqs(MSIX, BOOL | UNMASK, 0, 4, data=b"\x00\x00\x00\x01")
            assert fired(fds) == [0, 0, 0, 1]
            assert await pba(c) == 0
            # unmasking what was never pending fires nothing
            await c.set_irqs(MSIX, NONE | UNMASK, 0, 4)
            assert fired(fds) == [0, 0, 0, 0]


@python_engine_only(
    "libvfio-user does not signal MASK/UNMASK eventfds "
    "(BEHAVIOUR_DIFFERENCES 'SET_IRQS validation')"
)
async def test_mask_and_unmask_eventfds_are_signalled(make_server: MakeServer) -> None:
    srv, _ = await scratch(make_server)
    async with open_client(srv, "s") as c:
        with Eventfds(1) as (mask_fd,), Eventfds(1) as (unmask_fd,):
            await c.set_irqs(MSIX, EVENTFD | MASK, 0, 1, fds=[mask_fd])
            await c.set_irqs(MSIX, EVENTFD | UNMASK, 0, 1, fds=[unmask_fd])
            await c.set_irqs(MSIX, NONE | MASK, 0, 1)
            await c.set_irqs(MSIX, NONE | MASK, 0, 1)  # already masked: no second signal
            assert (read_eventfd_nowait(mask_fd), read_eventfd_nowait(unmask_fd)) == (1, 0)
            await c.set_irqs(MSIX, NONE | UNMASK, 0, 1)
            assert (read_eventfd_nowait(mask_fd), read_eventfd_nowait(unmask_fd)) == (0, 1)


# ------------------------------------------------------------------ INTx


async def test_intx_automask_and_unmask_resignals_while_asserted(
    make_server: MakeServer,
) -> None:
    srv, _ = await scratch(make_server)
    async with open_client(srv, "s") as c:
        with Eventfds(1) as (intx,):
            await c.set_irq_eventfds(INTX, 0, [intx])
            await raise_vector(c, 0)
            assert await wait_eventfd(intx, timeout=5) == 1
            assert await cfg_read(c, PCI_STATUS, 2) & STATUS_INTERRUPT
            # automasked: the line stays asserted, nothing more is signalled
            await raise_vector(c, 0)
            assert read_eventfd_nowait(intx) == 0
            # the guest's EOI: unmask while still asserted signals again (level semantics)
            await c.set_irqs(INTX, NONE | UNMASK, 0, 1)
            assert read_eventfd_nowait(intx) == 1
            # the device lowers the line; unmasking then signals nothing
            await c.region_write(BAR0, models.IRQ_LOWER, u32(0))
            assert not await cfg_read(c, PCI_STATUS, 2) & STATUS_INTERRUPT
            await c.set_irqs(INTX, NONE | UNMASK, 0, 1)
            assert read_eventfd_nowait(intx) == 0
            # a new rising edge on an unmasked line signals at once
            await raise_vector(c, 0)
            assert read_eventfd_nowait(intx) == 1
            # masked by the client, lowered and raised again: delivered at unmask
            await c.region_write(BAR0, models.IRQ_LOWER, u32(0))
            await c.set_irqs(INTX, NONE | UNMASK, 0, 1)
            await c.set_irqs(INTX, NONE | MASK, 0, 1)
            await raise_vector(c, 0)
            assert read_eventfd_nowait(intx) == 0
            await c.set_irqs(INTX, NONE | UNMASK, 0, 1)
            assert read_eventfd_nowait(intx) == 1


async def test_intx_eventfd_assigned_while_asserted_is_signalled(
    make_server: MakeServer, engine: str
) -> None:
    srv, _ = await scratch(make_server)
    async with open_client(srv, "s") as c:
        await raise_vector(c, 0)  # asserted before the client has an eventfd
        with Eventfds(1) as (intx,):
            await c.set_irq_eventfds(INTX, 0, [intx])
            if engine == LIBVFIO_USER:
                # BEHAVIOUR_DIFFERENCES "INTx asserted before its eventfd": not signalled
                # until the guest's EOI (unmask) finds the line still asserted
                assert read_eventfd_nowait(intx) == 0
                await c.set_irqs(INTX, NONE | UNMASK, 0, 1)
            assert read_eventfd_nowait(intx) == 1


async def test_intx_disable_bit_gates_the_line(make_server: MakeServer) -> None:
    srv, _ = await scratch(make_server)
    async with open_client(srv, "s") as c:
        with Eventfds(1) as (intx,):
            await c.set_irq_eventfds(INTX, 0, [intx])
            await cfg_write(c, PCI_COMMAND, 2, CMD_INTX_DISABLE)
            await raise_vector(c, 0)
            assert read_eventfd_nowait(intx) == 0
            assert await cfg_read(c, PCI_STATUS, 2) & STATUS_INTERRUPT  # still pending
            await cfg_write(c, PCI_COMMAND, 2, 0)  # enabling INTx drives the line
            assert read_eventfd_nowait(intx) == 1


# ------------------------------------------------------------------ client-side actions


async def test_trigger_from_the_client_signals_eventfds(make_server: MakeServer) -> None:
    srv, _ = await scratch(make_server)
    async with open_client(srv, "s") as c:
        with Eventfds(4) as fds, Eventfds(2) as (err_fd, req_fd):
            await c.set_irq_eventfds(MSIX, 0, fds)
            await c.set_irq_eventfds(ERR, 0, [err_fd])
            await c.set_irq_eventfds(REQ, 0, [req_fd])
            await c.set_irqs(MSIX, NONE | TRIGGER, 1, 2)
            assert fired(fds) == [0, 1, 1, 0]
            await c.set_irqs(MSIX, BOOL | TRIGGER, 0, 4, data=b"\x01\x00\x00\x01")
            assert fired(fds) == [1, 0, 0, 1]
            await c.set_irqs(ERR, NONE | TRIGGER, 0, 1)
            await c.set_irqs(REQ, BOOL | TRIGGER, 0, 1, data=b"\x01")
            assert (read_eventfd_nowait(err_fd), read_eventfd_nowait(req_fd)) == (1, 1)


@python_engine_only("checks the Python engine's IRQ table (irq_table_of)")
async def test_deassign_with_eventfd_and_no_fds(make_server: MakeServer) -> None:
    srv, _ = await scratch(make_server)
    async with open_client(srv, "s") as c:
        await enable_msix(c)
        with Eventfds(4) as fds:
            await c.set_irq_eventfds(MSIX, 0, fds)
            table = irq_table_of(srv, "s")
            assert table is not None and table.open_fds() == 4
            before = count_fds()
            await c.unset_irq_eventfds(MSIX, 1, 2)
            assert table.open_fds() == 2
            assert count_fds() == before - 2  # the server closed its copies
            for n in range(4):
                await raise_vector(c, n)
            assert fired(fds) == [1, 0, 0, 1]


@python_engine_only("checks the Python engine's IRQ table (irq_table_of)")
async def test_disable_with_count_zero(make_server: MakeServer) -> None:
    srv, _ = await scratch(make_server)
    async with open_client(srv, "s") as c:
        await enable_msix(c)
        with Eventfds(4) as fds:
            await c.set_irq_eventfds(MSIX, 0, fds)
            await c.set_irqs(MSIX, NONE | MASK, 0, 4)
            await raise_vector(c, 2)
            assert await pba(c) == 0b100
            before = count_fds()
            await c.disable_irqs(MSIX)
            table = irq_table_of(srv, "s")
            assert table is not None and table.open_fds() == 0
            assert count_fds() == before - 4
            assert await pba(c) == 0  # masks and pending bits are gone too
            for n in range(4):
                await raise_vector(c, n)
            assert fired(fds) == [0, 0, 0, 0]
            # assigning again works, and vectors are unmasked
            await c.set_irq_eventfds(MSIX, 0, fds[:2])
            await raise_vector(c, 1)
            assert fired(fds) == [0, 1, 0, 0]


@python_engine_only("waits on Device.released, the Python engine's session release")
async def test_eventfds_are_closed_on_disconnect(make_server: MakeServer) -> None:
    srv, _ = await scratch(make_server)
    with Eventfds(7) as fds:
        before = count_fds()
        async with open_client(srv, "s") as c:
            await c.set_irq_eventfds(MSIX, 0, fds[:4])
            await c.set_irq_eventfds(INTX, 0, fds[4:5])
            await c.set_irq_eventfds(ERR, 0, fds[5:6])
            await c.set_irq_eventfds(REQ, 0, fds[6:7])
            assert count_fds() == before + 2 + 7  # both socket ends and the server's copies
        with trio.fail_after(5):
            await srv.devices["s"].released.wait()
        # every eventfd is closed by the time the device is released ...
        assert count_fds() <= before + 1
        await settle()
        # ... and the socket right after
        assert count_fds() == before

"""The doorbell handler's own forms of the shared logic (`prp_head`, `first_run`, the CQE
store) agree with the general ones (`walk_prps`, `runs`, `spec.CQE`)."""

from __future__ import annotations

import struct

import pytest
import trio
import trio.testing
from hypothesis import example, given
from hypothesis import strategies as st

from devices.nvme import Nvme, doorbell_io
from devices.nvme.core import WorkerCore
from devices.nvme.prp import prp_head, walk_list, walk_prps
from devices.nvme.queue import SubmissionQueue
from devices.nvme.spec import CQE, DNR, AdminOpcode, IoOpcode, Status

from ..fakes import FakeContext
from .host import DATA, DBS, EIS, Host
from .test_io import rw

PAGE = 4096


async def _no_list(address: int, size: int) -> bytes:
    raise AssertionError(f"a list read ({address:#x}+{size}) for a list-free transfer")


@given(st.integers(0, PAGE // 4 - 1), st.integers(1, 2 * PAGE))
@example(0, 2 * PAGE)  # PRP2 is the second data page, exactly full
@example(1, 2 * PAGE)  # one byte more than PRP1 and PRP2 cover: a list
async def test_prp_head_covers_one_or_two_pages_like_walk_prps(dword: int, length: int) -> None:
    prp1 = 0x10000 + 4 * dword
    segs, left = prp_head(prp1, 0x30000, length, PAGE)
    first = PAGE - 4 * dword
    if length <= first + PAGE:
        assert left == 0
        assert segs == await walk_prps(prp1, 0x30000, length, PAGE, _no_list)
        assert sum(n for _, n in segs) == length
    else:
        assert left == length - first and segs == [(prp1, first)]


async def test_walk_list_continues_prp_head() -> None:
    pages = [0x40000 + 2 * i * PAGE for i in range(4)]
    raw = struct.pack("<4Q", *pages)

    async def read(address: int, size: int) -> bytes:
        assert address == 0x8000 and size == len(raw)
        return raw

    segs, left = prp_head(0x10000, 0x8000, 5 * PAGE, PAGE)
    assert left == 4 * PAGE
    assert await walk_list(segs, 0x8000, left, PAGE, read) == \
        [(0x10000, PAGE), *((p, PAGE) for p in pages)]


@given(st.integers(0, 7), st.integers(0, 7), st.integers(1, 40))
def test_first_run_is_the_first_of_runs(head: int, tail: int, limit: int) -> None:
    sq = SubmissionQueue(1, base=0x1000, size=8, cqid=1, head=head)
    sq.set_tail(tail)
    runs = list(sq.runs(limit))
    assert sq.first_run(limit) == (runs[0] if runs else (0x1000 + head * 64, 0))


@given(st.integers(0, 0xFFFF), st.sampled_from(list(Status)), st.integers(0, 1 << 32),
       st.integers(0, 1))
def test_cqe_store_matches_the_spec_layout(cid: int, status: Status, result: int,
                                           phase: int) -> None:
    sq = SubmissionQueue(3, base=0, size=64, cqid=3, head=17)
    buf = bytearray(b"\xee" * 16)
    WorkerCore._store_cqe(memoryview(buf), sq, cid, status, result, phase)
    dnr = 0 if status in (Status.SUCCESS, Status.ABORTED_BY_REQUEST,
                          Status.ABORTED_SQ_DELETION, Status.NAMESPACE_NOT_READY) else DNR
    assert bytes(buf) == CQE.pack(result & 0xFFFF_FFFF, 0, 17, 3, cid,
                                  ((status | dnr) << 1) | phase)


async def test_intx_is_raised_by_a_read_served_in_the_doorbell(dev: Nvme,
                                                               nvme_ctx: FakeContext) -> None:
    """With MSI-X and MSI off, a cached read completed inside the doorbell's register
    write raises INTx before the write returns (the batch's end decides INTx there), and
    the CQ head doorbell that consumes it lowers it."""
    h = Host(dev, nvme_ctx)
    h.enable_pci(msix=False)
    await h.enable()
    await h.create_io_queues()
    dev.worker.namespaces[1].backend.write(0, [bytes(PAGE)])
    await trio.testing.wait_all_tasks_blocked()
    assert not dev.intx_asserted()
    cid = h.submit(1, h.sqe(IoOpcode.READ, nsid=1, prp1=DATA, cdw=rw(0, PAGE // 512)))
    assert dev.intx_asserted()  # nothing awaited: served in the register write
    cqe = await h.wait(1)
    assert cqe.cid == cid and cqe.code == 0
    assert not dev.intx_asserted()


async def shadow_host(dev: Nvme, nvme_ctx: FakeContext) -> Host:
    """A host with I/O queue pair 1 on shadow doorbells (as Linux sets it up) and two
    pages of the namespace written (cached reads)."""
    h = Host(dev, nvme_ctx)
    h.enable_pci()
    await h.enable()
    await h.create_io_queues()
    assert (await h.admin(AdminOpcode.DOORBELL_BUFFER_CONFIG, prp1=DBS, prp2=EIS)).code == 0
    h.queues[1].shadow = True
    dev.worker.namespaces[1].backend.write(0, [bytes(2 * PAGE)])
    await trio.testing.wait_all_tasks_blocked()
    return h


async def test_a_submission_racing_the_event_index_is_fetched_by_that_doorbell(
        dev: Nvme, nvme_ctx: FakeContext) -> None:
    """Shadow doorbells: a host that adds a command after we read the shadow tail and
    before it sees the event index we publish does not ring for it; the handler reads the
    shadow tail once more after publishing and serves it within the same doorbell."""
    h = await shadow_host(dev, nvme_ctx)
    late: list[int] = []
    published_now = dev.worker.poller.published_now

    def racing(sq: SubmissionQueue) -> None:
        published_now(sq)
        if not late:  # the host submits again, sees the old event index: no MMIO
            late.append(h.submit(1, h.sqe(IoOpcode.READ, nsid=1, prp1=DATA + PAGE,
                                          cdw=rw(8, 1)), ring=False))

    dev.worker.poller.published_now = racing  # type: ignore[method-assign]
    first = h.submit(1, h.sqe(IoOpcode.READ, nsid=1, prp1=DATA, cdw=rw(0, 1)))
    assert late and dev.worker.sqs[1].pending == 0  # nothing awaited: both fetched
    assert sorted([(await h.wait(1)).cid, (await h.wait(1)).cid]) == sorted([first, *late])


async def test_the_fence_sits_between_the_event_index_and_the_tail_re_read(
        dev: Nvme, nvme_ctx: FakeContext, monkeypatch: pytest.MonkeyPatch) -> None:
    """`_publish_event_idx` fences (devices/sdk/fence.py) after storing the event index and
    before reading the shadow tail again: a host that submits at exactly that point is
    seen by the re-read (the fence is where the host is put here, so a missing fence, or
    one before the store, fails)."""
    h = await shadow_host(dev, nvme_ctx)
    late: list[int] = []
    event_idx_then: list[int] = []
    ei = EIS + 2 * dev.stride  # SQ 1's event index

    def fence() -> None:
        if not late:
            event_idx_then.append(int.from_bytes(h.ram[ei : ei + 4], "little"))
            late.append(h.submit(1, h.sqe(IoOpcode.READ, nsid=1, prp1=DATA + PAGE,
                                          cdw=rw(8, 1)), ring=False))

    monkeypatch.setattr(doorbell_io, "full_fence", fence)
    first = h.submit(1, h.sqe(IoOpcode.READ, nsid=1, prp1=DATA, cdw=rw(0, 1)))
    assert late and event_idx_then == [1]  # the index was out when the host looked
    assert dev.worker.sqs[1].pending == 0  # and the late command was fetched right there
    assert sorted([(await h.wait(1)).cid, (await h.wait(1)).cid]) == sorted([first, *late])

"""Ring arithmetic: wrap, full/empty, phase tags, doorbell validation and decoding."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devices.nvme.queue import (
    CompletionQueue,
    DoorbellError,
    SubmissionQueue,
    doorbell_decode,
)
from devices.nvme.spec import CQE_SIZE, SQE_SIZE


def test_sq_runs_split_at_wrap() -> None:
    sq = SubmissionQueue(1, base=0x1000, size=8, cqid=1, head=6)
    sq.set_tail(3)
    assert sq.pending == 5
    assert list(sq.runs()) == [(0x1000 + 6 * SQE_SIZE, 2), (0x1000, 3)]
    assert list(sq.runs(limit=1)) == [(0x1000 + 6 * SQE_SIZE, 1)]
    sq.advance(5)
    assert sq.head == 3 and sq.pending == 0 and list(sq.runs()) == []


def test_sq_tail_out_of_range_is_rejected() -> None:
    sq = SubmissionQueue(1, base=0, size=4, cqid=1)
    with pytest.raises(DoorbellError):
        sq.set_tail(4)
    assert sq.tail == 0


def test_sq_cannot_consume_more_than_pending() -> None:
    sq = SubmissionQueue(1, base=0, size=4, cqid=1)
    sq.set_tail(2)
    with pytest.raises(ValueError):
        sq.advance(3)


@pytest.mark.parametrize("size", [0, 1, 4097])
def test_queue_size_limits(size: int) -> None:
    with pytest.raises(ValueError):
        SubmissionQueue(1, 0, size, 1)
    with pytest.raises(ValueError):
        CompletionQueue(1, 0, size)


def test_cq_phase_flips_on_wrap_and_full_keeps_one_slot() -> None:
    cq = CompletionQueue(1, base=0x2000, size=3)
    assert cq.reserve() == (0x2000, 1)
    assert cq.reserve() == (0x2000 + CQE_SIZE, 1)
    assert cq.full and cq.free == 0
    with pytest.raises(OverflowError):
        cq.reserve()
    cq.set_head(2)
    assert cq.reserve() == (0x2000 + 2 * CQE_SIZE, 1)
    assert cq.tail == 0 and cq.phase == 0  # wrapped: the next pass writes phase 0
    cq.set_head(0)
    assert cq.reserve() == (0x2000, 0)


def test_cq_head_may_not_pass_tail() -> None:
    cq = CompletionQueue(1, base=0, size=8)
    cq.reserve()
    cq.reserve()
    with pytest.raises(DoorbellError):
        cq.set_head(3)
    with pytest.raises(DoorbellError):
        cq.set_head(8)
    cq.set_head(2)
    assert cq.outstanding == 0


@given(st.integers(2, 64), st.lists(st.integers(0, 100), max_size=50))
def test_cq_invariants(size: int, steps: list[int]) -> None:
    """Whatever the host does, outstanding + free == size - 1 and phases alternate per lap."""
    cq = CompletionQueue(1, base=0, size=size)
    posted = 0
    for step in steps:
        if step % 3 and not cq.full:
            addr, phase = cq.reserve()
            assert addr == (posted % size) * CQE_SIZE
            assert phase == 1 - (posted // size) % 2
            posted += 1
        else:
            cq.set_head((cq.head + step % (cq.outstanding + 1)) % size)
        assert cq.outstanding + cq.free == size - 1


@pytest.mark.parametrize(("offset", "stride", "want"), [
    (0, 4, (0, False)), (4, 4, (0, True)), (8, 4, (1, False)), (12, 4, (1, True)),
    (16, 8, (1, False)), (24, 8, (1, True)), (6, 4, None), (-4, 4, None),
])
def test_doorbell_decode(offset: int, stride: int, want: tuple[int, bool] | None) -> None:
    assert doorbell_decode(offset, stride) == want

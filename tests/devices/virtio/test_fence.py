"""The device's half of virtio's notification handshakes has its full fence between the
store and the load (`devices/sdk/fence.py`). A driver that acts exactly at the fence (adds
a buffer, re-enables interrupts) must be seen by the load after it: these tests put the
driver there through the fence itself, so a missing fence, or one before the store, fails."""

from __future__ import annotations

import pytest

from devices.virtio import virtqueue

from .test_virtqueue import BUF, make


@pytest.fixture
def at_fence(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Replace the fence with the hooks appended to the returned list (run in order)."""
    hooks: list[object] = []

    def fence() -> None:
        for hook in hooks:
            hook()  # type: ignore[operator]
        hooks.clear()

    monkeypatch.setattr(virtqueue, "full_fence", fence)
    return hooks


@pytest.mark.parametrize("mapped", [True, False], ids=["handler", "worker"])
@pytest.mark.parametrize("event_idx", [True, False])
async def test_a_buffer_added_at_the_fence_is_seen_by_the_re_arm(
        at_fence: list[object], event_idx: bool, mapped: bool) -> None:
    dma, ring, q = make(8, event_idx=event_idx)
    ring.add([(BUF, 1)], [])
    assert await q.pop(dma) is not None
    published: list[int] = []

    def driver() -> None:
        # what the device stored before its fence, then the driver's new buffer
        published.append(ring.avail_event() if event_idx else ring.u16(ring.used))
        ring.add([(BUF, 1)], [])

    at_fence.append(driver)
    if mapped:
        assert q.enable_notify_mapped(dma) is True
    else:
        assert await q.enable_notify(dma)
    assert published == [1 if event_idx else 0]


async def test_interrupts_re_enabled_at_the_fence_are_seen(at_fence: list[object]) -> None:
    dma, ring, q = make(8, event_idx=True)
    heads = [ring.add([(BUF + i, 1)], []) for i in range(2)]
    ring.set_used_event(0)
    for _ in heads:
        chain = await q.pop(dma)
        assert chain is not None
    await q.push(dma, heads[0], 0)
    assert await q.should_interrupt(dma)  # the first always signals
    await q.push(dma, heads[1], 0)
    used_then: list[int] = []

    def driver() -> None:
        # the driver re-enables interrupts for the next used entry right now
        used_then.append(ring.u16(ring.used + 2))
        ring.set_used_event(1)

    at_fence.append(driver)
    assert await q.should_interrupt(dma)
    assert used_then == [2]  # the used index was out before the fence

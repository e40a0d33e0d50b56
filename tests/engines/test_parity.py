"""Engine parity: the scripted session gets the same replies from both engines.

`test_script_on_engine` checks the script's engine-independent facts on each engine (edu's
registers, DMA landing in guest RAM on both the mmap and the message path, the interrupt,
reset, errnos). `test_parity` runs the script on both engines and compares every step,
except the ones listed in `PARITY_DIFFERENCES`, each of which must really differ (so the
list stays true).
"""

from __future__ import annotations

import errno

import pytest
import trio

from devices.edu import IDENTIFICATION, factorial32

from .conftest import ServeEdu, libvfio_user_unavailable
from .script import Record, run_script


def _u32(value: int) -> bytes:
    return value.to_bytes(4, "little")


def check_engine_independent(rec: Record) -> None:
    assert rec["version"] == {"major": 0, "minor": 0}
    assert rec["device_info"] == {"flags": 3, "num_regions": 9, "num_irqs": 5}  # PCI|RESET
    assert rec["region_info.0"]["size"] == 1 << 20
    assert rec["region_info.7"]["size"] == 256
    assert rec["edu.id"] == _u32(IDENTIFICATION)
    assert rec["edu.liveness"] == _u32(~0x12345678 & 0xFFFFFFFF)
    assert rec["edu.factorial"] == _u32(factorial32(10))
    assert rec["edu.posted_write"] == _u32(0xFFFFFFFE)
    assert rec["config.header"][:8] == "3412e811"  # vendor 1234, device 11e8
    assert rec["config.command"] == b"\x06\x00"
    assert rec["err.read_past_end"] == ("errno", errno.EINVAL)
    assert rec["dma.irq_status"] == _u32(0x100)
    assert rec["dma.to_message_ram"] is True
    assert rec["dma.round_trip"] is True
    assert rec["dma.served_messages"] == (True, True)
    assert rec["irq.masked_raise"] == 0
    assert rec["irq.after_unmask"] == 1
    assert rec["after_reset.liveness"] == _u32(0)
    assert rec["unmap.missing"] == ("errno", errno.ENOENT)


async def test_script_on_engine(engine: str, serve_model: ServeEdu) -> None:
    _, path = await serve_model(engine)
    with trio.fail_after(30):
        rec = await run_script(path)
    check_engine_independent(rec)


_UNAVAILABLE = libvfio_user_unavailable()


@pytest.mark.libvfio_user
@pytest.mark.skipif(_UNAVAILABLE is not None, reason=_UNAVAILABLE or "")
async def test_parity(serve_model: ServeEdu) -> None:
    from vfiouser_srv.engines.libvfio_user import PARITY_DIFFERENCES

    records = {}
    for engine in ("python", "libvfio-user"):
        _, path = await serve_model(engine)
        with trio.fail_after(30):
            records[engine] = await run_script(path)
    ours, theirs = records["python"], records["libvfio-user"]
    assert ours.keys() == theirs.keys()
    unexpected = {k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs[k]}
    undocumented = {k: v for k, v in unexpected.items() if k not in PARITY_DIFFERENCES}
    assert undocumented == {}, "replies differ; fix the engine or document it in _parity.py"
    stale = sorted(set(PARITY_DIFFERENCES) - set(unexpected))
    assert stale == [], "documented differences that no longer occur: remove them"

"""The virtio transport's part of the device state: common configuration and the queues.

Why here and not in the transport: the transport is about serving registers and running
workers; saving and checking what they produced is a separate concern (and keeps the
transport under the module size limit). `prepare_transport` reads and checks everything,
the returned step only assigns (docs/device-state.md).

In-flight chains: after a quiesce no worker holds a chain. If the engine cancelled a worker
mid-batch, or a write started from a notify (`blkinline`) has not been handed back yet, the
heads popped and not pushed are in the state; a load gives them back
to the ring by rewinding the queue to the oldest of them, so the device pops them again.
Re-doing them is what a device reset would cost the guest too, minus the reset: block
reads and writes are idempotent, and a resent frame is what a lossy network allows.
"""

from __future__ import annotations

from typing import Protocol

from devices.sdk.msi import MsixCap
from devices.sdk.state import Apply, Record, Value, matches

from .spec import NO_VECTOR, Isr, Status
from .virtqueue import Virtqueue

U16, U32, U64 = 16, 32, 64


class VirtioPciDevice(Protocol):
    """What this module reads and writes of `transport.VirtioPciDevice` (declared here so
    the transport can import this module, not the other way round)."""

    queues: list[Virtqueue]
    msix_cap: MsixCap
    device_feature_select: int
    driver_feature_select: int
    driver_features: int
    status: Status
    reset_pending: bool
    config_vector: int
    config_generation: int
    queue_select: int
    isr: Isr


def _save_queue(q: Virtqueue) -> dict[str, Value]:
    return {
        "size": q.size, "desc_addr": q.desc_addr, "avail_addr": q.avail_addr,
        "used_addr": q.used_addr, "enabled": q.enabled, "msix_vector": q.msix_vector,
        "event_idx": q.event_idx, "indirect": q.indirect,
        "last_avail_idx": q.last_avail_idx, "used_idx": q.used_idx,
        "signalled_used": q.signalled_used, "signalled_valid": q.signalled_valid,
        "in_flight": [{"head": head, "at": at} for head, at in q.held().items()],
    }


def save_transport(dev: VirtioPciDevice) -> dict[str, Value]:
    return {
        "num_queues": len(dev.queues),
        "max_queue_size": dev.queues[0].max_size,
        "device_feature_select": dev.device_feature_select,
        "driver_feature_select": dev.driver_feature_select,
        "driver_features": dev.driver_features,
        "status": int(dev.status),
        "reset_pending": dev.reset_pending,
        "config_vector": dev.config_vector,
        "config_generation": dev.config_generation,
        "queue_select": dev.queue_select,
        "isr": int(dev.isr),
        "queues": [_save_queue(q) for q in dev.queues],
    }


def _check_queue(rec: Record, q: Virtqueue, vectors: int) -> dict[str, int | bool]:
    size = rec.uint_in("size", 1, q.max_size)
    if size & (size - 1):
        raise rec.fail("size", f"{size} is not a power of two")
    vector = rec.uint("msix_vector", U16)
    if vector != NO_VECTOR and vector >= vectors:
        raise rec.fail("msix_vector", f"{vector} >= {vectors} vectors")
    out: dict[str, int | bool] = {"size": size, "msix_vector": vector}
    for name in ("desc_addr", "avail_addr", "used_addr"):
        out[name] = rec.uint(name, U64)
    for name in ("enabled", "event_idx", "indirect", "signalled_valid"):
        out[name] = rec.flag(name)
    for name in ("last_avail_idx", "used_idx", "signalled_used"):
        out[name] = rec.uint(name, U16)
    held = rec.records("in_flight")
    if len(held) > size:
        raise rec.fail("in_flight", f"{len(held)} chains held in a queue of {size}")
    oldest: int | None = None
    last = int(out["last_avail_idx"])
    for item in held:
        item.uint_in("head", 0, size - 1)
        at = item.uint("at", U16)
        if (last - at) & 0xFFFF > size:
            raise item.fail("at", f"popped at {at}, more than a ring before {last}")
        if oldest is None or (last - at) & 0xFFFF > (last - oldest) & 0xFFFF:
            oldest = at
    if oldest is not None:
        out["last_avail_idx"] = oldest  # give the held chains back (module docstring)
    return out


def prepare_transport(dev: VirtioPciDevice, rec: Record) -> Apply:
    matches(rec, "num_queues", len(dev.queues))
    matches(rec, "max_queue_size", dev.queues[0].max_size)
    scalars = {
        "device_feature_select": rec.uint("device_feature_select", U32),
        "driver_feature_select": rec.uint("driver_feature_select", U32),
        "driver_features": rec.uint("driver_features", U64),
        "config_generation": rec.uint("config_generation", 8),
        "queue_select": rec.uint("queue_select", U16),
    }
    status = Status(rec.uint("status", 8))
    isr = Isr(rec.uint("isr", 8))
    reset_pending = rec.flag("reset_pending")
    vectors = dev.msix_cap.vectors
    config_vector = rec.uint("config_vector", U16)
    if config_vector != NO_VECTOR and config_vector >= vectors:
        raise rec.fail("config_vector", f"{config_vector} >= {vectors} vectors")
    items = rec.records("queues")
    if len(items) != len(dev.queues):
        raise rec.fail("queues", f"{len(items)} queues, this device has {len(dev.queues)}")
    queues = [_check_queue(item, q, vectors) for item, q in zip(items, dev.queues, strict=True)]

    def apply() -> None:
        for name, value in scalars.items():
            setattr(dev, name, value)
        dev.status = status
        dev.isr = isr
        dev.config_vector = config_vector
        dev.reset_pending = reset_pending
        for q, values in zip(dev.queues, queues, strict=True):
            q.reset()
            for name, value in values.items():
                setattr(q, name, value)
            q.restart_at(int(values["last_avail_idx"]))

    return apply

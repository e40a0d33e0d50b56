"""A full memory fence between a store to guest memory and a later load from it.

Why: the shadow-doorbell and event-index protocols (virtio's EVENT_IDX and
VIRTQ_USED_F_NO_NOTIFY, NVMe's Doorbell Buffer Config) are Dekker-style handshakes. The
device stores "notify me past here" (or a new used index) and then loads what the driver
published (its avail index, shadow tail or used event); the driver does the same in
mirror image with a full barrier between (Linux's `virtio_mb`, `nvme_dbbuf_update_and_
check_event`'s `mb()`). x86-64 may perform a load before an earlier store to another
address has left the store buffer, so without a fence on our side both could miss each
other: a kick or an interrupt lost until the next one, a stalled guest queue.

CPython has no fence of its own. An uncontended `threading.Lock` acquire and release run
one locked read-modify-write each (glibc's `sem_wait` fast path is a `lock cmpxchg`, its
`sem_post` a `lock xadd`), and a locked instruction is a full barrier on x86-64, the
architecture these devices serve (QEMU's guests here). Cost: ~0.1 µs per call.
"""

from __future__ import annotations

import threading

_lock = threading.Lock()
_acquire = _lock.acquire
_release = _lock.release


def full_fence() -> None:
    """Order every store before this call before every load after it (module docstring)."""
    _acquire()
    _release()


__all__ = ["full_fence"]

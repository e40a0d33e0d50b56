"""The worker's part of the NVMe device state: queues, features, requests, carried commands.

Why by hand and not declared: queues are built and linked at run time (an SQ names its CQ,
a CQ lists its SQs, shadow doorbells point into guest memory), so loading has to check the
whole structure before it may replace the worker's. Everything is read and checked in
`prepare_worker`; the step it returns only assigns. The disk contents are not state: they
live in the backing files (flushed by quiesce); the namespaces' shape is checked instead.
"""

from __future__ import annotations

from dataclasses import asdict

from devices.sdk.state import Apply, Record, Value, matches

from .command import Command
from .core import Carried, WorkerCore, default_features
from .queue import MAX_QUEUE_ENTRIES, CompletionQueue, SubmissionQueue
from .spec import SQE

U16, U32, U64 = 16, 32, 64


def _namespaces(w: WorkerCore) -> list[Value]:
    return [{"nsid": ns.nsid, "size": ns.backend.size, "lba_shift": ns.lba_shift,
             "nguid": ns.nguid} for ns in w.namespaces.values()]


def save_worker(w: WorkerCore) -> dict[str, Value]:
    return {
        "namespaces": _namespaces(w),
        "enabled": w.enabled,
        "want_enable": w.want_enable,
        "reset_pending": w.reset_pending,
        "shutdown_pending": w.shutdown_pending,
        "page_size": w.page_size,
        "queues_granted": w.queues_granted,
        "features": {str(fid): value for fid, value in w.features.items()},
        "aers": list(w.aers),
        "dbbuf": list(w.dbbuf) if w.dbbuf is not None else None,
        "sqs": [{"qid": q.qid, "base": q.base, "size": q.size, "cqid": q.cqid, "head": q.head,
                 "tail": q.tail, "shadow_db": q.shadow_db, "event_idx": q.event_idx}
                for q in w.sqs.values()],
        "cqs": [{"qid": q.qid, "base": q.base, "size": q.size, "vector": q.vector,
                 "interrupts": q.interrupts, "head": q.head, "tail": q.tail,
                 "phase": q.phase, "shadow_db": q.shadow_db, "event_idx": q.event_idx}
                for q in w.cqs.values()],
        "smart": dict(asdict(w.smart)),
        "carried": [{"sqid": c.sqid, "sqe": SQE.pack(*c.cmd),
                     "outcome": list(c.outcome) if c.outcome is not None else None,
                     "slot": list(c.slot) if c.slot is not None else None}
                    for c in w.carried.values()],
    }


def _sq(rec: Record, max_qid: int) -> SubmissionQueue:
    qid = rec.uint_in("qid", 0, max_qid)
    size = rec.uint_in("size", 2, MAX_QUEUE_ENTRIES)
    return SubmissionQueue(qid, rec.uint("base", U64), size,
                           cqid=rec.uint_in("cqid", 0, max_qid),
                           head=rec.uint_in("head", 0, size - 1),
                           tail=rec.uint_in("tail", 0, size - 1),
                           shadow_db=rec.opt_uint("shadow_db", U64),
                           event_idx=rec.opt_uint("event_idx", U64))


def _cq(rec: Record, max_qid: int, vectors: int) -> CompletionQueue:
    qid = rec.uint_in("qid", 0, max_qid)
    size = rec.uint_in("size", 2, MAX_QUEUE_ENTRIES)
    return CompletionQueue(qid, rec.uint("base", U64), size,
                           vector=rec.uint_in("vector", 0, vectors - 1),
                           interrupts=rec.flag("interrupts"),
                           head=rec.uint_in("head", 0, size - 1),
                           tail=rec.uint_in("tail", 0, size - 1),
                           phase=rec.uint_in("phase", 0, 1),
                           shadow_db=rec.opt_uint("shadow_db", U64),
                           event_idx=rec.opt_uint("event_idx", U64))


def _queues(w: WorkerCore, rec: Record, vectors: int
            ) -> tuple[dict[int, SubmissionQueue], dict[int, CompletionQueue]]:
    cqs: dict[int, CompletionQueue] = {}
    for item in rec.records("cqs"):
        cq = _cq(item, w.max_queues, vectors)
        if cq.qid in cqs:
            raise item.fail("qid", f"CQ {cq.qid} appears twice")
        cqs[cq.qid] = cq
    sqs: dict[int, SubmissionQueue] = {}
    for item in rec.records("sqs"):
        sq = _sq(item, w.max_queues)
        if sq.qid in sqs:
            raise item.fail("qid", f"SQ {sq.qid} appears twice")
        if sq.cqid not in cqs or (sq.qid == 0) != (sq.cqid == 0):
            raise item.fail("cqid", f"SQ {sq.qid} posts to CQ {sq.cqid}, which is not valid")
        sqs[sq.qid] = sq
        cqs[sq.cqid].sqs.add(sq.qid)
    return sqs, cqs


def _carried(rec: Record, sqs: dict[int, SubmissionQueue]) -> dict[int, Carried]:
    out: dict[int, Carried] = {}
    for i, item in enumerate(rec.records("carried"), start=1):
        sqid = item.uint("sqid", U16)
        if sqid not in sqs:
            raise item.fail("sqid", f"command of SQ {sqid}, which does not exist")
        cmd = Command.decode(item.blob("sqe", SQE.size))
        slot = _pair(item, "slot", U64, "[CQ entry address, phase]")
        if slot is not None and slot[1] > 1:
            raise item.fail("slot", "the phase must be 0 or 1")
        out[i] = Carried(sqid, cmd, _pair(item, "outcome", U32, "[status, result]"), slot)
    return out


def _pair(rec: Record, key: str, bits: int, what: str) -> tuple[int, int] | None:
    if rec.get(key) is None:
        return None
    pair = rec.uints(key, bits)
    if len(pair) != 2:
        raise rec.fail(key, f"expected {what}")
    return pair[0], pair[1]


def prepare_worker(w: WorkerCore, rec: Record, *, vectors: int, mps_max: int) -> Apply:
    """Check the worker's section against this controller; the step assigns it."""
    matches(rec, "namespaces", _namespaces(w))
    flags = {name: rec.flag(name) for name in
             ("enabled", "want_enable", "reset_pending", "shutdown_pending")}
    page_size = rec.uint("page_size", U32)
    if page_size not in [4096 << n for n in range(mps_max + 1)]:
        raise rec.fail("page_size", f"{page_size} is not a page size this controller offers")
    granted = rec.uint_in("queues_granted", 1, w.max_queues)
    feats = rec.record("features")
    features = {fid: feats.uint(str(fid), U32) for fid in default_features(w.max_queues)}
    aers = rec.uints("aers", U16)
    if len(aers) > w.info.aerl + 1:
        raise rec.fail("aers", f"{len(aers)} outstanding, the limit is {w.info.aerl + 1}")
    dbbuf_raw = rec.get("dbbuf")
    dbbuf: tuple[int, int] | None = None
    if dbbuf_raw is not None:
        pair = rec.uints("dbbuf", U64)
        if len(pair) != 2:
            raise rec.fail("dbbuf", "expected [shadow doorbells, event indexes]")
        dbbuf = (pair[0], pair[1])
    try:
        sqs, cqs = _queues(w, rec, vectors)
    except ValueError as exc:  # a queue's own checks (sizes)
        raise rec.fail("sqs", str(exc)) from None
    if flags["enabled"] and (0 not in sqs or 0 not in cqs):
        raise rec.fail("sqs", "an enabled controller needs its admin queues")
    smart = rec.record("smart")
    counters = {name: smart.uint(name, U64) for name in asdict(w.smart)}
    carried = _carried(rec, sqs)

    def apply() -> None:
        w.enabled = flags["enabled"]
        w.want_enable = flags["want_enable"]
        w.reset_pending = flags["reset_pending"]
        w.shutdown_pending = flags["shutdown_pending"]
        w.page_size = page_size
        w.queues_granted = granted
        w.features = features
        w.aers = aers
        w.dbbuf = dbbuf
        w.sqs = sqs
        w.cqs = cqs
        for name, value in counters.items():
            setattr(w.smart, name, value)
        w.carried = carried
        w.writing = set()  # loaded commands are all to run again (none is in a thread here)
        w.next_token = max(carried, default=0)
        w.rerun_carried = True
        w.quiescing = False

    return apply

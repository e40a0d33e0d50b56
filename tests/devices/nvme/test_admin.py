"""Every admin command the controller implements, and every status path it can take."""

from __future__ import annotations

import struct

import pytest

from devices.nvme import Nvme
from devices.nvme.identify import DLFEAT_READ_ZEROES_WZ_DEALLOC, OACS_DBBUF
from devices.nvme.spec import DNR, AdminOpcode, FeatureId, LogPage, Status

from ..fakes import FakeContext
from .host import DATA, DBS, EIS, IOCQ, IOSQ, PAGE, Host

A = AdminOpcode


def buf(h: Host, size: int = PAGE, at: int = DATA) -> bytes:
    return bytes(h.ram[at : at + size])


async def test_identify_controller(host: Host) -> None:
    c = await host.admin(A.IDENTIFY, prp1=DATA, cdw=(1,))
    assert c.code == Status.SUCCESS and c.status & DNR == 0
    d = buf(host)
    assert d[4:24].decode().strip() == "VFUNVME0001"
    assert d[24:64].decode().strip() == "vfiouser-srv NVMe"
    assert d[77] == 8  # MDTS
    assert struct.unpack_from("<I", d, 80)[0] == 0x10400
    assert struct.unpack_from("<H", d, 256)[0] & OACS_DBBUF
    assert d[512] == 0x66 and d[513] == 0x44  # SQES / CQES
    assert struct.unpack_from("<I", d, 516)[0] == 1  # NN
    assert struct.unpack_from("<H", d, 520)[0] == 0x0C  # ONCS: DSM + Write Zeroes
    assert d[525] & 1  # volatile write cache
    assert d[768:].startswith(b"nqn.")


async def test_identify_namespace_list_and_descriptors(host: Host) -> None:
    c = await host.admin(A.IDENTIFY, nsid=1, prp1=DATA, cdw=(0,))
    assert c.code == 0
    d = buf(host)
    nsze, ncap, nuse = struct.unpack_from("<QQQ", d, 0)
    assert nsze == ncap == nuse == (4 << 20) // 512
    assert d[33] == DLFEAT_READ_ZEROES_WZ_DEALLOC and d[130] == 9  # LBADS 512 bytes
    assert await host.admin(A.IDENTIFY, prp1=DATA, cdw=(2,)) is not None
    assert struct.unpack_from("<2I", buf(host), 0) == (1, 0)
    c = await host.admin(A.IDENTIFY, nsid=1, prp1=DATA, cdw=(3,))
    assert c.code == 0
    d = buf(host)
    assert d[0] == 2 and d[1] == 16 and d[20] == 3 and d[21] == 16  # NGUID, UUID
    assert d[4:20] == host.dev.worker.namespaces[1].nguid
    c = await host.admin(A.IDENTIFY, nsid=0xFFFFFFFF, prp1=DATA, cdw=(0,))
    assert c.code == 0
    c = await host.admin(A.IDENTIFY, prp1=DATA, cdw=(6,))  # I/O command set ctrl, CSI 0
    assert c.code == 0


@pytest.mark.parametrize(("nsid", "cdw10", "cdw11", "want"), [
    (2, 0, 0, Status.INVALID_NAMESPACE),
    (0, 0, 0, Status.INVALID_NAMESPACE),
    (2, 3, 0, Status.INVALID_NAMESPACE),
    (0xFFFFFFFE, 2, 0, Status.INVALID_NAMESPACE),
    (0, 0x10, 0, Status.INVALID_FIELD),        # unsupported CNS
    (0, 6, 2 << 24, Status.INVALID_FIELD),     # CSI 2 (zoned)
])
async def test_identify_errors(host: Host, nsid: int, cdw10: int, cdw11: int,
                               want: Status) -> None:
    c = await host.admin(A.IDENTIFY, nsid=nsid, prp1=DATA, cdw=(cdw10, cdw11))
    assert c.code == want and c.status & DNR


async def test_identify_with_unmapped_buffer_is_data_transfer_error(host: Host) -> None:
    c = await host.admin(A.IDENTIFY, prp1=1 << 40, cdw=(1,))
    assert c.code == Status.DATA_TRANSFER_ERROR


async def test_identify_sgl_is_invalid_field(host: Host) -> None:
    c = await host.admin(A.IDENTIFY, prp1=DATA, cdw=(1,), flags=1 << 6)
    assert c.code == Status.INVALID_FIELD


async def test_unsupported_admin_opcodes(host: Host) -> None:
    for op in (A.NS_MANAGEMENT, A.FORMAT_NVM, A.FIRMWARE_COMMIT, 0xC0):
        c = await host.admin(op)
        assert c.code == Status.INVALID_OPCODE and c.status & DNR


async def test_create_and_delete_io_queues(host: Host) -> None:
    await host.create_io_queues()
    w = host.dev.worker
    assert 1 in w.sqs and 1 in w.cqs and w.cqs[1].sqs == {1}
    # a CQ with an SQ attached cannot go
    assert (await host.admin(A.DELETE_CQ, cdw=(1,))).code == Status.INVALID_QUEUE_DELETION
    assert (await host.admin(A.DELETE_SQ, cdw=(1,))).code == 0
    assert (await host.admin(A.DELETE_CQ, cdw=(1,))).code == 0
    assert not w.sqs.keys() - {0} and not w.cqs.keys() - {0}


@pytest.mark.parametrize(("cdw10", "cdw11", "prp1", "want"), [
    (0 | 63 << 16, 0x3, IOCQ, Status.INVALID_QUEUE_IDENTIFIER),    # qid 0
    (66 | 63 << 16, 0x3, IOCQ, Status.INVALID_QUEUE_IDENTIFIER),   # beyond granted
    (1 | 0 << 16, 0x3, IOCQ, Status.INVALID_QUEUE_SIZE),           # one entry
    (1 | 4096 << 16, 0x3, IOCQ, Status.INVALID_QUEUE_SIZE),        # > MQES + 1
    (1 | 63 << 16, 0x2, IOCQ, Status.INVALID_FIELD),               # not contiguous
    (1 | 63 << 16, 0x3, IOCQ + 8, Status.INVALID_FIELD),           # not page aligned
    (1 | 63 << 16, 0x3 | 65 << 16, IOCQ, Status.INVALID_INTERRUPT_VECTOR),
])
async def test_create_cq_errors(host: Host, cdw10: int, cdw11: int, prp1: int,
                                want: Status) -> None:
    c = await host.admin(A.CREATE_CQ, prp1=prp1, cdw=(cdw10, cdw11))
    assert c.code == want and c.status & DNR


async def test_create_cq_twice_and_sq_errors(host: Host) -> None:
    await host.create_io_queues()
    c = await host.admin(A.CREATE_CQ, prp1=IOCQ, cdw=(1 | 63 << 16, 0x3))
    assert c.code == Status.INVALID_QUEUE_IDENTIFIER
    c = await host.admin(A.CREATE_SQ, prp1=IOSQ, cdw=(1 | 63 << 16, 1 << 16 | 1))
    assert c.code == Status.INVALID_QUEUE_IDENTIFIER  # exists
    c = await host.admin(A.CREATE_SQ, prp1=IOSQ, cdw=(2 | 63 << 16, 5 << 16 | 1))
    assert c.code == Status.COMPLETION_QUEUE_INVALID
    c = await host.admin(A.CREATE_SQ, prp1=IOSQ, cdw=(2 | 63 << 16, 0 << 16 | 1))
    assert c.code == Status.COMPLETION_QUEUE_INVALID  # the admin CQ is not for I/O
    c = await host.admin(A.CREATE_SQ, prp1=IOSQ, cdw=(2 | 0 << 16, 1 << 16 | 1))
    assert c.code == Status.INVALID_QUEUE_SIZE
    c = await host.admin(A.CREATE_SQ, prp1=IOSQ, cdw=(2 | 63 << 16, 1 << 16))
    assert c.code == Status.INVALID_FIELD
    for op in (A.DELETE_SQ, A.DELETE_CQ):
        for qid in (0, 9):
            assert (await host.admin(op, cdw=(qid,))).code == Status.INVALID_QUEUE_IDENTIFIER


async def test_create_queue_with_wrong_entry_sizes(dev: Nvme, nvme_ctx: FakeContext) -> None:
    h = Host(dev, nvme_ctx)
    h.enable_pci()
    await h.enable(cc_extra=0)
    h.wr(0x14, 1)  # keep EN, zero IOSQES / IOCQES
    c = await h.admin(A.CREATE_CQ, prp1=IOCQ, cdw=(1 | 63 << 16, 0x3))
    assert c.code == Status.INVALID_FIELD


async def test_number_of_queues_feature(host: Host) -> None:
    c = await host.admin(A.GET_FEATURES, cdw=(FeatureId.NUMBER_OF_QUEUES,))
    assert c.result == 63 | 63 << 16
    c = await host.admin(A.SET_FEATURES, cdw=(FeatureId.NUMBER_OF_QUEUES, 3 | 1 << 16))
    assert c.code == 0 and c.result == 3 | 3 << 16
    c = await host.admin(A.CREATE_CQ, prp1=IOCQ, cdw=(5 | 63 << 16, 0x3))
    assert c.code == Status.INVALID_QUEUE_IDENTIFIER  # only 4 granted
    c = await host.admin(A.SET_FEATURES, cdw=(FeatureId.NUMBER_OF_QUEUES, 0xFFFF))
    assert c.code == Status.INVALID_FIELD
    c = await host.admin(A.SET_FEATURES, cdw=(FeatureId.NUMBER_OF_QUEUES, 1000 | 1000 << 16))
    assert c.result == 63 | 63 << 16


@pytest.mark.parametrize(("fid", "value", "readback"), [
    (FeatureId.VOLATILE_WRITE_CACHE, 0, 0),
    (FeatureId.VOLATILE_WRITE_CACHE, 3, 1),
    (FeatureId.INTERRUPT_COALESCING, 0x0A05, 0x0A05),
    (FeatureId.ASYNC_EVENT_CONFIG, 0x1FF, 0x1FF),
    (FeatureId.ARBITRATION, 0x03, 0x03),
    (FeatureId.POWER_MANAGEMENT, 0, 0),
    (FeatureId.TEMPERATURE_THRESHOLD, 350, 350),
    (FeatureId.ERROR_RECOVERY, 10, 10),
    (FeatureId.WRITE_ATOMICITY, 1, 1),
])
async def test_set_get_features(host: Host, fid: int, value: int, readback: int) -> None:
    assert (await host.admin(A.SET_FEATURES, cdw=(fid, value))).code == 0
    c = await host.admin(A.GET_FEATURES, cdw=(fid,))
    assert c.code == 0 and c.result == readback


async def test_feature_selects_and_errors(host: Host) -> None:
    vwc = FeatureId.VOLATILE_WRITE_CACHE
    await host.admin(A.SET_FEATURES, cdw=(vwc, 0))
    assert (await host.admin(A.GET_FEATURES, cdw=(vwc | 1 << 8,))).result == 1  # default
    assert (await host.admin(A.GET_FEATURES, cdw=(vwc | 2 << 8,))).result == 1  # saved
    assert (await host.admin(A.GET_FEATURES, cdw=(vwc | 3 << 8,))).result == 0b100
    assert (await host.admin(A.GET_FEATURES, cdw=(vwc | 5 << 8,))).code == Status.INVALID_FIELD
    c = await host.admin(A.SET_FEATURES, cdw=(vwc | 1 << 31, 1))
    assert c.code == Status.FEATURE_NOT_SAVEABLE
    for fid in (FeatureId.KEEP_ALIVE_TIMER, FeatureId.TIMESTAMP, 0x7F):
        assert (await host.admin(A.GET_FEATURES, cdw=(fid,))).code == Status.INVALID_FIELD
        assert (await host.admin(A.SET_FEATURES, cdw=(fid, 0))).code == Status.INVALID_FIELD
    ivc = FeatureId.INTERRUPT_VECTOR_CONFIG
    assert (await host.admin(A.GET_FEATURES, cdw=(ivc, 3))).result == 3
    assert (await host.admin(A.GET_FEATURES, cdw=(ivc, 65))).code == Status.INVALID_FIELD
    assert (await host.admin(A.SET_FEATURES, cdw=(ivc, 65))).code == Status.INVALID_FIELD


async def test_features_reset_with_the_controller(host: Host) -> None:
    await host.admin(A.SET_FEATURES, cdw=(FeatureId.VOLATILE_WRITE_CACHE, 0))
    await host.disable()
    await host.enable()
    assert (await host.admin(A.GET_FEATURES, cdw=(FeatureId.VOLATILE_WRITE_CACHE,))).result == 1


def numd(nbytes: int) -> tuple[int, int]:
    n = nbytes // 4 - 1
    return (n & 0xFFFF) << 16, n >> 16


async def test_log_pages(host: Host) -> None:
    lo, hi = numd(512)
    await host.create_io_queues()
    await host.cmd(1, 0x02, nsid=1, prp1=DATA + PAGE, cdw=(0, 0, 7))  # read 4 KiB
    c = await host.admin(A.GET_LOG_PAGE, nsid=0xFFFFFFFF, prp1=DATA,
                         cdw=(LogPage.SMART | lo, hi))
    assert c.code == 0
    d = buf(host, 512)
    assert d[3] == 100  # spare
    assert struct.unpack_from("<Q", d, 32)[0] == 1  # data units read (rounded up)
    assert struct.unpack_from("<Q", d, 64)[0] == 1  # host read commands
    c = await host.admin(A.GET_LOG_PAGE, prp1=DATA, cdw=(LogPage.FIRMWARE_SLOT | lo, hi))
    assert c.code == 0 and buf(host, 16)[0] == 1 and buf(host, 16)[8:11] == b"1.0"
    lo, hi = numd(64)
    c = await host.admin(A.GET_LOG_PAGE, prp1=DATA, cdw=(LogPage.ERROR | lo, hi))
    assert c.code == 0 and buf(host, 64) == bytes(64)
    # offset within the page, and past it
    lo, hi = numd(8)
    c = await host.admin(A.GET_LOG_PAGE, prp1=DATA,
                         cdw=(LogPage.FIRMWARE_SLOT | lo, hi, 8, 0))
    assert c.code == 0 and buf(host, 3) == b"1.0"
    c = await host.admin(A.GET_LOG_PAGE, prp1=DATA, cdw=(LogPage.SMART | lo, hi, 1024, 0))
    assert c.code == Status.INVALID_FIELD
    c = await host.admin(A.GET_LOG_PAGE, prp1=DATA, cdw=(LogPage.SMART | lo, hi, 2, 0))
    assert c.code == Status.INVALID_FIELD
    c = await host.admin(A.GET_LOG_PAGE, prp1=DATA, cdw=(0x70 | lo, hi))
    assert c.code == Status.INVALID_LOG_PAGE


async def test_async_event_requests_are_held_up_to_the_limit(host: Host) -> None:
    for _ in range(4):
        host.submit(0, host.sqe(A.ASYNC_EVENT_REQUEST))
    c = await host.admin(A.ASYNC_EVENT_REQUEST)
    assert c.code == Status.ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED
    assert len(host.dev.worker.aers) == 4
    assert host.poll(0) is None  # the four are outstanding, as on real hardware
    await host.disable()
    assert host.dev.worker.aers == []


async def test_abort_and_keep_alive(host: Host) -> None:
    c = await host.admin(A.ABORT, cdw=(1 | 0x1234 << 16,))
    assert c.code == 0 and c.result & 1  # not aborted
    assert (await host.admin(A.KEEP_ALIVE)).code == 0


async def test_doorbell_buffer_config(host: Host) -> None:
    c = await host.admin(A.DOORBELL_BUFFER_CONFIG, prp1=DBS + 8, prp2=EIS)
    assert c.code == Status.INVALID_FIELD
    c = await host.admin(A.DOORBELL_BUFFER_CONFIG, prp1=DBS, prp2=0)
    assert c.code == Status.INVALID_FIELD
    c = await host.admin(A.DOORBELL_BUFFER_CONFIG, prp1=DBS, prp2=EIS)
    assert c.code == 0
    w = host.dev.worker
    assert w.dbbuf == (DBS, EIS)
    assert host.rd(0) and host.dev.msix_enabled()
    assert w.sqs[0].shadow_db is None  # the admin queue keeps MMIO doorbells (as Linux does)
    await host.create_io_queues()
    assert w.sqs[1].shadow_db == DBS + 8 and w.cqs[1].shadow_db == DBS + 12
    assert w.sqs[1].event_idx == EIS + 8


async def test_doorbell_buffer_config_refused_without_msix(dev: Nvme,
                                                         nvme_ctx: FakeContext) -> None:
    h = Host(dev, nvme_ctx)
    h.enable_pci(msix=False)
    await h.enable()
    c = await h.admin(A.DOORBELL_BUFFER_CONFIG, prp1=DBS, prp2=EIS)
    assert c.code == Status.INVALID_FIELD and dev.worker.dbbuf is None

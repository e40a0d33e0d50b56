"""Migration v2 on the wire (vfiouser_srv/migration.py): every MIG_DEVICE_STATE arc and the
illegal ones, ERROR and its way out, the data stream, and DMA logging's dirty bitmap."""

from __future__ import annotations

import errno
import struct

import pytest

from devices.edu import Edu
from devices.lvu_sample import LvuSample
from devices.sdk.interface import DeviceModel
from protocol import (
    Command,
    ErrorReply,
    Feature,
    FeatureFlags,
    MigrationFlags,
    MigState,
    Reply,
    transition_path,
)
from vfiouser_srv.client import Client, VfioUserError
from vfiouser_srv.server import Server

from .conftest import MakeServer, open_client, python_engine_only, session_of

pytestmark = [pytest.mark.usefixtures("no_fd_leak"), python_engine_only("migration v2")]

S = MigState
SETTABLE = [S.STOP, S.RUNNING, S.STOP_COPY, S.RESUMING, S.PRE_COPY]
PAGE = 4096


class NoState(Edu):
    state_version = 0


async def expect_errno(err: int, coro: object) -> None:
    with pytest.raises(VfioUserError) as info:
        await coro  # type: ignore[misc]
    assert info.value.errno == err


async def serve(make_server: MakeServer, model: DeviceModel) -> Server:
    return await make_server({"dev": model})


async def reach(c: Client, state: MigState, saved: bytes) -> None:
    """Put the device in `state` from RUNNING (RESUMING gets a valid state written)."""
    await c.set_mig_state(state)
    if state is S.RESUMING:
        await c.mig_data_write(saved)


async def test_feature_refused_when_the_model_cannot_save(make_server: MakeServer) -> None:
    srv = await serve(make_server, NoState())
    async with open_client(srv, "dev") as c:
        assert not await c.feature_probe(Feature.MIGRATION, FeatureFlags.GET)
        await expect_errno(errno.ENOTTY, c.migration_flags())
        await expect_errno(errno.ENOTTY, c.set_mig_state(S.STOP))


async def test_probe_and_flags(make_server: MakeServer) -> None:
    srv = await make_server({"edu": Edu(), "lvu": LvuSample()})
    async with open_client(srv, "edu") as c:
        assert c.server_caps.migration is None  # not offered by this client: not returned
        assert await c.feature_probe(Feature.MIGRATION, FeatureFlags.GET)
        assert not await c.feature_probe(Feature.MIGRATION, FeatureFlags.SET)
        assert await c.feature_probe(Feature.MIG_DEVICE_STATE, FeatureFlags.GET | FeatureFlags.SET)
        assert await c.feature_probe(Feature.DMA_LOGGING_REPORT, FeatureFlags.GET)
        assert not await c.feature_probe(3)
        assert await c.migration_flags() == MigrationFlags.STOP_COPY
        assert await c.mig_state() is S.RUNNING
    async with open_client(srv, "lvu") as c:
        assert await c.migration_flags() == MigrationFlags.STOP_COPY | MigrationFlags.PRE_COPY


@pytest.mark.parametrize("pre_copy", [False, True], ids=["edu", "with-pre-copy"])
@pytest.mark.parametrize("src", SETTABLE, ids=lambda s: s.name)
async def test_every_arc(make_server: MakeServer, src: MigState, pre_copy: bool) -> None:
    """From each state to every other: the spec's path, or EINVAL and no change."""
    def model() -> DeviceModel:
        return LvuSample() if pre_copy else Edu()

    spare = model()
    saved = spare.save_state()
    spare.close()
    srv = await serve(make_server, model())
    async with open_client(srv, "dev") as c:
        for dst in SETTABLE:
            await c.device_reset()  # back to RUNNING
            if transition_path(S.RUNNING, src, pre_copy=pre_copy) is None:
                await expect_errno(errno.EINVAL, c.set_mig_state(src))
                assert await c.mig_state() is S.RUNNING
                continue
            await reach(c, src, saved)
            assert await c.mig_state() is src
            if transition_path(src, dst, pre_copy=pre_copy) is None:
                await expect_errno(errno.EINVAL, c.set_mig_state(dst))
                assert await c.mig_state() is src, (src, dst)
            else:
                await c.set_mig_state(dst)
                assert await c.mig_state() is dst, (src, dst)
            holders = session_of(srv, "dev").device.group.external
            assert bool(holders) == (await c.mig_state() in (S.STOP_COPY, S.PRE_COPY, S.RESUMING))


async def test_error_and_reset(make_server: MakeServer) -> None:
    srv = await serve(make_server, Edu())
    async with open_client(srv, "dev") as c:
        await c.set_mig_state(S.RESUMING)
        await c.mig_data_write(b"not a device state")
        await expect_errno(errno.EINVAL, c.set_mig_state(S.STOP))  # StateError
        assert await c.mig_state() is S.ERROR
        assert not session_of(srv, "dev").device.group.external
        for target in [*SETTABLE, S.ERROR]:
            await expect_errno(errno.EINVAL, c.set_mig_state(target))
        await expect_errno(errno.EINVAL, c.set_mig_state(99))
        await c.device_reset()
        assert await c.mig_state() is S.RUNNING
        assert int.from_bytes(await c.region_read(0, 0, 4), "little") == 0x010000ED  # edu ID
        await c.set_mig_state(S.STOP)
        await c.set_mig_state(S.RUNNING)


async def test_data_stream_chunks(make_server: MakeServer) -> None:
    srv = await serve(make_server, Edu())
    async with open_client(srv, "dev") as c:
        await expect_errno(errno.EINVAL, c.mig_data_read(16))  # RUNNING: no stream
        await expect_errno(errno.EINVAL, c.mig_data_write(b"x"))
        await c.set_mig_state(S.STOP_COPY)
        expected = session_of(srv, "dev").model.save_state()
        got = bytearray()
        while chunk := await c.mig_data_read(100):
            assert len(chunk) <= 100
            got += chunk
            if len(chunk) < 100:
                assert await c.mig_data_read(100) == b""
                break
        assert bytes(got) == expected
        # the reply carries as many bytes as were asked for (libvfio-user's padding)
        raw = await c.request_raw(Command.MIG_DATA_READ, struct.pack("<II", 8 + 64, 64))
        assert isinstance(raw, Reply)
        # larger than the client's max_data_xfer_size, or an argsz too small: EINVAL
        limit = c.caps.max_data_xfer_size
        await expect_errno(errno.EINVAL, c.mig_data_read(limit + 1))
        bad = await c.request_raw(Command.MIG_DATA_READ, struct.pack("<II", 8, 64))
        assert isinstance(bad, ErrorReply) and bad.errno == errno.EINVAL


async def test_padded_reply_on_the_wire(make_server: MakeServer) -> None:
    srv = await serve(make_server, Edu())
    async with open_client(srv, "dev") as c:
        await c.set_mig_state(S.STOP_COPY)
        size = len(session_of(srv, "dev").model.save_state())
        reply = await c.request_raw(Command.MIG_DATA_READ, struct.pack("<II", 8 + size + 50,
                                                                         size + 50))
        assert isinstance(reply, Reply)
        assert len(reply.body.data) == size  # type: ignore[attr-defined]


@pytest.mark.parametrize("report_page", [PAGE, 2 * PAGE])
async def test_dirty_bitmap_lists_exactly_the_pages_the_device_wrote(
    make_server: MakeServer, report_page: int
) -> None:
    srv = await serve(make_server, Edu())
    async with open_client(srv, "dev") as c:
        base, msg_base = 0x100000, 0x200000
        await c.memory.add_ram(base, 64 * PAGE)  # mmap'd
        await c.memory.add_ram(msg_base, 4 * PAGE, shared=False)  # message mode
        assert await c.dma_logging_start(PAGE) == PAGE
        dma = session_of(srv, "dev").dma
        await dma.write(base + 3 * PAGE + 100, b"x" * 10)  # page 3
        await dma.write(base + 9 * PAGE - 1, b"yy")  # pages 8 and 9
        view = dma.view(base + 20 * PAGE, 16, write=True)  # page 20
        assert view is not None
        view.release()
        with dma.pin(base + 30 * PAGE, 2 * PAGE, write=True):  # pages 30, 31
            pass
        with dma.pin_ranges([(base + 40 * PAGE, 8), (base + 50 * PAGE, 8)], write=True):
            pass  # pages 40, 50
        # reads and read-only views dirty nothing, nor writes by message (the client's)
        await dma.read(base + 60 * PAGE, PAGE)
        ro = dma.view(base + 61 * PAGE, 8)
        assert ro is not None
        ro.release()
        await dma.write(msg_base, b"m" * 100)
        written = {3, 8, 9, 20, 30, 31, 40, 50}
        bitmap = await c.dma_logging_report(base, 64 * PAGE, report_page)
        bits = int.from_bytes(bitmap, "little")
        per = report_page // PAGE
        assert len(bitmap) == 8
        assert {i for i in range(64 // per) if bits >> i & 1} == {p // per for p in written}
        assert await c.dma_logging_report(base, 64 * PAGE) == bytes(8)  # read and clear
        assert await c.dma_logging_report(msg_base, 4 * PAGE) == bytes(8)
        await c.dma_logging_stop()
        await dma.write(base, b"z")
        await expect_errno(errno.EINVAL, c.dma_logging_report(base, PAGE))


async def test_logging_start_twice_and_bad_reports(make_server: MakeServer) -> None:
    srv = await serve(make_server, Edu())
    async with open_client(srv, "dev") as c:
        await expect_errno(errno.EINVAL, c.dma_logging_report(0, PAGE))  # not started
        assert await c.dma_logging_start(3000) == PAGE  # not a power of two: ours
        await expect_errno(errno.EBUSY, c.dma_logging_start(PAGE))
        await expect_errno(errno.EINVAL, c.dma_logging_report(0, PAGE, 3000))
        await expect_errno(errno.EINVAL, c.dma_logging_report(0, 0))
        await c.dma_logging_stop()
        assert await c.dma_logging_start(2 * PAGE) == 2 * PAGE

"""Engine-independent server behaviour, run on every engine (see conftest's `engine`).

Each test talks to the device only through the real client, so the same assertions hold
for the Python engine and for libvfio-user; where an engine cannot behave the same the test
says so and points at `BEHAVIOUR_DIFFERENCES`.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import struct
import subprocess
import sys

import pytest
import trio
import trio.testing

from devices.edu import Edu, Reg
from protocol import IrqSetFlags
from vfiouser_srv.client import VfioUserError, make_eventfd, open_client, wait_eventfd

from .conftest import ServeEdu
from .models import BAR2_SIZE, BUG, FAIL, HANG, MSIX, PIN, PIN_ADDR, PROBE_ID, Probe

BAR0, BAR2, ROM, CONFIG, MSIX_INDEX = 0, 2, 6, 7, 2
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _u32(v: int) -> bytes:
    return struct.pack("<I", v)


async def test_device_state_survives_reconnect(engine: str, serve_model: ServeEdu) -> None:
    """The spec keeps device state across clients; the engine re-attaches the next one."""
    _, path = await serve_model(engine)
    async with open_client(path, reply_timeout=10) as c:
        await c.region_write(BAR0, Reg.LIVENESS, _u32(0x0F0F0F0F))
    for _ in range(3):
        async with open_client(path, reply_timeout=10) as c:
            assert await c.region_read(BAR0, Reg.LIVENESS, 4) == _u32(0xF0F0F0F0)


async def test_sequential_clients_leak_no_fds(engine: str, serve_model: ServeEdu) -> None:
    _, path = await serve_model(engine)

    async def one_session() -> None:
        async with open_client(path, reply_timeout=10) as c:
            await c.memory.add_ram(0x100000, 0x10000)
            efd = make_eventfd()
            await c.set_irq_eventfds(0, 0, [efd])
            efd.close()
            await c.region_read(BAR0, Reg.ID, 4)
        await trio.testing.wait_all_tasks_blocked()

    await one_session()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        await one_session()
    assert len(os.listdir("/proc/self/fd")) == before


async def test_model_errors_become_errnos(
    engine: str, serve_model: ServeEdu, caplog: pytest.LogCaptureFixture
) -> None:
    """DeviceError is its errno; any other exception is EIO and never silent."""
    _, path = await serve_model(engine, Probe())
    async with open_client(path, reply_timeout=10) as c:
        with pytest.raises(VfioUserError) as info:
            await c.region_write(BAR0, FAIL, _u32(errno.EBADMSG))
        assert info.value.errno == errno.EBADMSG
        with caplog.at_level(logging.ERROR), pytest.raises(VfioUserError) as info:
            await c.region_write(BAR0, BUG, _u32(1))
        assert info.value.errno == errno.EIO
        assert await c.region_read(BAR0, 0, 4) == _u32(PROBE_ID)  # connection kept
    tracebacks = [r for r in caplog.records if r.exc_info and "model bug" in str(r.exc_info[1])]
    assert tracebacks, "a model bug must be logged with its traceback"


async def test_mmap_region_and_sparse_areas(engine: str, serve_model: ServeEdu) -> None:
    model = Probe()
    _, path = await serve_model(engine, model)
    async with open_client(path, reply_timeout=10) as c:
        info = await c.region_info(BAR2)
        assert info.size == BAR2_SIZE and info.fd is not None
        areas = [tuple(a) for cap in info.caps for a in getattr(cap, "areas", ())]
        try:
            mm = mmap.mmap(info.fd.fileno(), BAR2_SIZE, offset=info.offset)
        finally:
            info.fd.close()
        with mm:
            mm[0x10:0x14] = b"abcd"
            assert await c.region_read(BAR2, 0x10, 4) == b"abcd"
            await c.region_write(BAR2, 0x3000, b"wxyz")
            assert mm[0x3000:0x3004] == b"wxyz"
        rom = await c.region_read(ROM, 0, 9)
        assert rom == b"PROBE-ROM"
    assert areas == [(0, 0x1000), (0x2000, BAR2_SIZE - 0x2000)]


async def test_msix_vector_and_pending_bit(engine: str, serve_model: ServeEdu) -> None:
    model = Probe()
    _, path = await serve_model(engine, model)
    async with open_client(path, reply_timeout=10) as c:
        # MSI-X enable + Bus Master, as QEMU does once the guest driver enables MSI-X
        await c.region_write(CONFIG, 0x04, struct.pack("<H", 0x6))
        cap = model.msix.offset
        await c.region_write(CONFIG, cap + 2, struct.pack("<H", 0x8000 | 3))
        efd = make_eventfd()
        try:
            await c.set_irq_eventfds(MSIX_INDEX, 1, [efd])
            await c.region_write(BAR0, MSIX, _u32(1))
            with trio.fail_after(5):
                assert await wait_eventfd(efd) == 1
            await c.set_irqs(MSIX_INDEX, IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_MASK, 1, 1)
            await c.region_write(BAR0, MSIX, _u32(1))
            pba = await c.region_read(BAR2, 0x1800, 8)
            assert int.from_bytes(pba, "little") & 0b10
            await c.set_irqs(MSIX_INDEX, IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_UNMASK, 1, 1)
            with trio.fail_after(5):
                assert await wait_eventfd(efd) == 1
        finally:
            efd.close()


async def test_reset_cancels_device_tasks(
    engine: str, serve_model: ServeEdu, monkeypatch: pytest.MonkeyPatch
) -> None:
    if engine == "libvfio-user":
        from vfiouser_srv.engines.libvfio_user import _device

        monkeypatch.setattr(_device, "QUIESCE_GRACE", 0.05)
    model = Probe()
    _, path = await serve_model(engine, model)
    async with open_client(path, reply_timeout=10) as c:
        await c.region_write(BAR0, HANG, _u32(1))
        await model.hung.wait()
        with trio.fail_after(5):
            await c.device_reset()
        assert model.cancelled == 1
        assert model.resets == 1
        assert await c.region_read(BAR0, 0, 4) == _u32(PROBE_ID)


async def test_unmap_waits_for_a_pinned_view(engine: str, serve_model: ServeEdu) -> None:
    """A pinned DMA view stays valid across awaits: DMA_UNMAP answers only once it is gone."""
    model = Probe()
    _, path = await serve_model(engine, model)
    async with open_client(path, reply_timeout=10) as c:
        await c.memory.add_ram(PIN_ADDR, 0x1000)
        await c.region_write(BAR0, PIN, _u32(1))
        with trio.fail_after(5):
            await model.pinned.wait()
        async with trio.open_nursery() as nursery:
            unmapped = trio.Event()

            async def unmap() -> None:
                await c.dma_unmap(PIN_ADDR, 0x1000)
                unmapped.set()

            nursery.start_soon(unmap)
            await trio.testing.wait_all_tasks_blocked()
            assert not unmapped.is_set()
            model.unpin.set()
        assert c.memory.read(PIN_ADDR, 4) == b"PIN!"


async def test_shutdown_with_a_silent_client(engine: str, nursery: trio.Nursery) -> None:
    """A client that connects and never sends VERSION must not hold up shutdown."""
    import tempfile

    from vfiouser_srv.server import Server

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "edu.sock")
        srv = Server()
        srv.add_device("edu", Edu(), socket_path=path, engine=engine)
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as inner:
                await inner.start(srv.serve)
                sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
                await sock.connect(path)
                await trio.testing.wait_all_tasks_blocked()
                with trio.fail_after(5):
                    scope.cancel()
            sock.close()
        assert not os.path.exists(path)


async def test_cli_accepts_engine_in_config_and_refuses_fd(tmp_path: object, engine: str) -> None:
    from vfiouser_srv.cli import DeviceConfig, build_server, load_config
    from vfiouser_srv.objects import ObjectError

    cfg = os.path.join(str(tmp_path), "srv.toml")
    sock = os.path.join(str(tmp_path), "e.sock")
    with open(cfg, "w") as f:
        f.write(
            f'[server]\nengine = "{engine}"\n[[device]]\nname = "e"\nmodel = "edu"\n'
            f'socket = "{sock}"\n'
        )
    groups, devs = load_config(cfg)
    assert devs[0].engine == engine
    server = build_server(groups, devs)
    assert "e" in server.devices
    server.close()
    if engine != "python":
        with pytest.raises(ObjectError, match="creates its own socket"):
            build_server([], [DeviceConfig("f", "edu", None, 3, None, {}, engine)])


def test_missing_library_is_one_clear_error(tmp_path: object) -> None:
    """Without the library `--engine libvfio-user` exits 2 with a message saying what to do."""
    env = dict(os.environ, LIBVFIO_USER_PATH=os.path.join(str(tmp_path), "nope.so"))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "vfiouser_srv",
            "serve",
            "edu",
            "--engine",
            "libvfio-user",
            "--socket-path",
            os.path.join(str(tmp_path), "x.sock"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "LIBVFIO_USER_PATH" in out.stderr and "no such file" in out.stderr
    not_lib = dict(os.environ, LIBVFIO_USER_PATH="/lib/x86_64-linux-gnu/libc.so.6")
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from vfiouser_srv.engines import load_engine; load_engine('libvfio-user')",
        ],
        cwd=REPO,
        env=not_lib,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "is not libvfio-user" in out.stderr

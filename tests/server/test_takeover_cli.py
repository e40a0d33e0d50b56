"""`serve --take-over` as real processes: the old server exits 0, the new one prints READY,
and a client connected before goes on being served (docs/live-upgrade.md)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import trio

from devices.edu import DMA_START, DmaCmd, IrqBit, Reg
from vfiouser_srv.client import make_eventfd, open_client, wait_eventfd

from .test_cli import TIMEOUT, Cli, assert_clean_error, cli, run_cli
from .test_edu_client import MSI, bus_master, enable_msi, rd32, wr32, wr64

pytestmark = pytest.mark.python_engine_only("live upgrade hands over Python-engine sessions")

RAM = 0x10000


async def test_take_over_twice_under_a_client(tmp_path: Path) -> None:
    sock, ctl = str(tmp_path / "edu.sock"), str(tmp_path / "ctl.sock")
    args = ("serve", "edu", "--socket-path", sock, "--control", ctl)
    async with cli(*args) as old:
        assert await old.readline() == f"READY {sock}"
        async with open_client(sock, reply_timeout=TIMEOUT) as c:
            await c.memory.add_ram(RAM, 0x1000, shared=True)
            await bus_master(c)
            await enable_msi(c)
            with make_eventfd() as msi:
                await c.set_irq_eventfds(MSI, 0, [msi])
                c.memory.write(RAM, b"survives-upgrades" * 4)
                await wr64(c, Reg.DMA_SRC, RAM)
                await wr64(c, Reg.DMA_DST, DMA_START)
                await wr64(c, Reg.DMA_CNT, 68)
                await wr64(c, Reg.DMA_CMD, DmaCmd.RUN | DmaCmd.IRQ)
                assert await wait_eventfd(msi, timeout=5) == 1
                await wr32(c, Reg.IRQ_ACK, IrqBit.DMA)
                async with cli(*args, "--take-over") as new1:
                    await upgraded(old, new1, sock, ctl)
                    await wr32(c, Reg.LIVENESS, 5)
                    assert await rd32(c, Reg.LIVENESS) == ~5 & 0xFFFF_FFFF
                    async with cli(*args, "--take-over") as new2:
                        await upgraded(new1, new2, sock, ctl)
                        await wr64(c, Reg.DMA_SRC, DMA_START)
                        await wr64(c, Reg.DMA_DST, RAM + 0x800)
                        await wr64(c, Reg.DMA_CMD, DmaCmd.RUN | DmaCmd.TO_RAM | DmaCmd.IRQ)
                        assert await wait_eventfd(msi, timeout=5) == 1
                        assert c.memory.read(RAM + 0x800, 68) == b"survives-upgrades" * 4
                        assert await new2.terminate() == 0
    assert not os.path.exists(sock) and not os.path.exists(ctl)


async def upgraded(old: Cli, new: Cli, sock: str, ctl: str) -> None:
    assert await new.readline() == f"READY {sock}"
    with trio.fail_after(TIMEOUT):
        assert await old.proc.wait() == 0
    assert os.path.exists(sock) and os.path.exists(ctl)
    assert b"Traceback" not in old.stderr


async def test_take_over_needs_a_control_socket_and_the_python_engine(tmp_path: Path) -> None:
    sock, ctl = str(tmp_path / "edu.sock"), str(tmp_path / "ctl.sock")
    res = await run_cli("serve", "edu", "--socket-path", sock, "--take-over")
    assert res.returncode == 2
    assert_clean_error(res.stderr, "--take-over needs --control")
    res = await run_cli("serve", "edu", "--socket-path", sock, "--control", ctl, "--take-over",
                        "--engine", "libvfio-user")
    assert res.returncode == 2
    assert_clean_error(res.stderr, "only the python engine")
    res = await run_cli("serve", "edu", "--socket-path", sock, "--control", ctl, "--take-over")
    assert res.returncode == 2
    assert_clean_error(res.stderr, "cannot connect to control socket")


async def test_take_over_refused_by_a_libvfio_user_device_keeps_the_old_server(
    tmp_path: Path,
) -> None:
    """The old server refuses (its device is on the other engine): one line, exit 2."""
    from vfiouser_srv.engines import EngineUnavailable, load_engine

    try:
        load_engine("libvfio-user")
    except EngineUnavailable as exc:
        pytest.skip(f"libvfio-user engine unavailable: {exc}")
    sock, ctl = str(tmp_path / "edu.sock"), str(tmp_path / "ctl.sock")
    base = ("serve", "edu", "--socket-path", sock, "--control", ctl)
    async with cli(*base, "--engine", "libvfio-user") as old:
        assert await old.readline() == f"READY {sock}"
        res = await run_cli(*base, "--take-over")
        assert res.returncode == 2
        assert_clean_error(res.stderr, "libvfio-user engine")
        assert old.proc.returncode is None
        old.proc.send_signal(signal.SIGTERM)

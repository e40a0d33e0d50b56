"""Live upgrade, in process: two `Server`s, the real client connected across the handover
(docs/live-upgrade.md). The old server runs with a control socket; the new one takes over
through it with `takeover.take_over`, as `serve --take-over` does."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from devices.edu import DMA_START, DmaCmd, IrqBit, Reg
from devices.sdk.interface import DeviceModel
from vfiouser_srv.client import Client, make_eventfd, read_eventfd_nowait, wait_eventfd
from vfiouser_srv.control import ControlServer, LineChannel
from vfiouser_srv.server import Server
from vfiouser_srv.sockets import DEFAULT_ACCESS
from vfiouser_srv.takeover import TakenOver, TakeOverError, take_over
from vfiouser_srv.transport import FdStream

from .conftest import open_client, python_engine_only, session_of, sock_path
from .test_edu_client import MSI, bus_master, enable_msi, rd32, wr32, wr64

pytestmark = [
    pytest.mark.usefixtures("no_fd_leak"),
    python_engine_only("live upgrade hands over Python-engine sessions"),
]

RAM = 0x10000
Models = Callable[[], dict[str, DeviceModel]]


def edu_models() -> dict[str, DeviceModel]:
    from devices.edu import Edu

    return {"edu": Edu()}


@dataclass
class Running:
    """A server serving in its own cancel scope, with its control socket."""

    server: Server
    control: ControlServer
    scope: trio.CancelScope
    done: trio.Event = field(default_factory=trio.Event)


async def start(
    nursery: trio.Nursery, server: Server, control: ControlServer, on_started: Any = None
) -> Running:
    run = Running(server, control, trio.CancelScope())

    async def serve(task_status: trio.TaskStatus[None]) -> None:
        try:
            with run.scope:
                async with trio.open_nursery() as inner:
                    await inner.start(server.serve)
                    await inner.start(control.serve)
                    if on_started is not None:
                        on_started()
                    task_status.started()
                    await control.handed_over.wait()
                    inner.cancel_scope.cancel()  # what `serve` does after a handover: exit
        finally:
            run.done.set()

    await nursery.start(serve)
    return run


class Pair:
    """The old server (`old`) and, after `upgrade`, the new one (`new`)."""

    def __init__(self, nursery: trio.Nursery, tmp_path: Path, models: Models) -> None:
        self.nursery = nursery
        self.tmp_path = tmp_path
        self.models = models
        self.control_path = sock_path(tmp_path, "control")
        self.old: Running | None = None
        self.new: Running | None = None
        self.generation = 0

    def build(self, listeners: dict[str, int]) -> Server:
        srv = Server()
        for name, model in self.models().items():
            srv.add_device(
                name, model, socket_path=sock_path(self.tmp_path, name), fd=listeners.get(name)
            )
        return srv

    async def start_old(self) -> Running:
        srv = self.build({})
        control = ControlServer(srv, self.control_path, DEFAULT_ACCESS)
        self.old = await start(self.nursery, srv, control)
        return self.old

    @property
    def current(self) -> Running:
        run = self.new or self.old
        assert run is not None
        return run

    async def upgrade(self, **kwargs: Any) -> TakenOver:
        """Take over from the current server; returns once the new one serves and the old
        one has exited."""
        before = self.current
        taken = await take_over(self.control_path, self.build, **kwargs)
        control = ControlServer(
            taken.server, self.control_path, DEFAULT_ACCESS, fd=taken.control_fd
        )
        self.new = await start(self.nursery, taken.server, control, taken.start)
        with trio.fail_after(5):
            await before.done.wait()
        self.generation += 1
        return taken


@pytest.fixture
async def pair(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Pair]:
    p = Pair(nursery, tmp_path, edu_models)
    await p.start_old()
    yield p
    p.current.scope.cancel()
    with trio.fail_after(5):
        await p.current.done.wait()


@asynccontextmanager
async def control_client(path: str) -> AsyncIterator[LineChannel]:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(path)
    channel = LineChannel(FdStream(socket.socket(fileno=sock.detach())), 1 << 30)
    try:
        greeting = await channel.receive()
        assert "QMP" in greeting
        yield channel
    finally:
        channel.close()


async def ask(channel: LineChannel, line: bytes | dict[str, Any]) -> Any:
    if isinstance(line, dict):
        await channel.send(line)
    else:
        await channel.stream.send(line)
    with trio.fail_after(5):
        return await channel.receive()


async def still_serves(c: Client) -> None:
    await wr32(c, Reg.LIVENESS, 0x1234)
    assert await rd32(c, Reg.LIVENESS) == ~0x1234 & 0xFFFF_FFFF


# ------------------------------------------------------------------ control socket


async def test_control_protocol_and_bad_requests(pair: Pair) -> None:
    srv = pair.current.server
    async with open_client(srv) as c, control_client(pair.control_path) as ch:
        assert (await ask(ch, {"execute": "query-version", "id": 7}))["id"] == 7
        names = {x["name"] for x in (await ask(ch, {"execute": "query-commands"}))["return"]}
        assert {"take-over", "query-version", "qmp_capabilities"} <= names
        bad: list[tuple[bytes | dict[str, Any], str]] = [
            (b"not json\n", "GenericError"),
            (b"[1, 2]\n", "GenericError"),
            (b'{"execute": 3}\n', "GenericError"),
            ({"execute": "query-version", "arguments": []}, "GenericError"),
            ({"execute": "query-version", "bogus": 1}, "GenericError"),
            ({"execute": "no-such-command"}, "CommandNotFound"),
            ({"execute": "take-over-commit"}, "GenericError"),
            ({"execute": "take-over", "arguments": {"timeout": -1}}, "GenericError"),
            ({"execute": "take-over", "arguments": {"format": 99}}, "GenericError"),
        ]
        for line, cls in bad:
            reply = await ask(ch, line)
            assert reply["error"]["class"] == cls, (line, reply)
        # descriptors sent to the control socket are closed, and nothing else happens
        with make_eventfd() as efd:
            await ch.send({"execute": "qmp_capabilities"}, [efd])
            assert (await ch.receive())["return"] == {}
            assert (await ask(ch, {"execute": "query-version"}))["return"]["pid"] > 0
        await still_serves(c)
    assert pair.current is pair.old


async def test_control_socket_mode_and_oversized_line(pair: Pair) -> None:
    assert Path(pair.control_path).stat().st_mode & 0o777 == 0o600
    async with control_client(pair.control_path) as ch:
        with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
            await ch.stream.send(b"x" * (2 << 20))  # the server closes the connection
    async with control_client(pair.control_path) as ch:
        assert "return" in await ask(ch, {"execute": "query-version"})


# ------------------------------------------------------------------ successful take-over


@pytest.mark.parametrize("shared", [True, False], ids=["mmap", "messages"])
async def test_takeover_keeps_client_windows_and_interrupts(pair: Pair, shared: bool) -> None:
    old = pair.current.server
    async with open_client(old) as c:
        await c.memory.add_ram(RAM, 0x2000, shared=shared)
        await bus_master(c)
        await enable_msi(c)
        with make_eventfd() as msi:
            await c.set_irq_eventfds(MSI, 0, [msi])
            c.memory.write(RAM, b"before-takeover!" * 8)
            await wr64(c, Reg.DMA_SRC, RAM)
            await wr64(c, Reg.DMA_DST, DMA_START)
            await wr64(c, Reg.DMA_CNT, 128)
            await wr64(c, Reg.DMA_CMD, DmaCmd.RUN | DmaCmd.IRQ)
            assert await wait_eventfd(msi, timeout=5) == 1
            await wr32(c, Reg.IRQ_ACK, IrqBit.DMA)
            await wr32(c, Reg.LIVENESS, 0xA5A5)
            next_id = session_of(old).conn._next_id

            for _ in range(2):
                await pair.upgrade()
            new = pair.current.server
            assert new is not old and not old.sessions and not old.devices["edu"].session
            s = session_of(new)
            assert s.conn._next_id == next_id  # the server's request ids continue
            assert await rd32(c, Reg.LIVENESS) == ~0xA5A5 & 0xFFFF_FFFF
            # edu buffer -> RAM through the handed-over window, MSI through the eventfd
            await wr64(c, Reg.DMA_SRC, DMA_START)
            await wr64(c, Reg.DMA_DST, RAM + 0x1000)
            await wr64(c, Reg.DMA_CMD, DmaCmd.RUN | DmaCmd.TO_RAM | DmaCmd.IRQ)
            assert await wait_eventfd(msi, timeout=5) == 1
            assert c.memory.read(RAM + 0x1000, 128) == b"before-takeover!" * 8
            assert await rd32(c, Reg.IRQ_STATUS) == IrqBit.DMA
            if not shared:
                assert s.conn._next_id != next_id  # it sent DMA_WRITE with the next ids
        # the socket files stayed, and new clients reach the new server
        assert Path(sock_path(pair.tmp_path, "edu")).exists()
        assert Path(pair.control_path).exists()
    async with open_client(pair.current.server) as c2:
        await still_serves(c2)


async def test_requests_during_the_handover_are_answered_by_the_new_server(pair: Pair) -> None:
    async with open_client(pair.current.server) as c:
        answered = 0
        done = False

        async def hammer() -> None:
            nonlocal answered
            while not done:
                await wr32(c, Reg.LIVENESS, answered)
                assert await rd32(c, Reg.LIVENESS) == ~answered & 0xFFFF_FFFF
                answered += 1

        async with trio.open_nursery() as n:
            n.start_soon(hammer)
            await trio.sleep(0.05)
            before = answered
            await pair.upgrade()
            await trio.sleep(0.05)
            done = True
        assert answered > before > 0
        assert session_of(pair.current.server) is not None


async def test_pending_interrupt_and_mask_survive(pair: Pair) -> None:
    async with open_client(pair.current.server) as c:
        await bus_master(c)
        await enable_msi(c)
        with make_eventfd() as msi:
            await c.set_irq_eventfds(MSI, 0, [msi])
            table = session_of(pair.current.server).irq_table
            assert table is not None
            await pair.upgrade()
            table2 = session_of(pair.current.server).irq_table
            assert table2 is not None and table2.enabled(MSI)
            await wr32(c, Reg.IRQ_RAISE, 1)
            assert await wait_eventfd(msi, timeout=5) == 1
            assert read_eventfd_nowait(msi) == 0


# ------------------------------------------------------------------ failures


async def test_new_process_dies_mid_handover_old_serves_on(pair: Pair) -> None:
    async with open_client(pair.current.server) as c:
        await c.memory.add_ram(RAM, 0x1000, shared=True)
        await wr32(c, Reg.LIVENESS, 7)
        async with control_client(pair.control_path) as ch:
            await ch.send({"execute": "take-over", "id": 1})
            with trio.fail_after(5):
                while (await ch.receive()).get("event") != "TAKE_OVER_STATE":
                    pass
            assert ch.fds  # it got the descriptors, then "dies"
        with trio.fail_after(5):
            assert await rd32(c, Reg.LIVENESS) == ~7 & 0xFFFF_FFFF
        await still_serves(c)
    assert pair.current is pair.old and not pair.old.control.busy
    await pair.upgrade()  # and a real take-over still works afterwards
    async with open_client(pair.current.server) as c:
        await still_serves(c)


@pytest.mark.parametrize(
    "verdict",
    [b"garbage\n", b'{"execute": "take-over-abort", "arguments": {"reason": "test"}}\n', None],
    ids=["garbage", "abort", "timeout"],
)
async def test_bad_verdict_old_serves_on(pair: Pair, verdict: bytes | None) -> None:
    async with open_client(pair.current.server) as c:
        async with control_client(pair.control_path) as ch:
            await ch.send({"execute": "take-over", "arguments": {"timeout": 0.5}, "id": 1})
            with trio.fail_after(5):
                while (await ch.receive()).get("event") != "TAKE_OVER_STATE":
                    pass
                if verdict is not None:
                    await ch.stream.send(verdict)
                reply = await ch.receive()
            assert reply["error"]["class"] == "GenericError" and reply["id"] == 1
        await still_serves(c)
    assert pair.current is pair.old


async def test_restore_failure_aborts_and_old_serves_on(pair: Pair) -> None:
    async with open_client(pair.current.server) as c:
        await wr32(c, Reg.LIVENESS, 9)

        def broken(listeners: dict[str, int]) -> Server:
            srv = pair.build(listeners)
            srv.devices["edu"].model.load_state = _refuse  # type: ignore[method-assign]
            return srv

        with pytest.raises(TakeOverError, match="refused on purpose"):
            await take_over(pair.control_path, broken)
        assert await rd32(c, Reg.LIVENESS) == ~9 & 0xFFFF_FFFF
    assert Path(sock_path(pair.tmp_path, "edu")).exists()


def _refuse(data: bytes) -> None:
    from devices.sdk.interface import StateError

    raise StateError("refused on purpose")


async def test_model_without_state_is_refused(nursery: trio.Nursery, tmp_path: Path) -> None:
    class NoState(DeviceModel):
        name = "nostate"

        def regions(self) -> list[Any]:
            return []

        def irqs(self) -> list[Any]:
            return []

    p = Pair(nursery, tmp_path, lambda: {"nostate": NoState()})
    await p.start_old()
    with pytest.raises(TakeOverError, match="state_version 0"):
        await take_over(p.control_path, p.build)
    p.current.scope.cancel()


async def test_other_engine_is_refused(pair: Pair) -> None:
    runner = pair.current.server._runners["edu"]
    real = runner.device
    runner.device = object()  # type: ignore[assignment]
    try:
        with pytest.raises(TakeOverError, match="libvfio-user engine"):
            await take_over(pair.control_path, pair.build)
    finally:
        runner.device = real
    async with open_client(pair.current.server) as c:
        await still_serves(c)


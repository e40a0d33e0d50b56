"""The control socket's operations commands (docs/operations.md): queries, stats checked
against a scripted session, device-add/device-del with events, trace-on/off, bad requests,
a client leaving mid-request, and health (a failing device task: ERR, non-viable, reset)."""

from __future__ import annotations

import errno
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from devices.edu import Edu, Reg
from devices.sdk.interface import IrqIndex
from vfiouser_srv import control_commands  # noqa: F401 (registers the commands)
from vfiouser_srv.client import make_eventfd, read_eventfd_nowait
from vfiouser_srv.client.replies import VfioUserError
from vfiouser_srv.control import ControlServer, LineChannel
from vfiouser_srv.server import Server
from vfiouser_srv.sockets import DEFAULT_ACCESS
from vfiouser_srv.transport import FdStream

from .conftest import open_client, python_engine_only

pytestmark = [python_engine_only("the operations counters are the Python engine's")]


class FailingEdu(Edu):
    """edu whose register 0x80 write (a made-up doorbell) starts a device task that raises."""

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        if index == 0 and offset == 0x80:
            self.ctx.start_task(self._boom, name="boom")
            return
        super().region_write(index, offset, data)

    async def _boom(self) -> None:
        raise RuntimeError("backend gone")


class Ctl:
    def __init__(self, channel: LineChannel) -> None:
        self.channel = channel
        self.events: list[dict[str, Any]] = []

    async def call(self, command: str, **args: Any) -> dict[str, Any]:
        await self.channel.send({"execute": command, "arguments": args})
        while True:
            msg = await self.channel.receive()
            if "event" in msg:
                self.events.append(msg)
                continue
            return dict(msg)

    async def ok(self, command: str, **args: Any) -> Any:
        msg = await self.call(command, **args)
        assert "return" in msg, msg
        return msg["return"]

    async def event(self, event: str) -> dict[str, Any]:
        with trio.fail_after(5):
            while True:
                for e in self.events:
                    if e["event"] == event:
                        self.events.remove(e)
                        return e
                self.events.append(await self.channel.receive())


@asynccontextmanager
async def running(tmp_path: Path, model: Edu | None = None) -> AsyncIterator[tuple[Server, Ctl]]:
    server = Server()
    server.add_device("edu", model or Edu(), socket_path=str(tmp_path / "edu.sock"))
    path = str(tmp_path / "ctl.sock")
    control = ControlServer(server, path, DEFAULT_ACCESS)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        await nursery.start(control.serve)
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(path)
        channel = LineChannel(FdStream(sock))
        assert "QMP" in await channel.receive()
        try:
            yield server, Ctl(channel)
        finally:
            channel.close()
            nursery.cancel_scope.cancel()


async def test_query_devices_sessions_and_stats_of_a_scripted_session(tmp_path: Path) -> None:
    async with running(tmp_path) as (server, ctl):
        [dev] = await ctl.ok("query-devices")
        assert dev["name"] == "edu" and dev["client"] is None and dev["viable"] and dev["healthy"]
        async with open_client(server) as client:
            efd = make_eventfd()
            try:
                await client.set_irq_eventfds(int(IrqIndex.MSI), 0, [efd])
                for _ in range(5):
                    await client.region_read(0, int(Reg.ID), 4)
                await client.region_write(0, int(Reg.LIVENESS), (7).to_bytes(4, "little"))
                with pytest.raises(VfioUserError):
                    await client.region_read(0, 1 << 30, 4)  # past the end: EINVAL
                [dev] = await ctl.ok("query-devices")
                c = dev["client"]
                assert c["attached"] and c["pid"] > 0 and c["irq_eventfds"]["MSI"] == 1
                assert c["dma_windows"] == 0 and c["capabilities"] is not None
                sessions = await ctl.ok("query-sessions")
                assert [s["connection"] for s in sessions] == [c["connection"]]
                stats = (await ctl.ok("query-stats"))["edu"]
                assert stats["messages"]["REGION_READ"] == 6  # 5 served + 1 failed
                assert stats["messages"]["REGION_WRITE"] == 1
                assert stats["messages"]["DEVICE_SET_IRQS"] == 1
                assert stats["region_bytes_read"] == 20 and stats["region_bytes_written"] == 4
                assert stats["errors"] == {"EINVAL": 1}
                assert stats["connections_accepted"] == 1
            finally:
                efd.close()
        with trio.fail_after(5):
            while server.devices["edu"].session is not None:
                await trio.sleep(0.01)
        after = (await ctl.ok("query-stats", device="edu"))["edu"]
        assert after["messages"]["REGION_READ"] == 6 and after["region_bytes_read"] == 20


async def test_device_add_del_with_events_and_readd(tmp_path: Path) -> None:
    async with running(tmp_path) as (server, ctl):
        await ctl.ok("subscribe")
        path = str(tmp_path / "edu2.sock")
        info = await ctl.ok("device-add", model="edu", name="edu2", socket=path)
        assert info["model"] == "edu" and Path(path).exists()
        await ctl.event("DEVICE_ADDED")
        async with open_client(server, "edu2"):
            await ctl.event("CLIENT_ATTACHED")
            # the client ignores REQ: after the deadline it is disconnected
            res = await ctl.ok("device-del", device="edu2", interval=0.05, deadline=0.3)
            assert res["requests"] >= 2
            await ctl.event("REQ_IGNORED")
            await ctl.event("CLIENT_DETACHED")
            await ctl.event("DEVICE_DELETED")
        assert not Path(path).exists() and "edu2" not in server.devices
        await ctl.ok("device-add", model="edu", name="edu2", socket=path)  # a second add works
        assert (await ctl.call("device-add", model="edu", name="edu2", socket=path))["error"]


async def test_trace_on_off_writes_the_message_log(tmp_path: Path) -> None:
    log = tmp_path / "trace.log"
    async with running(tmp_path) as (server, ctl), open_client(server) as client:
        await ctl.ok("trace-on", device="edu", file=str(log))
        await client.region_read(0, int(Reg.ID), 4)
        await ctl.ok("trace-off", device="edu")
        text = log.read_text()
        assert "REGION_READ" in text and "edu#" in text
        size = len(text)
        await client.region_read(0, int(Reg.ID), 4)
        assert len(log.read_text()) == size


@pytest.mark.parametrize(
    "request_,error",
    [
        ({"execute": "device-del"}, "GenericError"),
        ({"execute": "device-del", "arguments": {"device": "nope"}}, "DeviceNotFound"),
        ({"execute": "device-del", "arguments": {"device": "edu", "interval": -1}}, "GenericError"),
        ({"execute": "device-add", "arguments": {"model": "nope", "socket": "/x"}}, "GenericError"),
        ({"execute": "device-add", "arguments": {"model": "edu"}}, "GenericError"),
        ({"execute": "query-stats", "arguments": {"bogus": 1}}, "GenericError"),
        (
            {"execute": "trace-on", "arguments": {"device": "edu", "file": "/no/dir/x"}},
            "GenericError",
        ),
        ({"execute": "query-nothing"}, "CommandNotFound"),
    ],
)
async def test_bad_requests_get_errors_and_the_server_serves_on(
    tmp_path: Path, request_: dict[str, Any], error: str
) -> None:
    async with running(tmp_path) as (server, ctl):
        await ctl.channel.send(request_)
        reply = await ctl.channel.receive()
        assert reply["error"]["class"] == error, reply
        assert [d["name"] for d in await ctl.ok("query-devices")] == ["edu"]
        async with open_client(server) as client:
            assert len(await client.region_read(0, int(Reg.ID), 4)) == 4


async def test_a_control_client_leaving_mid_request_does_not_stop_device_del(
    tmp_path: Path,
) -> None:
    async with running(tmp_path) as (server, ctl), open_client(server):
        await ctl.channel.send(
            {"execute": "device-del", "arguments": {"device": "edu", "deadline": 0.3}}
        )
        await trio.sleep(0.05)
        ctl.channel.close()  # gone before the reply
        with trio.fail_after(5):
            while "edu" in server.devices:
                await trio.sleep(0.02)


async def test_a_failing_device_task_makes_the_device_unhealthy(tmp_path: Path) -> None:
    async with running(tmp_path, FailingEdu()) as (server, ctl):
        await ctl.ok("subscribe")
        async with open_client(server) as client:
            err = make_eventfd()
            try:
                await client.set_irq_eventfds(int(IrqIndex.ERR), 0, [err])
                await client.region_write(0, 0x80, (1).to_bytes(4, "little"))
                event = await ctl.event("DEVICE_HEALTH")
                assert event["data"]["healthy"] is False
                assert read_eventfd_nowait(err) == 1  # the ERR interrupt
                [dev] = await ctl.ok("query-devices")
                assert not dev["healthy"] and not dev["viable"]
                assert "boom" in dev["health_reason"]
            finally:
                err.close()
        with trio.fail_after(5):
            while server.devices["edu"].session is not None:
                await trio.sleep(0.01)
        # non-viable: a new client is refused at VERSION ...
        with pytest.raises(VfioUserError) as info:
            async with open_client(server):
                pass
        assert info.value.errno == errno.EPERM
        # ... until the device is reset (here by the server side: its model is fine again)
        server.devices["edu"].set_health(True)
        async with open_client(server) as client:
            await client.device_reset()
            assert (await ctl.ok("query-devices"))[0]["viable"]

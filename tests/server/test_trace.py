"""Traces (docs/trace.md): `--trace FILE` records a client session, `trace show` prints it,
`trace replay` plays its client side against a fresh model and finds the first reply that
differs; broken files are refused with the offset."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
import trio

from devices.edu import DMA_START, DmaCmd, Edu, IrqBit, Reg
from protocol import Command
from vfiouser_srv import cli
from vfiouser_srv.client import make_eventfd, wait_eventfd
from vfiouser_srv.config import DeviceConfig, read_config
from vfiouser_srv.replay import replay
from vfiouser_srv.server import Server
from vfiouser_srv.trace import (
    CONNECT,
    CUT,
    DISCONNECT,
    FD_EVENTFD,
    FD_FILE,
    IN,
    OUT,
    Record,
    Trace,
    Tracer,
    read_trace,
)

from .conftest import open_client, sock_path
from .test_edu_client import BAR0, INTX, RAM, UNMASK, bus_master, rd32, wr32, wr64

pytestmark = pytest.mark.usefixtures("no_fd_leak")

READ, DMA_READ, DMA_WRITE = int(Command.REGION_READ), int(Command.DMA_READ), int(Command.DMA_WRITE)


class BuggyEdu(Edu):
    """edu with a planted bug: the liveness register reads back one bit off."""

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        data = super().region_read(index, offset, count)
        if index == BAR0 and offset == Reg.LIVENESS:
            return bytes([data[0] ^ 1]) + data[1:]
        return data


async def drive(server: Server, *, shared: bool) -> None:
    """A guest driver's session: identity, liveness, DMA both ways, interrupts."""
    async with open_client(server) as c:
        assert await rd32(c, Reg.ID) == 0x010000ED
        await wr32(c, Reg.LIVENESS, 0x12345678)
        assert await rd32(c, Reg.LIVENESS) == 0xEDCBA987
        await c.memory.add_ram(RAM, 0x2000, shared=shared)
        await bus_master(c)
        with make_eventfd() as intx:
            await c.set_irq_eventfds(INTX, 0, [intx])
            c.memory.write(RAM, b"traced!!" * 16)
            await wr64(c, Reg.DMA_SRC, RAM)
            await wr64(c, Reg.DMA_DST, DMA_START)
            await wr64(c, Reg.DMA_CNT, 128)
            await wr64(c, Reg.DMA_CMD, DmaCmd.RUN | DmaCmd.IRQ)
            assert await wait_eventfd(intx, timeout=5) == 1
            await wr32(c, Reg.IRQ_ACK, IrqBit.DMA)
            await c.set_irqs(INTX, UNMASK, 0, 1)
            await wr64(c, Reg.DMA_SRC, DMA_START)
            await wr64(c, Reg.DMA_DST, RAM + 0x1000)
            await wr64(c, Reg.DMA_CMD, DmaCmd.RUN | DmaCmd.TO_RAM | DmaCmd.IRQ)
            assert await wait_eventfd(intx, timeout=5) == 1
            assert c.memory.read(RAM + 0x1000, 128) == b"traced!!" * 16
            await wr32(c, Reg.IRQ_ACK, IrqBit.DMA)
            assert await rd32(c, Reg.LIVENESS) == 0xEDCBA987


async def record(tmp_path: Path, *, shared: bool, dma: bool = False) -> Trace:
    """Serve edu with `--trace` (through `build_server`, as `serve` does) and drive it."""
    trace = tmp_path / "edu.trace"
    sock = sock_path(tmp_path, "edu")
    server = cli.build_server(
        [], [DeviceConfig("edu", "edu", sock, trace=str(trace), trace_dma=dma)]
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            await drive(server, shared=shared)
            nursery.cancel_scope.cancel()
    finally:
        server.close()
        tracer = server.devices["edu"].tracer if "edu" in server.devices else None
        if tracer is not None:
            tracer.close()
    return read_trace(str(trace))


def messages(t: Trace, kind: int) -> list[Record]:
    return [r for r in t.records if r.kind == kind]


def liveness_reply(t: Trace) -> Record:
    """The first server reply to a REGION_READ of the liveness register."""
    asked: set[int] = set()
    for r in t.records:
        head = r.header()
        if head is None:
            continue
        msg_id, command, _size, _flags, _err = head
        if (
            r.kind == IN
            and command == READ
            and r.data[16:28] == struct.pack("<QI", Reg.LIVENESS, BAR0)
        ):
            asked.add(msg_id)
        elif r.kind == OUT and msg_id in asked:
            return r
    raise AssertionError("no liveness read in the trace")


@pytest.mark.parametrize("shared", [True, False], ids=["mmap", "messages"])
async def test_recorded_session_has_every_message_and_describes_fds(
    tmp_path: Path, shared: bool
) -> None:
    t = await record(tmp_path, shared=shared)
    assert t.version == 1 and t.meta["device"] == "edu" and t.meta["model"] == "edu"
    kinds = [r.kind for r in t.records]
    assert kinds[0] == CONNECT and kinds[-1] == DISCONNECT
    ins, outs = messages(t, IN), messages(t, OUT)
    # every client request got its reply, in order, each recorded once
    requests = [r.header()[0] for r in ins if r.header() and not r.header()[3] & 1]  # type: ignore[index]
    replies = [r.header()[0] for r in outs if r.header() and r.header()[3] & 1]  # type: ignore[index]
    assert requests == replies and len(requests) >= 17
    fds = [d for r in ins for d in r.fds]
    assert (FD_EVENTFD, 0, 0) in fds
    if shared:
        assert any(k == FD_FILE and size == 0x2000 for k, _seals, size in fds)
    else:
        # message-mode DMA: our DMA_READ request and DMA_WRITE (data left out, size kept)
        dma_writes = [r for r in outs if r.header() and r.header()[1] == DMA_WRITE]  # type: ignore[index]
        assert dma_writes and all(r.flags & CUT for r in dma_writes)
        assert all(len(r.data) == 32 and r.wire_len == 32 + 128 for r in dma_writes)
        dma_read_replies = [r for r in ins if r.header() and r.header()[1] == DMA_READ]  # type: ignore[index]
        assert dma_read_replies and all(r.cut and r.wire_len == 160 for r in dma_read_replies)


async def test_trace_dma_keeps_payloads(tmp_path: Path) -> None:
    t = await record(tmp_path, shared=False, dma=True)
    assert t.dma
    dma = [
        r
        for r in t.records
        if r.header() and r.header()[1] in (DMA_READ, DMA_WRITE) and len(r.data) > 32
    ]  # type: ignore[index]
    assert dma and not any(r.cut for r in dma)
    assert any(r.data[32:] == b"traced!!" * 16 for r in dma)


@pytest.mark.parametrize("shared", [True, False], ids=["mmap", "messages"])
async def test_replay_same_model_is_identical(tmp_path: Path, shared: bool) -> None:
    t = await record(tmp_path, shared=shared)
    result = await replay(t, Edu())
    assert result.divergence is None, result.divergence.report()
    assert result.messages_compared == len(messages(t, OUT))


async def test_replay_finds_the_planted_bug_at_its_message(tmp_path: Path) -> None:
    t = await record(tmp_path, shared=True)
    result = await replay(t, BuggyEdu())
    d = result.divergence
    assert d is not None
    assert d.record.index == liveness_reply(t).index
    report = d.report()
    assert "REGION_READ reply" in report and "data=87a9cbed" in report and "data=86a9cbed" in report


def test_cli_show_and_replay(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    t = trio.run(lambda: record(tmp_path, shared=True))
    assert cli.main(["trace", "show", t.path]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 + len(t.records)
    assert "-> id=0 VERSION reply" in "\n".join(out)
    assert cli.main(["trace", "show", t.path, "--command", "region_write"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert lines and all("REGION_WRITE" in line for line in lines)
    assert cli.main(["trace", "show", t.path, "--device", "other"]) == 0
    assert capsys.readouterr().out == ""
    assert cli.main(["trace", "replay", t.path]) == 0
    assert "identical" in capsys.readouterr().out
    assert cli.main(["trace", "replay", t.path, "--model", "virtio-blk"]) == 1
    assert "divergence at record #" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("cut", "needle"),
    [(4, "offset 0: not a vfiouser-srv trace"), (-7, "truncated record"), (30, "offset 16")],
)
def test_bad_traces_exit_2_naming_the_offset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], cut: int, needle: str
) -> None:
    t = trio.run(lambda: record(tmp_path, shared=True))
    blob = Path(t.path).read_bytes()
    bad = tmp_path / "bad.trace"
    bad.write_bytes(blob[:cut])
    for sub in ("show", "replay"):
        assert cli.main(["trace", sub, str(bad)]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err and "offset" in err
    foreign = tmp_path / "foreign"
    foreign.write_bytes(b"\x7fELF" + bytes(100))
    assert cli.main(["trace", "show", str(foreign)]) == 2
    assert "offset 0: not a vfiouser-srv trace" in capsys.readouterr().err


def test_framer_gives_fds_to_the_message_holding_the_reads_last_byte(tmp_path: Path) -> None:
    def msg(msg_id: int, size: int = 20) -> bytes:
        return struct.pack("<HHIII", msg_id, 1, size, 0, 0) + bytes(size - 16)

    path = tmp_path / "t.trace"
    tracer = Tracer(str(path))
    tracer.connect(1, {})
    r, w = os.pipe()
    try:
        stream = msg(1) + msg(2) + msg(3, 40)
        tracer.incoming(1, stream[:25], [r])  # ends inside message 2: its fds
        tracer.incoming(1, stream[25:45], [])  # message 2 complete, 3 partial
        tracer.incoming(1, stream[45:], [w])  # ends message 3 at a boundary: its fds
        tracer.outgoing(1, msg(7) + msg(8), [r])  # a batch's fds: its last message
    finally:
        os.close(r)
        os.close(w)
    tracer.close()
    recs = [x for x in read_trace(str(path)).records if x.kind in (IN, OUT)]
    assert [(x.header()[0], len(x.fds)) for x in recs] == [  # type: ignore[index]
        (1, 0),
        (2, 1),
        (3, 1),
        (7, 0),
        (8, 1),
    ]


def test_serve_trace_options_and_config_key(tmp_path: Path) -> None:
    args = cli.make_parser().parse_args(
        ["serve", "edu", "--socket-path", "/x.sock", "--trace", "/t.trace", "--trace-dma"]
    )
    d = cli.config_from_args(args).devices[0]
    assert (d.trace, d.trace_dma) == ("/t.trace", True)
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[device]]\nname = "a"\nmodel = "edu"\nsocket = "/a.sock"\ntrace = "/a.tr"\n')
    d = read_config(str(cfg)).devices[0]
    assert (d.trace, d.trace_dma) == ("/a.tr", False)


async def test_tracing_off_keeps_the_serial_loop_and_on_leaves_it(tmp_path: Path) -> None:
    sock = sock_path(tmp_path, "edu")
    server = Server()
    dev = server.add_device("edu", Edu(), socket_path=sock)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            async with open_client(server) as c:
                await rd32(c, Reg.ID)
                session = dev.session
                assert session is not None
                assert session.tracer is None and not session._no_serial
                tracer = Tracer(str(tmp_path / "late.trace"))
                session.set_tracer(tracer)
                assert session._no_serial
                await rd32(c, Reg.ID)
                session.set_tracer(None)
                assert not session._no_serial
                tracer.close()
            nursery.cancel_scope.cancel()
    finally:
        server.close()
    kinds = [r.kind for r in read_trace(str(tmp_path / "late.trace")).records]
    assert kinds == [CONNECT, IN, OUT, DISCONNECT]


async def test_control_trace_on_format_trace_writes_this_format(tmp_path: Path) -> None:
    from .test_control_commands import running

    path = tmp_path / "ctl.trace"
    async with running(tmp_path) as (server, ctl), open_client(server) as client:
        await ctl.ok("trace-on", device="edu", file=str(path), format="trace")
        assert (await ctl.call("trace-on", device="edu", file=str(path), format="pcap"))["error"]
        await ctl.ok("trace-on", device="edu", file=str(path), format="trace")
        await client.region_read(BAR0, int(Reg.ID), 4)
        assert (await ctl.ok("trace-off", device="edu"))["was_on"]
        await client.region_read(BAR0, int(Reg.ID), 4)
    t = read_trace(str(path))
    assert [r.kind for r in t.records] == [CONNECT, IN, OUT, DISCONNECT]
    assert t.records[2].data[-4:] == (0x010000ED).to_bytes(4, "little")
    assert t.records[0].info()["joined"]  # traced from mid-session: replay skips it
    assert (await replay(t, Edu())).connections == 0

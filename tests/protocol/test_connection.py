"""protocol/_connection.py: phases, events, framing of replies, and fd ownership.

Both roles are driven through `ConnectionPair` (no sockets), plus hypothesis: arbitrary
byte streams never raise anything but protocol errors and never lose or duplicate an fd,
and valid message sequences split the way the kernel splits them decode exactly.
"""

from __future__ import annotations

import errno
import struct
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import (
    HEADER_SIZE,
    PHASE_TABLE,
    BadRequest,
    Body,
    Capabilities,
    Command,
    Connection,
    DeviceFeature,
    DeviceGetInfo,
    DeviceGetIrqInfo,
    DeviceGetRegionInfo,
    DeviceInfo,
    DeviceReset,
    DeviceSetIrqs,
    DmaMap,
    DmaRead,
    DmaReadReply,
    DmaUnmap,
    DmaWrite,
    DmaWriteReply,
    ErrorReply,
    FatalProtocolError,
    Frame,
    LocalProtocolError,
    MigDataRead,
    MigDataWrite,
    Phase,
    ProtocolError,
    RegionInfo,
    RegionRead,
    RegionReadReply,
    RegionWrite,
    RegionWriteMulti,
    Reply,
    Request,
    Role,
    Step,
    Version,
    VersionReply,
    WriteEntry,
)

from .helpers import (
    ConnectionPair,
    FdToken,
    drain,
    fds,
    fds_of,
    frame,
    header,
    one_event,
    ready_server,
    split,
    version_payload,
)

EINVAL = errno.EINVAL


def bad(ev: Any, err: int = EINVAL) -> BadRequest:
    assert isinstance(ev, BadRequest), ev
    assert ev.error.errno == err, ev.error
    return ev


# ------------------------------------------------------------------ the phase table


def test_phase_table() -> None:
    S, C, P, T = Role.SERVER, Role.CLIENT, Phase, Step
    assert {k: v for k, v in PHASE_TABLE.items() if k[2] is not T.CLOSE} == {
        (S, P.AWAIT_VERSION, T.RECV_VERSION): P.NEGOTIATING,
        (S, P.NEGOTIATING, T.SEND_VERSION_REPLY): P.READY,
        (S, P.NEGOTIATING, T.VERSION_FAILED): P.AWAIT_VERSION,
        (S, P.READY, T.OTHER): P.READY,
        (C, P.AWAIT_VERSION, T.SEND_VERSION): P.NEGOTIATING,
        (C, P.NEGOTIATING, T.RECV_VERSION_REPLY): P.READY,
        (C, P.NEGOTIATING, T.VERSION_FAILED): P.CLOSED,
        (C, P.READY, T.OTHER): P.READY,
    }
    for role in Role:
        for phase in Phase:
            assert PHASE_TABLE[(role, phase, Step.CLOSE)] is Phase.CLOSED


# ------------------------------------------------------------------ handshake


def test_handshake_moves_both_to_ready() -> None:
    pair = ConnectionPair(server_caps=Capabilities(max_msg_fds=16, write_multiple=True),
                          client_caps=Capabilities(max_msg_fds=8, pgsizes=4096 | 8192))
    assert pair.server.phase is pair.client.phase is Phase.AWAIT_VERSION
    _id, data, sent = pair.client.send_request(Version(0, 0, pair.client.local_caps))
    assert pair.client.phase is Phase.NEGOTIATING and sent == ()
    pair.server.receive_data(data)
    ev = one_event(pair.server)
    assert isinstance(ev, Request) and ev.command is Command.VERSION
    assert pair.server.phase is Phase.NEGOTIATING
    reply = VersionReply(0, 0, Capabilities(max_msg_fds=16, pgsizes=4096))
    data, sent = pair.server.send_reply(ev.msg_id, reply)
    assert pair.server.phase is Phase.READY and pair.server.caps == reply.capabilities
    assert struct.unpack_from("<HHII", data) == (ev.msg_id, 1, len(data), 1)
    pair.client.receive_data(data)
    rep = one_event(pair.client)
    assert isinstance(rep, Reply) and rep.body == reply
    assert pair.client.phase is Phase.READY
    assert pair.client.caps == pair.client.peer_caps == reply.capabilities


def test_commands_before_version_are_einval_and_hand_back_fds() -> None:
    server = Connection(Role.SERVER)
    fd = FdToken()
    server.receive_data(frame(2, DmaMap(3, 0, 0, 4096).encode(), msg_id=5), [fd])
    ev = bad(one_event(server))
    assert (ev.msg_id, ev.command) == (5, 2)
    assert ev.error.fds == [fd]
    server.receive_data(frame(13, msg_id=6))
    bad(one_event(server))
    server.receive_data(frame(99, msg_id=7))  # even unknown ones: the phase comes first
    bad(one_event(server))
    assert server.phase is Phase.AWAIT_VERSION


def test_second_version_is_rejected() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(frame(1, version_payload(), msg_id=1))
    assert isinstance(one_event(server), Request)
    server.receive_data(frame(1, version_payload(), msg_id=2))  # while negotiating
    bad(one_event(server))
    assert server.phase is Phase.NEGOTIATING
    server.send_reply(1, VersionReply(0, 0, Capabilities()))
    server.receive_data(frame(1, version_payload(), msg_id=3))  # when ready
    bad(one_event(server))
    assert server.phase is Phase.READY


def test_version_failure_returns_server_to_await_version() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(frame(1, version_payload(major=9), msg_id=1))
    assert isinstance(one_event(server), Request)
    wire = server.send_error(1, Command.VERSION, errno.ENOTSUP)
    assert wire == header(1, 1, 16, 0x21, errno.ENOTSUP)
    assert server.phase is Phase.AWAIT_VERSION
    server.receive_data(frame(1, version_payload(), msg_id=2))
    ev = one_event(server)
    assert isinstance(ev, Request) and server.phase is Phase.NEGOTIATING


def test_malformed_version_leaves_server_waiting() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(frame(1, b"\0\0{", msg_id=1))
    bad(one_event(server))
    assert server.phase is Phase.AWAIT_VERSION
    server.receive_data(frame(1, b"\0\0" + b"[" * 4_000 + b"\0", msg_id=2))  # too deep
    bad(one_event(server))
    server.receive_data(frame(1, version_payload(), msg_id=3))
    assert isinstance(one_event(server), Request)


def test_messages_before_version_are_bounded_by_max_version_size() -> None:
    """Until VERSION completes, the header of a frame over `max_version_size` breaks the
    stream at once (nothing is buffered); once READY, the limit is max_data_xfer_size."""
    server = Connection(Role.SERVER, max_version_size=64)
    server.receive_data(header(1, Command.VERSION, 65, 0, 0))
    with pytest.raises(FatalProtocolError, match="outside"):
        server.next_event()
    pair = ConnectionPair()
    pair.handshake()
    big = frame(Command.REGION_WRITE, struct.pack("<QII", 0, 0, 8192) + bytes(8192))
    pair.server.receive_data(big)
    assert isinstance(pair.server.next_event(), Request)


def test_send_error_zero_errno_becomes_eio() -> None:
    pair = ConnectionPair()
    pair.handshake()
    wire = pair.server.send_error(4, Command.REGION_READ, 0)
    assert struct.unpack("<HHIII", wire) == (4, 9, 16, 0x21, errno.EIO)
    assert pair.server.phase is Phase.READY


# ------------------------------------------------------------------ client role


def test_client_sees_replies_and_error_replies() -> None:
    pair = ConnectionPair()
    pair.handshake()
    msg_id, data, _ = pair.client.send_request(RegionRead(0, 0, 4))
    pair.server.receive_data(data)
    req = one_event(pair.server)
    assert isinstance(req, Request) and req.msg_id == msg_id
    rep = pair.reply(msg_id, RegionReadReply(0, 0, b"abcd"))
    assert rep == Reply(msg_id, RegionReadReply(0, 0, b"abcd"))
    pair.client.receive_data(pair.server.send_error(msg_id, Command.REGION_READ, errno.EFAULT))
    assert one_event(pair.client) == ErrorReply(msg_id, 9, errno.EFAULT)
    pair.client.receive_data(header(8, 9, 16, 0x21, 0))  # error bit, errno 0
    assert one_event(pair.client) == ErrorReply(8, 9, errno.EIO)


def test_client_version_error_reply_closes() -> None:
    client = Connection(Role.CLIENT)
    client.send_request(Version(0, 0))
    client.receive_data(header(0, 1, 16, 0x21, errno.ENOTSUP))
    assert one_event(client) == ErrorReply(0, 1, errno.ENOTSUP)
    assert client.phase is Phase.CLOSED


def test_client_rejects_unsolicited_version_reply() -> None:
    pair = ConnectionPair()
    agreed = pair.handshake()
    other = Capabilities(max_msg_fds=200, pgsizes=1 << 21)
    pair.client.receive_data(frame(1, VersionReply(0, 0, other).encode(), 9, flags=1))
    bad(one_event(pair.client))
    assert pair.client.caps == agreed and pair.client.peer_caps == agreed
    assert pair.client.phase is Phase.READY
    fresh = Connection(Role.CLIENT)  # never sent VERSION
    fresh.receive_data(frame(1, VersionReply(0, 0).encode(), 0, flags=1))
    bad(one_event(fresh))
    assert fresh.phase is Phase.AWAIT_VERSION and fresh.caps is None


def test_client_rejects_version_request_and_early_commands() -> None:
    client = Connection(Role.CLIENT)
    client.receive_data(frame(1, version_payload()))
    bad(one_event(client))
    client.receive_data(frame(11, DmaRead(0, 4).encode()))
    bad(one_event(client))


def test_server_to_client_commands() -> None:
    pair = ConnectionPair()
    pair.handshake()
    ev = pair.server_request(DmaRead(0x1000, 3))
    assert isinstance(ev, Request) and ev.body == DmaRead(0x1000, 3)
    data, _ = pair.client.send_reply(ev.msg_id, DmaReadReply(0x1000, b"xyz"))
    pair.server.receive_data(data)
    assert one_event(pair.server) == Reply(ev.msg_id, DmaReadReply(0x1000, b"xyz"))
    ev = pair.server_request(DmaWrite(0x2000, b"ab"))
    assert isinstance(ev, Request) and ev.body == DmaWrite(0x2000, b"ab")
    # QEMU's DMA_WRITE reply is the header alone
    pair.server.receive_data(header(ev.msg_id, 12, 16, 1))
    assert one_event(pair.server) == Reply(ev.msg_id, DmaWriteReply())


@pytest.mark.parametrize("body", [DmaRead(0, 8), DmaWrite(0, b"12345678")])
def test_server_rejects_server_to_client_commands(body: Body) -> None:
    server = ready_server()
    server.receive_data(frame(body.COMMAND, body.encode(), msg_id=3))
    ev = bad(one_event(server))
    assert ev.command == body.COMMAND and ev.msg_id == 3


def test_client_rejects_client_to_server_commands_and_returns_fds() -> None:
    pair = ConnectionPair()
    pair.handshake()
    fd = FdToken()
    pair.client.receive_data(frame(2, DmaMap(3, 0, 0, 4096).encode()), [fd])
    assert bad(one_event(pair.client)).error.fds == [fd]


# ------------------------------------------------------------------ header checks


@pytest.mark.parametrize("flags", [0x2, 0xF, 0x40, 0x80, 0x100, 0x8000_0000, 0x41])
def test_bad_header_flags(flags: int) -> None:
    server = ready_server()
    fd = FdToken()
    server.receive_data(frame(13, msg_id=1, flags=flags), [fd])
    assert bad(one_event(server)).error.fds == [fd]


def test_command_with_error_field() -> None:
    server = ready_server()
    server.receive_data(frame(13, error=5))
    bad(one_event(server))


def test_error_reply_with_fds_hands_them_back() -> None:
    server = ready_server()
    fd = FdToken()
    server.receive_data(header(1, 11, 16, 0x21, 5), [fd])
    assert bad(one_event(server)).error.fds == [fd]


def test_unknown_command_is_enotsup() -> None:
    server = ready_server()
    fd = FdToken()
    server.receive_data(frame(14, msg_id=2, flags=0x10), [fd])  # the retired DIRTY_PAGES
    ev = bad(one_event(server), errno.ENOTSUP)
    assert ev.no_reply and ev.error.fds == [fd]
    server.receive_data(frame(4242))
    bad(one_event(server), errno.ENOTSUP)


@pytest.mark.parametrize("size", [0, 15])
def test_size_below_header_is_fatal(size: int) -> None:
    server = ready_server()
    held = fds(2)
    server.receive_data(header(0, 13, size), held)
    with pytest.raises(FatalProtocolError) as info:
        server.next_event()
    assert info.value.fds == held


def test_size_above_limit_is_fatal() -> None:
    caps = Capabilities(max_msg_fds=4, max_data_xfer_size=4096)
    server = ready_server(caps)
    limit = HEADER_SIZE + 64 + 4096
    server.receive_data(frame(10, RegionWrite(0, 0, bytes(4096)).encode()))
    assert isinstance(one_event(server), Request)  # the largest write fits
    held = fds(1)
    server.receive_data(header(0, 10, limit + 1) + bytes(100), held)
    with pytest.raises(FatalProtocolError) as info:
        server.next_event()
    assert info.value.fds == held
    late = fds(1)
    with pytest.raises(FatalProtocolError) as info2:
        server.receive_data(b"more", late)
    assert info2.value.fds == late


def test_too_many_fds_is_fatal() -> None:
    server = ready_server(Capabilities(max_msg_fds=2))
    extra = fds(3)
    with pytest.raises(FatalProtocolError) as info:
        server.receive_data(frame(8, DeviceSetIrqs(0x24, 2, 0, 3).encode()), extra)
    assert info.value.fds == extra


# ------------------------------------------------------------------ sending


def test_msg_ids_wrap_at_0xffff() -> None:
    pair = ConnectionPair()
    pair.handshake()  # used id 0
    ids = [pair.client.send_request(DeviceReset())[0] for _ in range(0x10001)]
    assert ids[0] == 1 and ids[0xFFFE] == 0xFFFF and ids[0xFFFF] == 0 and ids[-1] == 1
    msg_id, data, _ = pair.client.send_request(DeviceReset())
    assert struct.unpack_from("<H", data)[0] == msg_id == 2


def test_no_reply_flag_round_trip() -> None:
    pair = ConnectionPair()
    pair.handshake()
    ev = pair.request(RegionWrite(0, 1, b"\1"), no_reply=True)
    assert isinstance(ev, Request) and ev.no_reply
    ev = pair.request(RegionWrite(0, 1, b"\1"))
    assert isinstance(ev, Request) and not ev.no_reply


def test_local_errors() -> None:
    client = Connection(Role.CLIENT)
    with pytest.raises(LocalProtocolError):
        client.send_request(DeviceReset())  # before VERSION
    with pytest.raises(LocalProtocolError):
        client.send_request(DeviceInfo(0, 0, 0))  # a reply body
    server = Connection(Role.SERVER)
    with pytest.raises(LocalProtocolError):
        server.send_request(Version(0, 0))  # only clients propose
    with pytest.raises(LocalProtocolError):
        server.send_reply(0, DeviceGetInfo())  # a request body
    with pytest.raises(LocalProtocolError):
        server.send_reply(0, VersionReply(0, 0))  # nothing to answer yet
    assert server.phase is Phase.AWAIT_VERSION
    client.send_request(Version(0, 0))
    with pytest.raises(LocalProtocolError):
        client.send_request(Version(0, 0))  # twice


def test_reply_frames_carry_body_fds() -> None:
    server = ready_server()
    fd = FdToken()
    data, sent = server.send_reply(3, RegionInfo(0, 7, 4096, fd=fd).fit(32))
    assert sent == (fd,)
    assert struct.unpack_from("<HHII", data) == (3, 5, 48, 1)
    data, sent = server.send_reply(3, RegionInfo(0, 7, 4096, fd=fd).fit(16))
    assert sent == ()  # argsz below even the bare struct: no fd
    assert struct.unpack_from("<HHIII", data)[2:4] == (48, 1)


def test_eof_and_close() -> None:
    server = ready_server()
    held = fds(1)
    server.receive_data(frame(2, bytes(32))[:20], held)
    assert server.next_event() is None
    server.receive_data(b"")
    assert server.phase is Phase.CLOSED
    assert server.close() == held
    assert server.phase is Phase.CLOSED


# ------------------------------------------------------------------ plain frames

HOT = frozenset({Command.REGION_READ, Command.REGION_WRITE})


def test_plain_frames_come_back_raw() -> None:
    server = ready_server()
    read = RegionRead(0x10, 0, 4).encode()
    server.receive_data(frame(9, read, msg_id=1) + frame(9, read, msg_id=2, flags=0x10))
    (m1, c1, f1, p1), (m2, c2, f2, p2) = server.take_plain(HOT)
    assert (m1, c1, f1, bytes(p1), m2, c2, f2, bytes(p2)) == (1, 9, 0, read, 2, 9, 0x10, read)
    assert server.take_plain(HOT) == [] and server.next_event() is None
    # the full decode of such a frame is the ordinary event
    assert server.event_from_frame(Frame(m1, c1, f1, 0, bytes(p1), [])) == Request(
        1, RegionRead(0x10, 0, 4)
    )


def test_frames_that_are_not_plain_become_events() -> None:
    server = ready_server()
    read = RegionRead(0, 0, 4).encode()
    fd = FdToken()
    server.receive_data(frame(9, read, msg_id=1), [fd])  # with an fd
    assert server.take_plain(HOT) == []
    ev = bad(server.next_event())
    assert ev.error.fds == [fd]
    server.receive_data(frame(9, read, msg_id=2, error=1))  # error field set
    assert server.take_plain(HOT) == []
    bad(server.next_event())
    server.receive_data(frame(9, read, msg_id=3, flags=0x40))  # unknown flag
    assert server.take_plain(HOT) == []
    bad(server.next_event())
    server.receive_data(frame(13, msg_id=4))  # not in the set
    assert server.take_plain(HOT) == []
    assert server.next_event() == Request(4, DeviceReset())
    early = Connection(Role.SERVER)  # not READY: the phase rule applies
    early.receive_data(frame(9, read, msg_id=5))
    assert early.take_plain(HOT) == []
    bad(early.next_event())


def test_take_plain_stops_at_anything_else_and_keeps_partial_frames() -> None:
    server = ready_server()
    read = RegionRead(0x10, 0, 4).encode()
    a, b = frame(9, read, msg_id=1), frame(9, read, msg_id=2, flags=0x10)
    buf = bytearray(a + b + frame(13, msg_id=3) + a[:7])
    server.receive_data(memoryview(buf))
    assert [m for m, _c, _f, _p in server.take_plain(HOT)] == [1, 2]
    assert server.next_event() == Request(3, DeviceReset())
    assert server.take_plain(HOT) == []
    assert server.next_event() is None  # the partial frame was copied out of `buf` here
    assert not server.fast_ready()
    buf[:] = b"\xee" * len(buf)  # the caller reuses its buffer for the next read
    server.receive_data(a[7:])
    assert [(m, bytes(p)) for m, _c, _f, p in server.take_plain(HOT)] == [(1, read)]
    assert server.fast_ready()


# ------------------------------------------------------------------ hypothesis: fuzz


def fuzz_frame() -> st.SearchStrategy[bytes]:
    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        command = draw(st.integers(0, 19) | st.integers(0, 0xFFFF))
        flags = draw(st.sampled_from([0, 0, 0, 1, 1, 0x10, 0x21, 0x20, 0x2, 0x40])
                     | st.integers(0, 0xFFFF_FFFF))
        payload = draw(st.binary(max_size=80) | valid_body().map(lambda b: b.encode()))
        if draw(st.integers(0, 5)) == 0:  # a reply that may take an fd (GET_REGION_INFO)
            command, flags = 5, 1
            argsz = draw(st.integers(0, 200))
            payload = struct.pack("<IIIIQQ", argsz, draw(u32), 0, 0, 0, 0)
            payload += draw(st.binary(max_size=max(0, argsz - 32)))
        delta = draw(st.sampled_from([0] * 8 + [-1, 1, -16, -17, 1 << 21, 1 << 31]))
        size = max(0, min(0xFFFF_FFFF, HEADER_SIZE + len(payload) + delta))
        err = draw(st.sampled_from([0, 0, 0, 22]))
        return header(draw(st.integers(0, 0xFFFF)), command, size, flags, err) + payload

    return build()


@st.composite
def fuzz_chunks(draw: st.DrawFn) -> list[tuple[bytes, list[FdToken]]]:
    pieces = draw(st.lists(fuzz_frame() | st.binary(min_size=1, max_size=40), max_size=8))
    data = b"".join(pieces)
    cuts = draw(st.lists(st.integers(0, max(len(data), 1)), max_size=8))
    chunks = split(data, cuts)
    out = []
    for chunk in chunks:
        out.append((chunk, fds(draw(st.sampled_from([0, 0, 1, 1, 1, 2, 3, 17])))))
    if draw(st.booleans()):  # descriptors with no data at all
        at = draw(st.integers(0, len(out)))
        out.insert(at, (b"", fds(1)))
    return out


def event_fds(ev: Any) -> list[Any]:
    if isinstance(ev, BadRequest):
        assert ev.error.errno in (EINVAL, errno.ENOTSUP)
    return fds_of(ev)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=fuzz_chunks(), ready=st.booleans(), hot=st.booleans())
def test_fuzz_server_only_protocol_errors_and_every_fd_accounted(
    chunks: list[tuple[bytes, list[FdToken]]], ready: bool, hot: bool
) -> None:
    server = ready_server() if ready else Connection(Role.SERVER)
    hot_set = frozenset({9, 10} if hot else ())
    given_fds = [fd for _d, chunk_fds in chunks for fd in chunk_fds]
    seen: list[Any] = []
    for data, chunk_fds in chunks:
        try:
            server.receive_data(data, chunk_fds)
        except ProtocolError as exc:
            assert isinstance(exc, FatalProtocolError)
            seen += exc.fds
        while True:
            try:
                for msg_id, command, flags, payload in server.take_plain(hot_set):
                    assert command in hot_set
                    # what a caller does when its fast path gives up
                    server.event_from_frame(Frame(msg_id, command, flags, 0, bytes(payload), []))
                ev = server.next_event()
            except ProtocolError as exc:
                assert isinstance(exc, FatalProtocolError)
                seen += exc.fds
                break
            if ev is None:
                break
            seen += event_fds(ev)
    seen += server.close()
    counts = Counter(map(id, seen))
    assert all(counts[id(fd)] == 1 for fd in given_fds), "an fd was lost or duplicated"
    assert len(seen) == len(given_fds)


def test_fuzz_client_role_region_info_reply_fds_accounted() -> None:
    # the reply path a server never sees: fds in replies are owned by the event too
    pair = ConnectionPair()
    pair.handshake()
    fd = FdToken()
    full = RegionInfo(0, 7, 4096, fd=fd).fit(32)
    pair.client.receive_data(frame(5, full.encode(), flags=1), [fd])
    assert fds_of(one_event(pair.client)) == [fd]
    short = frame(5, struct.pack("<IIIIQQ", 112, 0xF, 0, 0, 4096, 0), flags=1)
    fd2 = FdToken()
    pair.client.receive_data(short, [fd2])
    assert bad(one_event(pair.client)).error.fds == [fd2]


# ------------------------------------------------------------------ hypothesis: valid streams

u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, 0xFFFF_FFFF_FFFF_FFFF)
small = st.binary(max_size=48)


@st.composite
def set_irqs(draw: st.DrawFn) -> DeviceSetIrqs:
    if draw(st.booleans()):
        n = draw(st.integers(0, 16))
        return DeviceSetIrqs(0x24, draw(st.integers(0, 4)), draw(u32), n,
                             fd_list=tuple(fds(n)), argsz=20)
    data = draw(st.binary(max_size=32))
    return DeviceSetIrqs(0x22, 1, 0, len(data), data=data, argsz=20 + len(data))


@st.composite
def dma_map(draw: st.DrawFn) -> DmaMap:
    fd = FdToken() if draw(st.booleans()) else None
    return DmaMap(draw(st.integers(0, 3)), draw(u64), draw(u64), draw(u64), fd=fd)


def valid_body() -> st.SearchStrategy[Body]:
    """Client-to-server requests that round-trip exactly."""
    entries = st.lists(
        st.builds(WriteEntry, u64, u32, st.binary(min_size=1, max_size=8)), min_size=1,
        max_size=4).map(tuple)
    return st.one_of(
        dma_map(),
        st.builds(DmaUnmap, st.sampled_from([0, 2]), u64, u64),
        st.builds(DeviceGetInfo),
        st.builds(DeviceGetRegionInfo, u32, st.integers(32, 0xFFFF_FFFF)),
        st.builds(DeviceGetIrqInfo, st.integers(0, 4)),
        set_irqs(),
        st.builds(RegionRead, u64, u32, u32),
        st.builds(RegionWrite, u64, u32, small),
        st.builds(DeviceReset),
        st.builds(RegionWriteMulti, entries),
        small.flatmap(lambda d: st.builds(
            DeviceFeature, st.integers(0, 0x7FFFF), st.just(d), st.just(8 + len(d)))),
        st.integers(0, 1 << 20).map(lambda n: MigDataRead(n, 8 + n)),
        small.map(lambda d: MigDataWrite(d, 8 + len(d))),
    )


@st.composite
def kernel_split(draw: st.DrawFn) -> tuple[list[tuple[int, Body, bool]],
                                           list[tuple[bytes, list[Any]]]]:
    """Encode a message sequence and cut it into reads the way Linux delivers them."""
    client = ConnectionPair().client
    client.send_request(Version(0, 0))
    client.phase = Phase.READY  # the stream under test starts after the handshake
    bodies = draw(st.lists(valid_body(), min_size=1, max_size=12))
    sent: list[tuple[int, Body, bool]] = []
    wire = b""
    fd_at: dict[int, tuple[Any, ...]] = {}  # first byte of a message -> its fds
    forced: set[int] = set()
    for body in bodies:
        no_reply = draw(st.booleans())
        msg_id, data, body_fds = client.send_request(body, no_reply=no_reply)
        if body_fds:
            fd_at[len(wire)] = body_fds
            forced.add(len(wire) + len(data))  # the read stops after a segment with fds
        sent.append((msg_id, body, no_reply))
        wire += data
    cuts = set(draw(st.lists(st.integers(1, len(wire)), max_size=20))) | forced
    chunks: list[tuple[bytes, list[Any]]] = []
    start = 0
    for end in [*sorted(c for c in cuts if c <= len(wire)), len(wire)]:
        if end <= start:
            continue
        carried = [fd for pos, f in fd_at.items() if start <= pos < end for fd in f]
        chunks.append((wire[start:end], carried))
        start = end
    return sent, chunks


@settings(max_examples=300, deadline=None)
@given(case=kernel_split())
def test_valid_stream_split_like_the_kernel_decodes_exactly(
    case: tuple[list[tuple[int, Body, bool]], list[tuple[bytes, list[Any]]]],
) -> None:
    sent, chunks = case
    server = ready_server()
    events: list[Any] = []
    for data, chunk_fds in chunks:
        server.receive_data(data, chunk_fds)
        events += drain(server)
    assert events == [Request(msg_id, body, no_reply) for msg_id, body, no_reply in sent]
    for ev, (_id, body, _nr) in zip(events, sent, strict=True):
        got = fds_of(ev)
        assert len(got) == len(body.fds)
        assert all(a is b for a, b in zip(got, body.fds, strict=True))
    assert server.close() == []


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pieces=st.lists(fuzz_frame(), max_size=8), cuts=st.lists(st.integers(0, 2000),
                                                                  max_size=6))
def test_take_plain_then_decoder_sees_what_the_decoder_alone_sees(
    pieces: list[bytes], cuts: list[int]
) -> None:
    """Whatever the chunking, taking the plain frames first and decoding the rest yields
    the same messages, in the same order, as decoding everything; and the caller may
    overwrite each chunk's buffer once it is drained (as the stream does on its next read)."""
    data = b"".join(pieces)
    reference, fast = ready_server(), ready_server()

    def drain(conn: Connection, out: list[Any], plain: bool) -> bool:
        while True:
            try:
                if plain:
                    for msg_id, command, flags, payload in conn.take_plain(HOT):
                        f = Frame(msg_id, command, flags, 0, bytes(payload), [])
                        out.append(repr(conn.event_from_frame(f)))
                item = conn.next_event()
            except FatalProtocolError:
                out.append("fatal")
                return False
            if item is None:
                return True
            out.append(repr(item))  # repr: error events carry exceptions

    want: list[Any] = []
    got: list[Any] = []
    ref_ok = fast_ok = True
    for chunk in split(data, cuts):
        if ref_ok:
            try:
                reference.receive_data(chunk)
            except FatalProtocolError:
                want.append("fatal")
                ref_ok = False
            else:
                ref_ok = drain(reference, want, False)
        if fast_ok:
            buf = bytearray(chunk)
            try:
                fast.receive_data(memoryview(buf))
            except FatalProtocolError:
                got.append("fatal")
                fast_ok = False
            else:
                fast_ok = drain(fast, got, True)
            buf[:] = b"\xee" * len(buf)
    assert got == want


def test_resume_continues_a_stream_at_a_message_boundary() -> None:
    """A live upgrade: a fresh Connection takes over phase, caps and the next request id."""
    pair = ConnectionPair()
    pair.handshake()
    old = pair.server
    old.send_request(DmaRead(0x1000, 8))
    new = Connection(Role.SERVER)
    new.resume(old.phase, old.caps, old.next_id)
    assert new.phase is Phase.READY and new.caps == old.caps
    assert new.send_request(DmaRead(0x1000, 8))[0] == old.next_id
    big = frame(Command.REGION_WRITE, struct.pack("<QII", 0, 0, 8192) + bytes(8192))
    new.receive_data(big)  # the READY frame limit, not VERSION's
    assert isinstance(new.next_event(), Request)
    with pytest.raises(LocalProtocolError):
        Connection(Role.SERVER).resume(Phase.NEGOTIATING, old.caps, 0)
    with pytest.raises(LocalProtocolError):
        Connection(Role.SERVER).resume(Phase.READY, None, 0)

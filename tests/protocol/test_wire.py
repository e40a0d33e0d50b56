"""protocol/_wire.py: the 16-byte header and the (bytes, fds) frame splitter."""

from __future__ import annotations

import pytest

from protocol import HEADER, HEADER_SIZE, FatalProtocolError, Frame, FrameDecoder, pack_header

from .helpers import FdToken, fds, frame, header, layout


def test_header_layout_matches_spec_table() -> None:
    # msg id 0/2, command 2/2, size 4/4, flags 8/4, error 12/4
    assert HEADER_SIZE == HEADER.size == 16
    assert pack_header(0x1234, 5, 0x30, 0x21, 22) == layout(
        16, (0, "H", 0x1234), (2, "H", 5), (4, "I", 0x30), (8, "I", 0x21), (12, "I", 22)
    )
    assert pack_header(1, 2, 3, 4) == header(1, 2, 3, 4, 0)


@pytest.mark.parametrize(
    ("flags", "is_reply", "no_reply", "is_error"),
    [(0x0, False, False, False), (0x1, True, False, False), (0x10, False, True, False),
     (0x21, True, False, True), (0x31, True, True, True), (0x2, False, False, False)],
)
def test_frame_flag_properties(flags: int, is_reply: bool, no_reply: bool,
                               is_error: bool) -> None:
    f = Frame(0, 1, flags, 0, b"", [])
    assert (f.is_reply, f.no_reply, f.is_error) == (is_reply, no_reply, is_error)


def dec(max_size: int = 4096, max_fds: int = 4) -> FrameDecoder:
    return FrameDecoder(max_size, max_fds)


def test_byte_at_a_time() -> None:
    d = dec()
    wire = frame(9, b"abcdefgh", msg_id=3, flags=0x10) + frame(13, msg_id=4)
    got = []
    for i in range(len(wire)):
        d.feed(wire[i : i + 1])
        while (f := d.next_frame()) is not None:
            got.append(f)
    assert [(f.msg_id, f.command, f.flags, f.payload) for f in got] == [
        (3, 9, 0x10, b"abcdefgh"), (4, 13, 0, b"")]
    assert d.buffered == 0


def test_partial_returns_none_until_complete() -> None:
    d = dec()
    wire = frame(10, b"x" * 20)
    d.feed(wire[:15])
    assert d.next_frame() is None  # not even a header
    d.feed(wire[15:30])
    assert d.next_frame() is None  # header, not all of the payload
    assert d.buffered == 30
    d.feed(wire[30:])
    f = d.next_frame()
    assert f is not None and f.payload == b"x" * 20


def test_fds_ride_with_the_read_holding_the_first_byte() -> None:
    d = dec()
    a, b = FdToken(), FdToken()
    m1, m2, m3 = frame(2, bytes(32), msg_id=1), frame(4, bytes(16), msg_id=2), frame(13, msg_id=3)
    # read 1: m1 whole (with its fd); read 2: m2's first 10 bytes (with its fd); read 3: rest
    d.feed(m1, [a])
    d.feed(m2[:10], [b])
    d.feed(m2[10:] + m3)
    frames = [d.next_frame() for _ in range(3)]
    assert d.next_frame() is None
    assert [f.fds for f in frames if f] == [[a], [b], []]


def test_fds_belong_to_the_last_message_starting_in_the_read() -> None:
    d = dec()
    a = FdToken()
    m1, m2 = frame(13, msg_id=1), frame(2, bytes(32), msg_id=2)
    d.feed(m1 + m2, [a])
    f1, f2 = d.next_frame(), d.next_frame()
    assert f1 is not None and f2 is not None
    assert f1.fds == [] and f2.fds == [a]


@pytest.mark.parametrize("size", [0, 1, 15, 4097, 0xFFFF_FFFF])
def test_size_out_of_range_is_fatal_and_returns_every_held_fd(size: int) -> None:
    d = dec()
    held = fds(2)
    early = FdToken()
    d.feed(frame(13), [early])  # a good frame whose fd is not yet collected
    d.feed(header(1, 9, size) + b"....", held)
    f = d.next_frame()
    assert f is not None and f.fds == [early]
    later = fds(1)
    d.feed(b"more", later)  # a read after the bad header
    with pytest.raises(FatalProtocolError) as info:
        d.next_frame()
    assert info.value.errno == 22
    assert set(map(id, info.value.fds)) == set(map(id, held + later))
    # broken for good: any further fds come straight back
    more = fds(1)
    with pytest.raises(FatalProtocolError) as info2:
        d.feed(frame(13), more)
    assert info2.value.fds == more
    assert d.close() == []


def test_too_many_fds_in_one_read() -> None:
    d = dec(max_fds=2)
    held = fds(1)
    d.feed(frame(2, bytes(32))[:5], held)
    extra = fds(3)
    with pytest.raises(FatalProtocolError) as info:
        d.feed(b"x" * 10, extra)
    assert set(map(id, info.value.fds)) == set(map(id, held + extra))


def test_fds_without_data() -> None:
    d = dec()
    lone = fds(1)
    with pytest.raises(FatalProtocolError) as info:
        d.feed(b"", lone)
    assert info.value.fds == lone


def test_fds_on_a_read_that_starts_no_message() -> None:
    d = dec()
    stray = FdToken()
    m1, m2 = frame(10, b"x" * 40, msg_id=1), frame(13, msg_id=2)
    d.feed(m1[:20])
    d.feed(m1[20:], [stray])  # the middle of m1 cannot carry fds
    d.feed(m2)
    f1 = d.next_frame()
    assert f1 is not None and f1.fds == []
    with pytest.raises(FatalProtocolError) as info:
        d.next_frame()
    assert info.value.fds == [stray]


def test_close_returns_fds_of_incomplete_messages() -> None:
    d = dec()
    held = fds(2)
    d.feed(frame(8, bytes(20))[:30], held)
    assert d.next_frame() is None
    assert d.close() == held
    with pytest.raises(FatalProtocolError):
        d.feed(b"x")


def test_long_stream_compacts_and_keeps_fd_positions() -> None:
    d = dec(max_size=1 << 16)
    wire = b""
    expected = []
    for i in range(400):
        m = frame(10, bytes(16 + (i % 7)) + bytes(300), msg_id=i)
        wire += m
        expected.append(i)
    tail_fd = FdToken()
    last = frame(2, bytes(32), msg_id=999)
    got: list[Frame] = []
    for pos in range(0, len(wire), 997):
        d.feed(wire[pos : pos + 997])
        while (f := d.next_frame()) is not None:
            got.append(f)
    d.feed(last, [tail_fd])
    while (f := d.next_frame()) is not None:
        got.append(f)
    assert [f.msg_id for f in got] == [*expected, 999]
    assert got[-1].fds == [tail_fd] and all(not f.fds for f in got[:-1])
    assert d.buffered == 0

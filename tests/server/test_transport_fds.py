"""Descriptors received with the bytes (`FdStream.chunk`): the one-descriptor shortcut and
the general path must own the same descriptors, and truncated control data must close
every descriptor that did arrive."""

from __future__ import annotations

import array
import contextlib
import os
import socket
from collections.abc import Iterator

import pytest

from vfiouser_srv.fds import open_fd_count
from vfiouser_srv.transport import FdStream, TransportError


@contextlib.contextmanager
def _stream(max_fds: int, count: int) -> Iterator[tuple[FdStream, socket.socket, list[int]]]:
    """Our stream (room for `max_fds`), the peer's socket, `count` memfds; all closed after."""
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    files = [os.memfd_create(f"t{i}") for i in range(count)]
    try:
        yield FdStream(ours, max_fds=max_fds), peer, files
    finally:
        for f in files:
            os.close(f)
        ours.close()
        peer.close()


def _send(peer: socket.socket, fds: list[int]) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    peer.sendmsg([b"x" * 16], anc if fds else [])


async def _received(stream: FdStream) -> tuple[bytes, list[int]]:
    data, owned = await stream.receive_view()
    try:
        return bytes(data), [os.fstat(f.fileno()).st_ino for f in owned]
    finally:
        for f in owned:
            f.close()


@pytest.mark.parametrize("count", [0, 1, 3])
async def test_each_descriptor_arrives_owned_once(count: int) -> None:
    with _stream(8, count) as (stream, peer, files):
        before = open_fd_count()
        _send(peer, files)
        data, inodes = await _received(stream)
        assert data == b"x" * 16
        # the same files, in order, and nothing left open afterwards
        assert inodes == [os.fstat(f).st_ino for f in files]
        assert open_fd_count() == before


@pytest.mark.parametrize("count", [3, 5])
async def test_truncated_control_data_closes_what_arrived(count: int) -> None:
    # room for two descriptors (CMSG_SPACE rounds one up to 8 bytes): the kernel passes
    # those and sets MSG_CTRUNC
    with _stream(1, count) as (stream, peer, files):
        before = open_fd_count()
        _send(peer, files)
        with pytest.raises(TransportError, match="MSG_CTRUNC"):
            await stream.receive_view()
        assert open_fd_count() == before

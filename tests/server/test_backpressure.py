"""The read loop never blocks in send(): a peer that writes a lot before it reads anything
must not deadlock against us (the send/send deadlock QEMU hit with large message-mode DMA).
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import trio

from devices.edu import Edu
from protocol import pack_header
from vfiouser_srv.server import Server

HEADER = struct.Struct("<HHIII")
VERSION_JSON = b'{"capabilities":{"max_msg_fds":8}}\0'
REQUESTS = 40_000  # 1.3 MB of requests, 1.4 MB of replies: far beyond the socket buffers


def blocking_client(path: str) -> int:
    """Send every request before reading a single reply; return how many replies came."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(path)
    try:
        payload = struct.pack("<HH", 0, 0) + VERSION_JSON
        sock.sendall(pack_header(0, 1, 16 + len(payload), 0) + payload)
        head = sock.recv(16, socket.MSG_WAITALL)
        size = HEADER.unpack(head)[2]
        sock.recv(size - 16, socket.MSG_WAITALL)
        read = struct.pack("<QII", 0, 0, 4)  # edu identification register
        batch = b"".join(
            pack_header(i & 0xFFFF, 9, 32, 0) + read for i in range(1, REQUESTS + 1)
        )
        sock.sendall(batch)  # would block forever if the server stopped reading
        want = REQUESTS * 36
        got = bytearray()
        while len(got) < want:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            got += chunk
        replies = 0
        for pos in range(0, len(got), 36):
            _id, cmd, size, flags, err = HEADER.unpack_from(got, pos)
            assert (cmd, size, flags, err) == (9, 36, 1, 0)
            assert got[pos + 32 : pos + 36] == (0x010000ED).to_bytes(4, "little")
            replies += 1
        return replies
    finally:
        sock.close()


async def test_peer_that_writes_everything_before_reading(tmp_path: Path) -> None:
    server = Server()
    path = str(tmp_path / "edu.sock")
    server.add_device("edu", Edu(), socket_path=path)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        with trio.fail_after(60):
            replies = await trio.to_thread.run_sync(blocking_client, path)
        assert replies == REQUESTS
        nursery.cancel_scope.cancel()

"""What trio's ordinary wait costs: a 40-line REGION_READ echo.

It answers VERSION and REGION_READ (4 zero bytes) and nothing else, with one
`wait_readable` + `recvmsg_into` + `send` per message: the least a trio server that waits
through trio's scheduler can do. (Our server beats it by waiting in one poll() when trio is
idle: vfiouser_srv/idlewait.py and benchmarks/README.md.) Run it
next to the C sample and our server (`compare.py ... --server "trio-floor=python
benchmarks/trio_floor.py {sock}" --region trio-floor=0`) to see how much of a ratio is the
event loop itself rather than our code.

With `--try-first` it calls `recvmsg_into` before waiting and waits only on EAGAIN (what our
transport does): when the client shares the CPU and runs as soon as our reply wakes it, its
next request is already there and the event loop is never entered.
"""

from __future__ import annotations

import os
import socket
import struct
import sys

import trio

HEADER = struct.Struct("<HHIII")


async def serve(path: str, try_first: bool) -> None:
    if os.path.exists(path):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    listener.setblocking(False)
    print("READY", path, flush=True)
    buf = bytearray(65536)
    view = memoryview(buf)
    while True:
        await trio.lowlevel.wait_readable(listener)
        conn, _ = listener.accept()
        conn.setblocking(False)
        reads = 0
        while True:
            if not try_first:
                await trio.lowlevel.wait_readable(conn)
            elif reads >= 64:  # as FdStream: a peer that always has data cannot starve others
                reads = 0
                await trio.lowlevel.checkpoint()
            reads += 1
            try:
                n, _anc, _flags, _addr = conn.recvmsg_into([view], 64)
            except BlockingIOError:
                if try_first:
                    reads = 0
                    await trio.lowlevel.wait_readable(conn)
                continue
            if n == 0:
                break
            msg_id, cmd, _size, _flags, _err = HEADER.unpack_from(buf)
            if cmd == 1:
                payload = struct.pack("<HH", 0, 0) + b'{"capabilities":{}}\0'
            else:
                payload = bytes(buf[16:32]) + b"\0\0\0\0"
            conn.send(HEADER.pack(msg_id, cmd, 16 + len(payload), 1, 0) + payload)
        conn.close()


if __name__ == "__main__":
    trio.run(serve, sys.argv[1], "--try-first" in sys.argv[2:])

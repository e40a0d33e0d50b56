"""A live upgrade's pause racing with a request: nothing lost, nobody left waiting.

`Session.request_pause` wakes a session that waits for its next read by cancelling the read
loop's cancel scope. The request that arrives in the same scheduler round (the session is
already scheduled to read it, so the cancel cannot reach it any more) and the request the
session is still handling when the pause comes must both be answered before it parks, and
the session must park (a taker waits for that), also when nothing arrives at all. The
request here is a DEVICE_RESET with a device task running: handling it waits for the task
to end, so a cancel that reached that wait would drop the reply.

The race is made, not hoped for: this test keeps itself runnable while the session waits,
so the session waits in trio's epoll (not in the idle poll, which trio cannot interleave
with) and both are scheduled in one round; trio runs a round in either order, so over the
rounds the pause comes both before and after the session took its read.
"""

from __future__ import annotations

import select
import socket

import pytest
import trio

from protocol import HEADER, HEADER_SIZE, Capabilities, Command, Version, pack_header
from vfiouser_srv.session import Pause, Session

from ._support import BAR0, HANG_REG, TrackedEdu
from .conftest import MakeServer, path_of, session_of

pytestmark = pytest.mark.usefixtures("no_fd_leak")

ROUNDS = 40


def _frame(msg_id: int, command: int, payload: bytes = b"") -> bytes:
    return pack_header(msg_id, command, HEADER_SIZE + len(payload), 0) + payload


async def _reply(sock: socket.socket) -> tuple[int, int, int]:
    """(msg_id, command, error) of the next reply; the test's own trio wait."""
    with trio.fail_after(5):
        await trio.lowlevel.wait_readable(sock)
    head = sock.recv(HEADER_SIZE, socket.MSG_WAITALL)
    msg_id, command, size, _flags, error = HEADER.unpack(head)
    if size > HEADER_SIZE:
        sock.recv(size - HEADER_SIZE, socket.MSG_WAITALL)
    return msg_id, command, error


async def _parked(session: Session) -> Pause:
    """A pause requested of `session`, once the session has parked for it."""
    pause = Pause()
    session.request_pause(pause)
    with trio.fail_after(5):
        while not pause.parked:
            await pause.changed.wait()
            pause.changed = trio.Event()
    return pause


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
async def test_a_pause_racing_with_a_request_loses_nothing(
    make_server: MakeServer, split: bool
) -> None:
    """`split`: the reset's first bytes arrive before the rest, so the pause cannot stop
    the session until the rest came (not at a message boundary)."""
    model = TrackedEdu()
    server = await make_server({"edu": model})
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with sock:
        sock.connect(path_of(server))
        sock.sendall(_frame(0, Command.VERSION, Version(0, 0, Capabilities()).encode()))
        assert (await _reply(sock))[2] == 0
        session = session_of(server)
        served = session.stream.sock
        before = after = 0
        for i in range(ROUNDS):
            hang = HANG_REG.to_bytes(8, "little") + (BAR0).to_bytes(4, "little")
            sock.sendall(_frame(2 * i + 1, Command.REGION_WRITE, hang + (4).to_bytes(4, "little")
                                + bytes(4)))
            assert await _reply(sock) == (2 * i + 1, Command.REGION_WRITE, 0)
            with trio.fail_after(5):
                await model.task_started.wait()
            model.task_started = trio.Event()
            for _ in range(5):  # the session gets to wait for its next read (in trio's epoll)
                await trio.lowlevel.checkpoint()
            reset = _frame(2 * i + 2, Command.DEVICE_RESET)
            if split:
                sock.sendall(reset[:8])
                for _ in range(5):  # the session reads the half frame and waits again
                    await trio.lowlevel.checkpoint()
                reset = reset[8:]
            sock.sendall(reset)
            await trio.lowlevel.checkpoint()  # one round: our socket's event is in it
            if select.select([served], [], [], 0)[0]:
                before += 1  # the session has not read the reset yet (maybe it is scheduled)
            else:
                after += 1  # it took the reset and waits for the device task to end
            pause = await _parked(session)
            # parked: the reset was answered, or is still unread in the socket (then the
            # next process would read it), never read and dropped
            answered = bool(select.select([sock], [], [], 0)[0])
            assert answered or select.select([served], [], [], 0)[0]
            pause.done.set()  # not handed over: serve on (and answer it now)
            assert await _reply(sock) == (2 * i + 2, Command.DEVICE_RESET, 0)
            for _ in range(5):
                await trio.lowlevel.checkpoint()
            assert session.pause is None and not session.closed
            # and a pause with nothing arriving: the waiting session must be woken to park
            pause = await _parked(session)
            pause.done.set()
        assert before and after, (before, after)  # both sides of the race were run
        assert model.task_cancelled == ROUNDS

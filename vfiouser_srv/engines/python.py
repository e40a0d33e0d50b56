"""The pure-Python engine: a device's socket, its accept loop, and one `Session` per client.

`create_device(host, device, endpoint)` is the same contract as the libvfio-user engine's
(`engines.contract`). Everything a connection does after accept is in `vfiouser_srv.session`;
this module decides who gets a session at all (docs/access.md): the device's allow-list,
checked with SO_PEERCRED before a byte is read, and the connection caps of `Limits`. A
refused connection is closed at once and logged, rate-limited so a flood cannot fill the log.

Error handling: accept failures from fd exhaustion (EMFILE/ENFILE) are logged and retried
after a pause, like trio's `serve_listeners`; a failing session never affects another.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

import trio

from ..contract import Endpoint, EngineDevice, EngineHost
from ..objects import Device
from ..session import Session
from ..sockets import adopt_fd, is_listening, listen_path, peer_groups, peercred
from ..transport import FdStream

log = logging.getLogger(__name__)

#: plain ints for the accepted socket (the enum properties of the listener cost ~3 µs)
_AF_UNIX = int(socket.AF_UNIX)
_SOCK_STREAM = int(socket.SOCK_STREAM)

#: pause before retrying accept after EMFILE/ENFILE
ACCEPT_RETRY_SLEEP = 0.1

#: after a refused connection is logged, further refusals of the same device and reason are
#: only counted, and summarised in one line at most this often (seconds)
REFUSAL_LOG_INTERVAL = 1.0


@dataclass(eq=False)
class _Refusals:
    """Refusals of one device for one reason since the last line logged about them."""

    #: refusals before this trio time are summarised, not logged one by one
    quiet_until: float = float("-inf")
    suppressed: int = 0
    last_peer: str = ""
    flushing: bool = False


class RefusalLog:
    """Log refused connections without letting a flood of them flood the log.

    The first refusal after a quiet second is logged in full (pid, uid, gid); the ones that
    follow within `REFUSAL_LOG_INTERVAL` are counted and summarised in one line when the
    interval ends, by a task in the server's nursery, so a client connecting in a loop costs
    at most two lines per second per device and reason.
    """

    def __init__(self) -> None:
        self._state: dict[tuple[str, str], _Refusals] = {}

    def refused(
        self,
        device: str,
        reason: str,
        peer: str,
        start_soon: Callable[..., object],
    ) -> None:
        state = self._state.setdefault((device, reason), _Refusals())
        now = trio.current_time()
        if now >= state.quiet_until and not state.flushing:
            log.warning("%s: refused connection from %s: %s", device, peer, reason)
            state.quiet_until = now + REFUSAL_LOG_INTERVAL
            return
        state.suppressed += 1
        state.last_peer = peer
        if not state.flushing:
            state.flushing = True
            start_soon(self._flush, device, reason, state)

    async def _flush(self, device: str, reason: str, state: _Refusals) -> None:
        try:
            await trio.sleep_until(state.quiet_until)
        finally:
            # also when cancelled at shutdown: the count is not lost
            if state.suppressed:
                log.warning(
                    "%s: refused %d more connection(s) in the last %.0fs: %s (last from %s)",
                    device,
                    state.suppressed,
                    REFUSAL_LOG_INTERVAL,
                    reason,
                    state.last_peer,
                )
            state.suppressed = 0
            state.flushing = False
            state.quiet_until = trio.current_time() + REFUSAL_LOG_INTERVAL


class PythonDevice:
    """One device's listening socket and the sessions of its clients (`EngineDevice`).

    `serve` is the accept loop; each session runs in the server's nursery
    (`EngineHost.start_soon`), so that stopping the accept loop (hot remove) leaves the
    current client connected until it releases the device, and a client still negotiating
    gets its ENODEV reply. Cancelling the server ends every session (each detaches in a
    shielded `finally`).
    """

    def __init__(self, host: EngineHost, device: Device, endpoint: Endpoint) -> None:
        if endpoint.fd is not None:  # with a path: a listener handed over by a live upgrade
            self.sock = adopt_fd(endpoint.fd)
        else:
            assert endpoint.path is not None
            self.sock = listen_path(endpoint.path, endpoint.access)
        self.host = host
        self.device = device
        self.endpoint = endpoint
        self._accepting = trio.CancelScope()
        self._refusals = RefusalLog()
        self._closed = False
        #: a live upgrade holds new connections in the listen backlog until this is set
        self._held: trio.Event | None = None
        #: the socket file belongs to the next process (live upgrade): never unlink it
        self.keep_socket_file = False
        host.connections.setdefault(device.name, 0)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await self._accept_loop()

    def stop_accepting(self) -> None:
        self._accepting.cancel()
        self._close_socket()

    def close(self) -> None:
        self.stop_accepting()

    # -------------------------------------------------------------- live upgrade

    @property
    def listener(self) -> socket.socket | None:
        """The listening socket a live upgrade hands over (None: served on an inherited
        connected socket, which cannot be handed over)."""
        if self._closed or not is_listening(self.sock):
            return None
        return self.sock

    def hold(self) -> None:
        """Accept nothing until `unhold`: connections wait in the listen backlog."""
        if self._held is None:
            self._held = trio.Event()

    def unhold(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            held.set()

    def adopt(self, session: Session) -> None:
        """Serve a connection restored by a live upgrade (counted like an accepted one)."""
        self._count(+1)
        self.host.start_soon(self._run_session, session)

    def _close_socket(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.endpoint.path and not self.keep_socket_file:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.endpoint.path)
        # outside trio.run when a start-up that failed part way is cleaned up
        with contextlib.suppress(RuntimeError):
            trio.lowlevel.notify_closing(self.sock)
        self.sock.close()

    async def _accept_loop(self) -> None:
        sock, device = self.sock, self.device
        with self._accepting:
            if sock.fileno() < 0:  # hot-removed before this task first ran
                return
            if not is_listening(sock):  # --fd handed us one connected client
                peer = self._admit(sock)
                if peer is not None:
                    self._count(+1)
                    await self._serve_connection(sock, peer)
                return
            while True:
                await trio.lowlevel.wait_readable(sock)
                if self._held is not None:
                    await self._held.wait()
                    continue
                try:
                    # `socket.accept` without its enum conversions of the listener's family
                    # and type (~3 µs): the connection is an AF_UNIX stream like the listener
                    fd, _ = sock._accept()  # type: ignore[attr-defined]
                except BlockingIOError:
                    continue
                except OSError as exc:
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        log.error(
                            "accept on %s: %s; retrying in %.1fs",
                            device.name,
                            exc,
                            ACCEPT_RETRY_SLEEP,
                        )
                        await trio.sleep(ACCEPT_RETRY_SLEEP)
                        continue
                    if exc.errno in (errno.EBADF, errno.EINVAL):
                        return  # listener closed under us (hot remove)
                    raise
                try:
                    conn = socket.socket(_AF_UNIX, _SOCK_STREAM, 0, fd)
                except BaseException:
                    os.close(fd)
                    raise
                peer = self._admit(conn)
                if peer is None:
                    continue
                self.host.start_soon(self._serve_connection, conn, peer, True)
                # no checkpoint since the check: the next accept sees this connection counted
                self._count(+1)

    def _count(self, delta: int) -> None:
        self.host.connections[self.device.name] += delta
        self.host.total_connections += delta

    def _admit(self, conn: socket.socket) -> tuple[int, int, int] | None:
        """Check a new connection against the allow-list and the caps; close it if refused.

        Runs before anything is read from `conn`, so a refused peer gets no byte from us and
        costs no parsing; the caps count every open connection, negotiating or attached.
        Returns the peer's (pid, uid, gid) from SO_PEERCRED (-1s if unreadable) for the
        session, which then reads them no second time; None when refused.
        """
        host, name, access = self.host, self.device.name, self.endpoint.access
        try:
            pid, uid, gid = peercred(conn)
        except OSError:
            pid = uid = gid = -1
        reason = None
        if access.restricted and not access.admits(uid, peer_groups(conn, gid)):
            reason = "uid/gid not in the device's allow-list"
        elif host.connections[name] >= host.limits.max_connections_per_device:
            reason = (
                f"{host.limits.max_connections_per_device} connections to this device already "
                "open (max_connections_per_device)"
            )
        elif host.total_connections >= host.limits.max_connections:
            reason = (
                f"{host.limits.max_connections} connections to the server already open "
                "(max_connections)"
            )
        if reason is None:
            self.device.stats.connections_accepted += 1
            return pid, uid, gid
        self.device.stats.connections_refused += 1
        conn.close()
        peer = f"pid {pid} uid {uid} gid {gid}"
        self._refusals.refused(name, reason, peer, self.host.start_soon)
        return None

    async def _serve_connection(
        self, conn: socket.socket, peer: tuple[int, int, int], accepted: bool = False
    ) -> None:
        """Serve one admitted connection (already counted) until it ends; `accepted`: by
        our accept loop (so in blocking mode)."""
        try:
            # SO_PEERCRED as `_admit` read it; unreadable (-1s) lets the session try again
            # blocking already: accept4 without SOCK_NONBLOCK (O_NONBLOCK is not inherited
            # from the listener on Linux), unlike an inherited `--fd` socket
            stream = FdStream(
                conn,
                max_fds=self.host.caps.max_msg_fds,
                peer=peer if peer[0] != -1 else None,
                blocking=accepted,
            )
            session = Session(self.host, self.device, stream)
        except BaseException:
            self._count(-1)
            raise
        log.info("%s: connected", session.name)
        await self._run_session(session)

    async def _run_session(self, session: Session) -> None:
        """Run a counted session until it ends."""
        self.host.sessions.add(session)
        try:
            await session.run()
        finally:
            self.host.sessions.discard(session)
            self._count(-1)


def create_device(host: EngineHost, device: Device, endpoint: Endpoint) -> EngineDevice:
    """Listen on `endpoint` for `device` (raises `ObjectError` naming the path if it cannot)."""
    return PythonDevice(host, device, endpoint)


__all__ = [
    "ACCEPT_RETRY_SLEEP",
    "REFUSAL_LOG_INTERVAL",
    "PythonDevice",
    "RefusalLog",
    "create_device",
]

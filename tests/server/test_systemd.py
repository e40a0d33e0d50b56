"""systemd's conventions: socket activation (LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES) and
notifications (NOTIFY_SOCKET: READY=1, STATUS=, STOPPING=1).

The end-to-end tests run the real CLI under Debian's ``systemd-socket-activate`` (which
creates the sockets, waits for the first connection, then execs the server with them, as
systemd does) and receive the notifications on a datagram socket the test binds itself, with
SO_PASSCRED so each one is checked to come from the server's own pid. systemd need not be
PID 1. Without ``systemd-socket-activate`` they skip outside CI and fail in CI (.ci/run
installs the ``systemd`` package).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from vfiouser_srv import systemd
from vfiouser_srv.systemd import ActivationError, ListenFd, assign, listen_fds, notify

from .test_cli import assert_clean_error, use_edu

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 20.0


# ------------------------------------------------------------------------ the variables


def test_listen_fds_for_another_pid_are_ignored_and_removed() -> None:
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "a",
           "OTHER": "kept"}
    assert listen_fds(env) == []
    assert env == {"OTHER": "kept"}


def test_listen_fds_absent_or_zero() -> None:
    assert listen_fds({}) == []
    assert listen_fds({"LISTEN_PID": "7", "LISTEN_FDS": "0"}, pid=7) == []


@pytest.mark.parametrize(
    "env",
    [
        {"LISTEN_PID": "x", "LISTEN_FDS": "1"},
        {"LISTEN_PID": "7", "LISTEN_FDS": "-1"},
        {"LISTEN_PID": "7", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b:c"},
    ],
    ids=["pid-not-a-number", "negative", "names-count"],
)
def test_listen_fds_malformed(env: dict[str, str]) -> None:
    with pytest.raises(ActivationError):
        listen_fds(env, pid=7)


def test_listen_fds_not_open() -> None:
    fd = os.open(os.devnull, os.O_RDONLY)  # the lowest free fds, then close them: not open
    os.close(fd)
    count = fd - systemd.LISTEN_FDS_START + 1
    if count < 1:
        pytest.skip("fd 3 is free here; nothing to check")
    with pytest.raises(ActivationError, match="not open"):
        listen_fds({"LISTEN_PID": "7", "LISTEN_FDS": str(count)}, pid=7)


# ------------------------------------------------------------------------ assignment rules


def fds(*names: str) -> list[ListenFd]:
    return [ListenFd(3 + i, name) for i, name in enumerate(names)]


def test_assign_by_name_replaces_the_devices_own_socket() -> None:
    assert assign([("a", True), ("b", True)], fds("b", "a")) == {"b": 3, "a": 4}


def test_assign_by_order_to_devices_without_a_socket() -> None:
    # unnamed (systemd-socket-activate without --fdname) or named after the socket unit
    devices = [("a", False), ("own", True), ("b", False)]
    assert assign(devices, fds("", "")) == {"a": 3, "b": 4}
    assert assign(devices, fds("vfiouser-srv@vm1.socket", "x")) == {"a": 3, "b": 4}


def test_assign_mixed_names_first_then_order() -> None:
    devices = [("first", False), ("named", True), ("second", False)]
    assert assign(devices, fds("x", "named", "")) == {"first": 3, "named": 4, "second": 5}


@pytest.mark.parametrize(
    ("devices", "inherited", "message"),
    [
        ([("a", True)], fds(""), "no device takes: fd 3"),
        ([("a", False)], fds("b", "c"), "no device takes: fd 4 ('c')"),
        ([("a", False), ("b", False)], fds(""), "device(s) b have no socket"),
        ([("a", False)], fds("a", "a"), "two sockets named 'a'"),
    ],
    ids=["unused", "unused-named", "missing", "duplicate"],
)
def test_assign_refuses_what_does_not_fit(
    devices: list[tuple[str, bool]], inherited: list[ListenFd], message: str
) -> None:
    with pytest.raises(ActivationError) as info:
        assign(devices, inherited)
    assert message in str(info.value)


# ------------------------------------------------------------------------ notify


@dataclass
class Notification:
    text: str
    pid: int

    def fields(self) -> dict[str, str]:
        return dict(line.split("=", 1) for line in self.text.splitlines())


class NotifySocket:
    """A test-owned NOTIFY_SOCKET: a datagram socket with SO_PASSCRED."""

    def __init__(self, address: str) -> None:
        self.address = address  # as systemd writes it: a path, or @name (abstract)
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        raw.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock = trio.socket.from_stdlib_socket(raw)

    async def receive(self) -> Notification:
        with trio.fail_after(TIMEOUT):
            data, ancdata, _flags, _addr = await self.sock.recvmsg(
                4096, socket.CMSG_SPACE(struct.calcsize("3i"))
            )
        pid = -1
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid, _uid, _gid = struct.unpack("3i", payload[: struct.calcsize("3i")])
        return Notification(data.decode(), pid)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
async def notify_socket(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[NotifySocket]:
    if request.param == "path":
        address = str(tmp_path / "notify")
    else:
        address = f"@vfiouser-srv-test-{os.getpid()}-{id(request)}"
    ns = NotifySocket(address)
    yield ns
    ns.close()


async def test_notify_sends_one_datagram(notify_socket: NotifySocket) -> None:
    assert notify("READY=1\nSTATUS=hi", {"NOTIFY_SOCKET": notify_socket.address})
    got = await notify_socket.receive()
    assert got.fields() == {"READY": "1", "STATUS": "hi"}
    assert got.pid == os.getpid()


def test_notify_without_a_socket_or_listener_is_quiet(tmp_path: Path) -> None:
    assert not notify("READY=1", {})
    assert not notify("READY=1", {"NOTIFY_SOCKET": "vsock:2:999"})
    assert not notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "nobody")})


# ------------------------------------------------------------------------ end to end


def socket_activate() -> str:
    path = shutil.which("systemd-socket-activate")
    if path:
        return path
    reason = "systemd-socket-activate not installed (Debian package systemd)"
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{reason}: .ci/run installs it")
    pytest.skip(reason)


@dataclass
class Activated:
    proc: trio.Process
    sockets: list[str]

    async def wait(self) -> tuple[int, str]:
        with trio.fail_after(TIMEOUT):
            await self.proc.wait()
        assert self.proc.stderr is not None
        err = b""
        while chunk := await self.proc.stderr.receive_some():
            err += chunk
        return self.proc.returncode or 0, err.decode()


@asynccontextmanager
async def activated(
    tmp_path: Path, notify_to: str, listen: list[str], fdnames: str | None, *argv: str
) -> AsyncIterator[Activated]:
    """``systemd-socket-activate -l ... -- python -m vfiouser_srv ARGV`` (started, not yet
    activated: the first connection to one of the sockets execs the server)."""
    sockets = [str(tmp_path / name) for name in listen]
    cmd = [socket_activate(), *(f"--listen={s}" for s in sockets)]
    if fdnames is not None:
        cmd.append(f"--fdname={fdnames}")
    cmd += [f"--setenv=NOTIFY_SOCKET={notify_to}", f"--setenv=PYTHONPATH={REPO}",
            "--", sys.executable, "-m", "vfiouser_srv", *argv]
    proc = await trio.lowlevel.open_process(cmd, cwd=REPO, stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with trio.fail_after(TIMEOUT):
            while not all(os.path.exists(s) for s in sockets):
                await trio.sleep(0.02)
        yield Activated(proc, sockets)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if proc.stderr is not None:
            await proc.stderr.aclose()


async def test_single_device_takes_the_socket_and_notifies(
    tmp_path: Path, notify_socket: NotifySocket
) -> None:
    """`serve edu` with no --socket-path: READY=1 once serving, STOPPING=1 on SIGTERM."""
    async with activated(tmp_path, notify_socket.address, ["edu.sock"], None,
                         "serve", "edu") as act:
        await use_edu(act.sockets[0])  # this connection starts the server
        ready = await notify_socket.receive()
        assert ready.pid == act.proc.pid  # LISTEN_PID matched: exec'd in place, as systemd does
        assert ready.fields() == {"READY": "1", "STATUS": "serving fd:3"}
        await use_edu(act.sockets[0])
        act.proc.send_signal(signal.SIGTERM)
        stopping = await notify_socket.receive()
        assert stopping.fields() == {"STOPPING": "1", "STATUS": "stopping (SIGTERM)"}
        assert stopping.pid == act.proc.pid
        rc, err = await act.wait()
        assert rc == 0, err
        assert "Traceback" not in err


async def test_config_devices_by_name_and_by_order(
    tmp_path: Path, notify_socket: NotifySocket
) -> None:
    """FileDescriptorName= matches a device (replacing its own socket); the other sockets go,
    in order, to the devices that name no socket."""
    own = tmp_path / "named-own.sock"
    config = tmp_path / "devices.toml"
    config.write_text(
        '[[device]]\nname = "first"\nmodel = "edu"\n\n'
        f'[[device]]\nname = "named"\nmodel = "edu"\nsocket = "{own}"\n\n'
        '[[device]]\nname = "second"\nmodel = "edu"\n'
    )
    async with activated(tmp_path, notify_socket.address, ["a.sock", "b.sock", "c.sock"],
                         "x:named:y", "serve", "--config", str(config)) as act:
        await use_edu(act.sockets[1])
        ready = await notify_socket.receive()
        assert ready.fields() == {"READY": "1", "STATUS": "serving fd:3, fd:4, fd:5"}
        for path in act.sockets:
            await use_edu(path)
        assert not own.exists()  # the inherited socket replaced the device's own
        act.proc.send_signal(signal.SIGTERM)
        assert (await notify_socket.receive()).fields()["STOPPING"] == "1"
        rc, err = await act.wait()
        assert rc == 0, err
    # the sockets are systemd's: the server does not unlink them
    assert all(os.path.exists(p) for p in act.sockets)


async def test_a_socket_no_device_takes_fails_start_with_status(
    tmp_path: Path, notify_socket: NotifySocket
) -> None:
    async with activated(tmp_path, notify_socket.address, ["a.sock", "b.sock"], None,
                         "serve", "edu") as act:
        with trio.fail_after(TIMEOUT):
            client = await trio.open_unix_socket(act.sockets[0])  # starts the server
        rc, err = await act.wait()
        await client.aclose()
        assert rc == 2
        ours = err.split("Execing ", 1)[1].split("\n", 1)[1]  # after systemd-socket-activate's
        assert_clean_error(ours.encode(), "no device takes: fd 4")
        status = await notify_socket.receive()
        assert status.fields()["STATUS"].startswith("failed to start: ")
        assert "READY" not in status.fields()


# ------------------------------------------------------------------------ the unit files


def test_unit_files_verify(tmp_path: Path) -> None:
    """qemu-configs/systemd/ passes `systemd-analyze verify` (no unknown keys or sections)
    with ExecStart pointed at this environment's vfiouser-srv."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        socket_activate()  # the same package: fails in CI, skips elsewhere
        pytest.skip("systemd-analyze not installed")
    exe = Path(sys.executable).with_name("vfiouser-srv")
    assert exe.exists(), exe
    for unit in (REPO / "qemu-configs" / "systemd").glob("vfiouser-srv@.*"):
        text = unit.read_text().replace("ExecStart=vfiouser-srv ", f"ExecStart={exe} ")
        (tmp_path / unit.name).write_text(text)
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(tmp_path / "vfiouser-srv@vm1.service"),
         str(tmp_path / "vfiouser-srv@vm1.socket")],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr

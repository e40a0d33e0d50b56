"""The command line, run as a real subprocess: `python -m vfiouser_srv ...`.

Backend-program conventions (the vfio-user spec's "Server" section): never daemonize, honour
SIGTERM, accept `--socket-path` or `--fd`; `READY <socket>` is printed only once the socket
accepts connections (QEMU fails to start otherwise), so every test connects the moment it
reads it, without retrying.
"""

from __future__ import annotations

import errno
import grp
import os
import re
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from devices.edu import Reg
from devices.sdk.interface import IrqIndex
from tests.engines.params import ENGINE_PARAMS
from vfiouser_srv.cli import make_parser, server_from_args
from vfiouser_srv.client import VfioUserError, make_eventfd, open_client
from vfiouser_srv.engines import EngineUnavailable, load_engine
from vfiouser_srv.limits import Limits
from vfiouser_srv.transport import FdStream

from ._support import BAR0, EDU_ID, fd_leak_check, from_u32, u32  # noqa: F401

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 20.0

pytestmark = pytest.mark.usefixtures("fd_leak_check")


class Cli:
    """A running `vfiouser-srv` process: stdout read line by line, stderr collected."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self._out = b""
        self.stderr = b""

    async def readline(self) -> str:
        assert self.proc.stdout is not None
        with trio.fail_after(TIMEOUT):
            while b"\n" not in self._out:
                chunk = await self.proc.stdout.receive_some()
                if not chunk:
                    raise AssertionError(f"server exited early:\n{self.stderr.decode()}")
                self._out += chunk
        line, _, self._out = self._out.partition(b"\n")
        return line.decode()

    async def drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        while chunk := await self.proc.stderr.receive_some():
            self.stderr += chunk

    async def terminate(self) -> int:
        """SIGTERM, then the exit status (and all of stderr)."""
        self.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(TIMEOUT):
            return await self.proc.wait()


@asynccontextmanager
async def cli(*args: str, pass_fds: Sequence[int] = ()) -> AsyncIterator[Cli]:
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "vfiouser_srv", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        pass_fds=pass_fds,
        cwd=REPO,
    )
    srv = Cli(proc)
    try:
        async with trio.open_nursery() as nursery:
            # stderr must be drained while the server runs: with -v it fills a pipe fast.
            nursery.start_soon(srv.drain_stderr)
            try:
                yield srv
            finally:
                if proc.returncode is None:
                    proc.kill()
                with trio.CancelScope(shield=True):
                    await proc.wait()
    finally:
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                await stream.aclose()


async def run_cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(TIMEOUT):
        return await trio.run_process(
            [sys.executable, "-m", "vfiouser_srv", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=REPO,
        )


def assert_clean_error(stderr: bytes, *needles: str) -> None:
    text = stderr.decode()
    assert "Traceback" not in text, text
    assert text.startswith("vfiouser-srv: ") or "error:" in text, text
    for needle in needles:
        assert needle in text, text


async def use_edu(path: str) -> None:
    async with open_client(path) as c:
        assert from_u32(await c.region_read(BAR0, Reg.ID, 4)) == EDU_ID
        await c.region_write(BAR0, Reg.FACTORIAL, u32(6))
        assert from_u32(await c.region_read(BAR0, Reg.FACTORIAL, 4)) == 720


# ------------------------------------------------------------------------ serve --socket-path


@pytest.mark.parametrize("engine", ENGINE_PARAMS)
async def test_serve_ready_then_usable_then_sigterm_removes_socket(
    tmp_path: Path, engine: str
) -> None:
    path = str(tmp_path / "edu.sock")
    neighbour = tmp_path / "keep.txt"
    neighbour.write_text("not ours")
    async with cli("serve", "edu", "--socket-path", path, "--engine", engine) as srv:
        assert await srv.readline() == f"READY {path}"
        await use_edu(path)  # connects at once: no retry loop
        async with open_client(path) as c:
            assert await srv.terminate() == 0
            with trio.fail_after(TIMEOUT):
                await c.wait_disconnected()
    assert not os.path.exists(path)
    assert neighbour.read_text() == "not ours"
    assert "Traceback" not in srv.stderr.decode()


async def test_serve_refuses_a_path_that_is_not_a_socket(tmp_path: Path) -> None:
    path = tmp_path / "edu.sock"
    path.write_text("precious")
    result = await run_cli("serve", "edu", "--socket-path", str(path))
    assert result.returncode == 2
    assert_clean_error(result.stderr, "exists and is not a socket")
    assert path.read_text() == "precious"


async def test_second_server_on_a_live_socket_leaves_it_alone(tmp_path: Path) -> None:
    path = str(tmp_path / "edu.sock")
    async with cli("serve", "edu", "--socket-path", path) as first:
        assert await first.readline() == f"READY {path}"
        result = await run_cli("serve", "edu", "--socket-path", path)
        assert result.returncode == 2
        assert_clean_error(result.stderr, "another server is listening")
        assert os.path.exists(path)
        await use_edu(path)
        assert await first.terminate() == 0


async def test_serve_replaces_a_stale_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "edu.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)  # bound, never listening: what a dead server leaves behind
    stale.close()
    async with cli("serve", "edu", "--socket-path", path) as srv:
        assert await srv.readline() == f"READY {path}"
        await use_edu(path)
        assert await srv.terminate() == 0


# ------------------------------------------------------------------------ serve --fd


async def test_fd_with_inherited_listening_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "edu.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen()
        fd = listener.fileno()
        async with cli("serve", "edu", "--fd", str(fd), pass_fds=[fd]) as srv:
            assert await srv.readline() == f"READY fd:{fd}"
            await use_edu(path)
            await use_edu(path)  # still listening after the first client left
            assert await srv.terminate() == 0
    # The server did not create that path, so it must not remove it.
    assert os.path.exists(path)


async def test_fd_with_connected_socket(tmp_path: Path) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with theirs:
        fd = theirs.fileno()
        async with cli("serve", "edu", "--fd", str(fd), pass_fds=[fd]) as srv:
            theirs.close()  # the child has its own copy
            assert await srv.readline() == f"READY fd:{fd}"
            async with open_client(FdStream(ours)) as c:
                assert from_u32(await c.region_read(BAR0, Reg.ID, 4)) == EDU_ID
                await c.region_write(BAR0, Reg.LIVENESS, u32(0))
                assert from_u32(await c.region_read(BAR0, Reg.LIVENESS, 4)) == 0xFFFFFFFF
                assert await srv.terminate() == 0
                with trio.fail_after(TIMEOUT):
                    await c.wait_disconnected()


async def test_fd_that_is_not_a_socket_is_a_clean_error(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("x")
    with open(path) as f:
        fd = f.fileno()
        with trio.fail_after(TIMEOUT):
            result = await trio.run_process(
                [sys.executable, "-m", "vfiouser_srv", "serve", "edu", "--fd", str(fd)],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                cwd=REPO,
                pass_fds=[fd],
            )
    assert result.returncode == 2
    assert result.stdout == b""
    assert_clean_error(result.stderr, f"fd {fd}")
    # A descriptor number the child does not have at all.
    result = await run_cli("serve", "edu", "--fd", "987")
    assert result.returncode == 2
    assert_clean_error(result.stderr, "fd 987")


# ------------------------------------------------------------------------ serve --config


async def test_config_with_two_devices_and_a_group(tmp_path: Path) -> None:
    a, b = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    config = tmp_path / "devices.toml"
    config.write_text(
        f"""
[[group]]
name = "pair"
policy = "connection"

[[device]]
name = "a"
model = "edu"
socket = "{a}"
group = "pair"

[[device]]
name = "b"
model = "edu"
socket = "{b}"
group = "pair"
options = {{ dma_mask = 0xFFFFFFF }}
"""
    )
    async with cli("serve", "--config", str(config)) as srv:
        assert {await srv.readline(), await srv.readline()} == {f"READY {a}", f"READY {b}"}
        async with open_client(a) as ca:
            assert from_u32(await ca.region_read(BAR0, Reg.ID, 4)) == EDU_ID
            # Both devices are in one group owned per connection: b is refused.
            async with open_client(b, version=False) as cb:
                with pytest.raises(VfioUserError) as info:
                    await cb.version()
                assert info.value.errno == errno.EBUSY
        # a is usable again by a new connection: its VERSION is held until the server has
        # detached the previous client (the reconnect grace), so this needs no waiting.
        await use_edu(a)
        assert await srv.terminate() == 0
    assert not os.path.exists(a) and not os.path.exists(b)


async def test_config_errors_are_clean(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[[device]]\nname = "a"\nmodel = "edu"\n')
    result = await run_cli("serve", "--config", str(config))
    assert result.returncode == 2
    assert_clean_error(result.stderr, "needs name, model and one of socket/fd")


# ------------------------------------------------------------------------ access and limits


def _mode(path: str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _other_gid() -> int:
    """A group we may give a file other than our own (root: any; else a supplementary one)."""
    own = os.getegid()
    if os.geteuid() == 0:
        return next(g.gr_gid for g in grp.getgrall() if g.gr_gid != own)
    return next((g for g in os.getgroups() if g != own), own)


@contextmanager
def _umask(value: int) -> Iterator[None]:
    old = os.umask(value)  # the server process inherits it
    try:
        yield
    finally:
        os.umask(old)


async def _is_refused(path: str) -> bool:
    """Connect and report whether the server closed the connection without a byte."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        s.settimeout(0.5)
        try:
            data = await trio.to_thread.run_sync(s.recv, 1)
        except TimeoutError:
            return False
        assert data == b""
        return True


async def test_serve_socket_is_0600_even_under_umask_000(tmp_path: Path) -> None:
    path = str(tmp_path / "edu.sock")
    with _umask(0):
        async with cli("serve", "edu", "--socket-path", path) as srv:
            assert await srv.readline() == f"READY {path}"
            assert _mode(path) == 0o600
            assert await srv.terminate() == 0


async def test_serve_socket_mode_and_group_options(tmp_path: Path) -> None:
    path = str(tmp_path / "edu.sock")
    gid = _other_gid()
    name = grp.getgrgid(gid).gr_name
    async with cli(
        "serve", "edu", "--socket-path", path, "--socket-mode", "0660", "--socket-group", name
    ) as srv:
        assert await srv.readline() == f"READY {path}"
        st = os.lstat(path)
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, gid)
        await use_edu(path)
        assert await srv.terminate() == 0


async def test_serve_allow_uid_refuses_others_at_accept(tmp_path: Path) -> None:
    path = str(tmp_path / "edu.sock")
    somebody_else = str(os.getuid() + 1)
    async with cli("serve", "edu", "--socket-path", path, "--allow-uid", somebody_else) as srv:
        assert await srv.readline() == f"READY {path}"
        assert await _is_refused(path)
        assert await srv.terminate() == 0
    assert f"refused connection from pid {os.getpid()} uid {os.getuid()}" in srv.stderr.decode()


async def test_serve_max_connections_per_device_option(tmp_path: Path) -> None:
    path = str(tmp_path / "edu.sock")
    async with cli(
        "serve", "edu", "--socket-path", path, "--max-connections-per-device", "1"
    ) as srv:
        assert await srv.readline() == f"READY {path}"
        async with open_client(path) as c:
            assert await _is_refused(path)
            assert from_u32(await c.region_read(BAR0, Reg.ID, 4)) == EDU_ID
        assert await srv.terminate() == 0


def test_limit_options_reach_server_limits(tmp_path: Path) -> None:
    args = make_parser().parse_args(
        [
            "serve",
            "edu",
            "--socket-path",
            str(tmp_path / "edu.sock"),
            "--version-timeout",
            "2.5",
            "--max-version-size",
            "1000",
            "--max-connections-per-device",
            "3",
            "--max-connections",
            "7",
        ]
    )
    server, _ = server_from_args(args)
    server.close()
    assert server.limits == Limits(2.5, 1000, 3, 7)


def test_config_server_table_sets_limits_and_access_with_overrides(tmp_path: Path) -> None:
    a, b = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    gid = _other_gid()
    config = tmp_path / "devices.toml"
    config.write_text(
        f"""
[server]
socket_mode = "0640"
allow_gids = [{os.getgid()}]
version_timeout = 1.5
max_connections = 9

[[device]]
name = "a"
model = "edu"
socket = "{a}"

[[device]]
name = "b"
model = "edu"
socket = "{b}"
socket_mode = 0o660
socket_group = {gid}
allow_uids = [{os.getuid()}]
"""
    )
    args = make_parser().parse_args(
        ["serve", "--config", str(config), "--max-connections", "4", "--allow-gid", "0"]
    )
    server, ready = server_from_args(args)
    try:
        assert ready == [f"READY {a}", f"READY {b}"]
        # the command line overrides [server]; a [[device]] key overrides both
        assert server.limits == Limits(version_timeout=1.5, max_connections=4)
        assert _mode(a) == 0o640
        assert (_mode(b), os.lstat(b).st_gid) == (0o660, gid)
    finally:
        server.close()
    assert not os.path.exists(a) and not os.path.exists(b)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("[server]\nmax_conections = 3\n", "unknown limit(s): max_conections"),
        ("[server]\nmax_connections = -1\n", "max_connections must be positive"),
        ("[server]\nsocket_mode = 600\n", "socket_mode 600 is not a permission mode"),
        ('[server]\nsocket_group = "no-such-group-x"\n', "no group named 'no-such-group-x'"),
        ("[server]\nallow_uids = []\n", "allow_uids is empty"),
    ],
)
async def test_bad_server_table_is_a_clean_error(tmp_path: Path, table: str, message: str) -> None:
    path = tmp_path / "a.sock"
    config = tmp_path / "bad.toml"
    config.write_text(f'{table}[[device]]\nname = "a"\nmodel = "edu"\nsocket = "{path}"\n')
    result = await run_cli("serve", "--config", str(config))
    assert result.returncode == 2
    assert_clean_error(result.stderr, message)
    assert not path.exists()


async def test_misspelt_device_key_is_an_error_not_ignored(tmp_path: Path) -> None:
    path = tmp_path / "a.sock"
    config = tmp_path / "bad.toml"
    config.write_text(
        f'[[device]]\nname = "a"\nmodel = "edu"\nsocket = "{path}"\nallow_uid = [1]\n'
    )
    result = await run_cli("serve", "--config", str(config))
    assert result.returncode == 2
    assert_clean_error(result.stderr, "[[device]] a: unknown key(s) allow_uid")
    assert not path.exists()


async def test_bad_socket_mode_option_is_a_clean_error(tmp_path: Path) -> None:
    path = tmp_path / "edu.sock"
    result = await run_cli("serve", "edu", "--socket-path", str(path), "--socket-mode", "0999")
    assert result.returncode == 2
    assert_clean_error(result.stderr, "socket_mode '0999' is not an octal mode")
    assert not path.exists()


# ------------------------------------------------------------------------ start-up failures


@pytest.mark.parametrize(
    ("make_path", "reason"),
    [
        (lambda tmp: tmp / "missing" / "edu.sock", "does not exist"),
        (lambda tmp: tmp / ("x" * 120 + ".sock"), "a Unix socket path holds at most 107"),
    ],
    ids=["missing-parent", "too-long"],
)
async def test_unusable_socket_path_exits_2_naming_it(
    tmp_path: Path, make_path: Any, reason: str
) -> None:
    path = str(make_path(tmp_path))
    result = await run_cli("serve", "edu", "--socket-path", path)
    assert result.returncode == 2, result.stderr.decode()
    assert result.stdout == b""
    assert_clean_error(result.stderr, path, reason)
    assert len(result.stderr.decode().strip().splitlines()) == 1


@pytest.mark.parametrize("failure", ["missing-parent", "unknown-model"])
async def test_config_failing_on_its_second_device_leaves_no_socket(
    tmp_path: Path, failure: str
) -> None:
    a = tmp_path / "a.sock"
    b = tmp_path / "missing" / "b.sock" if failure == "missing-parent" else tmp_path / "b.sock"
    model = "nosuch" if failure == "unknown-model" else "edu"
    config = tmp_path / "devices.toml"
    config.write_text(
        f'[[device]]\nname = "a"\nmodel = "edu"\nsocket = "{a}"\n'
        f'[[device]]\nname = "b"\nmodel = "{model}"\nsocket = "{b}"\n'
    )
    result = await run_cli("serve", "--config", str(config))
    assert result.returncode == 2
    assert result.stdout == b""
    assert_clean_error(result.stderr, str(b) if failure == "missing-parent" else "nosuch")
    assert not a.exists()
    assert not b.exists()
    assert os.listdir(tmp_path) == ["devices.toml"]


# ------------------------------------------------------------------------ devices / options


async def test_devices_lists_edu_and_its_option() -> None:
    result = await run_cli("devices")
    assert result.returncode == 0, result.stderr.decode()
    text = result.stdout.decode()
    assert re.search(r"^edu: .+", text, re.M), text
    assert re.search(r"^\s+dma_mask=int \(default 268435455\): \S", text, re.M), text


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("bogus=1", "unknown option(s) bogus (accepted: dma_mask)"),
        ("dma_mask=zebra", "bad value 'zebra' for dma_mask (int)"),
        ("dma_mask", "--set expects KEY=VALUE, got 'dma_mask'"),
        ("dma_mask=0", "dma_mask must be a non-zero 64-bit mask"),
    ],
)
async def test_bad_set_exits_2_with_a_clear_message(
    tmp_path: Path, option: str, message: str
) -> None:
    path = tmp_path / "edu.sock"
    result = await run_cli("serve", "edu", "--socket-path", str(path), "--set", option)
    assert result.returncode == 2
    assert result.stdout == b""  # no READY
    assert_clean_error(result.stderr, message)
    assert not path.exists()


async def test_unknown_model_and_missing_socket_are_clean_errors(tmp_path: Path) -> None:
    result = await run_cli("serve", "nosuch", "--socket-path", str(tmp_path / "x.sock"))
    assert result.returncode == 2
    assert_clean_error(result.stderr, "unknown device model 'nosuch' (known: ", "edu")
    result = await run_cli("serve", "edu")
    assert result.returncode == 2
    assert_clean_error(result.stderr, "exactly one of --socket-path and --fd")


async def test_engine_libvfio_user_fails_with_a_clear_message(tmp_path: Path) -> None:
    try:
        load_engine("libvfio-user")
    except EngineUnavailable:
        pass
    else:
        pytest.skip("the libvfio-user engine is available here (tests/engines covers it)")
    path = tmp_path / "edu.sock"
    result = await run_cli("serve", "edu", "--socket-path", str(path), "--engine", "libvfio-user")
    assert result.returncode == 2
    assert result.stdout == b""  # no READY: it must not fall back to the Python engine
    assert_clean_error(result.stderr, "libvfio-user")
    assert not path.exists()


# ------------------------------------------------------------------------ -v


WIRE = re.compile(
    r"vfiouser_srv\.wire: .*? <- id=(?P<id>\d+) (?P<cmd>[A-Z_]+) .*?"
    r"size=(?P<size>\d+) flags=(?P<flags>0x[0-9a-f]+) fds=(?P<fds>\d+)"
)


async def test_verbose_logs_one_line_per_message(tmp_path: Path) -> None:
    path = str(tmp_path / "edu.sock")
    async with cli("-v", "serve", "edu", "--socket-path", path) as srv:
        assert await srv.readline() == f"READY {path}"
        async with open_client(path) as c:  # id 0: VERSION
            await c.device_get_info()  # 1
            await c.region_read(BAR0, Reg.ID, 4)  # 2
            await c.region_write(BAR0, Reg.LIVENESS, u32(1), posted=True)  # 3
            await c.memory.add_ram(0, 0x1000)  # 4: DMA_MAP with the memfd
            with make_eventfd() as efd:
                await c.set_irq_eventfds(IrqIndex.INTX, 0, [efd])  # 5
            with pytest.raises(VfioUserError):
                await c.region_read(BAR0, 1 << 20, 4)  # 6: past the end, EINVAL
            await c.region_read(BAR0, Reg.LIVENESS, 4)  # 7
        assert await srv.terminate() == 0
    lines = [m for m in map(WIRE.search, srv.stderr.decode().splitlines()) if m]
    seen = [
        (int(m["id"]), m["cmd"], int(m["size"]), int(m["flags"], 16), int(m["fds"])) for m in lines
    ]
    version_size = seen[0][2] if seen else 0
    assert seen == [
        (0, "VERSION", version_size, 0, 0),
        (1, "DEVICE_GET_INFO", 32, 0, 0),
        (2, "REGION_READ", 32, 0, 0),
        (3, "REGION_WRITE", 36, 0x10, 0),
        (4, "DMA_MAP", 48, 0, 1),
        (5, "DEVICE_SET_IRQS", 36, 0, 1),
        (6, "REGION_READ", 32, 0, 0),
        (7, "REGION_READ", 32, 0, 0),
    ], srv.stderr.decode()
    assert version_size > 20


async def test_without_v_nothing_is_logged_per_message(tmp_path: Path) -> None:
    path = str(tmp_path / "edu.sock")
    async with cli("serve", "edu", "--socket-path", path) as srv:
        assert await srv.readline() == f"READY {path}"
        await use_edu(path)
        assert await srv.terminate() == 0
    assert "vfiouser_srv.wire" not in srv.stderr.decode()

"""Run our server and a QEMU guest together, stream the console, and collect results.

Why trio subprocesses and not a shell script: a run must end with *both* processes gone
whatever happens (timeout, test failure, Ctrl-C), the console must be read while QEMU runs
(the test may need to act on a ``STAGE`` line, e.g. kill the server mid-run), and the boot
time is measured from QEMU's start to its exit. Every run gets a folder holding the console
log, QEMU's stderr, the server log, the trace file and the exact command lines.

Resource handling: every process started here is terminated (SIGTERM, then SIGKILL after a
grace period) in a ``finally`` under a shielded cancel scope, so cancellation cannot leak one.

Console protocol (see :mod:`.guest`): ``VFIOUSER-GUEST: BOOTED|TEST-BEGIN|TEST-END rc=N|
POWEROFF`` from ``/init``; ``RESULT key=value``, ``INFO ...`` and ``STAGE name`` from tests.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import trio

from .configs import ConfigFile, QemuConfig, load_configs
from .guest import MARKER, GuestImage, write_initramfs
from .provision import CacheLayout, QemuCommand, find_guest, find_qemu

__all__ = [
    "LaunchError",
    "RunResult",
    "ServerHandle",
    "hotplug_args",
    "new_run_dir",
    "run_config",
    "run_guest",
    "serve_device",
]

TERM_GRACE = 5.0
"""Seconds between SIGTERM and SIGKILL when stopping a process."""
KEEP_RUNS = 30
"""Run folders kept in the cache (older ones are pruned)."""

LineCallback = Callable[[str], Awaitable[None] | None]


class LaunchError(RuntimeError):
    """A process could not be started or did not become ready; the message says why."""


# --- run folders ------------------------------------------------------------------------------


def _prune_runs(runs: Path, keep: int) -> None:
    old = sorted((p for p in runs.iterdir() if p.is_dir()), key=lambda p: p.name)[:-keep]
    for p in old:
        shutil.rmtree(p, ignore_errors=True)


async def new_run_dir(label: str, cache: str | os.PathLike[str] | None = None) -> Path:
    """A fresh ``runs/<timestamp>-<label>-<n>/`` folder in the cache; old runs are pruned."""
    runs = CacheLayout.at(cache).runs

    def make() -> Path:
        runs.mkdir(parents=True, exist_ok=True)
        _prune_runs(runs, KEEP_RUNS)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        return Path(tempfile.mkdtemp(prefix=f"{stamp}-{label}-", dir=runs))

    return await trio.to_thread.run_sync(make)


def _socket_path(run_dir: Path) -> Path:
    """``run_dir/vfu.sock``, or a short /tmp path when that would exceed sun_path's limit."""
    path = run_dir / "vfu.sock"
    if len(os.fsencode(path)) < 100:
        return path
    return Path(tempfile.mkdtemp(prefix="vfu-")) / "vfu.sock"


async def _open_for_write(path: Path) -> IO[bytes]:
    return await trio.to_thread.run_sync(path.open, "wb")


async def _stop_process(proc: trio.Process, grace: float = TERM_GRACE) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; always reaps. Never cancelled."""
    with trio.CancelScope(shield=True):
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            with trio.move_on_after(grace):
                await proc.wait()
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await proc.wait()


async def _write_text(path: Path, text: str) -> None:
    await trio.to_thread.run_sync(path.write_text, text)


# --- the server --------------------------------------------------------------------------------


@dataclass
class ServerHandle:
    """A running ``python -m vfiouser_srv serve`` process."""

    device: str
    socket_path: Path
    process: trio.Process
    log_path: Path
    argv: list[str]

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send a signal now (e.g. SIGKILL to simulate a crash); does not wait."""
        if self.process.returncode is None:
            self.process.send_signal(sig)

    async def wait(self) -> int:
        return await self.process.wait()

    async def stop(self, grace: float = TERM_GRACE) -> int:
        """SIGTERM, then SIGKILL after ``grace`` seconds; returns the exit status."""
        await _stop_process(self.process, grace)
        return self.process.returncode if self.process.returncode is not None else -1


async def _probe_connect(path: Path) -> bool:
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        await sock.connect(os.fspath(path))
    except OSError:
        return False
    finally:
        sock.close()
    return True


def server_argv(device: str, socket_path: Path, sets: Sequence[str] = (),
                python: str | None = None) -> list[str]:
    """The server command line (the CLI contract of ``vfiouser_srv serve``)."""
    argv = [python or sys.executable, "-m", "vfiouser_srv", "serve", device,
            "--socket-path", os.fspath(socket_path)]
    for s in sets:
        argv += ["--set", s]
    return argv


@contextlib.asynccontextmanager
async def serve_device(
    device: str,
    socket_path: Path,
    *,
    run_dir: Path,
    sets: Sequence[str] = (),
    ready_timeout: float = 30.0,
    probe_connect: bool = True,
    python: str | None = None,
    log_name: str = "server.log",
    extra_args: Sequence[str] = (),
) -> AsyncIterator[ServerHandle]:
    """Start our server for ``device`` on ``socket_path`` and yield once it is ready.

    Ready means: it printed ``READY <socket path>`` on stdout, the socket file exists and
    (unless ``probe_connect`` is false) accepts a connection; QEMU exits at start when nothing
    listens, so this must hold before QEMU starts. The server's stdout and stderr go to
    ``run_dir/<log_name>``. On exit the server gets SIGTERM, then SIGKILL. ``extra_args``
    go to ``serve`` (e.g. ``["--control", PATH]`` for the control socket).

    Error handling: :class:`LaunchError` (with the log's tail) if the server exits or is not
    ready within ``ready_timeout`` seconds.
    """
    argv = [*server_argv(device, socket_path, sets, python), *extra_args]
    log_path = run_dir / log_name
    if socket_path.is_socket():
        socket_path.unlink()  # a stale socket from a killed server; the path is ours
    log = await _open_for_write(log_path)
    try:
        log.write(("$ " + shlex.join(argv) + "\n").encode())
        log.flush()
        proc = await trio.lowlevel.open_process(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
        )
    except BaseException:
        log.close()
        raise
    handle = ServerHandle(device, socket_path, proc, log_path, argv)
    try:
        async with trio.open_nursery() as nursery:
            ready = trio.Event()
            nursery.start_soon(_drain_server_stdout, proc, log, socket_path, ready)
            with trio.move_on_after(ready_timeout) as cs:
                while not ready.is_set():
                    if proc.returncode is not None:
                        break
                    await trio.sleep(0.05)
                while proc.returncode is None and not socket_path.exists():
                    await trio.sleep(0.05)
                while probe_connect and proc.returncode is None \
                        and not await _probe_connect(socket_path):
                    await trio.sleep(0.05)
            if proc.poll() is not None or cs.cancelled_caught or not ready.is_set():
                await _stop_process(proc)
                tail = await trio.to_thread.run_sync(_tail_file, log_path)
                why = (f"exited with status {proc.returncode}" if not cs.cancelled_caught
                       else f"not ready within {ready_timeout:.0f} s")
                raise LaunchError(
                    f"server `{shlex.join(argv)}` {why} (expected `READY {socket_path}` on "
                    f"stdout and a listening socket). Log {log_path}:\n{tail}"
                )
            try:
                yield handle
            finally:
                await _stop_process(proc)
                nursery.cancel_scope.cancel()
    finally:
        await _stop_process(proc)
        log.close()


async def _drain_server_stdout(proc: trio.Process, log: IO[bytes], socket_path: Path,
                               ready: trio.Event) -> None:
    """Copy the server's stdout to its log (a full pipe would stall it) and spot READY."""
    assert proc.stdout is not None
    buf = b""
    want = f"READY {os.fspath(socket_path)}".encode()
    async for chunk in _chunks(proc.stdout):
        await trio.to_thread.run_sync(_write_flush, log, chunk)
        if not ready.is_set():
            buf += chunk
            if any(line.strip() == want for line in buf.split(b"\n")):
                ready.set()


def _write_flush(f: IO[bytes], data: bytes) -> None:
    f.write(data)
    f.flush()


async def _chunks(stream: trio.abc.ReceiveStream) -> AsyncIterator[bytes]:
    while True:
        try:
            chunk = await stream.receive_some(65536)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return
        if not chunk:
            return
        yield bytes(chunk)


def _tail_file(path: Path, n: int = 30) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:])


# --- QEMU --------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """What one guest run produced."""

    config: str
    run_dir: Path
    qemu_argv: list[str]
    returncode: int | None = None
    timed_out: bool = False
    console: list[str] = field(default_factory=list)
    results: list[tuple[str, str]] = field(default_factory=list)
    """``RESULT key=value`` lines as (key, value), in order."""
    booted: bool = False
    test_rc: int | None = None
    powered_off: bool = False
    boot_seconds: float | None = None
    """QEMU start -> the guest's ``BOOTED`` marker (init running)."""
    wall_seconds: float = 0.0
    """QEMU start -> QEMU exit (for a guest that powers off: the whole boot-test-poweroff)."""
    trace_path: Path | None = None

    @property
    def ok(self) -> bool:
        """QEMU exited by itself with status 0 after the guest ran its test successfully."""
        return (not self.timed_out and self.returncode == 0 and self.powered_off
                and self.test_rc in (0, None))

    @property
    def result_lines(self) -> list[str]:
        return [f"RESULT {k}={v}" for k, v in self.results]

    @property
    def result_dict(self) -> dict[str, str]:
        return dict(self.results)

    @property
    def console_path(self) -> Path:
        return self.run_dir / "console.log"

    @property
    def stderr_path(self) -> Path:
        return self.run_dir / "qemu.stderr"

    def summary(self) -> str:
        boot = f"{self.boot_seconds:.2f}s" if self.boot_seconds is not None else "n/a"
        state = "ok" if self.ok else ("TIMEOUT" if self.timed_out else "FAILED")
        return (f"{self.config}: {state}; qemu exit {self.returncode}, test rc {self.test_rc}, "
                f"init after {boot}, QEMU start->exit {self.wall_seconds:.2f}s; "
                f"logs in {self.run_dir}")


_RESULT = re.compile(r"^RESULT (\S+?)=(.*)$")


def results_of(lines: Iterable[str]) -> dict[str, str]:
    """The ``RESULT key=value`` lines among console `lines`, as a dict (a test that watches
    the console itself, through ``on_line``, reads them with the launcher's own rule)."""
    return {m.group(1): m.group(2) for line in lines if (m := _RESULT.match(line))}


def _parse_line(line: str, result: RunResult, now: float) -> None:
    if line.startswith(MARKER):
        body = line[len(MARKER):].strip()
        if body.startswith("BOOTED"):
            result.booted = True
            result.boot_seconds = now
        elif body.startswith("TEST-END"):
            m = re.search(r"rc=(\d+)", body)
            result.test_rc = int(m.group(1)) if m else None
        elif body.startswith("POWEROFF"):
            result.powered_off = True
        return
    m = _RESULT.match(line)
    if m:
        result.results.append((m.group(1), m.group(2)))


def guest_append(cf: ConfigFile, config: QemuConfig, guest_env: Mapping[str, str],
                 append_extra: Sequence[str]) -> str:
    """The kernel command line: defaults, ``vfu_modules``, ``vfu_<k>=<v>`` words, extras."""
    words = cf.defaults.get("append", "console=ttyS0 panic=-1 quiet").split()
    env = dict(guest_env)
    if config.modules and "modules" not in env:
        env["modules"] = config.modules
    for key, val in env.items():
        if not re.fullmatch(r"[A-Za-z0-9_]+", key) or not val or re.search(r"\s", val):
            raise ValueError(f"guest env {key}={val!r}: need a word key and a non-empty, "
                             "space-free value (it travels on the kernel command line)")
        words.append(f"vfu_{key}={val}")
    return " ".join([*words, *append_extra])


async def run_guest(
    config: str | QemuConfig,
    *,
    cache: str | os.PathLike[str] | None = None,
    configs: ConfigFile | None = None,
    test: Path | bytes | None = None,
    socket_path: Path | None = None,
    accel: str | None = None,
    mem: str | None = None,
    guest_env: Mapping[str, str] | None = None,
    append_extra: Sequence[str] = (),
    extra_qemu_args: Sequence[str] = (),
    root_ports: int = 0,
    qmp_socket: Path | None = None,
    placeholders: Mapping[str, str] | None = None,
    trace: bool = False,
    timeout: float = 120.0,
    run_dir: Path | None = None,
    echo: bool | Callable[[str], None] = False,
    on_line: LineCallback | None = None,
    qemu: QemuCommand | None = None,
    guest: GuestImage | None = None,
) -> RunResult:
    """Boot one guest with ``config`` and wait until QEMU exits or ``timeout`` expires.

    ``test`` is the guest script (a path or its bytes; default: the config's ``test``;
    ``b""`` for none). ``socket_path`` is where a server already listens (configs with the
    ``vfio-user`` device need one; :func:`run_config` starts the server for you).
    ``guest_env`` entries become ``vfu_<key>=<value>`` kernel words, i.e. environment variables
    of the guest's init and test. ``on_line`` sees every console line (CR stripped) as it
    arrives; ``echo`` prints them (or passes them to a callable). ``placeholders`` fills
    device-specific ``@NAME@`` words of ``configs.toml`` (e.g. ``DISK``, ``TAP``).
    ``root_ports`` free PCIe root ports (``hp0``, ``hp1``, ...) and a QMP server on
    ``qmp_socket`` let a test hot-plug devices (:func:`hotplug_args`, :mod:`.qmp`).

    Never raises for a failing guest: inspect :class:`RunResult` (``ok``, ``results``).
    Raises :class:`~.provision.ProvisionError` if QEMU or the guest image is missing.
    """
    cf = configs or load_configs()
    cfg = cf.get(config) if isinstance(config, str) else config
    if qemu is None:
        qemu = await trio.to_thread.run_sync(find_qemu, cache)
    if guest is None:
        guest = await trio.to_thread.run_sync(find_guest, cache)
    run_dir = run_dir or await new_run_dir(cfg.name, cache)
    if cfg.uses_socket and socket_path is None:
        raise ValueError(f"config {cfg.name!r} needs socket_path (a listening server)")

    if test is None:
        test = cf.guest_dir / cfg.test if cfg.test else b""
    script = test if isinstance(test, bytes) else await trio.to_thread.run_sync(test.read_bytes)
    initrd = run_dir / "initrd.cpio.gz"
    files = {"test.sh": script} if script else {}
    await trio.to_thread.run_sync(write_initramfs, guest.initramfs, files, initrd)

    trace_path = run_dir / "qemu-trace.log" if trace else None
    values = {
        "KERNEL": os.fspath(guest.kernel),
        "INITRD": os.fspath(initrd),
        "APPEND": guest_append(cf, cfg, guest_env or {}, append_extra),
        "SOCKET": os.fspath(socket_path) if socket_path else "@SOCKET@",
        "TRACE": os.fspath(trace_path) if trace_path else "@TRACE@",
        **(placeholders or {}),
    }
    argv = [*qemu.argv, *cf.qemu_args(cfg, accel=accel, mem=mem, values=values, trace=trace),
            *hotplug_args(root_ports, qmp_socket), *extra_qemu_args]
    result = RunResult(cfg.name, run_dir, argv, trace_path=trace_path)
    await _write_text(run_dir / "qemu.cmd",
                      "".join(f"{k}={shlex.quote(v)} " for k, v in qemu.env.items())
                      + shlex.join(argv) + "\n")

    echo_fn: Callable[[str], None] | None
    echo_fn = (lambda s: print(s, flush=True)) if echo is True else (echo or None)
    stderr = await _open_for_write(result.stderr_path)
    console = await _open_for_write(result.console_path)
    proc: trio.Process | None = None
    t0 = trio.current_time()
    try:
        proc = await trio.lowlevel.open_process(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr,
            env={**os.environ, **qemu.env},
        )
        assert proc.stdout is not None
        with trio.move_on_after(timeout) as cs:
            pending = b""
            async for chunk in _chunks(proc.stdout):
                await trio.to_thread.run_sync(_write_flush, console, chunk)
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for raw in lines:
                    line = raw.decode(errors="replace").rstrip("\r")
                    result.console.append(line)
                    _parse_line(line, result, trio.current_time() - t0)
                    if echo_fn:
                        echo_fn(line)
                    if on_line:
                        ret = on_line(line)
                        if ret is not None:
                            await ret
            if pending:
                line = pending.decode(errors="replace").rstrip("\r")
                result.console.append(line)
                _parse_line(line, result, trio.current_time() - t0)
            await proc.wait()
        result.timed_out = cs.cancelled_caught
    finally:
        if proc is not None:
            await _stop_process(proc)
            result.returncode = proc.returncode
        result.wall_seconds = trio.current_time() - t0
        stderr.close()
        console.close()
    return result


def hotplug_args(root_ports: int, qmp_socket: Path | None) -> list[str]:
    """QEMU arguments for ``root_ports`` empty PCIe root ports ``hp0``.. (native hot-plug
    slots: chassis 10+, slot addresses 0x10+ on pcie.0, clear of the configs' ``rp0``) and a
    QMP server on ``qmp_socket`` that does not wait for a client."""
    argv: list[str] = []
    for i in range(root_ports):
        argv += ["-device", f"pcie-root-port,id=hp{i},bus=pcie.0,chassis={10 + i},"
                 f"addr={0x10 + i:#x}"]
    if qmp_socket is not None:
        argv += ["-qmp", f"unix:{os.fspath(qmp_socket)},server=on,wait=off"]
    return argv


@dataclass
class ConfigRun:
    """:func:`run_config`'s answer: the guest run plus the server that served it (if any)."""

    guest: RunResult
    server_log: Path | None
    server_returncode: int | None


async def run_config(
    config: str,
    *,
    cache: str | os.PathLike[str] | None = None,
    configs: ConfigFile | None = None,
    server_sets: Sequence[str] = (),
    socket_path: Path | None = None,
    server_model: str | None = None,
    **kwargs: object,
) -> ConfigRun:
    """Run ``config`` end to end: start its server (if it has one and no ``socket_path`` of an
    already running server is given), boot the guest, stop the server.

    ``server_model`` replaces the configuration's ``server`` model (a name, ``FILE.py:CLASS``
    or ``MODULE:CLASS``; a relative file is taken from our working directory).

    Other keyword arguments go to :func:`run_guest`.
    """
    cf = configs or load_configs()
    cfg = cf.get(config)
    run_dir = await new_run_dir(cfg.name, cache)
    model = _absolute_model(server_model) if server_model else cfg.server
    if not cfg.uses_socket or socket_path is not None or model is None:
        res = await run_guest(cfg, cache=cache, configs=cf, run_dir=run_dir,
                              socket_path=socket_path, **kwargs)  # type: ignore[arg-type]
        return ConfigRun(res, None, None)
    sock = _socket_path(run_dir)
    async with serve_device(model, sock, run_dir=run_dir, sets=server_sets) as server:
        res = await run_guest(cfg, cache=cache, configs=cf, run_dir=run_dir,
                              socket_path=sock, **kwargs)  # type: ignore[arg-type]
        code = await server.stop()
    return ConfigRun(res, server.log_path, code)


def _absolute_model(model: str) -> str:
    """``./mydev.py:CLASS`` with an absolute file, so the server finds it from any folder."""
    where, sep, attr = model.rpartition(":")
    if sep and (where.endswith(".py") or "/" in where):
        return f"{Path(where).expanduser().resolve()}:{attr}"
    return model

"""libvfio-user's own sample client (`samples/client.c`, unmodified) against our model of its
sample server (`vfiouser-srv serve libvfio-user-sample`): VERSION, region and IRQ info, DMA
maps, dirty-page logging, a BAR0 alarm with DMA, and a migration to a second server that the
client starts itself as `dirname(argv[0])/server -v SOCK`.

client.c forks for that second server and *execs it in the parent*: the process we start
becomes the destination server, and the client carries on as its child. Its exit status is
then only visible to whoever reaps it, so the test makes itself a child subreaper for the
run: once the client is a zombie, stopping the destination server hands the zombie to us.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

PR_SET_CHILD_SUBREAPER = 36
#: the alarm the client sets before migrating fires 10 s later, on the destination
TIMEOUT = 60.0


def sample_client() -> str | None:
    for base in (os.environ.get("LIBVFIO_USER_SAMPLES"), "/tmp/lvu/build/samples"):
        if base and os.access(os.path.join(base, "client"), os.X_OK):
            return os.path.join(base, "client")
    return None


CLIENT = sample_client()
pytestmark = pytest.mark.skipif(
    CLIENT is None,
    reason="libvfio-user's samples/client is not built: set LIBVFIO_USER_SAMPLES=/path/to/"
    "build/samples (libvfio-user is in no package registry; see README, 'Two engines')",
)

# The destination server: listen first, then make the socket appear (client.c connects the
# moment the path exists, so it must never see a bound socket that does not listen yet).
WRAPPER = (
    "#!{python}\n"
    "import os, socket, sys; p = sys.argv[-1]; s = socket.socket(socket.AF_UNIX); "
    "s.bind(p + '.new'); s.listen(); os.rename(p + '.new', p); "
    "os.set_inheritable(s.fileno(), True); os.execv(sys.executable, [sys.executable, '-m', "
    "'vfiouser_srv', 'serve', 'libvfio-user-sample', '--fd', str(s.fileno())])\n"
)


def _subreaper(on: bool) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(x) for x in text.split()]


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return "?"


def test_sample_client_runs_its_whole_script(tmp_path: Path) -> None:
    assert CLIENT is not None
    workdir = Path("/tmp") / f"lvu{os.getpid()}"  # short: a socket path holds 107 bytes
    workdir.mkdir()
    source: subprocess.Popen[bytes] | None = None
    try:
        shutil.copy(CLIENT, workdir / "client")
        server = workdir / "server"
        server.write_text(WRAPPER.format(python=sys.executable))
        server.chmod(0o755)
        sock = str(workdir / "s")
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
        with open(tmp_path / "source.log", "wb") as log:
            source = subprocess.Popen(
                [sys.executable, "-m", "vfiouser_srv", "serve", "libvfio-user-sample",
                 "--socket-path", sock],
                stdout=subprocess.PIPE, stderr=log, env=env,
            )
        assert source.stdout is not None
        assert source.stdout.readline().startswith(b"READY"), (tmp_path / "source.log").read_text()
        _subreaper(True)
        try:
            status = _run_client(workdir, sock, tmp_path, env)
        finally:
            _subreaper(False)
        output = (tmp_path / "client.out").read_text(errors="replace")
        assert status == 0, f"client exit status {status}:\n{output}\n" + (
            tmp_path / "dest.log").read_text(errors="replace")[-4000:]
        assert "client: INTx triggered!" in output and "CRC mismatch" not in output
    finally:
        if source is not None:
            source.send_signal(signal.SIGTERM)
            source.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


def _run_client(workdir: Path, sock: str, tmp_path: Path, env: dict[str, str]) -> int:
    """Run client.c; return its exit status (reaped from the destination server it forked)."""
    with open(tmp_path / "client.out", "wb") as out, open(tmp_path / "dest.log", "wb") as err:
        proc = subprocess.Popen([str(workdir / "client"), sock], stdout=out, stderr=err, env=env)
        deadline = time.monotonic() + TIMEOUT
        client = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:  # failed before forking the destination
                return proc.returncode
            kids = _children(proc.pid)
            if kids:
                client = kids[0]
                if _state(client) == "Z":
                    break
            time.sleep(0.05)
        else:
            proc.kill()
            proc.wait()
            pytest.fail("client.c did not finish in time")
        proc.send_signal(signal.SIGTERM)  # the destination server; its zombie child is ours
        proc.wait(10)
        assert client is not None
        _, status = os.waitpid(client, 0)
        return os.waitstatus_to_exitcode(status)

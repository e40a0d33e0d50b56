"""pytest fixtures for device authors: serve a model, drive it with a client, boot a guest.

Registered through the ``pytest11`` entry point, so ``pip install vfiouser-srv`` makes these
fixtures available in any repository (``-p no:vfiouser_srv`` turns them off):

* ``vfu_model``: the model under test; **override it** (in a ``conftest.py`` or a test module)
  to return a model class, a built-in name (``"edu"``) or a reference (``"./dev.py:Cls"``);
* ``vfu_server`` (async, pytest-trio): the model served in-process on a socket in
  ``tmp_path`` (:class:`InProcessServer`: ``.device`` is the live model instance);
* ``vfu_server_process`` (async): the model served by ``python -m vfiouser_srv serve`` in a
  subprocess (:class:`~vfiouser_srv.qemu.launcher.ServerHandle`);
* ``vfu_client`` (async): a :class:`vfiouser_srv.client.Client` connected to ``vfu_server``
  with :data:`RAM_SIZE` bytes of shared guest RAM at :data:`RAM_BASE`;
* ``vfu_guest`` (sync): :class:`GuestRunner`; ``vfu_guest.run(["cmd", ...])`` boots the
  provisioned QEMU guest with the model attached, runs each command in the guest's shell and
  returns their output (:class:`GuestRun`); ``await vfu_guest.arun(...)`` from a trio test;
* ``vfu_qemu_ready`` (session): the QEMU cache check behind ``vfu_guest``.

Skip policy (``vfu_qemu_ready``): with the cache missing, a test is skipped with the reason
and the command to run outside CI; in CI (``CI=true``) the session provisions the cache
itself and any failure fails the test, so a broken CI image never looks green.
``VFIOUSER_SRV_AUTO_SETUP=1`` provisions outside CI too.

Imports of the server and the launcher are deferred to the fixtures, so loading the plugin
costs a test run that does not use it nothing.
"""

from __future__ import annotations

import inspect
import os
import re
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from devices.sdk.interface import DeviceModel
    from vfiouser_srv.client import Client
    from vfiouser_srv.qemu import RunResult, ServerHandle
    from vfiouser_srv.server import Server

__all__ = [
    "GUEST_PRELUDE",
    "RAM_BASE",
    "RAM_SIZE",
    "GuestCommand",
    "GuestRun",
    "GuestRunner",
    "InProcessServer",
    "in_ci",
    "model_reference",
]

#: where ``vfu_client``'s guest RAM starts, and its size
RAM_BASE = 0x100000
RAM_SIZE = 0x100000

def in_ci() -> bool:
    """``CI`` is set to something true (GitHub Actions, GitLab and others set ``CI=true``)."""
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "qemu: boots a real QEMU with a Linux guest (needs the provisioned cache)")


# --- the model ---------------------------------------------------------------------------------


def model_reference(model: type[DeviceModel] | str) -> str:
    """What ``vfiouser-srv serve`` accepts for ``model``: a name or reference as it is, a
    class as ``/abs/path/file.py:Class`` (its defining file, found from any folder)."""
    if isinstance(model, str):
        if ":" in model:
            where, _, attr = model.rpartition(":")
            if where.endswith(".py") or "/" in where:
                return f"{Path(where).expanduser().resolve()}:{attr}"
        return model
    module = inspect.getmodule(model)
    src = inspect.getsourcefile(model)
    if module is not None and module.__name__ not in ("__main__",) and src is None:
        return f"{module.__name__}:{model.__qualname__}"
    if src is None:
        raise ValueError(f"{model!r}: cannot find the file that defines it")
    return f"{Path(src).resolve()}:{model.__qualname__}"


def _build(model: type[DeviceModel] | str, options: Mapping[str, str]) -> DeviceModel:
    """An instance of ``model`` with ``options`` parsed as ``--set`` would parse them."""
    from devices.registry import resolve
    from devices.sdk.options import OptionError, parse_options

    cls = resolve(model) if isinstance(model, str) else model
    kwargs = parse_options(cls.name, cls.options, options)
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise OptionError(f"{cls.name}: {exc}") from None


def _need(model: type[DeviceModel] | str | None) -> type[DeviceModel] | str:
    if model is None:
        pytest.fail("the vfu_* fixtures need the model under test: define a `vfu_model` "
                    "fixture returning its class or `FILE.py:CLASS` (vfiouser_srv.pytest_plugin)")
    return model


@pytest.fixture
def vfu_model() -> type[DeviceModel] | str | None:
    """The model under test; none by default. Override this fixture: ``return CopyEngine``
    (a class), ``"edu"`` (a served name) or ``"./mydev.py:MyDev"`` (a file or module)."""
    return None


@pytest.fixture
def vfu_options() -> Mapping[str, str]:
    """The model's options (``--set key=value``); override to pass some."""
    return {}


def _sets(options: Mapping[str, str]) -> list[str]:
    return [f"{k}={v}" for k, v in options.items()]


def _short_socket(tmp_path: Path, name: str) -> Path:
    """``tmp_path/name``, or a short /tmp path when that would exceed sun_path's limit."""
    path = tmp_path / name
    if len(os.fsencode(path)) < 100:
        return path
    return Path(tempfile.mkdtemp(prefix="vfu-")) / name


# --- in-process and subprocess servers ----------------------------------------------------------


@dataclass
class InProcessServer:
    """A model served in this process (``vfu_server``)."""

    server: Server
    device: DeviceModel
    socket_path: Path


@pytest.fixture
async def vfu_server(vfu_model: type[DeviceModel] | str | None, vfu_options: Mapping[str, str],
                     tmp_path: Path) -> AsyncIterator[InProcessServer]:
    """Serve a fresh instance of ``vfu_model`` in-process until the test ends."""
    import trio

    from vfiouser_srv.server import Server

    device = _build(_need(vfu_model), vfu_options)
    sock = _short_socket(tmp_path, "vfu.sock")
    server = Server()
    server.add_device(device.name or "dev", device, socket_path=str(sock))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        yield InProcessServer(server, device, sock)
        nursery.cancel_scope.cancel()


@pytest.fixture
async def vfu_client(vfu_server: InProcessServer) -> AsyncIterator[Client]:
    """A client connected to ``vfu_server``, with shared guest RAM at ``RAM_BASE``."""
    from vfiouser_srv.client import open_client

    async with open_client(str(vfu_server.socket_path)) as client:
        await client.memory.add_ram(RAM_BASE, RAM_SIZE, shared=True)
        yield client


@pytest.fixture
async def vfu_server_process(vfu_model: type[DeviceModel] | str | None,
                             vfu_options: Mapping[str, str],
                             tmp_path: Path) -> AsyncIterator[ServerHandle]:
    """``vfu_model`` served by ``python -m vfiouser_srv serve`` in a subprocess; its log is
    ``tmp_path/server.log``. Stopped (SIGTERM, then SIGKILL) when the test ends."""
    from vfiouser_srv.qemu import serve_device

    sock = _short_socket(tmp_path, "vfu.sock")
    async with serve_device(model_reference(_need(vfu_model)), sock, run_dir=tmp_path,
                            sets=_sets(vfu_options)) as handle:
        yield handle


# --- the guest -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def vfu_qemu_ready() -> None:
    """Make sure QEMU and the guest are provisioned (see the module docstring)."""
    from vfiouser_srv.qemu import ProvisionError, is_provisioned, provision

    ready, reason = is_provisioned()
    if ready:
        return
    if in_ci() or os.environ.get("VFIOUSER_SRV_AUTO_SETUP") == "1":
        try:
            provision(log=lambda m: print(f"setup: {m}"))
        except ProvisionError as exc:
            pytest.fail(f"provisioning failed in CI: {exc}")
        ready, reason = is_provisioned()
        if not ready:
            pytest.fail(f"provisioned, yet not ready: {reason}")
        return
    pytest.skip(f"QEMU guest cache not provisioned ({reason}); run `vfiouser-srv qemu setup` "
                "(CI=true provisions automatically)")


#: Shell functions every ``vfu_guest`` command can use (the guest is busybox):
#: ``vfu_find VENDOR DEVICE`` sets ``DEV`` (the sysfs folder) and ``BAR0`` (its address);
#: ``vfu_enable`` turns on memory space and bus mastering; ``bar_rd OFF [WIDTH]`` and
#: ``bar_wr OFF VALUE [WIDTH]`` access BAR0 (``devmem``, default 32 bits);
#: ``uio_bind`` binds ``uio_pci_generic`` (INTx) and ``irq_count`` prints its interrupt
#: count from /proc/interrupts, ``wait_irq [N]`` waits up to 5 s for N (default 1) interrupts
#: and prints the count; ``DMA_PAGE`` is a RAM page reserved for device DMA (the
#: kernel command line's ``memmap=8K$0xf000000``: two pages, at DMA_PAGE and +0x1000), read
#: and written with ``devmem``.
GUEST_PRELUDE = r"""
DMA_PAGE=$((0xf000000))
vfu_find() {
    DEV=""
    for d in /sys/bus/pci/devices/*; do
        if [ "$(cat "$d/vendor")" = "$1" ] && [ "$(cat "$d/device")" = "$2" ]; then DEV=$d; fi
    done
    [ -n "$DEV" ] || { echo "no PCI device $1:$2"; return 1; }
    set -- $(head -n 1 "$DEV/resource")
    BAR0=$(($1))
}
cfg_rd16() { hexdump -s "$1" -n 2 -e '1/2 "%04x"' "$DEV/config"; }
cfg_wr16() {
    v=$(($2))
    printf "\\$(printf %03o $((v & 0xff)))\\$(printf %03o $((v >> 8)))" |
        dd of="$DEV/config" bs=2 seek=$(($1 / 2)) count=1 conv=notrunc 2>/dev/null
}
vfu_enable() {
    [ "$(cat "$DEV/enable")" = 0 ] && echo 1 > "$DEV/enable"
    cfg_wr16 4 $((0x$(cfg_rd16 4) | 0x6))
}
bar_rd() { devmem $((BAR0 + $1)) "${2:-32}"; }
bar_wr() { devmem $((BAR0 + $1)) "${3:-32}" $(($2)); }
uio_bind() {
    modprobe uio_pci_generic 2>/dev/null
    echo "$(cat "$DEV/vendor") $(cat "$DEV/device")" > /sys/bus/pci/drivers/uio_pci_generic/new_id
    vfu_enable
}
irq_count() {
    awk '/uio_pci_generic/ { n = 0; for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) n += $i;
         print n; found = 1 } END { if (!found) print 0 }' /proc/interrupts
}
wait_irq() {
    i=0
    while [ "$(irq_count)" -lt "${1:-1}" ] && [ $i -lt 50 ]; do usleep 100000; i=$((i + 1)); done
    irq_count
}
"""

_BEGIN = "VFU-CMD-BEGIN"
_END = "VFU-CMD-END"
_END_RE = re.compile(rf"^{_END} (\d+) rc=(\d+)$")


def guest_script(commands: Sequence[str], prelude: str = GUEST_PRELUDE) -> bytes:
    """The guest's ``/test.sh``: the prelude, then each command framed by markers."""
    lines = ["#!/bin/sh", prelude]
    for i, cmd in enumerate(commands):
        lines += [f"echo {_BEGIN} {i}", cmd, f"echo {_END} {i} rc=$?"]
    return ("\n".join(lines) + "\n").encode()


@dataclass
class GuestCommand:
    """One command run in the guest: its text, console output and exit status."""

    command: str
    output: str = ""
    rc: int | None = None
    """``None``: the command never finished (the guest died or the run timed out)."""


@dataclass
class GuestRun:
    """What ``vfu_guest.run`` returns: per-command results plus the whole run."""

    commands: list[GuestCommand]
    result: RunResult
    server_log: Path | None = None

    def __getitem__(self, i: int) -> GuestCommand:
        return self.commands[i]

    @property
    def ok(self) -> bool:
        """Every command exited 0 and the guest powered off cleanly."""
        return self.result.ok and all(c.rc == 0 for c in self.commands)

    def describe(self) -> str:
        """A summary plus the console tail, for assertion messages."""
        tail = "\n".join(self.result.console[-40:])
        log = f"; server log {self.server_log}" if self.server_log else ""
        return f"{self.result.summary()}{log}\n--- console tail ---\n{tail}"


def parse_commands(commands: Sequence[str], console: Sequence[str]) -> list[GuestCommand]:
    """Split the console between the markers of :func:`guest_script`."""
    out = [GuestCommand(c) for c in commands]
    current: int | None = None
    buf: list[str] = []
    for line in console:
        if line.startswith(_BEGIN + " "):
            current, buf = int(line.split()[1]), []
            continue
        m = _END_RE.match(line)
        if m and current is not None and int(m.group(1)) == current:
            out[current].output = "\n".join(buf)
            out[current].rc = int(m.group(2))
            current = None
            continue
        if current is not None:
            buf.append(line)
    if current is not None:
        out[current].output = "\n".join(buf)
    return out


class GuestRunner:
    """``vfu_guest``: boots the provisioned guest with the model behind vfio-user-pci."""

    def __init__(self, model: type[DeviceModel] | str | None, options: Mapping[str, str],
                 run_dir: Path) -> None:
        self.model = model
        self.options = dict(options)
        self.run_dir = run_dir
        self._runs = 0

    def run(self, commands: str | Sequence[str], **kwargs: Any) -> GuestRun:
        """Boot, run ``commands`` in order (each a shell snippet; a failing one does not stop
        the others), power off; from a synchronous test. See :meth:`arun` for the options."""
        import trio

        return trio.run(lambda: self.arun(commands, **kwargs))

    async def arun(
        self,
        commands: str | Sequence[str],
        *,
        model: type[DeviceModel] | str | None = None,
        options: Mapping[str, str] | None = None,
        modules: str = "uio_pci_generic",
        memory: str = "shared",
        timeout: float = 120.0,
        echo: bool = False,
        guest_env: Mapping[str, str] | None = None,
    ) -> GuestRun:
        """Like :meth:`run`, from a trio test. ``model``/``options`` replace the fixtures'
        ones; ``memory="private"`` gives the server no RAM fds (DMA by messages);
        ``modules`` are loaded at boot; ``echo`` prints the console."""
        from vfiouser_srv.qemu import QemuConfig, run_guest, serve_device

        cmds = [commands] if isinstance(commands, str) else list(commands)
        spec = model if model is not None else self.model
        if spec is None:
            raise ValueError("no model: define a `vfu_model` fixture or pass model=")
        opts = self.options if options is None else dict(options)
        self._runs += 1
        run_dir = self.run_dir / f"guest-{self._runs}"
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg = QemuConfig(name="vfu-guest", memory=memory,
                         devices=("root-port", "vfio-user"), modules=modules)
        sock = _short_socket(run_dir, "vfu.sock")
        async with serve_device(model_reference(spec), sock, run_dir=run_dir,
                                sets=_sets(opts)) as server:
            res = await run_guest(cfg, test=guest_script(cmds), socket_path=sock,
                                  run_dir=run_dir, timeout=timeout, echo=echo,
                                  guest_env=guest_env)
            await server.stop()
        return GuestRun(parse_commands(cmds, res.console), res, server.log_path)


@pytest.fixture
def vfu_guest(vfu_qemu_ready: None, vfu_model: type[DeviceModel] | str | None,
              vfu_options: Mapping[str, str], tmp_path: Path) -> GuestRunner:
    """Boot the QEMU guest with the model attached and run shell commands in it.

    The model is ``vfu_model``, or whatever ``run(..., model=...)`` names. Console, QEMU and
    server logs go to ``tmp_path/guest-N/``.
    """
    return GuestRunner(vfu_model, vfu_options, tmp_path)

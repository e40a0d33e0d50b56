"""Provision everything a guest run needs into a cache folder, idempotently.

Why a cache outside the work tree: a cold setup downloads ~170 MB and takes tens of seconds;
CI on a reused machine and every clone on a laptop should pay that once. Why stamps with
recipe hashes: the cache must notice when *we* change what goes into it (a module, the
``/init``, a package) and rebuild just that part, while a warm setup stays well under a second.

Cache layout (``~/.cache/vfiouser-srv`` unless ``VFIOUSER_SRV_CACHE`` or ``--cache``)::

    debian-trixie/            isolated Debian root (mmdebstrap): QEMU + apt + downloaded debs
      var/cache/vfiouser-srv-debs/   linux-image-*-amd64_*.deb, busybox-static_*.deb
    debian-trixie.stamp.json  recipe hash, packages, mirror, QEMU version
    guest/vmlinuz             the Debian kernel (extracted, never installed)
    guest/base.cpio.gz        busybox + /init + modules (+ modules.dep)
    guest/stamp.json          recipe hash, kernel version, module list, sha256 of the files
    logs/                     mmdebstrap output of the last build
    runs/                     launcher run folders (console logs, traces)

QEMU: a system ``qemu-system-x86_64`` is used when it is >= 10.1 and knows ``vfio-user-pci``;
otherwise the Debian root gets ``qemu-system-x86`` from trixie-backports (with an apt pin so
its companions come from backports too) and runs through the root's own dynamic loader:
no chroot, so host paths, sockets and memfds work unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .guest import DEFAULT_MODULES, GuestImage, build_guest, render_init

__all__ = [
    "DEFAULT_MIRROR",
    "MIN_QEMU",
    "CacheLayout",
    "ProvisionError",
    "ProvisionResult",
    "QemuCommand",
    "default_cache_dir",
    "find_guest",
    "find_qemu",
    "is_provisioned",
    "probe_qemu",
    "provision",
]

DEFAULT_MIRROR = "http://deb.debian.org/debian"
SUITE = "trixie"
BACKPORTS = "trixie-backports"
MIN_QEMU: tuple[int, int] = (10, 1)
RECIPE_VERSION = 1
"""Bump to force every cache to rebuild (e.g. after fixing a build bug)."""

#: Without this pin apt takes qemu-system-x86 from backports but its companions
#: (qemu-system-common, qemu-system-data, seabios) from trixie, and the install fails.
APT_PIN = f"Package: qemu-* seabios ipxe-qemu\nPin: release n={BACKPORTS}\nPin-Priority: 990\n"
DEBS_DIR = "var/cache/vfiouser-srv-debs"
#: Run inside the fresh root (by mmdebstrap, which chroots or unshares as appropriate): resolve
#: the kernel meta-package to the real image package and download it plus busybox-static.
DOWNLOAD_HOOK = (
    'mkdir -p "$1/' + DEBS_DIR + '" && chroot "$1" sh -ec \''
    "cd /" + DEBS_DIR + "; "
    "k=$(apt-cache depends linux-image-amd64 | "
    'sed -n "s/^ *Depends: \\(linux-image-[0-9].*\\)/\\1/p" | head -n1); '
    'test -n "$k" || { echo "cannot resolve linux-image-amd64" >&2; exit 1; }; '
    'echo "vfiouser-srv: downloading $k busybox-static"; '
    'apt-get download "$k" busybox-static\''
)

Log = Callable[[str], None]


class ProvisionError(RuntimeError):
    """A provisioning step failed; the message names the step, the package or mirror, and a fix."""


def default_cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """``override``, else ``$VFIOUSER_SRV_CACHE``, else ``~/.cache/vfiouser-srv``."""
    if override:
        return Path(override).expanduser().resolve()
    env = os.environ.get("VFIOUSER_SRV_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return (base / "vfiouser-srv").resolve()


def default_mirror() -> str:
    """``$VFIOUSER_SRV_DEBIAN_MIRROR`` or deb.debian.org."""
    return os.environ.get("VFIOUSER_SRV_DEBIAN_MIRROR") or DEFAULT_MIRROR


@dataclass(frozen=True)
class CacheLayout:
    """Paths inside one cache folder (see the module docstring)."""

    root: Path

    @property
    def debian_root(self) -> Path:
        return self.root / "debian-trixie"

    @property
    def root_stamp(self) -> Path:
        return self.root / "debian-trixie.stamp.json"

    @property
    def debs(self) -> Path:
        return self.debian_root / DEBS_DIR

    @property
    def guest_dir(self) -> Path:
        return self.root / "guest"

    @property
    def guest_stamp(self) -> Path:
        return self.guest_dir / "stamp.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @classmethod
    def at(cls, cache: str | os.PathLike[str] | None = None) -> CacheLayout:
        return cls(default_cache_dir(cache))


# --- QEMU -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class QemuCommand:
    """How to start QEMU: ``argv`` is the prefix (binary, loader, ``-L`` dirs), ``env`` is
    added to the caller's environment. Append machine options after ``argv``."""

    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    version: tuple[int, int, int] = (0, 0, 0)
    source: str = "system"
    """``system`` or ``debian-root``."""

    @property
    def version_str(self) -> str:
        return ".".join(map(str, self.version))


def _root_qemu(root: Path) -> QemuCommand:
    libdir = root / "usr/lib/x86_64-linux-gnu"
    argv = (
        str(libdir / "ld-linux-x86-64.so.2"),
        "--library-path",
        str(libdir),
        "--argv0",
        "qemu-system-x86_64",
        str(root / "usr/bin/qemu-system-x86_64"),
        "-L",
        str(root / "usr/share/qemu"),
        "-L",
        str(root / "usr/share/seabios"),
    )
    return QemuCommand(argv, {"QEMU_MODULE_DIR": str(libdir / "qemu")}, source="debian-root")


_VERSION = re.compile(r"QEMU emulator version (\d+)\.(\d+)(?:\.(\d+))?")


def probe_qemu(cmd: QemuCommand) -> QemuCommand | None:
    """``cmd`` with its version filled in if it runs, is >= 10.1 and has vfio-user-pci."""
    env = {**os.environ, **cmd.env}
    try:
        ver = subprocess.run(
            [*cmd.argv, "-version"],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
            check=False,
        )
        devs = subprocess.run(
            [*cmd.argv, "-device", "help"],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = _VERSION.search(ver.stdout)
    if ver.returncode != 0 or not m:
        return None
    version = (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))
    if version[:2] < MIN_QEMU or '"vfio-user-pci"' not in devs.stdout:
        return None
    return QemuCommand(cmd.argv, cmd.env, version, cmd.source)


def system_qemu() -> QemuCommand | None:
    """The host's ``qemu-system-x86_64`` if it is good enough, else ``None``."""
    path = shutil.which("qemu-system-x86_64")
    return probe_qemu(QemuCommand((path,))) if path else None


def find_qemu(cache: str | os.PathLike[str] | None = None) -> QemuCommand:
    """The QEMU to use: a good-enough system QEMU first, then the provisioned root's.

    Raises :class:`ProvisionError` (with the setup command to run) when there is neither.
    """
    found = system_qemu()
    if found:
        return found
    layout = CacheLayout.at(cache)
    if (layout.debian_root / "usr/bin/qemu-system-x86_64").exists():
        found = probe_qemu(_root_qemu(layout.debian_root))
        if found:
            return found
    raise ProvisionError(
        f"no QEMU >= {MIN_QEMU[0]}.{MIN_QEMU[1]} with vfio-user-pci: the system has none and "
        f"the cache {layout.root} is not provisioned; run `python -m vfiouser_srv.qemu setup`"
        " (or `make setup`)"
    )


# --- stamps ---------------------------------------------------------------------------------


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_stamp(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_stamp(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def root_recipe(with_qemu: bool) -> dict[str, Any]:
    """What the Debian root is made from. The mirror is not part of it on purpose: the same
    packages from another mirror are the same root."""
    return {
        "version": RECIPE_VERSION,
        "suite": SUITE,
        "suites": [SUITE, BACKPORTS],
        "variant": "apt",
        "include": ["qemu-system-x86"] if with_qemu else [],
        "pin": APT_PIN,
        "download_hook": DOWNLOAD_HOOK,
    }


def guest_recipe(root_hash: str, kernel_deb: str, busybox_deb: str) -> dict[str, Any]:
    """What the guest image is made from: the packages, module list and ``/init`` text."""
    return {
        "version": RECIPE_VERSION,
        "root": root_hash,
        "kernel_deb": kernel_deb,
        "busybox_deb": busybox_deb,
        "modules": list(DEFAULT_MODULES),
        "init": render_init(DEFAULT_MODULES),
        "builder": _file_sha(Path(__file__).with_name("guest.py")),
        "cpio": _file_sha(Path(__file__).with_name("cpio.py")),
    }


# --- the steps ------------------------------------------------------------------------------


def _ensure_mmdebstrap(log: Log) -> str:
    path = shutil.which("mmdebstrap")
    if path:
        return path
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise ProvisionError(
            "mmdebstrap is needed to build the isolated Debian root and is not installed; "
            "install it (`sudo apt-get install mmdebstrap`; Fedora/Arch package it too) "
            "or install a QEMU >= 10.1 with vfio-user-pci"
        )
    log("installing mmdebstrap on the host (apt-get install -y mmdebstrap)")
    proc = subprocess.run(
        ["apt-get", "install", "-y", "mmdebstrap"], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0 or not shutil.which("mmdebstrap"):
        raise ProvisionError(
            "apt-get install mmdebstrap failed (try `apt-get update` first):\n"
            + _tail(proc.stdout + proc.stderr)
        )
    return shutil.which("mmdebstrap") or "mmdebstrap"


def _tail(text: str, n: int = 25) -> str:
    return "\n".join(text.rstrip().splitlines()[-n:])


def _build_root(layout: CacheLayout, mirror: str, with_qemu: bool, log: Log) -> None:
    mmdebstrap = _ensure_mmdebstrap(log)
    tmp = layout.root / "debian-trixie.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    layout.logs.mkdir(parents=True, exist_ok=True)
    logfile = layout.logs / "mmdebstrap.log"
    pin_hook = (
        'mkdir -p "$1/etc/apt/preferences.d" && printf "%s" '
        + _sh_quote(APT_PIN)
        + ' > "$1/etc/apt/preferences.d/vfiouser-srv-qemu"'
    )
    argv = [
        mmdebstrap,
        "--variant=apt",
        f"--setup-hook={pin_hook}",
        f"--customize-hook={DOWNLOAD_HOOK}",
    ]
    if with_qemu:
        argv.append("--include=qemu-system-x86")
    if os.geteuid() != 0:
        argv.append("--mode=unshare")
    argv += [SUITE, str(tmp), f"deb {mirror} {SUITE} main", f"deb {mirror} {BACKPORTS} main"]
    what = "qemu-system-x86 (trixie-backports), " if with_qemu else ""
    log(
        f"building Debian {SUITE} root with {what}linux-image-amd64 and busybox-static "
        f"from {mirror} (log: {logfile})"
    )
    with logfile.open("w") as out:
        out.write("$ " + " ".join(argv) + "\n")
        out.flush()
        proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        raise ProvisionError(
            f"mmdebstrap failed (exit {proc.returncode}) building {SUITE}+{BACKPORTS} from "
            f"{mirror}.\nLast lines of {logfile}:\n{_tail(logfile.read_text())}\n"
            "Try: check the mirror is reachable (set VFIOUSER_SRV_DEBIAN_MIRROR to another "
            "Debian mirror), check that qemu-system-x86 is still in trixie-backports, "
            "then rerun setup."
        )
    if layout.debian_root.exists():
        shutil.rmtree(layout.debian_root)
    tmp.rename(layout.debian_root)


def _sh_quote(s: str) -> str:
    return "'" + s.replace("'", "'\"'\"'") + "'"


def _one_deb(layout: CacheLayout, pattern: str, package: str) -> Path:
    found = sorted(layout.debs.glob(pattern))
    if len(found) != 1:
        raise ProvisionError(
            f"expected one {package} .deb in {layout.debs}, found {len(found)}; "
            "rerun setup with --force to rebuild the Debian root"
        )
    return found[0]


@dataclass
class ProvisionResult:
    """What :func:`provision` did and found."""

    cache: Path
    qemu: QemuCommand
    guest: GuestImage
    rebuilt: list[str]
    """Steps that actually ran (``debian-root``, ``guest``); empty when warm."""
    seconds: dict[str, float]
    """Wall time per step, plus ``total``."""


def provision(
    cache: str | os.PathLike[str] | None = None,
    *,
    mirror: str | None = None,
    force: bool = False,
    log: Log = print,
) -> ProvisionResult:
    """Make the cache complete; fast (stamps + one QEMU probe) when it already is.

    Steps, each skipped when its stamp matches its recipe hash and its outputs exist:
    1. the Debian root (QEMU unless the system has a good one, plus the kernel and
       busybox-static ``.deb`` files downloaded by apt inside it);
    2. the guest image (``vmlinuz`` + ``base.cpio.gz``).

    Raises :class:`ProvisionError` with the failing step and what to try.
    """
    t0 = time.monotonic()
    layout = CacheLayout.at(cache)
    layout.root.mkdir(parents=True, exist_ok=True)
    mirror = mirror or default_mirror()
    rebuilt: list[str] = []
    seconds: dict[str, float] = {}

    sys_qemu = system_qemu()
    recipe = root_recipe(with_qemu=sys_qemu is None)
    root_hash = _hash(recipe)
    stamp = _read_stamp(layout.root_stamp)
    if force or stamp.get("recipe") != root_hash or not layout.debs.is_dir():
        t = time.monotonic()
        _build_root(layout, mirror, with_qemu=sys_qemu is None, log=log)
        seconds["debian-root"] = time.monotonic() - t
        rebuilt.append("debian-root")
        stamp = {"recipe": root_hash, "mirror": mirror, "recipe_data": recipe}
    qemu = sys_qemu or probe_qemu(_root_qemu(layout.debian_root))
    if qemu is None:
        raise ProvisionError(
            f"the QEMU in {layout.debian_root} does not run or lacks vfio-user-pci; rerun "
            "setup with --force (trixie-backports should carry qemu-system-x86 >= 10.1)"
        )
    if "debian-root" in rebuilt or stamp.get("qemu") != qemu.version_str:
        stamp["qemu"] = qemu.version_str
        stamp["qemu_source"] = qemu.source
        _write_stamp(layout.root_stamp, stamp)

    kernel_deb = _one_deb(layout, "linux-image-*-amd64_*.deb", "linux-image-*-amd64")
    busybox_deb = _one_deb(layout, "busybox-static_*.deb", "busybox-static")
    grecipe = guest_recipe(root_hash, kernel_deb.name, busybox_deb.name)
    ghash = _hash(grecipe)
    gstamp = _read_stamp(layout.guest_stamp)
    guest = _guest_from_stamp(layout, gstamp) if gstamp.get("recipe") == ghash else None
    if force or guest is None:
        t = time.monotonic()
        log(f"building guest image from {kernel_deb.name} and {busybox_deb.name}")
        try:
            guest = build_guest(kernel_deb, busybox_deb, layout.guest_dir)
        except Exception as exc:
            raise ProvisionError(f"building the guest image failed: {exc}") from exc
        _write_stamp(
            layout.guest_stamp,
            {
                "recipe": ghash,
                "kernel_version": guest.kernel_version,
                "modules": list(guest.modules),
                "sha256": {p.name: _file_sha(p) for p in (guest.kernel, guest.initramfs)},
                "kernel_deb": kernel_deb.name,
                "busybox_deb": busybox_deb.name,
            },
        )
        seconds["guest"] = time.monotonic() - t
        rebuilt.append("guest")
    seconds["total"] = time.monotonic() - t0
    return ProvisionResult(layout.root, qemu, guest, rebuilt, seconds)


def _guest_from_stamp(layout: CacheLayout, stamp: dict[str, Any]) -> GuestImage | None:
    kernel = layout.guest_dir / "vmlinuz"
    initramfs = layout.guest_dir / "base.cpio.gz"
    if not (kernel.is_file() and initramfs.is_file()):
        return None
    return GuestImage(
        kernel, initramfs, str(stamp.get("kernel_version", "")), tuple(stamp.get("modules", ()))
    )


def find_guest(cache: str | os.PathLike[str] | None = None) -> GuestImage:
    """The provisioned guest image; :class:`ProvisionError` if setup has not run."""
    layout = CacheLayout.at(cache)
    guest = _guest_from_stamp(layout, _read_stamp(layout.guest_stamp))
    if guest is None:
        raise ProvisionError(
            f"no guest image in {layout.guest_dir}; run `python -m vfiouser_srv.qemu setup`"
            " (or `make setup`)"
        )
    return guest


def is_provisioned(cache: str | os.PathLike[str] | None = None) -> tuple[bool, str]:
    """(ready, reason): cheap check used by tests to decide between skip and run."""
    try:
        find_guest(cache)
        find_qemu(cache)
    except ProvisionError as exc:
        return False, str(exc)
    return True, "ok"


def describe(result: ProvisionResult) -> Sequence[str]:
    """Human-readable summary lines for the CLI."""
    g = result.guest
    return [
        f"cache:   {result.cache}",
        f"qemu:    {result.qemu.version_str} ({result.qemu.source}): "
        + " ".join(result.qemu.argv[:1]),
        f"kernel:  {g.kernel} ({g.kernel_version})",
        f"initrd:  {g.initramfs} (modules: {', '.join(g.modules)})",
        "rebuilt: "
        + (", ".join(result.rebuilt) or "nothing (warm)")
        + "; "
        + ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items()),
    ]

"""QEMU configurations, read from ``qemu-configs/configs.toml``.

Why a data file: the README people copy command lines from and the launcher that runs them
must not drift apart, so both are derived from the same table (h11 draws its state diagram
from its transition table for the same reason). ``render_readme_section`` produces the
README's generated part; a test checks that the committed README matches.
"""

from __future__ import annotations

import os
import shlex
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = [
    "ConfigError",
    "ConfigFile",
    "QemuConfig",
    "configs_dir",
    "load_configs",
    "render_readme_section",
]

README_BEGIN = "<!-- BEGIN GENERATED from configs.toml by `python -m vfiouser_srv.qemu docs` -->"
README_END = "<!-- END GENERATED -->"


class ConfigError(ValueError):
    """The configuration file is missing, malformed, or names something it does not define."""


#: where the wheel installs the repository's ``qemu-configs/`` (pyproject.toml, force-include)
PACKAGE_DATA = "data"


def configs_dir() -> Path:
    """The ``qemu-configs/`` folder: ``$VFIOUSER_SRV_QEMU_CONFIGS``, else the installed
    package data (``vfiouser_srv/qemu/data/`` in a wheel), else the checkout's top level.

    One loader for both layouts: the folder stays at the top of the repository (an editable
    install and ``make`` use it there) and the wheel carries a copy as package data.
    """
    env = os.environ.get("VFIOUSER_SRV_QEMU_CONFIGS")
    if env:
        return Path(env)
    packaged = resources.files(__package__ or "vfiouser_srv.qemu") / PACKAGE_DATA
    if packaged.is_dir() and isinstance(packaged, Path):  # a wheel unpacked by an installer
        return packaged
    return Path(__file__).resolve().parents[2] / "qemu-configs"


@dataclass(frozen=True)
class QemuConfig:
    """One runnable configuration: a memory setup plus devices, maybe a server and a test."""

    name: str
    description: str = ""
    memory: str = "shared"
    devices: tuple[str, ...] = ()
    server: str | None = None
    """Device model our server must serve (``python -m vfiouser_srv serve SERVER``)."""
    test: str | None = None
    """Default guest test script, relative to ``qemu-configs/guest/``."""
    modules: str | None = None
    """Guest modules to load (``vfu_modules=``); ``None`` loads the image's default set."""

    @property
    def uses_socket(self) -> bool:
        return "vfio-user" in self.devices


@dataclass(frozen=True)
class ConfigFile:
    """The parsed ``configs.toml``."""

    path: Path
    defaults: Mapping[str, str]
    base: tuple[str, ...]
    accel: Mapping[str, tuple[str, ...]]
    memory: Mapping[str, tuple[str, ...]]
    devices: Mapping[str, tuple[str, ...]]
    descriptions: Mapping[str, str]
    """``section.name`` -> description, for docs."""
    configs: Mapping[str, QemuConfig] = field(default_factory=dict)

    @property
    def guest_dir(self) -> Path:
        return self.path.parent / "guest"

    def get(self, name: str) -> QemuConfig:
        try:
            return self.configs[name]
        except KeyError:
            raise ConfigError(
                f"no configuration {name!r} in {self.path}; known: {', '.join(self.configs)}"
            ) from None

    def qemu_args(
        self,
        config: QemuConfig,
        *,
        accel: str | None = None,
        mem: str | None = None,
        values: Mapping[str, str] | None = None,
        trace: bool = False,
    ) -> list[str]:
        """The QEMU arguments (after the binary) for ``config``.

        ``values`` fills placeholders (``SOCKET``, ``KERNEL``, ``INITRD``, ``APPEND``,
        ``TRACE``); unfilled ones stay visible as ``@NAME@`` (useful for docs).
        """
        accel = accel or self.defaults.get("accel", "tcg")
        if accel not in self.accel:
            raise ConfigError(f"unknown accel {accel!r}; known: {', '.join(self.accel)}")
        if config.memory not in self.memory:
            raise ConfigError(f"{config.name}: unknown memory {config.memory!r}")
        argv = [*self.base, *self.accel[accel], *self.memory[config.memory]]
        names = [*config.devices, *(["trace"] if trace else [])]
        for dev in names:
            if dev not in self.devices:
                raise ConfigError(f"{config.name}: unknown device {dev!r}")
            argv += self.devices[dev]
        subst = {"MEM": mem or self.defaults.get("mem", "512M"), **(values or {})}
        return [_fill(a, subst) for a in argv]


def _fill(arg: str, values: Mapping[str, str]) -> str:
    for key, val in values.items():
        arg = arg.replace(f"@{key}@", val)
    return arg


def _argv(table: Mapping[str, Any], where: str) -> tuple[str, ...]:
    argv = table.get("argv")
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise ConfigError(f"{where}: `argv` must be a list of strings")
    return tuple(argv)


def load_configs(path: str | os.PathLike[str] | None = None) -> ConfigFile:
    """Parse ``configs.toml`` (default: in :func:`configs_dir`) and validate references."""
    p = Path(path) if path else configs_dir() / "configs.toml"
    try:
        data = tomllib.loads(p.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {p}: {exc} (set VFIOUSER_SRV_QEMU_CONFIGS?)") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: {exc}") from exc
    descriptions: dict[str, str] = {}
    sections: dict[str, dict[str, tuple[str, ...]]] = {}
    for section in ("accel", "memory", "device"):
        sections[section] = {}
        for name, table in data.get(section, {}).items():
            sections[section][name] = _argv(table, f"{section}.{name}")
            descriptions[f"{section}.{name}"] = str(table.get("description", ""))
    configs: dict[str, QemuConfig] = {}
    for name, table in data.get("config", {}).items():
        cfg = QemuConfig(
            name=name,
            description=str(table.get("description", "")),
            memory=str(table.get("memory", "shared")),
            devices=tuple(table.get("devices", ())),
            server=table.get("server"),
            test=table.get("test"),
            modules=table.get("modules"),
        )
        if cfg.memory not in sections["memory"]:
            raise ConfigError(f"config.{name}: unknown memory {cfg.memory!r}")
        for dev in cfg.devices:
            if dev not in sections["device"]:
                raise ConfigError(f"config.{name}: unknown device {dev!r}")
        configs[name] = cfg
    return ConfigFile(
        path=p,
        defaults={k: str(v) for k, v in data.get("defaults", {}).items()},
        base=_argv(data.get("base", {}), "base"),
        accel=sections["accel"],
        memory=sections["memory"],
        devices=sections["device"],
        descriptions=descriptions,
        configs=configs,
    )


def shell_line(argv: Sequence[str], prog: str = "qemu-system-x86_64") -> str:
    """A copy-pasteable, shell-quoted, wrapped command line."""
    parts = [prog]
    i = 0
    while i < len(argv):
        if argv[i].startswith("-") and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            parts.append(f"{argv[i]} {shlex.quote(argv[i + 1])}")
            i += 2
        else:
            parts.append(shlex.quote(argv[i]))
            i += 1
    return " \\\n    ".join(parts)


def render_readme_section(cf: ConfigFile) -> str:
    """The generated README part: one block per configuration, plus the building blocks."""
    out = [README_BEGIN, ""]
    append = cf.defaults.get("append", "")
    for cfg in cf.configs.values():
        out.append(f"### `{cfg.name}`: {cfg.description}")
        out.append("")
        extra: list[str] = []
        if cfg.server:
            extra.append(f"Server: `python -m vfiouser_srv serve {cfg.server} "
                         "--socket-path /tmp/vfu.sock` (start it first).")
        if cfg.test:
            extra.append(f"Guest test: `guest/{cfg.test}`.")
        if cfg.modules:
            extra.append(f"Guest modules: `{cfg.modules}`.")
        if extra:
            out += [" ".join(extra), ""]
        args = cf.qemu_args(cfg, values={
            "SOCKET": "/tmp/vfu.sock", "KERNEL": "vmlinuz", "INITRD": "initrd.cpio.gz",
            "APPEND": append + (f" vfu_modules={cfg.modules}" if cfg.modules else ""),
        })
        out += ["```sh", shell_line(args), "```", ""]
    out.append("### Building blocks")
    out.append("")
    out.append("| block | arguments | what it is for |")
    out.append("|---|---|---|")
    for section, table in (("accel", cf.accel), ("memory", cf.memory), ("device", cf.devices)):
        for name, argv in table.items():
            joined = " ".join(shlex.quote(a) for a in argv).replace("|", "\\|")
            desc = cf.descriptions.get(f"{section}.{name}", "")
            out.append(f"| `{section}.{name}` | `{joined}` | {desc} |")
    out += ["", README_END]
    return "\n".join(out) + "\n"


def update_readme(cf: ConfigFile, readme: Path | None = None) -> bool:
    """Rewrite the generated section of ``README.md``; True if it changed."""
    readme = readme or cf.path.parent / "README.md"
    text = readme.read_text()
    start, end = text.find(README_BEGIN), text.find(README_END)
    generated = render_readme_section(cf)
    if start < 0 or end < 0:
        raise ConfigError(f"{readme}: generated-section markers not found")
    new = text[:start] + generated + text[end + len(README_END) + 1 :]
    if new != text:
        readme.write_text(new)
        return True
    return False


def readme_is_current(cf: ConfigFile, readme: Path | None = None) -> bool:
    """True when README.md's generated section matches ``configs.toml``."""
    readme = readme or cf.path.parent / "README.md"
    return render_readme_section(cf) in readme.read_text()

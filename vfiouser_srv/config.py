"""Config files and the settings `serve` is built from.

`read_config` reads the TOML file of `serve --config` (its `[server]`, `[[group]]` and
`[[device]]` keys: README, docs/access.md) into a `ServerConfig`; the access-key parsers here
also read the `serve` options. Unknown keys are errors, not ignored.
"""

from __future__ import annotations

import grp
import pwd
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from . import systemd
from .limits import DEFAULT_LIMITS, Limits
from .objects import OwnerPolicy
from .sockets import DEFAULT_ACCESS, SocketAccess

#: keys of a `[[device]]` table that say who may connect (also accepted in `[server]`)
ACCESS_KEYS = ("socket_mode", "socket_group", "allow_uids", "allow_gids")
DEVICE_KEYS = frozenset(
    {"name", "model", "socket", "fd", "group", "options", "engine", "trace", "trace_dma"}
    | set(ACCESS_KEYS)
)
#: `[server]` keys besides the `Limits` fields
SERVER_KEYS = frozenset({"engine", "control", *ACCESS_KEYS})
LIMIT_KEYS = tuple(f.name for f in fields(Limits))


@dataclass
class DeviceConfig:
    name: str
    model: str
    socket_path: str | None = None
    fd: int | None = None
    group: str | None = None
    options: dict[str, str] = field(default_factory=dict)
    engine: str = "python"
    access: SocketAccess = DEFAULT_ACCESS
    #: `--trace FILE` / `trace = "FILE"`: write every message to this trace (docs/trace.md)
    trace: str | None = None
    #: keep DMA payloads in the trace (`--trace-dma` / `trace_dma = true`)
    trace_dma: bool = False


@dataclass
class GroupConfig:
    name: str
    policy: OwnerPolicy = OwnerPolicy.PID
    shared_container: bool = False


class ConfigError(ValueError):
    pass


@dataclass
class ServerConfig:
    """Everything `serve --config` builds a server from."""

    groups: list[GroupConfig]
    devices: list[DeviceConfig]
    limits: Limits = DEFAULT_LIMITS
    #: the control socket (`[server] control`, `--control`: docs/live-upgrade.md)
    control: str | None = None
    #: the `[server]` access settings, which the control socket gets too
    access: SocketAccess = DEFAULT_ACCESS


def parse_sets(items: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        for part in item.split(","):
            if not part:
                continue
            key, sep, value = part.partition("=")
            if not sep or not key:
                raise ConfigError(f"--set expects KEY=VALUE, got {part!r}")
            out[key.strip()] = value
    return out


def load_config(path: str) -> tuple[list[GroupConfig], list[DeviceConfig]]:
    """Read a TOML file describing several devices and groups (see README)."""
    config = read_config(path)
    return config.groups, config.devices


def read_config(
    path: str,
    *,
    access: Mapping[str, Any] | None = None,
    limits: Mapping[str, Any] | None = None,
) -> ServerConfig:
    """Read a config file; `access` and `limits` (config keys) are command-line overrides.

    Precedence, per key: a `[[device]]` key, then the command line, then `[server]`, then
    the default. Unknown keys are errors, not ignored: a misspelt `allow_uids` must not
    quietly leave a device open to everyone.
    """
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    server = data.get("server", {})
    if not isinstance(server, dict):
        raise ConfigError(f"{path}: [server] must be a table")
    default_engine = str(server.get("engine", "python"))
    limit_values = {k: v for k, v in server.items() if k not in SERVER_KEYS}
    limit_values.update(limits or {})
    try:
        server_limits = Limits.from_mapping(limit_values)
    except ValueError as exc:
        raise ConfigError(f"{path}: [server]: {exc}") from None
    server_access = parse_access(server, f"{path}: [server]")
    server_access = parse_access(access or {}, "command line", server_access)
    groups = []
    for g in data.get("group", []):
        try:
            groups.append(
                GroupConfig(
                    str(g["name"]),
                    OwnerPolicy(g.get("policy", "pid")),
                    bool(g.get("shared_container", False)),
                )
            )
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"{path}: bad [[group]] {g!r}: {exc}") from None
    devs = []
    for d in data.get("device", []):
        endpoints = ("socket" in d) + ("fd" in d) or systemd.activated()  # docs/systemd.md
        if "name" not in d or "model" not in d or endpoints != 1:
            raise ConfigError(f"{path}: [[device]] needs name, model and one of socket/fd: {d!r}")
        unknown = set(d) - DEVICE_KEYS
        if unknown:
            raise ConfigError(
                f"{path}: [[device]] {d['name']}: unknown key(s) {', '.join(sorted(unknown))} "
                f"(known: {', '.join(sorted(DEVICE_KEYS))})"
            )
        opts = {str(k): _option_text(v) for k, v in d.get("options", {}).items()}
        devs.append(
            DeviceConfig(
                str(d["name"]),
                str(d["model"]),
                d.get("socket"),
                d.get("fd"),
                d.get("group"),
                opts,
                str(d.get("engine", default_engine)),
                parse_access(d, f"{path}: [[device]] {d['name']}", server_access),
                str(d["trace"]) if "trace" in d else None,
                bool(d.get("trace_dma", False)),
            )
        )
    devs = systemd.with_sockets(devs, path)
    if not devs:
        raise ConfigError(f"{path}: no [[device]] entries")
    control = server.get("control")
    if control is not None and not isinstance(control, str):
        raise ConfigError(f"{path}: [server]: control must be a socket path")
    return ServerConfig(groups, devs, server_limits, control, server_access)


# ------------------------------------------------------------------------ access settings


def parse_access(
    table: Mapping[str, Any], where: str, base: SocketAccess = DEFAULT_ACCESS
) -> SocketAccess:
    """`base` with the access keys present in `table` (config values or option strings)."""
    changes: dict[str, Any] = {}
    try:
        if "socket_mode" in table:
            changes["mode"] = parse_mode(table["socket_mode"])
        if "socket_group" in table:
            changes["group"] = parse_gid(table["socket_group"])
        for key, parse in (("allow_uids", parse_uid), ("allow_gids", parse_gid)):
            if key in table:
                changes[key] = _parse_ids(key, table[key], parse)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return replace(base, **changes)


def parse_mode(value: Any) -> int:
    """An octal permission mode: "0660", "660", "0o660" or a TOML integer (write 0o660)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f'socket_mode must be an octal mode like "0660", got {value!r}')
    try:
        mode = value if isinstance(value, int) else int(value, 8)
    except ValueError:
        raise ValueError(f"socket_mode {value!r} is not an octal mode like 0660") from None
    if not 0 <= mode <= 0o777:
        raise ValueError(
            f"socket_mode {value!r} is not a permission mode between 0 and 0777 "
            '(in TOML write 0o660 or "0660": 660 is decimal)'
        )
    return mode


def parse_uid(value: Any) -> int:
    return _parse_id(value, "user", lambda name: pwd.getpwnam(name).pw_uid)


def parse_gid(value: Any) -> int:
    return _parse_id(value, "group", lambda name: grp.getgrnam(name).gr_gid)


def _parse_id(value: Any, kind: str, lookup: Callable[[str], int]) -> int:
    """A numeric id, or a name looked up now (so a typo fails at start-up, not at accept)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"expected a {kind} name or id, got {value!r}")
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{kind} id {value} is negative")
        return value
    try:
        return lookup(value)
    except KeyError:
        raise ValueError(f"no {kind} named {value!r}") from None


def _parse_ids(key: str, value: Any, parse: Callable[[Any], int]) -> frozenset[int]:
    items = value if isinstance(value, list) else [value]
    if not items:
        # An empty list would read as "nobody" but means "no list": say so instead.
        raise ValueError(f"{key} is empty; leave it out to admit whoever can open the socket")
    return frozenset(parse(v) for v in items)


def _option_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)

"""`vfiouser-srv`: serve device models to vfio-user clients.

Follows the spec's backend-program conventions: never daemonizes, honours SIGTERM, accepts
`--socket-path=PATH` or `--fd=FDNUM`. The ready line (`READY <socket>` per device) is printed
only after every socket listens, so a launcher can start QEMU the moment it sees it.

Who may connect and what a client may cost (socket mode and group, allow-lists, the
`Limits`) come from `serve` options or a config file's `[server]` and `[[device]]` keys; the
keys and their defaults are in docs/access.md. A start-up that fails prints one line naming
what is wrong and exits 2, leaving no socket file behind.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import trio

import devices
from devices import OptionError
from devices.sdk.options import type_label

from . import control_commands, ctl, systemd, trace_cli  # noqa: F401 (control_commands registers)
from .config import (
    ACCESS_KEYS,
    DEVICE_KEYS,
    LIMIT_KEYS,
    SERVER_KEYS,
    ConfigError,
    DeviceConfig,
    GroupConfig,
    ServerConfig,
    load_config,
    parse_access,
    parse_gid,
    parse_mode,
    parse_sets,
    parse_uid,
    read_config,
)
from .control import ControlServer
from .engines import ENGINES, EngineUnavailable
from .limits import DEFAULT_LIMITS, Limits
from .objects import ObjectError
from .server import Server
from .sockets import raise_fd_limit
from .takeover import TakeOverError, take_over

log = logging.getLogger("vfiouser_srv")

#: the config names this module has always offered (`from vfiouser_srv.cli import ...`)
__all__ = [
    "ACCESS_KEYS",
    "DEVICE_KEYS",
    "LIMIT_KEYS",
    "SERVER_KEYS",
    "ConfigError",
    "DeviceConfig",
    "GroupConfig",
    "ServerConfig",
    "build_server",
    "load_config",
    "main",
    "make_parser",
    "parse_access",
    "parse_gid",
    "parse_mode",
    "parse_sets",
    "parse_uid",
    "read_config",
    "server_from_args",
]


def build_server(
    groups: list[GroupConfig],
    devs: list[DeviceConfig],
    limits: Limits | None = None,
    *,
    listeners: Mapping[str, int] | None = None,
) -> Server:
    """A server with every device listening; if one fails, nothing is left behind.

    The devices already added are closed and their socket files unlinked before the error
    propagates, so a failed start never leaves a socket that QEMU could find and hang on.
    `listeners` (device name -> fd): sockets a live upgrade handed over, used instead of
    creating them.
    """
    server = Server(limits=limits)
    try:
        for g in groups:
            server.group(g.name, policy=g.policy, shared_container=g.shared_container)
        for d in devs:
            if d.engine not in ENGINES:
                raise ConfigError(f"unknown engine {d.engine!r} (known: {', '.join(ENGINES)})")
            if d.engine != "python":
                from .engines import load_engine

                load_engine(d.engine)  # raises with a clear reason when unavailable
            model = devices.create(d.model, d.options)
            try:
                server.add_device(
                    d.name,
                    model,
                    socket_path=d.socket_path,
                    fd=listeners.get(d.name) if listeners is not None else d.fd,
                    group=d.group,
                    engine=d.engine,
                    access=d.access,
                )
                trace_cli.attach(server.devices[d.name], d)  # --trace FILE: docs/trace.md
            except BaseException:
                with contextlib.suppress(Exception):
                    model.close()
                raise
    except BaseException:
        server.close()
        raise
    return server


async def serve_until_signalled(
    server: Server,
    ready_lines: list[str],
    control: ControlServer | None = None,
    on_started: Callable[[], None] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT, or until a live upgrade took everything over."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            if control is not None:
                await nursery.start(control.serve)
                nursery.start_soon(_exit_when_handed_over, control, nursery.cancel_scope)
            if on_started is not None:
                on_started()
            for line in ready_lines:
                print(line, flush=True)
            systemd.notify_ready(ready_lines)
            async for signum in signals:
                log.info("received %s; shutting down", signal.Signals(signum).name)
                systemd.notify_stopping(signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


async def _exit_when_handed_over(control: ControlServer, scope: trio.CancelScope) -> None:
    await control.handed_over.wait()
    scope.cancel()


def cmd_serve(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if args.take_over:
        return cmd_take_over(config)
    server, ready = server_from_config(config)
    control = None
    if config.control is not None:
        try:
            control = ControlServer(server, config.control, config.access)
        except BaseException:
            server.close()
            raise
    trio.run(serve_until_signalled, server, ready, control)
    return 0


def cmd_take_over(config: ServerConfig) -> int:
    """`serve --take-over`: take everything from the server on `--control`, then serve."""
    control = config.control
    if control is None:
        raise ConfigError("--take-over needs --control PATH: the running server's control socket")
    for d in config.devices:
        if d.engine != "python":
            raise ConfigError(
                f"--take-over: device {d.name} uses the {d.engine} engine; only the python "
                "engine can hand over its connections (libvfio-user keeps them inside the C "
                "library)"
            )
    raise_fd_limit()

    def build(listeners: dict[str, int]) -> Server:
        return build_server(config.groups, config.devices, config.limits, listeners=listeners)

    async def run() -> None:
        taken = await take_over(control, build)
        try:
            ctl = ControlServer(taken.server, control, config.access, fd=taken.control_fd)
        except BaseException:
            taken.server.close()
            raise
        log.info("took over (old server paused %.1f ms)", taken.paused_ms)
        await serve_until_signalled(taken.server, ready_lines(config), ctl, taken.start)

    trio.run(run)
    return 0


def ready_lines(config: ServerConfig) -> list[str]:
    return [f"READY {d.socket_path if d.socket_path else f'fd:{d.fd}'}" for d in config.devices]


def server_from_args(args: argparse.Namespace) -> tuple[Server, list[str]]:
    """The server `serve` runs, every device listening, and its READY lines."""
    return server_from_config(config_from_args(args))


def server_from_config(config: ServerConfig) -> tuple[Server, list[str]]:
    raise_fd_limit()
    server = build_server(config.groups, config.devices, config.limits)
    return server, ready_lines(config)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """What `serve` was asked to serve, from its options or its config file."""
    access = _access_options(args)
    limit_values = {k: v for k in LIMIT_KEYS if (v := getattr(args, k)) is not None}
    if args.config:
        if args.device or args.socket_path or args.fd is not None or args.trace:
            raise ConfigError("--config excludes DEVICE, --socket-path, --fd and --trace")
        config = read_config(args.config, access=access, limits=limit_values)
        if args.control is not None:
            config.control = args.control
        return config
    else:
        try:
            limits = Limits.from_mapping(limit_values)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if not args.device:
            raise ConfigError("serve needs DEVICE (or --config FILE)")
        if (args.socket_path is None) == (args.fd is None):
            raise ConfigError("give exactly one of --socket-path and --fd")
        devs = [
            DeviceConfig(
                args.name or devices.model_name(args.device),
                args.device,
                args.socket_path,
                args.fd,
                args.group,
                parse_sets(args.set),
                args.engine,
                parse_access(access, "command line"),
                args.trace,
                args.trace_dma,
            )
        ]
        return ServerConfig([], devs, limits, args.control, parse_access(access, "command line"))


def _access_options(args: argparse.Namespace) -> dict[str, Any]:
    """The access options given on the command line, under their config-file keys."""
    out: dict[str, Any] = {}
    if args.socket_mode is not None:
        out["socket_mode"] = args.socket_mode
    if args.socket_group is not None:
        out["socket_group"] = args.socket_group
    if args.allow_uid:
        out["allow_uids"] = args.allow_uid
    if args.allow_gid:
        out["allow_gids"] = args.allow_gid
    return out


def cmd_devices(args: argparse.Namespace) -> int:
    models, problems = devices.available()
    for name, cls in sorted(models.items()):
        print(f"{name}: {cls.description}")
        for opt in cls.options:
            old = f" (old name: {', '.join(opt.aliases)})" if opt.aliases else ""
            print(f"    {opt.name}={type_label(opt)} (default {opt.default!r}): {opt.help}{old}")
    for line in problems:
        print(f"vfiouser-srv: {line}", file=sys.stderr)
    return 0


def cmd_qemu(args: argparse.Namespace) -> int:
    return int(args.qemu_main(args))  # set by vfiouser_srv.qemu.cli.add_commands


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vfiouser-srv", description=__doc__.splitlines()[0])
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="-v: one log line per message; -vv: debug everything",
    )
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve device models on vfio-user sockets")
    s.add_argument(
        "device",
        nargs="?",
        help="device model: a name (see `vfiouser-srv devices`), FILE.py:CLASS or MODULE:CLASS",
    )
    s.add_argument("--socket-path", help="Unix socket to listen on")
    s.add_argument("--fd", type=int, help="inherited socket fd (listening or connected)")
    s.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model option (repeatable, or comma-separated)",
    )
    s.add_argument("--engine", choices=ENGINES, default="python")
    s.add_argument("--name", help="device name (default: the model name)")
    s.add_argument("--group", help="group name (default: one group per device)")
    s.add_argument("--config", help="TOML file with several devices and groups")
    s.add_argument(
        "--control",
        metavar="PATH",
        help="control socket (QMP-like JSON lines; docs/live-upgrade.md), with the access "
        "rules of the device sockets",
    )
    s.add_argument(
        "--take-over",
        action="store_true",
        help="take every device and connection from the server on --control PATH (live "
        "upgrade: same arguments plus this), which then exits",
    )
    a = s.add_argument_group(
        "access", "who may connect (docs/access.md); with --config these override [server]"
    )
    a.add_argument(
        "--socket-mode",
        metavar="MODE",
        help="octal mode of the socket files we create (default 0600)",
    )
    a.add_argument(
        "--socket-group",
        metavar="GROUP",
        help="group (name or gid) of the socket files we create (default: ours)",
    )
    a.add_argument(
        "--allow-uid",
        action="append",
        default=[],
        metavar="UID",
        help="admit only peers with this uid or user name, or an --allow-gid (repeatable)",
    )
    a.add_argument(
        "--allow-gid",
        action="append",
        default=[],
        metavar="GID",
        help="admit only peers in this group (name or gid), or an --allow-uid (repeatable)",
    )
    lim = s.add_argument_group(
        "limits", "what one client may cost (docs/access.md); with --config these override [server]"
    )
    lim.add_argument(
        "--version-timeout",
        type=float,
        metavar="SECONDS",
        help="seconds a new connection has to complete VERSION "
        f"(default {DEFAULT_LIMITS.version_timeout})",
    )
    lim.add_argument(
        "--max-version-size",
        type=int,
        metavar="BYTES",
        help=f"largest VERSION message accepted (default {DEFAULT_LIMITS.max_version_size})",
    )
    lim.add_argument(
        "--max-connections-per-device",
        type=int,
        metavar="N",
        help="open connections to one device at a time "
        f"(default {DEFAULT_LIMITS.max_connections_per_device})",
    )
    lim.add_argument(
        "--max-connections",
        type=int,
        metavar="N",
        help=f"open connections to the server at a time (default {DEFAULT_LIMITS.max_connections})",
    )
    s.add_argument("-v", "--verbose", action="count", default=0, dest="sub_verbose")
    trace_cli.add_serve_options(s)
    sub.add_parser("devices", help="list device models and their options")
    ctl.add_parser(sub)
    trace_cli.add_parser(sub)
    q = sub.add_parser("qemu", help="provision and launch QEMU guests (see qemu-configs/)")
    from .qemu import cli as qemu_cli  # its subcommands' parsers, each with its own --help

    qemu_cli.add_commands(q)
    return p


def setup_logging(verbose: int) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose >= 2 else logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if verbose >= 1:
        logging.getLogger("vfiouser_srv.wire").setLevel(logging.DEBUG)


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose + getattr(args, "sub_verbose", 0))
    try:
        if args.command == "serve":
            return cmd_serve(systemd.serve_args(args))
        if args.command == "ctl":
            return ctl.run(args)
        if args.command == "devices":
            return cmd_devices(args)
        if args.command == "trace":
            return trace_cli.run(args)
        return cmd_qemu(args)
    except (ConfigError, OptionError, ObjectError, EngineUnavailable, TakeOverError) as exc:
        print(f"vfiouser-srv: {exc}", file=sys.stderr)
        systemd.notify_status(f"failed to start: {exc}")
        return 2
    except BrokenPipeError:  # `vfiouser-srv devices | head`: the reader left, not an error of ours
        from .qemu.cli import quiet_broken_pipe

        return quiet_broken_pipe()
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

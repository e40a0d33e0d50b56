"""`vfiouser-srv`: serve device models to vfio-user clients.

Follows the spec's backend-program conventions: never daemonizes, honours SIGTERM, accepts
`--socket-path=PATH` or `--fd=FDNUM`. The ready line (`READY <socket>` per device) is printed
only after every socket listens, so a launcher can start QEMU the moment it sees it.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

import devices
from devices import OptionError

from .engines import EngineUnavailable
from .objects import ObjectError, OwnerPolicy
from .server import Server, raise_fd_limit

log = logging.getLogger("vfiouser_srv")

ENGINES = ("python", "libvfio-user")


@dataclass
class DeviceConfig:
    name: str
    model: str
    socket_path: str | None = None
    fd: int | None = None
    group: str | None = None
    options: dict[str, str] = field(default_factory=dict)
    engine: str = "python"


@dataclass
class GroupConfig:
    name: str
    policy: OwnerPolicy = OwnerPolicy.PID
    shared_container: bool = False


class ConfigError(ValueError):
    pass


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
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    default_engine = str(data.get("server", {}).get("engine", "python"))
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
        if "name" not in d or "model" not in d or ("socket" in d) == ("fd" in d):
            raise ConfigError(f"{path}: [[device]] needs name, model and one of socket/fd: {d!r}")
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
            )
        )
    if not devs:
        raise ConfigError(f"{path}: no [[device]] entries")
    return groups, devs


def _option_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def build_server(groups: list[GroupConfig], devs: list[DeviceConfig]) -> Server:
    server = Server()
    for g in groups:
        server.group(g.name, policy=g.policy, shared_container=g.shared_container)
    for d in devs:
        if d.engine not in ENGINES:
            raise ConfigError(f"unknown engine {d.engine!r} (known: {', '.join(ENGINES)})")
        if d.engine != "python":
            from .engines import load_engine

            load_engine(d.engine)  # raises with a clear reason when unavailable
        model = devices.create(d.model, d.options)
        server.add_device(
            d.name, model, socket_path=d.socket_path, fd=d.fd, group=d.group, engine=d.engine
        )
    return server


async def serve_until_signalled(server: Server, ready_lines: list[str]) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            for line in ready_lines:
                print(line, flush=True)
            async for signum in signals:
                log.info("received %s; shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def cmd_serve(args: argparse.Namespace) -> int:
    if args.config:
        if args.device or args.socket_path or args.fd is not None:
            raise ConfigError("--config excludes DEVICE, --socket-path and --fd")
        groups, devs = load_config(args.config)
    else:
        if not args.device:
            raise ConfigError("serve needs DEVICE (or --config FILE)")
        if (args.socket_path is None) == (args.fd is None):
            raise ConfigError("give exactly one of --socket-path and --fd")
        devs = [
            DeviceConfig(
                args.name or args.device,
                args.device,
                args.socket_path,
                args.fd,
                args.group,
                parse_sets(args.set),
                args.engine,
            )
        ]
        groups = []
    raise_fd_limit()
    server = build_server(groups, devs)
    ready = [f"READY {d.socket_path if d.socket_path else f'fd:{d.fd}'}" for d in devs]
    trio.run(serve_until_signalled, server, ready)
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    for name, cls in sorted(devices.MODELS.items()):
        print(f"{name}: {cls.description}")
        for opt in cls.options:
            print(f"    {opt.name}={opt.type.__name__} (default {opt.default!r}): {opt.help}")
    return 0


def cmd_qemu(args: argparse.Namespace, rest: list[str]) -> int:
    from .qemu import cli as qemu_cli

    mains = {"setup": qemu_cli.setup_main, "run": qemu_cli.run_main, "docs": qemu_cli.docs_main}
    return mains[args.qemu_command](rest)


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
    s.add_argument("device", nargs="?", help="device model (see `vfiouser-srv devices`)")
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
    s.add_argument("-v", "--verbose", action="count", default=0, dest="sub_verbose")
    sub.add_parser("devices", help="list device models and their options")
    q = sub.add_parser("qemu", help="provision and launch QEMU guests (see qemu-configs/)")
    q.add_argument("qemu_command", choices=("setup", "run", "docs"))
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
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "qemu":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    setup_logging(args.verbose + getattr(args, "sub_verbose", 0))
    try:
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "devices":
            return cmd_devices(args)
        return cmd_qemu(args, rest)
    except (ConfigError, OptionError, ObjectError, EngineUnavailable) as exc:
        print(f"vfiouser-srv: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

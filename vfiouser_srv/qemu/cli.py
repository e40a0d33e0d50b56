"""Command-line entry points: ``setup_main(argv)`` and ``run_main(argv)`` return exit codes.

The parsers are built once, by :func:`add_commands`, for both front ends: ``vfiouser-srv qemu
...`` (``vfiouser_srv.cli``) and ``python -m vfiouser_srv.qemu ...`` (:func:`main`), so each
subcommand's ``--help`` is its own.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import trio

from .configs import ConfigError, load_configs, readme_is_current, shell_line, update_readme
from .launcher import LaunchError, RunResult, run_config
from .provision import ProvisionError, describe, find_qemu, provision

__all__ = ["add_commands", "docs_main", "main", "run_main", "setup_main"]


SETUP_HELP = "provision QEMU and the test guest into a cache"
RUN_HELP = "boot the test guest with a configuration and report what it saw"
DOCS_HELP = "regenerate (or --check) qemu-configs/README.md from configs.toml"


def _setup_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache", help="cache folder (default $VFIOUSER_SRV_CACHE or ~/.cache/vfiouser-srv)"
    )
    p.add_argument(
        "--mirror",
        help="Debian mirror (default $VFIOUSER_SRV_DEBIAN_MIRROR or http://deb.debian.org/debian)",
    )
    p.add_argument("--force", action="store_true", help="rebuild everything")


def setup_main(argv: Sequence[str]) -> int:
    """``qemu setup [--cache DIR] [--mirror URL] [--force]``: provision the cache."""
    return _setup(_standalone("setup").parse_args(list(argv)))


def _setup(args: argparse.Namespace) -> int:
    try:
        result = provision(
            args.cache,
            mirror=args.mirror,
            force=args.force,
            log=lambda m: print(f"setup: {m}", flush=True),
        )
    except ProvisionError as exc:
        print(f"setup failed: {exc}", file=sys.stderr)
        return 1
    for line in describe(result):
        print(line)
    return 0


RUN_DESCRIPTION = (
    "Boot the test guest with a configuration from qemu-configs/configs.toml "
    "(starting our server when the configuration has one) and report what the guest saw."
)


def _run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="configuration name (see --list)")
    p.add_argument("--list", action="store_true", help="list configurations and exit")
    p.add_argument("--show-command", action="store_true",
                   help="print the QEMU command line and exit")
    p.add_argument("--cache", help="cache folder (default $VFIOUSER_SRV_CACHE or "
                   "~/.cache/vfiouser-srv)")
    p.add_argument("--test", help="guest test script (default: the configuration's; "
                   "'none' for no test)")
    p.add_argument("--steps", help="edu-test steps, e.g. ident,regs,fact,dma,irq,reset")
    p.add_argument("--guest-env", action="append", default=[], metavar="KEY=VALUE",
                   help="pass vfu_KEY=VALUE to the guest (environment of /init and the test)")
    p.add_argument("--kvm", action="store_true", help="use KVM instead of TCG")
    p.add_argument("--mem", help="guest RAM size (default from configs.toml)")
    p.add_argument("--trace", action="store_true", help="QEMU -trace 'vfio_user_*' into the "
                   "run folder")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds (default 120)")
    p.add_argument("--socket", type=Path, help="use an already running server at this socket")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="passed to the server as --set")
    p.add_argument("--model", help="the model our server serves instead of the configuration's: "
                   "a name, FILE.py:CLASS or MODULE:CLASS")
    p.add_argument("--qemu-arg", action="append", default=[], help="extra QEMU argument")
    p.add_argument("--quiet", action="store_true", help="do not echo the whole console")
    p.add_argument("--demo", action="store_true",
                   help="echo only what the guest saw (INFO/RESULT/STAGE lines)")


def _print_summary(res: RunResult) -> None:
    print(res.summary())
    if res.trace_path:
        print(f"trace: {res.trace_path}")


def run_main(argv: Sequence[str]) -> int:
    """``qemu run CONFIG [options]``: exit 0 when the guest powered off after a passing test."""
    return _run(_standalone("run").parse_args(list(argv)))


def _run(args: argparse.Namespace) -> int:
    try:
        cf = load_configs()
        if args.list or not args.config:
            for cfg in cf.configs.values():
                srv = f" [server: {cfg.server}]" if cfg.server else ""
                print(f"{cfg.name:18} {cfg.description}{srv}")
            return 0 if args.list else 2
        cfg = cf.get(args.config)
        accel = "kvm" if args.kvm else None
        if args.show_command:
            qemu = find_qemu(args.cache)
            print(shell_line([*qemu.argv[1:], *cf.qemu_args(cfg, accel=accel, mem=args.mem,
                                                            trace=args.trace)],
                             prog=qemu.argv[0]))
            return 0
        guest_env = dict(kv.split("=", 1) for kv in args.guest_env)
        if args.steps:
            guest_env["edu_steps"] = args.steps
        test: Path | bytes | None = None
        if args.test:
            test = b"" if args.test == "none" else Path(args.test)

        def demo_echo(line: str) -> None:
            if line.startswith(("INFO ", "RESULT ", "STAGE ")):
                print("  " + line, flush=True)

        echo = False if args.quiet else (demo_echo if args.demo else True)
        run = trio.run(lambda: run_config(
            cfg.name, cache=args.cache, configs=cf, server_sets=args.sets,
            server_model=args.model,
            socket_path=args.socket, test=test, accel=accel, mem=args.mem,
            guest_env=guest_env, trace=args.trace, timeout=args.timeout,
            extra_qemu_args=args.qemu_arg, echo=echo,
        ))
    except (ConfigError, ProvisionError, LaunchError, ValueError) as exc:
        print(f"run failed: {exc}", file=sys.stderr)
        return 1
    _print_summary(run.guest)
    if run.server_log:
        print(f"server log: {run.server_log} (exit {run.server_returncode})")
    return 0 if run.guest.ok else 1


def _docs_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--check", action="store_true",
                   help="only check that the README is current (exit 1 if not)")


def docs_main(argv: Sequence[str]) -> int:
    """``qemu docs [--check]``: regenerate (or check) qemu-configs/README.md from the TOML."""
    return _docs(_standalone("docs").parse_args(list(argv)))


def _docs(args: argparse.Namespace) -> int:
    try:
        cf = load_configs()
        if args.check:
            ok = readme_is_current(cf)
            print("README up to date" if ok else "README out of date: run `python -m "
                  "vfiouser_srv.qemu docs`")
            return 0 if ok else 1
        print("README updated" if update_readme(cf) else "README already up to date")
    except (ConfigError, OSError) as exc:
        print(f"docs failed: {exc}", file=sys.stderr)
        return 1
    return 0


Command = tuple[str, str, str, Callable[[argparse.ArgumentParser], None],
                Callable[[argparse.Namespace], int]]
#: name, help, description, arguments, handler
COMMANDS: tuple[Command, ...] = (
    ("setup", SETUP_HELP, "Provision QEMU and the test guest into a cache "
     "(idempotent; about a second when warm).", _setup_arguments, _setup),
    ("run", RUN_HELP, RUN_DESCRIPTION, _run_arguments, _run),
    ("docs", DOCS_HELP, "Regenerate (or check) the generated part of qemu-configs/README.md "
     "from configs.toml.", _docs_arguments, _docs),
)


def add_commands(parent: argparse.ArgumentParser) -> None:
    """Give ``parent`` the subcommands setup, run and docs; a parsed namespace's
    ``qemu_main(args)`` runs the chosen one and returns its exit code."""
    sub = parent.add_subparsers(dest="qemu_command", required=True, metavar="COMMAND")
    for name, help_, description, arguments, handler in COMMANDS:
        p = sub.add_parser(name, help=help_, description=description)
        arguments(p)
        p.set_defaults(qemu_main=handler)


def _standalone(name: str) -> argparse.ArgumentParser:
    for cmd, _help, description, arguments, _handler in COMMANDS:
        if cmd == name:
            p = argparse.ArgumentParser(prog=f"vfiouser-srv qemu {cmd}", description=description)
            arguments(p)
            return p
    raise KeyError(name)


def make_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m vfiouser_srv.qemu``."""
    p = argparse.ArgumentParser(
        prog="python -m vfiouser_srv.qemu",
        description="Provision and launch QEMU guests (same as `vfiouser-srv qemu`).",
    )
    add_commands(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vfiouser_srv.qemu {setup,run,docs} ...``."""
    args = make_parser().parse_args(argv)
    try:
        return int(args.qemu_main(args))
    except BrokenPipeError:
        return quiet_broken_pipe()
    except KeyboardInterrupt:
        return 130


def quiet_broken_pipe() -> int:
    """The reader of our stdout went away (``... | head``): exit 1 without a traceback.

    Python would otherwise report the error again when it flushes stdout at exit, so stdout
    is pointed at /dev/null first (the recipe of the ``signal`` module's documentation).
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
    return 1

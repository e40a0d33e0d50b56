"""Command-line entry points: ``setup_main(argv)`` and ``run_main(argv)`` return exit codes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from .configs import ConfigError, load_configs, readme_is_current, shell_line, update_readme
from .launcher import LaunchError, RunResult, run_config
from .provision import ProvisionError, describe, find_qemu, provision

__all__ = ["main", "run_main", "setup_main"]


def setup_main(argv: Sequence[str]) -> int:
    """``qemu setup [--cache DIR] [--mirror URL] [--force]``: provision the cache."""
    p = argparse.ArgumentParser(
        prog="vfiouser-srv qemu setup",
        description="Provision QEMU and the test guest into a cache.",
    )
    p.add_argument(
        "--cache", help="cache folder (default $VFIOUSER_SRV_CACHE or ~/.cache/vfiouser-srv)"
    )
    p.add_argument(
        "--mirror",
        help="Debian mirror (default $VFIOUSER_SRV_DEBIAN_MIRROR or http://deb.debian.org/debian)",
    )
    p.add_argument("--force", action="store_true", help="rebuild everything")
    args = p.parse_args(list(argv))
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


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vfiouser-srv qemu run",
        description="Boot the test guest with a configuration from qemu-configs/configs.toml "
        "(starting our server when the configuration has one) and report what the guest saw.",
    )
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
    p.add_argument("--qemu-arg", action="append", default=[], help="extra QEMU argument")
    p.add_argument("--quiet", action="store_true", help="do not echo the whole console")
    p.add_argument("--demo", action="store_true",
                   help="echo only what the guest saw (INFO/RESULT/STAGE lines)")
    return p


def _print_summary(res: RunResult) -> None:
    print(res.summary())
    if res.trace_path:
        print(f"trace: {res.trace_path}")


def run_main(argv: Sequence[str]) -> int:
    """``qemu run CONFIG [options]``: exit 0 when the guest powered off after a passing test."""
    args = _run_parser().parse_args(list(argv))
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


def docs_main(argv: Sequence[str]) -> int:
    """``qemu docs [--check]``: regenerate (or check) qemu-configs/README.md from the TOML."""
    cf = load_configs()
    if "--check" in argv:
        ok = readme_is_current(cf)
        print("README up to date" if ok else "README out of date: run `python -m "
              "vfiouser_srv.qemu docs`")
        return 0 if ok else 1
    print("README updated" if update_readme(cf) else "README already up to date")
    return 0


def main(argv: Sequence[str]) -> int:
    """Dispatch ``setup`` / ``run``."""
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m vfiouser_srv.qemu {setup,run,docs} ...")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "setup":
        return setup_main(rest)
    if cmd == "run":
        return run_main(rest)
    if cmd == "docs":
        return docs_main(rest)
    print(f"unknown command {cmd!r}; expected setup, run or docs", file=sys.stderr)
    return 2

"""Every command's ``--help`` prints that command's own usage and exits 0, doing nothing else.

The commands are found by walking the parsers' subcommands, so a new subcommand is covered
without touching this file. Also the CLI's behaviour at a closed pipe (``... | head``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from vfiouser_srv import cli
from vfiouser_srv.qemu import cli as qemu_cli
from vfiouser_srv.qemu.configs import configs_dir

REPO = Path(__file__).resolve().parents[1]


def walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every command path of `parser`, the parser itself first: (), ("serve",), ..."""
    yield path
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, (*path, name))


FRONT_ENDS: dict[str, tuple[Callable[[], argparse.ArgumentParser],
                            Callable[[Sequence[str]], int], str]] = {
    "vfiouser-srv": (cli.make_parser, cli.main, "vfiouser-srv"),
    "python -m vfiouser_srv.qemu": (qemu_cli.make_parser, qemu_cli.main,
                                    "python -m vfiouser_srv.qemu"),
}
CASES = [
    pytest.param(front, path, id=" ".join((front, *path)))
    for front, (make, _main, _prog) in FRONT_ENDS.items()
    for path in walk(make())
]


def test_the_walk_finds_the_nested_commands() -> None:
    paths = set(walk(cli.make_parser()))
    assert {("serve",), ("devices",), ("qemu",), ("qemu", "run"), ("qemu", "setup"),
            ("qemu", "docs")} <= paths


@pytest.mark.parametrize(("front", "path"), CASES)
def test_help_is_the_commands_own(front: str, path: tuple[str, ...]) -> None:
    _make, main, prog = FRONT_ENDS[front]
    readme = configs_dir() / "README.md"
    before = readme.stat().st_mtime_ns
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        main([*path, "--help"])
    assert exit_.value.code == 0
    text = out.getvalue()
    usage = " ".join(text.split())  # argparse wraps long usage lines
    assert usage.startswith(f"usage: {' '.join((prog, *path))} "), text[:200]
    assert "-h, --help" in text
    assert readme.stat().st_mtime_ns == before, "--help must not run the command"


def _run(*argv: str, stdout: int = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *argv], stdout=stdout, stderr=subprocess.PIPE,
                          text=True, cwd=REPO, timeout=60, check=False)


def test_qemu_docs_help_in_a_process_does_not_regenerate() -> None:
    readme = configs_dir() / "README.md"
    before = readme.stat().st_mtime_ns
    result = _run("-m", "vfiouser_srv.qemu", "docs", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m vfiouser_srv.qemu docs")
    assert "README updated" not in result.stdout
    assert "README already up to date" not in result.stdout
    assert readme.stat().st_mtime_ns == before


def test_subcommand_help_through_the_entry_point() -> None:
    result = _run("-m", "vfiouser_srv", "qemu", "run", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ")
    assert "--demo" in result.stdout  # run's options, not the qemu group's usage


@pytest.mark.parametrize("argv", [("-m", "vfiouser_srv", "devices"),
                                  ("-m", "vfiouser_srv.qemu", "run", "--list")],
                         ids=["devices", "qemu-run-list"])
def test_closed_pipe_is_not_a_traceback(argv: tuple[str, ...]) -> None:
    """`vfiouser-srv devices | head`: the reader is gone before we write."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = _run(*argv, stdout=write_end)
    finally:
        os.close(write_end)
    assert "Traceback" not in result.stderr, result.stderr
    assert "BrokenPipeError" not in result.stderr
    assert result.returncode == 1

"""protocol/__init__.py: the public surface, and no I/O anywhere in the package."""

from __future__ import annotations

import ast
import pathlib
import types

import protocol


def test_all_is_complete_and_importable() -> None:
    assert len(protocol.__all__) == len(set(protocol.__all__))
    for name in protocol.__all__:
        assert not name.startswith("_")
        assert hasattr(protocol, name), name
    exported = {
        name for name, value in vars(protocol).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert exported == set(protocol.__all__)


def test_no_networking_or_clock_imports() -> None:
    forbidden = {"socket", "trio", "asyncio", "select", "selectors", "time", "os", "threading",
                 "subprocess"}
    root = pathlib.Path(protocol.__file__).parent
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module.split(".")[0]]
            else:
                continue
            assert not forbidden & set(names), f"{path.name} imports {names}"

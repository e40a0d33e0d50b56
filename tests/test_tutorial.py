"""docs/tutorial.md runs as written: its ```python blocks are written to files and tested.

A block starting with ``# file: NAME`` is written to ``tmp_path/NAME``; a block without one
is executed as it is. The model is imported and served by the CLI's resolver, and the test
file is run by pytest in a subprocess (the plugin comes from the ``pytest11`` entry point,
as in a device author's repository). The README's plugin example is checked to be
``tests/test_plugin_example.py`` verbatim.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from devices.registry import resolve
from devices.sdk.interface import DeviceModel

REPO = Path(__file__).resolve().parents[1]
TUTORIAL = REPO / "docs" / "tutorial.md"
FENCE = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)


def python_blocks(text: str) -> list[str]:
    return FENCE.findall(text)


def write_blocks(dest: Path) -> dict[str, Path]:
    """Write every ``# file:`` block; run the others; return the files by name."""
    files: dict[str, Path] = {}
    for block in python_blocks(TUTORIAL.read_text()):
        first, _, _rest = block.partition("\n")
        m = re.fullmatch(r"# file: (\S+)", first.strip())
        if m:
            files[m.group(1)] = dest / m.group(1)
            files[m.group(1)].write_text(block)
        else:
            exec(compile(block, str(TUTORIAL), "exec"), {})
    return files


def test_the_tutorial_has_a_model_and_a_test() -> None:
    names = [b.partition("\n")[0] for b in python_blocks(TUTORIAL.read_text())]
    assert names == ["# file: filler.py", "# file: test_filler.py"]


def test_the_tutorial_model_resolves(tmp_path: Path) -> None:
    files = write_blocks(tmp_path)
    cls = resolve(f"{files['filler.py']}:Filler")
    assert issubclass(cls, DeviceModel) and cls.name == "filler"
    cls()


def run_pytest(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    files = write_blocks(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    # -p trio: pytest-trio for the async fixtures; rootdir is tmp_path, so the project's
    # pytest settings (trio_mode) do not apply, as in an author's repository
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir",
         str(tmp_path), "-c", os.devnull, str(files["test_filler.py"]), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)


def test_the_tutorial_client_test_passes(tmp_path: Path) -> None:
    proc = run_pytest(tmp_path, "-m", "not qemu")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed, 1 deselected" in proc.stdout, proc.stdout


@pytest.mark.qemu
def test_the_tutorial_guest_test_passes(vfu_qemu_ready: None, tmp_path: Path) -> None:
    proc = run_pytest(tmp_path, "-m", "qemu")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed, 1 deselected" in proc.stdout, proc.stdout


def test_the_readme_shows_the_plugin_example_verbatim() -> None:
    readme = (REPO / "README.md").read_text()
    example = (REPO / "tests" / "test_plugin_example.py").read_text()
    assert f"```python\n{example}```" in readme

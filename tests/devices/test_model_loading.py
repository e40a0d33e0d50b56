"""Models from outside the package: FILE.py:CLASS, MODULE:CLASS, installed entry points.

Every way a model can fail to load gives one line naming the file (or module) and the
reason, exit 2 from the command line, and never a traceback (devices/registry.py).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

import devices
from devices.registry import ENTRY_POINT_GROUP, ModelError, resolve
from devices.sdk import PciDevice
from vfiouser_srv import cli

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "copyengine.py"

TINY = '''
from devices.sdk import Bar, PciDevice, PciIdentity, Register, RegisterBank


class Tiny(PciDevice):
    name = "tiny-plugin"
    description = "a model from an installed package"
    identity = PciIdentity(vendor_id=0x1234, device_id=0x0001, class_code=0xFF0000)

    def __init__(self) -> None:
        self.regs = RegisterBank([Register("ID", 0x00, reset=0x7E57)])
        super().__init__(bars=[Bar(0, 0x1000, backing=self.regs)])


class NotAModel:
    pass
'''


def test_a_file_path_names_a_model() -> None:
    cls = resolve(f"{EXAMPLE}:CopyEngine")
    assert issubclass(cls, PciDevice) and cls.name == "copyengine"
    assert resolve(f"{EXAMPLE}:CopyEngine") is cls  # imported once
    dev = devices.create(f"{EXAMPLE}:CopyEngine", {})
    assert type(dev) is cls
    dev.close()


def test_a_relative_file_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    assert resolve("./examples/copyengine.py:CopyEngine").name == "copyengine"
    assert devices.model_name("examples/copyengine.py:CopyEngine") == "copyengine"


def test_a_module_names_a_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "mypkg_models"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "devs.py").write_text(TINY)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert resolve("mypkg_models.devs:Tiny").name == "tiny-plugin"
    finally:
        for name in ("mypkg_models", "mypkg_models.devs"):
            sys.modules.pop(name, None)


@pytest.mark.parametrize(
    ("source", "spec", "needles"),
    [
        (None, "missing.py:X", ["missing.py: no such file"]),
        ("x = (\n", "bad.py:X", ["bad.py: cannot import: SyntaxError", "(line 1)"]),
        ("import os\n\nraise RuntimeError('boom')\n", "boom.py:X",
         ["boom.py: cannot import: RuntimeError: boom (line 3)"]),
        (TINY, "tiny.py:Nope", ["tiny.py: has no 'Nope' (models there: Tiny)"]),
        (TINY, "tiny.py:NotAModel", ["tiny.py:NotAModel: class NotAModel is not a device model"]),
        (TINY, "tiny.py:PciIdentity", ["is not a device model"]),
        (TINY, "tiny.py:", ["name the class after the colon"]),
        (None, "no_such_pkg_zz.devs:X", ["no module named 'no_such_pkg_zz'"]),
        (None, "json:dumps", ["json:dumps: a function is not a device model"]),
    ],
)
def test_bad_models_are_one_clean_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    source: str | None,
    spec: str,
    needles: list[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    if source is not None:
        (tmp_path / spec.partition(":")[0]).write_text(source)
    with pytest.raises(ModelError) as info:
        resolve(spec)
    for needle in needles:
        assert needle in str(info.value)
    # the command line: one line on stderr, exit 2, no socket left behind
    sock = tmp_path / "s.sock"
    assert cli.main(["serve", spec, "--socket-path", str(sock)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("vfiouser-srv: "), err
    assert needles[0] in err
    assert not sock.exists()


def test_unknown_name_mentions_file_syntax() -> None:
    with pytest.raises(ModelError, match=r"unknown device model 'nope'.*FILE\.py:CLASS"):
        resolve("nope")


def _install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entry_points: str) -> None:
    """A package 'installed' in tmp_path: its module and a dist-info with entry points."""
    (tmp_path / "vfu_plugin_zz.py").write_text(TINY)
    info = tmp_path / "vfu_plugin_zz-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vfu-plugin-zz\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{entry_points}")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    monkeypatch.delitem(sys.modules, "vfu_plugin_zz", raising=False)


def test_entry_point_models_are_listed_and_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _install(tmp_path, monkeypatch, "tiny-plugin = vfu_plugin_zz:Tiny\n")
    assert cli.main(["devices"]) == 0
    out, err = capsys.readouterr()
    assert "tiny-plugin: a model from an installed package" in out
    assert "edu: " in out and err == ""
    dev = devices.create("tiny-plugin", {})
    assert type(dev).__name__ == "Tiny"
    dev.close()


def test_a_broken_entry_point_is_reported_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _install(tmp_path, monkeypatch, "broken = vfu_plugin_zz:NotAModel\nedu = vfu_plugin_zz:Tiny\n")
    assert cli.main(["devices"]) == 0
    out, err = capsys.readouterr()
    assert "edu: QEMU's educational" in out  # a plugin cannot shadow a built-in model
    assert "broken" not in out
    assert "entry point broken = 'vfu_plugin_zz:NotAModel'" in err
    assert "is not a device model" in err and "Traceback" not in err
    assert "edu' is a built-in model" in err
    assert cli.main(["serve", "broken", "--socket-path", str(tmp_path / "s.sock")]) == 2
    assert "is not a device model" in capsys.readouterr().err


def test_qemu_run_model_option_makes_a_relative_file_absolute(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from vfiouser_srv.qemu.launcher import _absolute_model

    monkeypatch.chdir(REPO)
    args = cli.make_parser().parse_args(
        ["qemu", "run", "edu", "--model", "./examples/copyengine.py:CopyEngine"]
    )
    assert args.model == "./examples/copyengine.py:CopyEngine"
    assert _absolute_model(args.model) == f"{EXAMPLE}:CopyEngine"
    assert _absolute_model("mypkg.devices:CopyEngine") == "mypkg.devices:CopyEngine"
    assert _absolute_model("nvme") == "nvme"

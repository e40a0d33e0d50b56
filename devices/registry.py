"""Which class a model name means: built-in models, installed ones, and files or modules.

A model is named on the command line, in a config file's `model` key and by `qemu run
--model` in one of three ways:

- a built-in name (`edu`, `nvme`, ... : `BUILTIN`);
- `FILE.py:CLASS` (`./mydev.py:CopyEngine`) or `MODULE:CLASS` (`mypkg.devices:CopyEngine`):
  a model outside this package, imported when named;
- a name an installed package registers in the `vfiouser_srv.devices` entry-point group
  (`[project.entry-points."vfiouser_srv.devices"] copyengine = "mypkg.devices:CopyEngine"`),
  listed by `vfiouser-srv devices` too.

Whatever goes wrong while importing one (a missing file, a syntax error, a missing attribute,
a class that is not a `DeviceModel`) is a `ModelError` whose one line names the file or
module and the reason; no traceback reaches the user.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import sys
import traceback
import zlib
from pathlib import Path

from devices.edu import Edu
from devices.lvu_sample import LvuSample
from devices.nvme import Nvme
from devices.sdk.interface import DeviceModel
from devices.sdk.options import OptionError
from devices.virtio.blk import VirtioBlk
from devices.virtio.net import VirtioNet

log = logging.getLogger("devices")

#: the entry-point group an installed package lists its models in
ENTRY_POINT_GROUP = "vfiouser_srv.devices"

#: the models of this package by name (`devices.MODELS`; adding to it registers a model)
BUILTIN: dict[str, type[DeviceModel]] = {
    Edu.name: Edu,
    LvuSample.name: LvuSample,
    Nvme.name: Nvme,
    VirtioBlk.name: VirtioBlk,
    VirtioNet.name: VirtioNet,
}


class ModelError(OptionError):
    """A model name that does not resolve to a `DeviceModel` class; the message says why."""


def is_reference(spec: str) -> bool:
    """Whether `spec` names a file or module (`X:CLASS`) rather than a registered name."""
    return ":" in spec


def resolve(spec: str) -> type[DeviceModel]:
    """The model class `spec` names (see the module docstring); raises ModelError."""
    cls = BUILTIN.get(spec)
    if cls is not None:
        return cls
    if is_reference(spec):
        where, _, attr = spec.rpartition(":")
        return _attribute(spec, _import(where), attr)
    installed = entry_points()
    if spec in installed:
        return _load_entry_point(spec, installed[spec])
    known = ", ".join(sorted({*BUILTIN, *installed})) or "none"
    raise ModelError(
        f"unknown device model {spec!r} (known: {known}; or FILE.py:CLASS, MODULE:CLASS)"
    )


def entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    """Installed models by name (`vfiouser_srv.devices`), not imported yet."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def available() -> tuple[dict[str, type[DeviceModel]], list[str]]:
    """Every model `vfiouser-srv devices` lists, and one line per installed model that
    failed to load (a broken plugin must not hide the others)."""
    models = dict(BUILTIN)
    problems = []
    for name, ep in entry_points().items():
        if name in models:
            problems.append(f"{ep.value}: not listed: {name!r} is a built-in model")
            continue
        try:
            models[name] = _load_entry_point(name, ep)
        except ModelError as exc:
            problems.append(str(exc))
    return models, problems


def model_name(spec: str) -> str:
    """The name a device gets by default: the class's `name` for a file or module."""
    if not is_reference(spec):
        return spec
    cls = resolve(spec)
    return cls.name or cls.__name__.lower()


def _load_entry_point(name: str, ep: importlib.metadata.EntryPoint) -> type[DeviceModel]:
    where = f"entry point {name} = {ep.value!r} ({ENTRY_POINT_GROUP})"
    try:
        obj = ep.load()
    except Exception as exc:  # any import error of someone else's package: one line
        raise ModelError(f"{where}: cannot import: {_reason(exc, None)}") from None
    return _check(where, obj)


def _import(where: str) -> object:
    if where.endswith(".py") or "/" in where:
        return _import_file(where)
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as exc:
        if exc.name is not None and where.startswith(exc.name):
            raise ModelError(
                f"{where}: no module named {exc.name!r} on sys.path (a file: FILE.py:CLASS)"
            ) from None
        raise ModelError(f"{where}: cannot import: {_reason(exc, None)}") from None
    except Exception as exc:
        raise ModelError(f"{where}: cannot import: {_reason(exc, None)}") from None


def _import_file(where: str) -> object:
    path = Path(where).expanduser().resolve()
    if not path.is_file():
        raise ModelError(f"{where}: no such file")
    # One module per file, under a name of its own, so importing it twice reuses it and
    # dataclasses/pickle find it in sys.modules.
    name = f"vfiouser_srv_model_{zlib.crc32(str(path).encode()):08x}_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelError(f"{where}: cannot import: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        del sys.modules[name]
        if not isinstance(exc, Exception):
            raise
        raise ModelError(f"{where}: cannot import: {_reason(exc, path)}") from None
    return module


def _attribute(spec: str, module: object, attr: str) -> type[DeviceModel]:
    where, _, _ = spec.rpartition(":")
    if not attr:
        raise ModelError(f"{spec}: name the class after the colon (FILE.py:CLASS)")
    try:
        obj = getattr(module, attr)
    except AttributeError:
        models = sorted(
            n for n, v in vars(module).items()
            if isinstance(v, type) and issubclass(v, DeviceModel) and v.__module__ == getattr(
                module, "__name__", None)
        )
        hint = f" (models there: {', '.join(models)})" if models else ""
        raise ModelError(f"{where}: has no {attr!r}{hint}") from None
    return _check(spec, obj)


def _check(where: str, obj: object) -> type[DeviceModel]:
    if not (isinstance(obj, type) and issubclass(obj, DeviceModel)) or obj is DeviceModel:
        what = f"class {obj.__name__}" if isinstance(obj, type) else f"a {type(obj).__name__}"
        raise ModelError(
            f"{where}: {what} is not a device model (it must subclass devices.sdk.DeviceModel, "
            "e.g. PciDevice)"
        )
    return obj


def _reason(exc: BaseException, path: Path | None) -> str:
    """`TypeName: message`, with the line of `path` (or the innermost line) it came from."""
    if isinstance(exc, SyntaxError):
        return f"SyntaxError: {exc.msg} (line {exc.lineno})"
    frames = traceback.extract_tb(exc.__traceback__)
    mine = [f for f in frames if path is not None and Path(f.filename) == path]
    at = mine[-1] if mine else (frames[-1] if frames else None)
    line = ""
    if at is not None:
        line = f" (line {at.lineno})" if mine else f" ({at.filename}:{at.lineno})"
    return f"{type(exc).__name__}: {exc}{line}"

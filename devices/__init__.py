"""Device models and the registry the CLI builds them from.

`create(name, options)` turns `--set KEY=VALUE` strings into typed keyword arguments for
the model's constructor, checked against the model's `OptionSpec`s, so every model gets
the same parsing and the same error messages (devices/sdk/options.py). A model's `__init__`
takes its options as keyword arguments named after them. `name` is a built-in model, an
installed one or `FILE.py:CLASS` / `MODULE:CLASS` (devices/registry.py).
"""

from __future__ import annotations

from devices.registry import BUILTIN, ModelError, available, model_name, resolve
from devices.sdk.interface import DeviceModel
from devices.sdk.options import OptionError, parse_option, parse_options

#: the built-in models by name (add to it to register a model in-process)
MODELS: dict[str, type[DeviceModel]] = BUILTIN


def create(name: str, options: dict[str, str]) -> DeviceModel:
    """Build model `name` with `options` (KEY -> VALUE text); raises OptionError."""
    cls = resolve(name)
    kwargs = parse_options(name, cls.options, options)
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise OptionError(f"{name}: {exc}") from None


__all__ = [
    "MODELS",
    "ModelError",
    "OptionError",
    "available",
    "create",
    "model_name",
    "parse_option",
    "resolve",
]

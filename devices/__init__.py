"""Device models and the registry the CLI builds them from.

`create(name, options)` turns `--set KEY=VALUE` strings into typed keyword arguments for
the model's constructor, checked against the model's `OptionSpec`s, so every model gets
the same parsing and the same error messages. A model's `__init__` takes its options as
keyword arguments named after them.
"""

from __future__ import annotations

from typing import Any

from devices.edu import Edu
from devices.lvu_sample import LvuSample
from devices.nvme import Nvme
from devices.sdk.interface import DeviceModel, OptionSpec
from devices.virtio.blk import VirtioBlk
from devices.virtio.net import VirtioNet

MODELS: dict[str, type[DeviceModel]] = {
    Edu.name: Edu,
    LvuSample.name: LvuSample,
    Nvme.name: Nvme,
    VirtioBlk.name: VirtioBlk,
    VirtioNet.name: VirtioNet,
}

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class OptionError(ValueError):
    """A `--set` option is unknown or its value does not parse; the message says which."""


def parse_option(model: str, spec: OptionSpec, text: str) -> Any:
    """Convert one option's text to its declared type (ints accept 0x/0o/0b prefixes)."""
    try:
        if spec.type is bool:
            lowered = text.strip().lower()
            if lowered in _TRUE:
                return True
            if lowered in _FALSE:
                return False
            raise ValueError("expected one of " + ", ".join(sorted(_TRUE | _FALSE)))
        if spec.type is int:
            return int(text.strip().replace("_", ""), 0)
        return spec.type(text)
    except ValueError as exc:
        raise OptionError(
            f"{model}: bad value {text!r} for {spec.name} ({spec.type.__name__}): {exc}"
        ) from None


def create(name: str, options: dict[str, str]) -> DeviceModel:
    """Build model `name` with `options` (KEY -> VALUE text); raises OptionError."""
    cls = MODELS.get(name)
    if cls is None:
        known = ", ".join(sorted(MODELS)) or "none"
        raise OptionError(f"unknown device model {name!r} (known: {known})")
    specs = {spec.name: spec for spec in cls.options}
    unknown = sorted(set(options) - set(specs))
    if unknown:
        accepted = ", ".join(sorted(specs)) or "no options"
        raise OptionError(f"{name}: unknown option(s) {', '.join(unknown)} (accepted: {accepted})")
    kwargs = {key: parse_option(name, specs[key], text) for key, text in options.items()}
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise OptionError(f"{name}: {exc}") from None


__all__ = ["MODELS", "OptionError", "create", "parse_option"]

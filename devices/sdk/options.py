"""Option values of `--set KEY=VALUE`: one parser, one size syntax, old names accepted.

Every model's options are declared as `OptionSpec`s and parsed here, so the same spelling
means the same thing for every model: a byte count is a `Size` (`4096`, `512K`, `64M`, `1G`,
`2T`: binary units, as qemu-img), a list of them (`1G:256M`, nvme's one size per namespace)
a `SizeList`. An option renamed keeps its old name in `OptionSpec.aliases` for a while: it
still works, with a `DeprecationWarning` and a log line naming the new spelling.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Mapping
from typing import Any

from devices.sdk.interface import OptionSpec

log = logging.getLogger("devices")

#: what `vfiouser-srv devices` and the error messages say a size may be
SIZE_SYNTAX = "bytes, or K/M/G/T: powers of two, 64M = 64 MiB"

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgtKMGT]?)(?:i?[bB])?\s*$")
_UNITS = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class OptionError(ValueError):
    """A `--set` option is unknown or its value does not parse; the message says which."""


class Size(int):
    """A byte count option: plain bytes or a binary unit (`512K`, `64M`, `1G`, `2T`)."""


class SizeList(str):
    """`:`-separated sizes (`1G:256M`), each a `Size`; the model splits them itself."""


def parse_size(text: str) -> int:
    """`1G`, `64M`, `512K`, `4096`: binary units, as qemu-img and QEMU's size options."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"bad size {text!r} (examples: 1G, 64M, 1048576)")
    return int(m.group(1)) << _UNITS[m.group(2).lower()]


def type_label(spec: OptionSpec) -> str:
    """How `vfiouser-srv devices` names an option's type (sizes with their units)."""
    if spec.type is Size:
        return f"size ({SIZE_SYNTAX})"
    if spec.type is SizeList:
        return f"size[:size...] ({SIZE_SYNTAX})"
    return str(spec.type.__name__)


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
        if spec.type is Size:
            return parse_size(text)
        if spec.type is SizeList:
            for part in text.split(":"):
                if part:
                    parse_size(part)
            return text
        return spec.type(text)
    except ValueError as exc:
        raise OptionError(
            f"{model}: bad value {text!r} for {spec.name} ({spec.type.__name__}): {exc}"
        ) from None


def parse_options(
    model: str, specs: tuple[OptionSpec, ...], options: Mapping[str, str]
) -> dict[str, Any]:
    """`options` (KEY -> VALUE text) as keyword arguments; old names map to the new ones."""
    by_name = {spec.name: spec for spec in specs}
    aliases = {old: spec for spec in specs for old in spec.aliases}
    unknown = sorted(set(options) - set(by_name) - set(aliases))
    if unknown:
        accepted = ", ".join(sorted(by_name)) or "no options"
        raise OptionError(f"{model}: unknown option(s) {', '.join(unknown)} (accepted: {accepted})")
    kwargs: dict[str, Any] = {}
    for key, text in options.items():
        spec = by_name.get(key)
        if spec is None:
            spec = aliases[key]
            if spec.name in options:
                raise OptionError(f"{model}: give {spec.name}= only ({key}= is its old name)")
            message = f"{model}: option {key}= is deprecated; write {spec.name}="
            warnings.warn(message, DeprecationWarning, stacklevel=2)
            log.warning("%s", message)
        kwargs[spec.name] = parse_option(model, spec, text)
    return kwargs

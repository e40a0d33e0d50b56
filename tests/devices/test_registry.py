"""devices.create: option parsing and error messages."""

from __future__ import annotations

import pytest

import devices
from devices.edu import DEFAULT_DMA_MASK, Edu
from devices.sdk.interface import OptionSpec


def test_registry_lists_edu() -> None:
    assert devices.MODELS["edu"] is Edu
    assert all(name == cls.name for name, cls in devices.MODELS.items())


def test_create_with_defaults() -> None:
    dev = devices.create("edu", {})
    assert isinstance(dev, Edu) and dev.dma_mask == DEFAULT_DMA_MASK


@pytest.mark.parametrize("text", ["0xffffffff", "4294967295", "0xffff_ffff"])
def test_int_option_accepts_prefixes(text: str) -> None:
    dev = devices.create("edu", {"dma_mask": text})
    assert isinstance(dev, Edu) and dev.dma_mask == 0xFFFF_FFFF


def test_unknown_model() -> None:
    with pytest.raises(devices.OptionError, match=r"unknown device model 'nope' \(known: edu"):
        devices.create("nope", {})


def test_unknown_option_lists_accepted() -> None:
    with pytest.raises(devices.OptionError, match=r"unknown option\(s\) colour .*dma_mask"):
        devices.create("edu", {"colour": "red"})


def test_bad_value() -> None:
    with pytest.raises(devices.OptionError, match=r"bad value 'lots' for dma_mask \(int\)"):
        devices.create("edu", {"dma_mask": "lots"})


def test_model_validation_error_is_an_option_error() -> None:
    with pytest.raises(devices.OptionError, match="dma_mask"):
        devices.create("edu", {"dma_mask": "0"})


@pytest.mark.parametrize(("text", "value"), [("on", True), ("No", False), ("1", True)])
def test_bool_parsing(text: str, value: bool) -> None:
    spec = OptionSpec("flag", bool, False, "")
    assert devices.parse_option("m", spec, text) is value
    with pytest.raises(devices.OptionError):
        devices.parse_option("m", spec, "maybe")

"""One vocabulary for block models: `backing=` for the image, `size=` in bytes or K/M/G/T.

The old spelling (virtio-blk's `path=`) still works, with a DeprecationWarning and a log line;
`vfiouser-srv devices` shows the size units (devices/sdk/options.py).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

import devices
from devices.sdk.options import OptionError, parse_size
from vfiouser_srv import cli

BLOCK_MODELS = ("nvme", "virtio-blk")


@pytest.mark.parametrize(
    ("text", "value"),
    [("4096", 4096), ("512K", 512 << 10), ("64M", 64 << 20), ("1G", 1 << 30), ("2T", 2 << 40),
     ("64m", 64 << 20), ("64MiB", 64 << 20)],
)
def test_size_syntax(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("model", BLOCK_MODELS)
def test_every_block_model_takes_backing_and_a_size_with_units(model: str, tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    dev = devices.create(model, {"backing": str(img), "size": "2M"})
    try:
        assert os.path.getsize(img) == 2 << 20
    finally:
        dev.close()


@pytest.mark.parametrize("model", BLOCK_MODELS)
def test_a_bad_size_names_the_syntax(model: str) -> None:
    with pytest.raises(OptionError, match=r"bad value '64Q' for size .*examples: 1G, 64M"):
        devices.create(model, {"size": "64Q"})


def test_virtio_blk_size_in_plain_bytes_still_works() -> None:
    dev = devices.create("virtio-blk", {"size": str(1 << 20)})
    try:
        assert dev.capacity == (1 << 20) // 512  # type: ignore[attr-defined]
    finally:
        dev.close()


def test_old_path_spelling_works_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    img = tmp_path / "old.img"
    deprecated = r"virtio-blk: option path= is deprecated; write backing="
    with (
        caplog.at_level(logging.WARNING, logger="devices"),
        pytest.warns(DeprecationWarning, match=deprecated),
    ):
        dev = devices.create("virtio-blk", {"path": str(img), "size": "1M"})
    dev.close()
    assert os.path.getsize(img) == 1 << 20
    assert "path= is deprecated; write backing=" in caplog.text


def test_old_and_new_spelling_together_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(OptionError, match=r"give backing= only \(path= is its old name\)"):
        devices.create("virtio-blk", {"path": "a.img", "backing": "b.img"})


def test_devices_lists_the_units_and_old_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["devices"]) == 0
    out = capsys.readouterr().out
    blk = out[out.index("virtio-blk:"):]
    nvme = out[out.index("nvme:"):]
    assert "    backing=str" in blk and "(old name: path)" in blk
    assert "    size=size (bytes, or K/M/G/T: powers of two" in blk
    assert "    size=size[:size...] (bytes, or K/M/G/T" in nvme

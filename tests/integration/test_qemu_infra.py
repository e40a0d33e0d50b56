"""Fast checks of the QEMU tooling itself (no QEMU needed)."""

from __future__ import annotations

import gzip
import stat

import pytest

from vfiouser_srv.qemu.configs import load_configs, readme_is_current
from vfiouser_srv.qemu.cpio import CpioWriter, gzip_bytes
from vfiouser_srv.qemu.guest import build_test_cpio
from vfiouser_srv.qemu.launcher import guest_append


def _parse_newc(data: bytes) -> list[tuple[str, int, bytes]]:
    out, pos = [], 0
    while True:
        assert data[pos:pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name = data[pos + 110: pos + 110 + namesize - 1].decode()
        pos = (pos + 110 + namesize + 3) & ~3
        body = data[pos: pos + size]
        pos = (pos + size + 3) & ~3
        if name == "TRAILER!!!":
            return out
        out.append((name, mode, body))


def test_cpio_newc_layout_and_determinism() -> None:
    w = CpioWriter()
    w.add_file("a/b/test.sh", b"echo hi\n", 0o755)
    w.add_symlink("bin/sh", "busybox")
    w.add_chardev("dev/console", 5, 1)
    data = w.render()
    entries = {n: (m, b) for n, m, b in _parse_newc(data)}
    assert stat.S_ISDIR(entries["a"][0]) and stat.S_ISDIR(entries["a/b"][0])
    assert entries["a/b/test.sh"] == (stat.S_IFREG | 0o755, b"echo hi\n")
    assert entries["bin/sh"] == (stat.S_IFLNK | 0o777, b"busybox")
    assert stat.S_ISCHR(entries["dev/console"][0])
    assert gzip_bytes(data) == gzip_bytes(w.render())
    assert gzip.decompress(build_test_cpio({"test.sh": b"x"})).startswith(b"070701")


def test_configs_load_and_readme_is_generated_from_them() -> None:
    cf = load_configs()
    assert {"none", "edu", "edu-noshare", "qemu-edu", "qemu-edu-noshare"} <= set(cf.configs)
    args = cf.qemu_args(cf.get("edu"), values={"SOCKET": "/s"})
    assert any('"driver":"vfio-user-pci"' in a and '"path":"/s"' in a for a in args)
    assert "share=on" in " ".join(args)
    assert "share=on" not in " ".join(cf.qemu_args(cf.get("edu-noshare")))
    assert "kvm" in cf.qemu_args(cf.get("none"), accel="kvm")
    assert readme_is_current(cf), "run `python -m vfiouser_srv.qemu docs`"


def test_guest_append_words() -> None:
    cf = load_configs()
    line = guest_append(cf, cf.get("edu"), {"edu_steps": "ident,dma"}, ["loglevel=7"])
    assert "vfu_modules=uio_pci_generic" in line and "vfu_edu_steps=ident,dma" in line
    assert line.endswith("loglevel=7") and "memmap=8K$0xf000000" in line
    with pytest.raises(ValueError):
        guest_append(cf, cf.get("edu"), {"x": "a b"}, [])

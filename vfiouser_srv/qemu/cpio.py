"""A minimal, deterministic writer for the ``newc`` cpio format the Linux initramfs reads.

Why our own writer: the host may not have ``cpio``, and we want byte-identical archives for
identical inputs (mtime 0, uid/gid 0, sorted entries, gzip without a timestamp) so that the
content hash of the guest image is stable and a warm setup can skip rebuilding it.
"""

from __future__ import annotations

import gzip
import io
import stat
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CpioEntry", "CpioWriter", "gzip_bytes"]

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class CpioEntry:
    """One archive member; ``mode`` includes the file type bits (``stat.S_IFREG`` ...)."""

    name: str
    mode: int
    data: bytes = b""
    rdev_major: int = 0
    rdev_minor: int = 0

    def __post_init__(self) -> None:
        if not self.name or self.name.startswith("/"):
            raise ValueError(f"cpio names are relative and non-empty, got {self.name!r}")
        if not stat.S_ISREG(self.mode) and not stat.S_ISLNK(self.mode) and self.data:
            raise ValueError(f"{self.name}: only files and symlinks carry data")


@dataclass
class CpioWriter:
    """Collects entries, then renders them as one newc archive (``render``)."""

    entries: dict[str, CpioEntry] = field(default_factory=dict)

    def add_dir(self, name: str, mode: int = 0o755) -> None:
        """Add a directory and, implicitly, its missing parents."""
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub not in self.entries:
                self.entries[sub] = CpioEntry(sub, stat.S_IFDIR | mode)

    def _parent(self, name: str) -> None:
        parent = name.strip("/").rpartition("/")[0]
        if parent:
            self.add_dir(parent)

    def add_file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        """Add a regular file (parents are created as 0755 directories)."""
        name = name.strip("/")
        self._parent(name)
        self.entries[name] = CpioEntry(name, stat.S_IFREG | mode, data)

    def add_path(self, name: str, path: Path, mode: int | None = None) -> None:
        """Add a host file's bytes; the mode defaults to the host file's permission bits."""
        perm = stat.S_IMODE(path.stat().st_mode) if mode is None else mode
        self.add_file(name, path.read_bytes(), perm)

    def add_symlink(self, name: str, target: str) -> None:
        """Add a symbolic link ``name -> target``."""
        name = name.strip("/")
        self._parent(name)
        self.entries[name] = CpioEntry(name, stat.S_IFLNK | 0o777, target.encode())

    def add_chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        """Add a character device node (e.g. ``dev/console`` 5:1), no privileges needed."""
        name = name.strip("/")
        self._parent(name)
        self.entries[name] = CpioEntry(name, stat.S_IFCHR | mode, b"", major, minor)

    def render(self) -> bytes:
        """The archive bytes: entries sorted by name (parents first), then the trailer."""
        out = io.BytesIO()
        for ino, name in enumerate(sorted(self.entries), start=1):
            _write_entry(out, ino, self.entries[name])
        _write_entry(out, 0, CpioEntry(_TRAILER, 0))
        return out.getvalue()


def _pad4(out: io.BytesIO) -> None:
    out.write(b"\0" * (-out.tell() % 4))


def _write_entry(out: io.BytesIO, ino: int, entry: CpioEntry) -> None:
    name = entry.name.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (
        ino,
        entry.mode,
        0,
        0,
        nlink if entry.name != _TRAILER else 1,
        0,
        len(entry.data),
        0,
        0,
        entry.rdev_major,
        entry.rdev_minor,
        len(name),
        0,
    )
    out.write(_MAGIC + b"".join(b"%08x" % f for f in fields))
    out.write(name)
    _pad4(out)
    out.write(entry.data)
    _pad4(out)


def gzip_bytes(data: bytes) -> bytes:
    """Gzip with mtime 0 so equal inputs give equal outputs."""
    return gzip.compress(data, compresslevel=6, mtime=0)

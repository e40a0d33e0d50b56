"""Shared by the device-state tests: what a guest can observe, and broken states."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable

from devices.sdk import PciDevice, RegionIndex, StateError, pack_state, unpack_state
from devices.sdk.state import MAGIC, Value

CFG = RegionIndex.CONFIG


def config_reads(dev: PciDevice) -> list[bytes]:
    return [dev.region_read(CFG, off, 4) for off in range(0, dev.config.size, 4)]


def observe(dev: PciDevice, bar_reads: list[tuple[int, int, int]]) -> tuple[object, ...]:
    """Config space, the given BAR reads (region, offset, size) and the saved state: what
    must be identical after a refused load."""
    reads = [dev.region_read(r, off, size) for r, off, size in bar_reads]
    return config_reads(dev), reads, dev.save_state()


def payload_of(dev: PciDevice, state: bytes) -> dict[str, Value]:
    value = unpack_state(state, dev.name, dev.state_version)
    assert isinstance(value, dict)
    return value


def repack(dev: PciDevice, payload: Value) -> bytes:
    return pack_state(dev.name, dev.state_version, payload)


def _set_version(state: bytes, version: int) -> bytes:
    name_len = struct.unpack_from("<H", state, 10)[0]
    pos = 12 + name_len
    return state[:pos] + struct.pack("<I", version) + state[pos + 4 :]


def broken_states(dev: PciDevice, state: bytes,
                  edits: list[tuple[str, Callable[[dict[str, Value]], None], str]] | None = None
                  ) -> list[tuple[str, bytes, str]]:
    """(label, data, what the error must say) for every way a state can be wrong."""
    out: list[tuple[str, bytes, str]] = [
        ("empty", b"", "truncated at offset 0"),
        ("magic", b"XFUSTATE" + state[8:], "bad magic"),
        ("foreign model", pack_state("not-" + dev.name, dev.state_version,
                                     payload_of(dev, state)), "is for model 'not-"),
        ("newer version", _set_version(state, dev.state_version + 1), "state version"),
        ("older version", _set_version(state, 0), "state version"),
        ("format revision", state[:8] + b"\x09\x00" + state[10:], "format revision"),
        ("checksum", state[:-1] + bytes([state[-1] ^ 0x40]), "checksum"),
        ("trailing bytes", state + b"\x00", "unexpected bytes"),
        ("truncated header", state[:20], "truncated at offset"),
        ("truncated payload", state[: len(state) // 2], "truncated at offset"),
        ("truncated by one", state[:-1], "truncated at offset"),
    ]
    # A payload that is not a dict, and one with a bad body behind a valid checksum.
    out.append(("not a record", repack(dev, [1, 2]), "expected a record"))
    body = b"\x7f"
    name = dev.name.encode()
    forged = (MAGIC + struct.pack("<HH", 1, len(name)) + name
              + struct.pack("<IQI", dev.state_version, len(body), zlib.crc32(body)) + body)
    out.append(("unknown tag", forged, "unknown type tag 0x7f"))

    def drop_pci(p: dict[str, Value]) -> None:
        del p["pci"]

    def extra(p: dict[str, Value]) -> None:
        p["surprise"] = 1

    def config_short(p: dict[str, Value]) -> None:
        pci = p["pci"]
        assert isinstance(pci, dict) and isinstance(pci["config"], bytes)
        pci["config"] = pci["config"][:-4]

    def layout(p: dict[str, Value]) -> None:
        pci = p["pci"]
        assert isinstance(pci, dict)
        pci["layout"] = bytes(16)

    for label, edit, says in [("missing section", drop_pci, "field pci is missing"),
                              ("unknown field", extra, "unexpected field surprise"),
                              ("short config", config_short, "field pci.config"),
                              ("other layout", layout, "field pci.layout"),
                              *(edits or [])]:
        payload = payload_of(dev, state)
        edit(payload)
        out.append((label, repack(dev, payload), says))
    return out


def check_refused(dev: PciDevice, state: bytes, bar_reads: list[tuple[int, int, int]],
                  edits: list[tuple[str, Callable[[dict[str, Value]], None], str]] | None = None
                  ) -> None:
    """Every broken variant raises StateError naming the problem; the device is unchanged."""
    before = observe(dev, bar_reads)
    for label, data, says in broken_states(dev, state, edits):
        try:
            dev.load_state(data)
        except StateError as exc:
            assert says in str(exc), f"{label}: {exc}"
            assert exc.errno == 22
        else:
            raise AssertionError(f"{label}: loaded")
        assert observe(dev, bar_reads) == before, label


def field(payload: dict[str, Value], *path: str | int) -> dict[str, Value]:
    """The record at `path` inside a decoded payload (for edits)."""
    node: Value = payload
    for key in path:
        if isinstance(key, int):
            assert isinstance(node, list)
            node = node[key]
        else:
            assert isinstance(node, dict)
            node = node[key]
    assert isinstance(node, dict)
    return node

"""Capability negotiation (the JSON object inside VERSION).

Missing keys take the spec's defaults. The server answers with its own limits, never more
than the client can take, and only with keys it understands (a subset, as the spec asks).

See docs/protocol.md.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, TypeVar

from ._errors import RemoteProtocolError

#: spec defaults for keys a peer leaves out
DEFAULT_MAX_MSG_FDS = 1
DEFAULT_MAX_DATA_XFER_SIZE = 1 << 20
DEFAULT_MAX_DMA_MAPS = 65535
DEFAULT_PGSIZES = 4096

#: hard ceilings we accept from a peer, so a hostile VERSION cannot make us allocate wildly
MAX_MSG_FDS_CEILING = 253  # SCM_MAX_FD
MAX_DATA_XFER_CEILING = 64 << 20


@dataclass(frozen=True, slots=True)
class MigrationCaps:
    pgsize: int = 4096
    max_bitmap_size: int = 256 << 20


@dataclass(frozen=True, slots=True)
class TwinSocket:
    supported: bool = False
    fd_index: int | None = None


@dataclass(frozen=True, slots=True)
class Capabilities:
    max_msg_fds: int = DEFAULT_MAX_MSG_FDS
    max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE
    max_dma_maps: int = DEFAULT_MAX_DMA_MAPS
    pgsizes: int = DEFAULT_PGSIZES
    write_multiple: bool = False
    twin_socket: TwinSocket | None = None
    migration: MigrationCaps | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.max_msg_fds <= MAX_MSG_FDS_CEILING:
            raise RemoteProtocolError(f"max_msg_fds {self.max_msg_fds} out of range")
        if not 0 < self.max_data_xfer_size <= MAX_DATA_XFER_CEILING:
            raise RemoteProtocolError(f"max_data_xfer_size {self.max_data_xfer_size} invalid")
        if self.max_dma_maps < 0:
            raise RemoteProtocolError(f"max_dma_maps {self.max_dma_maps} invalid")
        if self.pgsizes <= 0 or self.pgsizes & 4095:
            raise RemoteProtocolError(f"pgsizes {self.pgsizes:#x} has no page size >= 4 KiB")

    @property
    def page_size(self) -> int:
        """Smallest page size in the pgsizes bitmap (what windows must be aligned to)."""
        return self.pgsizes & -self.pgsizes

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Capabilities:
        def integer(key: str, default: int) -> int:
            v = obj.get(key, default)
            if isinstance(v, bool) or not isinstance(v, int):
                raise RemoteProtocolError(f"capability {key!r} must be an integer, got {v!r}")
            return v

        wm = obj.get("write_multiple", False)
        if not isinstance(wm, bool):
            raise RemoteProtocolError(f"capability 'write_multiple' must be a boolean: {wm!r}")
        twin = None
        if "twin_socket" in obj:
            t = obj["twin_socket"]
            if not isinstance(t, dict) or not isinstance(t.get("supported", False), bool):
                raise RemoteProtocolError(f"capability 'twin_socket' malformed: {t!r}")
            idx = t.get("fd_index")
            if idx is not None and (isinstance(idx, bool) or not isinstance(idx, int)):
                raise RemoteProtocolError(f"twin_socket fd_index must be an integer: {idx!r}")
            twin = TwinSocket(t.get("supported", False), idx)
        mig = None
        if "migration" in obj:
            m = obj["migration"]
            if not isinstance(m, dict):
                raise RemoteProtocolError(f"capability 'migration' malformed: {m!r}")
            ps, mb = m.get("pgsize", 4096), m.get("max_bitmap_size", 256 << 20)
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in (ps, mb)):
                raise RemoteProtocolError(f"capability 'migration' malformed: {m!r}")
            mig = MigrationCaps(ps, mb)
        return cls(
            max_msg_fds=integer("max_msg_fds", DEFAULT_MAX_MSG_FDS),
            max_data_xfer_size=integer("max_data_xfer_size", DEFAULT_MAX_DATA_XFER_SIZE),
            max_dma_maps=integer("max_dma_maps", DEFAULT_MAX_DMA_MAPS),
            pgsizes=integer("pgsizes", DEFAULT_PGSIZES),
            write_multiple=wm,
            twin_socket=twin,
            migration=mig,
        )

    def to_json(self) -> dict[str, Any]:
        """Every limit explicitly: QEMU's defaults for missing keys differ from the spec's."""
        out: dict[str, Any] = {
            "max_msg_fds": self.max_msg_fds,
            "max_data_xfer_size": self.max_data_xfer_size,
            "max_dma_maps": self.max_dma_maps,
            "pgsizes": self.pgsizes,
        }
        if self.write_multiple:
            out["write_multiple"] = True
        if self.twin_socket is not None:
            out["twin_socket"] = {"supported": self.twin_socket.supported}
            if self.twin_socket.fd_index is not None:
                out["twin_socket"]["fd_index"] = self.twin_socket.fd_index
        if self.migration is not None:
            out["migration"] = {
                "pgsize": self.migration.pgsize,
                "max_bitmap_size": self.migration.max_bitmap_size,
            }
        return out


def negotiate(client: Capabilities, server: Capabilities) -> Capabilities:
    """The capabilities the server replies with, given what the client proposed.

    Limits that bound what the *server* receives (max_msg_fds, max_data_xfer_size,
    max_dma_maps) are the server's own; pgsizes must be a page size both sides support;
    optional features are offered only when the client offered them too. twin_socket is
    declined (QEMU does not offer it and one socket is enough for ordered replies).
    """
    common = client.pgsizes & server.pgsizes
    if not common:
        raise RemoteProtocolError(
            f"no common page size: client {client.pgsizes:#x}, server {server.pgsizes:#x}"
        )
    key = (id(server), common & -common, client.write_multiple, client.migration is not None)
    hit = _AGREED_BY_ID.get(key)
    if hit is not None and hit[0] is server:
        return hit[1]
    return remember_by_id(_AGREED_BY_ID, key, server, _agreed(server, *key[1:]))


#: `negotiate`'s answers by the server object's identity: `_agreed`'s lru_cache hashes the
#: frozen `server` (a generated `__hash__` per dataclass, nested ones included: three
#: Python calls per connect).
_AGREED_BY_ID: dict[tuple[int, int, bool, bool], tuple[Capabilities, Capabilities]] = {}

_K = TypeVar("_K")
_O = TypeVar("_O")
_V = TypeVar("_V")


def remember_by_id(cache: dict[_K, tuple[_O, _V]], key: _K, obj: _O, value: _V) -> _V:
    """Store `value` in an identity-keyed cache (`key` is, or starts with, `id(obj)`) and
    return it. The caches of the connect path (`negotiate`, VERSION's JSON) look entries up
    inline (`hit[0] is obj`: no call on a hit) and store through here on a miss. The entry
    holds `obj`, so its id cannot be reused while the entry lives; a server has a few
    capability sets, so 16 entries at most (emptied when full)."""
    if len(cache) >= 16:
        cache.clear()
    cache[key] = (obj, value)
    return value


@lru_cache(maxsize=16)
def _agreed(
    server: Capabilities, pgsize: int, write_multiple: bool, migration: bool
) -> Capabilities:
    """`negotiate`'s answer, kept per server and client choice: every connection of a
    server asks the same few (`dataclasses.replace` was 3 µs of a connect)."""
    return replace(
        server,
        pgsizes=pgsize,
        write_multiple=server.write_multiple and write_multiple,
        twin_socket=None,
        migration=server.migration if migration else None,
    )

"""What one local client may cost the server: the limits that keep a hostile peer contained.

Every client is a possibly hostile local process (docs/security.md). Each limit here has a
default that a real QEMU never comes near, and each can be changed on the command line
(`serve --help`) or in the `[server]` table of a config file, so a deployment can tighten
them. They live in one frozen object that the server hands to every session: a limit is
read where it is enforced, never copied into a second place.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True, slots=True)
class Limits:
    #: seconds a new connection has to complete VERSION; a client that connects and says
    #: nothing (or trickles its VERSION a byte at a time) is disconnected after it
    version_timeout: float = 5.0
    #: largest VERSION message accepted (header included). QEMU's is ~200 bytes; parsing a
    #: megabyte of JSON stalled the event loop (every device) for ~17 ms.
    max_version_size: int = 4096
    #: open connections to one device at a time (the owner plus clients still negotiating,
    #: which get EBUSY at VERSION); more are accepted and closed at once, and logged
    max_connections_per_device: int = 8
    #: open connections to the whole server at a time
    max_connections: int = 1024

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> Limits:
        """Build from config-file keys (the field names); unknown keys raise ValueError."""
        known = {f.name: f.type for f in fields(cls)}
        unknown = set(values) - set(known)
        if unknown:
            raise ValueError(f"unknown limit(s): {', '.join(sorted(unknown))}")
        out: dict[str, Any] = {}
        for key, value in values.items():
            kind = float if key == "version_timeout" else int
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{key} must be a number, got {value!r}")
            if value <= 0:
                raise ValueError(f"{key} must be positive, got {value!r}")
            out[key] = kind(value)
        return cls(**out)


DEFAULT_LIMITS = Limits()

__all__ = ["DEFAULT_LIMITS", "Limits"]

"""Where the libvfio-user engine answers differently from the Python engine, and why.

Keys name a step of the scripted session in tests/engines/test_parity.py; the test compares
every other reply field by field and requires each listed difference to actually occur, so
this table cannot drift from the behaviour.
"""

from __future__ import annotations

PARITY_DIFFERENCES: dict[str, str] = {}

__all__ = ["PARITY_DIFFERENCES"]

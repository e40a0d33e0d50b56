"""Which errno a failure becomes on the wire: the table both engines answer by.

The reply itself is framed in one place per engine (`dispatch.fail` for the Python engine,
the library for libvfio-user); this module only decides the number, so the two cannot
disagree about it. See docs/architecture.md, "Errors".

| raised                                   | errno                       |
|------------------------------------------|-----------------------------|
| `ProtocolError` (bad payload, ranges)    | its errno (mostly EINVAL)   |
| `DeviceError` / `DmaError` / `OSError`   | its errno                   |
| anything else                            | EIO, logged with traceback  |
"""

from __future__ import annotations

import errno

from devices.sdk.interface import DeviceError, DmaError
from protocol import ProtocolError

#: failures that are the client's or the device's business, logged without a traceback
EXPECTED = (ProtocolError, DeviceError, DmaError, OSError)


def errno_of(exc: BaseException) -> int:
    """The errno to answer `exc` with (never 0: a zero errno would read as success)."""
    if isinstance(exc, EXPECTED):
        return exc.errno or errno.EIO
    return errno.EIO


__all__ = ["EXPECTED", "errno_of"]

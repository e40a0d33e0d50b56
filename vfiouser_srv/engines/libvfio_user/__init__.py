"""The libvfio-user engine: `devices/` models served by the reference C library via ctypes.

Importing this package loads the library (from `LIBVFIO_USER_PATH`, else the system library
path) and checks its ABI, so `vfiouser_srv.engines.load_engine("libvfio-user")` fails at once
with `EngineUnavailable` and a message saying what is missing, not at the first client.

`create_device(host, device, endpoint)` (the contract of `engines.contract`) returns a
`LibvfioUserDevice` that listens as soon as it is constructed; `await device.serve()` serves
clients one after another; `device.close()` destroys it. `Server.add_device(...,
engine="libvfio-user")` does all of that inside the server.

How it differs from the Python engine on the wire is listed, with reasons, in
`PARITY_DIFFERENCES` (the parity test in tests/engines checks exactly these); what the
scripted session cannot show is in `BEHAVIOUR_DIFFERENCES`.

See docs/architecture.md, "Engines", and docs/security.md for what the library cannot meet.
"""

from __future__ import annotations

from ._bindings import LIBRARY_ENV, EngineError, library
from ._create import create_device
from ._device import QUIESCE_GRACE, LibvfioUserDevice
from ._dma import VfuDma
from ._irq import VfuIrq
from ._parity import BEHAVIOUR_DIFFERENCES, PARITY_DIFFERENCES

library()  # EngineUnavailable here, when the engine is asked for, not at the first client

__all__ = [
    "BEHAVIOUR_DIFFERENCES",
    "LIBRARY_ENV",
    "PARITY_DIFFERENCES",
    "QUIESCE_GRACE",
    "EngineError",
    "LibvfioUserDevice",
    "VfuDma",
    "VfuIrq",
    "create_device",
    "library",
]

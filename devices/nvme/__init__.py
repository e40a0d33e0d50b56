"""NVMe controller model: the package's one export is `Nvme` (and `parse_size` for options).

Layout follows openvmm's nvme device; devices/nvme/README.md has the table of modules, each
with the one thing it does.
"""

from devices.sdk.options import parse_size

from .controller import Nvme

__all__ = ["Nvme", "parse_size"]

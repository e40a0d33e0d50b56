"""NVMe controller model: `Nvme` (register surface), `worker` (queues and commands).

Layout follows openvmm's nvme device: `spec` (numbers), `queue` and `prp` (pure ring and
PRP logic), `identify` (data structures), `backend` (file / memory storage), `worker`
(the task that runs queues), `controller` (the PCI function and BAR0).
"""

from .controller import Nvme, parse_size

__all__ = ["Nvme", "parse_size"]

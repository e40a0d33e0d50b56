"""vfiouser-srv: a vfio-user device server in Python, built on trio.

QEMU's `-device vfio-user-pci` connects to a Unix socket served here, and the guest sees a
PCI device whose config space, BARs, interrupts and DMA are served by `devices/` models.

The design: docs/architecture.md.
"""

__version__ = "0.1.0"

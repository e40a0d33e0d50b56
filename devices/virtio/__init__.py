"""virtio devices over vfio-user: the modern virtio-pci transport, virtio-blk, virtio-net.

* `virtqueue`: split virtqueues as pure logic over the DMA port;
* `transport`: the virtio 1.x PCI transport as a `PciDevice` base class;
* `blk`: virtio-blk over a raw file or memory; `net`: virtio-net over a TAP device
  (`tap`: pyroute2 setup and the TUNSETIFF fd).
"""

"""A TAP backend for virtio-net: created and configured with pyroute2, served from trio.

Why this order (create with pyroute2 in our own namespace, attach with TUNSETIFF, drop
persistence, then move into the target namespace):

* The TAP fd must come from ``open("/dev/net/tun")`` + ``TUNSETIFF`` (pyroute2 does not
  hand it out), and TUNSETIFF can only attach to an interface in the namespace of the
  process, so the interface is created here first and moved afterwards; a moved TAP stays
  attached to our fd.
* After attaching, ``TUNSETPERSIST 0`` makes the kernel delete the interface when the last
  fd closes, so even a SIGKILLed server leaves no TAP behind.
* ``IFF_VNET_HDR`` with a 12-byte header (``TUNSETVNETHDRSZ``) makes the TAP speak exactly
  ``struct virtio_net_hdr_v1``, so frames pass between the rings and the TAP unchanged.

pyroute2's sync API runs an asyncio loop inside; it is only ever called from `open()` /
`close()`, i.e. before ``trio.run`` (the CLI builds models first) or from a worker thread
(tests use ``trio.to_thread.run_sync``); `close()` does its netlink work in a helper thread
so it is safe to call from the trio thread at server shutdown.

Resource handling: everything `open()` creates (the namespace, the bridge, the TAP) is
recorded and `close()` deletes exactly that, in reverse order, and nothing else.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import threading
from dataclasses import dataclass, field

from pyroute2 import IPRoute, NetlinkError, netns

log = logging.getLogger(__name__)

TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
IFNAMSIZ = 16
VNET_HDR_SIZE = 12
NETNS_DIR = "/run/netns"


class TapPermissionError(PermissionError):
    """The process lacks what creating a TAP needs; the message says what exactly."""


def _permission_message(what: str, why: str) -> str:
    return (f"{what} failed ({why}): creating and configuring a TAP needs CAP_NET_ADMIN "
            "and read/write access to /dev/net/tun; run the server as root or give it "
            "cap_net_admin (e.g. `setcap cap_net_admin+ep` on the Python interpreter)")


@dataclass
class TapConfig:
    name: str
    netns: str = ""
    bridge: str = ""
    mtu: int = 1500
    address: str = ""
    """Optional host address with prefix (e.g. 10.0.0.1/24) put on the TAP (or bridge)."""


@dataclass
class Tap:
    """An open TAP device; `fd` is -1 once closed."""

    config: TapConfig
    fd: int = -1
    created: list[tuple[str, str]] = field(default_factory=list)
    """What `open` created, in order: ("netns", name), ("bridge", name), ("tap", name)."""

    @classmethod
    def open(cls, config: TapConfig) -> Tap:
        """Create, attach and configure the TAP; undoes partial work on failure."""
        if len(config.name.encode()) >= IFNAMSIZ or not config.name:
            raise ValueError(f"TAP name {config.name!r} must be 1..15 bytes")
        tap = cls(config)
        try:
            tap._setup()
        except BaseException:
            tap.close()
            raise
        return tap

    def _setup(self) -> None:
        cfg = self.config
        exists = ValueError(f"interface {cfg.name} already exists; pick another tap= (an "
                            "existing interface is never taken over, it would be deleted)")
        try:
            with IPRoute() as ipr:
                if ipr.link_lookup(ifname=cfg.name):
                    raise exists
                ipr.link("add", ifname=cfg.name, kind="tuntap", mode="tap", vnet_hdr=True)
        except NetlinkError as exc:
            if exc.code in (errno.EEXIST, errno.EBUSY):
                raise exists from None
            if exc.code == errno.EPERM:
                raise TapPermissionError(_permission_message(
                    f"creating TAP {cfg.name}", os.strerror(exc.code))) from None
            raise
        except PermissionError as exc:
            raise TapPermissionError(_permission_message(f"creating TAP {cfg.name}",
                                                         exc.strerror or str(exc))) from None
        self.created.append(("tap", cfg.name))
        self.fd = self._attach(cfg.name)
        if cfg.netns:
            path = os.path.join(NETNS_DIR, cfg.netns)
            if not os.path.exists(path):
                netns.create(cfg.netns)
                self.created.insert(0, ("netns", cfg.netns))
            with IPRoute() as ipr:
                idx = ipr.link_lookup(ifname=cfg.name)[0]
                ipr.link("set", index=idx, net_ns_fd=cfg.netns)
        with self._ipr() as ipr:
            idx = ipr.link_lookup(ifname=cfg.name)[0]
            ipr.link("set", index=idx, mtu=cfg.mtu)
            target = idx
            if cfg.bridge:
                found = ipr.link_lookup(ifname=cfg.bridge)
                if not found:
                    ipr.link("add", ifname=cfg.bridge, kind="bridge")
                    self.created.insert(len(self.created) - 1, ("bridge", cfg.bridge))
                    found = ipr.link_lookup(ifname=cfg.bridge)
                ipr.link("set", index=found[0], state="up")
                ipr.link("set", index=idx, master=found[0])
                target = found[0]
            if cfg.address:
                addr, _, prefix = cfg.address.partition("/")
                ipr.addr("add", index=target, address=addr, prefixlen=int(prefix or 24))
            ipr.link("set", index=idx, state="up")

    def _ipr(self) -> IPRoute:
        return IPRoute(netns=self.config.netns) if self.config.netns else IPRoute()

    @staticmethod
    def _attach(name: str) -> int:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            ifr = struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            fcntl.ioctl(fd, TUNSETIFF, ifr)
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
            # Not persistent any more: the kernel deletes the TAP with our last fd.
            fcntl.ioctl(fd, TUNSETPERSIST, 0)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def set_offload(self, flags: int) -> None:
        """What the TAP may hand us (and we the guest): TUN_F_CSUM / TSO4 / TSO6."""
        if self.fd >= 0:
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)

    def close(self) -> None:
        """Close the fd (the kernel deletes the TAP) and delete what `open` created."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)
        created, self.created = self.created, []
        if not created:
            return
        errors: list[BaseException] = []

        def teardown() -> None:
            for kind, name in reversed(created):
                try:
                    if kind == "netns":
                        netns.remove(name)
                    elif kind in ("bridge", "tap"):
                        with self._ipr() as ipr:
                            found = ipr.link_lookup(ifname=name)
                            if found:
                                ipr.link("del", index=found[0])
                except Exception as exc:
                    errors.append(exc)

        # A helper thread: pyroute2 must not run on a trio thread (see module docstring).
        worker = threading.Thread(target=teardown, name="tap-teardown")
        worker.start()
        worker.join(timeout=10)
        for exc in errors:
            log.warning("TAP %s: cleanup failed: %s", self.config.name, exc)

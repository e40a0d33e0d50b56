"""The TAP backend and virtio-net against a real TAP in a throwaway network namespace.

Needs root (CAP_NET_ADMIN) and /dev/net/tun; skipped with that reason otherwise. Every test
checks that nothing it made (namespace, bridge, TAP) is left behind. pyroute2 runs in
worker threads (`trio.to_thread.run_sync`), never on the trio thread.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import uuid

import pytest
import trio
from pyroute2 import IPRoute, netns

from devices.virtio import transport as t
from devices.virtio.net import NetFeature, VirtioNet
from devices.virtio.tap import Tap, TapConfig
from devices.virtio.transport import Feature

from ..fakes import FakeContext
from .driver import Driver

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
    reason="needs root (CAP_NET_ADMIN) and /dev/net/tun to create namespaces and TAPs",
)


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:6]}"


def links_in(ns: str) -> dict[str, dict[str, object]]:
    with IPRoute(netns=ns) as ipr:
        out: dict[str, dict[str, object]] = {}
        for link in ipr.get_links():
            out[link.get_attr("IFLA_IFNAME")] = {
                "mtu": link.get_attr("IFLA_MTU"), "master": link.get_attr("IFLA_MASTER"),
                "index": link["index"], "up": bool(link["flags"] & 1),
            }
        return out


def root_links() -> set[str]:
    with IPRoute() as ipr:
        return {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}


async def test_tap_in_new_netns_on_new_bridge_is_cleaned_up() -> None:
    ns, br, name = unique("vfuns"), unique("vfubr"), unique("vfut")
    tap = await trio.to_thread.run_sync(
        Tap.open, TapConfig(name, netns=ns, bridge=br, mtu=1400, address="10.97.0.1/24"))
    try:
        assert ns in netns.listnetns()
        links = await trio.to_thread.run_sync(links_in, ns)
        assert links[name]["mtu"] == 1400 and links[name]["up"]
        assert links[name]["master"] == links[br]["index"]
        assert name not in await trio.to_thread.run_sync(root_links)
        assert [k for k, _ in tap.created] == ["netns", "bridge", "tap"]
    finally:
        await trio.to_thread.run_sync(tap.close)
    assert tap.fd == -1
    assert ns not in netns.listnetns()
    assert name not in await trio.to_thread.run_sync(root_links)


async def test_existing_netns_is_kept_and_tap_vanishes_with_its_fd() -> None:
    ns, name = unique("vfuns"), unique("vfut")
    await trio.to_thread.run_sync(netns.create, ns)
    try:
        tap = await trio.to_thread.run_sync(Tap.open, TapConfig(name, netns=ns))
        assert [k for k, _ in tap.created] == ["tap"]
        assert name in await trio.to_thread.run_sync(links_in, ns)
        await trio.to_thread.run_sync(tap.close)
        assert ns in netns.listnetns()
        assert name not in await trio.to_thread.run_sync(links_in, ns)
    finally:
        await trio.to_thread.run_sync(netns.remove, ns)


async def test_duplicate_name_is_a_clear_error() -> None:
    name = unique("vfut")
    tap = await trio.to_thread.run_sync(Tap.open, TapConfig(name))
    try:
        with pytest.raises(ValueError, match="already exists"):
            await trio.to_thread.run_sync(Tap.open, TapConfig(name))
    finally:
        await trio.to_thread.run_sync(tap.close)


@pytest.mark.skipif(not shutil.which("setpriv"), reason="needs util-linux setpriv")
def test_without_cap_net_admin_the_error_says_what_is_missing() -> None:
    code = ("import sys\nfrom devices import OptionError, create\n"
            "try:\n    create('virtio-net', {'tap': 'vfunopriv0'})\n"
            "except OptionError as e:\n    print(e)\n    sys.exit(3)\n")
    out = subprocess.run(["setpriv", "--bounding-set", "-net_admin", "--inh-caps",
                          "-net_admin", "--", sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.returncode == 3, out.stdout + out.stderr
    assert "CAP_NET_ADMIN" in out.stdout and "Operation not permitted" in out.stdout
    assert "vfunopriv0" not in root_links()


# ---------------------------------------------------------------- virtio-net end to end

GUEST_MAC = bytes.fromhex("525400abcdef")
HOST_IP = bytes([10, 96, 0, 1])
GUEST_IP = bytes([10, 96, 0, 2])
TX_BUF = 0x40000
RX_BUFS = 0x50000
FEATURES = int(Feature.VERSION_1 | Feature.RING_EVENT_IDX | Feature.RING_INDIRECT_DESC
               | NetFeature.MAC | NetFeature.STATUS | NetFeature.MRG_RXBUF | NetFeature.CSUM
               | NetFeature.GUEST_CSUM | NetFeature.MTU)


def arp_request() -> bytes:
    eth = b"\xff" * 6 + GUEST_MAC + b"\x08\x06"
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + GUEST_MAC + GUEST_IP + bytes(6) + HOST_IP
    return bytes(12) + eth + arp


@pytest.mark.parametrize("mergeable", [True, False])
async def test_virtio_net_tx_and_rx_through_the_tap(ctx: FakeContext, mergeable: bool) -> None:
    ns, name = unique("vfuns"), unique("vfut")
    dev = await trio.to_thread.run_sync(lambda: VirtioNet(
        tap=name, netns=ns, address="10.96.0.1/24", mac="52:54:00:ab:cd:ef", mtu=1500))
    try:
        dev.attach(ctx)
        drv = Driver(dev, ctx.dma.ram)
        assert drv.devcfg(0, 6) == int.from_bytes(GUEST_MAC, "little")
        assert drv.devcfg(6, 2) == 1  # link up
        assert drv.devcfg(10, 2) == 1500
        drv.setup(FEATURES if mergeable else FEATURES & ~int(NetFeature.MRG_RXBUF), size=16)
        rx, tx = drv.rings
        buffers: dict[int, int] = {}  # head -> address
        for i in range(8):  # mergeable-style receive buffers of 2 KiB
            buffers[rx.add([], [(RX_BUFS + i * 2048, 2048)])] = RX_BUFS + i * 2048
        drv.kick(0)
        frame = arp_request()
        ctx.dma.ram[TX_BUF : TX_BUF + len(frame)] = frame
        tx.add([(TX_BUF, len(frame))], [])
        drv.kick(1)
        assert await drv.wait_used(1) == [(0, 0)]
        # The namespace's kernel answers the ARP request: it arrives in a receive buffer
        # (possibly after IPv6 neighbour discovery frames of the TAP coming up).
        eth = b""
        with trio.fail_after(5):
            while eth[12:14] != b"\x08\x06":
                for head, length in await drv.wait_used(0):
                    addr = buffers.pop(head)
                    got = bytes(ctx.dma.ram[addr : addr + length])
                    assert struct.unpack_from("<H", got, 10)[0] == 1  # num_buffers
                    if got[12 + 12 : 12 + 14] == b"\x08\x06":
                        eth = got[12:]
                    buffers[rx.add([], [(addr, 2048)])] = addr  # recycle the buffer
                drv.kick(0)
        assert eth[0:6] == GUEST_MAC
        assert struct.unpack_from("!H", eth, 20)[0] == 2  # ARP reply
        assert eth[28:32] == HOST_IP
        await drv.reset()
        assert drv.status() == 0
    finally:
        await trio.to_thread.run_sync(dev.close)
    assert ns not in netns.listnetns()
    assert drv.rd(t.NUM_QUEUES, 2) == 2


async def test_link_status_change_interrupts_the_driver(ctx: FakeContext) -> None:
    name = unique("vfut")
    dev = await trio.to_thread.run_sync(lambda: VirtioNet(tap=name, link=False))
    try:
        dev.attach(ctx)
        drv = Driver(dev, ctx.dma.ram)
        assert drv.devcfg(6, 2) == 0  # link down
        drv.setup(FEATURES, size=16)
        generation = drv.rd(t.CONFIG_GENERATION, 1)
        dev.set_link(True)
        assert drv.devcfg(6, 2) == 1
        assert drv.rd(t.CONFIG_GENERATION, 1) != generation
        assert ctx.irq.triggers[-1] == (2, 0)  # MSI-X, the config vector
        await drv.reset()
    finally:
        await trio.to_thread.run_sync(dev.close)


def delete_link(ns: str, name: str) -> None:
    with IPRoute(netns=ns) as ipr:
        ipr.link("del", index=ipr.link_lookup(ifname=name)[0])


async def test_a_tap_deleted_under_the_device_is_a_device_failure(ctx: FakeContext) -> None:
    """docs/operations.md, "Health": the TAP's fd answers EBADFD once its interface is gone;
    RX stops and the model reports the failure once (not per dropped TX frame)."""
    ns, name = unique("vfuns"), unique("vfut")
    dev = await trio.to_thread.run_sync(lambda: VirtioNet(tap=name, netns=ns))
    try:
        dev.attach(ctx)
        drv = Driver(dev, ctx.dma.ram)
        drv.setup(FEATURES, size=16)
        rx, tx = drv.rings
        for i in range(8):
            rx.add([], [(RX_BUFS + i * 2048, 2048)])
        drv.kick(0)
        await trio.sleep(0.05)  # RX waits on the TAP
        assert ctx.failures == []
        await trio.to_thread.run_sync(delete_link, ns, name)
        with trio.fail_after(5):
            while not ctx.failures:
                await trio.sleep(0.01)
        assert name in ctx.failures[0] and "gone" in ctx.failures[0]
        frame = arp_request()
        ctx.dma.ram[TX_BUF : TX_BUF + len(frame)] = frame
        tx.add([(TX_BUF, len(frame))], [])
        drv.kick(1)
        assert await drv.wait_used(1) == [(0, 0)]  # dropped, as a NIC without a link does
        assert dev.tx_dropped == 1 and len(ctx.failures) == 1
    finally:
        await trio.to_thread.run_sync(dev.close)
    assert ns not in netns.listnetns()

"""virtio-net (virtio 1.2, 5.1) over a TAP device.

Queues: 0 = receive, 1 = transmit (one pair; no control queue). Frames travel between the
rings and the TAP unchanged, header included, because the TAP is opened with
``IFF_VNET_HDR`` and a 12-byte header, which is exactly ``struct virtio_net_hdr_v1``::

    u8 flags | u8 gso_type | le16 hdr_len | le16 gso_size | le16 csum_start
    | le16 csum_offset | le16 num_buffers

Offloads follow from that: the guest may hand us partially checksummed and TSO frames
(CSUM, HOST_TSO4/6), which the TAP's kernel side completes; the TAP hands us such frames
(GUEST_CSUM, GUEST_TSO4/6) only after `TUNSETOFFLOAD` says the driver accepted them, which is
set when the driver sets FEATURES_OK. Large received frames are spread over several
receive buffers (VIRTIO_NET_F_MRG_RXBUF, with ``num_buffers`` in the first header).

Receive path: the worker waits for the TAP to become readable, reads every frame that is
ready (up to `RX_BATCH`), places them, and interrupts once. If the driver has not posted
enough buffers, the frame waits (and the TAP queues further frames, dropping on overflow as
a NIC would) until the driver kicks the receive queue.

Queue size: 1024 by default (QEMU's default is 256, its maximum 1024). A driver's kick
reaches us as a vfio-user message, so refilling receive buffers takes longer than in QEMU's
in-process device; with 256 buffers the receive path stalled on refills (~100 MiB/s in the
guest benchmark), with 1024 it ran at 310-360 MiB/s on the same host.

Transmit path: every available chain is written to the TAP with one ``write`` per frame;
the TAP never blocks a writer, and a frame it refuses is dropped and counted.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import struct
from typing import ClassVar

import trio

from devices.sdk import Apply, OptionSpec, Record, Value
from devices.sdk.interface import DmaError, pinned_views
from devices.sdk.state import matches

from .guestmem import (
    GuestMemoryError,
    MemoryRetry,
    VirtqueueError,
    gather,
    piece_views,
    scatter,
    store_u16,
)
from .spec import Status
from .tap import (
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    VNET_HDR_SIZE,
    Tap,
    TapConfig,
    TapPermissionError,
)
from .transport import DEFAULT_POLL_US, VirtioPciDevice
from .virtqueue import Chain, Virtqueue

log = logging.getLogger(__name__)

#: what a TAP's fd answers once its interface was deleted (the kernel's tun_get() fails)
TAP_GONE = (errno.EBADFD, errno.ENODEV, errno.ENXIO)

VIRTIO_ID_NET = 1
CLASS_NETWORK_ETHERNET = 0x020000
RX_QUEUE = 0
TX_QUEUE = 1
#: frames read from the TAP per wake-up before they are placed and one interrupt is sent
RX_BATCH = 64
#: largest frame the TAP can give us: 64 KiB GSO frame + Ethernet header + vnet header
MAX_FRAME = 65536 + 14 + VNET_HDR_SIZE + 4
NUM_BUFFERS_OFFSET = 10
#: most iovecs one writev takes (Linux UIO_MAXIOV); a longer chain is gathered first
IOV_MAX = 1024
LINK_UP = 1
DEFAULT_MAC = "52:54:00:12:34:56"


class NetFeature(enum.IntFlag):
    CSUM = 1 << 0
    GUEST_CSUM = 1 << 1
    MTU = 1 << 3
    MAC = 1 << 5
    GUEST_TSO4 = 1 << 7
    GUEST_TSO6 = 1 << 8
    HOST_TSO4 = 1 << 11
    HOST_TSO6 = 1 << 12
    MRG_RXBUF = 1 << 15
    STATUS = 1 << 16


_CONFIG = struct.Struct("<6sHHH")  # mac, status, max_virtqueue_pairs, mtu
_U16 = struct.Struct("<H")


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6:
        raise ValueError(f"bad MAC address {text!r}")
    try:
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"bad MAC address {text!r}") from None
    if mac[0] & 1:
        raise ValueError(f"{text} is a multicast address")
    return mac


class VirtioNet(VirtioPciDevice):
    name = "virtio-net"
    description = "virtio-net (modern virtio-pci) over a TAP device (needs CAP_NET_ADMIN)"
    options = (
        OptionSpec("tap", str, "vfu0", "TAP interface to create"),
        OptionSpec("netns", str, "", "network namespace to move the TAP into (created if "
                   "missing, deleted on exit if we created it)"),
        OptionSpec("bridge", str, "", "bridge to attach the TAP to (created if missing)"),
        OptionSpec("address", str, "", "host address/prefix to put on the TAP (or bridge)"),
        OptionSpec("mac", str, DEFAULT_MAC, "the guest's MAC address"),
        OptionSpec("mtu", int, 1500, "MTU offered to the guest and set on the TAP"),
        OptionSpec("link", bool, True, "link status reported to the guest"),
        OptionSpec("queue_size", int, 1024, "maximum descriptors per queue (1024, QEMU's "
                   "maximum: more posted receive buffers hide our kick latency)"),
        OptionSpec("poll_us", int, DEFAULT_POLL_US, "after a transmit, poll the ring this "
                   "long (us) with notifications off before sleeping (0: never poll)"),
    )
    virtio_id = VIRTIO_ID_NET
    class_code: ClassVar[int] = CLASS_NETWORK_ETHERNET
    #: transport and queues (`state.py`) plus `save_device_state` (docs/device-state.md)
    state_version = 1

    def __init__(self, tap: str = "vfu0", netns: str = "", bridge: str = "",
                 address: str = "", mac: str = DEFAULT_MAC, mtu: int = 1500,
                 link: bool = True, queue_size: int = 1024,
                 poll_us: int = DEFAULT_POLL_US) -> None:
        if not 68 <= mtu <= 65535:
            raise ValueError("mtu must be 68..65535")
        self.mac = parse_mac(mac)
        self.mtu = mtu
        self.link_up = link
        self.tx_dropped = 0
        self.rx_dropped = 0
        self.rx_pending: list[bytes] = []
        self._rx_wait: trio.CancelScope | None = None
        #: the TAP failed (deleted under us) and it was reported; cleared by a reset
        self.tap_failed = False
        super().__init__(num_queues=2, queue_size=queue_size, poll_us=poll_us)
        # Built before trio.run by the CLI (pyroute2's sync API must stay off trio threads).
        try:
            self.tap = Tap.open(TapConfig(tap, netns=netns, bridge=bridge, mtu=mtu,
                                          address=address))
        except TapPermissionError as exc:
            # ValueError is what the registry turns into a one-line CLI error.
            raise ValueError(str(exc)) from None

    def device_features(self) -> int:
        return int(NetFeature.CSUM | NetFeature.GUEST_CSUM | NetFeature.MTU | NetFeature.MAC
                   | NetFeature.GUEST_TSO4 | NetFeature.GUEST_TSO6 | NetFeature.HOST_TSO4
                   | NetFeature.HOST_TSO6 | NetFeature.MRG_RXBUF | NetFeature.STATUS)

    def read_device_config(self, offset: int, count: int) -> bytes:
        cfg = _CONFIG.pack(self.mac, LINK_UP if self.link_up else 0, 1, self.mtu)
        chunk = cfg[offset : offset + count]
        return chunk + bytes(count - len(chunk))

    def set_link(self, up: bool) -> None:
        """Change the link status the guest sees (with a config-change interrupt)."""
        if up != self.link_up:
            self.link_up = up
            self.notify_config()

    def features_ok_hook(self) -> bool:
        offload = 0
        if self.negotiated(NetFeature.GUEST_CSUM):
            offload |= TUN_F_CSUM
            if self.negotiated(NetFeature.GUEST_TSO4):
                offload |= TUN_F_TSO4
            if self.negotiated(NetFeature.GUEST_TSO6):
                offload |= TUN_F_TSO6
        try:
            self.tap.set_offload(offload)
        except OSError as exc:
            log.warning("%s: TUNSETOFFLOAD %#x failed: %s", self.name, offload, exc)
            return False
        return True

    def on_virtio_reset(self) -> None:
        self.rx_pending.clear()
        self.tap_failed = False
        try:
            self.tap.set_offload(0)
        except OSError as exc:
            log.warning("%s: TUNSETOFFLOAD 0 failed: %s", self.name, exc)

    def close(self) -> None:
        self.tap.close()
        super().close()

    # ------------------------------------------------------------------ device state

    async def quiesce(self) -> None:
        """TX stops after the batch it holds; RX after the frame it places, or at once
        while it waits for the TAP (frames read and not placed stay in `rx_pending`)."""
        self.quiescing = True
        if self._rx_wait is not None:
            self._rx_wait.cancel()
        await super().quiesce()

    def save_device_state(self) -> dict[str, Value]:
        return {"mac": self.mac, "mtu": self.mtu, "link_up": self.link_up,
                "tx_dropped": self.tx_dropped, "rx_dropped": self.rx_dropped,
                "rx_pending": list(self.rx_pending)}

    def prepare_device_state(self, rec: Record) -> Apply:
        matches(rec, "mac", self.mac)
        matches(rec, "mtu", self.mtu)
        link_up = rec.flag("link_up")
        dropped = rec.uint("tx_dropped", 64), rec.uint("rx_dropped", 64)
        frames = rec.get("rx_pending")
        if (not isinstance(frames, list) or len(frames) > RX_BATCH
                or not all(isinstance(f, bytes) and 0 < len(f) <= MAX_FRAME for f in frames)):
            raise rec.fail("rx_pending", f"expected at most {RX_BATCH} frames of 1.."
                           f"{MAX_FRAME} bytes")
        carried = [f for f in frames if isinstance(f, bytes)]

        def apply() -> None:
            self.link_up = link_up
            self.tx_dropped, self.rx_dropped = dropped
            self.rx_pending[:] = carried

        return apply

    def state_loaded(self) -> None:
        """The TAP's offloads follow the negotiated features, as at FEATURES_OK."""
        if self.status & Status.FEATURES_OK:
            self.features_ok_hook()
        super().state_loaded()

    async def queue_worker(self, queue: Virtqueue) -> None:
        if queue.index == RX_QUEUE:
            await self._receive(queue)
        else:
            await self.serve_requests(queue)

    # ------------------------------------------------------------------ transmit

    async def process_batch(self, queue: Virtqueue,
                            chains: list[Chain]) -> list[tuple[int, int]]:
        dma = self.dma
        fd = self.tap.fd
        for chain in chains:
            if chain.readable_len <= VNET_HDR_SIZE:
                self.tx_dropped += 1
                continue
            # Straight from guest memory when it is mmap'd: one writev is one frame for
            # a TAP, and no 64 KiB buffer is allocated and filled per frame.
            views = piece_views(dma, chain.readable)
            try:
                if views is not None and len(views) <= IOV_MAX:
                    os.writev(fd, views)
                else:
                    os.write(fd, await gather(dma, chain.readable))
            except OSError as exc:
                # EAGAIN (queue full), EINVAL (a header the TAP rejects): drop, as a NIC would.
                self.tx_dropped += 1
                log.debug("%s: TX frame of %d bytes dropped: %s", self.name,
                          chain.readable_len, exc)
                if exc.errno in TAP_GONE:
                    self._tap_gone(exc)
        return [(chain.head, 0) for chain in chains]

    # ------------------------------------------------------------------ receive

    async def _receive(self, queue: Virtqueue) -> None:
        # A dup, so the stream's close at cancellation leaves the device's TAP fd open.
        stream = trio.lowlevel.FdStream(os.dup(self.tap.fd))
        async with stream:
            # Frames read and not yet placed live on the device, so a quiesce (which
            # stops this loop only between frames) carries them in the state.
            pending = self.rx_pending
            retry = MemoryRetry()
            while not self.quiescing:
                if not pending:
                    with trio.CancelScope() as self._rx_wait:
                        try:
                            pending.append(await stream.receive_some(MAX_FRAME))
                            pending += self._read_ready(stream.fileno(), RX_BATCH - 1)
                        except (OSError, trio.BrokenResourceError) as exc:
                            # trio's FdStream wraps the read's OSError in BrokenResourceError
                            cause = exc if isinstance(exc, OSError) else exc.__cause__
                            if not isinstance(cause, OSError) or cause.errno not in TAP_GONE:
                                raise
                            self._rx_wait = None
                            self._tap_gone(cause)
                            return  # nothing will ever arrive; TX drops from now on
                    self._rx_wait = None
                    continue  # a quiesce may have cancelled the wait: look again
                start = queue.last_avail_idx
                try:
                    placed = await self._place(queue, pending)
                except GuestMemoryError as exc:
                    queue.rewind(start)  # nothing pushed yet; frames stay pending
                    await retry.wait(exc)
                    continue
                retry.reset()
                del pending[:placed]
                if pending:
                    await self.wait_more(queue)  # out of buffers: wait for the driver

    def _tap_gone(self, exc: OSError) -> None:
        """The TAP was deleted under the device (its fd answers EBADFD): a backend failure,
        reported once (docs/operations.md, "Health")."""
        if self.tap_failed:
            return
        self.tap_failed = True
        log.error("%s: TAP %s is gone: %s", self.name, self.tap.config.name, exc)
        if self.ctx is not None:
            self.ctx.report_failure(f"{self.name}: TAP {self.tap.config.name} is gone: {exc}")

    @staticmethod
    def _read_ready(fd: int, limit: int) -> list[bytes]:
        frames: list[bytes] = []
        while len(frames) < limit:
            try:
                frames.append(os.read(fd, MAX_FRAME))
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EIO):
                    raise
                break
        return frames

    async def _place(self, queue: Virtqueue, frames: list[bytes]) -> int:
        """Put frames into receive buffers; returns how many were placed."""
        mergeable = self.negotiated(NetFeature.MRG_RXBUF)
        done: list[tuple[int, int]] = []
        placed = 0
        for frame in frames:
            used = await (self._place_merged(queue, frame) if mergeable
                          else self._place_whole(queue, frame))
            if used is None:
                break
            done += used
            placed += 1
        try:
            await self.complete(queue, done)
        except GuestMemoryError as exc:
            # Pushes may have happened: retrying would hand buffers back twice.
            raise VirtqueueError(str(exc)) from None
        return placed

    async def _place_whole(self, queue: Virtqueue, frame: bytes) -> list[tuple[int, int]] | None:
        chain = await queue.pop(self.dma)
        if chain is None:
            return None
        if chain.writable_len < len(frame):
            self.rx_dropped += 1  # a buffer too small for the frame: drop the frame
            return [(chain.head, 0)]
        data = bytearray(frame)
        data[NUM_BUFFERS_OFFSET : NUM_BUFFERS_OFFSET + 2] = _U16.pack(1)
        written = await scatter(self.dma, chain.writable, data)
        return [(chain.head, written)]

    def _place_merged_mapped(self, queue: Virtqueue,
                             frame: bytes) -> list[tuple[int, int]] | bool | None:
        """`_place_merged` without awaiting, through one view of all the buffers; False
        when guest memory is not mmap'd there (the caller takes the general path).

        Why: a 64 KiB frame fills 16-40 receive buffers, and popping and scattering them
        one by one through the DMA port was most of the receive path's CPU."""
        dma = self.dma
        start = queue.last_avail_idx
        chains = queue.pop_upto(dma, len(frame))
        if chains is None:
            return False
        sizes = [c.writable_len for c in chains]
        if sum(sizes) < len(frame):
            queue.rewind(start)  # give the buffers back; retry after a kick
            return None
        pieces = [p for c in chains for p in c.writable]
        used: list[tuple[int, int]] = []
        # `pinned_views`, not one write view of the buffers' span: a write view marks its
        # whole span dirty while the client logs dirty pages (migration), and a guest's
        # receive buffers lie megabytes apart (a view of up to 1 GiB per frame before, and
        # a migration under network load could not converge); the engine's `pin_ranges`
        # marks exactly the pieces, for one window lookup and a C-level slice each. The
        # views are used and let go before any checkpoint.
        try:
            with pinned_views(dma, pieces, write=True) as views:
                if views is None or 0 in sizes or len(views[0]) < NUM_BUFFERS_OFFSET + 2:
                    queue.rewind(start)
                    return False
                pos = first = 0
                src = memoryview(frame)
                for chain, size in zip(chains, sizes, strict=True):
                    n = min(size, len(frame) - pos)
                    used.append((chain.head, n))
                    end, index = pos + n, first
                    while pos < end:
                        view = views[index]
                        take = min(len(view), end - pos)
                        view[:take] = src[pos : pos + take]
                        pos += take
                        index += 1
                    first += len(chain.writable)
                store_u16(views[0], NUM_BUFFERS_OFFSET, len(used))
        except DmaError:  # a buffer not mapped: the general path meets it and answers it
            queue.rewind(start)
            return False
        return used

    async def _place_merged(self, queue: Virtqueue,
                            frame: bytes) -> list[tuple[int, int]] | None:
        fast = self._place_merged_mapped(queue, frame)
        if fast is not False:
            return fast if isinstance(fast, list) else None
        dma = self.dma
        start = queue.last_avail_idx
        used: list[tuple[int, int]] = []
        first: Chain | None = None
        pos = 0
        while pos < len(frame):
            chain = await queue.pop(dma)
            if chain is None:
                queue.rewind(start)  # give the buffers back; retry after a kick
                return None
            if first is None:
                first = chain
            n = await scatter(dma, chain.writable, memoryview(frame)[pos:])
            if n == 0:
                queue.rewind(start)
                self.rx_dropped += 1
                log.warning("%s: zero-length receive buffer", self.name)
                return []
            used.append((chain.head, n))
            pos += n
        assert first is not None
        await scatter(dma, first.writable, _U16.pack(len(used)), skip=NUM_BUFFERS_OFFSET)
        return used

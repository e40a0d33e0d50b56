"""An async vfio-user client: the test driver, the benchmark load and the migration peer.

It plays QEMU's part: proposes VERSION, maps guest RAM for DMA, drives regions and IRQs, and
answers the server's DMA_READ / DMA_WRITE requests out of memory it owns. Unlike QEMU it is
deliberately permissive about *what* it sends (a command before VERSION, a second VERSION,
raw malformed frames), because the server's tests must be able to send exactly that.

    async with open_client("/run/dev.sock") as c:
        await c.memory.add_ram(0, 1 << 20)
        info = await c.region_info(0)
        data = await c.region_read(0, 0, 4)

The package is layered so each module imports only those below it:

    connect   open_client, connect_unix: the client's lifetime
    commands  Client: the typed commands
    core      ClientCore, Pending: reader task, msg_id matching, sending, closing
    memory    GuestMemory: guest RAM and the server's DMA served from it
    replies   VfioUserError, reply_body: what a reply means to the caller
    eventfd   make_eventfd, wait_eventfd: interrupts, which never touch the socket

Resource and error handling are described in `core`.
"""

from .commands import Client
from .connect import connect_unix, open_client
from .core import DEFAULT_CLIENT_CAPS, Pending
from .eventfd import make_eventfd, read_eventfd_nowait, wait_eventfd
from .memory import GuestMemory, MappedRange, RamWindow
from .replies import VfioUserError, reply_body

__all__ = [
    "DEFAULT_CLIENT_CAPS",
    "Client",
    "GuestMemory",
    "MappedRange",
    "Pending",
    "RamWindow",
    "VfioUserError",
    "connect_unix",
    "make_eventfd",
    "open_client",
    "read_eventfd_nowait",
    "reply_body",
    "wait_eventfd",
]

"""Where the libvfio-user engine answers differently from the Python engine, and why.

Keys name a step of the scripted session in tests/engines/script.py; the parity test compares
every other step's reply field by field and requires each difference listed here to actually
occur, so this table cannot drift from the behaviour.

Behaviour that the scripted session cannot show on the wire is listed in
`BEHAVIOUR_DIFFERENCES`.

See docs/architecture.md, "Engines".
"""

from __future__ import annotations

PARITY_DIFFERENCES: dict[str, str] = {
    "version.caps": (
        "max_msg_fds: libvfio-user advertises its compile-time limit (8, SERVER_MAX_FDS) and "
        "cannot be told ours (16); the other capabilities agree."
    ),
    "irq_info.0": (
        "libvfio-user reports only VFIO_IRQ_INFO_EVENTFD; we report INTx as MASKABLE | "
        "AUTOMASKED like Linux vfio-pci. Masking and automasking still work (kept by the "
        "engine through the IRQ state callback), the flags just do not say so."
    ),
    "irq_info.1": (
        "libvfio-user reports only EVENTFD; we add NORESIZE for MSI like vfio-pci (QEMU then "
        "sets all MSI vectors at once)."
    ),
    "irq_info.2": (
        "an index with count 0: libvfio-user still sets EVENTFD, we report no flags at all."
    ),
    "dma_map.overlap": (
        "an overlapping DMA_MAP: libvfio-user answers EINVAL, we answer EEXIST (like the "
        "kernel's vfio_dma_do_map)."
    ),
}

BEHAVIOUR_DIFFERENCES: dict[str, str] = {
    "second client": (
        "libvfio-user serves one client per context and does not accept() while one is "
        "attached: a second client waits in the listen backlog instead of getting EBUSY."
    ),
    "ownership and groups": (
        "the device is registered in its group, but libvfio-user does the accepting, so "
        "SO_PEERCRED ownership policies and shared containers do not apply to it."
    ),
    "--fd": "libvfio-user creates and binds its own socket; an inherited fd is refused.",
    "socket mode and group": (
        "the library binds its socket itself; the server calls it under a restrictive umask "
        "(owner bits of socket_mode only) and then chmods/chowns the file to socket_mode and "
        "socket_group, so the result is the same as with the Python engine (docs/access.md)."
    ),
    "allow-list": (
        "cannot be enforced: vfu_attach_ctx accepts and reads the client's VERSION in one "
        "call, so a peer could only be checked after it was served. A device with "
        "allow_uids/allow_gids on this engine is refused at start-up with an error saying so, "
        "never served without its list."
    ),
    "connection caps": (
        "max_connections_per_device and max_connections do not count this engine's client: "
        "the library accepts one client at a time and leaves the others in the listen "
        "backlog (see 'second client'), so it never holds more than one connection."
    ),
    "message-mode DMA": (
        "vfu_sgl_read/write send DMA_READ/WRITE and block until the reply, treating the next "
        "message as that reply (no twin_socket here): a client command sent meanwhile breaks "
        "the stream (libvfio-user issue 279). QEMU with shared memfd RAM never takes this "
        "path. There is no 5 s timeout as in the Python engine."
    ),
    "ERR and REQ interrupts": (
        "vfu_irq_trigger cannot raise them, so IrqPort.trigger returns False and hot remove "
        "cannot ask the client to let go (it disconnects at once)."
    ),
    "IrqPort.enabled": (
        "the library does not say which index holds eventfds; any index the device has is "
        "reported enabled."
    ),
    "quiesce": (
        "libvfio-user quiesces before DMA_MAP/UNMAP too, where the Python engine only drains "
        "pinned windows at unmap: device tasks still running after QUIESCE_GRACE are cancelled."
    ),
    "split frames": (
        "the library reads a message body with a blocking recv: a client that sends a header "
        "and stalls before the body stalls this device's engine (one QEMU never does this)."
    ),
    "large messages": (
        "the library reads a message body with one recv(2) and refuses a short read (EINVAL, "
        "logged as 'short read'; the rest of the body is then parsed as headers): a body "
        "larger than what the peer's socket buffer holds at once (about 200 KiB by default, "
        "e.g. a 1 MiB REGION_WRITE) cannot be received, although max_data_xfer_size is 1 MiB."
    ),
    "protocol validation": (
        "libvfio-user decodes and validates messages itself: commands before VERSION, bad "
        "argsz, unknown flag bits, unknown commands (EINVAL, not ENOTSUP), DMA_MAP/UNMAP "
        "argument checks, surplus fds and broken frames get other errnos, a reply or a "
        "dropped connection where tests/server/test_errno.py expects the Python engine's "
        "answer; the Python-engine cases there say which."
    ),
    "SET_IRQS validation": (
        "libvfio-user validates SET_IRQS itself, more loosely than vfio-pci: MASK/UNMASK are "
        "accepted on any index (MSI too, where we answer EINVAL), and eventfds given with "
        "MASK/UNMASK are accepted but never signalled."
    ),
    "guest memory that shrinks (SIGBUS)": (
        "libvfio-user mmaps every DMA window with an fd itself (lib/dma.c) and its DMA "
        "helpers touch the mapping from C, so a client that maps a memfd without "
        "F_SEAL_SHRINK and then truncates it kills the whole process with SIGBUS on the next "
        "DMA. The Python engine mmaps only files sealed against shrinking and uses "
        "pread/pwrite for the rest (docs/security.md, 'Guest memory'). Serve clients you do "
        "not trust with the Python engine. tests/hostile/test_sigbus.py is Python-only."
    ),
    "a peer that stops reading stalls every device": (
        "vfu_run_ctx runs on the server's one event-loop thread and the library sends each "
        "reply with a blocking sendmsg: a client that sends requests but does not read the "
        "replies fills its socket and then blocks that thread, so every other device in the "
        "process (both engines) stops being served until that client reads or goes. The "
        "Python engine never blocks in send (replies queue per connection, with "
        "backpressure at 8 MiB). tests/hostile/test_isolation.py's replay of the "
        "shared-buffer finding is Python-only for this reason."
    ),
    "limits before and after VERSION": (
        "the library negotiates VERSION itself: Limits.version_timeout and "
        "Limits.max_version_size do not apply (a client that connects and stays silent "
        "keeps the device's only slot until it goes), and a header announcing more than "
        "max_data_xfer_size gets an error reply while the library parses the body that "
        "follows as headers, instead of a disconnect ('protocol validation', 'large "
        "messages')."
    ),
    "INTx asserted before its eventfd": (
        "the library does not tell the device when eventfds are set, so a line already "
        "asserted when the client sets the INTx eventfd is signalled at the next unmask (the "
        "guest's EOI) or rising edge, not at once as in the Python engine."
    ),
    "migration": (
        "not offered: DEVICE_FEATURE is answered by the library (EINVAL without migration "
        "callbacks). Wiring vfu_setup_device_migration_callbacks to the model's save/load is "
        "possible, but the library's own dirty-page log only sees DMA taken through "
        "vfu_sgl_get/put, while this engine reaches guest memory through its mapping in the "
        "shared window table, so DMA_LOGGING_REPORT would miss the device's writes and a "
        "migration would silently lose guest data. Migrate with the Python engine "
        "(docs/migration.md)."
    ),
}

__all__ = ["BEHAVIOUR_DIFFERENCES", "PARITY_DIFFERENCES"]

"""systemd's conventions for services, without libsystemd: socket activation and sd_notify.

Socket activation (``sd_listen_fds(3)``): systemd (or ``systemd-socket-activate``) creates the
listening sockets, starts us with them as fds 3, 4, ... and says so in ``LISTEN_PID`` (must be
our pid, else the variables are someone else's and are ignored), ``LISTEN_FDS`` (how many)
and ``LISTEN_FDNAMES`` (colon-separated names, a socket unit's ``FileDescriptorName=``).
:func:`listen_fds` reads them once, removes them from the environment (so nothing we might
start inherits them) and marks the fds close-on-exec, as ``sd_listen_fds(1)`` does.

Which device gets which socket (:func:`assign`), the rules docs/systemd.md documents:

1. an inherited socket whose name is a device's name is that device's socket; it replaces
   the device's ``socket``/``fd`` setting, so one config file works with and without
   activation;
2. the sockets left over go, in the order systemd passed them, to the devices that have
   neither ``socket`` nor ``fd``, in the config file's order;
3. a socket no device takes, or a device left with no socket, is a start-up error: systemd
   would otherwise keep a socket open that nobody serves.

Notifications (``sd_notify(3)``): when ``NOTIFY_SOCKET`` is set, :func:`notify` sends a state
string (``READY=1``, ``STATUS=...``, ``STOPPING=1``) as one datagram to that ``AF_UNIX``
address; a leading ``@`` means the abstract namespace. A failed send is logged and ignored:
a notification must never stop the server.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import functools
import logging
import os
import socket
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from .objects import ObjectError

__all__ = [
    "LISTEN_FDS_START",
    "ActivationError",
    "ListenFd",
    "activated",
    "assign",
    "inherited",
    "listen_fds",
    "notify",
    "notify_ready",
    "notify_status",
    "notify_stopping",
    "serve_args",
    "with_sockets",
]

log = logging.getLogger("vfiouser_srv.systemd")

#: the first inherited fd (SD_LISTEN_FDS_START)
LISTEN_FDS_START = 3
_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class ActivationError(ObjectError):
    """The inherited sockets do not fit the devices, or the variables are malformed (EINVAL;
    an `ObjectError` like every other socket problem, so the CLI reports it in one line)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EINVAL, message)


@dataclass(frozen=True)
class ListenFd:
    fd: int
    name: str
    """From ``LISTEN_FDNAMES``; ``""`` when systemd gave none."""

    def describe(self) -> str:
        return f"fd {self.fd}" + (f" ({self.name!r})" if self.name else "")


def listen_fds(
    environ: MutableMapping[str, str] | None = None, *, pid: int | None = None
) -> list[ListenFd]:
    """The sockets systemd passed us, in order; ``[]`` when none were (or not to us).

    The three variables are removed from ``environ`` (default ``os.environ``) either way.
    """
    env = os.environ if environ is None else environ
    values = {name: env.pop(name, None) for name in _VARIABLES}
    listen_pid, count, names = (values[name] for name in _VARIABLES)
    if listen_pid is None or count is None:
        return []
    try:
        if int(listen_pid) != (os.getpid() if pid is None else pid):
            return []  # meant for another process (e.g. our parent's, inherited by mistake)
        n = int(count)
    except ValueError:
        raise ActivationError(
            f"LISTEN_PID={listen_pid!r} / LISTEN_FDS={count!r} are not numbers"
        ) from None
    if n < 0:
        raise ActivationError(f"LISTEN_FDS={count!r} is negative")
    name_list = names.split(":") if names else []
    if name_list and len(name_list) != n:
        raise ActivationError(
            f"LISTEN_FDNAMES has {len(name_list)} names for {n} sockets: {names!r}"
        )
    out = []
    for i in range(n):
        fd = LISTEN_FDS_START + i
        try:
            os.set_inheritable(fd, False)
        except OSError as exc:
            raise ActivationError(f"LISTEN_FDS={n}, but fd {fd} is not open: {exc}") from None
        out.append(ListenFd(fd, name_list[i] if name_list else ""))
    return out


@functools.cache
def inherited() -> tuple[ListenFd, ...]:
    """:func:`listen_fds` of this process, read once: the variables are gone afterwards."""
    return tuple(listen_fds())


def activated() -> bool:
    """systemd passed this process sockets (a config's device may then omit socket/fd)."""
    return bool(inherited())


class _Endpoint(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def socket_path(self) -> str | None: ...
    @property
    def fd(self) -> int | None: ...


D = TypeVar("D", bound=_Endpoint)


def with_sockets(devices: list[D], where: str) -> list[D]:
    """``devices`` (dataclasses with name/socket_path/fd, e.g. the CLI's ``DeviceConfig``)
    with the inherited sockets assigned by :func:`assign`; unchanged when there are none."""
    if not inherited():
        return devices
    try:
        fds = assign([(d.name, d.socket_path is not None or d.fd is not None) for d in devices],
                     inherited())
    except ActivationError as exc:
        raise ActivationError(f"{where}: {exc.strerror}") from None
    return [
        dataclasses.replace(d, socket_path=None, fd=fds[d.name])  # type: ignore[type-var]
        if d.name in fds else d
        for d in devices
    ]


def serve_args(args: argparse.Namespace) -> argparse.Namespace:
    """``serve MODEL`` handed its socket by systemd needs no --socket-path/--fd (a config
    file's devices are matched where it is read)."""
    serving_one = getattr(args, "command", None) == "serve" and not args.config and args.device
    if serving_one and inherited():
        name = args.name or args.device
        fds = assign([(name, args.socket_path is not None or args.fd is not None)], inherited())
        if name in fds:
            args.socket_path, args.fd = None, fds[name]
    return args


def assign(devices: Sequence[tuple[str, bool]], inherited: Sequence[ListenFd]) -> dict[str, int]:
    """Device name -> inherited fd, by the rules of the module docstring.

    ``devices`` are ``(name, has_endpoint)`` in config order; ``has_endpoint`` says the device
    has a ``socket`` or ``fd`` of its own (used only when no inherited socket is named after
    it).
    """
    names = [name for name, _ in devices]
    out: dict[str, int] = {}
    rest: list[ListenFd] = []
    for lfd in inherited:
        if lfd.name in names:
            if lfd.name in out:
                raise ActivationError(
                    f"systemd passed two sockets named {lfd.name!r} (fds {out[lfd.name]} "
                    f"and {lfd.fd})"
                )
            out[lfd.name] = lfd.fd
        else:
            rest.append(lfd)
    waiting = [name for name, has_endpoint in devices if not has_endpoint and name not in out]
    for name, lfd in zip(waiting, rest, strict=False):
        out[name] = lfd.fd
    if len(rest) > len(waiting):
        unused = ", ".join(lfd.describe() for lfd in rest[len(waiting) :])
        raise ActivationError(
            f"systemd passed socket(s) no device takes: {unused}; name each after its device "
            f"(FileDescriptorName=, devices: {', '.join(names)}) or leave that device's "
            "socket/fd out of the config so it takes the next unnamed one"
        )
    if len(waiting) > len(rest):
        missing = ", ".join(waiting[len(rest) :])
        raise ActivationError(
            f"device(s) {missing} have no socket: systemd passed {len(inherited)} socket(s) "
            "and none is left for them (give them socket/fd, or another ListenStream=)"
        )
    return out


def notify(state: str, environ: MutableMapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1\\nSTATUS=serving"``) to ``$NOTIFY_SOCKET``.

    True when sent; False when there is no notify socket or the send failed (logged).
    """
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        target = b"\0" + address[1:].encode()
    elif address.startswith("/"):
        target = address.encode()
    else:  # e.g. systemd 254's vsock:CID:PORT, which no Debian 12 systemd sends
        log.warning("NOTIFY_SOCKET=%r: only AF_UNIX addresses are supported", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)  # a full receive queue must not stall the event loop
            sock.sendto(state.encode(), target)
    except OSError as exc:
        log.warning("notifying systemd (%s) failed: %s", address, exc)
        return False
    return True


def notify_status(status: str, state: str | None = None) -> bool:
    """``STATUS=status`` (what ``systemctl status`` shows), after ``state`` if given."""
    return notify("\n".join([*([state] if state else []), f"STATUS={status}"]))


def notify_ready(ready_lines: Sequence[str]) -> bool:
    """``READY=1``: every socket listens (sent with the CLI's ``READY ...`` lines)."""
    where = ", ".join(line.removeprefix("READY ") for line in ready_lines)
    return notify_status(f"serving {where}", "READY=1")


def notify_stopping(reason: str) -> bool:
    """``STOPPING=1``: shutting down (the sockets close, clients are disconnected)."""
    return notify_status(f"stopping ({reason})", "STOPPING=1")

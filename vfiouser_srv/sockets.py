"""The sockets a device listens on, and who may connect to them (docs/access.md).

Every client is a possibly hostile local process. A socket file we create gets its mode and
group from `SocketAccess` (default 0600), never from the umask: it is bound under a
restrictive umask, given its group and mode, and only then listens. A device's optional
uid/gid allow-list is checked against SO_PEERCRED at accept, before a byte is read (the
engines call `SocketAccess.admits`). A path that cannot be used raises `ObjectError` naming
the path and the reason, and a file we bound is unlinked again.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import socket
import stat
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from .objects import ObjectError

#: mode of a socket file we create unless configured: only the server's own user may
#: connect (root ignores file modes anyway)
DEFAULT_SOCKET_MODE = 0o600

#: longest socket path in bytes: sun_path holds 108 bytes including the terminating NUL
SUN_PATH_MAX = 107

#: listen backlog of the sockets we create
LISTEN_BACKLOG = 16

#: getsockopt option for a peer's supplementary groups (Linux >= 4.13; Python has no name)
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
#: Python's getsockopt buffer is at most 1024 bytes: 256 gid_t
_PEERGROUPS_MAX = 256


@dataclass(frozen=True, slots=True)
class SocketAccess:
    """Who may connect to one device: the socket file's mode and group, and an allow-list.

    The mode and group apply to a socket file the server (or an engine) creates; an
    inherited `--fd` socket keeps whatever its creator gave it. The allow-list is checked
    against the peer's SO_PEERCRED at accept: a peer is admitted when its uid is in
    `allow_uids` or its gid or one of its supplementary groups is in `allow_gids`. Both empty
    means no list (whoever can open the socket file may connect).
    """

    mode: int = DEFAULT_SOCKET_MODE
    #: gid for the socket file; None keeps the server's (or the directory's setgid) group
    group: int | None = None
    allow_uids: frozenset[int] = frozenset()
    allow_gids: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if not 0 <= self.mode <= 0o777:
            raise ValueError(f"socket mode {self.mode:#o} is not a permission mode (0..0o777)")

    @property
    def restricted(self) -> bool:
        return bool(self.allow_uids or self.allow_gids)

    def admits(self, uid: int, gids: Iterable[int]) -> bool:
        if not self.restricted:
            return True
        return uid in self.allow_uids or any(g in self.allow_gids for g in gids)


DEFAULT_ACCESS = SocketAccess()


def raise_fd_limit() -> int:
    """Lift the soft descriptor limit to the hard one (windows and eventfds are fds)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
    return soft


def listen_path(path: str, access: SocketAccess = DEFAULT_ACCESS) -> socket.socket:
    """A listening socket at `path` with exactly `access`'s mode and group.

    The file is created under a restrictive umask (`creation_umask`), gets its group and
    mode, and only then listens: no client can connect through a mode wider than the one
    configured, and the file never shows one either. Failures name the path; a file we
    bound is unlinked again.
    """
    check_path(path)
    clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    bound = False
    try:
        with creation_umask(access.mode):
            sock.bind(path)
        bound = True
        apply_access(path, access)
        sock.listen(LISTEN_BACKLOG)
    except BaseException as exc:
        sock.close()
        if bound:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        if isinstance(exc, OSError) and not isinstance(exc, ObjectError):
            raise path_error(path, exc) from None
        raise
    sock.setblocking(False)
    return sock


def check_path(path: str) -> None:
    """Refuse, naming the path, what bind() would refuse with a less helpful message."""
    size = len(os.fsencode(path))
    if not size:
        raise ObjectError(errno.EINVAL, "empty socket path")
    if size > SUN_PATH_MAX:
        raise ObjectError(
            errno.ENAMETOOLONG,
            f"cannot listen on {path}: the path is {size} bytes, a Unix socket path holds at "
            f"most {SUN_PATH_MAX}",
        )
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise ObjectError(
            errno.ENOENT, f"cannot listen on {path}: directory {parent} does not exist"
        )


def path_error(path: str, exc: OSError) -> ObjectError:
    return ObjectError(exc.errno or errno.EINVAL, f"cannot listen on {path}: {exc.strerror or exc}")


@contextlib.contextmanager
def creation_umask(mode: int) -> Iterator[None]:
    """Create files with at most the owner bits of `mode` (and never more than the umask).

    os.umask is process-wide. This is safe here because bind() (or the engine's constructor)
    is synchronous and runs on the trio thread: nothing else of ours creates files meanwhile,
    and a file another thread did create would only get a narrower mode, never a wider one.
    The group and other bits are added by `apply_access` once the group is right.
    """
    old = os.umask(0o777)
    try:
        os.umask(old | (0o777 & ~(mode & 0o700)))
        yield
    finally:
        os.umask(old)


def apply_access(path: str, access: SocketAccess) -> None:
    """Give the socket file its group, then its mode (group bits only for the right group).

    Checks the path is still a socket first: chmod follows symlinks, and we must not change
    the mode of whatever someone put there instead. The directory is trusted beyond that.
    """
    st = os.lstat(path)
    if not stat.S_ISSOCK(st.st_mode):
        raise ObjectError(errno.EEXIST, f"{path} was replaced by something that is not a socket")
    if access.group is not None:
        try:
            os.chown(path, -1, access.group, follow_symlinks=False)
        except OSError as exc:
            raise ObjectError(
                exc.errno or errno.EPERM,
                f"cannot give {path} group {access.group}: {exc.strerror} (the server's user "
                "must belong to that group)",
            ) from None
    os.chmod(path, access.mode)


def peercred(conn: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer when it connected, from SO_PEERCRED."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def peer_groups(conn: socket.socket, gid: int) -> list[int]:
    """The peer's gid plus its supplementary groups (SO_PEERGROUPS), so that `allow_gids`
    admits members of a group and not only processes whose primary group it is. A peer in
    more than `_PEERGROUPS_MAX` groups (or a kernel without the option) is judged by `gid`.
    """
    gids = [gid]
    with contextlib.suppress(OSError):
        raw = conn.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 4 * _PEERGROUPS_MAX)
        n = len(raw) // 4
        gids.extend(struct.unpack(f"{n}I", raw[: 4 * n]))
    return gids


def clear_stale(path: str) -> None:
    """Unlink a dead server's socket at `path`; refuse a live one or a non-socket."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise path_error(path, exc) from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ObjectError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # stale socket of a dead server
    except FileNotFoundError:
        pass  # went away meanwhile
    except OSError as exc:
        raise path_error(path, exc) from None
    else:
        raise ObjectError(errno.EADDRINUSE, f"another server is listening on {path}")
    finally:
        probe.close()


def adopt_fd(fd: int) -> socket.socket:
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:  # not open (EBADF), not a socket (ENOTSOCK)
        raise ObjectError(errno.EINVAL, f"fd {fd} is not a usable socket: {exc.strerror}") from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ObjectError(errno.EINVAL, f"fd {fd} is not an AF_UNIX stream socket")
    sock.setblocking(False)
    return sock


def is_listening(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))


__all__ = [
    "DEFAULT_ACCESS",
    "DEFAULT_SOCKET_MODE",
    "LISTEN_BACKLOG",
    "SUN_PATH_MAX",
    "SocketAccess",
    "adopt_fd",
    "apply_access",
    "check_path",
    "clear_stale",
    "creation_umask",
    "is_listening",
    "listen_path",
    "path_error",
    "peer_groups",
    "peercred",
    "raise_fd_limit",
]

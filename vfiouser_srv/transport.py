"""AF_UNIX stream transport with SCM_RIGHTS in both directions, over trio.

`trio.SocketStream` has no recvmsg, so this is a small stream of our own. Hot-path rules
(docs/architecture.md, "The region-access path"): try the non-blocking syscall first and
wait for readiness only on EAGAIN, and wait through `idlewait.IdleWaiter` (one poll()
instead of a scheduler round when trio is idle); one `sendmsg` per outgoing batch (header +
payload + fds together); receive into a preallocated buffer that the stream owns.
`read_waiting` is the one read that may block (for a serial peer's next request,
`idlewait.HOT_WAIT` at most).

Resource handling: every descriptor received becomes an `OwnedFd` at once. MSG_CTRUNC (the
kernel dropped descriptors because our control buffer was too small) is fatal: the stream
can no longer be matched to its descriptors, so the descriptors that did arrive are closed
and `TransportError` is raised.
"""

from __future__ import annotations

import array
import errno
import functools
import socket
import struct
from collections.abc import Sequence
from typing import Any

import trio

from . import idlewait
from .fds import OwnedFd, close_all

#: SCM_MAX_FD in the kernel: the most descriptors one sendmsg can carry
SCM_MAX_FD = 253
_INT_SIZE = array.array("i").itemsize
#: plain ints: `socket.MSG_*` are IntFlags, whose `&` costs half a microsecond per message
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_ONE_FD_KIND = (socket.SOL_SOCKET, socket.SCM_RIGHTS)
_ONE_FD = struct.Struct("i")
_MSG_CMSG_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)
_DONTWAIT = int(socket.MSG_DONTWAIT)
#: flags of the hot loop's blocking recvmsg: descriptors arrive close-on-exec. The socket
#: itself is in blocking mode with SO_RCVTIMEO = idlewait.HOT_WAIT, and every other call
#: on it passes MSG_DONTWAIT, so only that one read can block, and for HOT_WAIT at most.
RECV_FLAGS = _MSG_CMSG_CLOEXEC
_RECV_NOW = _MSG_CMSG_CLOEXEC | _DONTWAIT
#: flags of every send: never block the trio thread
SEND_FLAGS = _DONTWAIT
#: the returned msg_flags bit that makes a read fatal (the kernel echoes MSG_CMSG_CLOEXEC
#: back in msg_flags, so test this bit, not the whole value)
RECV_TRUNCATED = _MSG_CTRUNC


#: Bytes one stream receives per read. Each stream owns its buffer (see `FdStream.__init__`);
#: a bigger message is reassembled by the decoder over several reads.
RECV_SIZE = 16 << 10
#: A stream that received this many bytes since its last checkpoint takes one before it
#: reads again (as it does every `_READS_PER_CHECKPOINT` reads): a peer that floods us with
#: small requests would otherwise keep the trio thread, and every other device, for as long
#: as it keeps the socket full. One read is at most RECV_SIZE, so one turn handles at most
#: 2 * RECV_SIZE bytes of requests (about a millisecond of 4-byte MMIO reads).
RECV_BUDGET = RECV_SIZE
_READS_PER_CHECKPOINT = 64
#: SO_RCVTIMEO's value: `idlewait.HOT_WAIT` as a struct timeval
_RCVTIMEO = struct.pack("ll", 0, int(idlewait.HOT_WAIT * 1_000_000))


class TransportError(Exception):
    """The stream is unusable (truncated control data, socket error)."""


class FdStream:
    """One connected AF_UNIX stream socket carrying (bytes, fds)."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        recv_size: int = RECV_SIZE,
        max_fds: int = SCM_MAX_FD,
        peer: tuple[int, int, int] | None = None,
        blocking: bool = False,
    ) -> None:
        #: SO_PEERCRED as the accept loop already read it (one getsockopt per connection)
        self._peer = peer
        # Blocking mode + MSG_DONTWAIT on every call except the hot loop's read (see
        # RECV_FLAGS): O_NONBLOCK belongs to the shared file description, and toggling it
        # per message cost more than it saved. `blocking`: the caller knows it already is
        # (accept4 without SOCK_NONBLOCK: the ioctl would be a syscall per connection).
        if not blocking:
            sock.setblocking(True)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _RCVTIMEO)
        self.sock = sock
        self._fileno = sock.fileno()
        #: `send_nowait(data, SEND_FLAGS)`: one non-blocking send of a whole reply, for the
        #: serial loop when nothing else is queued (the socket's own method: no Python frame
        #: per message). Raises BlockingIOError when full, BrokenPipeError when the peer left.
        self.send_nowait = sock.send
        #: The buffer is this stream's own. It once was one buffer per thread, shared by
        #: every connection, and a session that kept a view of it across a checkpoint
        #: (awaiting backpressure, then decoding the rest of the read) decoded bytes another
        #: client had received into it meanwhile. The rule (docs/security.md, "Nothing
        #: shared survives a checkpoint"): nothing a session reads from may be written by
        #: another connection, so views of this buffer stay valid until this stream's next
        #: read, whatever happens in between.
        self._view = memoryview(bytearray(recv_size))
        self._iov = [self._view]
        self._ancsize = socket.CMSG_SPACE(max_fds * _INT_SIZE)
        #: The serial loop's read (`Session._serve_serial`): ``n, anc, flags, _ =
        #: read_waiting()`` blocks for up to `idlewait.HOT_WAIT` (SO_RCVTIMEO) and leaves the
        #: bytes in ``buffer[:n]``, valid until this stream's next read. A result with `anc`
        #: or the RECV_TRUNCATED bit in `flags` goes through `chunk(n, anc, flags)`, an
        #: OSError through `read_failed(exc)`. A C-level partial, not a method: a Python
        #: frame per message was 3% of a serial round trip (callgrind).
        self.read_waiting = functools.partial(
            sock.recvmsg_into, self._iov, self._ancsize, RECV_FLAGS
        )
        self.buffer = self._view.toreadonly()
        self.waiter = idlewait.IdleWaiter(self._fileno)
        #: built by the first `send` (the writer's path): most connections never queue a
        #: reply, and a trio.Lock per connection was ~1% of a connect
        self._send_lock: trio.Lock | None = None
        #: `send` calls running or queued for the lock: while non-zero, a direct send would
        #: overtake them (a plain int: `Lock.locked()` is a Python call per reply)
        self.sending = 0
        self._closed = False
        self._reads_without_checkpoint = 0
        self._bytes_without_checkpoint = 0
        #: the last `receive_now` found nothing, so `receive_view` waits before reading
        self._would_block = False

    @classmethod
    def pair(cls) -> tuple[FdStream, FdStream]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        return cls(a), cls(b)

    @property
    def closed(self) -> bool:
        return self._closed

    def peercred(self) -> tuple[int, int, int]:
        """(pid, uid, gid) of the peer, from SO_PEERCRED (read once: they are the peer's
        credentials when it connected, and never change)."""
        if self._peer is not None:
            return self._peer
        raw = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
        return pid, uid, gid

    # ------------------------------------------------------------------ receive

    def _recv_nowait(self) -> tuple[memoryview, list[OwnedFd]]:
        n, anc, flags, _addr = self.sock.recvmsg_into(self._iov, self._ancsize, _RECV_NOW)
        if not anc and not flags & _MSG_CTRUNC:
            return self._view[:n], []
        return self.chunk(n, anc, flags)

    def chunk(
        self, n: int, anc: list[tuple[int, int, bytes]], flags: int
    ) -> tuple[memoryview, list[OwnedFd]]:
        """(bytes, fds) of a `recvmsg_into(self._iov, self._ancsize, ...)` result: every
        descriptor becomes an `OwnedFd` at once; MSG_CTRUNC closes them and raises."""
        fds: list[OwnedFd] = []
        if not anc:
            pass
        elif len(anc) == 1 and anc[0][:2] == _ONE_FD_KIND and len(anc[0][2]) == _INT_SIZE:
            # the usual case (DMA_MAP's memfd, an eventfd): one descriptor, without the
            # array round trip (measured 1.14 -> 0.50 us per chunk)
            fds.append(OwnedFd(_ONE_FD.unpack(anc[0][2])[0]))
        else:
            fds = self._all_fds(anc)
        if flags & _MSG_CTRUNC:
            close_all(fds)
            raise TransportError("control data truncated (MSG_CTRUNC): descriptors lost")
        return self._view[:n], fds

    @staticmethod
    def _all_fds(anc: list[tuple[int, int, bytes]]) -> list[OwnedFd]:
        """Every descriptor of every SCM_RIGHTS message in `anc`, each owned at once."""
        fds: list[OwnedFd] = []
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(data[: len(data) - len(data) % _INT_SIZE])
                fds.extend(OwnedFd(fd) for fd in arr)
        return fds

    def receive_now(self) -> tuple[memoryview, list[OwnedFd]] | None:
        """`receive_view` without the coroutine: the next chunk if it is already there and
        no checkpoint is owed, else None (then await `receive_view`, which will not repeat
        a read that just found nothing). The session's read loop calls this first: a
        coroutine per message is measurable on a serial round trip."""
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        if self._would_block or self.waiter.empty:  # known empty: no EAGAIN read
            return None
        count = self._reads_without_checkpoint + 1
        if count >= _READS_PER_CHECKPOINT or self._bytes_without_checkpoint >= RECV_BUDGET:
            return None
        try:
            got = self._recv_nowait()
        except OSError as exc:
            return self.read_failed(exc)
        self._reads_without_checkpoint = count
        self._bytes_without_checkpoint += len(got[0])
        return got

    def read_failed(self, exc: OSError) -> tuple[memoryview, list[OwnedFd]] | None:
        """What a failed non-blocking read means: None for EAGAIN (wait, then read:
        `receive_view` will not read again first), an empty chunk (EOF) for a reset peer;
        anything else raises."""
        if isinstance(exc, BlockingIOError):
            self._would_block = True
            return None
        if isinstance(exc, ConnectionResetError):
            return memoryview(b""), []
        if exc.errno == errno.EBADF and self._closed:
            raise trio.ClosedResourceError("stream closed") from None
        raise TransportError(f"recvmsg: {exc}") from exc

    def count_reads(self, reads: int, nbytes: int) -> None:
        """Reads done by a caller's own loop, towards the checkpoint owed every 64 reads
        or `RECV_BUDGET` bytes."""
        self._reads_without_checkpoint += reads
        self._bytes_without_checkpoint += nbytes

    async def receive(self) -> tuple[bytes, list[OwnedFd]]:
        """Next chunk of bytes with the descriptors that came with it; b'' at EOF."""
        view, fds = await self.receive_view()
        return bytes(view), fds

    async def receive_view(self) -> tuple[memoryview, list[OwnedFd]]:
        """Like `receive`, but the bytes are a view of a buffer shared by every stream of
        this thread: use or copy them before the next checkpoint. Empty at EOF.

        Reads first and waits only on EAGAIN, checkpointing only when it has to wait (and
        every 64 immediate reads, so a flooding peer cannot starve other tasks). Reading
        first matters most for a request/reply peer on the same CPU: our reply wakes it,
        it often runs at once and sends its next request before we get here, and then the
        read succeeds without entering the event loop. Waiting goes through
        `idlewait.IdleWaiter`, which skips trio's scheduler round when nothing else is
        going on (benchmarks/README.md, "Serial round trip: where the time went").
        """
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        self._reads_without_checkpoint += 1
        if (
            self._reads_without_checkpoint >= _READS_PER_CHECKPOINT
            or self._bytes_without_checkpoint >= RECV_BUDGET
        ):
            self._reads_without_checkpoint = self._bytes_without_checkpoint = 0
            self._would_block = self.waiter.empty = self.waiter.busy = False
            await trio.lowlevel.checkpoint()
        while True:
            # else a read just found nothing, or the serial loop's poll saw trio busy and
            # our socket empty (`IdleWaiter.empty`): wait first
            if not self._would_block and not self.waiter.empty:
                try:
                    chunk = self._recv_nowait()
                except OSError as exc:
                    got = self.read_failed(exc)
                    if got is not None:
                        return got
                else:
                    self._bytes_without_checkpoint += len(chunk[0])
                    return chunk
            self._would_block = False
            self._reads_without_checkpoint = self._bytes_without_checkpoint = 0
            await self.waiter.wait()

    async def wait_ready(self) -> bool:
        """For a caller that reads itself (`Session._read_epoch`): True once a read would
        find something (or EOF); False after only the checkpoint owed every 64 reads or
        `RECV_BUDGET` bytes (read without blocking then: there may be nothing). Waits
        like `receive_view`, reads nothing, so a cancel while it waits loses nothing."""
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        over = (
            self._reads_without_checkpoint + 1 >= _READS_PER_CHECKPOINT
            or self._bytes_without_checkpoint >= RECV_BUDGET
        )
        self._reads_without_checkpoint = self._bytes_without_checkpoint = 0
        self._would_block = False
        if over:
            self.waiter.empty = self.waiter.busy = False
            await trio.lowlevel.checkpoint()
            return False
        await self.waiter.wait()
        return True

    # ------------------------------------------------------------------ send

    def _sendmsg(self, data: bytes | memoryview, fds: Sequence[Any]) -> int:
        if fds:
            nums = array.array("i", [f.fileno() if hasattr(f, "fileno") else int(f) for f in fds])
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, nums.tobytes())]
            return self.sock.sendmsg([data], anc, SEND_FLAGS)
        return self.sock.send(data, SEND_FLAGS)

    def send_some(self, data: bytes, fds: Sequence[Any] = ()) -> int:
        """Send what the socket takes now; `fds` ride with the first byte. Returns the count
        sent, 0 when the buffer is full or a `send` is in progress (whose remaining bytes
        must not be overtaken). Never waits, never checkpoints."""
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        if self.sending:
            return 0
        try:
            return self._sendmsg(data, fds) if fds else self.send_nowait(data, SEND_FLAGS)
        except BlockingIOError:
            return 0
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise trio.BrokenResourceError(str(exc)) from exc

    async def send(self, data: bytes, fds: Sequence[Any] = ()) -> None:
        """Send all of `data`; `fds` ride with its first byte. Concurrent callers queue.

        The lock is taken synchronously before the first byte goes out and held until the
        last one has, so another task can never slip a message into the middle of a
        partially sent one. The fast path (lock free, socket buffer has room) completes
        without a checkpoint: one syscall per batch is the point of this transport.
        """
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        lock = self._send_lock
        if lock is None:
            lock = self._send_lock = trio.Lock()
        self.sending += 1
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            try:
                await lock.acquire()
            except BaseException:
                self.sending -= 1
                raise
        try:
            view = memoryview(data)
            while view:
                try:
                    sent = self._sendmsg(view, fds)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(self.sock)
                    continue
                except (BrokenPipeError, ConnectionResetError) as exc:
                    raise trio.BrokenResourceError(str(exc)) from exc
                except OSError as exc:
                    if self._closed:
                        raise trio.ClosedResourceError("stream closed") from None
                    raise trio.BrokenResourceError(str(exc)) from exc
                if sent:
                    view, fds = view[sent:], ()
        finally:
            self.sending -= 1
            lock.release()

    # ------------------------------------------------------------------ close

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if idlewait.trio_watches(self._fileno):  # (usually not: see there)
                trio.lowlevel.notify_closing(self.sock)
            self.sock.close()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()


__all__ = ["SCM_MAX_FD", "FdStream", "TransportError"]

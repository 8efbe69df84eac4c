"""File semantics of a TPM resource-manager node, as the kernel's tpm-dev-common.c has them.

Both node kinds (CUSE device, FUSE-mounted file) share this class; the native layer
(`native.py`) only moves requests in and replies out.  Requests are opaque objects
(libfuse `fuse_req_t` pointers): a handler either answers at once by returning the
reply, or returns None and answers later through `Replies`, exactly once.

Threads: handlers run on the session loop thread; completions run on the RM's worker
thread, or on the loop thread itself when the RM ran the command inline (it was idle).
Each open file has a lock guarding its state; replies and poll wake-ups are sent after
the lock is dropped, because a reply can meet libfuse's request lock, which libfuse
holds while it calls our interrupt hook (and that hook takes the file lock).

Speed: a client's write/read loop costs two FUSE round trips per command, and the
Python work per request is on that path.  So the common case -- a quick command while
the RM is idle -- runs inside the write handler and is answered by its return value,
and read and write allocate nothing beyond the response and take no lock but the
file's.  `_files` and `_waiting` are read without `_lock`: a single dict lookup is
atomic, and `_lock` only orders the changes.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import select
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from cusetpm.rm import ResourceManager, RMError, Space
from cusetpm.tpm.constants import TPM_CC

if TYPE_CHECKING:
    from cusetpm.policy import NodePolicy

log = logging.getLogger(__name__)

TPM_BUFSIZE = 4096  # the kernel's data_buffer: larger writes are E2BIG
HEADER_SIZE = 10  # tag u16, size u32, code u32
# Commands always handed to the RM's worker, never run on the loop thread (the others run
# inline when the RM is idle, see write): those that can run long (key generation, self
# tests), so the loop stays free to deliver FUSE_INTERRUPT (-> cancel); and those that can
# need a new TPM session, which the RM makes wait for one -- the session that frees up may
# be another client's, whose close must get through the loop meanwhile.
WORKER_ONLY_COMMANDS = frozenset(
    {TPM_CC.CreatePrimary, TPM_CC.Create, TPM_CC.CreateLoaded, TPM_CC.SelfTest,
     TPM_CC.IncrementalSelfTest, TPM_CC.StartAuthSession, TPM_CC.ContextLoad}
)
READABLE = select.POLLIN | select.POLLRDNORM
WRITABLE = select.POLLOUT | select.POLLWRNORM

Request = Any  # an opaque libfuse request
PollHandle = Any  # an opaque libfuse poll handle


class Replies(Protocol):
    """How answers leave: implemented over libfuse by the native layer."""

    def err(self, req: Request, err: int) -> None: ...

    def write(self, req: Request, count: int) -> None: ...

    def buf(self, req: Request, data: bytes) -> None: ...

    def poll_notify(self, ph: PollHandle) -> None: ...

    def poll_destroy(self, ph: PollHandle) -> None: ...


@dataclass(eq=False)
class OpenFile:
    """One open file description: the kernel's struct file_priv plus the space."""

    fh: int
    space: Space
    pid: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    response: bytes | None = None  # unread response (from `offset` on)
    offset: int = 0  # CUSE reads always say offset 0: the file keeps its own
    read_started: bool = False  # any part read: a new write may replace the rest
    error: int | None = None  # errno of an O_NONBLOCK command, read() reports it once
    in_flight: bool = False  # a command is queued or running in the RM
    write_req: Request = None  # a blocking write waiting for the TPM
    write_size: int = 0  # what that write will report
    waiting_reads: list[tuple[Request, int]] = field(default_factory=list)
    poll_handle: PollHandle = None
    released: bool = False

    def ready(self) -> bool:
        return self.response is not None or self.error is not None


@dataclass
class _Outbox:
    """Replies decided under a file's lock, sent after it is released."""

    calls: list[Callable[[], None]] = field(default_factory=list)

    def add(self, call: Callable[[], None]) -> None:
        self.calls.append(call)

    def send(self) -> None:
        for call in self.calls:
            try:
                call()
            except Exception:
                log.exception("sending a reply failed")


class TpmFileOps:
    """open/read/write/poll/release/interrupt over a ResourceManager."""

    def __init__(
        self, rm: ResourceManager, replies: Replies, node: str = "",
        policy: NodePolicy | None = None,
    ):
        self.rm = rm
        self.replies = replies
        # the node these files are opened on and its policy (serve.py replaces it on SIGHUP)
        self.node = node
        self.policy = policy
        self._files: dict[int, OpenFile] = {}
        self._waiting: dict[Request, OpenFile] = {}  # deferred requests, for interrupts
        self._lock = threading.Lock()  # orders changes to the two dicts
        self._fh = itertools.count(1)

    # -- open / release -------------------------------------------------------------------

    def open(self, flags: int, uid: int, gid: int, pid: int) -> int:
        """A new space per open file; returns the file handle or -errno."""
        try:
            space = self.rm.open_space(uid, pid=pid, node=self.node, policy=self.policy)
        except RMError as e:
            log.warning("open by pid %d uid %d refused: %s", pid, uid, e)
            return -(e.errno or errno.EIO)
        f = OpenFile(fh=next(self._fh), space=space, pid=pid)
        with self._lock:
            self._files[f.fh] = f
        log.debug("fh %d: opened by pid %d uid %d, space %d", f.fh, pid, uid, space.id)
        return f.fh

    def release(self, req: Request | None, fh: int) -> None:
        """Close the space (flushing it) and answer once it is gone."""
        with self._lock:
            f = self._files.pop(fh, None)
        if f is None:
            if req is not None:
                self.replies.err(req, 0)
            return
        out = _Outbox()
        with f.lock:
            f.released = True
            self._drop_poll_handle(f, out)
            for read_req, _size in self._take_reads(f):
                out.add(functools.partial(self.replies.err, read_req, errno.EBADF))
        out.send()
        log.debug("fh %d: released, closing space %d", fh, f.space.id)
        try:
            closed = self.rm.close_space(f.space, wait=False)
        except Exception as e:
            closed = Future()
            closed.set_exception(e)
        closed.add_done_callback(functools.partial(self._released, f, req))

    def _released(self, f: OpenFile, req: Request | None, fut: Future[None]) -> None:
        exc = fut.exception()
        if exc is not None:
            log.error("fh %d: closing space %d failed: %s", f.fh, f.space.id, exc)
        if req is not None:
            self.replies.err(req, 0)

    # -- write ----------------------------------------------------------------------------

    def write(self, req: Request, fh: int, data: bytes, size: int, nonblock: bool) -> int | None:
        """Returns the count or -errno to answer now, None when answered later.

        `data` holds the first min(size, TPM_BUFSIZE) bytes of the write.
        """
        f = self._files.get(fh)
        if f is None:
            return -errno.EBADF
        if size > TPM_BUFSIZE:
            return -errno.E2BIG
        ph = None
        with f.lock:
            if f.in_flight or f.error is not None or (
                f.response is not None and not f.read_started
            ):
                return -errno.EBUSY
            length = int.from_bytes(data[2:6], "big") if size >= HEADER_SIZE else 0
            if size < HEADER_SIZE or length < HEADER_SIZE or size < length:
                return -errno.EINVAL
            if f.response is not None:  # the unread rest is dropped: pollers now see POLLOUT
                ph, f.poll_handle = f.poll_handle, None
            f.response, f.offset, f.read_started = None, 0, False
            f.in_flight = True
            f.write_req = None if nonblock else req
            f.write_size = size
        if ph is not None:
            self.replies.poll_notify(ph)
        command = data if length == size else data[:length]
        code = int.from_bytes(command[6:10], "big")
        try:
            # When the RM is idle it runs the command right here and hands back a finished
            # future: no hand-off to its worker and back, which costs more than most
            # commands.  WORKER_ONLY_COMMANDS always queue (see there).
            fut = self.rm.submit(
                f.space, command, inline_if_idle=code not in WORKER_ONLY_COMMANDS
            )
        except Exception as e:
            return self._submit_failed(f, e)
        if fut.done():
            return self._ran_inline(f, fut, size, nonblock)
        if not nonblock:
            # Let an interrupt find the waiting write; registered before the completion
            # callback, which forgets it again (interrupts are served on this thread).
            with self._lock:
                self._waiting[req] = f
        fut.add_done_callback(functools.partial(self._completed, f))
        return size if nonblock else None

    def _ran_inline(self, f: OpenFile, fut: Future[bytes], size: int, nonblock: bool) -> int:
        """The command is finished (the RM ran it on this thread): answer the write now.

        Nothing else of this file can have happened meanwhile: its reads and polls are
        served by this very thread, and no completion callback was registered.
        """
        response, err = _outcome(f, fut)
        ph = None
        with f.lock:
            f.in_flight, f.write_req = False, None
            if response is not None:
                f.response = response
            elif nonblock:
                f.error = err
            if f.poll_handle is not None:  # an O_NONBLOCK client polls: POLLIN now
                ph, f.poll_handle = f.poll_handle, None
        if ph is not None:
            self.replies.poll_notify(ph)
        if response is None and not nonblock:
            return -(err or errno.EIO)
        return size

    def _submit_failed(self, f: OpenFile, exc: Exception) -> int:
        err = exc.errno if isinstance(exc, RMError) and exc.errno else errno.EIO
        log.log(
            logging.WARNING if isinstance(exc, RMError) else logging.ERROR,
            "fh %d space %d: submit failed (errno %d): %s", f.fh, f.space.id, err, exc,
        )
        with f.lock:
            f.in_flight, f.write_req = False, None
        return -err

    def _completed(self, f: OpenFile, fut: Future[bytes]) -> None:
        """Whoever completed the future (RM worker, an inline submitter, or a cancel), with
        no RM lock held: the command finished (response or errno)."""
        response, err = _outcome(f, fut)
        out = _Outbox()
        with f.lock:
            f.in_flight = False
            req, f.write_req = f.write_req, None
            if req is not None:  # blocking write: its reply carries the outcome
                if response is not None:
                    f.response = response
                    count = f.write_size
                    out.add(lambda: self.replies.write(req, count))
                else:
                    out.add(lambda: self.replies.err(req, err or errno.EIO))
            elif response is not None:
                f.response = response
            else:
                f.error = err
            for read_req, size in self._take_reads(f):
                self._answer_read(f, read_req, size, out)
            if f.ready() or f.poll_handle is not None:
                self._drop_poll_handle(f, out, notify=True)
        if req is not None:
            with self._lock:
                self._waiting.pop(req, None)
        out.send()

    # -- read -----------------------------------------------------------------------------

    def read(self, req: Request, fh: int, size: int, nonblock: bool) -> bytes | int | None:
        """Returns bytes or -errno to answer now, None when answered later."""
        f = self._files.get(fh)
        if f is None:
            return -errno.EBADF
        ph = None
        with f.lock:
            if f.response is None and f.error is None:
                if not f.in_flight:
                    return b""  # nothing pending: 0 at once, even when blocking (never EAGAIN)
                # The kernel's reader would sleep on the buffer mutex while the TPM works
                # on this file's command, then get the response: so do we.
                f.waiting_reads.append((req, size))
                with self._lock:
                    self._waiting[req] = f
                return None
            result = self._take(f, size)
            if f.poll_handle is not None and not f.ready():
                ph, f.poll_handle = f.poll_handle, None  # pollers waiting for POLLOUT go on
        if ph is not None:
            self.replies.poll_notify(ph)
        return result

    def _take(self, f: OpenFile, size: int) -> bytes | int:
        """Consume up to size bytes of what is pending (under f.lock)."""
        if f.error is not None:
            err, f.error = f.error, None
            return -err
        response = f.response
        if response is None:
            return b""
        f.read_started = True
        if f.offset == 0 and size >= len(response):
            f.response = None  # the whole response at once (the usual read): no copy
            return response
        chunk = response[f.offset : f.offset + size]
        f.offset += len(chunk)
        if size == 0 or f.offset >= len(response):
            f.response, f.offset = None, 0  # read(fd, buf, 0) discards, as the kernel
        return chunk

    def _answer_read(self, f: OpenFile, req: Request, size: int, out: _Outbox) -> None:
        result = self._take(f, size)
        with self._lock:
            self._waiting.pop(req, None)
        if isinstance(result, bytes):
            out.add(lambda: self.replies.buf(req, result))
        else:
            out.add(lambda: self.replies.err(req, -result))

    @staticmethod
    def _take_reads(f: OpenFile) -> list[tuple[Request, int]]:
        reads, f.waiting_reads = f.waiting_reads, []
        return reads

    # -- poll -----------------------------------------------------------------------------

    def poll(self, fh: int, ph: PollHandle | None) -> int:
        """Readiness now; keep ph to wake the poller when the command completes."""
        f = self._files.get(fh)
        if f is None:
            if ph is not None:
                self.replies.poll_destroy(ph)
            return select.POLLERR
        old = None
        with f.lock:
            if ph is not None:
                # One handle per file is enough: the kernel wakes every poller of the file.
                old, f.poll_handle = f.poll_handle, ph
            revents = READABLE if f.ready() else WRITABLE
        if old is not None:
            self.replies.poll_destroy(old)
        return revents

    def _drop_poll_handle(self, f: OpenFile, out: _Outbox, notify: bool = False) -> None:
        ph, f.poll_handle = f.poll_handle, None
        if ph is None:
            return
        if notify:
            out.add(lambda: self.replies.poll_notify(ph))
        else:
            out.add(lambda: self.replies.poll_destroy(ph))

    # -- interrupt ------------------------------------------------------------------------

    def interrupt(self, req: Request) -> None:
        """The client was signalled while waiting: cancel its command, or end its read.

        Called by libfuse with its request lock held; never register an interrupt here.
        """
        with self._lock:
            f = self._waiting.get(req)
        if f is None:
            return  # already answered, or never deferred
        out = _Outbox()
        cancel = False
        with f.lock:
            if f.write_req is not None and f.write_req == req:
                cancel = True  # the completion answers the write (TPM_RC_CANCELED or EINTR)
            else:
                for entry in f.waiting_reads:
                    if entry[0] == req:  # cdata compare by address
                        f.waiting_reads.remove(entry)
                        out.add(lambda: self.replies.err(req, errno.EINTR))
                        break
        if not cancel:
            with self._lock:
                self._waiting.pop(req, None)
        out.send()
        if cancel:
            log.info("fh %d space %d: write interrupted, cancelling", f.fh, f.space.id)
            self.rm.cancel(f.space)

    # -- shutdown -------------------------------------------------------------------------

    def abandon(self) -> None:
        """After the loop stopped and the RM finished: answer what is left, free handles."""
        with self._lock:
            waiting = dict(self._waiting)
            self._waiting.clear()
            files = list(self._files.values())
        for req in waiting:
            try:
                self.replies.err(req, errno.ENODEV)
            except Exception:
                log.exception("answering an abandoned request failed")
        out = _Outbox()
        for f in files:
            with f.lock:
                f.waiting_reads.clear()
                f.write_req = None
                self._drop_poll_handle(f, out)
        out.send()

    @property
    def open_files(self) -> int:
        with self._lock:
            return len(self._files)


def _outcome(f: OpenFile, fut: Future[bytes]) -> tuple[bytes | None, int | None]:
    """(response, None) or (None, errno) from a finished RM future."""
    try:
        return fut.result(), None  # finished: never waits; one lock instead of three
    except CancelledError:
        return None, errno.EINTR
    except RMError as exc:
        if exc.errno:
            log.info("fh %d space %d: command failed with errno %d: %s",
                     f.fh, f.space.id, exc.errno, exc)
            return None, exc.errno
        log.error("fh %d space %d: command failed: %r", f.fh, f.space.id, exc)
    except Exception as exc:
        log.error("fh %d space %d: command failed: %r", f.fh, f.space.id, exc)
    return None, errno.EIO

"""The libfuse3 session (CUSE device or FUSE mount) behind a node, via the cffi shim.

The shim (native/shim.c) calls the `cusetpm_py_*` functions below from the session's
loop thread.  They must never raise into C: each catches everything, logs it, and
answers the request with EIO when it has not been answered yet.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import threading
from typing import Any

from cusetpm._native import ffi, lib
from cusetpm.frontends.files import TPM_BUFSIZE, PollHandle, Request, TpmFileOps
from cusetpm.frontends.spec import NodeSpec

log = logging.getLogger(__name__)
# After the node is initialised: how long a kernel refusal (name taken) takes to show.
REFUSAL_GRACE = 0.3

SHIM_ABI = 3
DEFERRED = lib.CUSETPM_DEFERRED  # a read/write callback's "answered later"
READ_MAX = lib.CUSETPM_READ_MAX  # the room a read callback has for its answer
O_NONBLOCK = os.O_NONBLOCK  # a module global: read and write test it on every request


class NativeReplies:
    """Replies.write/err/buf and poll wake-ups over libfuse; callable from any thread."""

    def err(self, req: Request, err: int) -> None:
        lib.cusetpm_reply_err(req, err)

    def write(self, req: Request, count: int) -> None:
        lib.cusetpm_reply_write(req, count)

    def buf(self, req: Request, data: bytes) -> None:
        lib.cusetpm_reply_buf(req, data, len(data))

    def poll_notify(self, ph: PollHandle) -> None:
        lib.cusetpm_poll_notify(ph)

    def poll_destroy(self, ph: PollHandle) -> None:
        lib.cusetpm_poll_destroy(ph)


class NodeSession:
    """One libfuse session and its loop thread, serving a TpmFileOps."""

    def __init__(self, ops: TpmFileOps, spec: NodeSpec, debug: bool = False):
        if lib.cusetpm_shim_abi() != SHIM_ABI:
            raise RuntimeError("cusetpm._native is stale: rebuild it (pip install -e .)")
        self.ops = ops
        self.spec = spec
        self.debug = debug
        self._handle = ffi.new_handle(self)  # kept alive as long as the session
        self._session: Any = ffi.NULL
        self._ready = threading.Event()
        self._loop_done = threading.Event()
        self._settled = threading.Event()  # ready, or the loop ended first
        self._thread: threading.Thread | None = None
        self.loop_result: int | None = None

    # -- lifetime -------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Create the node and serve it; returns once it accepts requests (else OSError)."""
        self._session = self._create()
        self._thread = threading.Thread(target=self._loop, name="cusetpm-node", daemon=True)
        self._thread.start()
        deadline_hit = not self._settled.wait(timeout)
        # CUSE says "initialised" once its INIT reply is written; the kernel registers the
        # device while taking that reply and, if the name is taken, aborts the connection
        # right then: the loop's next read fails at once. Give it that moment.
        grace = REFUSAL_GRACE if self.spec.cuse_name is not None else 0.0
        if self._ready.is_set() and not self._loop_done.wait(grace):
            return
        self.stop()
        self.destroy()
        if deadline_hit:
            raise OSError(errno.ETIMEDOUT, f"{self.spec.path}: the kernel did not initialise it")
        raise OSError(
            errno.EBUSY,
            f"{self.spec.path}: the kernel refused the node (is the name already taken?)",
        )

    def _create(self) -> Any:
        ffi.errno = 0
        if self.spec.cuse_name is not None:
            s = lib.cusetpm_cuse_new(self.spec.cuse_name.encode(), self._handle, self.debug)
            what = "/dev/cuse"
        else:
            assert self.spec.fuse_mount is not None
            s = lib.cusetpm_fuse_new(
                self.spec.fuse_mount.encode(), self.spec.mode, self.spec.uid, self.spec.gid,
                self._handle, self.debug,
            )
            what = f"FUSE mount at {self.spec.fuse_mount}"
        if s == ffi.NULL:
            err = ffi.errno or errno.EIO
            raise OSError(err, f"cannot set up {what}: {os.strerror(err)}")
        return s

    def _loop(self) -> None:
        try:
            self.loop_result = lib.cusetpm_session_loop(self._session)
            if self.loop_result:
                log.error("node loop ended: %s", os.strerror(-self.loop_result))
        finally:
            self._loop_done.set()
            self._settled.set()

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._loop_done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the loop to end (stop(), or the kernel closed the channel)."""
        return self._loop_done.wait(timeout)

    def stop(self) -> None:
        """Stop reading requests; replies can still be sent until destroy()."""
        if self._session != ffi.NULL:
            lib.cusetpm_session_stop(self._session)
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def destroy(self) -> None:
        """Remove the node (unmount, or close /dev/cuse). Call after stop()."""
        if self._session != ffi.NULL:
            lib.cusetpm_session_destroy(self._session)
            self._session = ffi.NULL

    # -- callbacks (loop thread) ----------------------------------------------------------

    def _on_ready(self) -> None:
        log.debug("%s: kernel initialised the node", self.spec.path)
        self._ready.set()
        self._settled.set()


def _session(userdata: Any) -> NodeSession:
    session: NodeSession = ffi.from_handle(userdata)
    return session




@ffi.def_extern()
def cusetpm_py_ready(userdata: Any) -> None:
    try:
        _session(userdata)._on_ready()
    except Exception:
        log.exception("ready callback failed")


@ffi.def_extern()
def cusetpm_py_open(userdata: Any, flags: int, uid: int, gid: int, pid: int) -> int:
    try:
        return _session(userdata).ops.open(flags, uid, gid, pid)
    except Exception:
        log.exception("open failed")
        return -errno.EIO


# read and write return their immediate answer to the shim, which sends it once Python
# has returned: one call into Python per request, and the reply's writev (which wakes the
# client) is the last thing done for the request.  Unanswered on an exception: the shim
# answers EIO.


@ffi.def_extern()
def cusetpm_py_read(
    userdata: Any, req: Request, fh: int, size: int, flags: int, out: Any
) -> int:
    try:
        result = _session(userdata).ops.read(req, fh, size, flags & O_NONBLOCK != 0)
    except Exception:
        log.exception("read failed")
        return -errno.EIO
    if result is None:
        return DEFERRED
    if isinstance(result, bytes):
        if len(result) > READ_MAX:  # never: a response fits the kernel's 4096-byte buffer
            log.error("fh %d: a %d-byte answer does not fit a read", fh, len(result))
            return -errno.EIO
        ffi.memmove(out, result, len(result))
        return len(result)
    return result


@ffi.def_extern()
def cusetpm_py_write(
    userdata: Any, req: Request, fh: int, buf: Any, size: int, flags: int
) -> int:
    try:
        # ffi.unpack makes the bytes in one step (ffi.buffer(...)[:] builds a buffer object
        # first); a write beyond TPM_BUFSIZE is refused, so only that much is ever needed.
        data = ffi.unpack(buf, size if size < TPM_BUFSIZE else TPM_BUFSIZE)
        result = _session(userdata).ops.write(req, fh, data, size, flags & O_NONBLOCK != 0)
    except Exception:
        log.exception("write failed")
        return -errno.EIO
    return DEFERRED if result is None else result


@ffi.def_extern()
def cusetpm_py_poll(userdata: Any, fh: int, ph: Any) -> int:
    try:
        return _session(userdata).ops.poll(fh, None if ph == ffi.NULL else ph)
    except Exception:
        log.exception("poll failed")
        return select.POLLERR


@ffi.def_extern()
def cusetpm_py_release(userdata: Any, req: Any, fh: int) -> None:
    request = None if req == ffi.NULL else req
    try:
        _session(userdata).ops.release(request, fh)
    except Exception:
        log.exception("release failed")
        if request is not None:
            lib.cusetpm_reply_err(request, 0)


@ffi.def_extern()
def cusetpm_py_interrupt(userdata: Any, req: Request) -> None:
    try:
        _session(userdata).ops.interrupt(req)
    except Exception:
        log.exception("interrupt failed")

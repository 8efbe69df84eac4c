"""libtpms in process, through ctypes: the embedded default TPM.

libtpms is a process-wide singleton (static globals everywhere) and not
thread-safe, so:
- one LibtpmsBackend may be open per process; a second open raises BackendError;
- every TPMLIB_* call runs under the module lock ``_LOCK``, except
  TPMLIB_CancelCommand, which only sets a flag the running command polls and is
  meant to be called from another thread while TPMLIB_Process runs (ctypes drops
  the GIL during foreign calls, so that thread really runs).

State lives in a directory in swtpm's on-disk format (see nvstore.py). libtpms
asks for it through callbacks registered with TPMLIB_RegisterCallbacks; they run
on the thread inside TPMLIB_Process, under ``_LOCK``.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import logging
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cusetpm.tpm.commands import shutdown, startup
from cusetpm.tpm.constants import TPM_SU
from cusetpm.tpm.rc import TPM_RC

from .base import HEADER_SIZE, Backend, BackendError, check_response, response_code
from .nvstore import StateDir, StateDirLocked, StateLock

log = logging.getLogger(__name__)

_LIBTPMS_SONAME = "libtpms.so.0"
_TPMLIB_TPM_VERSION_2 = 1

# libtpms TPM_RESULT values the callbacks return (libtpms/tpm_error.h).
_TPM_SUCCESS = 0
_TPM_FAIL = 0x09
_TPM_RETRY = 0x800

# Largest command we copy into our own buffer; libtpms' TPM_BUFFER_MAX is 4096, the
# rest is headroom so an oversized command reaches the TPM and gets its error code.
_CMD_BUFFER_SIZE = 64 * 1024

_LOCK = threading.Lock()
_SIZE = struct.Struct(">I")


_NV_LOAD = ctypes.CFUNCTYPE(
    ctypes.c_uint32,
    ctypes.POINTER(ctypes.c_void_p),
    ctypes.POINTER(ctypes.c_uint32),
    ctypes.c_uint32,
    ctypes.c_char_p,
)
_NV_STORE = ctypes.CFUNCTYPE(
    ctypes.c_uint32, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_char_p
)
_NV_DELETE = ctypes.CFUNCTYPE(ctypes.c_uint32, ctypes.c_uint32, ctypes.c_char_p, ctypes.c_ubyte)
_VOID_INIT = ctypes.CFUNCTYPE(ctypes.c_uint32)
_GET_LOCALITY = ctypes.CFUNCTYPE(ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32), ctypes.c_uint32)
_GET_PP = ctypes.CFUNCTYPE(ctypes.c_uint32, ctypes.POINTER(ctypes.c_ubyte), ctypes.c_uint32)


class _Callbacks(ctypes.Structure):
    _fields_ = [
        ("sizeOfStruct", ctypes.c_int),
        ("tpm_nvram_init", _VOID_INIT),
        ("tpm_nvram_loaddata", _NV_LOAD),
        ("tpm_nvram_storedata", _NV_STORE),
        ("tpm_nvram_deletename", _NV_DELETE),
        ("tpm_io_init", _VOID_INIT),
        ("tpm_io_getlocality", _GET_LOCALITY),
        ("tpm_io_getphysicalpresence", _GET_PP),
    ]


@dataclass
class _Libs:
    """The loaded shared libraries with their prototypes set."""

    tpms: Any
    libc: Any


_libs: _Libs | None = None


def _load_libs() -> _Libs:
    global _libs
    if _libs is not None:
        return _libs
    try:
        tpms = ctypes.CDLL(_LIBTPMS_SONAME)
    except OSError as e:
        raise BackendError(f"libtpms: cannot load {_LIBTPMS_SONAME} ({e}); "
                           "install the libtpms0 package") from e
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    u32, u32p, vp = ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32), ctypes.c_void_p
    tpms.TPMLIB_ChooseTPMVersion.argtypes = [ctypes.c_int]
    tpms.TPMLIB_ChooseTPMVersion.restype = u32
    tpms.TPMLIB_RegisterCallbacks.argtypes = [ctypes.POINTER(_Callbacks)]
    tpms.TPMLIB_RegisterCallbacks.restype = u32
    tpms.TPMLIB_MainInit.argtypes = []
    tpms.TPMLIB_MainInit.restype = u32
    tpms.TPMLIB_Terminate.argtypes = []
    tpms.TPMLIB_Terminate.restype = None
    tpms.TPMLIB_Process.argtypes = [ctypes.POINTER(vp), u32p, u32p, vp, u32]
    tpms.TPMLIB_Process.restype = u32
    tpms.TPMLIB_CancelCommand.argtypes = []
    tpms.TPMLIB_CancelCommand.restype = u32
    tpms.TPMLIB_VolatileAll_Store.argtypes = [ctypes.POINTER(vp), u32p]
    tpms.TPMLIB_VolatileAll_Store.restype = u32
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.malloc.restype = vp
    libc.free.argtypes = [vp]
    libc.free.restype = None
    _libs = _Libs(tpms=tpms, libc=libc)
    return _libs


# --- callbacks ---------------------------------------------------------------
# They are module-level because libtpms keeps one callback table per process.
# They read the state directory of the one open backend from _nv. They must never
# raise: an exception cannot cross into C, so every one catches and reports
# TPM_FAIL, which libtpms turns into a failure of the command (or of MainInit).

_nv: StateDir | None = None
_locality = 0


def _nv_init() -> int:
    return _TPM_SUCCESS


def _nv_load(data: Any, length: Any, tpm_number: int, name: bytes) -> int:
    try:
        assert _nv is not None
        blob = _nv.load(name.decode())
        if blob is None:
            # No state yet: TPM_RETRY tells libtpms to manufacture a fresh TPM.
            data[0] = None
            length[0] = 0
            return _TPM_RETRY
        libc = _load_libs().libc
        # libtpms free()s this buffer, so it must come from libc malloc.
        buf = libc.malloc(max(len(blob), 1))
        if not buf:
            return _TPM_FAIL
        ctypes.memmove(buf, blob, len(blob))
        data[0] = buf
        length[0] = len(blob)
        return _TPM_SUCCESS
    except Exception:
        log.exception("libtpms: loading state %r failed", name)
        return _TPM_FAIL


def _nv_store(data: int, length: int, tpm_number: int, name: bytes) -> int:
    try:
        assert _nv is not None
        _nv.store(name.decode(), ctypes.string_at(data, length))
        return _TPM_SUCCESS
    except Exception:
        log.exception("libtpms: storing state %r failed", name)
        return _TPM_FAIL


def _nv_delete(tpm_number: int, name: bytes, must_exist: int) -> int:
    try:
        assert _nv is not None
        _nv.delete(name.decode(), bool(must_exist))
        return _TPM_SUCCESS
    except Exception:
        log.exception("libtpms: deleting state %r failed", name)
        return _TPM_FAIL


def _io_init() -> int:
    return _TPM_SUCCESS


def _get_locality(loc: Any, tpm_number: int) -> int:
    try:
        loc[0] = _locality
        return _TPM_SUCCESS
    except Exception:
        return _TPM_FAIL


def _get_physical_presence(pp: Any, tpm_number: int) -> int:
    try:
        pp[0] = 0
        return _TPM_SUCCESS
    except Exception:
        return _TPM_FAIL


# The CFUNCTYPE objects must outlive every call libtpms makes: module globals.
_CALLBACKS = _Callbacks(
    ctypes.sizeof(_Callbacks),
    _VOID_INIT(_nv_init),
    _NV_LOAD(_nv_load),
    _NV_STORE(_nv_store),
    _NV_DELETE(_nv_delete),
    _VOID_INIT(_io_init),
    _GET_LOCALITY(_get_locality),
    _GET_PP(_get_physical_presence),
)

_open_backend: LibtpmsBackend | None = None


class LibtpmsBackend(Backend):
    """The process's one libtpms TPM 2.0, state in ``state_dir``.

    On open the TPM is started: Startup(SU_STATE) resumes after our own clean
    close, otherwise Startup(SU_CLEAR); TPM_RC_INITIALIZE means a saved volatile
    state already resumed it. On close it sends Shutdown(SU_STATE), so the next
    open resumes, then terminates libtpms.
    """

    def __init__(self, state_dir: str | os.PathLike[str], *, startup: bool = True) -> None:
        self.state_dir = Path(state_dir)
        self.name = f"libtpms:{self.state_dir}"
        self._closed = True
        self._libs = _load_libs()
        self._tpms = self._libs.tpms
        # The hot path calls a second handle on TPMLIB_Process with no argtypes:
        # the arguments are already ctypes objects, and skipping the per-call
        # conversion saves about 0.7 us of a ~2 us command.
        self._process = self._tpms["TPMLIB_Process"]
        self._process.restype = ctypes.c_uint32
        self._cmdbuf = ctypes.create_string_buffer(_CMD_BUFFER_SIZE)
        self._cmdview = memoryview(self._cmdbuf).cast("B")
        self._respview = memoryview(b"")
        self._resp_addr: int | None = None
        # libtpms reallocs this buffer to TPM_BUFFER_MAX on first use and then
        # reuses it: no allocation per command. Freed with libc free at close.
        self._resp = ctypes.c_void_p()
        self._resp_len = ctypes.c_uint32()
        self._resp_cap = ctypes.c_uint32()
        self._resp_ref = ctypes.byref(self._resp)
        self._resp_len_ref = ctypes.byref(self._resp_len)
        self._resp_cap_ref = ctypes.byref(self._resp_cap)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._lock: StateLock | None = None
        self._open()
        if startup:
            try:
                self._startup()
            except BaseException:
                self.close()
                raise

    # --- lifecycle -----------------------------------------------------------

    def _open(self) -> None:
        global _open_backend, _nv
        with _LOCK:
            if _open_backend is not None:
                raise BackendError(
                    f"libtpms: {_open_backend.name} is already open in this process; "
                    "libtpms is a process-wide singleton, close it before opening another"
                )
            # swtpm's lock first: nothing of the directory is read while another TPM owns it.
            try:
                self._lock = StateLock.acquire(self.state_dir)
            except StateDirLocked as e:
                raise BackendError(f"libtpms: {e.strerror}") from None
            except OSError as e:
                raise BackendError(f"libtpms: cannot lock {self.state_dir}: {e}") from e
            _nv = StateDir(self.state_dir)
            resumed = _nv.exists("volatilestate")
            try:
                self._init_locked()
            except BaseException:
                _nv = None
                self._lock.release()
                self._lock = None
                raise
            if resumed:
                # MainInit consumed the volatile state; a stale copy must not be
                # resumed again after the next close.
                _nv.delete("volatilestate")
            _open_backend = self
            self._closed = False
        log.info("%s: opened%s", self.name, " (resumed volatile state)" if resumed else "")

    def _init_locked(self) -> None:
        self._check(self._tpms.TPMLIB_ChooseTPMVersion(_TPMLIB_TPM_VERSION_2),
                    "TPMLIB_ChooseTPMVersion")
        self._check(self._tpms.TPMLIB_RegisterCallbacks(ctypes.byref(_CALLBACKS)),
                    "TPMLIB_RegisterCallbacks")
        rc = self._tpms.TPMLIB_MainInit()
        if rc != _TPM_SUCCESS:
            # MainInit may have half-built globals; Terminate resets them.
            self._tpms.TPMLIB_Terminate()
            raise BackendError(f"{self.name}: TPMLIB_MainInit failed with 0x{rc:x} "
                               "(unreadable or encrypted state?)")

    def _check(self, rc: int, what: str) -> None:
        if rc != _TPM_SUCCESS:
            raise BackendError(f"{self.name}: {what} failed with 0x{rc:x}")

    def _startup(self) -> None:
        rc = response_code(self.transmit(startup(TPM_SU.STATE)))
        if rc in (TPM_RC.SUCCESS, TPM_RC.INITIALIZE):
            log.debug("%s: Startup(SU_STATE) rc 0x%x", self.name, rc)
            return
        # No orderly shutdown saved (fresh TPM, crash, or a swtpm that was killed).
        log.debug("%s: Startup(SU_STATE) rc 0x%x, falling back to SU_CLEAR", self.name, rc)
        rc = response_code(self.transmit(startup(TPM_SU.CLEAR)))
        if rc not in (TPM_RC.SUCCESS, TPM_RC.INITIALIZE):
            raise BackendError(f"{self.name}: Startup(SU_CLEAR) failed with rc 0x{rc:x}")

    def close(self) -> None:
        global _open_backend, _nv
        with _LOCK:
            if self._closed:
                return
            self._closed = True
            try:
                self._shutdown_locked()
                # The orderly state just saved supersedes any volatile snapshot;
                # resuming that snapshot next time would roll the TPM back.
                if _nv is not None:
                    _nv.delete("volatilestate")
            finally:
                self._tpms.TPMLIB_Terminate()
                self._respview.release()
                self._respview = memoryview(b"")
                self._resp_addr = None
                if self._resp.value:
                    self._libs.libc.free(self._resp)
                    self._resp.value = None
                    self._resp_cap.value = 0
                _open_backend = None
                _nv = None
                if self._lock is not None:
                    self._lock.release()  # last: the state on disk is complete now
                    self._lock = None
        log.info("%s: closed", self.name)

    def _shutdown_locked(self) -> None:
        # Shutdown(SU_STATE) makes libtpms write the orderly state to permall.
        # A TPM that was never started answers TPM_RC_INITIALIZE: nothing to save.
        try:
            response = self._process_locked(shutdown(TPM_SU.STATE))
            rc = response_code(response)
            if rc not in (TPM_RC.SUCCESS, TPM_RC.INITIALIZE):
                log.warning("%s: Shutdown(SU_STATE) rc 0x%x", self.name, rc)
        except BackendError as e:
            log.warning("%s: Shutdown(SU_STATE) failed: %s", self.name, e)

    # --- commands ------------------------------------------------------------

    def transmit(self, command: bytes) -> bytes:
        with _LOCK:
            if self._closed:
                raise BackendError(f"{self.name}: transmit on a closed backend")
            response = self._process_locked(command)
        if len(response) < HEADER_SIZE or _SIZE.unpack_from(response, 2)[0] != len(response):
            check_response(self.name, response)  # raises with the details
        return response

    def _process_locked(self, command: bytes) -> bytes:
        n = len(command)
        if n > _CMD_BUFFER_SIZE:
            raise BackendError(f"{self.name}: command of {n} bytes is too large")
        # A private copy: libtpms decrypts session-encrypted parameters in place,
        # and a Python bytes object must never change under its owner.
        self._cmdview[:n] = command
        rc = self._process(self._resp_ref, self._resp_len_ref, self._resp_cap_ref,
                           self._cmdbuf, n)
        if rc != _TPM_SUCCESS:
            raise BackendError(f"{self.name}: TPMLIB_Process failed with 0x{rc:x}")
        if self._resp.value != self._resp_addr:
            self._map_response_buffer()
        return self._respview[: self._resp_len.value].tobytes()

    def _map_response_buffer(self) -> None:
        # libtpms (re)allocated its response buffer: view it anew. This happens on
        # the first command only; afterwards libtpms keeps reusing the buffer.
        self._respview.release()
        addr, cap = self._resp.value, self._resp_cap.value
        if not addr:
            raise BackendError(f"{self.name}: TPMLIB_Process returned no response buffer")
        self._respview = memoryview((ctypes.c_char * cap).from_address(addr)).cast("B")
        self._resp_addr = addr

    def cancel(self) -> None:
        # Deliberately without _LOCK: transmit holds it for the whole command.
        # libtpms clears the flag when the next command starts, so a cancel that
        # lands between commands is dropped rather than hitting the next one.
        if not self._closed:
            self._tpms.TPMLIB_CancelCommand()

    def store_volatile(self) -> None:
        """Save the running TPM's volatile state (swtpm's CMD_STORE_VOLATILE).

        The next open then resumes exactly here, loaded objects included, even
        if this process never closes cleanly.
        """
        buf = ctypes.c_void_p()
        length = ctypes.c_uint32()
        with _LOCK:
            if self._closed or _nv is None:
                raise BackendError(f"{self.name}: store_volatile on a closed backend")
            self._check(self._tpms.TPMLIB_VolatileAll_Store(ctypes.byref(buf),
                                                            ctypes.byref(length)),
                        "TPMLIB_VolatileAll_Store")
            try:
                _nv.store("volatilestate", ctypes.string_at(buf, length.value))
            finally:
                self._libs.libc.free(buf)


@atexit.register
def _close_at_exit() -> None:
    # A daemon leaving without close() would lose the orderly state; not the NV
    # contents, which libtpms writes through as it commits.
    backend = _open_backend
    if backend is not None:
        backend.close()

"""The RM's own conversation with the TPM: counted round trips, retries, context primitives."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from cusetpm.backends.base import Backend, BackendError
from cusetpm.tpm import commands as build
from cusetpm.tpm.command import parse_header
from cusetpm.tpm.constants import TPM_CC, TPM_HEADER_SIZE
from cusetpm.tpm.rc import TPM_RC, rc_base, rc_name

log = logging.getLogger(__name__)

# Kernel tpm_transmit retries RETRY and TESTING; YIELDED asks for the same resend.
RETRY_RCS = frozenset({TPM_RC.RETRY, TPM_RC.TESTING, TPM_RC.YIELDED})
_STARTUP = TPM_CC.Startup.to_bytes(4, "big")


class TpmNotStarted(BackendError):
    """The TPM answered TPM_RC_INITIALIZE: it was power-cycled (swtpm CMD_INIT, a new swtpm
    on the same connection) and waits for TPM2_Startup. Treated as a transport failure, so
    rm/backendstate.py starts it and finds the contexts the RM holds lost."""


class ContextError(Exception):
    """The TPM refused one of the RM's own ContextLoad/ContextSave/FlushContext."""

    def __init__(self, operation: str, handle: int, rc: int):
        super().__init__(f"{operation}(0x{handle:08x}): {rc_name(rc)}")
        self.operation = operation
        self.handle = handle
        self.rc = rc

    @property
    def gone(self) -> bool:
        """The handle no longer exists in the TPM (flushed, or never loaded).

        libtpms answers TPM_RC_VALUE for a handle outside its tables, where the reference
        code would say TPM_RC_REFERENCE_H0; a ContextLoad's VALUE means something else.
        """
        gone = {TPM_RC.HANDLE, TPM_RC.REFERENCE_H0}
        if self.operation != "ContextLoad":
            gone.add(TPM_RC.VALUE)
        return rc_base(self.rc) in gone


@dataclass
class LinkStats:
    round_trips: int = 0  # every transmit to the backend, the RM's own included
    retries: int = 0


class TpmLink:
    """Serialized access to the backend, used only by whoever holds the RM's `_current` job."""

    def __init__(self, backend: Backend, retry_first_delay: float, retry_max_delay: float):
        self.backend = backend
        self.stats = LinkStats()
        self._retry_first = retry_first_delay
        self._retry_max = retry_max_delay
        # Set once the RM has started the TPM (rm/backendstate.py): from then on a
        # TPM_RC_INITIALIZE means the TPM restarted under us.
        self.started = False

    def transmit(self, command: bytes) -> bytes:
        """One command, resent while the TPM answers RETRY/TESTING/YIELDED (bounded)."""
        self.stats.round_trips += 1
        response = self.backend.transmit(command)
        delay = self._retry_first
        while _rc(response) in RETRY_RCS and delay <= self._retry_max:
            log.debug("TPM answered %s; retrying in %.0f ms", rc_name(_rc(response)), delay * 1e3)
            time.sleep(delay)
            delay *= 2
            self.stats.retries += 1
            self.stats.round_trips += 1
            response = self.backend.transmit(command)
        if self.started and _rc(response) == TPM_RC.INITIALIZE and command[6:10] != _STARTUP:
            raise TpmNotStarted(f"{self.backend.name}: the TPM needs TPM2_Startup: it restarted")
        return response

    def context_load(self, context: bytes) -> int:
        """Loads a saved TPMS_CONTEXT (raw bytes as ContextSave returned them); the new handle."""
        response = self.transmit(build.context_load_raw(context))
        rc = _rc(response)
        if rc:
            raise ContextError("ContextLoad", _saved_handle(context), rc)
        return int.from_bytes(response[TPM_HEADER_SIZE : TPM_HEADER_SIZE + 4], "big")

    def context_save(self, handle: int) -> bytes:
        """The raw TPMS_CONTEXT of a loaded object or session."""
        response = self.transmit(build.context_save(handle))
        rc = _rc(response)
        if rc:
            raise ContextError("ContextSave", handle, rc)
        return response[TPM_HEADER_SIZE:]

    def flush(self, handle: int) -> None:
        rc = _rc(self.transmit(build.flush_context(handle)))
        if rc:
            raise ContextError("FlushContext", handle, rc)

    def flush_quietly(self, handle: int) -> None:
        """Flush on an error path: a failure is logged, never raised (the handle may be gone)."""
        try:
            self.flush(handle)
        except Exception as exc:
            log.debug("flush of 0x%08x during cleanup failed: %s", handle, exc)


def _rc(response: bytes) -> int:
    return parse_header(response).code


def _saved_handle(context: bytes) -> int:
    # TPMS_CONTEXT: sequence (8) | savedHandle (4) | ...
    return int.from_bytes(context[8:12], "big") if len(context) >= 12 else 0

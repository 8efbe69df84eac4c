"""A fault-injecting wrapper around a real backend, for RM robustness tests.

FaultyBackend forwards every command to the real TPM it wraps, except the ones a test has
armed a fault for. A fault either answers a TPM error code without sending the command
(the 10-byte response a TPM gives for a refused command), raises BackendError (a transport
failure), or delays the command (a slow TPM). Nothing here imitates a successful TPM
command: what the RM sees is either the real TPM's answer or an injected failure.

The backend also keeps a log of what it was asked to send, so tests can count round trips,
see which commands actually reached the TPM and in which order.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cusetpm.backends.base import Backend, BackendError
from cusetpm.tpm import commands as build
from cusetpm.tpm.constants import TPM_CC, TPM_HEADER_SIZE, TPM_ST, is_session_handle

# Injected errors are answered as a TPM would answer a refused command: tag, size 10, rc.
ERROR_TAG = TPM_ST.NO_SESSIONS


def command_code(command: bytes) -> int:
    return int.from_bytes(command[6:10], "big") if len(command) >= TPM_HEADER_SIZE else -1


def tpm_error(rc: int) -> bytes:
    return ERROR_TAG.to_bytes(2, "big") + (10).to_bytes(4, "big") + rc.to_bytes(4, "big")


@dataclass
class Fault:
    """One armed fault: matches commands with `code` (None: any command), counting from the
    moment it was armed, and fires on the `nth` match and the `times - 1` following ones
    (times=None: on every match from the nth on, until disarmed)."""

    code: int | None
    nth: int = 1
    times: int | None = 1
    rc: int | None = None  # answer this TPM rc without sending the command
    transport: bool = False  # raise BackendError instead of sending
    after_send: bool = False  # transport failure after the TPM ran the command (answer lost)
    # For rcs that claim the handle is gone (TPM_RC_HANDLE, REFERENCE_H0) on a ContextSave or
    # FlushContext: make the claim true by really flushing the handle first, so the test
    # describes a consistent TPM (an object that vanished) rather than a lying one.
    vanish: bool = False
    match: Callable[[bytes], bool] | None = None  # extra filter on the command bytes
    seen: int = 0
    fired: int = 0

    def applies(self, command: bytes) -> bool:
        if self.code is not None and command_code(command) != self.code:
            return False
        if self.match is not None and not self.match(command):
            return False
        self.seen += 1
        if self.seen < self.nth:
            return False
        if self.times is not None and self.fired >= self.times:
            return False
        self.fired += 1
        return True


@dataclass
class Sent:
    """One command the RM asked the backend to send, and what became of it."""

    command: bytes
    faulted: bool
    started: float = field(default_factory=time.monotonic)

    @property
    def code(self) -> int:
        return command_code(self.command)


class FaultyBackend(Backend):
    """Delegates to a real backend; injects the faults a test arms."""

    def __init__(self, inner: Backend):
        self.inner = inner
        self.name = f"faulty:{inner.name}"
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self.log: list[Sent] = []
        self.delay = 0.0  # seconds added before every command reaches the TPM
        self.delay_codes: frozenset[int] | None = None  # None: delay every command
        self.started = threading.Condition()  # notified when a command starts at the TPM
        self._held: list[tuple[int, threading.Event]] = []

    # -- arming -----------------------------------------------------------------------------

    def inject(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        return fault

    def fail(
        self, code: int | None, rc: int, nth: int = 1, times: int | None = 1, vanish: bool = False
    ) -> Fault:
        return self.inject(Fault(code, nth=nth, times=times, rc=rc, vanish=vanish))

    def break_transport(
        self, code: int | None = None, nth: int = 1, times: int | None = 1, after_send: bool = False
    ) -> Fault:
        return self.inject(Fault(code, nth=nth, times=times, transport=True, after_send=after_send))

    def heal(self) -> None:
        """Disarm every fault and remove any delay."""
        with self._lock:
            self._faults.clear()
            self.delay = 0.0
            self.delay_codes = None

    def hold(self, code: int) -> threading.Event:
        """The next command with this code waits at the backend, before the TPM, until the
        returned event is set: a command in flight for as long as the test wants."""
        gate = threading.Event()
        with self._lock:
            self._held.append((code, gate))
        return gate

    def slow(self, seconds: float, codes: set[int] | None = None) -> None:
        self.delay = seconds
        self.delay_codes = frozenset(codes) if codes is not None else None

    # -- looking back -----------------------------------------------------------------------

    def mark(self) -> int:
        """A position in the log, for since()."""
        with self._lock:
            return len(self.log)

    def since(self, mark: int) -> list[Sent]:
        with self._lock:
            return self.log[mark:]

    def reached_tpm(self, mark: int = 0) -> list[bytes]:
        """Commands the real TPM received since mark."""
        return [s.command for s in self.since(mark) if not s.faulted]

    def wait_started(self, code: int, mark: int, timeout: float = 10.0) -> bool:
        """Block until a command with this code has started at the real TPM since mark."""
        deadline = time.monotonic() + timeout
        with self.started:
            while True:
                if any(s.code == code and not s.faulted for s in self.since(mark)):
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.started.wait(left)

    # -- Backend ----------------------------------------------------------------------------

    def transmit(self, command: bytes) -> bytes:
        with self._lock:
            fault = next((f for f in self._faults if f.applies(command)), None)
            sent = Sent(bytes(command), faulted=fault is not None and not fault.after_send)
            self.log.append(sent)
            delay = self.delay
            if self.delay_codes is not None and command_code(command) not in self.delay_codes:
                delay = 0.0
            gate = next((g for c, g in self._held if c == command_code(command)), None)
            if gate is not None:
                self._held = [(c, g) for c, g in self._held if g is not gate]
        if fault is not None and not fault.after_send:
            if fault.transport:
                raise BackendError(f"{self.name}: injected transport failure")
            assert fault.rc is not None
            if fault.vanish:
                self._vanish(command)
            return tpm_error(fault.rc)
        with self.started:  # before the delay: a slow command has started when it waits
            self.started.notify_all()
        if gate is not None:
            gate.wait()
        if delay:
            time.sleep(delay)
        response = self.inner.transmit(command)
        if fault is not None:  # after_send: the TPM ran it, the answer is lost
            raise BackendError(f"{self.name}: injected transport failure after sending")
        return response

    def _vanish(self, command: bytes) -> None:
        code = command_code(command)
        handle = None
        if code in (TPM_CC.ContextSave, TPM_CC.FlushContext) and len(command) >= 14:
            handle = int.from_bytes(command[10:14], "big")
        elif code == TPM_CC.ContextLoad and len(command) >= 22:
            # TPMS_CONTEXT: sequence (8) | savedHandle (4): a saved session can vanish (be
            # flushed); a saved object is not in the TPM at all, nothing to flush.
            saved = int.from_bytes(command[18:22], "big")
            handle = saved if is_session_handle(saved) else None
        if handle is not None:
            self.inner.transmit(build.flush_context(handle))

    def cancel(self) -> None:
        self.inner.cancel()

    def close(self) -> None:
        self.inner.close()

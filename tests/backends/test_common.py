"""One suite, every backend: libtpms in process, swtpm over TCP and a unix socket.

Everything here talks to a real TPM (libtpms or swtpm); nothing is mocked.
"""

from __future__ import annotations

import threading
import time

import pytest

from cusetpm.backends import Backend, BackendError

from . import tpmcmds as T
from .conftest import Target


def ok(backend: Backend, command: bytes) -> bytes:
    response = backend.transmit(command)
    assert T.rc(response) == T.TPM_RC_SUCCESS, f"rc 0x{T.rc(response):x}"
    return response


def test_started_already(backend: Backend) -> None:
    # The backend sent Startup itself; another one is refused with INITIALIZE.
    assert T.rc(backend.transmit(T.startup())) == T.TPM_RC_INITIALIZE


def test_startup_left_to_the_caller(target: Target) -> None:
    backend = target.open(startup=False)
    # A fresh TPM that nobody started: commands are refused until the caller's Startup.
    assert T.rc(backend.transmit(T.get_random(8))) == T.TPM_RC_INITIALIZE
    assert T.rc(backend.transmit(T.startup())) == T.TPM_RC_SUCCESS
    ok(backend, T.get_random(8))


def test_get_random(backend: Backend) -> None:
    response = ok(backend, T.get_random(16))
    assert len(response) == 10 + 2 + 16
    assert response[10:12] == b"\x00\x10"
    assert response[12:] != ok(backend, T.get_random(16))[12:]


def test_response_length_matches_header(backend: Backend) -> None:
    response = backend.transmit(T.get_random(32))
    assert int.from_bytes(response[2:6], "big") == len(response)


@pytest.mark.parametrize("alg", ["ecc", "rsa"])
def test_create_primary_context_roundtrip(backend: Backend, alg: str) -> None:
    handle = T.response_handle(ok(backend, T.create_primary(alg)))
    assert handle >> 24 == 0x80
    context = T.context_blob(ok(backend, T.context_save(handle)))
    ok(backend, T.flush_context(handle))
    assert handle not in T.handles(ok(backend, T.get_capability_handles(T.TRANSIENT_FIRST)))
    loaded = T.response_handle(ok(backend, T.context_load(context)))
    assert loaded in T.handles(ok(backend, T.get_capability_handles(T.TRANSIENT_FIRST)))
    ok(backend, T.flush_context(loaded))


def test_persistent_handle_survives_restart(target: Target) -> None:
    backend = target.open()
    primary = T.response_handle(ok(backend, T.create_primary("ecc")))
    ok(backend, T.evict_control(primary, 0x81000001))
    ok(backend, T.flush_context(primary))
    backend = target.restart()
    listed = T.handles(ok(backend, T.get_capability_handles(T.PERSISTENT_FIRST)))
    assert 0x81000001 in listed


def test_same_primary_after_restart(target: Target) -> None:
    # The owner seed is part of the persisted state: same template, same key.
    backend = target.open()
    first = ok(backend, T.create_primary("ecc"))
    backend = target.restart()
    again = ok(backend, T.create_primary("ecc"))
    # Skip handle and parameterSize; the outPublic that follows must be equal.
    assert first[18:18 + 90] == again[18:18 + 90]


def test_close_is_idempotent_and_final(backend: Backend) -> None:
    backend.close()
    backend.close()
    with pytest.raises(BackendError):
        backend.transmit(T.get_random(8))


def test_context_manager_closes(target: Target) -> None:
    with target.open() as backend:
        ok(backend, T.get_random(8))
    with pytest.raises(BackendError):
        backend.transmit(T.get_random(8))


def _create_primary_with_cancel(backend: Backend) -> tuple[int, float]:
    """Run an RSA-2048 CreatePrimary on a thread and cancel it from this one.

    Cancel is repeated until the command ends: libtpms clears the flag when a
    command starts, so one cancel sent too early would be lost.
    """
    result: dict[str, int] = {}

    def run() -> None:
        result["rc"] = T.rc(backend.transmit(T.create_primary("rsa", b"cancel-me")))

    worker = threading.Thread(target=run)
    start = time.monotonic()
    worker.start()
    while worker.is_alive():
        backend.cancel()
        worker.join(0.001)
    return result["rc"], time.monotonic() - start


def test_cancel_rsa_create_primary(target: Target) -> None:
    backend = target.open()
    rc, _elapsed = _create_primary_with_cancel(backend)
    if target.is_swtpm:
        # swtpm 0.7.1 serves its control channel on the thread that runs the TPM:
        # CMD_CANCEL_TPM_CMD is read only after the command has finished, so the
        # command completes. What we check: cancel() neither blocks nor raises.
        assert rc == T.TPM_RC_SUCCESS
    else:
        assert rc == T.TPM_RC_CANCELED
    # The TPM is fine afterwards, and a stray cancel does not hit the next command.
    backend.cancel()
    ok(backend, T.create_primary("ecc"))


def test_cancel_when_idle_is_harmless(backend: Backend) -> None:
    backend.cancel()
    ok(backend, T.get_random(8))


def test_cancel_after_close_is_harmless(backend: Backend) -> None:
    backend.close()
    backend.cancel()


def test_name_says_which_backend(target: Target) -> None:
    backend = target.open()
    prefix = "libtpms:" if target.kind == "libtpms" else "swtpm:"
    assert backend.name.startswith(prefix)

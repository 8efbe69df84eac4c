"""A state directory moves between the embedded libtpms and swtpm, both ways.

Both sides are real: cusetpm's LibtpmsBackend in this process and a
``swtpm socket`` child process reading the same directory.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cusetpm.backends import Backend
from cusetpm.backends.libtpms import LibtpmsBackend
from cusetpm.backends.swtpm import SwtpmProcess

from . import tpmcmds as T
from .conftest import needs_swtpm

pytestmark = [pytest.mark.swtpm, needs_swtpm]

PERSISTENT = 0x81000001


def _persist_primary(backend: Backend) -> bytes:
    transmit = backend.transmit
    response = transmit(T.create_primary("ecc"))
    assert T.rc(response) == 0
    handle = T.response_handle(response)
    assert T.rc(transmit(T.evict_control(handle, PERSISTENT))) == 0
    assert T.rc(transmit(T.flush_context(handle))) == 0
    return bytes(response[18:18 + 90])  # start of outPublic: same seed, same bytes


def _persistent_handles(backend: Backend) -> list[int]:
    response = backend.transmit(T.get_capability_handles(T.PERSISTENT_FIRST))
    assert T.rc(response) == 0
    return T.handles(response)


def test_libtpms_to_swtpm(tmp_path: Path) -> None:
    with LibtpmsBackend(tmp_path) as backend:
        public = _persist_primary(backend)
    with SwtpmProcess(tmp_path) as swtpm, swtpm.backend() as backend2:
        assert PERSISTENT in _persistent_handles(backend2)
        assert backend2.transmit(T.create_primary("ecc"))[18:18 + 90] == public


def test_swtpm_to_libtpms(tmp_path: Path) -> None:
    with SwtpmProcess(tmp_path) as swtpm, swtpm.backend() as backend:
        public = _persist_primary(backend)
    with LibtpmsBackend(tmp_path) as backend2:
        assert PERSISTENT in _persistent_handles(backend2)
        assert backend2.transmit(T.create_primary("ecc"))[18:18 + 90] == public


def test_swtpm_volatile_state_resumes_in_libtpms(tmp_path: Path) -> None:
    swtpm = SwtpmProcess(tmp_path).start()
    try:
        backend = swtpm.backend()
        handle = T.response_handle(backend.transmit(T.create_primary("ecc")))
        backend.store_volatile()
        backend.close()
        swtpm.kill()  # no orderly shutdown: only the volatile snapshot knows the object
    finally:
        swtpm.stop()
    with LibtpmsBackend(tmp_path) as backend2:
        response = backend2.transmit(T.get_capability_handles(T.TRANSIENT_FIRST))
        assert handle in T.handles(response)


def test_libtpms_volatile_state_resumes_in_swtpm(tmp_path: Path) -> None:
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    with LibtpmsBackend(tmp_path / "state") as backend:
        handle = T.response_handle(backend.transmit(T.create_primary("ecc")))
        backend.store_volatile()
        for f in (tmp_path / "state").glob("tpm2-00.*"):
            (snapshot / f.name).write_bytes(f.read_bytes())
    with SwtpmProcess(snapshot) as swtpm, swtpm.backend() as backend2:
        response = backend2.transmit(T.get_capability_handles(T.TRANSIENT_FIRST))
        assert handle in T.handles(response)

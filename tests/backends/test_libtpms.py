"""What only the embedded libtpms backend has: the singleton, the state directory."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from cusetpm.backends import BackendError
from cusetpm.backends.libtpms import LibtpmsBackend
from cusetpm.backends.nvstore import StateDir, decode, encode

from . import tpmcmds as T


def test_second_backend_in_process_is_refused(tmp_path: Path) -> None:
    with LibtpmsBackend(tmp_path / "a") as first:
        with pytest.raises(BackendError, match="already open"):
            LibtpmsBackend(tmp_path / "b")
        # The refused open did not disturb the open one.
        assert T.rc(first.transmit(T.get_random(8))) == T.TPM_RC_SUCCESS
    with LibtpmsBackend(tmp_path / "b") as second:
        assert T.rc(second.transmit(T.get_random(8))) == T.TPM_RC_SUCCESS


def test_state_file_is_swtpm_format(tmp_path: Path) -> None:
    with LibtpmsBackend(tmp_path):
        pass
    data = (tmp_path / "tpm2-00.permall").read_bytes()
    assert data[:6] == bytes.fromhex("0201000a0000")
    assert int.from_bytes(data[6:10], "big") == len(data)  # totlen covers the file
    assert data[10:12] == b"\x00\x01"  # TAG_DATA
    assert int.from_bytes(data[12:16], "big") == len(data) - 16
    assert not list(tmp_path.glob("TMP*"))  # the temporary file was renamed


def test_clean_close_resumes_with_startup_state(tmp_path: Path) -> None:
    with LibtpmsBackend(tmp_path) as backend:
        pass
    backend = LibtpmsBackend(tmp_path, startup=False)
    try:
        assert T.rc(backend.transmit(T.startup(T.TPM_SU_STATE))) == T.TPM_RC_SUCCESS
    finally:
        backend.close()


def test_without_clean_shutdown_falls_back_to_clear(tmp_path: Path) -> None:
    backend = LibtpmsBackend(tmp_path)
    # A client's Shutdown(CLEAR) leaves no state to resume: open must still work.
    assert T.rc(backend.transmit(T.shutdown(T.TPM_SU_CLEAR))) == T.TPM_RC_SUCCESS
    backend.close()
    with LibtpmsBackend(tmp_path) as again:
        assert T.rc(again.transmit(T.get_random(8))) == T.TPM_RC_SUCCESS


def test_volatile_state_resumes_loaded_objects(tmp_path: Path) -> None:
    backend = LibtpmsBackend(tmp_path)
    handle = T.response_handle(backend.transmit(T.create_primary("ecc")))
    backend.store_volatile()
    # Keep a copy as a crash would leave it (close deletes the snapshot).
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for f in tmp_path.glob("tpm2-00.*"):
        (snapshot / f.name).write_bytes(f.read_bytes())
    backend.close()
    assert not (tmp_path / "tpm2-00.volatilestate").exists()
    with LibtpmsBackend(snapshot) as resumed:
        got = resumed.transmit(T.get_capability_handles(T.TRANSIENT_FIRST))
        assert handle in T.handles(got)
        # Consumed: resuming the same snapshot twice would fork the TPM's history.
        assert not (snapshot / "tpm2-00.volatilestate").exists()


def test_unreadable_state_is_a_backend_error(tmp_path: Path) -> None:
    (tmp_path / "tpm2-00.permall").write_bytes(b"not a state file")
    with pytest.raises(BackendError, match="MainInit"):
        LibtpmsBackend(tmp_path)
    # The failed open released the singleton.
    with LibtpmsBackend(tmp_path / "fresh") as backend:
        assert T.rc(backend.transmit(T.get_random(8))) == T.TPM_RC_SUCCESS


def test_nvstore_roundtrip_and_refusals(tmp_path: Path) -> None:
    assert decode(encode(b"blob")) == b"blob"
    with pytest.raises(ValueError, match="totlen"):
        decode(encode(b"blob") + b"x")
    encrypted = bytearray(encode(b"blob"))
    encrypted[5] |= 1
    with pytest.raises(ValueError, match="encrypted"):
        decode(bytes(encrypted))
    store = StateDir(tmp_path)
    assert store.load("permall") is None
    store.store("permall", b"abc")
    assert store.load("permall") == b"abc"
    store.delete("permall")
    store.delete("permall")
    with pytest.raises(FileNotFoundError):
        store.delete("permall", must_exist=True)


def test_transmit_copies_the_command(tmp_path: Path) -> None:
    # libtpms may rewrite the command buffer (parameter decryption in place);
    # the caller's bytes must stay as they were.
    command = T.get_random(8)
    before = bytes(command)
    with LibtpmsBackend(tmp_path) as backend:
        backend.transmit(command)
    assert command == before


def test_concurrent_transmits_are_serialized(tmp_path: Path) -> None:
    # The RM uses one worker, but nothing may break if two threads overlap:
    # every TPMLIB_Process runs under the module lock.
    failures: list[str] = []
    with LibtpmsBackend(tmp_path) as backend:

        def hammer() -> None:
            for _ in range(2000):
                response = backend.transmit(T.get_random(16))
                if T.rc(response) != 0 or len(response) != 28:
                    failures.append(response.hex())

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert failures == []

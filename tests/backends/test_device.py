"""The device backend, against a stand-in for /dev/tpmN.

How it is covered: DeviceBackend opens the slave side of a pseudo-terminal in
raw mode by its path (/dev/pts/N, a real character device), exactly as it opens
/dev/tpm0. A thread on the master side collects each command, runs it on a real
TPM (libtpms in this process) and writes the response back in small pieces, so
the backend's read-until-the-header's-size loop is exercised. Faults are
injected on the stand-in side (extra bytes, hang-up), never in the TPM.

What is not covered here: a kernel TPM driver's own semantics (one write per
command, one read per response, EBUSY...). The real /dev/tpm0 is covered in the
guest kernel by the VM suite, with ``swtpm chardev --vtpm-proxy``.
"""

from __future__ import annotations

import os
import threading
import tty
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cusetpm.backends import BackendError, open_backend
from cusetpm.backends.device import DeviceBackend
from cusetpm.backends.libtpms import LibtpmsBackend

from . import tpmcmds as T


@dataclass
class PtyTpm:
    """A pty whose master end forwards commands to a TPM."""

    path: str
    master: int
    slave: int
    mangle: Callable[[bytes], bytes] = lambda response: response
    hang_up: bool = False  # close the master after the next response
    dribble: bool = True  # write responses in pieces rather than in one write

    def serve(self, tpm: LibtpmsBackend) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(self.master, 4096)
            except OSError:
                return  # EIO: every slave descriptor is closed
            pending += chunk
            while len(pending) >= 10 and len(pending) >= int.from_bytes(pending[2:6], "big"):
                size = int.from_bytes(pending[2:6], "big")
                command, pending = pending[:size], pending[size:]
                self._send(self.mangle(tpm.transmit(command)))
                if self.hang_up:
                    os.close(self.master)
                    return

    def _send(self, response: bytes) -> None:
        if not self.dribble:
            os.write(self.master, response)
            return
        # Dribble it out so the reader gets a piece of the header first.
        pieces = [response[:3], response[3:10]]
        pieces += [response[i:i + 7] for i in range(10, len(response), 7)]
        for piece in pieces:
            if piece:
                os.write(self.master, piece)


@pytest.fixture
def pty_tpm(tmp_path: Path) -> Iterator[PtyTpm]:
    master, slave = os.openpty()
    tty.setraw(slave)  # no echo, no line discipline: bytes pass unchanged
    stand_in = PtyTpm(os.ttyname(slave), master, slave)
    with LibtpmsBackend(tmp_path) as tpm:
        thread = threading.Thread(target=stand_in.serve, args=(tpm,), daemon=True)
        thread.start()
        yield stand_in
        # Closing the last slave descriptor wakes the server's read with EIO.
        os.close(slave)
        thread.join(5)
        if not stand_in.hang_up:
            os.close(master)


def test_commands_through_the_device(pty_tpm: PtyTpm) -> None:
    with open_backend(f"device:{pty_tpm.path}") as backend:
        assert backend.name == f"device:{pty_tpm.path}"
        response = backend.transmit(T.get_random(16))
        assert T.rc(response) == 0 and len(response) == 28
        handle = T.response_handle(backend.transmit(T.create_primary("ecc")))
        context = T.context_blob(backend.transmit(T.context_save(handle)))
        assert T.rc(backend.transmit(T.flush_context(handle))) == 0
        loaded = T.response_handle(backend.transmit(T.context_load(context)))
        assert T.rc(backend.transmit(T.flush_context(loaded))) == 0
        backend.cancel()  # a no-op for devices, but never an error


def test_extra_bytes_are_a_length_mismatch(pty_tpm: PtyTpm) -> None:
    # A device hands over the whole response in one read; here that read holds
    # more than the header's size says.
    pty_tpm.mangle = lambda response: response + b"junk"
    pty_tpm.dribble = False
    with DeviceBackend(pty_tpm.path) as backend, pytest.raises(BackendError, match="header says"):
        backend.transmit(T.get_random(5))


def test_hang_up_is_a_backend_error(pty_tpm: PtyTpm) -> None:
    # The "device" goes away in the middle of a response.
    pty_tpm.mangle = lambda response: response[:12]
    pty_tpm.hang_up = True
    with DeviceBackend(pty_tpm.path) as backend, pytest.raises(BackendError):
        backend.transmit(T.get_random(16))


def test_missing_device(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="cannot open"):
        DeviceBackend(tmp_path / "tpm9")

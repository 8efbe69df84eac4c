"""What only the swtpm backend has: a process that can die, a control channel."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cusetpm.backends import BackendError
from cusetpm.backends.swtpm import (
    PTM_CAP_CANCEL_TPM_CMD,
    PTM_CAP_INIT,
    PTM_CAP_SET_LOCALITY,
    SwtpmBackend,
    SwtpmProcess,
)

from . import tpmcmds as T
from .conftest import needs_swtpm

pytestmark = [pytest.mark.swtpm, needs_swtpm]


@pytest.fixture(params=["tcp", "unix"])
def swtpm(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SwtpmProcess]:
    with SwtpmProcess(tmp_path / "state", transport=request.param) as proc:
        yield proc


def test_killed_swtpm_is_a_backend_error(swtpm: SwtpmProcess) -> None:
    backend = swtpm.backend()
    assert T.rc(backend.transmit(T.get_random(8))) == 0
    swtpm.kill()
    # The reconnect it tries once is refused as well.
    with pytest.raises(BackendError, match="swtpm:"):
        backend.transmit(T.get_random(8))
    backend.close()


def test_swtpm_killed_during_a_command(swtpm: SwtpmProcess) -> None:
    backend = swtpm.backend()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            for i in range(50):
                backend.transmit(T.create_primary("rsa", b"%d" % i))
        except BaseException as e:
            errors.append(e)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(0.02)
    swtpm.kill()
    worker.join(10)
    assert len(errors) == 1 and isinstance(errors[0], BackendError)


def test_reconnects_to_a_restarted_swtpm(tmp_path: Path) -> None:
    # Same port and socket path: the backend notices its stale connection before
    # sending and reconnects, so the caller sees no error.
    for transport in ("tcp", "unix"):
        proc = SwtpmProcess(tmp_path / transport, transport=transport,
                            socket_path=tmp_path / f"{transport}.sock")
        proc.start()
        try:
            backend = proc.backend()
            assert T.rc(backend.transmit(T.get_random(8))) == 0
            proc.stop()
            proc.start()
            assert T.rc(backend.transmit(T.startup())) == 0
            assert T.rc(backend.transmit(T.get_random(8))) == 0
            backend.close()
        finally:
            proc.stop()


def test_control_channel(swtpm: SwtpmProcess) -> None:
    backend = swtpm.backend()
    caps = backend.get_capability()
    assert caps & PTM_CAP_INIT and caps & PTM_CAP_SET_LOCALITY
    assert caps & PTM_CAP_CANCEL_TPM_CMD  # advertised, though 0.7.1 cannot honour it
    backend.set_locality(0)
    with pytest.raises(ValueError):
        backend.set_locality(5)
    # CMD_INIT is a power cycle: the TPM wants Startup again.
    backend.init()
    assert T.rc(backend.transmit(T.get_random(8))) == 0x100  # TPM_RC_INITIALIZE
    assert T.rc(backend.transmit(T.startup())) == 0
    backend.shutdown()
    assert swtpm.proc is not None
    assert swtpm.proc.wait(5) == 0


def test_connect_refused_is_a_backend_error(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="cannot connect"):
        SwtpmBackend.unix(tmp_path / "nothing.sock")


def _stand_in(reply: Callable[[bytes], bytes]) -> tuple[socket.socket, int]:
    """A broken TPM server: answers every command with reply(command), then hangs up."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.sendall(reply(conn.recv(4096)))

    threading.Thread(target=serve, daemon=True).start()
    return server, int(server.getsockname()[1])


@pytest.mark.parametrize(
    "reply, message",
    [
        (lambda cmd: bytes.fromhex("8001 00000064 00000000") + b"x" * 10, "receive failed"),
        (lambda cmd: bytes.fromhex("8001 00000004 00000000"), "claims 4 bytes"),
        (lambda cmd: b"\x80\x01", "receive failed"),
    ],
    ids=["short-body", "size-below-header", "short-header"],
)
def test_response_length_mismatch(reply: Callable[[bytes], bytes], message: str) -> None:
    server, port = _stand_in(reply)
    try:
        backend = SwtpmBackend.tcp("127.0.0.1", port, startup=False)
        with pytest.raises(BackendError, match=message):
            backend.transmit(T.get_random(8))
        backend.close()
    finally:
        server.close()

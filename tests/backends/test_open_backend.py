"""open_backend: specs in, the right backend out, clear errors for bad specs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cusetpm.backends import open_backend, parse_spec
from cusetpm.backends.libtpms import LibtpmsBackend
from cusetpm.backends.swtpm import SwtpmBackend, SwtpmProcess

from .conftest import needs_swtpm


@pytest.mark.parametrize(
    "spec, parsed",
    [
        ("libtpms", ("libtpms", ())),
        ("libtpms:/var/lib/cusetpm", ("libtpms", ("/var/lib/cusetpm",))),
        ("swtpm:tcp:127.0.0.1:2321", ("swtpm", ("tcp", "127.0.0.1", "2321"))),
        ("swtpm:tcp:[::1]:2321", ("swtpm", ("tcp", "::1", "2321"))),
        ("swtpm:unix:/run/swtpm.sock", ("swtpm", ("unix", "/run/swtpm.sock"))),
        ("device:/dev/tpm0", ("device", ("/dev/tpm0",))),
    ],
)
def test_parse_spec(spec: str, parsed: tuple[str, tuple[str, ...]]) -> None:
    assert parse_spec(spec) == parsed


@pytest.mark.parametrize(
    "spec",
    ["", "tpm", "swtpm", "swtpm:tcp:host", "swtpm:tcp:host:port", "swtpm:tcp::2321",
     "swtpm:tcp:h:65535", "swtpm:udp:h:1", "swtpm:unix:", "device", "device:"],
)
def test_bad_spec(spec: str) -> None:
    with pytest.raises(ValueError, match="bad backend spec"):
        open_backend(spec)


def test_libtpms_needs_a_state_dir() -> None:
    with pytest.raises(ValueError, match="state directory"):
        open_backend("libtpms")


def test_open_libtpms(tmp_path: Path) -> None:
    with open_backend("libtpms", tmp_path) as backend:
        assert isinstance(backend, LibtpmsBackend)
        assert backend.name == f"libtpms:{tmp_path}"


@needs_swtpm
@pytest.mark.swtpm
@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_open_swtpm(tmp_path: Path, transport: str) -> None:
    with SwtpmProcess(tmp_path, transport=transport) as proc, open_backend(proc.spec) as backend:
        assert isinstance(backend, SwtpmBackend)
        assert backend.name == proc.spec


def test_auto_without_a_kernel_tpm_is_libtpms(tmp_path: Path) -> None:
    from cusetpm.backends import resolve_auto

    assert resolve_auto("auto", str(tmp_path / "no-tpm0")) == "libtpms"
    (tmp_path / "regular-file").write_bytes(b"")
    assert resolve_auto("auto", str(tmp_path / "regular-file")) == "libtpms"
    assert resolve_auto("swtpm:unix:/run/s", "/dev/null") == "swtpm:unix:/run/s"
    assert parse_spec("auto") == ("auto", ())


def test_auto_with_a_character_device_is_that_device() -> None:
    """A character device at the auto path (here a pty, the device backend's stand-in in
    test_device.py) is taken as the kernel's TPM."""
    from cusetpm.backends import resolve_auto

    master, slave = os.openpty()
    try:
        path = os.ttyname(slave)
        assert resolve_auto("auto", path) == f"device:{path}"
    finally:
        os.close(master)
        os.close(slave)


def test_auto_here_serves_the_embedded_tpm(tmp_path: Path) -> None:
    if os.path.exists("/dev/tpm0"):
        pytest.skip("this machine has a kernel TPM: auto means device:/dev/tpm0 here")
    with open_backend("auto", tmp_path) as backend:
        assert isinstance(backend, LibtpmsBackend)

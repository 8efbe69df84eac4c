"""The state directory is one TPM's alone: cusetpm takes swtpm's lock on DIR/.lock.

Both ways with a real swtpm, and cusetpm against cusetpm (another process: a POSIX lock does
not exclude its own process, and libtpms is one TPM per process anyway).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cusetpm.backends.base import BackendError
from cusetpm.backends.libtpms import LibtpmsBackend
from cusetpm.backends.nvstore import LOCK_FILE
from cusetpm.backends.swtpm import SwtpmProcess
from tests.backends.tpmcmds import get_random

REPO = Path(__file__).resolve().parents[2]

# A second process trying to open the directory cusetpm's libtpms backend uses.
_OPEN_IN_CHILD = """
import sys
from cusetpm.backends.base import BackendError
from cusetpm.backends.libtpms import LibtpmsBackend
try:
    LibtpmsBackend(sys.argv[1]).close()
except BackendError as e:
    print(e)
    sys.exit(3)
print("opened")
"""


def _open_in_child(state: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _OPEN_IN_CHILD, str(state)],
                          capture_output=True, text=True, cwd=REPO, timeout=60)


def test_swtpm_holding_the_directory_refuses_cusetpm(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with SwtpmProcess(state) as swtpm:
        assert swtpm.proc is not None
        with pytest.raises(BackendError) as info:
            LibtpmsBackend(state)
        message = str(info.value)
        assert str(state) in message
        assert f"swtpm (pid {swtpm.proc.pid})" in message
        # and swtpm's TPM was not disturbed
        with swtpm.backend() as tpm:
            assert tpm.transmit(get_random(8))[6:10] == b"\0\0\0\0"
    # swtpm gone: the lock went with it
    LibtpmsBackend(state).close()


def test_cusetpm_holding_the_directory_refuses_swtpm(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with LibtpmsBackend(state):
        swtpm = SwtpmProcess(state)
        with pytest.raises(BackendError) as info:
            swtpm.start()
        swtpm.stop()
        assert "lock" in str(info.value).lower(), str(info.value)
    # cusetpm closed: swtpm may have the directory now (and reads our state)
    with SwtpmProcess(state) as swtpm, swtpm.backend() as tpm:
        assert tpm.transmit(get_random(8))[6:10] == b"\0\0\0\0"


def test_second_cusetpm_is_refused_naming_the_directory_and_holder(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with LibtpmsBackend(state):
        child = _open_in_child(state)
        assert child.returncode == 3, child.stdout + child.stderr
        assert str(state) in child.stdout
        assert "(pid " in child.stdout  # this test process, named by the lock
        assert (state / LOCK_FILE).exists()
    child = _open_in_child(state)
    assert child.returncode == 0 and "opened" in child.stdout, child.stdout + child.stderr


def test_serve_refuses_a_locked_directory(tmp_path: Path) -> None:
    if shutil.which("fusermount3") is None:
        pytest.skip("needs fusermount3 (Debian package fuse3)")
    state = tmp_path / "state"
    with LibtpmsBackend(state):
        serve = subprocess.run(
            [sys.executable, "-m", "cusetpm", "serve", "--fuse-mount", str(tmp_path / "mnt"),
             "--state-dir", str(state)],
            capture_output=True, text=True, cwd=REPO, timeout=60,
        )
    assert serve.returncode == 1
    assert f"state directory {state} is in use" in serve.stderr, serve.stderr

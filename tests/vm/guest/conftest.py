"""Fixtures for tests that run inside the guest kernel (root, cuse.ko, tpm_vtpm_proxy.ko).

* ``kernel_tpmrm``: the kernel's own resource manager on a fresh swtpm, through
  ``tpm_vtpm_proxy`` -- the reference for side-by-side behaviour and speed.
* ``cusetpm_cuse_node``: cusetpm serving a CUSE node on the embedded libtpms TPM.
  It skips (with the reason) while ``cusetpm serve`` has no CUSE frontend yet,
  and fails if the frontend exists but does not come up.

Both yield the node's path (a ``/dev/...`` string).  Timeouts are generous: the
guest runs under TCG, where Python is 10-40x slower than on the host.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

IN_GUEST = os.environ.get("CUSETPM_VM_GUEST") == "1"
PROJECT_ROOT = Path(__file__).resolve().parents[3]

SWTPM_START_TIMEOUT = 60.0
CUSETPM_START_TIMEOUT = 120.0
STOP_TIMEOUT = 15.0

CUSE_NODE_NAME = "tpmrm-cusetpm-test"
# `cusetpm serve` prints this once the node accepts commands (cusetpm/serve.py).
SERVING_LINE = b"cusetpm: serving "


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Defence in depth: tests/vm/conftest.py already keeps these out of a host
    # run, but an explicit `pytest tests/vm/guest` on the host must not modprobe.
    if IN_GUEST:
        return
    skip = pytest.mark.skip(reason="guest-only test: run it with `make test-vm`")
    for item in items:
        if Path(str(item.fspath)).is_relative_to(Path(__file__).parent):
            item.add_marker(skip)


def modprobe(module: str) -> None:
    """Load a kernel module, failing the test with modprobe's message if it cannot."""
    proc = subprocess.run(["modprobe", module], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.fail(f"modprobe {module} failed ({proc.returncode}): {proc.stderr.strip()}")


def wait_for_path(path: Path, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> bool:
    """Poll for ``path`` to exist; give up early if ``proc`` exits. True if it appeared."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return True
        if proc is not None and proc.poll() is not None:
            return path.exists()
        time.sleep(0.05)
    return path.exists()


def stop_process(
    proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT, log: Path | None = None
) -> str:
    """SIGTERM, then SIGKILL after ``timeout``; return what it printed (its pipe or ``log``)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if log is not None:
        return log.read_text(errors="replace") if log.exists() else ""
    out = proc.stdout.read() if proc.stdout else b""
    return out.decode(errors="replace")


def _read_until(proc: subprocess.Popen[bytes], pattern: re.Pattern[str], timeout: float) -> str:
    """Read ``proc``'s stdout line by line until ``pattern`` matches; return the text read."""
    assert proc.stdout is not None
    seen = ""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while not pattern.search(seen):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sel.select(remaining):
                break
            line = proc.stdout.readline()
            if not line:  # EOF: the process is gone
                break
            seen += line.decode(errors="replace")
    finally:
        sel.close()
    return seen


@pytest.fixture
def kernel_tpmrm(tmp_path: Path) -> Iterator[str]:
    """The kernel's /dev/tpmrmN on a fresh swtpm behind tpm_vtpm_proxy; swtpm is stopped after.

    swtpm prints ``New TPM device: /dev/tpmN (major/minor = ...)``; the kernel
    then registers /dev/tpmN and its resource manager node /dev/tpmrmN.
    """
    modprobe("tpm_vtpm_proxy")
    state = tmp_path / "swtpm-state"
    state.mkdir()
    proc = subprocess.Popen(
        [
            "swtpm",
            "chardev",
            "--vtpm-proxy",
            "--tpm2",
            "--tpmstate",
            f"dir={state}",
            "--flags",
            "startup-clear",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        seen = _read_until(proc, re.compile(r"New TPM device: /dev/tpm(\d+)"), SWTPM_START_TIMEOUT)
        match = re.search(r"New TPM device: /dev/tpm(\d+)", seen)
        if match is None:
            out = seen + stop_process(proc)
            pytest.fail(f"swtpm chardev --vtpm-proxy did not create a TPM device:\n{out}")
        node = Path(f"/dev/tpmrm{match.group(1)}")
        if not wait_for_path(node, SWTPM_START_TIMEOUT, proc):
            out = seen + stop_process(proc)
            pytest.fail(
                f"{node} did not appear after swtpm created /dev/tpm{match.group(1)}:\n{out}"
            )
        yield str(node)
    finally:
        stop_process(proc)


@pytest.fixture(scope="session")
def cusetpm_serves_cuse() -> str | None:
    """None if ``cusetpm serve`` has a CUSE frontend, else why not (asked once per boot:
    each guest Python start costs seconds under TCG)."""
    proc = subprocess.run(
        [sys.executable, "-m", "cusetpm", "serve", "--help"],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        check=False,
        timeout=CUSETPM_START_TIMEOUT,
    )
    if proc.returncode != 0:
        # The CLI itself is broken: that is a failure, not "not there yet".
        pytest.fail(f"`cusetpm serve --help` failed ({proc.returncode}):\n{proc.stderr}")
    if "--name" not in proc.stdout:
        return "cusetpm serve cannot serve CUSE yet (no --name option in `cusetpm serve --help`)"
    return None


def _wait_serving(proc: subprocess.Popen[bytes], node: Path, log: Path, timeout: float) -> bool:
    """Wait for the node to exist and for the daemon's "serving" line (its ready signal:
    the node can appear before the daemon takes commands)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if node.exists() and SERVING_LINE in log.read_bytes():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def cusetpm_cuse_node(
    tmp_path_factory: pytest.TempPathFactory, cusetpm_serves_cuse: str | None
) -> Iterator[str]:
    """cusetpm serving /dev/tpmrm-cusetpm-test over CUSE on the embedded libtpms TPM.

    One daemon per test module: starting Python and libtpms costs seconds under
    TCG.  Tests get isolation the way real clients do, from their own open file
    descriptors (one space each).

    Skips only while the CUSE frontend has not landed (``cusetpm serve`` has no
    ``--name`` option).  Once it has, a daemon that exits or never shows its node
    fails with the daemon's output.
    """
    if cusetpm_serves_cuse is not None:
        pytest.skip(cusetpm_serves_cuse)
    python = sys.executable
    node = Path("/dev") / CUSE_NODE_NAME
    tmp_path = tmp_path_factory.mktemp("cusetpm")
    state = tmp_path / "cusetpm-state"
    state.mkdir()
    # A file, not a pipe: nobody reads the daemon's log while tests run, and a
    # full pipe would block it mid-command.
    log = tmp_path / "cusetpm-serve.log"
    logfile = log.open("wb")
    proc = subprocess.Popen(
        [
            python,
            "-m",
            "cusetpm",
            "serve",
            "--backend",
            "libtpms",
            "--state-dir",
            str(state),
            "--name",
            CUSE_NODE_NAME,
        ],
        stdin=subprocess.DEVNULL,
        stdout=logfile,
        stderr=subprocess.STDOUT,
        cwd=PROJECT_ROOT,
    )
    logfile.close()  # the child has its own copy
    if not _wait_serving(proc, node, log, CUSETPM_START_TIMEOUT):
        out = stop_process(proc, log=log)
        pytest.fail(
            f"cusetpm serve --name {CUSE_NODE_NAME} did not serve {node} within "
            f"{CUSETPM_START_TIMEOUT:.0f} s (exit status {proc.returncode}):\n{out}"
        )
    try:
        yield str(node)
    finally:
        died = proc.poll()  # before we stop it: did it die while serving?
        out = stop_process(proc, log=log)
    if died is not None or proc.returncode not in (0, -signal.SIGTERM):
        pytest.fail(
            f"cusetpm serve exited with {proc.returncode} (died while serving: "
            f"{died is not None}):\n{out}"
        )

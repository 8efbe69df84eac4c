"""Fixtures for the node tests: `cusetpm serve --fuse-mount` as a subprocess, or in process.

The host kernel has no CUSE, so these tests serve the same file operations on a FUSE
mount (DIR/tpmrm0). They need root and /dev/fuse; every mount is torn down even when a
test fails (the daemon's SIGTERM path, then a lazy unmount as the last resort; the
mount also uses libfuse's auto_unmount, so even a SIGKILLed daemon leaves none).
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0


def fuse_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to mount FUSE with allow_other"
    if not os.path.exists("/dev/fuse"):
        return "needs /dev/fuse"
    if shutil.which("fusermount3") is None:
        return "needs fusermount3 (Debian package fuse3)"
    return None


def require_fuse() -> None:
    """Skip (with the reason) where a FUSE node cannot be served."""
    reason = fuse_unavailable()
    if reason is not None:
        pytest.skip(reason)


def lazy_unmount(path: Path) -> None:
    if os.path.ismount(path):
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def schedule_args(extra: list[str]) -> list[str]:
    """CUSETPM_TEST_SCHEDULE=fifo serves the nodes in the other schedule (fair is the
    default), unless a test names its own; CUSETPM_TEST_RESIDENCY=resident the other
    residency mode (rm/residency.py; eager is the default for now)."""
    schedule = os.environ.get("CUSETPM_TEST_SCHEDULE")
    args = ["--schedule", schedule] if schedule and "--schedule" not in extra else []
    residency = os.environ.get("CUSETPM_TEST_RESIDENCY")
    if residency and "--residency" not in extra:
        args += ["--residency", residency]
    return args


@dataclass
class Daemon:
    """One `cusetpm serve` subprocess; start() returns once it printed its serving line."""

    mount: Path
    state: Path
    log_path: Path
    extra: list[str] = field(default_factory=list)
    env: dict[str, str] | None = None
    proc: subprocess.Popen[str] | None = None
    line: str = ""

    @property
    def node(self) -> str:
        return str(self.mount / "tpmrm0")

    @property
    def tcti(self) -> str:
        return f"device:{self.node}"

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "cusetpm", "serve",
            "--fuse-mount", str(self.mount), "--state-dir", str(self.state),
            "--log-level", "INFO", *self.extra, *schedule_args(self.extra),
        ]

    def spawn(self) -> subprocess.Popen[str]:
        self.log_file = open(self.log_path, "a")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.command(), stdout=subprocess.PIPE, stderr=self.log_file, text=True,
            cwd=REPO, env=self.env,
        )
        return self.proc

    def start(self) -> Daemon:
        proc = self.spawn()
        assert proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.2)
            if ready:
                self.line = proc.stdout.readline()
                if self.line.startswith("cusetpm: serving"):
                    return self
                if not self.line:  # EOF: the daemon died
                    break
        self.stop()
        raise AssertionError(f"daemon did not start:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        rc = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
            try:
                rc = self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.log_file.close()
        lazy_unmount(self.mount)
        return rc

    def log(self) -> str:
        try:
            return self.log_path.read_text()
        except OSError:
            return ""


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[type[Daemon]]:
    """make_daemon(extra=[...]) -> a started-or-not Daemon, stopped after the test."""
    require_fuse()
    made: list[Daemon] = []
    counter = iter(range(1000))

    def factory(extra: list[str] | None = None, state: Path | None = None,
                env: dict[str, str] | None = None, mount: Path | None = None) -> Daemon:
        n = next(counter)
        d = Daemon(
            mount=mount or tmp_path / f"mnt{n}",
            state=state or tmp_path / f"state{n}",
            log_path=tmp_path / f"daemon{n}.log",
            extra=extra or [],
            env=env,
        )
        made.append(d)
        return d

    yield factory  # type: ignore[misc]
    for d in made:
        d.stop()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon shared by a module's tests (each test opens its own descriptors)."""
    require_fuse()
    base = tmp_path_factory.mktemp("node")
    d = Daemon(mount=base / "mnt", state=base / "state", log_path=base / "daemon.log")
    d.start()
    yield d
    rc = d.stop()
    assert rc == 0, f"daemon exited {rc}:\n{d.log()}"


@pytest.fixture(scope="module")
def node(request: pytest.FixtureRequest) -> str:
    """The node under test: the module's FUSE daemon, or CUSETPM_TEST_NODE when set (a
    node served elsewhere, e.g. a CUSE /dev/tpmrm* in the guest kernel of tests/vm)."""
    external = os.environ.get("CUSETPM_TEST_NODE")
    if external:
        return external
    daemon: Daemon = request.getfixturevalue("daemon")
    return daemon.node


@pytest.fixture(scope="module")
def tcti(node: str) -> str:
    return f"device:{node}"


# -- in process: the RM is at hand for a census of the TPM itself ------------------------


@dataclass
class InProcessNode:
    path: str
    rm: object
    ops: object


@pytest.fixture
def inproc(tmp_path: Path) -> Iterator[InProcessNode]:
    """The node served by this process (libtpms, RM, TpmFileOps, libfuse session)."""
    require_fuse()
    from cusetpm.backends.libtpms import LibtpmsBackend
    from cusetpm.frontends.files import TpmFileOps
    from cusetpm.frontends.native import NativeReplies, NodeSession
    from cusetpm.frontends.spec import NodeSpec
    from cusetpm.rm import ResourceManager, RMConfig

    mount = tmp_path / "mnt"
    mount.mkdir()
    backend = LibtpmsBackend(tmp_path / "state")
    rm = ResourceManager(backend, RMConfig(
        schedule=os.environ.get("CUSETPM_TEST_SCHEDULE") or "fair",
        residency=os.environ.get("CUSETPM_TEST_RESIDENCY") or "eager",
    ))
    rm.start()
    ops = TpmFileOps(rm, NativeReplies())
    session = NodeSession(ops, NodeSpec(fuse_mount=str(mount), mode=0o666))
    try:
        session.start()
        yield InProcessNode(str(mount / "tpmrm0"), rm, ops)
    finally:
        session.stop()
        rm.stop()
        ops.abandon()
        session.destroy()
        backend.close()
        lazy_unmount(mount)

"""Fixtures: the same tests against libtpms in process and real swtpm processes.

``target`` is one TPM with a state directory that survives reopening: for
libtpms a LibtpmsBackend on the directory (libtpms is a process-wide singleton,
so every test closes its backend before the next one opens), for swtpm a
``swtpm socket`` child process over TCP or a unix socket.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cusetpm.backends import Backend
from cusetpm.backends.libtpms import LibtpmsBackend
from cusetpm.backends.swtpm import SwtpmProcess

HAVE_SWTPM = shutil.which("swtpm") is not None
needs_swtpm = pytest.mark.skipif(not HAVE_SWTPM, reason="swtpm is not installed")

KINDS = [
    "libtpms",
    pytest.param("swtpm-tcp", marks=[pytest.mark.swtpm, needs_swtpm]),
    pytest.param("swtpm-unix", marks=[pytest.mark.swtpm, needs_swtpm]),
]


@dataclass
class Target:
    """A TPM of one kind on one state directory; open() (re)starts it."""

    kind: str
    state_dir: Path
    process: SwtpmProcess | None = None
    backends: list[Backend] = field(default_factory=list)

    @property
    def is_swtpm(self) -> bool:
        return self.kind.startswith("swtpm")

    def open(self, *, startup: bool = True) -> Backend:
        if self.kind == "libtpms":
            backend: Backend = LibtpmsBackend(self.state_dir, startup=startup)
        else:
            if self.process is None:
                transport = "unix" if self.kind == "swtpm-unix" else "tcp"
                self.process = SwtpmProcess(self.state_dir, transport=transport).start()
            backend = self.process.backend(startup=startup)
        self.backends.append(backend)
        return backend

    def restart(self) -> Backend:
        """Close everything, as a clean daemon or swtpm exit would, and open again."""
        self.close()
        return self.open()

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
        self.backends.clear()
        if self.process is not None:
            self.process.stop()
            self.process = None


@pytest.fixture(params=KINDS)
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    t = Target(request.param, tmp_path / "state")
    try:
        yield t
    finally:
        t.close()


@pytest.fixture
def backend(target: Target) -> Backend:
    return target.open()

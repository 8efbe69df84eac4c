"""Fixtures for tests that run inside the guest kernel (root, cuse.ko, tpm_vtpm_proxy.ko).

* ``cuse_daemon`` / ``cusetpm_cuse_node``: one ``cusetpm serve --name tpmrm42`` for
  the whole guest session, serving a CUSE node on the embedded libtpms TPM.  Starting
  Python and libtpms costs seconds under TCG, so tests share it and get isolation the
  way real clients do, from their own descriptors (one space each).  It runs with
  ``--max-spaces`` so a test can count free spaces (``free_spaces``), and logs at INFO
  so a test can see what the daemon did (``CuseDaemon.log_since``).
* ``kernel_tpmrm``: the kernel's own resource manager on a fresh swtpm, through
  ``tpm_vtpm_proxy`` -- the reference for side-by-side behaviour, and the node
  ``cusetpm serve`` must not take over.
* ``udev_isolated``: the guest sees the host's ``/lib/udev/rules.d``; Debian's
  tpm-udev package ships ``60-tpm-udev.rules``, which matches *any* ``tpmrm[0-9]*``
  node (no SUBSYSTEM test), cusetpm's included.  It is masked in the guest's throw-away
  ``/etc`` overlay for the session, so the node shows what cusetpm and the project's
  own rule (tests/vm/guest/test_cuse_udev.py) do, not what a distribution rule does.

Timeouts are generous: the guest runs under TCG, where Python is 10-40x slower than
on the host.
"""

from __future__ import annotations

import errno
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

IN_GUEST = os.environ.get("CUSETPM_VM_GUEST") == "1"
PROJECT_ROOT = Path(__file__).resolve().parents[3]

SWTPM_START_TIMEOUT = 60.0
CUSETPM_START_TIMEOUT = 180.0
STOP_TIMEOUT = 30.0
UDEV_SETTLE_TIMEOUT = 60

# A tpmrm[0-9]* name, as a real deployment would use (the project's udev rule matches
# only those), but far above what tpm_vtpm_proxy hands out (tpmrm0, tpmrm1, ...).
CUSE_NODE_NAME = "tpmrm42"
# The shared daemon's --max-spaces: above the 64 + a few descriptors that
# tests/frontends/test_semantics.py holds at once, low enough to fill in a test.
CUSE_MAX_SPACES = 96
# `cusetpm serve` prints this once the node accepts commands (cusetpm/serve.py).
SERVING_LINE = b"cusetpm: serving "

UDEV_SYSTEM_RULES = (Path("/usr/lib/udev/rules.d"), Path("/lib/udev/rules.d"))
UDEV_ETC_RULES = Path("/etc/udev/rules.d")


# Runs before every other guest module: its tests need /dev/tpm0 first absent, then theirs.
FIRST_MODULE = "test_hardware_tpm.py"


@pytest.hookimpl(trylast=True)  # after pytest's own reordering by fixture parameters
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IN_GUEST:
        first = [item for item in items if Path(str(item.fspath)).name == FIRST_MODULE]
        items[:] = first + [item for item in items if item not in first]
        return
    # Defence in depth: tests/vm/conftest.py already keeps these out of a host
    # run, but an explicit `pytest tests/vm/guest` on the host must not modprobe.
    skip = pytest.mark.skip(reason="guest-only test: run it with `make test-vm`")
    for item in items:
        if Path(str(item.fspath)).is_relative_to(Path(__file__).parent):
            item.add_marker(skip)


def modprobe(module: str) -> None:
    """Load a kernel module, failing the test with modprobe's message if it cannot."""
    proc = subprocess.run(["modprobe", module], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.fail(f"modprobe {module} failed ({proc.returncode}): {proc.stderr.strip()}")


def udevadm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run udevadm; fail the test with its output if it fails."""
    proc = subprocess.run(
        ["udevadm", *args], capture_output=True, text=True, check=False, timeout=timeout
    )
    if proc.returncode != 0:
        pytest.fail(f"udevadm {' '.join(args)} failed ({proc.returncode}):\n"
                    f"{proc.stdout}{proc.stderr}")
    return proc


def udev_settle() -> None:
    udevadm("settle", f"--timeout={UDEV_SETTLE_TIMEOUT}")


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


# -- udev -------------------------------------------------------------------------------


def _matches_tpmrm(rules: Path) -> bool:
    lines = rules.read_text(errors="replace").splitlines()
    return any("tpmrm" in line for line in lines if not line.lstrip().startswith("#"))


@pytest.fixture(scope="session")
def udev_isolated() -> Iterator[list[str]]:
    """Mask the distribution's udev rules that match tpmrm* nodes; yields their names.

    Fails if udevd does not answer: every CUSE attribute test depends on knowing
    which rules ran.
    """
    ping = subprocess.run(["udevadm", "control", "--ping"], capture_output=True, text=True,
                          check=False, timeout=60)
    if ping.returncode != 0:
        pytest.fail(f"systemd-udevd does not answer in the guest: {ping.stderr.strip()}")
    masked: list[Path] = []
    seen: set[str] = set()
    for directory in UDEV_SYSTEM_RULES:
        if not directory.is_dir():
            continue
        for rules in sorted(directory.glob("*.rules")):
            if rules.name in seen or not _matches_tpmrm(rules):
                continue
            seen.add(rules.name)
            mask = UDEV_ETC_RULES / rules.name
            if mask.exists() or mask.is_symlink():
                continue  # already overridden in /etc
            UDEV_ETC_RULES.mkdir(parents=True, exist_ok=True)
            mask.symlink_to("/dev/null")  # udev's documented way to disable a rules file
            masked.append(mask)
    udevadm("control", "--reload")
    try:
        yield [m.name for m in masked]
    finally:
        for mask in masked:
            mask.unlink(missing_ok=True)
        subprocess.run(["udevadm", "control", "--reload"], check=False, timeout=60)


# -- kernel TPM chips: swtpm behind tpm_vtpm_proxy --------------------------------------

VTPM_ATTEMPTS = 3
NEW_DEVICE = re.compile(r"New TPM device: /dev/tpm(\d+)")


@dataclass
class TpmChip:
    """A kernel TPM chip whose TPM is a swtpm process behind ``tpm_vtpm_proxy``.

    The kernel drives it like a hardware TPM: ``/dev/tpmN`` (one opener at a time) and
    its own resource manager ``/dev/tpmrmN``.  Stopping swtpm closes the proxy's
    server side, and the kernel unregisters the chip: both nodes disappear.
    """

    number: int
    proc: subprocess.Popen[bytes]
    state: Path
    output: str = ""

    @property
    def tpm(self) -> str:
        return f"/dev/tpm{self.number}"

    @property
    def tpmrm(self) -> str:
        return f"/dev/tpmrm{self.number}"

    def nodes_present(self) -> bool:
        return os.path.exists(self.tpm) or os.path.exists(self.tpmrm)

    def remove(self, timeout: float = SWTPM_START_TIMEOUT) -> bool:
        """Stop swtpm; True once the kernel has taken both nodes away."""
        self.output += stop_process(self.proc)
        deadline = time.monotonic() + timeout
        while self.nodes_present() and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self.nodes_present()


def _spawn_vtpm(state: Path) -> tuple[subprocess.Popen[bytes], str, int | None]:
    """One try: swtpm chardev --vtpm-proxy; (process, what it said, chip number or None)."""
    proc = subprocess.Popen(
        ["swtpm", "chardev", "--vtpm-proxy", "--tpm2", "--tpmstate", f"dir={state}",
         "--flags", "startup-clear"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    seen = _read_until(proc, NEW_DEVICE, SWTPM_START_TIMEOUT)
    match = NEW_DEVICE.search(seen)
    if match is None:
        return proc, seen + stop_process(proc), None
    number = int(match.group(1))
    if not wait_for_path(Path(f"/dev/tpmrm{number}"), SWTPM_START_TIMEOUT, proc):
        return proc, seen + stop_process(proc), None
    return proc, seen, number


def make_vtpm_chip(base: Path) -> TpmChip:
    """A new kernel TPM chip on a fresh swtpm state in ``base``; fails the test if none.

    Retried: under TCG on a loaded host the kernel sometimes gives up on swtpm's answer
    to its first commands while registering the chip (swtpm then logs "writev() 5
    Input/output error" and no /dev/tpmrmN appears).  That is the test machine's
    slowness, not what the suites test; the output of each failed try is kept.
    """
    modprobe("tpm_vtpm_proxy")
    failures = []
    for attempt in range(VTPM_ATTEMPTS):
        base.mkdir(parents=True, exist_ok=True)
        state = Path(tempfile.mkdtemp(prefix="swtpm-state-", dir=base))
        proc, seen, number = _spawn_vtpm(state)
        if number is not None:
            return TpmChip(number, proc, state, seen)
        failures.append(f"attempt {attempt + 1}:\n{seen}")
        time.sleep(1)
    pytest.fail("swtpm chardev --vtpm-proxy gave no kernel TPM chip:\n" + "\n".join(failures))


def chip_handles(tpm: str) -> dict[str, list[str]]:
    """What the chip holds, asked on /dev/tpmN itself (no resource manager in between):
    tpm2_getcap handles-transient / handles-loaded-session / handles-saved-session."""
    held = {}
    for kind in ("handles-transient", "handles-loaded-session", "handles-saved-session"):
        proc = subprocess.run([require_tool("tpm2_getcap"), "-T", f"device:{tpm}", kind],
                              capture_output=True, text=True, check=False, timeout=120)
        if proc.returncode != 0:
            pytest.fail(f"tpm2_getcap {kind} on {tpm} failed: {proc.stderr.strip()}")
        held[kind] = re.findall(r"0x[0-9A-Fa-f]+", proc.stdout)
    return held


@pytest.fixture
def kernel_tpmrm(tmp_path: Path, udev_isolated: list[str]) -> Iterator[str]:
    """The kernel's /dev/tpmrmN on a fresh chip (swtpm behind tpm_vtpm_proxy), removed after."""
    chip = make_vtpm_chip(tmp_path)
    try:
        yield chip.tpmrm
    finally:
        chip.remove()


@pytest.fixture
def vtpm_chip(tmp_path: Path, udev_isolated: list[str]) -> Iterator[TpmChip]:
    """A kernel TPM chip of the test's own; it must be gone once swtpm is stopped."""
    chip = make_vtpm_chip(tmp_path)
    try:
        yield chip
    finally:
        gone = chip.remove()
    if not gone:
        pytest.fail(f"{chip.tpm} / {chip.tpmrm} still there after swtpm stopped")


# -- cusetpm over CUSE --------------------------------------------------------------------


def serve_command(name: str, state: Path, *extra: str, backend: str = "libtpms") -> list[str]:
    return [
        sys.executable, "-m", "cusetpm", "serve", "--backend", backend,
        "--state-dir", str(state), "--name", name, *extra,
    ]


@dataclass
class CuseDaemon:
    """One `cusetpm serve --name NAME` subprocess, its output going to ``log``."""

    name: str
    state: Path
    log: Path
    extra: tuple[str, ...] = ()
    backend: str = "libtpms"
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    serving_after: float = 0.0  # seconds from spawn to the serving line
    node_stat: os.stat_result | None = None  # the node once udev settled after start
    stopped_rc: int | None = field(default=None)

    @property
    def path(self) -> str:
        return f"/dev/{self.name}"

    def spawn(self) -> CuseDaemon:
        self.state.mkdir(parents=True, exist_ok=True)
        # A file, not a pipe: nobody reads the daemon's log while tests run, and a
        # full pipe would block it mid-command.
        with self.log.open("wb") as logfile:
            self.proc = subprocess.Popen(
                serve_command(self.name, self.state, *self.extra, backend=self.backend),
                stdin=subprocess.DEVNULL, stdout=logfile, stderr=subprocess.STDOUT,
                cwd=PROJECT_ROOT,
            )
        self.started_at = time.monotonic()
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def log_size(self) -> int:
        return self.log.stat().st_size if self.log.exists() else 0

    def log_since(self, offset: int) -> str:
        with self.log.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def settle(self, timeout: float = CUSETPM_START_TIMEOUT) -> bool:
        """Wait until it serves (True) or exits (False); False on timeout too."""
        assert self.proc is not None
        node = Path(self.path)
        deadline = self.started_at + timeout
        while time.monotonic() < deadline:
            if node.exists() and SERVING_LINE in self.log.read_bytes():
                self.serving_after = time.monotonic() - self.started_at
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.05)
        return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        stop_process(self.proc, log=self.log)
        self.stopped_rc = self.proc.returncode
        return self.stopped_rc


def start_cuse_daemon(name: str, base: Path, *extra: str, backend: str = "libtpms") -> CuseDaemon:
    """Start a daemon and wait for it to serve; fail the test with its output if it does not."""
    daemon = CuseDaemon(name, base / f"state-{name}", base / f"serve-{name}.log", extra, backend)
    daemon.spawn()
    if not daemon.settle():
        daemon.stop()
        pytest.fail(
            f"cusetpm serve --backend {backend} --name {name} did not serve /dev/{name} within "
            f"{CUSETPM_START_TIMEOUT:.0f} s (exit status {daemon.stopped_rc}):\n{daemon.output()}"
        )
    udev_settle()  # whatever udev does to the node happens before anyone looks at it
    daemon.node_stat = os.stat(daemon.path)
    return daemon


@pytest.fixture(scope="session")
def cuse_daemon(
    tmp_path_factory: pytest.TempPathFactory, udev_isolated: list[str]
) -> Iterator[CuseDaemon]:
    """cusetpm serving /dev/tpmrm42 over CUSE on libtpms, for the whole guest session.

    A daemon that never shows its node fails with its output; one that dies while
    serving, or does not stop cleanly on SIGTERM (exit 0, node gone), errors at the end.
    """
    if not Path("/dev/cuse").exists():
        modprobe("cuse")
    base = tmp_path_factory.mktemp("cusetpm")
    daemon = start_cuse_daemon(
        CUSE_NODE_NAME, base, "--log-level", "INFO", "--max-spaces", str(CUSE_MAX_SPACES)
    )
    try:
        yield daemon
    finally:
        died = daemon.proc.poll() if daemon.proc else None  # before we stop it
        rc = daemon.stop()
    if died is not None or rc != 0:
        pytest.fail(
            f"cusetpm serve exited with {rc} (died while serving: {died is not None}):\n"
            f"{daemon.output()}"
        )
    if os.path.exists(daemon.path):
        pytest.fail(f"{daemon.path} is still there after the daemon stopped")


@pytest.fixture(scope="session")
def cusetpm_cuse_node(cuse_daemon: CuseDaemon) -> str:
    """The shared daemon's node path (``/dev/tpmrm42``)."""
    return cuse_daemon.path


# -- cusetpm over CUSE on a kernel TPM chip -----------------------------------------------

DEVICE_NODE_NAME = "tpmrm45"  # tpmrm44 is test_nodes_on_cuse.py's
# Which daemon a test parametrized over ``served`` talks to.
BACKENDS = ("libtpms", "device")


def assert_chip_holds_nothing(chip: TpmChip, who: str) -> None:
    """Nothing transient, no loaded or saved session in the chip itself (/dev/tpmN)."""
    held = chip_handles(chip.tpm)
    leftover = {kind: handles for kind, handles in held.items() if handles}
    assert not leftover, f"{chip.tpm} still holds {who}'s contexts: {leftover}"


@pytest.fixture(scope="session")
def device_chip(
    tmp_path_factory: pytest.TempPathFactory, udev_isolated: list[str]
) -> Iterator[TpmChip]:
    """The kernel TPM chip the session's device daemon serves (its /dev/tpmN)."""
    chip = make_vtpm_chip(tmp_path_factory.mktemp("device-chip"))
    try:
        yield chip
    finally:
        gone = chip.remove()
    if not gone:
        pytest.fail(f"{chip.tpm} / {chip.tpmrm} still there after swtpm stopped")


@pytest.fixture(scope="session")
def device_daemon(
    tmp_path_factory: pytest.TempPathFactory, device_chip: TpmChip
) -> Iterator[CuseDaemon]:
    """cusetpm serving /dev/tpmrm45 over CUSE with ``--backend device:/dev/tpmN``, the
    configuration of a machine with a hardware TPM (the defaults: resident contexts, one
    object and one session slot kept free for the kernel's own users of the chip).

    After it stops, the chip itself must hold nothing: no transient object, no loaded
    or saved session (the kernel's /dev/tpmrmN users are done by then)."""
    if not Path("/dev/cuse").exists():
        modprobe("cuse")
    base = tmp_path_factory.mktemp("cusetpm-device")
    daemon = start_cuse_daemon(
        DEVICE_NODE_NAME, base, "--log-level", "INFO", "--max-spaces", str(CUSE_MAX_SPACES),
        backend=f"device:{device_chip.tpm}",
    )
    try:
        yield daemon
    finally:
        died = daemon.proc.poll() if daemon.proc else None
        rc = daemon.stop()
    if died is not None or rc != 0:
        pytest.fail(f"cusetpm serve --backend device exited with {rc} (died while serving: "
                    f"{died is not None}):\n{daemon.output()}")
    if os.path.exists(daemon.path):
        pytest.fail(f"{daemon.path} is still there after the daemon stopped")
    assert_chip_holds_nothing(device_chip, "the stopped cusetpm")


@pytest.fixture
def served(request: pytest.FixtureRequest) -> CuseDaemon:
    """The shared daemon on the backend a test is parametrized with (``BACKENDS``):
    ``@pytest.mark.parametrize("served", BACKENDS, indirect=True)``."""
    backend = getattr(request, "param", "libtpms")
    if backend not in BACKENDS:
        raise ValueError(f"served: unknown backend {backend!r}, expected one of {BACKENDS}")
    daemon: CuseDaemon = request.getfixturevalue(
        "cuse_daemon" if backend == "libtpms" else "device_daemon")
    return daemon


# -- counting what the TPM and the RM hold --------------------------------------------------


def free_spaces(node: str, limit: int) -> int:
    """How many descriptors the node still opens, up to ``limit`` + 1; all closed again.

    Opening fails with ENFILE once the daemon's --max-spaces are taken, so a space
    that outlives its descriptor shows as one fewer.
    """
    fds: list[int] = []
    try:
        while len(fds) <= limit:
            try:
                fds.append(os.open(node, os.O_RDWR))
            except OSError as e:
                if e.errno != errno.ENFILE:
                    raise
                break
        return len(fds)
    finally:
        for fd in fds:
            os.close(fd)


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed in the guest (the host's /usr/bin)")
    return path

"""cusetpm over CUSE in the guest kernel: the node clients will really open.

The shared daemons (tests/vm/guest/conftest.py) are ``cuse_daemon``, /dev/tpmrm42 on
libtpms, and ``device_daemon``, /dev/tpmrm45 on a kernel TPM chip (``--backend
device:/dev/tpmN``); tests that send TPM commands run on both (``served``).  The
kernel's own node for side-by-side checks is ``kernel_tpmrm``.  The node's file
semantics and the tpm2-tools clients are tests/frontends' tests, run on these nodes by
test_frontends_on_cuse.py; udev is test_cuse_udev.py.
"""

from __future__ import annotations

import os
import select
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from tests.vm.guest import tpm_raw as raw
from tests.vm.guest.conftest import (
    BACKENDS,
    CUSE_MAX_SPACES,
    CuseDaemon,
    require_tool,
    serve_command,
)
from tests.vm.guest.tpm_raw import getrandom_command, parse_getrandom_response, transact

REFUSAL_TIMEOUT = 180.0
# How long the RM may take to notice a dead client and give back what it held: the
# kernel releases each descriptor with a FUSE_RELEASE the daemon handles in order.
RELEASE_TIMEOUT = 60.0
CENSUS_PROPERTIES = (raw.TPM_PT_HR_LOADED, raw.TPM_PT_HR_ACTIVE, raw.TPM_PT_HR_TRANSIENT_AVAIL)


# -- the node ---------------------------------------------------------------------------


def test_cuse_node_is_a_root_only_char_device(cuse_daemon: CuseDaemon) -> None:
    """Without any udev rule, the node is what devtmpfs makes: crw------- root:root."""
    st = cuse_daemon.node_stat
    assert st is not None
    assert stat.S_ISCHR(st.st_mode), f"{cuse_daemon.path} is not a character device"
    assert stat.S_IMODE(st.st_mode) == 0o600, f"mode {stat.S_IMODE(st.st_mode):04o}"
    assert (st.st_uid, st.st_gid) == (0, 0)
    assert Path(cuse_daemon.path).name.startswith("tpmrm")


def test_cuse_node_is_in_the_cuse_class(cuse_daemon: CuseDaemon) -> None:
    sysfs = Path("/sys/class/cuse") / cuse_daemon.name
    assert sysfs.exists(), f"{sysfs} missing: not a CUSE device"
    assert (sysfs / "subsystem").resolve().name == "cuse"
    st = os.stat(cuse_daemon.path)
    assert (sysfs / "dev").read_text().strip() == f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


@pytest.mark.parametrize("served", BACKENDS, indirect=True)
def test_cuse_node_raw_getrandom(served: CuseDaemon) -> None:
    data = parse_getrandom_response(transact(served.path, getrandom_command(16)))
    assert len(data) == 16


@pytest.mark.parametrize("served", BACKENDS, indirect=True)
def test_cuse_node_tpm2_getrandom(served: CuseDaemon) -> None:
    proc = subprocess.run(
        [require_tool("tpm2_getrandom"), "-T", f"device:{served.path}", "--hex", "8"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, f"tpm2_getrandom through cusetpm failed: {proc.stderr}"
    assert len(proc.stdout.strip()) == 16


# -- refusing a taken name ----------------------------------------------------------------


def _spawn_serve(name: str, state: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        serve_command(name, state), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )


def _assert_refused(name: str, proc: subprocess.Popen[str], state: Path) -> str:
    """It exits 1 without serving, saying /dev/NAME exists and to pick another --name."""
    out, err = proc.communicate(timeout=REFUSAL_TIMEOUT)
    assert "cusetpm: serving" not in out, f"it served /dev/{name}:\n{out}{err}"
    assert proc.returncode == 1, f"exit {proc.returncode}:\n{out}{err}"
    assert f"/dev/{name} already exists" in err, err
    assert "--name" in err, f"no hint to use --name: {err}"
    assert not state.exists(), "it touched the TPM before refusing"
    return err


def test_serve_refuses_a_taken_name(
    kernel_tpmrm: str, cuse_daemon: CuseDaemon, tmp_path: Path
) -> None:
    """`cusetpm serve --name` on the kernel's /dev/tpmrmN, and on the name another
    cusetpm serves, both refuse with a hint; neither node is disturbed.  (Both at
    once: each Python start costs seconds under TCG, and the guest has 2 CPUs.)"""
    kernel_name = Path(kernel_tpmrm).name
    before = os.stat(kernel_tpmrm)
    on_kernel = _spawn_serve(kernel_name, tmp_path / "state-kernel")
    on_cusetpm = _spawn_serve(cuse_daemon.name, tmp_path / "state-cusetpm")
    _assert_refused(kernel_name, on_kernel, tmp_path / "state-kernel")
    _assert_refused(cuse_daemon.name, on_cusetpm, tmp_path / "state-cusetpm")
    after = os.stat(kernel_tpmrm)
    assert (after.st_rdev, after.st_mode, after.st_uid, after.st_gid) == (
        before.st_rdev, before.st_mode, before.st_uid, before.st_gid)
    # Both nodes still answer, and the first cusetpm still runs.
    assert len(parse_getrandom_response(transact(kernel_tpmrm, getrandom_command(8)))) == 8
    assert cuse_daemon.alive(), f"the first daemon died:\n{cuse_daemon.output()}"
    assert len(parse_getrandom_response(transact(cuse_daemon.path, getrandom_command(8)))) == 8


def test_daemon_the_kernel_refuses_fails_clearly(cuse_daemon: CuseDaemon, tmp_path: Path) -> None:
    """Two daemons started together on one name both pass the /dev/NAME check; the
    kernel's CUSE then refuses the second registration.  Reproduced deterministically:
    the first daemon's node is moved aside while the second one starts."""
    node = Path(cuse_daemon.path)
    aside = node.with_name(node.name + ".aside")
    node.rename(aside)
    try:
        proc = _spawn_serve(cuse_daemon.name, tmp_path / "state")
        out, err = proc.communicate(timeout=REFUSAL_TIMEOUT)
    finally:
        if node.exists():  # the second daemon made one after all: keep it for the report
            node.rename(node.with_name(node.name + ".second"))
        aside.rename(node)
    assert "cusetpm: serving" not in out, f"it claimed to serve a refused name:\n{out}{err}"
    assert proc.returncode == 1, f"exit {proc.returncode}:\n{out}{err}"
    assert f"cannot serve /dev/{cuse_daemon.name}" in err, err
    assert "Traceback" not in err, err
    assert cuse_daemon.alive(), f"the first daemon died:\n{cuse_daemon.output()}"
    assert len(parse_getrandom_response(transact(cuse_daemon.path, getrandom_command(8)))) == 8


# -- killed clients ---------------------------------------------------------------------


def census(node: str) -> dict[int, int]:
    """The TPM's own session and object counts, read through the node."""
    response = transact(node, raw.get_properties_command(raw.TPM_PT_HR_LOADED, 5))
    props = raw.parse_properties(response)
    missing = [hex(p) for p in CENSUS_PROPERTIES if p not in props]
    assert not missing, f"GetCapability did not report {missing}: {props}"
    return {p: props[p] for p in CENSUS_PROPERTIES}


def free_spaces(node: str) -> int:
    from tests.vm.guest.conftest import free_spaces as count

    return count(node, CUSE_MAX_SPACES)


def wait_until_clean(node: str, baseline: dict[int, int]) -> tuple[dict[int, int], int]:
    """Poll until the TPM counts are back to ``baseline`` and every space is free again."""
    deadline = time.monotonic() + RELEASE_TIMEOUT
    while True:
        now, spaces = census(node), free_spaces(node)
        if (now == baseline and spaces == CUSE_MAX_SPACES) or time.monotonic() > deadline:
            return now, spaces
        time.sleep(0.5)


@contextmanager
def forked(child) -> Iterator[tuple[int, int]]:  # type: ignore[no-untyped-def]
    """Fork a client that runs ``child(write_fd)`` and never returns into pytest.

    Yields (pid, read end of its pipe); the client is SIGKILLed and reaped on exit.
    The pytest process runs no threads, so forking it is safe, and much cheaper than
    starting another Python under TCG.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the client
        try:
            os.close(r)
            child(w)
        except BaseException as e:  # tell the parent, and never return into pytest
            try:
                os.write(w, f"error {e!r}\n".encode())
            finally:
                os._exit(1)
        os._exit(0)
    os.close(w)
    try:
        yield pid, r
    finally:
        os.close(r)
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with suppress(ChildProcessError):
            os.waitpid(pid, 0)


def read_line(fd: int, timeout: float) -> str:
    """One line from the client's pipe ("" on timeout or EOF)."""
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            break
        chunk = os.read(fd, 1)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


def kill_and_reap(pid: int) -> tuple[int, float]:
    """SIGKILL the client; its wait status and how long it took to die."""
    started = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return status, time.monotonic() - started


SESSIONS_PER_FD = 2
CLIENT_FDS = 3


def _greedy_client(node: str):  # type: ignore[no-untyped-def]
    def run(w: int) -> None:
        fds = [os.open(node, os.O_RDWR) for _ in range(CLIENT_FDS)]
        for fd in fds:
            raw.created_handle(raw.exchange(fd, raw.create_primary_ecc_command()))
            for _ in range(SESSIONS_PER_FD):
                rc = raw.response_code(raw.exchange(fd, raw.start_hmac_session_command()))
                assert rc == 0, f"StartAuthSession: rc {rc:#x}"
        # One more descriptor with a slow command in flight, never read.
        busy = os.open(node, os.O_RDWR | os.O_NONBLOCK)
        os.write(busy, raw.create_primary_rsa_command(2048))
        os.write(w, b"holding\n")
        while True:
            time.sleep(60)

    return run


@pytest.mark.parametrize("served", BACKENDS, indirect=True)
def test_sigkilled_client_leaves_nothing_in_the_tpm(served: CuseDaemon) -> None:
    """A client holding objects and sessions on several descriptors, with a command in
    flight, is SIGKILLed: the TPM's session and object counts and the RM's free spaces
    all come back to what they were."""
    cuse_daemon = served
    node = cuse_daemon.path
    baseline = census(node)
    assert baseline[raw.TPM_PT_HR_LOADED] == 0, f"sessions left loaded: {baseline}"
    assert free_spaces(node) == CUSE_MAX_SPACES, "a space was already taken before the test"
    with forked(_greedy_client(node)) as (pid, pipe):
        line = read_line(pipe, 120)
        assert line == "holding", f"the client did not get going: {line!r}"
        held = census(node)  # queued behind the client's key generation
        # The census sees the client: without this the test could not fail.
        assert held[raw.TPM_PT_HR_ACTIVE] == (
            baseline[raw.TPM_PT_HR_ACTIVE] + CLIENT_FDS * SESSIONS_PER_FD), (baseline, held)
        assert free_spaces(node) == CUSE_MAX_SPACES - CLIENT_FDS - 1
        status, _ = kill_and_reap(pid)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    after, spaces = wait_until_clean(node, baseline)
    assert after == baseline, f"the TPM still holds the dead client's things: {baseline} -> {after}"
    assert spaces == CUSE_MAX_SPACES, f"{CUSE_MAX_SPACES - spaces} spaces outlived the client"
    assert cuse_daemon.alive(), cuse_daemon.output()


def _syscall(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/syscall").read_text().strip()
    except OSError:
        return ""


def _blocked_writer(node: str, attempt: int):  # type: ignore[no-untyped-def]
    def run(w: int) -> None:
        fd = os.open(node, os.O_RDWR)  # blocking: write waits for the command
        os.write(w, f"fd {fd}\n".encode())
        # Each attempt another key: one whose prime search is quick must not repeat.
        os.write(fd, raw.create_primary_rsa_command(2048, unique=b"attempt%d" % attempt))
        os.write(w, b"returned\n")  # too late: the command finished before the kill
        while True:
            time.sleep(60)

    return run


@pytest.mark.parametrize("served", BACKENDS, indirect=True)
def test_client_killed_in_a_blocked_write_is_cancelled(served: CuseDaemon) -> None:
    """SIGKILL while write() waits for an RSA-2048 CreatePrimary: the kernel sends
    FUSE_INTERRUPT, the daemon cancels the command and answers, the client dies, and
    the daemon serves on with nothing left behind.  (On the device backend the kernel
    offers no cancel: the command runs to its end and its result is flushed.)"""
    cuse_daemon = served
    node = cuse_daemon.path
    baseline = census(node)
    attempts = []
    for attempt in range(6):  # a key generation quicker than our kill is retried
        offset = cuse_daemon.log_size()
        with forked(_blocked_writer(node, attempt)) as (pid, pipe):
            line = read_line(pipe, 120)
            assert line.startswith("fd "), f"the client did not open the node: {line!r}"
            fd = int(line.split()[1])
            # x86-64 write is syscall 1; /proc/PID/syscall shows it while it blocks.
            blocked = f"1 {fd:#x} "
            deadline = time.monotonic() + 60
            while not _syscall(pid).startswith(blocked) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert _syscall(pid).startswith(blocked), f"never blocked in write: {_syscall(pid)}"
            # Kill at once: the command is with the daemon (queued or running) either way.
            in_write = _syscall(pid).startswith(blocked)
            status, dying = kill_and_reap(pid)
            late = read_line(pipe, 0.5) == "returned"
        attempts.append((in_write, late, dying))
        if in_write and not late:
            break
    else:
        pytest.fail(f"the command always finished before the kill: {attempts}")
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    deadline = time.monotonic() + RELEASE_TIMEOUT
    while "write interrupted, cancelling" not in (log := cuse_daemon.log_since(offset)):
        assert time.monotonic() < deadline, f"no cancel in the daemon's log:\n{log}"
        time.sleep(0.2)
    assert cuse_daemon.alive(), cuse_daemon.output()
    assert len(parse_getrandom_response(transact(node, getrandom_command(8)))) == 8
    after, spaces = wait_until_clean(node, baseline)
    assert after == baseline, f"the cancelled command left something: {baseline} -> {after}"
    assert spaces == CUSE_MAX_SPACES, f"{CUSE_MAX_SPACES - spaces} spaces outlived the client"

"""`cusetpm serve` as a daemon: readiness, refusals, permissions, privileges, shutdown."""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.frontends import tpmwire as wire
from tests.frontends.conftest import Daemon, fuse_unavailable


def getrandom_ok(node: str) -> bool:
    fd = os.open(node, os.O_RDWR)
    try:
        os.write(fd, wire.get_random(8))
        return wire.rc(os.read(fd, 4096)) == 0
    finally:
        os.close(fd)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_ready_line_and_clean_stop(make_daemon, sig: int) -> None:  # type: ignore[no-untyped-def]
    d: Daemon = make_daemon().start()
    assert d.line.strip() == (
        f"cusetpm: serving {d.node} (FUSE) on libtpms:{d.state}"
    )
    assert getrandom_ok(d.node)
    assert d.stop(sig) == 0, d.log()
    assert not os.path.ismount(d.mount)
    assert not d.mount.exists()  # it created the directory, so it removed it
    assert "removed" in d.log()


def test_existing_mountpoint_directory_is_kept(make_daemon, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    mount = tmp_path / "existing"
    mount.mkdir()
    d: Daemon = make_daemon(mount=mount).start()
    assert d.stop() == 0
    assert mount.is_dir() and not os.path.ismount(mount)


def test_second_daemon_on_the_same_mount_is_refused(make_daemon) -> None:  # type: ignore[no-untyped-def]
    first: Daemon = make_daemon().start()
    second: Daemon = make_daemon(mount=first.mount)
    proc = second.spawn()
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 1 and out == ""
    assert "already a mount point" in second.log()
    assert getrandom_ok(first.node)  # the first one is untouched


def test_taken_device_name_is_refused_with_a_hint(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cusetpm", "serve", "--name", "null",
         "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=30,
    )
    assert done.returncode == 1
    assert "/dev/null already exists" in done.stderr and "--name" in done.stderr
    assert not (tmp_path / "state").exists()  # refused before touching the TPM


@pytest.mark.skipif(os.path.exists("/dev/cuse"), reason="this kernel has CUSE")
def test_explicit_cuse_name_without_cuse_suggests_fuse_mount(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cusetpm", "serve", "--name", "cusetpm-test-none",
         "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=30,
    )
    assert done.returncode == 1 and "--fuse-mount" in done.stderr


def test_sd_notify_ready_and_stopping(make_daemon, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(20)
        d: Daemon = make_daemon(env={**os.environ, "NOTIFY_SOCKET": address}).start()
        assert sock.recv(256) == b"READY=1"
        assert getrandom_ok(d.node)  # ready means it accepts commands
        assert d.stop() == 0
        assert sock.recv(256) == b"STOPPING=1"


def test_tpm_state_survives_a_restart(make_daemon, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    if shutil.which("tpm2_evictcontrol") is None:
        pytest.skip("tpm2-tools is not installed")
    d: Daemon = make_daemon().start()
    env = {**os.environ, "TPM2TOOLS_TCTI": d.tcti}

    def tool(*argv: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, timeout=60)

    assert tool("tpm2_createprimary", "-C", "o", "-c", "p.ctx").returncode == 0
    assert tool("tpm2_evictcontrol", "-C", "o", "-c", "p.ctx", "0x81000123").returncode == 0
    assert d.stop() == 0
    again: Daemon = make_daemon(state=d.state).start()
    env["TPM2TOOLS_TCTI"] = again.tcti
    assert tool("tpm2_readpublic", "-c", "0x81000123").returncode == 0


def open_as(uid: int, path: str) -> int:
    """errno of open(path, O_RDWR) by another user (0 when it opens)."""
    pid = os.fork()
    if pid == 0:  # child: no Python-level work beyond these calls, then _exit
        code = 0
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            os.close(os.open(path, os.O_RDWR))
        except OSError as e:
            code = e.errno or 255
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def wait_unmounted(path: Path, timeout: float = 10.0) -> bool:
    """After dropping root the daemon cannot unmount: auto_unmount's watcher does, soon."""
    deadline = time.monotonic() + timeout
    while os.path.ismount(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not os.path.ismount(path)


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory another user can reach (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="cusetpm-test-"))
    path.chmod(0o755)
    yield path
    if not os.path.ismount(path / "mnt"):
        shutil.rmtree(path, ignore_errors=True)


def nobody() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")


def test_node_permissions_are_enforced(make_daemon, public_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """allow_other lets other users reach the file; default_permissions applies --mode."""
    user = nobody()
    private: Daemon = make_daemon(mount=public_dir / "private").start()
    assert os.stat(private.node).st_mode & 0o777 == 0o600
    assert open_as(user.pw_uid, private.node) == errno.EACCES
    shared: Daemon = make_daemon(extra=["--mode", "0666"], mount=public_dir / "shared").start()
    assert open_as(user.pw_uid, shared.node) == 0


def test_openers_uid_and_pid_reach_the_rm(make_daemon, public_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """Each open's caller (FUSE's uid and pid of the opener) is its space's: a child that
    setuid()s to nobody and root's own descriptor show as two spaces in `cusetpm status`."""
    import json

    user = nobody()
    control = public_dir / "control"
    d: Daemon = make_daemon(extra=["--mode", "0666", "--control", str(control)],
                            mount=public_dir / "mnt").start()
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: opens as nobody, holds the descriptor until told to go
        code = 0
        try:
            os.close(ready_r)
            os.close(done_w)
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            fd = os.open(d.node, os.O_RDWR)
            os.write(fd, wire.get_random(8))
            code = 0 if wire.rc(os.read(fd, 4096)) == 0 else 3
            os.write(ready_w, b"1")
            os.read(done_r, 1)
            os.close(fd)
        except OSError as e:
            code = e.errno or 255
        os._exit(code)
    os.close(ready_w)
    os.close(done_r)
    mine = os.open(d.node, os.O_RDWR)
    try:
        assert os.read(ready_r, 1) == b"1", "the child could not open the node as nobody"
        out = subprocess.run(
            [sys.executable, "-m", "cusetpm", "status", "--json", "--control", str(control)],
            capture_output=True, text=True, timeout=60, check=True)
        spaces = json.loads(out.stdout)["nodes"][d.node]
        assert sorted((s["uid"], s["pid"], s["commands"]) for s in spaces) == sorted(
            [(0, os.getpid(), 0), (user.pw_uid, pid, 1)]), spaces
    finally:
        os.close(mine)
        os.close(done_w)
        os.close(ready_r)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_group_and_mode_options(make_daemon) -> None:  # type: ignore[no-untyped-def]
    import grp

    try:
        tss = grp.getgrnam("tss")
    except KeyError:
        pytest.skip("no group tss")
    d: Daemon = make_daemon(extra=["--mode", "0660", "--group", "tss"]).start()
    st = os.stat(d.node)
    assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o660, 0, tss.gr_gid)


def test_runs_as_user_after_setup(make_daemon, public_dir: Path) -> None:  # type: ignore[no-untyped-def]
    user = nobody()
    d: Daemon = make_daemon(
        extra=["--user", "nobody"], state=public_dir / "state", mount=public_dir / "mnt"
    ).start()
    assert d.proc is not None
    status = Path(f"/proc/{d.proc.pid}/status").read_text()
    uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    assert set(uids) == {str(user.pw_uid)}
    assert os.stat(d.node).st_uid == user.pw_uid
    assert getrandom_ok(d.node)  # the TPM state is writable by the user
    assert d.stop() == 0, d.log()
    assert wait_unmounted(d.mount)
    assert "state may not be saved" not in d.log()


def test_command_in_flight_finishes_on_sigterm(make_daemon) -> None:  # type: ignore[no-untyped-def]
    # --fuse-debug: libfuse logs each request as the daemon reads it, which tells a command
    # the daemon has from one still queued in the kernel (SIGTERM ends the loop before
    # reading that one, and the kernel answers it ECONNABORTED when the node goes).
    d: Daemon = make_daemon(extra=["--fuse-debug"]).start()
    fd = os.open(d.node, os.O_RDWR)
    result: list[int | BaseException] = []

    def write() -> None:
        try:
            result.append(os.write(fd, wire.create_primary_rsa(3072)))
        except BaseException as e:
            result.append(e)

    writer = threading.Thread(target=write)
    writer.start()
    assert writer.native_id is not None
    # The command is in flight: the writer blocks in write(2) (x86-64 syscall 1).
    syscall = f"/proc/self/task/{writer.native_id}/syscall"
    deadline = time.monotonic() + 30
    while not Path(syscall).read_text().startswith("1 "):
        assert time.monotonic() < deadline, "the writer never blocked in write()"
        time.sleep(0.001)
    while "opcode: WRITE" not in d.log():  # ... and the daemon has read it
        assert time.monotonic() < deadline, "the daemon never read the write"
        time.sleep(0.001)
    assert d.proc is not None
    d.proc.send_signal(signal.SIGTERM)
    writer.join(30)
    assert result and isinstance(result[0], int), result  # answered, not dropped
    assert d.stop() == 0, d.log()
    with contextlib.suppress(OSError):  # the node is gone: close() cannot flush
        os.close(fd)


def test_fuse_unavailable_reason_is_none_in_ci() -> None:
    """CI runs as root with /dev/fuse: the node tests must not be skipped there."""
    if os.environ.get("CI"):
        assert fuse_unavailable() is None

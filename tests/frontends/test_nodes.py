"""Two nodes from one --config file on one daemon (FUSE), driven by real tpm2-tools: the
`user` node refuses administration with 0x000B0120 and the TPM is unchanged, seen from the
`full` node; SIGHUP re-reads the policies, and an invalid file changes nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.frontends.conftest import Daemon, lazy_unmount, require_fuse

REFUSED = "0xb0120"  # tpm2-tools prints the RC in hex without leading zeros


@dataclass
class ConfigDaemon(Daemon):
    config: Path = Path()

    def command(self) -> list[str]:
        return [*super().command()[:4], "--config", str(self.config),
                "--state-dir", str(self.state), "--log-level", "INFO"]


def write_config(path: Path, full: Path, user: Path, user_profile: str = "user") -> None:
    path.write_text(
        f'[[node]]\nfuse_mount = "{full}"\nprofile = "full"\n\n'
        f'[[node]]\nfuse_mount = "{user}"\nprofile = "{user_profile}"\nmode = "0666"\n')


@pytest.fixture
def two_nodes(tmp_path: Path):  # type: ignore[no-untyped-def]
    require_fuse()
    full, user = tmp_path / "full", tmp_path / "user"
    config = tmp_path / "nodes.toml"
    write_config(config, full, user)
    d = ConfigDaemon(mount=full, state=tmp_path / "state", log_path=tmp_path / "d.log",
                     config=config)
    d.start()
    try:
        yield d, f"device:{full}/tpmrm0", f"device:{user}/tpmrm0"
    finally:
        d.stop()
        lazy_unmount(user)


def tool(*args: str, tcti: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*args, "-T", tcti], capture_output=True, text=True, timeout=60,
                          check=False)


def wait_for_log(d: Daemon, text: str, count: int = 1) -> None:
    for _ in range(200):  # the daemon logs as it handles SIGHUP; poll its log for the event
        if d.log().count(text) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not logged:\n{d.log()}")


def test_user_node_refuses_administration_full_node_sees_no_change(two_nodes, tmp_path) -> None:  # type: ignore[no-untyped-def]
    d, full, user = two_nodes
    assert "serving" in d.line
    pcrs_before = tool("tpm2_pcrread", "sha256:0", tcti=full)
    assert pcrs_before.returncode == 0, pcrs_before.stderr
    ctx = tmp_path / "p.ctx"
    ok = tool("tpm2_createprimary", "-C", "o", "-c", str(ctx), tcti=user)
    assert ok.returncode == 0, ok.stderr
    refused = {
        "tpm2_clear": ["tpm2_clear"],
        "tpm2_nvdefine": ["tpm2_nvdefine", "0x1800010", "-C", "o", "-s", "8"],
        "tpm2_changeauth": ["tpm2_changeauth", "-c", "owner", "secret"],
        "tpm2_dictionarylockout": ["tpm2_dictionarylockout", "--clear-lockout"],
        "tpm2_pcrextend": ["tpm2_pcrextend", "0:sha256=" + "11" * 32],
    }
    for what, argv in refused.items():
        out = tool(*argv, tcti=user)
        assert out.returncode == 1, (what, out.returncode)
        assert REFUSED in out.stderr.lower(), (what, out.stderr)
    assert tool("tpm2_pcrread", "sha256:0", tcti=full).stdout == pcrs_before.stdout
    nv = tool("tpm2_nvreadpublic", tcti=full)
    assert "0x1800010" not in nv.stdout
    assert "node " in d.log() and "Clear refused" in d.log()
    # the same extend on the full node reaches the TPM
    assert tool("tpm2_pcrextend", "0:sha256=" + "11" * 32, tcti=full).returncode == 0
    assert tool("tpm2_pcrread", "sha256:0", tcti=full).stdout != pcrs_before.stdout


def test_sighup_rereads_policies_and_keeps_config_on_errors(two_nodes, tmp_path) -> None:  # type: ignore[no-untyped-def]
    d, _full, user = two_nodes
    extend = ("tpm2_pcrextend", "0:sha256=" + "22" * 32)
    assert REFUSED in tool(*extend, tcti=user).stderr.lower()
    d.config.write_text('[[node]]\nfuse_mount = "x"\nprofile = "root"\n')
    assert d.proc is not None
    os.kill(d.proc.pid, signal.SIGHUP)
    wait_for_log(d, "the running config is unchanged")
    assert "profile: 'root'" in d.log()
    assert REFUSED in tool(*extend, tcti=user).stderr.lower()
    write_config(d.config, d.mount, tmp_path / "user", user_profile="full")
    os.kill(d.proc.pid, signal.SIGHUP)
    wait_for_log(d, "policy changed (profile user -> full)")
    assert tool(*extend, tcti=user).returncode == 0


def test_status_while_clients_run(tmp_path: Path) -> None:
    """`cusetpm status` (text and JSON) with one client holding a descriptor open on the user
    node and tpm2-tools refused there: its space, the refusal and the counters are shown."""
    require_fuse()
    full, user = tmp_path / "full", tmp_path / "user"
    config = tmp_path / "nodes.toml"
    write_config(config, full, user)
    control = tmp_path / "control"
    config.write_text(f'control = "{control}"\n' + config.read_text())
    d = ConfigDaemon(mount=full, state=tmp_path / "state", log_path=tmp_path / "d.log",
                     config=config)
    d.start()
    try:
        assert oct(os.stat(control).st_mode & 0o777) == "0o600"
        assert tool("tpm2_getrandom", "8", "--hex", tcti=f"device:{full}/tpmrm0").returncode == 0
        assert REFUSED in tool("tpm2_clear", tcti=f"device:{user}/tpmrm0").stderr.lower()
        fd = os.open(f"{user}/tpmrm0", os.O_RDWR)  # a client still running
        try:
            getrandom = bytes.fromhex("80010000000c0000017b0008")
            os.write(fd, getrandom)
            assert os.read(fd, 4096)[6:10] == b"\0\0\0\0"
            out = subprocess.run(
                [sys.executable, "-m", "cusetpm", "status", "--json", "--control", str(control)],
                capture_output=True, text=True, timeout=60, check=True)
            status = json.loads(out.stdout)
            spaces = status["nodes"][f"{user}/tpmrm0"]
            assert [s["pid"] for s in spaces] == [os.getpid()]
            assert spaces[0]["uid"] == os.getuid()
            assert spaces[0]["commands"] == 1 and spaces[0]["last_command"] == "GetRandom"
            assert spaces[0]["last_rc"] == "0x00000000"
            refusals = status["counters"]["refusals"][f"{user}/tpmrm0"]
            assert sum(refusals.values()) == 1 and "Clear" in next(iter(refusals))
            assert status["per_command"]["GetRandom"]["count"] >= 2
            assert status["counters"]["round_trips"] >= status["counters"]["commands"] - 1
            assert status["tpm"]["sessions_max"] > 0
            slots = status["tpm"]["slots"]
            assert slots["sessions_loaded"] == slots["sessions_saved"] == 0  # none held
            assert slots["sessions_free"] == status["tpm"]["sessions_max"]
            assert slots["objects_resident"] == 0 and slots["objects_free"] > 0
            assert status["tpm"]["context_gap_left"] == status["tpm"]["context_gap_window"]
            text = subprocess.run(
                [sys.executable, "-m", "cusetpm", "status", "--control", str(control)],
                capture_output=True, text=True, timeout=60, check=True).stdout
            assert f"node {user}/tpmrm0: 1 open" in text
            assert "GetRandom" in text and "refused on" in text
            assert "saves left)" in text and "  slots: sessions 0 loaded, 0 saved" in text
            header = next(line for line in text.splitlines() if line.startswith("command"))
            assert header.split() == ["command", "count", "p50", "us", "p99", "us"]
        finally:
            os.close(fd)
    finally:
        d.stop()
        lazy_unmount(user)
    assert not control.exists()


START_SESSION = bytes.fromhex(  # StartAuthSession: unbound, unsalted HMAC, no symmetric, SHA-256
    "8001" "0000002b" "00000176" "40000007" "40000007" "0010" + "01" * 16 + "0000" "00" "0010"
    "000b")


def test_node_session_quota_and_sighup_raises_it(tmp_path: Path) -> None:
    """[node.limits] sessions_per_uid through the node: over it, StartAuthSession gets
    0x000B0903 and the TPM is not asked; SIGHUP with a higher limit lets the next one in,
    and `cusetpm status` shows the node's limits."""
    require_fuse()
    full, user = tmp_path / "full", tmp_path / "user"
    config, control = tmp_path / "nodes.toml", tmp_path / "control"

    def write(sessions_per_uid: int) -> None:
        write_config(config, full, user)
        config.write_text(f'control = "{control}"\n' + config.read_text()
                          + f"[node.limits]\nsessions_per_uid = {sessions_per_uid}\n")

    write(1)
    d = ConfigDaemon(mount=full, state=tmp_path / "state", log_path=tmp_path / "d.log",
                     config=config)
    d.start()
    try:
        fd = os.open(f"{user}/tpmrm0", os.O_RDWR)
        try:
            os.write(fd, START_SESSION)
            assert os.read(fd, 4096)[6:10] == b"\0\0\0\0"
            os.write(fd, START_SESSION)
            assert os.read(fd, 4096)[6:10] == bytes.fromhex("000b0903")
            assert "holds 1 sessions on node" in d.log()
            out = subprocess.run(
                [sys.executable, "-m", "cusetpm", "status", "--json", "--control", str(control)],
                capture_output=True, text=True, timeout=60, check=True)
            assert json.loads(out.stdout)["node_limits"] == {
                f"{user}/tpmrm0": {"sessions_per_uid": 1}}
            write(2)
            assert d.proc is not None
            os.kill(d.proc.pid, signal.SIGHUP)
            wait_for_log(d, "limits changed")
            os.write(fd, START_SESSION)
            assert os.read(fd, 4096)[6:10] == b"\0\0\0\0"
            text = subprocess.run(
                [sys.executable, "-m", "cusetpm", "status", "--control", str(control)],
                capture_output=True, text=True, timeout=60, check=True).stdout
            assert f"node {user}/tpmrm0: 1 open (limits: sessions_per_uid 2)" in text
        finally:
            os.close(fd)
    finally:
        d.stop()
        lazy_unmount(user)

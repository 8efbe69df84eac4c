"""udev/70-cusetpm.rules and udev/cusetpm.service are well-formed.

systemd >= 254 has `udevadm verify FILE`; Debian 12 has 252, whose `udevadm test` reads
every rules directory. There the rule is put alone into a private mount namespace
(a tmpfs over /etc/udev/rules.d), so the host's udev configuration is never touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.frontends.conftest import REPO

RULE = REPO / "udev" / "70-cusetpm.rules"
UNIT = REPO / "udev" / "cusetpm.service"


def udevadm_verify(rule: Path) -> subprocess.CompletedProcess[str] | None:
    done = subprocess.run(["udevadm", "verify", str(rule)], capture_output=True, text=True)
    if "Unknown command" in done.stderr or "unknown command" in done.stderr.lower():
        return None  # systemd < 254
    return done


def udevadm_test_errors(rule: Path) -> list[str]:
    """Parse problems udevadm test reports for `rule` (empty: clean)."""
    script = (
        "set -e; mount -t tmpfs tmpfs /etc/udev/rules.d; "
        f'cp "{rule}" /etc/udev/rules.d/; '
        "udevadm test --action=add /devices/virtual/misc/fuse 2>&1"
    )
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True,
                          text=True, timeout=60)
    out = done.stdout + done.stderr
    installed = f"/etc/udev/rules.d/{rule.name}"
    assert f"Reading rules file: {installed}" in out, out[-2000:]
    return [line for line in out.splitlines() if line.startswith(f"{installed}:")]


def check_rule(rule: Path) -> list[str]:
    if shutil.which("udevadm") is None:
        pytest.skip("udevadm is not installed: cannot check the rule's syntax")
    verified = udevadm_verify(rule)
    if verified is not None:
        return [] if verified.returncode == 0 else [verified.stdout + verified.stderr]
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("udevadm < 254 has no verify, and udevadm test needs root and unshare "
                    "to read the rule without installing it")
    if not os.path.exists("/sys/devices/virtual/misc/fuse"):
        pytest.skip("udevadm test needs some device to simulate; /dev/fuse's is missing")
    return udevadm_test_errors(rule)


def test_udev_rule_syntax() -> None:
    assert check_rule(RULE) == []


def test_udev_check_catches_a_broken_rule(tmp_path: Path) -> None:
    broken = tmp_path / "70-broken.rules"
    broken.write_text('SUBSYSTEM=="cuse", KERNEL="tpmrm*", MODE="0660"\n')  # = is not ==
    assert check_rule(broken) != []


def test_udev_rule_matches_only_cuse_tpmrm_nodes() -> None:
    rules = [line for line in RULE.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert rules == ['SUBSYSTEM=="cuse", KERNEL=="tpmrm[0-9]*", GROUP="tss", MODE="0660"']


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed: cannot check the unit")
    unit = tmp_path / "cusetpm.service"
    # verify checks that ExecStart's program exists: the installed script, or any program
    program = shutil.which("cusetpm") or str(Path(sys.executable).parent / "cusetpm")
    if not os.access(program, os.X_OK):
        program = "/bin/true"
    unit.write_text(UNIT.read_text().replace("@BINDIR@/cusetpm", program))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=60)
    problems = [line for line in (done.stdout + done.stderr).splitlines()
                if str(unit) in line or "cusetpm.service" in line]
    assert done.returncode == 0 and problems == [], done.stdout + done.stderr


def test_systemd_unit_essentials() -> None:
    text = UNIT.read_text()
    for line in ("Type=notify", "DeviceAllow=/dev/cuse rw", "DevicePolicy=closed",
                 "KillSignal=SIGTERM", "StateDirectory=cusetpm", "RuntimeDirectory=cusetpm",
                 "RuntimeDirectoryMode=0700", "ExecReload=/bin/kill -HUP $MAINPID"):
        assert line in text.splitlines(), line
    assert "ExecStart=@BINDIR@/cusetpm serve" in text
    # `cusetpm status`'s default socket, in the unit's RuntimeDirectory
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    assert "--control /run/cusetpm/control" in exec_start

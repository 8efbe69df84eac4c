"""udev/70-cusetpm.rules in the guest: group tss, mode 0660, for cusetpm's nodes only.

systemd-udevd runs in the virtme-ng guest (virtme's init starts it; `udevadm control
--ping` answers), so the rule is exercised for real: copied into the guest's throw-away
/etc, rules reloaded, then a daemon started -- the kernel's "add" event for its node is
what udev acts on.  Distribution rules matching tpmrm* are masked for the session
(``udev_isolated``), so what these tests see is the project's rule alone.

``udevadm test`` shows which rule line set what, as a second opinion.
"""

from __future__ import annotations

import grp
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm.guest.conftest import (
    BACKENDS,
    PROJECT_ROOT,
    UDEV_ETC_RULES,
    CuseDaemon,
    make_vtpm_chip,
    start_cuse_daemon,
    udev_settle,
    udevadm,
)
from tests.vm.guest.tpm_raw import getrandom_command, parse_getrandom_response, transact

RULE = PROJECT_ROOT / "udev" / "70-cusetpm.rules"
FRESH_NAME = "tpmrm43"


def node_attrs(path: str) -> tuple[str, str, str]:
    """(mode, user, group) of a node, e.g. ('0660', 'root', 'tss')."""
    st = os.stat(path)
    assert stat.S_ISCHR(st.st_mode), f"{path} is not a character device"
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    user = "root" if st.st_uid == 0 else str(st.st_uid)
    return f"{stat.S_IMODE(st.st_mode):04o}", user, group


def udevadm_test(syspath: Path) -> str:
    """What udev would do for an add event on ``syspath`` (applied rule lines included)."""
    done = udevadm("test", "--action=add", str(syspath))
    return done.stdout + done.stderr


def ensure_tss_group() -> None:
    """Debian's tpm-udev creates group tss; the guest's /etc is throw-away, so add it if not."""
    try:
        grp.getgrnam("tss")
    except KeyError:
        subprocess.run(["groupadd", "--system", "tss"], check=True, timeout=60)


@pytest.fixture(scope="module")
def cusetpm_rule(udev_isolated: list[str]) -> Iterator[Path]:
    """The project's rule installed in the guest's /etc/udev/rules.d, rules reloaded."""
    ensure_tss_group()
    installed = UDEV_ETC_RULES / RULE.name
    shutil.copyfile(RULE, installed)
    udevadm("control", "--reload")
    try:
        yield installed
    finally:
        installed.unlink(missing_ok=True)
        subprocess.run(["udevadm", "control", "--reload"], check=False, timeout=60)


@pytest.fixture(scope="module")
def fresh_daemon(
    request: pytest.FixtureRequest, cusetpm_rule: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CuseDaemon]:
    """`cusetpm serve --name tpmrm43` started with the rule installed: udev sees its add.
    Parametrized by backend; the device one gets a kernel TPM chip of its own (a chip's
    /dev/tpmN has one opener at a time, and the session's device daemon holds its own)."""
    base = tmp_path_factory.mktemp("fresh")
    chip = make_vtpm_chip(base) if request.param == "device" else None
    backend = f"device:{chip.tpm}" if chip else "libtpms"
    try:
        daemon = start_cuse_daemon(FRESH_NAME, base, backend=backend)
        try:
            yield daemon
        finally:
            daemon.stop()
    finally:
        if chip is not None:
            chip.remove()


def test_udevd_runs_in_the_guest() -> None:
    udevadm("control", "--ping")
    names = {p.read_text().strip() for p in Path("/proc").glob("[0-9]*/comm") if p.exists()}
    assert "systemd-udevd" in names, "no systemd-udevd process"


@pytest.mark.parametrize("fresh_daemon", BACKENDS, indirect=True)
def test_rule_makes_a_new_cuse_node_group_tss_0660(fresh_daemon: CuseDaemon) -> None:
    assert fresh_daemon.node_stat is not None
    assert node_attrs(fresh_daemon.path) == ("0660", "root", "tss")
    path = fresh_daemon.path
    assert len(parse_getrandom_response(transact(path, getrandom_command(8)))) == 8


@pytest.mark.parametrize("fresh_daemon", BACKENDS, indirect=True)
def test_udevadm_test_shows_the_rule_applied_to_the_cuse_node(fresh_daemon: CuseDaemon) -> None:
    out = udevadm_test(Path("/sys/class/cuse") / fresh_daemon.name)
    gid = grp.getgrnam("tss").gr_gid
    assert re.search(rf"70-cusetpm\.rules:\d+ GROUP {gid}\b", out), out
    assert re.search(r"70-cusetpm\.rules:\d+ MODE 0660\b", out), out


def test_rule_leaves_the_kernels_tpmrm_node_alone(
    cusetpm_rule: Path, kernel_tpmrm: str
) -> None:
    """The kernel's node (subsystem tpmrm) is not matched: it stays root:root 0600 as the
    kernel made it, also after an explicit add event."""
    udev_settle()
    name = Path(kernel_tpmrm).name
    syspath = Path("/sys/class/tpmrm") / name
    assert (syspath / "subsystem").resolve().name == "tpmrm"
    assert node_attrs(kernel_tpmrm) == ("0600", "root", "root")
    udevadm("trigger", "--action=add", "--settle", str(syspath))
    assert node_attrs(kernel_tpmrm) == ("0600", "root", "root")
    out = udevadm_test(syspath)
    assert "70-cusetpm.rules" in out, f"udevadm test did not read the rule:\n{out}"
    assert not re.search(r"70-cusetpm\.rules:\d+ ", out), out

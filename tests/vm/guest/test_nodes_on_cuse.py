"""Two CUSE nodes from one `cusetpm serve --config` in the guest kernel: a `full` node and a
`user` node on one RM and one libtpms TPM.

Both answer; after udev settled each has its own name, owner and mode from the config; the
user node refuses administration (TPM2_Clear) with 0x000B0120; a descriptor of one node sees
nothing of a descriptor of the other (objects, sessions); and a uid other than root hits the
user node's per-uid session quota (0x000B0903) while root on the full node does not.
"""

from __future__ import annotations

import errno
import grp
import json
import os
import pwd
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.vm.guest.conftest import (
    CUSETPM_START_TIMEOUT,
    PROJECT_ROOT,
    SERVING_LINE,
    modprobe,
    stop_process,
    udev_settle,
)
from tests.vm.guest.tpm_raw import (
    HEADER,
    create_primary_ecc_command,
    created_handle,
    exchange,
    flush_context_command,
    getrandom_command,
    parse_getrandom_response,
    response_code,
    start_hmac_session_command,
    transact,
)

FULL_NAME = "tpmrm44"  # a tpmrm[0-9]* name, far above what tpm_vtpm_proxy hands out
USER_NAME = "tpmrm-user44"  # not tpmrm[0-9]*: no udev rule touches its mode
NOBODY = pwd.getpwnam("nobody")
SESSIONS_PER_UID = 2

RC_POLICY_REFUSED = 0x000B0120
RC_OVER_SESSIONS = 0x000B0903
RC_HANDLE_P1 = 0x1CB  # FlushContext of a session that is not the caller's


@dataclass
class TwoNodes:
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def full(self) -> str:
        return f"/dev/{FULL_NAME}"

    @property
    def user(self) -> str:
        return f"/dev/{USER_NAME}"

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def write_config(path: Path) -> None:
    path.write_text(
        f'[[node]]\nname = "{FULL_NAME}"\nprofile = "full"\nmode = "0600"\n\n'
        f'[[node]]\nname = "{USER_NAME}"\nprofile = "user"\nmode = "0666"\n'
        f'user = "nobody"\ngroup = "{_group_name(NOBODY.pw_gid)}"\n\n'
        f'[node.limits]\nsessions_per_uid = {SESSIONS_PER_UID}\n')


def _group_name(gid: int) -> str:
    return grp.getgrgid(gid).gr_name


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory,
              udev_isolated: list[str]) -> Iterator[TwoNodes]:
    if not Path("/dev/cuse").exists():
        modprobe("cuse")
    base = tmp_path_factory.mktemp("two-nodes")
    config = base / "nodes.toml"
    write_config(config)
    log = base / "serve.log"
    with log.open("wb") as logfile:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cusetpm", "serve", "--backend", "libtpms",
             "--state-dir", str(base / "state"), "--config", str(config),
             "--log-level", "INFO"],
            stdin=subprocess.DEVNULL, stdout=logfile, stderr=subprocess.STDOUT,
            cwd=PROJECT_ROOT)
    nodes = TwoNodes(proc, log)
    deadline = time.monotonic() + CUSETPM_START_TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        if (log.read_bytes().count(SERVING_LINE) == 2 and os.path.exists(nodes.full)
                and os.path.exists(nodes.user)):
            break
        time.sleep(0.05)
    else:
        stop_process(proc, log=log)
        pytest.fail(f"cusetpm serve --config did not serve both nodes:\n{nodes.output()}")
    udev_settle()
    try:
        yield nodes
    finally:
        died = proc.poll()
        stop_process(proc, log=log)
        assert died is None, f"the daemon died while serving:\n{nodes.output()}"
        assert proc.returncode == 0, nodes.output()
        assert not os.path.exists(nodes.full) and not os.path.exists(nodes.user)


def clear_command() -> bytes:
    """TPM2_Clear(TPM_RH_LOCKOUT) with an empty password."""
    session = struct.pack(">IHBH", 0x40000009, 0, 0, 0)
    body = struct.pack(">I", 0x4000000A) + struct.pack(">I", len(session)) + session
    return HEADER.pack(0x8002, HEADER.size + len(body), 0x00000126) + body


def read_public_command(handle: int) -> bytes:
    body = struct.pack(">I", handle)
    return HEADER.pack(0x8001, HEADER.size + len(body), 0x00000173) + body


def transient_handles_command() -> bytes:
    body = struct.pack(">III", 1, 0x80000000, 16)  # TPM_CAP_HANDLES, transient, up to 16
    return HEADER.pack(0x8001, HEADER.size + len(body), 0x0000017A) + body


def listed_handles(response: bytes) -> list[int]:
    assert response_code(response) == 0, response.hex()
    # moreData, capability, count, handles
    (count,) = struct.unpack_from(">I", response, HEADER.size + 5)
    return list(struct.unpack_from(f">{count}I", response, HEADER.size + 9))


def test_both_nodes_answer_with_their_own_owner_and_mode(two_nodes: TwoNodes) -> None:
    for node in (two_nodes.full, two_nodes.user):
        assert len(parse_getrandom_response(transact(node, getrandom_command(16)))) == 16
    full, user = os.stat(two_nodes.full), os.stat(two_nodes.user)
    assert stat.S_ISCHR(full.st_mode) and stat.S_ISCHR(user.st_mode)
    assert (stat.S_IMODE(full.st_mode), full.st_uid, full.st_gid) == (0o600, 0, 0)
    assert (stat.S_IMODE(user.st_mode), user.st_uid, user.st_gid) == (
        0o666, NOBODY.pw_uid, NOBODY.pw_gid)
    assert full.st_rdev != user.st_rdev  # two CUSE devices


def test_user_node_refuses_clear(two_nodes: TwoNodes) -> None:
    assert response_code(transact(two_nodes.user, clear_command())) == RC_POLICY_REFUSED
    assert "Clear refused" in two_nodes.output()
    # the TPM was not cleared: the full node still answers and creates keys
    fd = os.open(two_nodes.full, os.O_RDWR)
    try:
        handle = created_handle(exchange(fd, create_primary_ecc_command()))
        assert response_code(exchange(fd, flush_context_command(handle))) == 0
    finally:
        os.close(fd)


def test_a_space_of_one_node_is_isolated_from_the_other(two_nodes: TwoNodes) -> None:
    full = os.open(two_nodes.full, os.O_RDWR)
    user = os.open(two_nodes.user, os.O_RDWR)
    try:
        key = created_handle(exchange(full, create_primary_ecc_command()))
        assert listed_handles(exchange(full, transient_handles_command())) == [key]
        assert listed_handles(exchange(user, transient_handles_command())) == []
        with pytest.raises(OSError) as err:  # another descriptor's transient handle
            exchange(user, read_public_command(key))
        assert err.value.errno == errno.EINVAL
        session = created_handle(exchange(user, start_hmac_session_command()))
        # the full node's descriptor cannot flush the user node's session: it is not there
        assert response_code(exchange(full, flush_context_command(session))) == RC_HANDLE_P1
        assert response_code(exchange(user, flush_context_command(session))) == 0
        assert response_code(exchange(full, read_public_command(key))) == 0
    finally:
        os.close(full)
        os.close(user)


def sessions_as(uid: int, gid: int, node: str, count: int) -> list[int]:
    """Start `count` sessions on one descriptor of `node` in a child running as uid/gid;
    the response codes, in order."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery from here, only os._exit
        code = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            fd = os.open(node, os.O_RDWR)
            rcs = [response_code(exchange(fd, start_hmac_session_command()))
                   for _ in range(count)]
            os.write(write_end, json.dumps(rcs).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child failed"
    result: list[int] = json.loads(data)
    return result


def test_a_uid_hits_the_user_nodes_session_quota_root_on_full_does_not(
    two_nodes: TwoNodes,
) -> None:
    count = SESSIONS_PER_UID + 1
    rcs = sessions_as(NOBODY.pw_uid, NOBODY.pw_gid, two_nodes.user, count)
    assert rcs == [0] * SESSIONS_PER_UID + [RC_OVER_SESSIONS]
    assert sessions_as(0, 0, two_nodes.full, count) == [0] * count
    assert f"uid {NOBODY.pw_uid} holds {SESSIONS_PER_UID} sessions" in two_nodes.output()

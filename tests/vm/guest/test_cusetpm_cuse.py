"""cusetpm over CUSE in the guest kernel: the node clients will really open.

Uses ``cusetpm_cuse_node`` (tests/vm/guest/conftest.py), which skips with a
reason until ``cusetpm serve --name`` exists.  Add CUSE end-to-end tests here;
the kernel's node for side-by-side checks is the ``kernel_tpmrm`` fixture.
"""

from __future__ import annotations

import os
import stat
import subprocess

from tests.vm.guest.tpm_raw import getrandom_command, parse_getrandom_response, transact


def test_cuse_node_is_char_device(cusetpm_cuse_node: str) -> None:
    assert stat.S_ISCHR(os.stat(cusetpm_cuse_node).st_mode)


def test_cuse_node_raw_getrandom(cusetpm_cuse_node: str) -> None:
    data = parse_getrandom_response(transact(cusetpm_cuse_node, getrandom_command(16)))
    assert len(data) == 16


def test_cuse_node_tpm2_getrandom(cusetpm_cuse_node: str) -> None:
    proc = subprocess.run(
        ["tpm2_getrandom", "-T", f"device:{cusetpm_cuse_node}", "--hex", "8"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, f"tpm2_getrandom through cusetpm failed: {proc.stderr}"
    assert len(proc.stdout.strip()) == 16

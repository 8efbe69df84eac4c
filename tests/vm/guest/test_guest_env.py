"""The guest itself: CUSE is there, and the kernel's own resource manager works.

These prove the guest can host the CUSE end-to-end tests and the side-by-side
comparisons with the kernel's /dev/tpmrmN (fixture ``kernel_tpmrm``).
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.vm.guest.conftest import TpmChip, modprobe
from tests.vm.guest.tpm_raw import getrandom_command, parse_getrandom_response, transact

CUSE_MAJOR, CUSE_MINOR = 10, 203  # miscdevice "cuse" (include/linux/miscdevice.h)


def test_dev_cuse_after_modprobe() -> None:
    modprobe("cuse")
    st = os.stat("/dev/cuse")
    assert stat.S_ISCHR(st.st_mode), "/dev/cuse is not a character device"
    assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (CUSE_MAJOR, CUSE_MINOR)
    # Opening it is what cusetpm's daemon will do first; root may.
    fd = os.open("/dev/cuse", os.O_RDWR)
    os.close(fd)


def test_kernel_tpmrm_tpm2_getrandom(kernel_tpmrm: str) -> None:
    proc = subprocess.run(
        ["tpm2_getrandom", "-T", f"device:{kernel_tpmrm}", "--hex", "8"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, f"tpm2_getrandom failed: {proc.stderr}"
    out = proc.stdout.strip()
    assert len(out) == 16 and int(out, 16) >= 0, f"unexpected output {out!r}"


def test_kernel_tpmrm_raw_getrandom(kernel_tpmrm: str) -> None:
    first = parse_getrandom_response(transact(kernel_tpmrm, getrandom_command(16)))
    second = parse_getrandom_response(transact(kernel_tpmrm, getrandom_command(16)))
    assert len(first) == len(second) == 16
    assert first != second


def test_kernel_tpm_chip_appears_and_goes(vtpm_chip: TpmChip) -> None:
    """The vtpm_chip fixture's chip is a TPM 2.0 chip the kernel drives: /dev/tpmN (one
    opener at a time, so cusetpm's device backend owns it while it runs) and /dev/tpmrmN
    both answer; stopping swtpm takes the chip away."""
    sysfs = Path("/sys/class/tpm") / Path(vtpm_chip.tpm).name
    assert (sysfs / "tpm_version_major").read_text().strip() == "2"
    for node in (vtpm_chip.tpm, vtpm_chip.tpmrm):
        assert stat.S_ISCHR(os.stat(node).st_mode), node
        assert len(parse_getrandom_response(transact(node, getrandom_command(8)))) == 8
    fd = os.open(vtpm_chip.tpm, os.O_RDWR)
    try:
        with pytest.raises(OSError) as second:
            os.close(os.open(vtpm_chip.tpm, os.O_RDWR))
        assert second.value.errno == errno.EBUSY
    finally:
        os.close(fd)
    assert vtpm_chip.remove(), f"{vtpm_chip.tpm} still there after swtpm stopped"
    assert not sysfs.exists()

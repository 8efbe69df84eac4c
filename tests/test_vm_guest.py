"""Run the guest-kernel suite (tests/vm/guest) from the host's `make test`.

The host kernel has no CUSE, so this boots Debian's kernel under qemu once
(tests/vm/harness.py) and runs the whole guest suite in that one boot; the
guest's own pytest output is in the failure message.  Skips only when no guest
can be booted here at all (no suitable kernel, vng or qemu: `make vm-deps`).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.vm import harness

# One TCG boot is ~20 s and the guest suite ~1 min; this only bounds a hang.
GUEST_TIMEOUT = 600.0

# Tests that must have run (not skipped) in the guest, or the guest proved nothing.
MUST_PASS = {
    "test_dev_cuse_after_modprobe",
    "test_kernel_tpmrm_tpm2_getrandom",
    "test_kernel_tpmrm_raw_getrandom",
}


def _junit_outcomes(path: Path) -> dict[str, str]:
    """Test name -> passed / failed / error / skipped, from the guest's junit xml."""
    outcomes: dict[str, str] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = "failed" if child.tag == "failure" else child.tag
                break
        outcomes[case.get("name", "?")] = outcome
    return outcomes


@pytest.mark.slow
def test_guest_suite(tmp_path: Path) -> None:
    if os.environ.get("CUSETPM_VM_GUEST") == "1":
        pytest.skip("already inside the test guest")
    try:
        kernel = harness.check_available()
    except harness.GuestUnavailable as exc:
        pytest.skip(f"cannot boot the test guest: {exc}")

    result = harness.run_guest_suite(timeout=GUEST_TIMEOUT, rwdir=tmp_path)
    report = f"guest {kernel.release}, {result.duration:.1f} s, exit {result.returncode}"
    assert result.returncode == 0, f"guest suite failed ({report}):\n{result.output}"

    junit = tmp_path / "junit.xml"
    assert junit.exists(), f"guest wrote no junit.xml ({report}):\n{result.output}"
    outcomes = _junit_outcomes(junit)
    not_passed = {
        name: outcomes.get(name, "missing")
        for name in sorted(MUST_PASS)
        if outcomes.get(name) != "passed"
    }
    assert not not_passed, f"guest environment tests did not pass: {not_passed}\n{result.output}"

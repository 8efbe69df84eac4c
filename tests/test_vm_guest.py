"""Run the guest-kernel suite (tests/vm/guest) from the host's `make test`.

The host kernel has no CUSE, so this boots Debian's kernel under qemu once
(tests/vm/harness.py) and runs the whole guest suite in that one boot.  It fails,
with the guest's own output, unless the guest's pytest succeeded *and* its junit.xml
shows every guest test passed: each test function defined in (or adopted by) the
modules of tests/vm/guest must appear, as often as it is parametrized, and pass --
so a CUSE test that is skipped, deselected or never collected fails this test too.
A test marked xfail in the guest counts when it xfailed with its reason.

Skips only when no guest can be booted here at all (no suitable kernel, vng or
qemu: `make vm-deps`).
"""

from __future__ import annotations

import importlib
import math
import os
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import pytest

from tests.vm import harness

# One TCG boot is ~20-30 s and the guest suite ~3-4 min; this only bounds a hang.
GUEST_TIMEOUT = 900.0
GUEST_DIR = Path(__file__).resolve().parent / "vm" / "guest"
# A floor under the count, in case the module scan below ever finds nothing.
MIN_GUEST_TESTS = 40


def _param_count(func: object) -> int:
    marks = getattr(func, "pytestmark", [])
    sizes = [len(m.args[1]) for m in marks if m.name == "parametrize" and len(m.args) > 1]
    return math.prod(sizes) if sizes else 1


def expected_guest_tests() -> Counter[str]:
    """Test name -> how many junit test cases it must produce, from the guest modules.

    Includes the tests/frontends tests that test_frontends_on_cuse.py adopts.
    """
    expected: Counter[str] = Counter()
    for path in sorted(GUEST_DIR.glob("test_*.py")):
        module = importlib.import_module(f"tests.vm.guest.{path.stem}")
        for name, value in vars(module).items():
            if name.startswith("test_") and callable(value):
                expected[name] += _param_count(value)  # one name in two modules: both
    return expected


def junit_cases(path: Path) -> list[tuple[str, str, str]]:
    """(test name without parameters, outcome, message) for every junit test case.

    outcome: passed, failed, error, skipped or xfailed.
    """
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = "failed" if child.tag == "failure" else child.tag
                message = child.get("message", "")
                if child.tag == "skipped" and child.get("type") == "pytest.xfail":
                    outcome = "xfailed"
                break
        cases.append((case.get("name", "?").split("[", 1)[0], outcome, message))
    return cases


def guest_problems(cases: list[tuple[str, str, str]], expected: Counter[str]) -> list[str]:
    """Everything wrong with the guest's junit cases; empty when the guest proved its tests."""
    problems = []
    passed: Counter[str] = Counter()
    for name, outcome, message in cases:
        if outcome == "passed" or (outcome == "xfailed" and message.strip()):
            passed[name] += 1
        elif outcome == "skipped" and not message.strip():
            problems.append(f"{name}: skipped without a reason")
        else:
            problems.append(f"{name}: {outcome}: {message.strip()[:300]}")
    for name, count in sorted(expected.items()):
        if passed[name] < count:
            problems.append(f"{name}: {passed[name]} of {count} cases passed in the guest")
    total = sum(passed.values())
    if total < MIN_GUEST_TESTS:
        problems.append(f"only {total} guest tests passed, expected at least {MIN_GUEST_TESTS}")
    return problems


def test_expected_guest_tests_cover_the_cuse_cases() -> None:
    """The host-side bookkeeping itself: the CUSE cases are among what the guest must pass."""
    expected = expected_guest_tests()
    for name in ("test_round_trip", "test_tpm2_tools_keys_and_signatures",
                 "test_sigkilled_client_leaves_nothing_in_the_tpm",
                 "test_rule_makes_a_new_cuse_node_group_tss_0660",
                 "test_serve_refuses_a_taken_name", "test_dev_cuse_after_modprobe",
                 "test_kernel_tpm_chip_appears_and_goes",
                 "test_auto_with_dev_tpm0_serves_the_kernels_chip",
                 "test_clients_of_both_at_once_on_one_chip",
                 "test_stopped_cusetpm_leaves_nothing_in_the_chip",
                 "test_clevis_round_trip", "test_tpm2_openssl_self_signed_certificate"):
        assert name in expected, name
    assert expected["test_short_write_is_einval"] > 1  # parametrized cases counted
    # On both backends: the libtpms node and the node over a kernel TPM chip.
    assert expected["test_sigkilled_client_leaves_nothing_in_the_tpm"] == 2
    assert expected["test_rule_makes_a_new_cuse_node_group_tss_0660"] == 2
    assert expected["test_tpm2_tools_keys_and_signatures"] == 2  # two adopting modules
    assert sum(expected.values()) >= MIN_GUEST_TESTS


def test_guest_problems_catches_skips_and_missing_tests() -> None:
    expected = Counter({"test_a": 1, "test_b": 2})
    ok = [("test_a", "passed", ""), ("test_b", "passed", ""), ("test_b", "passed", "")]
    assert guest_problems(ok, expected) == [f"only 3 guest tests passed, expected at least "
                                            f"{MIN_GUEST_TESTS}"]
    assert any("skipped without a reason" in p
               for p in guest_problems([*ok, ("test_c", "skipped", "")], expected))
    assert any("skipped: no tpm2-tools" in p
               for p in guest_problems([*ok, ("test_c", "skipped", "no tpm2-tools")], expected))
    assert any("test_b: 1 of 2" in p for p in guest_problems(ok[:2], expected))
    assert any("test_a: failed" in p
               for p in guest_problems([("test_a", "failed", "boom"), *ok[1:]], expected))
    xfailed = [("test_a", "xfailed", "known bug"), *ok[1:]]
    assert not any("test_a" in p for p in guest_problems(xfailed, expected))


@pytest.mark.slow
def test_guest_suite(tmp_path: Path) -> None:
    if os.environ.get("CUSETPM_VM_GUEST") == "1":
        pytest.skip("already inside the test guest")
    try:
        kernel = harness.check_available()
    except harness.GuestUnavailable as exc:
        pytest.skip(f"cannot boot the test guest: {exc}")

    expected = expected_guest_tests()
    result = harness.run_guest_suite(timeout=GUEST_TIMEOUT, rwdir=tmp_path)
    report = f"guest {kernel.release}, {result.duration:.1f} s, exit {result.returncode}"
    print(f"[test_vm_guest] {report}")
    assert result.returncode == 0, f"guest suite failed ({report}):\n{result.output}"

    junit = tmp_path / "junit.xml"
    assert junit.exists(), f"guest wrote no junit.xml ({report}):\n{result.output}"
    problems = guest_problems(junit_cases(junit), expected)
    assert not problems, (
        f"the guest did not prove its tests ({report}):\n  " + "\n  ".join(problems)
        + f"\n{result.output}"
    )

"""The kernel's own TPM selftests (tools/testing/selftests/tpm2) on the node.

A drop-in /dev/tpmrm0 must pass the tests the kernel holds its own resource manager to.
Their files come from Debian's linux-source-6.1 package at test time (`make kselftest-src`
fetches them into KSELFTEST_DIR, outside the repository); they are never copied here.

tpm2.py opens '/dev/tpm0' (SmokeTest, AsyncTest.test_async) and '/dev/tpmrm0' (SpaceTest,
AsyncTest.test_flush_invalid_context) by name: a small runner points both at the node by
shadowing `open` in that module, then runs one test class with unittest in a subprocess
(a hang, as test_get_handles once did, becomes a timeout instead of a stuck suite) and
reports each test's outcome as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

KSELFTEST_DIR = Path(os.environ.get("CUSETPM_KSELFTEST_DIR", "/var/cache/cusetpm/kselftest-tpm2"))
CLASS_TIMEOUT = 300

# The tests of Debian 12's linux-source-6.1; a different set means the files changed under us.
EXPECTED = {
    "SmokeTest": {
        "test_seal_with_auth", "test_seal_with_policy", "test_unseal_with_wrong_auth",
        "test_unseal_with_wrong_policy", "test_seal_with_too_long_auth", "test_too_short_cmd",
        "test_read_partial_resp", "test_read_partial_overwrite", "test_send_two_cmds",
    },
    "SpaceTest": {
        "test_make_two_spaces", "test_flush_context", "test_get_handles", "test_invalid_cc",
    },
    "AsyncTest": {"test_async", "test_flush_invalid_context"},
}

RUNNER = r"""
import builtins, json, sys, unittest
node, cls_name = sys.argv[1], sys.argv[2]
import tpm2
def node_open(path, *args, **kwargs):
    if path in ("/dev/tpm0", "/dev/tpmrm0"):
        path = node
    return builtins.open(path, *args, **kwargs)
tpm2.open = node_open
import tpm2_tests
suite = unittest.defaultTestLoader.loadTestsFromTestCase(getattr(tpm2_tests, cls_name))
outcome = {}
class Result(unittest.TestResult):
    def addSuccess(self, test):
        outcome[test._testMethodName] = "passed"
    def addFailure(self, test, err):
        outcome[test._testMethodName] = "failed: " + self._exc_info_to_string(err, test)
    def addError(self, test, err):
        outcome[test._testMethodName] = "error: " + self._exc_info_to_string(err, test)
    def addSkip(self, test, reason):
        outcome[test._testMethodName] = "skipped: " + reason
suite.run(Result())
print(json.dumps(outcome))
"""


def selftest_dir() -> Path:
    if not (KSELFTEST_DIR / "tpm2_tests.py").is_file():
        pytest.fail(
            f"the kernel's TPM selftests are not in {KSELFTEST_DIR}: `make kselftest-src` "
            "fetches them (Debian's linux-source-6.1)"
        )
    return KSELFTEST_DIR


@pytest.mark.parametrize("cls_name", sorted(EXPECTED))
def test_kernel_selftest_class(node: str, cls_name: str, tmp_path: Path) -> None:
    source = selftest_dir()
    env = {**os.environ, "PYTHONPATH": str(source), "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, node, cls_name],
        cwd=tmp_path,  # the tests write their .log files into the working directory
        env=env,
        capture_output=True,
        text=True,
        timeout=CLASS_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(outcome) == EXPECTED[cls_name]
    failed = {name: result for name, result in outcome.items() if result != "passed"}
    assert not failed, "\n".join(f"{name}: {result}" for name, result in failed.items())

"""Suite-wide: under `make test` (CUSETPM_REQUIRE_ALL=1) a skip for want of something the
Makefile installs is a failure, so CI cannot pass by skipping. Skips for the machine itself
(no /dev/cuse on this kernel, already inside the guest, a kernel TPM present...) stay skips.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# Reasons that name what the Makefile installs (Debian packages, the venv, the guest kernel).
INSTALLED_BY_MAKE = (
    "is not installed",
    "could not import",  # pytest.importorskip of a venv package (tpm2-pytss, ...)
    "cannot boot the test guest",  # vng, qemu and the guest kernel come with vm-deps
    "needs fusermount3",
    "needs /dev/fuse",
    "swtpm",
    "Debian package",
)


def _must_not_skip(reason: str) -> bool:
    return any(marker in reason for marker in INSTALLED_BY_MAKE)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CUSETPM_REQUIRE_ALL") != "1" or not report.skipped:
        return
    if hasattr(report, "wasxfail"):
        return
    reason = str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if _must_not_skip(reason):
        report.outcome = "failed"
        report.longrepr = f"skipped under make test, but the Makefile installs it: {reason}"

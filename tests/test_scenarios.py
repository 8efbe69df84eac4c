"""The conformance scenario library (bench/scenarios) against a FUSE node, so the
library itself is tested: every kernel-defined scenario must pass on cusetpm, and
the verdict logic of bench/conformance.py must flag a difference from the kernel.

The node is `cusetpm serve --fuse-mount` on the embedded libtpms TPM (throw-away
state: the tools scenarios clear the TPM); --quick scenarios only (seconds).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench import conformance
from bench.scenarios import run_target, systems

# FUSE and CUSE answer read(fd, buf, 0) in the kernel without asking the daemon, so the
# response stays readable (kernel: discarded). Documented in tests/frontends/test_semantics.py.
KNOWN_FUSE_DIFFERENCES = {"fs_zero_length_read"}

# Where cusetpm means to do better than the kernel, these must pass on cusetpm.
MUST_PASS_ADVANTAGES = {
    "iso_flush_other_space_session", "cont_from_exited_process", "cont_from_open_space",
    "tools_policy_session_resumed", "regap_old_session_survives",
}


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[dict[str, Any]]]:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse") or not shutil.which("fusermount3"):
        pytest.skip("needs root, /dev/fuse and fusermount3 for a FUSE node")
    tmp: Path = tmp_path_factory.mktemp("scenarios")
    with systems.cusetpm_node("cusetpm-FUSE", "libtpms", tmp, fuse_mount=tmp / "mnt",
                              extra=("--state-dir", str(tmp / "state"))) as target:
        yield run_target(target, quick=True)


def by_name(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {str(r["scenario"]): r for r in rows}


def test_kernel_defined_scenarios_pass(rows: list[dict[str, Any]]) -> None:
    failed = {r["scenario"]: r["detail"] for r in rows
              if r["kernel_defined"] and r["status"] != "pass"
              and r["scenario"] not in KNOWN_FUSE_DIFFERENCES}
    assert not failed, failed


def test_advantages_pass(rows: list[dict[str, Any]]) -> None:
    found = by_name(rows)
    failed = {n: found[n]["detail"] for n in MUST_PASS_ADVANTAGES if found[n]["status"] != "pass"}
    assert not failed, failed


def test_figures(rows: list[dict[str, Any]]) -> None:
    found = by_name(rows)
    assert found["lim_objects_per_space"]["detail"].startswith("20+")  # quick caps at 20
    assert found["lim_sessions_per_space"]["detail"].startswith("16 (#17: rc 0xb0903)")
    assert found["exh_sessions_across_spaces"]["status"] == "n/a"  # not in --quick
    assert all(r["status"] in ("pass", "fail", "figure", "n/a") for r in rows)


def test_verdicts_flag_a_kernel_difference() -> None:
    def row(system: str, status: str, detail: str, kernel_defined: bool = True) -> dict[str, Any]:
        return {"scenario": "x", "group": "g", "kernel_defined": kernel_defined,
                "system": system, "status": status, "detail": detail, "seconds": 0, "doc": "d"}

    same = [row("kernel", "pass", "EINVAL"), row("cusetpm-CUSE", "pass", "EINVAL")]
    assert conformance.pivot(same)[0]["verdict"] == "same as kernel"
    assert conformance.differences(same) == []
    differ = [row("kernel", "pass", "EINVAL"), row("cusetpm-CUSE", "fail", "ENOENT")]
    assert conformance.pivot(differ)[0]["verdict"] == "DIFFERS: cusetpm-CUSE"
    assert len(conformance.differences(differ)) == 1
    better = [row("kernel", "fail", "EFAULT", False), row("cusetpm-FUSE", "pass", "ok", False)]
    assert conformance.pivot(better)[0]["verdict"] == "cusetpm better"
    assert conformance.pivot(same)[0]["tpm2-abrmd"] == ""

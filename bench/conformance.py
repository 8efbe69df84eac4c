"""Side by side with the kernel's /dev/tpmrm0 and tpm2-abrmd: the same client scenarios.

Systems (each on its own fresh, throw-away swtpm state; the scenarios clear the TPM):

* host: ``cusetpm-FUSE`` (``cusetpm serve --fuse-mount`` on ``swtpm socket``) and
  ``tpm2-abrmd`` (``--session --tcti=swtpm:…`` on a private session bus; raw
  scenarios through tpm2-pytss's tabrmd TCTI, tools with ``-T tabrmd:bus_type=session``);
* guest (one virtme-ng boot of Debian's kernel, full mode only): ``kernel``
  (``tpm_vtpm_proxy`` + ``swtpm chardev --vtpm-proxy``) and ``cusetpm-CUSE``
  (``cusetpm serve --name tpmrm-conf`` on ``swtpm socket``), same swtpm build.

Rows: one per scenario, one column per system (status: detail), and a verdict:
for kernel-defined behaviour every cusetpm column must read the same as the
kernel's. Also writes bench/results/conformance.md. Benchmarks never assert.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.scenarios import run_target, systems
from bench.scenarios.conn import Target

TITLE = "Conformance: the same client scenarios on the kernel's tpmrm, cusetpm and tpm2-abrmd"

SYSTEMS = ["kernel", "cusetpm-CUSE", "cusetpm-FUSE", "tpm2-abrmd"]
CUSETPM = ("cusetpm-CUSE", "cusetpm-FUSE")
RESULTS_MD = Path(__file__).resolve().parent / "results" / "conformance.md"
GUEST_TIMEOUT = 2400.0  # boot ~20 s; each regap loop is capped at 600 s, tools take ~2 s a step

Rows = list[dict[str, Any]]


def _fuse_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (FUSE mount with allow_other)"
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        return "needs /dev/fuse and fusermount3"
    if shutil.which("swtpm") is None:
        return "needs swtpm"
    return None


@contextlib.contextmanager
def _fuse_target(tmp: Path) -> Iterator[Target]:
    with systems.swtpm_socket(tmp / "fuse-swtpm-state") as port, systems.cusetpm_node(
        "cusetpm-FUSE", f"swtpm:tcp:127.0.0.1:{port}", tmp, fuse_mount=tmp / "mnt"
    ) as target:
        yield target


@contextlib.contextmanager
def _abrmd_target(tmp: Path) -> Iterator[Target]:
    with systems.swtpm_socket(tmp / "abrmd-swtpm-state") as port, systems.tpm2_abrmd(
        port
    ) as target:
        yield target


def host_rows(quick: bool, notes: list[str]) -> Rows:
    rows: Rows = []
    with tempfile.TemporaryDirectory(prefix="cusetpm-conformance-") as name:
        tmp = Path(name)
        plans = [("cusetpm-FUSE", _fuse_target, _fuse_unavailable()),
                 ("tpm2-abrmd", _abrmd_target, None)]
        for system, bring_up, missing in plans:
            if missing:
                notes.append(f"{system}: not run ({missing})")
                continue
            start = time.monotonic()
            try:
                with bring_up(tmp) as target:
                    rows += run_target(target, quick)
            except systems.SystemUnavailable as exc:
                notes.append(f"{system}: not run ({exc})")
                continue
            notes.append(f"{system}: {time.monotonic() - start:.0f} s on the host")
    return rows


def guest_script(rwdir: Path, quick: bool) -> str:
    from tests.vm import harness

    python = harness.guest_python()
    argv = [str(python), "-m", "bench.scenarios.guest", str(rwdir)] + (["--quick"] if quick else [])
    return "\n".join([
        "#!/bin/sh",
        "# Written by bench/conformance.py; run as root in the guest.",
        f"export PATH={shlex.quote(str(python.parent))}:/usr/local/sbin:/usr/local/bin:"
        "/usr/sbin:/usr/bin:/sbin:/bin",
        "export PYTHONDONTWRITEBYTECODE=1",  # the tree is read-only in the guest
        "modprobe cuse || echo '[conformance] modprobe cuse failed' >&2",
        f"cd {shlex.quote(str(harness.PROJECT_ROOT))} || exit 92",
        "exec " + shlex.join(argv),
        "",
    ])


def guest_rows(quick: bool, notes: list[str]) -> Rows:
    from tests.vm import harness

    try:
        harness.check_available()
    except harness.GuestUnavailable as exc:
        notes.append(f"kernel, cusetpm-CUSE: not run (no guest: {exc})")
        return []
    with tempfile.TemporaryDirectory(prefix="cusetpm-conformance-vm-") as name:
        rwdir = Path(name)
        result = harness.run_in_guest(guest_script(rwdir, quick), GUEST_TIMEOUT, rwdir)
        path = rwdir / "conformance-guest.json"
        report: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        (Path(tempfile.gettempdir()) / "cusetpm-conformance-guest.log").write_text(result.output)
    notes.append(f"guest boot + run: {result.duration:.0f} s, exit {result.returncode}"
                 + (" (timed out)" if result.timed_out else ""))
    for system, info in report.get("systems", {}).items():
        if "error" in info:
            notes.append(f"{system} (guest): error: {info['error'].strip().splitlines()[-1]}")
        else:
            notes.append(f"{system} (guest): node {info['node']}, up in {info['startup_s']} s, "
                         f"{info['total_s']} s in all")
    if not report:
        tail = result.output.strip().splitlines()[-15:]
        notes.append("guest wrote no results; console tail: " + " / ".join(tail))
    return list(report.get("rows", []))


def cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return ""
    detail = str(row["detail"])  # the runner's table escapes "|"
    return f"**{row['status']}**: {detail}" if detail else f"**{row['status']}**"


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return bool(a["status"] == b["status"] and a["detail"] == b["detail"])


def verdict(kernel_defined: bool, by_system: dict[str, dict[str, Any]]) -> str:
    """Kernel-defined rows: does every cusetpm column read as the kernel's? Others: who passes."""
    kernel = by_system.get("kernel")
    ours = [by_system[s] for s in CUSETPM if s in by_system and by_system[s]["status"] != "n/a"]
    if kernel_defined:
        if kernel is None or kernel["status"] == "n/a":
            return "kernel not run"
        differ = [r["system"] for r in ours if not _same(r, kernel)]
        return "DIFFERS: " + ", ".join(differ) if differ else "same as kernel"
    if kernel is not None and kernel["status"] == "fail" and any(
            r["status"] == "pass" for r in ours):
        return "cusetpm better"
    return "compare figures"


def pivot(rows: Rows) -> Rows:
    """scenario x system -> one row per scenario, one column per system."""
    order: list[str] = []
    meta: dict[str, dict[str, Any]] = {}
    cells: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        name = str(row["scenario"])
        if name not in meta:
            order.append(name)
            meta[name] = row
            cells[name] = {}
        cells[name][str(row["system"])] = row
    table: Rows = []
    for name in order:
        m = meta[name]
        out: dict[str, Any] = {"scenario": name, "group": m["group"],
                               "kernel-defined": "yes" if m["kernel_defined"] else "no"}
        for system in SYSTEMS:
            out[system] = cell(cells[name].get(system))
        out["verdict"] = verdict(bool(m["kernel_defined"]), cells[name])
        table.append(out)
    return table


def differences(rows: Rows) -> list[str]:
    """Kernel-defined rows where a cusetpm system reads differently from the kernel."""
    by: dict[tuple[str, str], dict[str, Any]] = {(r["scenario"], r["system"]): r for r in rows}
    found = []
    for (name, system), row in by.items():
        kernel = by.get((name, "kernel"))
        if system in CUSETPM and row["kernel_defined"] and kernel and row["status"] != "n/a" \
                and not _same(row, kernel):
            found.append(f"{name}: kernel {kernel['status']} ({kernel['detail']}) vs "
                         f"{system} {row['status']} ({row['detail']})")
    return found


def markdown(table: Rows, rows: Rows, notes: list[str], quick: bool) -> str:
    from bench.__main__ import markdown_table

    docs = {}
    for r in rows:
        docs.setdefault(r["scenario"], r["doc"])
    diffs = differences(rows)
    parts = [
        "# Conformance: kernel /dev/tpmrm0, cusetpm (CUSE, FUSE) and tpm2-abrmd",
        "",
        f"Generated by `python -m bench --only conformance{' --quick' if quick else ''}` "
        f"on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Each system on a fresh "
        "swtpm state (same swtpm build); `kernel` and `cusetpm-CUSE` run in one guest boot "
        "of Debian's kernel under qemu (TCG), `cusetpm-FUSE` and `tpm2-abrmd` on the host.",
        "",
        "Verdict: for kernel-defined rows, every cusetpm column must read the same as the "
        "kernel's (status and detail); the other rows show where the systems differ on purpose.",
        "",
        markdown_table(table),
        "",
        "## Kernel-defined rows where cusetpm differs from the kernel",
        "",
        *([f"- {d}" for d in diffs] or ["- none" if any(r["system"] == "kernel" for r in rows)
                                        else "- (the kernel was not run)"]),
        "",
        "## Runs",
        "",
        *[f"- {n}" for n in notes],
        "",
        "## Scenarios",
        "",
        *[f"- `{name}`: {doc}" for name, doc in docs.items()],
        "",
    ]
    return "\n".join(parts)


# The guest rows (kernel vs cusetpm-CUSE) take ~20 minutes under TCG, mostly the kernel
# reaching its context gap: more than `make bench`'s 10-minute budget. `make conformance`
# sets this to run them; `make bench` leaves them to it.
GUEST_ENV = "CUSETPM_CONFORMANCE_GUEST"


def run(quick: bool) -> Rows:
    notes: list[str] = []
    rows = host_rows(quick, notes)
    with_guest = not quick and os.environ.get(GUEST_ENV) == "1"
    if quick:
        notes.append("kernel, cusetpm-CUSE: not run in --quick (the guest boot takes minutes)")
    elif not with_guest:
        notes.append(
            "kernel, cusetpm-CUSE: run by `make conformance` (~20 min in the guest), "
            "table in bench/results/conformance.md"
        )
    else:
        rows += guest_rows(quick, notes)
    table = pivot(rows)
    # Runs without the guest write beside the full table rather than over it.
    if quick:
        path = RESULTS_MD.with_name("conformance-quick.md")
    elif not with_guest:
        path = RESULTS_MD.with_name("conformance-host.md")
    else:
        path = RESULTS_MD
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown(table, rows, notes, quick))
    return table

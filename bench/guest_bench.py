"""In the guest kernel: the kernel's /dev/tpmrmN vs. the cusetpm CUSE node, both on swtpm.

The build machines' kernel has no CUSE, so this section boots Debian's kernel under qemu
(tests/vm/harness.py, one boot) and runs this module's `main` there, which writes its rows
as JSON into the shared rwdir. The guest runs under TCG emulation, so its numbers compare
with each other only, never with the host's.

In the guest: the kernel's RM sits on `swtpm chardev --vtpm-proxy` (tpm_vtpm_proxy), cusetpm
serves /dev/tpmrm-bench over CUSE with a `swtpm socket` backend: two swtpm processes of the
same build, one per system (the kernel can only talk to a vtpm-proxy one). Same workloads
and bytes as bench.compare, alternating rounds, fewer and shorter.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TITLE = "Guest kernel: kernel /dev/tpmrm0 vs. cusetpm CUSE node (both on swtpm)"

NOTES = """\
- One qemu boot (TCG, no KVM) of Debian's kernel; Python there is 10-40x slower than on the
  host, so compare these rows with each other only.
- kernel: `swtpm chardev --vtpm-proxy` + `modprobe tpm_vtpm_proxy`, the kernel's /dev/tpmrmN.
  cusetpm: `cusetpm serve --backend swtpm:tcp:... --name tpmrm-bench` (CUSE) on a `swtpm
  socket`. Clients: one `os.write` + `os.read` per command on the node.
- Memory per open space is not reported for the kernel: its spaces live in kernel memory,
  not visible from user space.
"""

GUEST_RESULTS = "guest-bench.json"
CUSE_NAME = "tpmrm-bench"
BOOT_TIMEOUT = 480.0


# --- host side ------------------------------------------------------------------------------


def run(quick: bool) -> list[dict[str, Any]]:
    if quick:
        return [{"workload": "(all)", "system": "(guest)",
                 "note": "skipped: --quick does not boot the guest kernel (make bench does)"}]
    from tests.vm.harness import GuestUnavailable, guest_python, run_in_guest

    rwdir = Path(tempfile.mkdtemp(prefix="cusetpm-bench-guest-"))
    python = guest_python()
    root = Path(__file__).resolve().parents[1]
    script = "\n".join([
        "#!/bin/sh",
        f"export PATH={shlex.quote(str(python.parent))}:/usr/local/sbin:/usr/local/bin:"
        "/usr/sbin:/usr/bin:/sbin:/bin",
        "export PYTHONDONTWRITEBYTECODE=1",  # the tree is read-only in the guest
        "modprobe cuse && modprobe tpm_vtpm_proxy || exit 90",
        f"cd {shlex.quote(str(root))} || exit 92",
        f"{shlex.quote(str(python))} -m bench.guest_bench {shlex.quote(str(rwdir))}"
        f" >{shlex.quote(str(rwdir / 'guest.log'))} 2>&1",
        "rc=$?",
        f"tail -n 30 {shlex.quote(str(rwdir / 'guest.log'))}",
        "exit $rc",
        "",
    ])
    try:
        result = run_in_guest(script, BOOT_TIMEOUT, rwdir)
    except GuestUnavailable as e:
        return [{"workload": "(all)", "system": "(guest)", "note": f"skipped: {e}"}]
    out = rwdir / GUEST_RESULTS
    if not out.exists():
        raise RuntimeError(f"the guest wrote no results (exit {result.returncode}, "
                           f"{result.duration:.0f} s):\n{result.output[-3000:]}")
    rows: list[dict[str, Any]] = json.loads(out.read_text())
    rows.append({"workload": "(boot)", "system": "(guest)",
                 "note": f"guest boot + run {result.duration:.0f} s, exit {result.returncode}"})
    return rows


# --- guest side -----------------------------------------------------------------------------


def _kernel_node(state: Path) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen(
        ["swtpm", "chardev", "--vtpm-proxy", "--tpm2", "--tpmstate", f"dir={state}",
         "--flags", "startup-clear"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    assert proc.stdout is not None
    seen = ""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + 60
    while (match := re.search(r"New TPM device: /dev/tpm(\d+)", seen)) is None:
        if time.monotonic() > deadline or not sel.select(deadline - time.monotonic()):
            raise RuntimeError(f"swtpm --vtpm-proxy made no device: {seen}")
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"swtpm --vtpm-proxy exited: {seen}")
        seen += line.decode(errors="replace")
    node = f"/dev/tpmrm{match.group(1)}"
    _wait_for(lambda: os.path.exists(node), 60, node)
    return proc, node


def _cuse_node(tmp: Path, port: int) -> subprocess.Popen[bytes]:
    log = tmp / "serve.log"
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cusetpm", "serve", "--backend",
             f"swtpm:tcp:127.0.0.1:{port}", "--name", CUSE_NAME, "--log-level", "WARNING"],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
        )
    _wait_for(lambda: b"cusetpm: serving" in log.read_bytes() or proc.poll() is not None,
              180, "cusetpm serve")
    if proc.poll() is not None:
        raise RuntimeError(f"cusetpm serve exited {proc.returncode}: {log.read_text()}")
    return proc


def _wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not there after {timeout:.0f} s")
        time.sleep(0.05)


def main(rwdir: Path, seconds: float = 1.0, rounds: int = 2) -> int:
    from bench.compare import measure, percentile
    from bench.systems import FileClient, stop
    from bench.workloads import COMPARE_WORKLOADS
    from cusetpm.backends.swtpm import SwtpmProcess

    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="guest-bench-"))
    (tmp / "kernel").mkdir()
    kernel_proc, kernel_node = _kernel_node(tmp / "kernel")
    print(f"[guest-bench] kernel node {kernel_node} after {time.monotonic() - started:.0f} s",
          flush=True)
    rows: list[dict[str, Any]] = []
    with SwtpmProcess(tmp / "cusetpm-swtpm") as swtpm:
        swtpm.backend().close()  # Startup
        cuse = _cuse_node(tmp, swtpm.port)
        print(f"[guest-bench] CUSE node up after {time.monotonic() - started:.0f} s", flush=True)
        systems = {"kernel /dev/tpmrm0": kernel_node,
                   "cusetpm CUSE node": f"/dev/{CUSE_NAME}"}
        rates: dict[tuple[str, str], list[float]] = {}
        latencies: dict[tuple[str, str], list[int]] = {}
        try:
            for r in range(rounds):
                order = list(systems.items())
                if r % 2:
                    order.reverse()
                for workload in COMPARE_WORKLOADS:
                    for name, node in order:
                        client = FileClient(node)
                        try:
                            op = workload.prepare(client.transmit)
                            key = (workload.name, name)
                            rate, _ = measure(op, seconds, latencies.setdefault(key, []))
                            rates.setdefault(key, []).append(rate)
                        finally:
                            client.close()
                print(f"[guest-bench] round {r + 1} done after "
                      f"{time.monotonic() - started:.0f} s", flush=True)
        finally:
            stop(cuse)
            stop(kernel_proc)
    for workload in COMPARE_WORKLOADS:
        kernel = statistics.median(rates[(workload.name, "kernel /dev/tpmrm0")])
        for name in systems:
            key = (workload.name, name)
            rate = statistics.median(rates[key])
            rows.append({
                "workload": workload.name, "system": name, "cmds/s": round(rate),
                "x kernel": round(rate / kernel, 2),
                "p50 us": round(percentile(latencies[key], 0.5), 1),
                "p99 us": round(percentile(latencies[key], 0.99), 1),
            })
    (rwdir / GUEST_RESULTS).write_text(json.dumps(rows, indent=1))
    print(f"[guest-bench] done after {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))

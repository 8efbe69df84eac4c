"""In the guest: the kernel's /dev/tpmrmN and cusetpm's device backend on one delayed chip.

One boot of the guest kernel (tests/vm/harness.py). There, `bench.vtpm_forwarder` makes a
kernel TPM chip (/dev/tpmN, /dev/tpmrmN) whose commands it counts, delays and forwards to a
`swtpm socket`. On that one chip, one after another: the chip directly (/dev/tpmN, the
limit), the kernel's resource manager (/dev/tpmrmN), and `cusetpm serve --backend
device:/dev/tpmN` over CUSE in eager and in resident mode. First a counting pass with no
delay (1 and 8 clients: the kernel's real count, where the host section has a model), then
a timed pass with the delay. The guest runs under TCG, so compare its rows with each other.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TITLE = "Guest: the kernel's /dev/tpmrmN and cusetpm on one kernel TPM chip (vtpm-proxy, delayed)"
RESULTS_FILE = "roundtrip/latest.md"

GUEST_RESULTS = "guest-slowtpm.json"
BOOT_TIMEOUT = 900.0
CHIP = "TPM chip directly (/dev/tpmN)"
KERNEL = "kernel /dev/tpmrmN"
EAGER = "cusetpm eager (device backend)"
RESIDENT = "cusetpm resident (device backend)"
TARGETED = {"ReadPublic", "HMAC sess.", "PolicyPCR", "Sign"}


def notes() -> str:
    from bench.slowtpm import delay_ms

    return f"""\
- One qemu boot (TCG, no KVM): Python there is 10-40x slower than on the host, so these
  rows compare with each other only. The chip: tpm_vtpm_proxy served by a user-space
  forwarder (bench/vtpm_forwarder.py) to a `swtpm socket`, counting every TPM command and,
  in the timed pass, holding each {delay_ms():g} ms (a discrete TPM's round trip).
- counted: TPM commands at the chip per client command, no delay, after two warm-up rounds;
  8 clients interleaved, each with its own objects and session. /dev/tpmN takes one opener,
  so the chip directly has no 8-client row. The kernel's own commands between client
  commands (hwrng reads) would show up in its counts; the by-code breakdown shows what ran.
- timed: one client, cmds/s median of the rounds, the chip holding every command.
"""


NOTES = notes()


# --- host side ------------------------------------------------------------------------------


def run(quick: bool) -> list[dict[str, Any]]:
    if quick:
        return [{"workload": "(all)", "system": "(guest)",
                 "note": "skipped: --quick does not boot the guest kernel (make bench does)"}]
    from bench.slowtpm import delay_ms
    from tests.vm.harness import GuestUnavailable, guest_python, run_in_guest

    rwdir = Path(tempfile.mkdtemp(prefix="cusetpm-bench-guest-slow-"))
    python = guest_python()
    root = Path(__file__).resolve().parents[1]
    log = shlex.quote(str(rwdir / "guest.log"))
    script = "\n".join([
        "#!/bin/sh",
        f"export PATH={shlex.quote(str(python.parent))}:/usr/local/sbin:/usr/local/bin:"
        "/usr/sbin:/usr/bin:/sbin:/bin",
        "export PYTHONDONTWRITEBYTECODE=1",  # the tree is read-only in the guest
        "modprobe cuse && modprobe tpm_vtpm_proxy || exit 90",
        f"cd {shlex.quote(str(root))} || exit 92",
        f"{shlex.quote(str(python))} -m bench.guest_slowtpm {shlex.quote(str(rwdir))} "
        f"{delay_ms()} >{log} 2>&1",
        "rc=$?",
        f"tail -n 30 {log}",
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


class _ChipClient:
    """The chip directly: nobody cleans up after it, so close flushes what it left."""

    def __init__(self, path: str) -> None:
        from bench.systems import FileClient

        self.file = FileClient(path)
        self.transmit = self.file.transmit

    def close(self) -> None:
        from bench.workloads import flush_all

        flush_all(self.file.transmit)
        self.file.close()


@contextmanager
def _cusetpm(chip: str, mode: str, tmp: Path) -> Iterator[str]:
    from bench.systems import stop

    name = f"tpmrm-slow-{mode}"
    log = tmp / f"serve-{mode}.log"
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cusetpm", "serve", "--backend", f"device:{chip}",
             "--name", name, "--residency", mode, "--log-level", "WARNING"],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 300
        while b"cusetpm: serving" not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"cusetpm serve ({mode}): {log.read_text()[-2000:]}")
            time.sleep(0.1)
        node = f"/dev/{name}"
        while not os.path.exists(node):
            time.sleep(0.05)
        yield node
    finally:
        stop(proc)


class _Opener:
    """`running()`'s shape for bench.roundtrip.count: connect() opens a client."""

    def __init__(self, path: str, chip: bool) -> None:
        self.path, self.chip = path, chip

    def connect(self) -> Any:
        from bench.systems import FileClient

        return _ChipClient(self.path) if self.chip else FileClient(self.path)


def main(rwdir: Path, delay_ms: float, seconds: float = 1.0, rounds: int = 2) -> int:
    from bench.compare import measure, percentile
    from bench.forwarder import describe, since
    from bench.roundtrip import count
    from bench.systems import counting
    from bench.vtpm_forwarder import VtpmForwarder
    from bench.workloads import COMPARE_WORKLOADS
    from cusetpm.backends.swtpm import SwtpmProcess

    started = time.monotonic()

    def say(what: str) -> None:
        print(f"[guest-slowtpm] {what} after {time.monotonic() - started:.0f} s", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="guest-slowtpm-"))
    # The kernel's TPM hwrng would add its own GetRandom calls to the chip's count.
    with contextlib.suppress(OSError):
        Path("/sys/class/misc/hw_random/rng_current").write_text("none\n")
    counted: dict[tuple[str, int, str], Any] = {}
    rates: dict[tuple[str, str], list[float]] = {}
    latencies: dict[tuple[str, str], list[int]] = {}
    trips: dict[tuple[str, str], list[float]] = {}
    with SwtpmProcess(tmp / "swtpm") as swtpm:
        swtpm.backend().close()  # Startup(CLEAR) before the kernel sees the chip
        chip = VtpmForwarder(swtpm.port)
        try:
            chip.wait_ready()
            say(f"chip {chip.chip}, {chip.rm}")
            idle_before = chip.tally.snapshot()
            time.sleep(2.0)
            idle, idle_cc = since(chip.tally, idle_before)

            @contextmanager
            def system(label: str) -> Iterator[_Opener]:
                if label == CHIP:
                    yield _Opener(chip.chip, chip=True)
                elif label == KERNEL:
                    yield _Opener(chip.rm, chip=False)
                else:
                    mode = "eager" if label == EAGER else "resident"
                    with _cusetpm(chip.chip, mode, tmp) as node:
                        yield _Opener(node, chip=False)

            labels = [CHIP, KERNEL, EAGER, RESIDENT]
            for r in range(rounds):
                for label in labels if r % 2 == 0 else labels[::-1]:
                    with system(label) as opener:
                        if r == 0:  # the counting pass, no delay
                            chip.delay = 0.0
                            for workload in COMPARE_WORKLOADS:
                                for clients in (1, 8):
                                    if label == CHIP and clients == 8:
                                        continue  # /dev/tpmN: one opener at a time
                                    counted[(workload.name, clients, label)] = count(
                                        opener, chip, workload, clients,
                                        12 if clients == 1 else 3)
                        chip.delay = delay_ms / 1000.0
                        for workload in COMPARE_WORKLOADS:
                            client = opener.connect()
                            try:
                                sent = [0]
                                op = workload.prepare(counting(client.transmit, sent))
                                key = (workload.name, label)
                                sent_before, before = sent[0], chip.tally.snapshot()
                                rate, _ = measure(op, seconds, latencies.setdefault(key, []))
                                n, _ = since(chip.tally, before)
                                rates.setdefault(key, []).append(rate)
                                trips.setdefault(key, []).append(n / (sent[0] - sent_before))
                            finally:
                                client.close()
                    say(f"round {r + 1}: {label}")
        finally:
            chip.close()

    rows: list[dict[str, Any]] = []
    for workload in COMPARE_WORKLOADS:
        median = {label: statistics.median(rates[(workload.name, label)])
                  for label in (CHIP, KERNEL, EAGER, RESIDENT)}
        for label, rate in median.items():
            key = (workload.name, label)
            one = counted.get((workload.name, 1, label))
            eight = counted.get((workload.name, 8, label))
            row: dict[str, Any] = {
                "workload": workload.name, "system": label,
                "TPM cmds per client cmd": one.show() if one else "n/a",
                "8 clients": eight.show() if eight else "n/a",
                "sends (1 client)": describe(one.by_cc, one.per) if one and one.ratio else "",
                f"cmds/s at {delay_ms:g} ms": round(rate, 1),
                "x direct": round(rate / median[CHIP], 3),
                "x kernel": round(rate / median[KERNEL], 2),
                "TPM cmds (timed)": round(statistics.median(trips[key]), 2),
                "p50 ms": round(percentile(latencies[key], 0.5) / 1000, 2),
            }
            if label in (EAGER, RESIDENT) and workload.short in TARGETED:
                met = rate >= 0.9 * median[CHIP] and rate >= 2.5 * median[KERNEL]
                row["target"] = ">= 0.9x direct, >= 2.5x kernel"
                row["met"] = "yes" if met else "no"
            rows.append(row)
    rows.append({"workload": "(idle 2 s)", "system": "the kernel's own commands",
                 "TPM cmds per client cmd": f"{idle}" + (f" ({describe(idle_cc, 1)})"
                                                          if idle else "")})
    (rwdir / GUEST_RESULTS).write_text(json.dumps(rows, indent=1))
    say("done")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), float(sys.argv[2])))

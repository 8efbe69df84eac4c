"""A slow TPM: every system on one swtpm behind a forwarder that adds a fixed delay per command.

The delay (3 ms by default; CUSETPM_BENCH_TPM_DELAY_MS or `python -m bench --tpm-delay-ms`)
stands for a discrete TPM's round trip. swtpm answers in tens of microseconds, which hides
what a resource manager's extra context loads and saves cost on a chip; with the delay in
front, a system's time per client command is close to (TPM commands it sends) x (delay).

Host systems, in rounds with rotating order: the TPM directly, the cusetpm node (eager and
resident), tpm2-abrmd. The kernel's /dev/tpmrm0 is a model on the host: its first command
costs what the direct client's costs, each further one (a ContextLoad / ContextSave /
FlushContext) what the direct client's GetRandom costs, the smallest delayed round trip;
that is generous to the kernel (a context load costs swtpm more than GetRandom, and the
kernel's own work is left out). bench.guest_slowtpm runs the real kernel on the same delay.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.compare import measure, percentile
from bench.forwarder import Forwarder, since
from bench.roundtrip import ABRMD, DIRECT, EAGER, RESIDENT, host_systems
from bench.systems import System, counting, swtpm
from bench.workloads import COMPARE_WORKLOADS

TITLE = "Slow TPM: a fixed delay per TPM command, the same for every system"
RESULTS_FILE = "roundtrip/latest.md"

ENV_DELAY = "CUSETPM_BENCH_TPM_DELAY_MS"
DEFAULT_DELAY_MS = 3.0
KERNEL = "kernel /dev/tpmrm0 (model)"
# The workloads the target names: ReadPublic and those on a session.
TARGETED = {"ReadPublic", "HMAC sess.", "PolicyPCR", "Sign"}


def delay_ms() -> float:
    return float(os.environ.get(ENV_DELAY, DEFAULT_DELAY_MS))


def notes() -> str:
    return f"""\
- A forwarder in front of swtpm (bench/forwarder.py) holds every TPM command
  {delay_ms():g} ms before passing it on: it stands for a discrete TPM's round trip. Every
  system of the run sits behind the same forwarder.
- cmds/s: client commands per second, median of the rounds; p50/p99 per command, pooled.
  TPM cmds per client cmd: counted at the forwarder during the timed loop.
- kernel (model): 1 direct command + (kernel's TPM commands - 1) x the direct GetRandom's
  time (a delayed round trip); generous to the kernel. The real kernel on a delayed chip is
  in the guest section (bench.guest_slowtpm), when it ran.
- Target (issue 10): ReadPublic and the session workloads through the node >= 0.9x the TPM
  directly and >= 2.5x the kernel.
"""


NOTES = notes()


@dataclass
class Samples:
    rates: list[float] = field(default_factory=list)
    latencies_ns: list[int] = field(default_factory=list)
    trips: list[float] = field(default_factory=list)


def _round(label: str, system: System, forwarder: Forwarder, seconds: float,
           samples: dict[tuple[str, str], Samples]) -> None:
    with system.running(forwarder.port) as running:
        for workload in COMPARE_WORKLOADS:
            client = running.connect()
            try:
                sent = [0]
                op = workload.prepare(counting(client.transmit, sent))
                sample = samples.setdefault((workload.name, label), Samples())
                sent_before, before = sent[0], forwarder.tally.snapshot()
                rate, _ = measure(op, seconds, sample.latencies_ns)
                n, _ = since(forwarder.tally, before)
                sample.rates.append(rate)
                # measure()'s 3 warm-up commands are in both counts
                sample.trips.append(n / max(1, sent[0] - sent_before))
            finally:
                client.close()


def run(quick: bool) -> list[dict[str, Any]]:
    seconds, rounds = (0.3, 1) if quick else (1.5, 2)
    delay = delay_ms() / 1000.0
    samples: dict[tuple[str, str], Samples] = {}
    with tempfile.TemporaryDirectory(prefix="cusetpm-bench-slowtpm-") as tmp_name:
        tmp = Path(tmp_name)
        systems, skipped, bus = host_systems(tmp)
        try:
            with swtpm(tmp) as proc, Forwarder(proc.port, delay) as forwarder:
                for r in range(rounds):
                    turn = r % len(systems)
                    for label, system in systems[turn:] + systems[:turn]:
                        _round(label, system, forwarder, seconds, samples)
        finally:
            if bus is not None:
                bus.close()
    return rows(samples, skipped)


def rows(samples: dict[tuple[str, str], Samples], skipped: dict[str, str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    median = {key: statistics.median(s.rates) for key, s in samples.items() if s.rates}
    small = median.get((COMPARE_WORKLOADS[0].name, DIRECT))  # GetRandom: one delayed trip
    for workload in COMPARE_WORKLOADS:
        direct = median.get((workload.name, DIRECT))
        kernel = None
        if direct and small:
            kernel = 1 / (1 / direct + (workload.kernel_round_trips - 1) / small)
        for label in (DIRECT, EAGER, RESIDENT, ABRMD):
            sample = samples.get((workload.name, label))
            if sample is None or not sample.rates:
                if label in skipped:
                    out.append({"workload": workload.name, "system": label,
                                "note": f"skipped: {skipped[label]}"})
                continue
            rate = median[(workload.name, label)]
            row: dict[str, Any] = {
                "workload": workload.name, "system": label, "cmds/s": round(rate, 1),
                "x direct": round(rate / direct, 3) if direct else None,
                "x kernel (model)": round(rate / kernel, 2) if kernel else None,
                "TPM cmds per client cmd": round(statistics.median(sample.trips), 2),
                "p50 ms": round(percentile(sample.latencies_ns, 0.5) / 1000, 2),
                "p99 ms": round(percentile(sample.latencies_ns, 0.99) / 1000, 2),
            }
            if label in (EAGER, RESIDENT) and workload.short in TARGETED:
                met = (direct is not None and kernel is not None
                       and rate >= 0.9 * direct and rate >= 2.5 * kernel)
                row["target"] = ">= 0.9x direct, >= 2.5x kernel"
                row["met"] = "yes" if met else "no"
            out.append(row)
        if kernel:
            out.append({"workload": workload.name, "system": KERNEL,
                        "cmds/s": round(kernel, 1), "x direct": round(kernel / direct, 3)
                        if direct else None, "x kernel (model)": 1.0,
                        "TPM cmds per client cmd": round(workload.kernel_round_trips, 2)})
    return out

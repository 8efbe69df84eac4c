"""Side by side on one swtpm: the TPM directly, cusetpm in process, the cusetpm node, tpm2-abrmd.

Every system gets the same client operations (bench.workloads.COMPARE_WORKLOADS) with the
same command bytes. swtpm serves one connection at a time and abrmd and the node each keep
one open, so the systems take turns holding the swtpm (bench.systems): in each round every
system in turn is started, runs every workload, and is stopped; the order rotates from
round to round. Throughput is the median over the rounds; latencies are per command, pooled
over the rounds.

TPM round trips per client command are counted at the backend: by the RM itself in
process, and for the node and abrmd by a counting TCP proxy in front of swtpm, in a separate
untimed pass. The kernel's column is the count its resource manager spends by design (it
loads every object and session of the space before each command and saves them after).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.systems import (
    Abrmd,
    CountingProxy,
    Direct,
    FuseNode,
    InProcess,
    SessionBus,
    System,
    abrmd_unavailable,
    fuse_unavailable,
    swtpm,
)
from bench.workloads import COMPARE_WORKLOADS, check

TITLE = "Side by side on one swtpm: direct, cusetpm (in process, node), tpm2-abrmd"

NOTES = """\
- One `swtpm socket` process behind every system; the systems take turns holding it
  (swtpm serves one connection at a time), in rounds with rotating order.
- direct: raw TCP to swtpm, objects and sessions stay loaded (the limit). RM in process:
  `ResourceManager` over `SwtpmBackend`, called from this thread. cusetpm node: `cusetpm serve
  --backend swtpm:tcp:... --fuse-mount DIR`, one `os.write` + `os.read` per command on
  DIR/tpmrm0. tpm2-abrmd: 3.0 on a private session bus, raw bytes through the tabrmd TCTI
  (tpm2-pytss `TCTILdr.transmit/receive`).
- cmds/s: median of the rounds; p50/p99: per command, pooled. xabrmd > 1 means faster than abrmd.
- TPM cmds per client cmd: counted at the backend (the RM's own count in process; a counting
  TCP proxy in front of swtpm for the node and abrmd, untimed pass). kernel (model): what
  the kernel's RM spends by design, 1 + load + save + flush per object, load + save per session.
- Churn counts each of Create, Load, FlushContext as one command. ECC Create on libtpms
  answers TPM_RC_RETRY about once in 60: clients resend at once, an RM retries after its own
  delay (the kernel's: 20 ms), which shows in that row's p99.
"""


@dataclass
class Samples:
    rates: list[float] = field(default_factory=list)
    latencies_ns: list[int] = field(default_factory=list)
    trips: list[float] = field(default_factory=list)


def measure(op: Any, seconds: float, latencies: list[int]) -> tuple[float, int]:
    """Run op() for about `seconds`, recording each command's latency: (cmds/s, count)."""
    for _ in range(3):  # warm up: first swaps, caches
        check(op())
    clock = time.perf_counter_ns
    start = clock()
    deadline = start + int(seconds * 1e9)
    n = 0
    before = start
    while before < deadline:
        op()
        after = clock()
        latencies.append(after - before)
        before = after
        n += 1
    return n / ((before - start) / 1e9), n


def percentile(values: list[int], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] / 1000.0


def _timed_round(system: System, port: int, seconds: float,
                 samples: dict[tuple[str, str], Samples]) -> None:
    with system.running(port) as running:
        for workload in COMPARE_WORKLOADS:
            client = running.connect()
            try:
                op = workload.prepare(client.transmit)
                trips = running.rm.round_trips if running.rm else 0
                sample = samples.setdefault((workload.name, system.name), Samples())
                rate, n = measure(op, seconds, sample.latencies_ns)
                sample.rates.append(rate)
                if running.rm is not None:
                    sample.trips.append((running.rm.round_trips - trips) / n)
            finally:
                client.close()


def _counted_pass(system: System, swtpm_port: int, ops: int,
                  samples: dict[tuple[str, str], Samples]) -> None:
    proxy = CountingProxy(swtpm_port)
    try:
        with system.running(proxy.port) as running:
            for workload in COMPARE_WORKLOADS:
                client = running.connect()
                try:
                    op = workload.prepare(client.transmit)
                    check(op())
                    before = proxy.commands
                    for _ in range(ops):
                        op()
                    samples.setdefault((workload.name, system.name), Samples()).trips.append(
                        (proxy.commands - before) / ops)
                finally:
                    client.close()
    finally:
        proxy.close()


def _rows(systems: list[System], samples: dict[tuple[str, str], Samples],
          skipped: dict[str, str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    names = {s.name for s in systems}
    for workload in COMPARE_WORKLOADS:
        rates = {
            name: statistics.median(samples[(workload.name, name)].rates)
            for name in names if samples.get((workload.name, name), Samples()).rates
        }
        direct = rates.get(Direct.name)
        abrmd = rates.get("tpm2-abrmd")
        for system in systems:
            sample = samples.get((workload.name, system.name))
            if sample is None or not sample.rates:
                continue
            rate = rates[system.name]
            trips = 1.0 if system.name == Direct.name else (
                statistics.median(sample.trips) if sample.trips else None)
            rows.append({
                "workload": workload.name,
                "system": system.name,
                "cmds/s": round(rate),
                "x direct": round(rate / direct, 3) if direct else None,
                "x abrmd": round(rate / abrmd, 2) if abrmd else None,
                "p50 us": round(percentile(sample.latencies_ns, 0.50), 1),
                "p99 us": round(percentile(sample.latencies_ns, 0.99), 1),
                "TPM cmds per client cmd": None if trips is None else round(trips, 2),
            })
        rows.append({"workload": workload.name, "system": "kernel /dev/tpmrm0 (model, not run)",
                     "TPM cmds per client cmd": round(workload.kernel_round_trips, 2)})
    for name, why in skipped.items():
        rows.append({"workload": "(all)", "system": name, "note": f"skipped: {why}"})
    return rows


def run(quick: bool) -> list[dict[str, Any]]:
    seconds, rounds, counted_ops = (0.12, 1, 30) if quick else (0.8, 3, 150)
    with tempfile.TemporaryDirectory(prefix="cusetpm-bench-compare-") as tmp_name:
        tmp = Path(tmp_name)
        systems: list[System] = [Direct(), InProcess()]
        skipped: dict[str, str] = {}
        if (why := fuse_unavailable()) is None:
            systems.append(FuseNode(tmp))
        else:
            skipped[FuseNode.name] = why
        bus = None
        if (why := abrmd_unavailable()) is None:
            bus = SessionBus()
            systems.append(Abrmd(bus, tmp))
        else:
            skipped[Abrmd.name] = why
        samples: dict[tuple[str, str], Samples] = {}
        try:
            with swtpm(tmp) as proc:
                for r in range(rounds):
                    turn = r % len(systems)
                    for system in systems[turn:] + systems[:turn]:
                        _timed_round(system, proc.port, seconds, samples)
                for system in systems:
                    if isinstance(system, FuseNode | Abrmd):
                        _counted_pass(system, proc.port, counted_ops, samples)
        finally:
            if bus is not None:
                bus.close()
        return _rows(systems, samples, skipped)

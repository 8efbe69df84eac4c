"""Scale on one swtpm: many open descriptors, concurrent clients, session exhaustion, regapping.

The same systems as bench.compare (each holding the swtpm in turn, see bench.systems), minus
the direct client, which is one connection and cannot have several clients at all.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.compare import percentile
from bench.systems import (
    ABRMD_MAX_CONNECTIONS,
    Abrmd,
    Client,
    Direct,
    FuseNode,
    InProcess,
    Running,
    SessionBus,
    System,
    abrmd_unavailable,
    fuse_unavailable,
    raise_fd_limit,
    rss_kib,
    swtpm,
)
from bench.workloads import (
    COMPARE_WORKLOADS,
    Op,
    check,
    create_primary_public,
    flush_all,
    load_external_public,
    load_object,
    policy_pcr,
    policy_signing_template,
    start_session,
)
from cusetpm.rm import RMConfig
from cusetpm.tpm import commands as build
from cusetpm.tpm.constants import TPM_PT, TPM_SE

TITLE = "Scale: open descriptors, concurrent clients, session exhaustion, regapping"

NOTES = """\
- open descriptors: N clients each LoadExternal three public ECC keys (3 objects per space),
  then ReadPublic round robin over all N (every command swaps that space's object in).
  Memory per space = RSS growth of the serving process / N (in process: this process).
  tpm2-abrmd accepts at most 100 connections. The kernel's per-space memory is kernel memory,
  not visible from user space: not measured.
- concurrent clients: one thread per client, each with its own descriptor/space/connection;
  client threads share this Python process (and the machine's cores with the daemon).
- session wait: 2 x TPM_PT_ACTIVE_SESSIONS_MAX clients each loop StartAuthSession, PolicyPCR,
  FlushContext; the wait is StartAuthSession's latency as the client sees it.
- regap: one space keeps an idle policy session while another runs PolicyPCR on its own; every
  command saves a session, so the idle one falls behind and the RM refreshes it.
"""


def _systems(tmp: Path, bus: SessionBus | None) -> tuple[list[System], list[dict[str, Any]]]:
    systems: list[System] = [InProcess()]
    notes: list[dict[str, Any]] = []
    if (why := fuse_unavailable()) is None:
        systems.append(FuseNode(tmp, ["--max-spaces", "2048"]))
    else:
        notes.append({"test": "(all)", "system": FuseNode.name, "note": f"skipped: {why}"})
    if bus is not None:
        systems.append(Abrmd(bus, tmp))
    else:
        notes.append({"test": "(all)", "system": Abrmd.name,
                      "note": f"skipped: {abrmd_unavailable()}"})
    return systems, notes


def _signing_public(port: int) -> bytes:
    """An ECC public area to LoadExternal: made once by a direct CreatePrimary."""
    with Direct().running(port) as running:
        client = running.connect()
        _, public = create_primary_public(client.transmit, policy_signing_template(99))
        client.close()
    return public


def _open_descriptors(system: System, running: Running, count: int, public: bytes,
                      seconds: float) -> dict[str, Any]:
    pid = running.pid
    clients: list[Client] = []
    handles: list[int] = []
    rss0 = rss_kib(pid)
    start = time.perf_counter()
    try:
        load = load_external_public(public)
        for _ in range(count):
            client = running.connect()
            clients.append(client)
            handles.append([load_object(client.transmit, load) for _ in range(3)][-1])
        fill = time.perf_counter() - start
        rss1 = rss_kib(pid)
        latencies: list[int] = []
        n = 0
        reads = [build.read_public(h) for h in handles]
        clock = time.perf_counter_ns
        begin = before = clock()
        deadline = begin + int(seconds * 1e9)
        trips1 = running.rm.round_trips if running.rm else 0
        while before < deadline:
            i = n % count
            check(clients[i].transmit(reads[i]))
            after = clock()
            latencies.append(after - before)
            before = after
            n += 1
        rate = n / ((before - begin) / 1e9)
        trips = (running.rm.round_trips - trips1) / n if running.rm else None
    finally:
        for client in clients:
            client.close()
    return {
        "test": f"{count:,} open descriptors x 3 objects",
        "system": system.name,
        "clients": count,
        "cmds/s": round(rate),
        "p50 us": round(percentile(latencies, 0.5), 1),
        "p99 us": round(percentile(latencies, 0.99), 1),
        "max ms": round(max(latencies) / 1e6, 1),
        "KiB per space": round((rss1 - rss0) / count, 2),
        "TPM cmds per client cmd": None if trips is None else round(trips, 2),
        "note": f"ReadPublic round robin; opening and loading took {fill:.2f} s",
    }


def _concurrent(system: System, running: Running, clients: int, prepare: Callable[[Any], Op],
                label: str, seconds: float) -> dict[str, Any]:
    """`clients` threads, each its own client, all running `prepare`'s op for `seconds`."""
    ready = threading.Barrier(clients + 1)
    counts = [0] * clients
    latencies: list[list[int]] = [[] for _ in range(clients)]
    errors: list[str] = []

    def worker(i: int) -> None:
        client = None
        try:
            client = running.connect()
            op = prepare(client.transmit)
            ready.wait()
            # Each thread times its own `seconds` from the common start: no shared deadline
            # to race on.
            clock = time.perf_counter_ns
            before = clock()
            deadline = before + int(seconds * 1e9)
            mine = latencies[i]
            while before < deadline:
                op()
                after = clock()
                mine.append(after - before)
                before = after
                counts[i] += 1
        except Exception as e:  # a benchmark reports, it does not stop
            errors.append(f"{type(e).__name__}: {e}")
            if ready.n_waiting < clients + 1:
                ready.abort()
        finally:
            if client is not None:
                client.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        ready.wait(timeout=120)
    for t in threads:
        t.join()
    elapsed = seconds
    pooled = [x for lat in latencies for x in lat]
    row: dict[str, Any] = {
        "test": f"{label}, {clients} concurrent clients",
        "system": system.name,
        "clients": clients,
        "cmds/s": round(sum(counts) / elapsed),
    }
    if pooled:
        row["p50 us"] = round(percentile(pooled, 0.5), 1)
        row["p99 us"] = round(percentile(pooled, 0.99), 1)
        row["max ms"] = round(max(pooled) / 1e6, 1)
    if errors:
        row["note"] = f"{len(errors)} clients failed, first: {errors[0]}"
    return row


def _session_wait(system: System, running: Running, clients: int,
                  seconds: float) -> dict[str, Any]:
    """StartAuthSession latency with `clients` threads fighting over the TPM's sessions."""
    waits: list[list[int]] = [[] for _ in range(clients)]

    def prepare_for(i: int) -> Callable[[Any], Op]:
        def prepare(transmit: Any) -> Op:
            def cycle() -> bytes:
                t0 = time.perf_counter_ns()
                handle = start_session(transmit, TPM_SE.POLICY)
                waits[i].append(time.perf_counter_ns() - t0)
                check(transmit(policy_pcr(handle)))
                return transmit(build.flush_context(handle))
            return cycle
        return prepare

    # One prepare per client index: _concurrent calls prepare from thread i in order of start.
    index = iter(range(clients))
    lock = threading.Lock()

    def prepare(transmit: Any) -> Op:
        with lock:
            i = next(index)
        return prepare_for(i)(transmit)

    stats0 = None
    if running.rm is not None:
        stats0 = dict(vars(running.rm.wait_stats))
    row = _concurrent(system, running, clients, prepare,
                      "session wait: StartAuthSession/PolicyPCR/Flush", seconds)
    pooled = sorted(x for w in waits for x in w)
    row["cmds/s"] = round(row["cmds/s"] * 3)  # each cycle is three commands
    row.pop("p50 us", None)
    row.pop("p99 us", None)
    if pooled:
        row["p50 us"] = round(statistics.median(pooled) / 1e3, 1)
        row["p99 us"] = round(percentile(pooled, 0.99), 1)
        row["max ms"] = round(pooled[-1] / 1e6, 1)
    notes = ["latencies: StartAuthSession (the wait for a session)"]
    if running.rm is not None and stats0 is not None:
        stats = vars(running.rm.wait_stats)
        counts = "/".join(str(stats[k] - stats0[k]) for k in ("waited", "evictions", "refused"))
        notes.append(f"rm.wait_stats waited/evicted/refused {counts}, "
                     f"max wait {stats['max_wait'] * 1000:.1f} ms")
    row["note"] = "; ".join(notes + ([row["note"]] if "note" in row else []))
    return row


def _regap(port: int, window: int | None, commands: int) -> dict[str, Any]:
    system = InProcess(RMConfig(context_gap_window=window) if window else None)
    with system.running(port) as running:
        rm = running.rm
        assert rm is not None and rm.regapper is not None
        idle = running.connect()
        busy = running.connect()
        try:
            start_session(idle.transmit, TPM_SE.POLICY)  # saved and never used again
            command = policy_pcr(start_session(busy.transmit, TPM_SE.POLICY))
            refreshes, trips = rm.regapper.refreshes, rm.round_trips
            start = time.perf_counter()
            for _ in range(commands):
                busy.transmit(command)
            elapsed = time.perf_counter() - start
            return {
                "test": f"regap, PolicyPCR beside an idle session, window {rm.regapper.window:,}",
                "system": system.name,
                "cmds/s": round(commands / elapsed),
                "TPM cmds per client cmd": round((rm.round_trips - trips) / commands, 3),
                "note": f"{commands:,} commands, "
                        f"{rm.regapper.refreshes - refreshes} regap refreshes",
            }
        finally:
            idle.close()
            busy.close()


def run(quick: bool) -> list[dict[str, Any]]:
    descriptors = 100 if quick else 1000
    seconds = 0.2 if quick else 1.0
    raise_fd_limit()
    rows: list[dict[str, Any]] = []
    by_name = {w.short: w for w in COMPARE_WORKLOADS}
    with tempfile.TemporaryDirectory(prefix="cusetpm-bench-scale-") as tmp_name:
        tmp = Path(tmp_name)
        bus = SessionBus() if abrmd_unavailable() is None else None
        try:
            with swtpm(tmp) as proc:
                public = _signing_public(proc.port)
                systems, notes = _systems(tmp, bus)
                active_max = 64
                for system in systems:
                    try:
                        with system.running(proc.port) as running:
                            if running.rm is not None:
                                active_max = running.rm.properties.get(
                                    TPM_PT.ACTIVE_SESSIONS_MAX, active_max)
                            count = descriptors
                            if isinstance(system, Abrmd):
                                count = min(count, ABRMD_MAX_CONNECTIONS - 1)
                            rows.append(_open_descriptors(system, running, count, public, seconds))
                            for clients in (8,) if quick else (8, 64):
                                for short in ("GetRandom", "PolicyPCR"):
                                    rows.append(_concurrent(system, running, clients,
                                                            by_name[short].prepare,
                                                            by_name[short].name, seconds))
                            if quick and not isinstance(system, InProcess):
                                rows.append({"test": "session wait", "system": system.name,
                                             "note": "skipped in --quick (refused waiters take "
                                             "up to the RM's wait bound to come back)"})
                            elif isinstance(system, Abrmd):
                                rows.append({"test": "session wait", "system": system.name,
                                             "note": f"skipped: {2 * active_max} clients exceed "
                                             f"abrmd's {ABRMD_MAX_CONNECTIONS} connections"})
                            else:
                                rows.append(_session_wait(system, running, 2 * active_max,
                                                          seconds * 2))
                    except Exception as exc:  # one system failing must not lose the others' rows
                        rows.append({"test": "all", "system": system.name,
                                     "note": f"failed: {type(exc).__name__}: {exc}"})

                with Direct().running(proc.port) as running:
                    flush_all(running.connect().transmit)
                commands = 3000 if quick else 20000
                rows.append(_regap(proc.port, None, commands))
                rows.append(_regap(proc.port, 256, commands))
                rows += notes
        finally:
            if bus is not None:
                bus.close()
    return rows

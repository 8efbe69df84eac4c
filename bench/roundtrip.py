"""TPM commands per client command, counted at the backend, for every system and workload.

On a hardware TPM every command costs milliseconds, so what a resource manager costs there
is how many TPM commands it sends per client command. Each host system runs on one swtpm
behind a counting `bench.forwarder.Forwarder`; the clients' own commands are counted as they
are sent, and the ratio is taken over a loop after two warm-up rounds (so a context cached or
left resident by the first command counts as it would in steady use).

Systems: the TPM directly (the limit, 1), the cusetpm node (FUSE mount) with `--residency
eager` and `--residency resident`, tpm2-abrmd, and the kernel's /dev/tpmrm0 as a model of
its tpm2-space.c (every object and session of the space is loaded before each command and
saved after: 1 + 3 per object + 2 per session), or counted in the guest by bench.guest_slowtpm.

Single client, and 8 clients interleaved command by command, each with its own objects and
session: 8 keys (24 for Sign) and 8 sessions, more than the 3 object and 3 session slots
of libtpms, so a resident RM has to evict.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bench.forwarder import Forwarder, Tally, describe, since
from bench.systems import (
    Abrmd,
    Client,
    Direct,
    FuseNode,
    SessionBus,
    System,
    abrmd_unavailable,
    counting,
    fuse_unavailable,
    swtpm,
)
from bench.workloads import COMPARE_WORKLOADS, CompareWorkload, check
from cusetpm.tpm.rc import rc_name

TITLE = "TPM commands per client command, counted at the backend"
RESULTS_FILE = "roundtrip/latest.md"

DIRECT = "TPM directly"
EAGER = "cusetpm eager"
RESIDENT = "cusetpm resident"
ABRMD = "tpm2-abrmd"
KERNEL = "kernel (model)"

NOTES = """\
- Counted at a forwarder in front of swtpm (bench/forwarder.py): every TPM command any system
  sends, divided by the client commands sent in the same loop (after two warm-up rounds).
  direct: raw commands on the swtpm socket. cusetpm eager / resident: `cusetpm serve
  --fuse-mount DIR --residency eager|resident`, clients on DIR/tpmrm0. tpm2-abrmd 3.0 through
  the tabrmd TCTI. kernel (model): tpm2-space.c loads every object and session of the space
  before each command and saves them after (1 + 3 per object + 2 per session); the same with
  8 clients, since a space's cost does not depend on the others.
- 8 clients: interleaved one command each, each client with its own objects and session
  (8 primaries, 24 for Sign; 8 sessions): more than libtpms's 3 object and 3 session slots.
  The TPM directly cannot hold that; its cell says where it failed.
- Targets (issue 10): resident, 1 client: <= 1.05 on every workload but churn (<= 1.2),
  ReadPublic 0 (answered from the RM's copy); 8 clients: never more than eager.
- eager / resident sends: the TPM commands behind one client command, by command code.
"""


@dataclass
class Cell:
    """One count: TPM commands per client command, or why there is none."""

    ratio: float | None = None
    by_cc: Counter[int] = field(default_factory=Counter)
    per: int = 1
    note: str = ""

    def show(self) -> float | str:
        return round(self.ratio, 2) if self.ratio is not None else self.note


def host_systems(tmp: Path) -> tuple[list[tuple[str, System]], dict[str, str], SessionBus | None]:
    """(label, system) pairs for direct, cusetpm eager and resident, abrmd; what is skipped."""
    systems: list[tuple[str, System]] = [(DIRECT, Direct())]
    skipped: dict[str, str] = {}
    if (why := fuse_unavailable()) is None:
        for label, mode in ((EAGER, "eager"), (RESIDENT, "resident")):
            systems.append((label, FuseNode(tmp, ["--residency", mode],
                                            name=f"{label} (FUSE node)", short=label)))
    else:
        skipped[EAGER] = skipped[RESIDENT] = why
    bus = None
    if (why := abrmd_unavailable()) is None:
        bus = SessionBus()
        systems.append((ABRMD, Abrmd(bus, tmp)))
    else:
        skipped[ABRMD] = why
    return systems, skipped, bus


class Opener(Protocol):
    def connect(self) -> Client: ...


class Tallied(Protocol):
    tally: Tally


def count(running: Opener, forwarder: Tallied, workload: CompareWorkload, clients: int,
          rounds: int) -> Cell:
    """TPM commands per client command for `clients` interleaved clients of `workload`."""
    opened: list[Client] = []
    sent = [0]
    try:
        ops = []
        for i in range(clients):
            client = running.connect()
            opened.append(client)
            try:
                ops.append(workload.prepare(counting(client.transmit, sent)))
            except RuntimeError as e:
                raise RuntimeError(f"client {i + 1}'s setup: {_named_rc(str(e))}") from e
        for _ in range(2):  # warm up: first loads, the first ReadPublic
            for op in ops:
                check(op())
        sent[0] = 0
        before = forwarder.tally.snapshot()
        for _ in range(rounds):
            for op in ops:
                check(op())
        n, by_cc = since(forwarder.tally, before)
        return Cell(n / sent[0], by_cc, sent[0])
    except RuntimeError as e:
        return Cell(note=f"fails: {e}")
    finally:
        for client in opened:
            with contextlib.suppress(Exception):
                client.close()


def _named_rc(message: str) -> str:
    """'setup command failed: rc 0x00000902' -> 'TPM_RC_OBJECT_MEMORY'."""
    if (match := re.search(r"rc 0x([0-9a-f]{8})", message)) is None:
        return message
    return rc_name(int(match.group(1), 16))


@contextlib.contextmanager
def _swtpm_and_forwarder(tmp: Path, delay: float = 0.0) -> Iterator[Forwarder]:
    with swtpm(tmp) as proc, Forwarder(proc.port, delay) as forwarder:
        yield forwarder


def run(quick: bool) -> list[dict[str, Any]]:
    rounds = {1: 15 if quick else 60, 8: 3 if quick else 15}  # multiples of 3 (churn)
    cells: dict[tuple[str, int, str], Cell] = {}
    with tempfile.TemporaryDirectory(prefix="cusetpm-bench-roundtrip-") as tmp_name:
        tmp = Path(tmp_name)
        systems, skipped, bus = host_systems(tmp)
        try:
            with _swtpm_and_forwarder(tmp) as forwarder:
                for label, system in systems:
                    with system.running(forwarder.port) as running:
                        for workload in COMPARE_WORKLOADS:
                            for clients in (1, 8):
                                cells[(workload.name, clients, label)] = count(
                                    running, forwarder, workload, clients, rounds[clients])
        finally:
            if bus is not None:
                bus.close()
    return rows(cells, skipped)


def _target(workload: CompareWorkload, clients: int, eager: Cell | None,
            resident: Cell | None) -> tuple[str, str]:
    if clients == 8:
        target = "<= eager"
        if resident is None or resident.ratio is None or eager is None or eager.ratio is None:
            return target, "n/a"
        return target, "yes" if resident.ratio <= eager.ratio + 1e-9 else "no"
    limit = 0.0 if workload.short == "ReadPublic" else 1.2 if workload.short == "Churn" else 1.05
    target = "0 (cached)" if limit == 0 else f"<= {limit}"
    if resident is None or resident.ratio is None:
        return target, "n/a"
    return target, "yes" if resident.ratio <= limit + 1e-9 else "no"


def rows(cells: dict[tuple[str, int, str], Cell], skipped: dict[str, str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for workload in COMPARE_WORKLOADS:
        for clients in (1, 8):
            row: dict[str, Any] = {"workload": workload.name, "clients": clients}
            for label in (DIRECT, EAGER, RESIDENT, ABRMD):
                cell = cells.get((workload.name, clients, label))
                row[label] = cell.show() if cell else f"skipped: {skipped.get(label, '?')}"
            row[KERNEL] = round(workload.kernel_round_trips, 2)
            eager = cells.get((workload.name, clients, EAGER))
            resident = cells.get((workload.name, clients, RESIDENT))
            row["resident target"], row["met"] = _target(workload, clients, eager, resident)
            for label, cell in (("eager sends", eager), ("resident sends", resident)):
                row[label] = describe(cell.by_cc, cell.per) if cell and cell.ratio else ""
            out.append(row)
    return out

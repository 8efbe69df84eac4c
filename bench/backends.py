"""GetRandom(16) through each backend: the cost of reaching the TPM at all.

All backends are opened at once and measured in interleaved rounds, so a change
in machine load hits each of them alike; the ratio against libtpms is taken
within this one run.
"""

from __future__ import annotations

import shutil
import statistics
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from cusetpm.backends import Backend
from cusetpm.backends.libtpms import LibtpmsBackend
from cusetpm.backends.swtpm import SwtpmProcess

TITLE = "Backends: GetRandom(16) round trips"

GET_RANDOM_16 = struct.pack(">HIIH", 0x8001, 12, 0x17B, 16)


def _rate(transmit: Callable[[bytes], bytes], seconds: float) -> tuple[float, int]:
    """Commands per second over about `seconds`, checking time every 64 commands."""
    command = GET_RANDOM_16
    n = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(64):
            transmit(command)
        n += 64
        now = time.perf_counter()
        if now >= deadline:
            return n / (now - start), n


@contextmanager
def _backends(workdir: Path) -> Iterator[dict[str, Backend | str]]:
    """name -> open backend, or a string saying why it is missing."""
    with ExitStack() as stack:
        found: dict[str, Backend | str] = {}
        found["libtpms (in process)"] = stack.enter_context(LibtpmsBackend(workdir / "libtpms"))
        for transport in ("tcp", "unix"):
            label = f"swtpm {transport}"
            if shutil.which("swtpm") is None:
                found[label] = "swtpm not installed"
                continue
            proc = stack.enter_context(SwtpmProcess(workdir / transport, transport=transport))
            found[label] = stack.enter_context(proc.backend())
        yield found


def run(quick: bool) -> list[dict[str, Any]]:
    seconds, rounds = (0.2, 2) if quick else (1.0, 5)
    with tempfile.TemporaryDirectory(prefix="cusetpm-bench-") as tmp, \
            _backends(Path(tmp)) as found:
        rates: dict[str, list[float]] = {name: [] for name in found}
        counts: dict[str, int] = dict.fromkeys(found, 0)
        for backend in found.values():
            if not isinstance(backend, str):
                _rate(backend.transmit, 0.05)  # warm up: connections, caches
        for _ in range(rounds):
            for name, backend in found.items():
                if isinstance(backend, str):
                    continue
                rate, n = _rate(backend.transmit, seconds)
                rates[name].append(rate)
                counts[name] += n
        return _rows(found, rates, counts)


def _rows(found: dict[str, Backend | str], rates: dict[str, list[float]],
          counts: dict[str, int]) -> list[dict[str, Any]]:
    reference = statistics.median(rates["libtpms (in process)"])
    rows: list[dict[str, Any]] = []
    for name, backend in found.items():
        if isinstance(backend, str):
            rows.append({"backend": name, "note": f"skipped: {backend}"})
            continue
        median = statistics.median(rates[name])
        rows.append({
            "backend": name,
            "cmds/s (median)": round(median),
            "us/cmd": round(1e6 / median, 2),
            "min..max cmds/s": f"{min(rates[name]):,.0f}..{max(rates[name]):,.0f}",
            "vs libtpms": f"{median / reference:.3f}x",
            "commands": counts[name],
            "note": "",
        })
    return rows

"""The resource manager in process vs. libtpms alone: what the RM costs per command.

Same libtpms, same command bytes, measured in alternating rounds in one run. The direct
side keeps its objects and session loaded in the TPM (the limit: no swapping at all); the
RM side swaps them in and out of the TPM around every command, as it must.
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.workloads import WORKLOADS, Workload, rate
from cusetpm.backends.libtpms import LibtpmsBackend
from cusetpm.rm import ResourceManager
from cusetpm.tpm import commands as build
from cusetpm.tpm.constants import TPM_CAP, TPM_HT

TITLE = "Resource manager in process vs. libtpms alone"


def _flush_everything(backend: LibtpmsBackend) -> None:
    """Direct setups leave objects and sessions loaded: clear them between rounds."""
    for kind in (TPM_HT.TRANSIENT, TPM_HT.HMAC_SESSION, TPM_HT.POLICY_SESSION):
        _, data = build.parse_get_capability(
            backend.transmit(build.get_capability(TPM_CAP.HANDLES, kind << 24, 254))
        )
        for handle in data.handles:
            backend.transmit(build.flush_context(handle))


def _measure(
    workload: Workload, backend: LibtpmsBackend, rm: ResourceManager, seconds: float
) -> tuple[float, float, float]:
    """(direct cmds/s, RM cmds/s, RM round trips per command) for one round."""
    direct = workload.setup(backend.transmit)
    direct_rate, _ = rate(backend.transmit, direct, seconds)
    _flush_everything(backend)
    space = rm.open_space()
    try:
        send: Callable[[bytes], bytes] = lambda cmd: rm.transmit(space, cmd)  # noqa: E731
        command = workload.setup(send)
        trips = rm.round_trips
        rm_rate, n = rate(send, command, seconds)
        per_command = (rm.round_trips - trips) / (n + 1)
    finally:
        rm.close_space(space)
    return direct_rate, rm_rate, per_command


def run(quick: bool) -> list[dict[str, Any]]:
    seconds, rounds = (0.2, 2) if quick else (1.0, 5)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cusetpm-bench-rm-") as tmp:
        backend = LibtpmsBackend(Path(tmp) / "state")
        rm = ResourceManager(backend)
        rm.start()
        try:
            for workload in WORKLOADS:
                samples = [_measure(workload, backend, rm, seconds) for _ in range(rounds)]
                direct = statistics.median(s[0] for s in samples)
                managed = statistics.median(s[1] for s in samples)
                trips = statistics.median(s[2] for s in samples)
                rows.append(
                    {
                        "workload": workload.name,
                        "libtpms cmds/s": round(direct),
                        "RM cmds/s": round(managed),
                        "RM/direct": f"{managed / direct:.3f}",
                        "RM overhead us/cmd": round(1e6 / managed - 1e6 / direct, 1),
                        "round trips/cmd (RM)": round(trips, 2),
                        "round trips/cmd (kernel)": workload.kernel_round_trips,
                    }
                )
        finally:
            rm.stop()
            backend.close()
    return rows

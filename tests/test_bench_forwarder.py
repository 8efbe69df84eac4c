"""The benchmarks' counting forwarder (bench/forwarder.py) and the round-trip count built on it.

Seconds, on a real swtpm: what `make bench` reports as TPM commands per client command must
be what went over the wire, and the slow-TPM delay must actually be added per command.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from bench.forwarder import Forwarder, describe, since
from bench.roundtrip import count
from bench.systems import Direct, InProcess
from bench.workloads import COMPARE_WORKLOADS
from cusetpm.backends.swtpm import SwtpmBackend, SwtpmProcess
from cusetpm.rm import RMConfig
from cusetpm.tpm import commands as build
from cusetpm.tpm.constants import TPM_CAP, TPM_CC

pytestmark = pytest.mark.skipif(shutil.which("swtpm") is None, reason="swtpm is not installed")

WORKLOAD = {w.short: w for w in COMPARE_WORKLOADS}


@pytest.fixture
def swtpm_port(tmp_path: Path):  # type: ignore[no-untyped-def]
    with SwtpmProcess(tmp_path / "state") as proc:
        proc.backend().close()  # Startup(CLEAR)
        yield proc.port


def test_counts_by_command_code_and_adds_the_delay(swtpm_port: int) -> None:
    delay = 0.01
    with Forwarder(swtpm_port, delay) as forwarder:
        backend = SwtpmBackend.tcp("127.0.0.1", forwarder.port, startup=False)
        try:
            start = time.monotonic()
            for _ in range(5):
                response = backend.transmit(build.get_random(8))
                assert response[6:10] == b"\0\0\0\0" and len(response) == 10 + 2 + 8
            backend.transmit(build.get_capability(TPM_CAP.HANDLES, 0x80000000, 8))
            elapsed = time.monotonic() - start
        finally:
            backend.close()
        n, by_cc = forwarder.tally.snapshot()
    assert n == 6
    assert by_cc == {TPM_CC.GetRandom: 5, TPM_CC.GetCapability: 1}
    assert elapsed >= 6 * delay  # a lower bound: the forwarder held every command
    assert describe(by_cc, 1) == "GetRandom 5, GetCapability 1"


def test_direct_is_one_and_cannot_hold_eight_clients(swtpm_port: int) -> None:
    with Forwarder(swtpm_port) as forwarder, Direct().running(forwarder.port) as running:
        assert count(running, forwarder, WORKLOAD["PolicyPCR"], 1, 6).ratio == 1.0
        cell = count(running, forwarder, WORKLOAD["ReadPublic"], 8, 3)
    assert cell.ratio is None
    assert cell.note == "fails: client 4's setup: TPM_RC_OBJECT_MEMORY"


def test_eager_rm_pays_a_load_and_a_save_per_session_command(swtpm_port: int) -> None:
    system = InProcess(RMConfig(residency="eager"))
    with Forwarder(swtpm_port) as forwarder, system.running(forwarder.port) as running:
        before = forwarder.tally.snapshot()
        cell = count(running, forwarder, WORKLOAD["PolicyPCR"], 1, 6)
        _, everything = since(forwarder.tally, before)
    assert cell.ratio == 3.0
    assert cell.by_cc == {TPM_CC.ContextLoad: 6, TPM_CC.PolicyPCR: 6, TPM_CC.ContextSave: 6}
    # setup and warm-up went through the forwarder too, outside the counted loop
    assert everything[TPM_CC.StartAuthSession] == 1

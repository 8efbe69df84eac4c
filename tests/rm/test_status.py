"""`cusetpm status` from the RM (rm/status.py): the TPM's slots and the context-gap window
left, from the RM's tables, read while a command is in flight (no TPM command, no waiting)."""

from __future__ import annotations

import time

import pytest

from cusetpm.frontends.control import format_text
from cusetpm.rm import RMConfig
from cusetpm.rm.status import snapshot
from cusetpm.tpm.constants import TPM_CC, TPM_PT, TPM_SE
from tests.rm.client import RawClient, policy_restart_command, rc_of
from tests.rm.conftest import RMFactory
from tests.rm.faults import FaultyBackend

# These tests check the eager discipline (nothing of a space in the TPM between commands:
# census, saved contexts, round trips); resident mode is covered by test_residency.py until
# they are rewritten to hold in both modes.
pytestmark = pytest.mark.residency("eager")

WINDOW = 1000


def test_slots_and_gap_left_while_a_command_is_in_flight(make_rm: RMFactory) -> None:
    rm = make_rm(RMConfig(context_gap_window=WINDOW), wrap=FaultyBackend)
    backend = rm.backend
    assert isinstance(backend, FaultyBackend)
    client = RawClient(rm, rm.open_space(uid=1000, node="tpmrm-user"))
    tpm = snapshot(rm)["tpm"]
    active_max = rm.properties[TPM_PT.ACTIVE_SESSIONS_MAX]
    transient = rm.properties[TPM_PT.HR_TRANSIENT_AVAIL]
    assert tpm["context_gap_left"] == WINDOW  # nothing saved yet
    assert tpm["slots"] == {
        "sessions_loaded": 0, "sessions_saved": 0, "sessions_free": active_max,
        "sessions_loaded_max": rm.properties[TPM_PT.HR_LOADED_AVAIL],
        "objects_resident": 0, "objects_max": transient, "objects_free": transient,
    }
    sessions = [client.start_session(TPM_SE.POLICY) for _ in range(3)]
    tpm = snapshot(rm)["tpm"]
    # three session saves, one each: the oldest is two saves behind the latest
    assert tpm["context_gap_left"] == WINDOW - 2
    assert tpm["slots"]["sessions_saved"] == 3 and tpm["slots"]["sessions_loaded"] == 0
    assert tpm["slots"]["sessions_free"] == active_max - 3
    # a command using the oldest session, held at the backend: status still answers, and
    # shows that session in a TPM slot
    gate = backend.hold(TPM_CC.PolicyRestart)
    future = rm.submit(client.space, policy_restart_command(sessions[0]))
    deadline = time.monotonic() + 5
    while TPM_CC.PolicyRestart not in [s.code for s in backend.log]:
        assert time.monotonic() < deadline, "PolicyRestart never reached the backend"
        time.sleep(0.001)
    during = snapshot(rm)["tpm"]["slots"]
    gate.set()
    assert rc_of(future.result(5)) == 0
    assert during["sessions_loaded"] == 1 and during["sessions_saved"] == 2
    # saved again: the oldest is now sessions[1], two saves behind (sessions[2], sessions[0])
    assert snapshot(rm)["tpm"]["context_gap_left"] == WINDOW - 2
    client.flush(sessions[1])
    assert snapshot(rm)["tpm"]["context_gap_left"] == WINDOW - 1
    text = format_text(snapshot(rm))
    assert f"context-gap window {WINDOW} ({WINDOW - 1} saves left)" in text
    assert (f"slots: sessions 0 loaded, 2 saved, {active_max - 2} free; "
            f"objects 0 resident of {transient}, {transient} free") in text

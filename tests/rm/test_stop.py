"""What clients get while the RM stops: queued work finishes, later opens are ESHUTDOWN,
spaces are closed first (their commands, and those waiting for a TPM session, EBADF)."""

from __future__ import annotations

import errno
import time

import pytest

from cusetpm.rm import ResourceManager, RMConfig
from cusetpm.rm.errors import RMError
from cusetpm.tpm.constants import TPM_SE
from tests.rm.client import RawClient, start_session_command
from tests.rm.conftest import RMFactory

TPM_SESSIONS = 64


def test_open_after_stop_is_eshutdown(rm: ResourceManager) -> None:
    a = RawClient(rm, rm.open_space())
    a.start_session(TPM_SE.POLICY)
    rm.stop()
    with pytest.raises(RMError) as info:
        rm.open_space(uid=1000)
    assert info.value.errno == errno.ESHUTDOWN
    with pytest.raises(RMError) as info:
        rm.submit(a.space, start_session_command())
    assert info.value.errno == errno.EBADF  # stop closed the space first
    assert rm.open_spaces == 0


def test_waiting_command_is_failed_at_stop(make_rm: RMFactory) -> None:
    rm = make_rm(
        RMConfig(
            max_sessions=TPM_SESSIONS,
            session_timeout=600.0,
            session_evict_after=600.0,
            session_wait_max=600.0,
        )
    )
    holder = RawClient(rm, rm.open_space())
    for _ in range(TPM_SESSIONS):
        holder.start_session(TPM_SE.POLICY)
    waiter = RawClient(rm, rm.open_space())
    waited = rm.wait_stats.waited
    future = rm.submit(waiter.space, start_session_command())
    deadline = time.monotonic() + 10
    while rm.wait_stats.waited == waited:
        assert time.monotonic() < deadline, "the command never waited"
        time.sleep(0.001)
    rm.stop()
    with pytest.raises(RMError) as info:
        future.result(timeout=10)
    assert info.value.errno == errno.EBADF
    assert rm.open_spaces == 0

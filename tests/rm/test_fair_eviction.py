"""Uid-fair eviction under global session exhaustion (rm/quotas.py fair_victim), over libtpms'
64 sessions: the first evicted is the least recently used idle session of a uid holding more
than its share (ACTIVE_SESSIONS_MAX / uids holding sessions), not the oldest of all."""

from __future__ import annotations

import time

from cusetpm.rm import ResourceManager
from cusetpm.rm.quotas import fair_share, fair_victim
from cusetpm.rm.sessions import SessionEntry
from cusetpm.rm.space import Space
from cusetpm.tpm.constants import TPM_SE
from tests.rm.client import (
    RawClient,
    handle_of,
    policy_restart_command,
    rc_of,
    start_session_command,
)
from tests.rm.conftest import RMFactory, assert_tpm_empty
from tests.rm.test_exhaustion import TPM_SESSIONS, config

IDLE = 0.2  # session_timeout: every session below is idle past it before the waiter comes


def usable(client: RawClient, session: int) -> bool:
    return rc_of(client.send(policy_restart_command(session))) == 0


def open_uid(rm: ResourceManager, uid: int) -> RawClient:
    return RawClient(rm, rm.open_space(uid=uid, node="tpmrm-user"))


def test_a_uid_over_its_share_loses_its_idle_sessions_first(make_rm: RMFactory) -> None:
    rm = make_rm(config(session_timeout=IDLE, session_evict_after=0.02))
    light, heavy = open_uid(rm, 1001), open_uid(rm, 1000)
    light_sessions = [light.start_session(TPM_SE.POLICY) for _ in range(4)]  # the oldest
    heavy_sessions = [heavy.start_session(TPM_SE.POLICY) for _ in range(TPM_SESSIONS - 4)]
    time.sleep(IDLE + 0.05)  # all 64 idle past the timeout; plain LRU would take light's first
    share, counts = fair_share(rm.sessions, TPM_SESSIONS, None)
    assert share == TPM_SESSIONS // 2 and counts[1000] == TPM_SESSIONS - 4
    waiters = [open_uid(rm, 1002 + i) for i in range(2)]
    taken = [handle_of(rm.submit(w.space, start_session_command()).result(5)) for w in waiters]
    assert rm.wait_stats.evictions == 2
    # heavy's two least recently used went (the waiters got their numbers); light kept all
    assert sorted(heavy.space.revoked) == sorted(heavy_sessions[:2])
    assert sorted(taken) == sorted(heavy_sessions[:2])
    assert sorted(light.space.sessions) == sorted(light_sessions)
    assert all(usable(light, s) for s in light_sessions)
    for client in (light, heavy, *waiters):
        rm.close_space(client.space)
    assert_tpm_empty(rm)


def test_without_anyone_over_the_share_eviction_is_lru(make_rm: RMFactory) -> None:
    rm = make_rm(config(session_timeout=IDLE, session_evict_after=0.02))
    first, second = open_uid(rm, 1001), open_uid(rm, 1000)
    older = [first.start_session(TPM_SE.POLICY) for _ in range(TPM_SESSIONS // 2)]
    newer = [second.start_session(TPM_SE.POLICY) for _ in range(TPM_SESSIONS // 2)]
    time.sleep(IDLE + 0.05)
    waiter = open_uid(rm, 1002)
    taken = handle_of(rm.submit(waiter.space, start_session_command()).result(5))
    assert taken == older[0] and first.space.revoked == {older[0]}
    assert sorted(second.space.sessions) == sorted(newer)
    for client in (first, second, waiter):
        rm.close_space(client.space)


# -- the choice itself (pure: entries and spaces only, no TPM) ----------------------------------


def entries(space: Space, count: int, start: float) -> list[SessionEntry]:
    return [SessionEntry(handle=0x03000000 + int(start) + i, owner=space,
                         last_used=start + i) for i in range(count)]


def test_fair_victim_choices() -> None:
    a, b, root = Space(uid=1000), Space(uid=1001), Space(uid=0)
    held = entries(b, 2, 0.0) + entries(a, 10, 100.0)
    # two uids, 12 of 12: share 6, a holds 10 -> a's oldest, though b's are older
    assert fair_victim(held, held, 12, None) is held[2]
    # a configured per-uid quota lowers the share: 3 each of 64, b (2) is not over it
    assert fair_victim(held, held, 64, 3) is held[2]
    # nobody over the share: the least recently used of all
    assert fair_victim(held, held, 64, None) is held[0]
    # only idle sessions are candidates: a's are all busy -> b's oldest
    assert fair_victim(held[:2], held, 12, None) is held[0]
    # abandoned sessions belong to no uid; they never make anyone over the share
    orphan = SessionEntry(handle=0x03000100, owner=None, last_used=-5.0)
    assert fair_victim([orphan, *held], [orphan, *held], 64, None) is orphan
    # root counts like any uid for fairness
    root_held = entries(root, 10, 200.0) + entries(b, 2, 0.0)
    assert fair_victim(root_held, root_held, 12, None) is root_held[0]

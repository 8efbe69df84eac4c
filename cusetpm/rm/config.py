"""Options of the resource manager; defaults are generous where the kernel's are tight (3/3)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RMConfig:
    max_objects: int = 64  # transient objects per space (kernel: 3)
    max_sessions: int = 16  # sessions per space (kernel: 3)
    max_spaces: int = 1024  # open spaces in total
    max_spaces_per_uid: int | None = None  # open spaces per user id; None: no per-user limit
    # sessions per user id, over all its spaces on every node (a share of the TPM's
    # ACTIVE_SESSIONS_MAX); root (uid 0) is not limited; None: no per-user limit
    max_sessions_per_uid: int | None = None
    max_objects_per_uid: int | None = None  # the same for objects (rm/quotas.py)
    retry_first_delay: float = 0.020  # TPM_RC_RETRY/TESTING/YIELDED: 20 ms, doubling ...
    retry_max_delay: float = 2.0  # ... until the delay would exceed 2 s (the kernel's numbers)
    # The backend lost (rm/backendstate.py): reconnect after 0.1 s, doubling to every 5 s.
    reopen_first_delay: float = 0.1
    reopen_max_delay: float = 5.0
    # Session continuation: client-saved sessions whose saving descriptor closed, kept for
    # another descriptor to load; beyond this many the oldest is flushed.
    max_abandoned_sessions: int = 16
    # Regapping: the context-gap window the RM keeps sessions within. None: the TPM's own
    # TPM_PT_CONTEXT_GAP_MAX. A smaller value makes the RM refresh sessions sooner (tests).
    context_gap_window: int | None = None
    proactive_regap: bool = True  # off only to test the reactive path
    # Global session exhaustion: a StartAuthSession that finds no free TPM session waits in a
    # FIFO queue; after `session_evict_after` s the least recently used session idle for more
    # than `session_timeout` s is evicted for it; after `session_wait_max` s it is refused.
    session_timeout: float = 2.0
    session_evict_after: float = 0.5
    session_wait_max: float = 10.0
    # Scheduling (scheduler.py): "fair" runs quick commands before slow ones, with aging and a
    # fair share per uid; "fifo" keeps arrival order. `aging`: a queued command is overdue
    # (runs next) once it has waited `aging` times its expected FIFO wait (2: at most twice).
    schedule: str = "fair"
    aging: float = 2.0
    # Residency (residency.py): "resident" keeps the contexts a command used in the TPM until
    # room is needed (the least recently used goes first); "eager" puts everything away after
    # each command (nothing of ours in the TPM between commands, the kernel's way). Eager stays
    # the default until the frontend and guest suites pass in resident mode too.
    residency: str = "eager"
    # Slots left free between commands for others using the same TPM (the kernel's spaces,
    # trusted keys, its HMAC session). None: 1 on a kernel device backend, else 0.
    keep_free_objects: int | None = None
    keep_free_sessions: int | None = None

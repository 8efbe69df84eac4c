"""Options of the resource manager; defaults are generous where the kernel's are tight (3/3)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RMConfig:
    max_objects: int = 64  # transient objects per space (kernel: 3)
    max_sessions: int = 16  # sessions per space (kernel: 3)
    max_spaces: int = 1024  # open spaces in total
    max_spaces_per_uid: int | None = None  # open spaces per user id; None: no per-user limit
    retry_first_delay: float = 0.020  # TPM_RC_RETRY/TESTING/YIELDED: 20 ms, doubling ...
    retry_max_delay: float = 2.0  # ... until the delay would exceed 2 s (the kernel's numbers)

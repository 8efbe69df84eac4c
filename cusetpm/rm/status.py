"""What `cusetpm status` shows, as one JSON-able dict read from the RM's counters.

Read from the control socket's thread without taking the TPM: spaces and counters are
copied under the manager's lock (held only for the copy), never behind a command.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

from cusetpm.tpm.constants import TPM_CC, TPM_PT

if TYPE_CHECKING:
    from cusetpm.rm.manager import ResourceManager


def _cc(code: int | None) -> str | None:
    if code is None:
        return None
    try:
        return TPM_CC(code).name
    except ValueError:
        return f"0x{code:08x}"


def slots(rm: ResourceManager) -> dict[str, Any]:
    """What of the RM's is in the TPM now, and what is free, from the RM's own tables (no TPM
    command: status never queues behind one). Sessions: `loaded` are in a TPM slot now (a
    command is using them), `saved` hold only a context-gap place; `free` is of the TPM's
    ACTIVE_SESSIONS_MAX. Objects: `objects_resident` is what the RM keeps loaded between
    commands (rm/residency.py; none in eager mode); `objects_max` is TPM_PT_HR_TRANSIENT_AVAIL
    as read at start."""
    entries = list(rm.sessions)
    loaded = sum(1 for e in entries if e.context is None)
    active_max = rm.properties.get(TPM_PT.ACTIVE_SESSIONS_MAX, 0)
    objects_max = rm.properties.get(TPM_PT.HR_TRANSIENT_AVAIL, 0)
    objects_resident = rm.residency.resident_objects if rm.residency is not None else 0
    return {
        "sessions_loaded": loaded,
        "sessions_saved": len(entries) - loaded,
        "sessions_free": max(0, active_max - len(entries)),
        "sessions_loaded_max": rm.properties.get(TPM_PT.HR_LOADED_AVAIL),
        "objects_resident": objects_resident,
        "objects_max": objects_max,
        "objects_free": max(0, objects_max - objects_resident),
    }


def gap_left(rm: ResourceManager) -> int | None:
    """Context saves left before the oldest saved session falls out of the context-gap
    window (rm/regap.py refreshes it before then): window - (latest - oldest sequence)."""
    regapper = rm.regapper
    if regapper is None:
        return None
    oldest = rm.sessions.oldest_saved()
    if oldest is None or oldest.context is None:
        return regapper.window
    return regapper.window - (regapper.latest - oldest.sequence)


def snapshot(rm: ResourceManager) -> dict[str, Any]:
    now = time.time()
    with rm._cv:
        spaces = list(rm._spaces)
    executor = rm._executor
    nodes: dict[str, list[dict[str, Any]]] = {}
    for space in sorted(spaces, key=lambda s: s.id):
        nodes.setdefault(space.node, []).append({
            "space": space.id, "pid": space.pid, "uid": space.uid,
            "age": round(now - space.opened, 3), "commands": space.commands,
            "objects": len(space.objects), "sessions": len(space.sessions),
            "last_command": _cc(space.last_command),
            "last_rc": None if space.last_rc is None else f"0x{space.last_rc:08x}",
        })
    refusals: dict[str, dict[str, int]] = {}
    if executor is not None:
        for (node, reason), count in list(executor.policy_refusals.items()):
            refusals.setdefault(node, {})[reason] = count
    regapper = rm.regapper
    tpm: dict[str, Any] = {
        "backend": rm.backend.name,
        "sessions_active": len(executor.sessions) if executor else 0,
        "sessions_max": executor.active_sessions_max if executor else 0,
        "context_gap_window": regapper.window if regapper else None,
        "context_gap_left": gap_left(rm),
        "slots": slots(rm),
    }
    counters = rm.counters
    with rm._cv:
        limits = {node: {k: v for k, v in dataclasses.asdict(lim).items() if v is not None}
                  for node, lim in rm.quotas.nodes.items()}
    return {
        "uptime": round(now - counters.started, 3),
        "nodes": nodes,
        "node_limits": limits,  # [node.limits] of the nodes that have any (rm/quotas.py)
        "tpm": tpm,
        "counters": {
            "commands": counters.commands,
            "refusals": refusals,
            "evictions": rm.wait_stats.evictions,
            "session_waits": rm.wait_stats.waited,
            "regap_refreshes": regapper.refreshes if regapper else 0,
            "round_trips": rm.round_trips,
        },
        "per_command": {
            _cc(code) or "": {"count": n, "p50_us": round(p50 * 1e6), "p99_us": round(p99 * 1e6)}
            for code, (n, p50, p99) in sorted(rm.counters.per_code().items())
        },
    }

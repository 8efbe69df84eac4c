"""Quotas on the TPM's shared resources: open spaces, objects and sessions, per node and per uid.

Scopes, each checked before anything reaches the TPM:
  per space              RMConfig.max_objects / max_sessions (execute.py check_limits)
  per uid, every node    RMConfig.max_spaces_per_uid, max_objects_per_uid, max_sessions_per_uid
                         (uid 0 is exempt from the object and session ones: system services)
  per node               NodeLimits from the config's [node.limits]: all the node's spaces
                         together, and one uid on the node (every uid, root included: the
                         operator wrote them for that node)
Over a quota a space is refused with the RM-layer code of the resource (0x000B0902 objects,
0x000B0903 sessions); an open, with EMFILE (per uid) or ENFILE (a total).

Under global session exhaustion (every TPM session taken), fair_victim() picks the session to
evict: first the idle sessions of a uid holding more than its fair share.

Objects count as the RM holds them (a space's saved objects); sessions as a space is charged
for them (its own and those it saved itself and may load again). The registry is updated
under the manager's lock; the checks run for whoever holds the TPM and read it lock-free
(spaces only change their own tables while holding the TPM).
"""

from __future__ import annotations

import errno
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import TypeVar

from cusetpm.rm import refusals
from cusetpm.rm.config import RMConfig
from cusetpm.rm.errors import RMError
from cusetpm.rm.sessions import SessionEntry
from cusetpm.rm.space import Space
from cusetpm.tpm.constants import cc_name
from cusetpm.tpm.rc import TPM_RC, rm_rc
from cusetpm.tpm.response import error_response

RC_OBJECTS = rm_rc(TPM_RC.OBJECT_MEMORY)  # 0x000B0902
RC_SESSIONS = rm_rc(TPM_RC.SESSION_MEMORY)  # 0x000B0903


@dataclass(frozen=True)
class NodeLimits:
    """A node's quotas; None: no limit. The keys of [node.limits] are these field names."""

    spaces: int | None = None  # open spaces on the node, all uids together
    objects: int | None = None
    sessions: int | None = None
    spaces_per_uid: int | None = None  # one uid on the node
    objects_per_uid: int | None = None
    sessions_per_uid: int | None = None


K = TypeVar("K", int, str)
NODE_LIMIT_KEYS = frozenset(f.name for f in fields(NodeLimits))
NO_LIMITS = NodeLimits()


def space_objects(space: Space) -> int:
    return len(space.objects)


def space_sessions(space: Space) -> int:
    """Sessions charged to a space: its own, and those it saved and may load again."""
    return len(space.sessions) + len(space.client_saved)


def _count(spaces: Iterable[Space], what: str) -> int:
    count = space_objects if what == "objects" else space_sessions
    return sum(count(s) for s in spaces)


def _discard(table: dict[K, set[Space]], key: K, space: Space) -> None:
    group = table.get(key)
    if group is not None:
        group.discard(space)
        if not group:
            del table[key]


class Quotas:
    """Which spaces are open, by uid and by node, and the limits that apply to them."""

    def __init__(self, config: RMConfig):
        self.config = config
        self.nodes: dict[str, NodeLimits] = {}  # node key -> its limits (SIGHUP replaces)
        self.by_uid: dict[int, set[Space]] = {}
        self.by_node: dict[str, set[Space]] = {}

    # -- registry (under the manager's lock) ------------------------------------------------

    def opened(self, space: Space) -> None:
        self.by_uid.setdefault(space.uid, set()).add(space)
        self.by_node.setdefault(space.node, set()).add(space)

    def closed(self, space: Space) -> None:
        _discard(self.by_uid, space.uid, space)
        _discard(self.by_node, space.node, space)

    def uid_spaces(self, uid: int) -> tuple[Space, ...]:
        return tuple(self.by_uid.get(uid, ()))

    def node_spaces(self, node: str) -> tuple[Space, ...]:
        return tuple(self.by_node.get(node, ()))

    def set_node_limits(self, node: str, limits: NodeLimits | None) -> None:
        if limits is None or limits == NO_LIMITS:
            self.nodes.pop(node, None)
        else:
            self.nodes[node] = limits

    # -- checks ---------------------------------------------------------------------------

    def check_open(self, uid: int, node: str) -> None:
        """Raise RMError (EMFILE/ENFILE) if a new space of `uid` on `node` is over a quota."""
        per_uid = self.config.max_spaces_per_uid
        if per_uid is not None and len(self.by_uid.get(uid, ())) >= per_uid:
            raise RMError(errno.EMFILE, f"uid {uid} has {per_uid} open spaces, the limit")
        limits = self.nodes.get(node)
        if limits is None:
            return
        on_node = self.by_node.get(node, set())
        if limits.spaces is not None and len(on_node) >= limits.spaces:
            raise RMError(errno.ENFILE, f"node {node}: {limits.spaces} open spaces is its limit")
        if limits.spaces_per_uid is not None:
            mine = sum(1 for s in on_node if s.uid == uid)
            if mine >= limits.spaces_per_uid:
                raise RMError(errno.EMFILE, f"node {node}: uid {uid} has "
                              f"{limits.spaces_per_uid} open spaces, its limit there")

    def check_command(self, space: Space, creates: str | None, code: int) -> bytes | None:
        """The refusal of a command that would create an object or session over a uid's or
        a node's quota; None to go on. (The per-space limits are checked before.)"""
        if creates not in ("object", "session"):
            return None
        what = f"{creates}s"
        rc = RC_OBJECTS if what == "objects" else RC_SESSIONS
        across = (self.config.max_objects_per_uid if what == "objects"
                  else self.config.max_sessions_per_uid)
        if across is not None and space.uid != 0:  # root is exempt (system services)
            held = _count(self.uid_spaces(space.uid), what)
            if held >= across:
                return self._refuse(space, code, rc, f"uid {space.uid} holds {held} {what}, "
                                    "its limit over all nodes")
        limits = self.nodes.get(space.node)
        if limits is None:
            return None
        total = limits.objects if what == "objects" else limits.sessions
        per_uid = limits.objects_per_uid if what == "objects" else limits.sessions_per_uid
        if total is None and per_uid is None:
            return None
        on_node = self.node_spaces(space.node)
        if total is not None and _count(on_node, what) >= total:
            return self._refuse(space, code, rc, f"node {space.node} holds {total} {what}, "
                                "its limit")
        if per_uid is not None:
            held = _count((s for s in on_node if s.uid == space.uid), what)
            if held >= per_uid:
                return self._refuse(space, code, rc, f"uid {space.uid} holds {held} {what} "
                                    f"on node {space.node}, its limit there")
        return None

    @staticmethod
    def _refuse(space: Space, code: int, rc: int, why: str) -> bytes:
        refusals.warn(space, "%s refused: %s", cc_name(code), why)
        return error_response(rc)


# -- fairness under global session exhaustion ---------------------------------------------------


def session_uid(entry: SessionEntry) -> int | None:
    """The uid a session is charged to: its owner's, or the saving space's; None if abandoned."""
    space = entry.owner if entry.owner is not None else entry.saved_by
    return space.uid if space is not None else None


def fair_share(held: Iterable[SessionEntry], active_max: int,
               per_uid: int | None) -> tuple[int, Counter[int]]:
    """(share, sessions held per uid): ACTIVE_SESSIONS_MAX over the uids holding sessions,
    no more than the configured per-uid quota."""
    counts: Counter[int] = Counter()
    for entry in held:
        uid = session_uid(entry)
        if uid is not None:
            counts[uid] += 1
    share = max(1, active_max // max(1, len(counts)))
    return (min(share, per_uid) if per_uid is not None else share), counts


def fair_victim(idle: Sequence[SessionEntry], held: Iterable[SessionEntry], active_max: int,
                per_uid: int | None) -> SessionEntry:
    """Which idle session to evict: the least recently used of a uid holding more than its
    fair share, if any; else the least recently used of all. `idle` must not be empty."""
    share, counts = fair_share(held, active_max, per_uid)
    over = [e for e in idle if (uid := session_uid(e)) is not None and counts[uid] > share]
    return min(over or idle, key=lambda e: e.last_used)

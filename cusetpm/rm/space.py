"""One space per open file descriptor: the objects and sessions it owns, by the kernel's model."""

from __future__ import annotations

import heapq
import itertools
import time
from dataclasses import dataclass, field

from cusetpm.policy import NodePolicy

# Virtual transient handles: 0x80FFFFFF, 0x80FFFFFE, ... as the kernel numbers its slots.
VHANDLE_BASE = 0x80FFFFFF

_space_ids = itertools.count(1)


def vhandle_of(index: int) -> int:
    return VHANDLE_BASE - index


def index_of(vhandle: int) -> int:
    return VHANDLE_BASE - vhandle


@dataclass(slots=True)
class TransientObject:
    """A transient object of a space: in the TPM now (`physical`), saved (`context`), or both."""

    # raw TPMS_CONTEXT as ContextSave returned it; b"" until it is first saved
    context: bytes
    # Keys never change once loaded, so their first saved context can be reloaded for ever and
    # the RM only flushes them when they leave. Sequence objects (and blobs of unknown kind
    # loaded by the client) change with every command and are saved again each time.
    mutable: bool
    # The TPM's answer to a ReadPublic without sessions (outPublic, name, qualifiedName): the
    # public area of a loaded object never changes, so later ones are answered from it.
    read_public: bytes | None = None
    physical: int | None = None  # its TPM handle while resident (rm/residency.py)


@dataclass
class Space:
    """What one descriptor owns. Touched by whoever holds the manager's `_current` job."""

    uid: int = 0
    id: int = field(default_factory=lambda: next(_space_ids))
    # the node this descriptor was opened on, its policy (None: everything allowed) and opener
    node: str = ""
    policy: NodePolicy | None = None
    pid: int = 0
    policy_logged: set[int] = field(default_factory=set)  # command codes refused and logged
    opened: float = field(default_factory=time.time)
    commands: int = 0  # for `cusetpm status`
    last_command: int | None = None
    last_rc: int | None = None
    objects: dict[int, TransientObject] = field(default_factory=dict)  # by virtual handle
    # session handles this space owns (their contexts live in the RM's session table)
    sessions: set[int] = field(default_factory=set)
    # sessions it saved itself (TPM2_ContextSave) and has not closed on: they count against
    # its session limit, and are abandoned when it closes
    client_saved: set[int] = field(default_factory=set)
    # handles of its sessions the RM gave up (flushed under global exhaustion, or lost when
    # their context could not be saved): using one gets an RM-layer error, never whatever
    # session the TPM later gives that number
    revoked: set[int] = field(default_factory=set)
    # objects whose context is gone (the TPM refused to save it on eviction, or the TPM
    # restarted: rm/backendstate.py): virtual handle -> the errno its next use gets, once
    lost: dict[int, int] = field(default_factory=dict)
    refusals: int = 0  # commands refused so far (rm/refusals.py rate-limits their warnings)
    closed: bool = False
    _free: list[int] = field(default_factory=list)
    _next: int = 0

    def new_vhandle(self) -> int:
        index = heapq.heappop(self._free) if self._free else self._take_next()
        return vhandle_of(index)

    def _take_next(self) -> int:
        self._next += 1
        return self._next - 1

    def drop_object(self, vhandle: int) -> None:
        if self.objects.pop(vhandle, None) is not None:
            heapq.heappush(self._free, index_of(vhandle))

    def lose_object(self, vhandle: int, err: int) -> None:
        """Its context is gone; its number is never given out again in this space."""
        if self.objects.pop(vhandle, None) is not None:
            self.lost[vhandle] = err

    def __hash__(self) -> int:
        return self.id

    def __eq__(self, other: object) -> bool:
        return self is other

    def __repr__(self) -> str:
        return (
            f"Space(id={self.id}, uid={self.uid}, objects={len(self.objects)}, "
            f"sessions={len(self.sessions)})"
        )

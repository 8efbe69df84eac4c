"""Every session the RM manages, across spaces: its owner and its saved context."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from cusetpm.rm.space import Space


@dataclass
class SessionEntry:
    handle: int  # the TPM's own handle: sessions are not virtualized (their handle is their Name)
    owner: Space | None
    context: bytes | None = None  # saved TPMS_CONTEXT while the RM holds it saved
    last_used: float = field(default_factory=time.monotonic)


class SessionTable:
    """Sessions by handle. Worker thread only."""

    def __init__(self) -> None:
        self._entries: dict[int, SessionEntry] = {}

    def add(self, handle: int, owner: Space) -> SessionEntry:
        entry = SessionEntry(handle=handle, owner=owner)
        self._entries[handle] = entry
        owner.sessions.add(handle)
        return entry

    def get(self, handle: int) -> SessionEntry | None:
        return self._entries.get(handle)

    def forget(self, handle: int) -> None:
        entry = self._entries.pop(handle, None)
        if entry is not None and entry.owner is not None:
            entry.owner.sessions.discard(handle)

    def owned_by(self, space: Space) -> list[SessionEntry]:
        return [self._entries[h] for h in sorted(space.sessions) if h in self._entries]

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[SessionEntry]:
        return iter(list(self._entries.values()))

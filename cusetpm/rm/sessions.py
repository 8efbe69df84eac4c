"""Every session the RM keeps in the TPM, across spaces.

A session is in one of three states:
  OWNED         a space uses it; the RM holds its saved context between commands.
  CLIENT_SAVED  the client saved it (TPM2_ContextSave): the client holds a token blob, the RM
                keeps the real context; any space presenting the token may load it.
  (abandoned)   CLIENT_SAVED and the saving space has closed; bounded in number.
Sessions keep their TPM handle (it is their Name), so the table is keyed by it.
"""

from __future__ import annotations

import enum
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

from cusetpm.rm.space import Space


class SessionState(enum.Enum):
    OWNED = "owned"
    CLIENT_SAVED = "client-saved"


@dataclass(eq=False)
class SessionEntry:
    handle: int  # the TPM's own handle: sessions are not virtualized (their handle is their Name)
    owner: Space | None
    state: SessionState = SessionState.OWNED
    context: bytes | None = None  # saved TPMS_CONTEXT while saved; None while loaded
    token: bytes | None = None  # CLIENT_SAVED: the blob the client holds
    saved_by: Space | None = None  # CLIENT_SAVED: the space that saved it, while open
    node: str = ""  # the node of the space that started it: its token is claimed there only
    last_used: float = field(default_factory=time.monotonic)

    @property
    def sequence(self) -> int:
        """The TPM's context sequence number of the saved context (for the gap)."""
        assert self.context is not None
        return int.from_bytes(self.context[0:8], "big")

    @property
    def abandoned(self) -> bool:
        return self.state is SessionState.CLIENT_SAVED and self.saved_by is None


class SessionTable:
    """Sessions by handle, by token, and in the order their contexts were saved.

    Touched only by whoever holds the manager's `_current` job (worker or inline submitter).
    """

    def __init__(self) -> None:
        self._entries: dict[int, SessionEntry] = {}
        self._by_token: dict[bytes, SessionEntry] = {}
        # Saved sessions, oldest saved context first: the first one is what falls out of the
        # TPM's context-gap window first.
        self._saved_order: OrderedDict[int, None] = OrderedDict()
        self._abandoned: OrderedDict[int, None] = OrderedDict()  # oldest abandoned first
        self.freed = 0  # sessions forgotten so far: each one frees a TPM session slot

    # -- membership -----------------------------------------------------------------------

    def add(self, handle: int, owner: Space) -> SessionEntry:
        entry = SessionEntry(handle=handle, owner=owner, node=owner.node)
        self._entries[handle] = entry
        owner.sessions.add(handle)
        owner.revoked.discard(handle)  # the TPM reused the number: it is this space's again
        return entry

    def get(self, handle: int) -> SessionEntry | None:
        return self._entries.get(handle)

    def forget(self, handle: int) -> None:
        """The session no longer exists in the TPM (flushed, ended, or lost)."""
        entry = self._entries.pop(handle, None)
        if entry is None:
            return
        self.freed += 1
        self._saved_order.pop(handle, None)
        self._abandoned.pop(handle, None)
        if entry.token is not None:
            self._by_token.pop(entry.token, None)
        if entry.owner is not None:
            entry.owner.sessions.discard(handle)
        if entry.saved_by is not None:
            entry.saved_by.client_saved.discard(handle)

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[SessionEntry]:
        return iter(list(self._entries.values()))

    def owned_by(self, space: Space) -> list[SessionEntry]:
        return [self._entries[h] for h in sorted(space.sessions) if h in self._entries]

    # -- saved contexts (the gap) ---------------------------------------------------------

    def saved(self, entry: SessionEntry, context: bytes) -> None:
        entry.context = context
        self._saved_order.pop(entry.handle, None)
        self._saved_order[entry.handle] = None

    def loaded(self, entry: SessionEntry) -> None:
        entry.context = None
        entry.last_used = time.monotonic()
        self._saved_order.pop(entry.handle, None)

    def touch(self, entry: SessionEntry) -> None:
        """A command used it (residency's least-recently-used order)."""
        entry.last_used = time.monotonic()

    def oldest_saved(self) -> SessionEntry | None:
        for handle in self._saved_order:
            return self._entries[handle]
        return None

    def saved_oldest_first(self) -> list[SessionEntry]:
        return [self._entries[h] for h in self._saved_order]

    # -- continuation ---------------------------------------------------------------------

    def client_saved(self, entry: SessionEntry, token: bytes) -> None:
        """The owner saved it itself: it leaves the space; the token now stands for it."""
        if entry.owner is not None:
            entry.owner.sessions.discard(entry.handle)
            entry.owner.client_saved.add(entry.handle)
        entry.saved_by, entry.owner = entry.owner, None
        entry.state = SessionState.CLIENT_SAVED
        entry.token = token
        self._by_token[token] = entry

    def by_token(self, token: bytes) -> SessionEntry | None:
        return self._by_token.get(token)

    def claim(self, entry: SessionEntry, space: Space) -> None:
        """A space presented the token: the session is that space's now; the token is spent."""
        if entry.token is not None:
            self._by_token.pop(entry.token, None)
        if entry.saved_by is not None:
            entry.saved_by.client_saved.discard(entry.handle)
        self._abandoned.pop(entry.handle, None)
        entry.token = None
        entry.saved_by = None
        entry.state = SessionState.OWNED
        entry.owner = space
        entry.last_used = time.monotonic()
        space.sessions.add(entry.handle)
        space.revoked.discard(entry.handle)

    def abandon(self, entry: SessionEntry) -> None:
        """Its saving space closed: the session waits for someone holding the token."""
        if entry.saved_by is not None:
            entry.saved_by.client_saved.discard(entry.handle)
        entry.saved_by = None
        self._abandoned[entry.handle] = None

    def abandoned_oldest_first(self) -> list[SessionEntry]:
        return [self._entries[h] for h in self._abandoned]

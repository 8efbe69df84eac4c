"""Regapping: keep every saved session inside the TPM's context-gap window.

The TPM numbers session context saves with one counter; once the oldest saved session is
TPM_PT_CONTEXT_GAP_MAX saves behind the next one, ContextSave of any session fails with
TPM_RC_CONTEXT_GAP (Part 1, "Context Management"). Only session saves move that counter
(objects have a counter of their own), and the RM does every session save, so it knows how
far behind the oldest one is and refreshes it (ContextLoad + ContextSave) before the window
closes. A TPM shared with someone else can still answer 0x901: then the RM refreshes all its
saved sessions and the caller retries once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from cusetpm.rm.sessions import SessionEntry, SessionTable
from cusetpm.rm.tpmlink import ContextError, TpmLink

log = logging.getLogger(__name__)


class Regapper:
    def __init__(self, link: TpmLink, sessions: SessionTable, window: int):
        self.link = link
        self.sessions = sessions
        self.window = window
        # Refresh this many saves before the window closes: one client command saves at most
        # a handful of sessions, so the oldest never falls out between two checks.
        self.margin = max(8, window // 16)
        self.latest = 0  # highest session context sequence seen
        self.refreshes = 0
        # Called before a refresh loads a session: residency frees a session slot if the
        # TPM's are all taken by resident sessions.
        self.make_room: Callable[[], None] = lambda: None

    def saved(self, entry: SessionEntry, context: bytes) -> None:
        """Record a session's new saved context (every session save goes through here)."""
        self.sessions.saved(entry, context)
        self.latest = max(self.latest, entry.sequence)

    def check(self) -> None:
        """Proactive: refresh the sessions about to fall out of the window."""
        limit = self.window - self.margin
        # Each session at most once: with a window too small for the sessions kept, refreshing
        # cannot help and must not spin.
        for _ in range(len(self.sessions)):
            oldest = self.sessions.oldest_saved()
            if oldest is None or self.latest - oldest.sequence < limit:
                return
            self.refresh(oldest)

    def recover(self) -> None:
        """Reactive, after a TPM_RC_CONTEXT_GAP: refresh every saved session, oldest first.

        The TPM's counter moved further than the RM saw (someone else saves sessions too), so
        the RM's own numbers cannot tell which sessions are at risk; this is rare, so all go.
        """
        saved = self.sessions.saved_oldest_first()
        log.warning("TPM reported TPM_RC_CONTEXT_GAP; refreshing all %d saved sessions", len(saved))
        for entry in saved:
            self.refresh(entry)

    def refresh(self, entry: SessionEntry) -> None:
        """Load and save again: same session, same handle, a new place in the window."""
        assert entry.context is not None
        self.refreshes += 1
        try:
            self.make_room()
            self.link.context_load(entry.context)
            self.saved(entry, self.link.context_save(entry.handle))
        except ContextError as exc:
            log.warning("refreshing session 0x%08x failed, dropping it: %s", entry.handle, exc)
            self.link.flush_quietly(entry.handle)
            if entry.owner is not None:
                # Lost by the RM, as under exhaustion: its owner's next use says so (an
                # RM-layer code), rather than the TPM's answer for a session never seen.
                entry.owner.revoked.add(entry.handle)
            self.sessions.forget(entry.handle)

"""One parsed view of a client command: what it is, which contexts it names, what it creates.

Parsed once per command (execute.validate); every later step reads this instead of the raw
header or its own idea of what the command does.
"""

from __future__ import annotations

from dataclasses import dataclass

from cusetpm.rm.commandtable import SESSION_CREATING
from cusetpm.tpm.command import Command
from cusetpm.tpm.constants import (
    TPM_CC,
    TPM_ST,
    TPMA_CC,
    TPMA_SESSION,
    is_session_handle,
    is_transient_handle,
)

# Objects whose state changes with each command that uses them: saved again every time they
# leave the TPM. A client's ContextLoad blob may hold a sequence object: treated as one.
SEQUENCE_CREATING = frozenset({TPM_CC.HashSequenceStart, TPM_CC.HMAC_Start, TPM_CC.ContextLoad})


@dataclass(frozen=True, slots=True)
class Request:
    cmd: Command
    attrs: TPMA_CC
    creates: str | None  # "object", "session" or None: what its response handle will be
    objects: tuple[int, ...]  # transient (virtual) handles it names, each once, in order
    sessions: tuple[int, ...]  # sessions it uses (the TPM needs them loaded), each once

    @classmethod
    def of(cls, cmd: Command, attrs: TPMA_CC) -> Request:
        return cls(cmd, attrs, _creates(cmd, attrs), _named_objects(cmd), _named_sessions(cmd))

    @property
    def code(self) -> int:
        return self.cmd.commandCode

    @property
    def creates_mutable(self) -> bool:
        return self.code in SEQUENCE_CREATING

    def ended_sessions(self) -> set[int]:
        """Sessions a successful run of the command ends: no save needed (none possible)."""
        ended = {
            s.sessionHandle
            for s in self.cmd.sessions
            if is_session_handle(s.sessionHandle)
            and not s.sessionAttributes & TPMA_SESSION.continueSession
        }
        if self.code == TPM_CC.ContextSave and is_session_handle(self.cmd.handles[0]):
            # Saved through the TPM (the RM answers untagged saves itself with a token): as in
            # the kernel, the session leaves the space.
            ended.add(self.cmd.handles[0])
        if self.code == TPM_CC.FlushContext and is_session_handle(self.cmd.handles[0]):
            ended.add(self.cmd.handles[0])
        return ended

    @property
    def plain_read_public(self) -> bool:
        """ReadPublic of a transient object, well formed, without sessions: its answer depends
        on nothing but the object, so the RM keeps the first and gives it again."""
        cmd = self.cmd
        return (
            cmd.commandCode == TPM_CC.ReadPublic
            and cmd.tag == TPM_ST.NO_SESSIONS
            and not cmd.parameters
            and is_transient_handle(cmd.handles[0])
        )


def handle_count(code: int, attrs: TPMA_CC) -> int:
    """Handles in the handle area. FlushContext names its handle as a parameter; like the
    kernel, the RM treats it as a handle."""
    if code == TPM_CC.FlushContext:
        return 1
    return attrs.cHandles


def _creates(cmd: Command, attrs: TPMA_CC) -> str | None:
    if not attrs.rHandle:
        return None
    if cmd.commandCode in SESSION_CREATING:
        return "session"
    if cmd.commandCode == TPM_CC.ContextLoad:
        saved = int.from_bytes(cmd.parameters[8:12], "big") if len(cmd.parameters) >= 12 else 0
        return "session" if is_session_handle(saved) else "object"
    return "object"


def _named_objects(cmd: Command) -> tuple[int, ...]:
    """Transient handles named; FlushContext of an object is the RM's, not the TPM's."""
    return tuple(dict.fromkeys(h for h in cmd.handles if is_transient_handle(h)))


def _named_sessions(cmd: Command) -> tuple[int, ...]:
    """Sessions the command uses; FlushContext of a session needs it only saved."""
    if cmd.commandCode == TPM_CC.FlushContext:
        return ()
    named = [h for h in cmd.handles if is_session_handle(h)]
    named += [s.sessionHandle for s in cmd.sessions if is_session_handle(s.sessionHandle)]
    return tuple(dict.fromkeys(named))

"""What happens to one client command, in order. Runs on the RM's worker thread only.

    validate  -> framing, command code (the TPM's own list), handle and auth areas
    own       -> every transient handle and session named must belong to the space
    answer    -> what the RM answers itself (FlushContext of an object, handle lists)
    limits    -> per-space object/session quotas, refused before anything runs
    load      -> ContextLoad the objects and sessions the command names (once each)
    map       -> virtual handles -> physical handles in the handle area
    transmit  -> the TPM runs the command
    adopt     -> a new object gets the next virtual handle, a new session joins the space
    put away  -> objects flushed (re-saved first if they change), sessions saved
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass, field

from cusetpm.backends.base import BackendError
from cusetpm.rm.capability import answer_handles, handles_query
from cusetpm.rm.commandtable import SESSION_CREATING, CommandTable
from cusetpm.rm.config import RMConfig
from cusetpm.rm.errors import RMError, foreign_handle
from cusetpm.rm.sessions import SessionTable
from cusetpm.rm.space import SavedObject, Space
from cusetpm.rm.tpmlink import ContextError, TpmLink
from cusetpm.tpm.command import Command, parse_command
from cusetpm.tpm.constants import (
    TPM_CC,
    TPM_HEADER_SIZE,
    TPM_ST,
    TPMA_CC,
    TPMA_SESSION,
    cc_name,
    is_session_handle,
    is_transient_handle,
)
from cusetpm.tpm.errors import BadTagError, SizeMismatchError, TPMParseError
from cusetpm.tpm.rc import TPM_RC, rc_base, rm_rc
from cusetpm.tpm.response import error_response

log = logging.getLogger(__name__)

SUCCESS_RESPONSE = error_response(0)  # a bare 10-byte TPM_RC_SUCCESS
# Objects whose state changes with each command that uses them: always saved again.
SEQUENCE_CREATING = frozenset({TPM_CC.HashSequenceStart, TPM_CC.HMAC_Start})


@dataclass
class Loaded:
    """What the RM put into the TPM for one command, to be put away after it."""

    objects: dict[int, int] = field(default_factory=dict)  # vhandle -> physical handle
    sessions: list[int] = field(default_factory=list)

    def physical(self) -> list[int]:
        return [*self.objects.values(), *self.sessions]


class Executor:
    """Runs one client command for a space against the TPM."""

    def __init__(
        self, link: TpmLink, table: CommandTable, sessions: SessionTable, config: RMConfig
    ):
        self.link = link
        self.table = table
        self.sessions = sessions
        self.config = config

    def execute(self, space: Space, command: bytes) -> bytes:
        parsed, attrs = self.validate(space, command)
        if parsed is None or attrs is None:
            return error_response(rm_rc(TPM_RC.COMMAND_CODE))
        self.check_ownership(space, parsed)
        local = self.answer_locally(space, parsed)
        if local is not None:
            return local
        refusal = self.check_limits(space, parsed, attrs)
        if refusal is not None:
            return refusal
        loaded = self.load(space, parsed)
        try:
            response = self.link.transmit(self.map_command(command, parsed, loaded))
        except BackendError as exc:
            self.unload(loaded)
            raise RMError(errno.EIO, f"TPM backend failed: {exc}") from exc
        return self.put_away(space, parsed, attrs, loaded, response)

    # -- validate -------------------------------------------------------------------------

    def validate(self, space: Space, command: bytes) -> tuple[Command | None, TPMA_CC | None]:
        """Parsed command and its TPMA_CC; (None, None) for a code the TPM does not know."""
        if len(command) < TPM_HEADER_SIZE:
            raise RMError(errno.EINVAL, f"command of {len(command)} bytes is shorter than a header")
        code = int.from_bytes(command[6:10], "big")
        attrs = self.table.lookup(code)
        if attrs is None:
            log.warning("space %d: unknown command code 0x%08x refused", space.id, code)
            return None, None
        try:
            return parse_command(command, _handle_count(code, attrs)), attrs
        except SizeMismatchError as exc:
            raise RMError(errno.EINVAL, f"{cc_name(code)}: {exc}") from exc
        except BadTagError as exc:
            raise RMError(errno.EINVAL, f"{cc_name(code)}: {exc}") from exc
        except TPMParseError as exc:
            raise RMError(errno.EINVAL, f"{cc_name(code)}: malformed: {exc}") from exc

    # -- own ------------------------------------------------------------------------------

    def check_ownership(self, space: Space, cmd: Command) -> None:
        """Transient and session handles must be the space's own; anything else passes."""
        for handle in cmd.handles:
            if is_transient_handle(handle) and handle not in space.objects:
                raise foreign_handle(handle, "handle area")
            if is_session_handle(handle) and handle not in space.sessions:
                raise foreign_handle(handle, "handle area")
        for session in cmd.sessions:
            handle = session.sessionHandle
            if is_session_handle(handle) and handle not in space.sessions:
                raise foreign_handle(handle, "authorization area")

    # -- answer ---------------------------------------------------------------------------

    def answer_locally(self, space: Space, cmd: Command) -> bytes | None:
        if cmd.commandCode == TPM_CC.FlushContext and cmd.tag == TPM_ST.NO_SESSIONS:
            return self.flush_for_client(space, cmd)
        if cmd.commandCode == TPM_CC.GetCapability and cmd.tag == TPM_ST.NO_SESSIONS:
            query = handles_query(cmd.parameters)
            if query is not None:
                return answer_handles(space, *query, client_saved=[])
        return None

    def flush_for_client(self, space: Space, cmd: Command) -> bytes | None:
        """FlushContext of an object only drops its saved context; nothing is in the TPM."""
        (handle,) = cmd.handles
        if is_transient_handle(handle):
            space.drop_object(handle)
            return SUCCESS_RESPONSE
        return None  # sessions: the TPM flushes them (saved or not); see put_away

    # -- limits ---------------------------------------------------------------------------

    def check_limits(self, space: Space, cmd: Command, attrs: TPMA_CC) -> bytes | None:
        creates = _creates(cmd, attrs)
        if creates == "object" and len(space.objects) >= self.config.max_objects:
            log.warning(
                "space %d: %s refused: %d objects is the limit",
                space.id,
                cc_name(cmd.commandCode),
                self.config.max_objects,
            )
            return error_response(rm_rc(TPM_RC.OBJECT_MEMORY))
        if creates == "session" and len(space.sessions) >= self.config.max_sessions:
            log.warning(
                "space %d: %s refused: %d sessions is the limit",
                space.id,
                cc_name(cmd.commandCode),
                self.config.max_sessions,
            )
            return error_response(rm_rc(TPM_RC.SESSION_MEMORY))
        return None

    # -- load -----------------------------------------------------------------------------

    def load(self, space: Space, cmd: Command) -> Loaded:
        loaded = Loaded()
        try:
            for handle in _named_objects(cmd):
                if handle not in loaded.objects:
                    loaded.objects[handle] = self.load_object(space, handle)
            for handle in _named_sessions(cmd):
                if handle not in loaded.sessions:
                    self.load_session(space, handle)
                    loaded.sessions.append(handle)
        except BaseException:
            self.unload(loaded)
            raise
        return loaded

    def load_object(self, space: Space, vhandle: int) -> int:
        try:
            return self.link.context_load(space.objects[vhandle].context)
        except ContextError as exc:
            space.drop_object(vhandle)
            raise _context_errno(space, exc, f"object 0x{vhandle:08x} lost") from exc

    def load_session(self, space: Space, handle: int) -> None:
        entry = self.sessions.get(handle)
        if entry is None or entry.context is None:
            self.sessions.forget(handle)
            raise RMError(errno.ENOENT, f"session 0x{handle:08x} has no saved context")
        try:
            loaded_as = self.link.context_load(entry.context)
        except ContextError as exc:
            self.sessions.forget(handle)
            raise _context_errno(space, exc, f"session 0x{handle:08x} lost") from exc
        if loaded_as != handle:
            self.link.flush_quietly(loaded_as)
            self.sessions.forget(handle)
            raise RMError(errno.EFAULT, f"session 0x{handle:08x} came back as 0x{loaded_as:08x}")
        entry.context = None  # the TPM now holds the only valid copy

    def unload(self, loaded: Loaded) -> None:
        """Error path: take back out of the TPM what load() put in."""
        for handle in loaded.objects.values():
            self.link.flush_quietly(handle)
        for handle in loaded.sessions:
            self.save_session_or_forget(handle)

    # -- map ------------------------------------------------------------------------------

    @staticmethod
    def map_command(command: bytes, cmd: Command, loaded: Loaded) -> bytes:
        if not loaded.objects:
            return command
        wire = bytearray(command)
        for i, handle in enumerate(cmd.handles):
            physical = loaded.objects.get(handle)
            if physical is not None:
                offset = TPM_HEADER_SIZE + 4 * i
                wire[offset : offset + 4] = physical.to_bytes(4, "big")
        return bytes(wire)

    # -- adopt and put away ---------------------------------------------------------------

    def put_away(
        self, space: Space, cmd: Command, attrs: TPMA_CC, loaded: Loaded, response: bytes
    ) -> bytes:
        """Adopt new handles, then leave nothing of the space in the TPM."""
        rc = int.from_bytes(response[6:10], "big") if len(response) >= TPM_HEADER_SIZE else -1
        failures: list[RMError] = []
        new_object: tuple[int, int] | None = None
        if rc == 0 and attrs.rHandle and len(response) >= TPM_HEADER_SIZE + 4:
            response, new_object = self.adopt(space, cmd, response)
        ended = self.ended_sessions(cmd, attrs, rc)
        for vhandle, physical in loaded.objects.items():
            if rc == 0 and attrs.flushed:
                space.drop_object(vhandle)  # the command itself flushed it (SequenceComplete)
                continue
            self.put_object_away(space, vhandle, physical, failures)
        if new_object is not None:
            self.put_object_away(space, *new_object, failures)
        for handle in loaded.sessions:
            if handle in ended:
                self.sessions.forget(handle)
            else:
                self.save_session_or_forget(handle, failures)
        if rc == 0 and cmd.commandCode == TPM_CC.FlushContext:
            self.sessions.forget(cmd.handles[0])
        if failures:
            raise failures[0]
        return response

    def adopt(
        self, space: Space, cmd: Command, response: bytes
    ) -> tuple[bytes, tuple[int, int] | None]:
        handle = int.from_bytes(response[TPM_HEADER_SIZE : TPM_HEADER_SIZE + 4], "big")
        if is_session_handle(handle):
            self.sessions.add(handle, space)
            self.save_session_or_forget(handle)
            return response, None
        if not is_transient_handle(handle):
            return response, None
        vhandle = space.new_vhandle()
        # A client's ContextLoad blob may hold a sequence object: treat it as one.
        mutable = cmd.commandCode in SEQUENCE_CREATING or cmd.commandCode == TPM_CC.ContextLoad
        space.objects[vhandle] = SavedObject(context=b"", mutable=mutable)
        wire = bytearray(response)
        wire[TPM_HEADER_SIZE : TPM_HEADER_SIZE + 4] = vhandle.to_bytes(4, "big")
        return bytes(wire), (vhandle, handle)

    def ended_sessions(self, cmd: Command, attrs: TPMA_CC, rc: int) -> set[int]:
        """Sessions the command itself ended: no save needed (and none possible)."""
        if rc != 0:
            return set()
        ended = {
            s.sessionHandle
            for s in cmd.sessions
            if is_session_handle(s.sessionHandle)
            and not s.sessionAttributes & TPMA_SESSION.continueSession
        }
        if cmd.commandCode == TPM_CC.ContextSave and is_session_handle(cmd.handles[0]):
            # The client saved it: like the kernel, the session leaves the space.
            ended.add(cmd.handles[0])
        return ended

    def put_object_away(
        self, space: Space, vhandle: int, physical: int, failures: list[RMError]
    ) -> None:
        entry = space.objects.get(vhandle)
        try:
            if entry is not None and (entry.mutable or not entry.context):
                entry.context = self.link.context_save(physical)
            self.link.flush(physical)
        except ContextError as exc:
            if not exc.gone:
                self.link.flush_quietly(physical)
                failures.append(_context_errno(space, exc, f"object 0x{vhandle:08x} lost"))
            space.drop_object(vhandle)
        except BackendError as exc:
            space.drop_object(vhandle)
            failures.append(RMError(errno.EIO, f"TPM backend failed: {exc}"))

    def save_session_or_forget(self, handle: int, failures: list[RMError] | None = None) -> None:
        entry = self.sessions.get(handle)
        try:
            context = self.link.context_save(handle)
        except ContextError as exc:
            self.sessions.forget(handle)
            if not exc.gone:
                self.link.flush_quietly(handle)
                if failures is not None and entry is not None and entry.owner is not None:
                    lost = f"session 0x{handle:08x} lost"
                    failures.append(_context_errno(entry.owner, exc, lost))
            return
        except BackendError as exc:
            self.sessions.forget(handle)
            if failures is not None:
                failures.append(RMError(errno.EIO, f"TPM backend failed: {exc}"))
            return
        if entry is None:
            self.link.flush_quietly(handle)  # nobody owns it any more: do not keep it alive
            return
        entry.context = context


def _handle_count(code: int, attrs: TPMA_CC) -> int:
    # FlushContext names its handle as a parameter; like the kernel, treat it as a handle.
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


def _named_objects(cmd: Command) -> list[int]:
    return [h for h in cmd.handles if is_transient_handle(h)]


def _named_sessions(cmd: Command) -> list[int]:
    """Sessions the command uses; FlushContext of a session needs it only saved."""
    if cmd.commandCode == TPM_CC.FlushContext:
        return []
    named = [h for h in cmd.handles if is_session_handle(h)]
    named += [s.sessionHandle for s in cmd.sessions if is_session_handle(s.sessionHandle)]
    return named


def _context_errno(space: Space, exc: ContextError, what: str) -> RMError:
    """The kernel's mapping of a failed context operation to an errno (tpm2_load_context)."""
    base = rc_base(exc.rc)
    if base in (TPM_RC.HANDLE, TPM_RC.REFERENCE_H0):
        err = errno.ENOENT
    elif base == TPM_RC.INTEGRITY:
        err = errno.EINVAL
    else:
        err = errno.EFAULT
    log.warning("space %d: %s: %s", space.id, what, exc)
    return RMError(err, f"{what}: {exc}")

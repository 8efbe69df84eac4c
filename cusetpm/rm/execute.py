"""What happens to one client command, in order. Runs for whoever holds the manager's `_current`
job: the worker thread, or a submitter running its command inline on an idle TPM.

validate  -> framing, command code (the TPM's own list), handle and auth areas
own       -> every transient handle and session named must belong to the space
answer    -> what the RM answers itself (FlushContext of an object, handle lists,
             a client's ContextSave/ContextLoad of a session: continuation.py)
limits    -> per-space object/session quotas, refused before anything runs
room      -> a new session needs a free TPM session: else the command waits (manager.py)
load      -> ContextLoad the objects and sessions the command names (once each)
map       -> virtual handles -> physical handles in the handle area
transmit  -> the TPM runs the command
adopt     -> a new object gets the next virtual handle, a new session joins the space
put away  -> objects flushed (re-saved first if they change), sessions saved (regap.py)
"""

from __future__ import annotations

import errno
import logging
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from cusetpm.backends.base import BackendError
from cusetpm.policy import decide
from cusetpm.rm import continuation, refusals
from cusetpm.rm.capability import answer_handles, handles_query, rewrite_properties
from cusetpm.rm.commandtable import SESSION_CREATING, CommandTable
from cusetpm.rm.config import RMConfig
from cusetpm.rm.errors import RMError, foreign_handle
from cusetpm.rm.regap import Regapper
from cusetpm.rm.sessions import SessionEntry, SessionTable
from cusetpm.rm.space import SavedObject, Space
from cusetpm.rm.tpmlink import ContextError, TpmLink
from cusetpm.tpm import commands as build
from cusetpm.tpm.command import Command, parse_command
from cusetpm.tpm.constants import (
    TPM_CAP,
    TPM_CC,
    TPM_HEADER_SIZE,
    TPM_HT,
    TPM_ST,
    TPMA_CC,
    TPMA_SESSION,
    cc_name,
    command_name,
    handle_type,
    is_session_handle,
    is_transient_handle,
    session_types_at,
)
from cusetpm.tpm.errors import BadTagError, SizeMismatchError, TPMParseError
from cusetpm.tpm.rc import RC_N_SHIFT, RC_P, TPM_RC, rc_base, rm_rc
from cusetpm.tpm.response import Response, error_response

log = logging.getLogger(__name__)

SUCCESS_RESPONSE = error_response(0)  # a bare 10-byte TPM_RC_SUCCESS
# A command the node's policy refuses: RM layer | TPM_RC_DISABLED (0x000B0120), tpm2_rc_decode:
# "rmt:error(2.0): the command is disabled".
POLICY_REFUSED = rm_rc(TPM_RC.DISABLED)
# The TPM has no room for another session (handles, or memory to load one).
NO_SESSION_ROOM = frozenset({TPM_RC.SESSION_HANDLES, TPM_RC.SESSION_MEMORY})


# The TPM has no memory to load a context now (platform firmware may hold slots): nothing is
# lost, the command is refused with the TPM's own code and may be retried.
NO_MEMORY = frozenset({TPM_RC.OBJECT_MEMORY, TPM_RC.SESSION_MEMORY, TPM_RC.MEMORY})


class SessionsExhausted(Exception):
    """A new session needs a free TPM session: the manager makes the command wait."""


class NoTpmMemory(Exception):
    """The RM's own ContextLoad found the TPM full; the context itself is fine."""

    def __init__(self, rc: int):
        super().__init__(f"TPM memory full: rc 0x{rc:x}")
        self.rc = rc


# Objects whose state changes with each command that uses them: always saved again.
SEQUENCE_CREATING = frozenset({TPM_CC.HashSequenceStart, TPM_CC.HMAC_Start})


@dataclass
class Loaded:
    """What the RM put into the TPM for one command, to be put away after it."""

    objects: dict[int, int] = field(default_factory=dict)  # vhandle -> physical handle
    sessions: list[int] = field(default_factory=list)


class Executor:
    """Runs one client command for a space against the TPM."""

    def __init__(
        self,
        link: TpmLink,
        table: CommandTable,
        sessions: SessionTable,
        config: RMConfig,
        regapper: Regapper,
        active_sessions_max: int,
    ):
        self.link = link
        self.table = table
        self.sessions = sessions
        self.config = config
        self.regapper = regapper
        self.active_sessions_max = active_sessions_max
        self.reconcile_needed = False
        # Objects and sessions the TPM held before the RM started (firmware may keep some):
        # never flushed by the RM.
        self.baseline: set[int] = set()
        # Sessions the RM gave up whose flush the TPM refused: flushed again at reconcile.
        self.orphans: set[int] = set()
        # policy refusals by (node, reason), for `cusetpm status`
        self.policy_refusals: Counter[tuple[str, str]] = Counter()

    def execute(self, space: Space, command: bytes, queue_behind: bool = False) -> bytes:
        """The response to one command. `queue_behind`: others are waiting for a TPM session,
        so a command needing a new one must wait too (SessionsExhausted), after its checks."""
        try:
            parsed, attrs = self.validate(space, command)
        except BadTagError:
            return self.answer_bad_tag(space, command)
        if parsed is None or attrs is None:
            return error_response(rm_rc(TPM_RC.COMMAND_CODE))
        refusal = self.check_policy(space, parsed)
        if refusal is not None:
            return refusal
        refusal = self.check_ownership(space, parsed)
        if refusal is not None:
            return refusal
        local = self.answer_locally(space, parsed)
        if local is not None:
            return local
        refusal = self.check_limits(space, parsed, attrs)
        if refusal is not None:
            return refusal
        creates_session = _creates(parsed, attrs) == "session"
        if creates_session and (queue_behind or len(self.sessions) >= self.active_sessions_max):
            raise SessionsExhausted()
        try:
            if self.reconcile_needed:
                self.reconcile()
            try:
                loaded = self.load(space, parsed)
            except NoTpmMemory as exc:
                log.warning("space %d: %s; %s refused", space.id, exc, cc_name(parsed.commandCode))
                return error_response(exc.rc)
            response = self.link.transmit(self.map_command(command, parsed, loaded))
            if creates_session and _rc(response) in NO_SESSION_ROOM:
                self.unload(loaded)  # someone outside the RM holds sessions too: wait as well
                raise SessionsExhausted()
            response = self.put_away(space, parsed, attrs, loaded, response)
            if self.config.proactive_regap:
                self.regapper.check()
        except BackendError as exc:
            self.after_transport_failure(space)
            raise RMError(errno.EIO, f"TPM backend failed: {exc}") from exc
        return response

    # -- validate -------------------------------------------------------------------------

    def validate(self, space: Space, command: bytes) -> tuple[Command | None, TPMA_CC | None]:
        """Parsed command and its TPMA_CC; (None, None) for a code the TPM does not know."""
        if len(command) < TPM_HEADER_SIZE:
            raise RMError(errno.EINVAL, f"command of {len(command)} bytes is shorter than a header")
        code = int.from_bytes(command[6:10], "big")
        attrs = self.table.lookup(code)
        if attrs is None:
            refusals.warn(space, "unknown command code 0x%08x refused", code)
            return None, None
        try:
            return parse_command(command, _handle_count(code, attrs)), attrs
        except SizeMismatchError as exc:
            raise RMError(errno.EINVAL, f"{cc_name(code)}: {exc}") from exc
        except BadTagError:
            raise  # answered as the TPM answers it: see execute()
        except TPMParseError as exc:
            raise RMError(errno.EINVAL, f"{cc_name(code)}: malformed: {exc}") from exc

    def answer_bad_tag(self, space: Space, command: bytes) -> bytes:
        """The kernel passes a command with a bad tag on, and the TPM refuses it at the tag
        before it reads further (libtpms: TPM_RC_BAD_TAG or TPM_RC_VALUE, by tag). The TPM
        answers here too, but it is sent the header alone: none of the command's handles
        reach the TPM."""
        header = command[0:2] + TPM_HEADER_SIZE.to_bytes(4, "big") + command[6:10]
        try:
            response = self.link.transmit(header)
        except BackendError as exc:
            raise RMError(errno.EIO, f"TPM backend failed: {exc}") from exc
        refusals.warn(space, "%s with tag 0x%04x: the TPM answered 0x%03x", command_name(command),
                      int.from_bytes(command[0:2], "big"), _rc(response))
        return response

    # -- own ------------------------------------------------------------------------------

    def check_policy(self, space: Space, cmd: Command) -> bytes | None:
        """The node's policy (policy/): a refused command never reaches the TPM."""
        if space.policy is None:
            return None
        decision = decide(space.policy, cmd)
        if decision.allowed:
            return None
        self.policy_refusals[(space.node, decision.reason)] += 1
        if cmd.commandCode not in space.policy_logged:  # once per space and command code
            space.policy_logged.add(cmd.commandCode)
            log.warning("space %d: node %s pid %d uid %d: %s refused: %s", space.id,
                        space.node, space.pid, space.uid, cc_name(cmd.commandCode),
                        decision.reason)
        return error_response(POLICY_REFUSED)

    def check_ownership(self, space: Space, cmd: Command) -> bytes | None:
        """Transient and session handles must be the space's own; anything else passes.

        A transient handle of another space is EINVAL, as in the kernel. A session that is
        not the space's (another space's, one the TPM ended, one never seen) is answered as
        the TPM answers a session that is not there, without reaching the TPM: the kernel
        passes session handles through, and clients (ESAPI) expect the TPM's response code
        there, not an errno. Another space's session thus reads exactly like an absent one.
        A session the RM evicted under exhaustion gets the RM-layer TPM_RC_REFERENCE_H<n>/S<n>.
        """
        for i, handle in enumerate(cmd.handles):
            if is_transient_handle(handle) and handle not in space.objects:
                if handle in space.lost:  # see after_tpm_restart
                    raise RMError(errno.ENOENT, f"object 0x{handle:08x} lost: the TPM restarted")
                raise foreign_handle(handle, "handle area")
            if is_session_handle(handle) and handle not in space.sessions:
                if handle in space.evicted:
                    return self.evicted(space, handle, rm_rc(TPM_RC.REFERENCE_H0 + i))
                return self.absent_session(space, cmd, handle, absent_handle_rc(cmd, i))
        for i, session in enumerate(cmd.sessions):
            handle = session.sessionHandle
            if is_session_handle(handle) and handle not in space.sessions:
                if handle in space.evicted:
                    return self.evicted(space, handle, rm_rc(TPM_RC.REFERENCE_S0 + i))
                return self.absent_session(space, cmd, handle, TPM_RC.REFERENCE_S0 + i)
        return None

    def absent_session(self, space: Space, cmd: Command, handle: int, rc: int) -> bytes:
        refusals.warn(
            space, "%s names session 0x%08x, not this space's: answered 0x%03x",
            cc_name(cmd.commandCode), handle, rc,
        )
        return error_response(rc)

    @staticmethod
    def evicted(space: Space, handle: int, rc: int) -> bytes:
        refusals.warn(space, "session 0x%08x was evicted under session exhaustion", handle)
        return error_response(rc)

    # -- answer ---------------------------------------------------------------------------

    def answer_locally(self, space: Space, cmd: Command) -> bytes | None:
        if cmd.tag != TPM_ST.NO_SESSIONS:
            self.refuse_unfilterable(cmd)
            return None  # a response the RM wrote itself would break the session's HMAC
        if cmd.commandCode == TPM_CC.FlushContext:
            return self.flush_for_client(space, cmd)
        if _plain_read_public(cmd):
            return space.objects[cmd.handles[0]].read_public  # None: not asked yet
        if cmd.commandCode == TPM_CC.GetCapability:
            query = handles_query(cmd.parameters)
            if query is not None:
                return answer_handles(space, *query, client_saved=sorted(space.client_saved))
        if cmd.commandCode == TPM_CC.ContextSave and is_session_handle(cmd.handles[0]):
            return self.save_session_for_client(space, cmd.handles[0])
        if cmd.commandCode == TPM_CC.ContextLoad:
            token = continuation.token_of(cmd.parameters)
            if token is not None:
                return self.load_session_for_client(space, token)
        return None

    @staticmethod
    def refuse_unfilterable(cmd: Command) -> None:
        """A handle list with a session attached: the TPM's answer would show every space's
        sessions (and none of this space's objects), and the RM cannot filter it without
        breaking the response HMAC. Refused, rather than leak or lie."""
        if cmd.commandCode == TPM_CC.GetCapability and handles_query(cmd.parameters):
            raise RMError(
                errno.EINVAL,
                "GetCapability(TPM_CAP_HANDLES) of transient or session handles "
                "with an authorization area cannot be answered per space",
            )

    def save_session_for_client(self, space: Space, handle: int) -> bytes:
        """The client gets a token; the session leaves the space but stays in the TPM."""
        entry = self.sessions.get(handle)
        if entry is None or entry.context is None:
            raise RMError(errno.ENOENT, f"session 0x{handle:08x} has no saved context")
        token = continuation.new_token()
        self.sessions.client_saved(entry, token)
        log.debug("space %d: session 0x%08x saved by the client", space.id, handle)
        parameters = continuation.token_context(entry, token)
        return Response(TPM_ST.NO_SESSIONS, 0, parameters=parameters).to_bytes()

    def load_session_for_client(self, space: Space, token: bytes) -> bytes:
        """A token presented: the session joins this space. No TPM command is needed."""
        entry = self.sessions.by_token(token)
        if entry is None:
            refusals.warn(space, "ContextLoad of a spent or unknown session token")
            return error_response(continuation.RC_STALE_TOKEN)
        if entry.saved_by is not space and self.session_count(space) >= self.config.max_sessions:
            return self.over_limit(space, "TPM2_ContextLoad", "sessions", TPM_RC.SESSION_MEMORY)
        self.sessions.claim(entry, space)
        log.debug("space %d: session 0x%08x loaded from a token", space.id, entry.handle)
        return Response(TPM_ST.NO_SESSIONS, 0, handle=entry.handle).to_bytes()

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
            return self.over_limit(space, cc_name(cmd.commandCode), "objects", TPM_RC.OBJECT_MEMORY)
        if creates == "session" and self.session_count(space) >= self.config.max_sessions:
            name = cc_name(cmd.commandCode)
            return self.over_limit(space, name, "sessions", TPM_RC.SESSION_MEMORY)
        per_uid = self.config.max_sessions_per_uid
        if (creates == "session" and per_uid is not None and space.uid != 0
                and self.uid_sessions(space.uid) >= per_uid):  # root is not limited
            refusals.warn(space, "%s refused: uid %d holds %d sessions, its limit",
                          cc_name(cmd.commandCode), space.uid, per_uid)
            return error_response(rm_rc(TPM_RC.SESSION_MEMORY))
        return None

    def uid_sessions(self, uid: int) -> int:
        """Sessions charged to a uid over all its spaces (every node)."""
        return sum(1 for entry in self.sessions if entry.owner is not None
                   and entry.owner.uid == uid)

    @staticmethod
    def session_count(space: Space) -> int:
        """Sessions charged to a space: its own, and those it saved and may load again."""
        return len(space.sessions) + len(space.client_saved)

    def over_limit(self, space: Space, name: str, what: str, rc: int) -> bytes:
        limit = self.config.max_objects if what == "objects" else self.config.max_sessions
        refusals.warn(space, "%s refused: %d %s is the limit", name, limit, what)
        return error_response(rm_rc(rc))

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
            if rc_base(exc.rc) in NO_MEMORY:
                raise NoTpmMemory(exc.rc) from exc
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
            if rc_base(exc.rc) in NO_MEMORY:
                raise NoTpmMemory(exc.rc) from exc
            # The context is useless now, but the TPM still counts the session: free it.
            self.link.flush_quietly(handle)
            self.sessions.forget(handle)
            raise _context_errno(space, exc, f"session 0x{handle:08x} lost") from exc
        if loaded_as != handle:
            self.link.flush_quietly(loaded_as)
            self.sessions.forget(handle)
            raise RMError(errno.EFAULT, f"session 0x{handle:08x} came back as 0x{loaded_as:08x}")
        self.sessions.loaded(entry)  # the TPM now holds the only valid copy

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
        rc = _rc(response)
        failures: list[RMError] = []
        new_object: tuple[int, int] | None = None
        if rc == 0 and attrs.rHandle and len(response) >= TPM_HEADER_SIZE + 4:
            response, new_object = self.adopt(space, cmd, response, failures)
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
        if rc == 0 and cmd.commandCode == TPM_CC.GetCapability and cmd.tag == TPM_ST.NO_SESSIONS:
            response = rewrite_properties(response)
        if rc == 0 and _plain_read_public(cmd):
            entry = space.objects.get(cmd.handles[0])
            if entry is not None:
                entry.read_public = response  # no handle in it: valid however it is loaded
        return response

    def adopt(
        self, space: Space, cmd: Command, response: bytes, failures: list[RMError]
    ) -> tuple[bytes, tuple[int, int] | None]:
        handle = int.from_bytes(response[TPM_HEADER_SIZE : TPM_HEADER_SIZE + 4], "big")
        if is_session_handle(handle):
            self.sessions.add(handle, space)
            # A new session that cannot be saved is flushed: the client must not be told it
            # has one (its first use would fail).
            self.save_session_or_forget(handle, failures)
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
            # Saved through the TPM (the RM answers untagged saves itself with a token, see
            # answer_locally): as in the kernel, the session leaves the space.
            ended.add(cmd.handles[0])
        return ended

    def put_object_away(
        self, space: Space, vhandle: int, physical: int, failures: list[RMError]
    ) -> None:
        """Save the object if its context changed (or is new), then free its slot.

        A failed save loses the object: the space is told. A failed flush loses nothing (the
        saved context is good) but may leave the slot taken: the next command reconciles.
        """
        entry = space.objects.get(vhandle)
        if entry is not None and (entry.mutable or not entry.context):
            try:
                entry.context = self.link.context_save(physical)
            except ContextError as exc:
                self.link.flush_quietly(physical)
                space.drop_object(vhandle)
                failures.append(_context_errno(space, exc, f"object 0x{vhandle:08x} lost"))
                return
        try:
            self.link.flush(physical)
        except ContextError as exc:
            if not exc.gone:
                log.warning("space %d: %s; will reconcile", space.id, exc)
                self.reconcile_needed = True

    def save_session_or_forget(self, handle: int, failures: list[RMError] | None = None) -> None:
        """Save a loaded session; one that cannot be saved is flushed and its owner told."""
        entry = self.sessions.get(handle)
        try:
            context = self.save_session(handle)
        except ContextError as exc:
            self.link.flush_quietly(handle)
            self.sessions.forget(handle)
            if failures is not None and entry is not None and entry.owner is not None:
                lost = f"session 0x{handle:08x} lost"
                failures.append(_context_errno(entry.owner, exc, lost))
            return
        if entry is None:
            self.link.flush_quietly(handle)  # nobody owns it any more: do not keep it alive
            return
        self.regapper.saved(entry, context)

    def save_session(self, handle: int) -> bytes:
        """ContextSave of a session; on TPM_RC_CONTEXT_GAP, regap and try once more."""
        try:
            return self.link.context_save(handle)
        except ContextError as exc:
            if exc.rc != TPM_RC.CONTEXT_GAP:
                raise
        self.regapper.recover()
        return self.link.context_save(handle)

    # -- close ----------------------------------------------------------------------------

    def close(self, space: Space) -> None:
        """Nothing of the space stays in the TPM, but the sessions it saved for later."""
        for entry in self.sessions.owned_by(space):
            self.flush_forgotten(entry.handle)
            self.sessions.forget(entry.handle)
        for handle in sorted(space.client_saved):
            saved = self.sessions.get(handle)
            if saved is not None:
                self.sessions.abandon(saved)
        self.prune_abandoned()
        for vhandle in list(space.objects):
            space.drop_object(vhandle)
        space.evicted.clear()
        if self.orphans:
            try:
                self.reconcile()
            except BackendError as exc:
                log.warning("TPM backend failing at close (%s); will reconcile later", exc)

    def flush_forgotten(self, handle: int) -> None:
        """Flush a session the RM stops accounting for. A refused flush would leave it in
        the TPM (saved, where reconcile's listing of loaded sessions does not see it) with
        nobody to free it: it is remembered and flushed again at the next reconcile."""
        try:
            self.link.flush(handle)
        except ContextError as exc:
            if not exc.gone:
                log.warning("%s; will flush again", exc)
                self.orphans.add(handle)
                self.reconcile_needed = True

    def prune_abandoned(self) -> None:
        abandoned = self.sessions.abandoned_oldest_first()
        for entry in abandoned[: max(0, len(abandoned) - self.config.max_abandoned_sessions)]:
            log.info("abandoned session 0x%08x flushed: too many abandoned", entry.handle)
            self.flush_forgotten(entry.handle)
            self.sessions.forget(entry.handle)

    # -- exhaustion -----------------------------------------------------------------------

    def evict_idle_session(self, idle_for: float, in_flight: set[int]) -> SessionEntry | None:
        """Flush the least recently used session idle for `idle_for` s; None if there is none.

        Only saved sessions qualify (the running command's are loaded), and none that a
        command already written but not yet run names (`in_flight`).
        """
        deadline = time.monotonic() - idle_for
        idle = [
            e
            for e in self.sessions
            if e.context is not None and e.last_used <= deadline and e.handle not in in_flight
        ]
        if not idle:
            return None
        victim = min(idle, key=lambda e: e.last_used)
        self.link.flush_quietly(victim.handle)
        if victim.owner is not None:
            victim.owner.evicted.add(victim.handle)
        self.sessions.forget(victim.handle)
        log.warning(
            "session 0x%08x (space %s, idle %.1f s) evicted: the TPM has no free session",
            victim.handle,
            victim.owner.id if victim.owner else "-",
            time.monotonic() - victim.last_used,
        )
        return victim

    def next_evictable_at(self, idle_for: float) -> float | None:
        """When the first saved session will have been idle for `idle_for` s."""
        times = [e.last_used for e in self.sessions if e.context is not None]
        return min(times) + idle_for if times else None

    # -- transport failures ---------------------------------------------------------------

    def after_transport_failure(self, space: Space) -> None:
        """The TPM may have done more than the RM heard of: clean up now, or before the next
        command if the backend is still down."""
        for vhandle, entry in list(space.objects.items()):
            if not entry.context:
                space.drop_object(vhandle)  # created by the lost command, never saved
        self.reconcile_needed = True
        try:
            self.reconcile()
        except BackendError as exc:
            log.warning("TPM backend still failing (%s); will reconcile later", exc)

    def reconcile(self) -> None:
        """Bring the TPM back to the RM's picture: nothing loaded between commands.

        Transient objects and loaded sessions the RM does not account for are flushed
        (but those present when the RM started: firmware may own them); sessions the RM had
        loaded are saved again, or dropped (their owners get the evicted error) if lost;
        sessions the RM gave up but could not flush (`orphans`) are flushed again.
        """
        for handle in self.tpm_handles(TPM_HT.TRANSIENT):
            if handle not in self.baseline:
                self.link.flush_quietly(handle)
        loaded = set(self.tpm_handles(TPM_HT.HMAC_SESSION))
        for handle in loaded:
            # A session of the RM's that is loaded: whatever context the RM holds is stale.
            if self.sessions.get(handle) is not None:
                self.save_session_or_forget(handle)
            elif handle not in self.baseline:
                self.link.flush_quietly(handle)
        for handle in sorted(self.orphans):
            if self.sessions.get(handle) is None:  # else the TPM gave the number out again
                try:
                    self.link.flush(handle)
                except ContextError as exc:
                    if not exc.gone:
                        log.warning("%s; will flush again", exc)
                        continue
            self.orphans.discard(handle)
        for entry in self.sessions:
            if entry.context is None and entry.handle not in loaded:
                self.link.flush_quietly(entry.handle)
                if entry.owner is not None:
                    entry.owner.evicted.add(entry.handle)
                self.sessions.forget(entry.handle)
        self.reconcile_needed = bool(self.orphans)
        log.info("reconciled the TPM with the RM's tables")

    def tpm_handles(self, kind: int) -> list[int]:
        """The TPM's own list of handles of one type (the RM's view, not a space's)."""
        handles: list[int] = []
        prop = kind << 24
        while True:
            more, data = build.parse_get_capability(
                self.link.transmit(build.get_capability(TPM_CAP.HANDLES, prop, 254))
            )
            handles.extend(data.handles)
            if not more or not data.handles:
                return handles
            prop = data.handles[-1] + 1

    def sessions_named(self, commands: list[bytes]) -> set[int]:
        """Session handles that these (not yet validated) commands name, as far as they parse."""
        named: set[int] = set()
        for command in commands:
            attrs = self.table.lookup(int.from_bytes(command[6:10], "big")) if command else None
            if attrs is None:
                continue
            try:
                cmd = parse_command(command, _handle_count(cmd_code(command), attrs))
            except TPMParseError:
                continue
            named.update(h for h in cmd.handles if is_session_handle(h))
            named.update(s.sessionHandle for s in cmd.sessions)
        return named

    # -- the TPM restarted (rm/backendstate.py detects it) --------------------------------

    def after_tpm_restart(self, spaces: Iterable[Space], flush: bool) -> None:
        """The TPM was reset or restarted: every context the RM saved is useless (session
        contexts die with a TPM Reset/Restart; object contexts of the null hierarchy too, and
        the RM cannot tell which others would still load). Forget them all, so that their
        owners get the RM's documented answers instead of the TPM's integrity failures:
        a session: the RM-layer TPM_RC_REFERENCE_H<n>/S<n> of an evicted one; a token: the
        stale-token code; an object: ENOENT (check_ownership). `flush`: no TPM Reset (the
        reset count is the same), so the TPM may still hold the saved sessions (a Resume
        keeps them): flush them, or they would fill its slots with nobody to free them."""
        for entry in self.sessions:
            if flush:
                self.link.flush_quietly(entry.handle)
            if entry.owner is not None:
                entry.owner.evicted.add(entry.handle)
            self.sessions.forget(entry.handle)  # a client-saved session's token is spent too
        for space in spaces:
            # Popped, not dropped: a lost handle's number is not given to a new object.
            space.lost.update(space.objects)
            space.objects.clear()
        self.orphans.clear()
        self.reconcile_needed = False
        self.regapper.latest = 0  # the TPM numbers session saves from the start again


def cmd_code(command: bytes) -> int:
    return int.from_bytes(command[6:10], "big")


def _plain_read_public(cmd: Command) -> bool:
    """ReadPublic of a transient object, well formed, without sessions: its answer depends on
    nothing but the object, so the RM keeps the first and gives it again (no TPM command)."""
    return (
        cmd.commandCode == TPM_CC.ReadPublic
        and cmd.tag == TPM_ST.NO_SESSIONS
        and not cmd.parameters
        and is_transient_handle(cmd.handles[0])
    )


def absent_handle_rc(cmd: Command, position: int) -> int:
    """What the TPM answers for a session handle at this handle position that it does not hold.

    The TPM checks the handle's type first (TPM_RC_VALUE for handle n+1), then that it is
    loaded (TPM_RC_REFERENCE_H<n>). FlushContext names its handle as a parameter:
    TPM_RC_HANDLE for parameter 1.
    """
    if cmd.commandCode == TPM_CC.FlushContext:
        return TPM_RC.HANDLE | RC_P | (1 << RC_N_SHIFT)
    accepted = session_types_at(cmd.commandCode, position, len(cmd.handles))
    if handle_type(cmd.handles[position]) not in accepted:
        return TPM_RC.VALUE | ((position + 1) << RC_N_SHIFT)
    return TPM_RC.REFERENCE_H0 + position


def _rc(response: bytes) -> int:
    return int.from_bytes(response[6:10], "big") if len(response) >= TPM_HEADER_SIZE else -1


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

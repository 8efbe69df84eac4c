"""What happens to one client command, in order. Runs for whoever holds the manager's `_current`
job: the worker thread, or a submitter running its command inline on an idle TPM.

validate  -> framing, command code (the TPM's own list), handle and auth areas: one Request
policy    -> the node's policy (policy/): a refused command never reaches the TPM
own       -> every transient handle and session named must belong to the space
answer    -> what the RM answers itself (FlushContext of an object, handle lists, cached
             ReadPublic, a client's ContextSave/ContextLoad of a session: continuation.py)
limits    -> per-space object/session quotas, refused before anything runs
room      -> a new session needs a free TPM session: else the command waits (manager.py)
resident  -> residency.py makes what the command names resident (evicting others if the TPM
             is full) and pins it
map       -> virtual handles -> physical handles in the handle area
transmit  -> the TPM runs the command; each TPM warning gets its one fix (residency.py)
adopt     -> a new object gets the next virtual handle, a new session joins the space
finish    -> residency.py unpins, and puts contexts away as the mode says (eager: all)
"""

from __future__ import annotations

import errno
import logging
import time
from collections import Counter
from collections.abc import Iterable

from cusetpm.backends.base import BackendError
from cusetpm.policy import decide
from cusetpm.rm import continuation, refusals
from cusetpm.rm.capability import answer_handles, handles_query, rewrite_properties
from cusetpm.rm.commandtable import CommandTable
from cusetpm.rm.config import RMConfig
from cusetpm.rm.errors import RMError, foreign_handle
from cusetpm.rm.quotas import Quotas, fair_victim
from cusetpm.rm.regap import Regapper
from cusetpm.rm.request import Request, handle_count
from cusetpm.rm.residency import NoTpmMemory, Residency
from cusetpm.rm.sessions import SessionEntry, SessionTable
from cusetpm.rm.space import Space
from cusetpm.rm.tpmlink import ContextError, TpmLink
from cusetpm.tpm import commands as build
from cusetpm.tpm.command import Command, parse_command
from cusetpm.tpm.constants import (
    TPM_CAP,
    TPM_CC,
    TPM_HEADER_SIZE,
    TPM_HT,
    TPM_ST,
    cc_name,
    command_name,
    handle_type,
    is_session_handle,
    is_transient_handle,
    session_types_at,
)
from cusetpm.tpm.errors import BadTagError, SizeMismatchError, TPMParseError
from cusetpm.tpm.rc import RC_N_SHIFT, RC_P, TPM_RC, rm_rc
from cusetpm.tpm.response import Response, error_response

log = logging.getLogger(__name__)

SUCCESS_RESPONSE = error_response(0)  # a bare 10-byte TPM_RC_SUCCESS
# A command the node's policy refuses: RM layer | TPM_RC_DISABLED (0x000B0120), tpm2_rc_decode:
# "rmt:error(2.0): the command is disabled".
POLICY_REFUSED = rm_rc(TPM_RC.DISABLED)
# The TPM has no room for another session (handles, or memory to load one).
NO_SESSION_ROOM = frozenset({TPM_RC.SESSION_HANDLES, TPM_RC.SESSION_MEMORY})


class SessionsExhausted(Exception):
    """A new session needs a free TPM session: the manager makes the command wait."""


class Executor:
    """Runs one client command for a space against the TPM."""

    def __init__(
        self,
        link: TpmLink,
        table: CommandTable,
        sessions: SessionTable,
        config: RMConfig,
        regapper: Regapper,
        residency: Residency,
        active_sessions_max: int,
    ):
        self.link = link
        self.table = table
        self.sessions = sessions
        self.config = config
        self.regapper = regapper
        self.residency = residency
        self.active_sessions_max = active_sessions_max
        self.reconcile_needed = False
        # Objects and sessions the TPM held before the RM started (firmware may keep some):
        # never flushed by the RM.
        self.baseline: set[int] = set()
        # Sessions the RM gave up whose flush the TPM refused: flushed again at reconcile.
        self.orphans: set[int] = set()
        # policy refusals by (node, reason), for `cusetpm status`
        self.policy_refusals: Counter[tuple[str, str]] = Counter()
        self.quotas = Quotas(config)  # the manager gives its own (rm/quotas.py)

    def execute(self, space: Space, command: bytes, queue_behind: bool = False) -> bytes:
        """The response to one command. `queue_behind`: others are waiting for a TPM session,
        so a command needing a new one must wait too (SessionsExhausted), after its checks."""
        try:
            req = self.validate(space, command)
        except BadTagError:
            return self.answer_bad_tag(space, command)
        if req is None:
            return error_response(rm_rc(TPM_RC.COMMAND_CODE))
        refusal = self.check_policy(space, req.cmd)
        if refusal is not None:
            return refusal
        refusal = self.check_ownership(space, req.cmd)
        if refusal is not None:
            return refusal
        try:
            if self.reconcile_needed or self.residency.reconcile_needed:
                self.reconcile()
            return self.answer_locally(space, req) or self.run(space, req, command, queue_behind)
        except BackendError as exc:
            self.orphans.update(self.residency.abandon())
            self.after_transport_failure()
            raise RMError(errno.EIO, f"TPM backend failed: {exc}") from exc

    def run(self, space: Space, req: Request, command: bytes, queue_behind: bool) -> bytes:
        refusal = self.check_limits(space, req)
        if refusal is not None:
            return refusal
        if req.creates == "session" and (
            queue_behind or len(self.sessions) >= self.active_sessions_max
        ):
            raise SessionsExhausted()
        response = self.run_on_tpm(space, req, command)
        if self.config.proactive_regap:
            self.regapper.check()
        return response

    # -- validate -------------------------------------------------------------------------

    def validate(self, space: Space, command: bytes) -> Request | None:
        """The command parsed once; None for a code the TPM does not know."""
        if len(command) < TPM_HEADER_SIZE:
            raise RMError(errno.EINVAL, f"command of {len(command)} bytes is shorter than a header")
        code = cmd_code(command)
        attrs = self.table.lookup(code)
        if attrs is None:
            refusals.warn(space, "unknown command code 0x%08x refused", code)
            return None
        try:
            return Request.of(parse_command(command, handle_count(code, attrs)), attrs)
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
        A session the RM gave up (exhaustion, or its context lost) gets the RM-layer
        TPM_RC_REFERENCE_H<n>/S<n>; an object whose context was lost while another space's
        command ran gets the errno the kernel gives for a lost context, once.
        """
        for i, handle in enumerate(cmd.handles):
            if is_transient_handle(handle) and handle not in space.objects:
                if handle in space.lost:
                    return self.report_lost(space, cmd, handle)
                raise foreign_handle(handle, "handle area")
            if is_session_handle(handle) and handle not in space.sessions:
                if handle in space.revoked:
                    return self.revoked(space, handle, rm_rc(TPM_RC.REFERENCE_H0 + i))
                return self.absent_session(space, cmd, handle, absent_handle_rc(cmd, i))
        for i, session in enumerate(cmd.sessions):
            handle = session.sessionHandle
            if is_session_handle(handle) and handle not in space.sessions:
                if handle in space.revoked:
                    return self.revoked(space, handle, rm_rc(TPM_RC.REFERENCE_S0 + i))
                return self.absent_session(space, cmd, handle, TPM_RC.REFERENCE_S0 + i)
        return None

    def absent_session(self, space: Space, cmd: Command, handle: int, rc: int) -> bytes:
        refusals.warn(
            space, "%s names session 0x%08x, not this space's: answered 0x%03x",
            cc_name(cmd.commandCode), handle, rc,
        )
        return error_response(rc)

    @staticmethod
    def revoked(space: Space, handle: int, rc: int) -> bytes:
        refusals.warn(space, "session 0x%08x was given up by the RM (exhaustion, or its "
                      "context was lost)", handle)
        return error_response(rc)

    @staticmethod
    def report_lost(space: Space, cmd: Command, vhandle: int) -> bytes:
        """An object whose context is gone: its next use gets the errno, once; a FlushContext
        of it succeeds. Its number is not given to a new object (a stale copy of the handle
        must not reach someone else's key), so after that it is simply unknown."""
        err = space.lost.pop(vhandle)
        if cmd.commandCode == TPM_CC.FlushContext:
            return SUCCESS_RESPONSE
        raise RMError(err, f"object 0x{vhandle:08x} was lost: the TPM refused to save it")

    # -- answer ---------------------------------------------------------------------------

    def answer_locally(self, space: Space, req: Request) -> bytes | None:
        cmd = req.cmd
        if cmd.tag != TPM_ST.NO_SESSIONS:
            self.refuse_unfilterable(cmd)
            return None  # a response the RM wrote itself would break the session's HMAC
        if cmd.commandCode == TPM_CC.FlushContext:
            return self.flush_for_client(space, cmd)
        if req.plain_read_public:
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
        if entry is None:
            raise RMError(errno.ENOENT, f"session 0x{handle:08x} is not in the RM's table")
        self.residency.evict_for_save(entry)  # the token stands for a saved context
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
        if entry.node != space.node:
            # A policy session satisfied on one node must not carry that authority to a node
            # whose policy is narrower: a token is claimed only where it was saved.
            refusals.warn(space, "ContextLoad of a session token saved on node %s refused",
                          entry.node)
            return error_response(continuation.RC_STALE_TOKEN)
        if entry.saved_by is not space:
            if self.session_count(space) >= self.config.max_sessions:
                return self.over_limit(space, "TPM2_ContextLoad", "sessions",
                                       TPM_RC.SESSION_MEMORY)
            saver = entry.saved_by
            if saver is None or saver.uid != space.uid:
                # Abandoned, or another uid's: the session joins this uid's count (the quotas
                # count a uid's own client-saved sessions already).
                refusal = self.quotas.check_command(space, "session", TPM_CC.ContextLoad)
                if refusal is not None:
                    return refusal
        self.sessions.claim(entry, space)
        log.debug("space %d: session 0x%08x loaded from a token", space.id, entry.handle)
        return Response(TPM_ST.NO_SESSIONS, 0, handle=entry.handle).to_bytes()

    def flush_for_client(self, space: Space, cmd: Command) -> bytes | None:
        """FlushContext of an object drops its saved context, and flushes it if resident."""
        (handle,) = cmd.handles
        if is_transient_handle(handle):
            self.residency.drop_object(space, handle)
            return SUCCESS_RESPONSE
        return None  # sessions: the TPM flushes them (saved or not); see commit

    # -- limits ---------------------------------------------------------------------------

    def check_limits(self, space: Space, req: Request) -> bytes | None:
        cmd, creates = req.cmd, req.creates
        if creates == "object" and len(space.objects) >= self.config.max_objects:
            return self.over_limit(space, cc_name(cmd.commandCode), "objects", TPM_RC.OBJECT_MEMORY)
        if creates == "session" and self.session_count(space) >= self.config.max_sessions:
            name = cc_name(cmd.commandCode)
            return self.over_limit(space, name, "sessions", TPM_RC.SESSION_MEMORY)
        return self.quotas.check_command(space, creates, cmd.commandCode)  # per uid, per node

    @staticmethod
    def session_count(space: Space) -> int:
        """Sessions charged to a space: its own, and those it saved and may load again."""
        return len(space.sessions) + len(space.client_saved)

    def over_limit(self, space: Space, name: str, what: str, rc: int) -> bytes:
        limit = self.config.max_objects if what == "objects" else self.config.max_sessions
        refusals.warn(space, "%s refused: %d %s is the limit", name, limit, what)
        return error_response(rm_rc(rc))

    # -- on the TPM ---------------------------------------------------------------------

    def run_on_tpm(self, space: Space, req: Request, command: bytes) -> bytes:
        """Make resident, map, transmit (fixing TPM warnings), adopt: residency.py swaps."""
        residency = self.residency
        try:
            try:
                mapping = residency.prepare(space, req)
            except NoTpmMemory as exc:
                log.warning("space %d: %s; %s refused", space.id, exc, cc_name(req.code))
                response = error_response(exc.rc)
            else:
                response = residency.transmit(lambda: map_command(command, req.cmd, mapping))
                if req.creates == "session" and _rc(response) in NO_SESSION_ROOM:
                    raise SessionsExhausted()  # someone outside the RM holds sessions too
                response = self.commit(space, req, response)
        except BackendError:
            self.orphans.update(residency.abandon())
            raise
        except BaseException:
            residency.finish(report=False)
            raise
        residency.finish()  # raises what befell the command's own contexts
        return self.finish_response(space, req, response)

    def commit(self, space: Space, req: Request, response: bytes) -> bytes:
        """Adopt what the command made; forget what it ended or flushed."""
        rc = _rc(response)
        if rc != 0:
            return response
        if req.attrs.rHandle and len(response) >= TPM_HEADER_SIZE + 4:
            response = self.adopt(space, req, response)
        if req.attrs.flushed:
            for vhandle in req.objects:  # the command itself flushed it (SequenceComplete)
                self.residency.flushed_by_tpm(space, vhandle)
        for handle in req.ended_sessions():
            self.residency.session_ended(handle)
        return response

    def adopt(self, space: Space, req: Request, response: bytes) -> bytes:
        """A new session joins the space; a new object gets the next virtual handle."""
        handle = int.from_bytes(response[TPM_HEADER_SIZE : TPM_HEADER_SIZE + 4], "big")
        if is_session_handle(handle):
            self.residency.adopt_session(space, handle)
            return response
        if not is_transient_handle(handle):
            return response
        vhandle = self.residency.adopt_object(space, handle, mutable=req.creates_mutable)
        wire = bytearray(response)
        wire[TPM_HEADER_SIZE : TPM_HEADER_SIZE + 4] = vhandle.to_bytes(4, "big")
        return bytes(wire)

    def finish_response(self, space: Space, req: Request, response: bytes) -> bytes:
        """What the client sees of its own contexts, and of the TPM's slots: no one else's."""
        if _rc(response) != 0:
            return response
        if req.code == TPM_CC.GetCapability and req.cmd.tag == TPM_ST.NO_SESSIONS:
            return rewrite_properties(response, self.residency.capacity)
        if req.plain_read_public:
            obj = space.objects.get(req.cmd.handles[0])
            if obj is not None:
                obj.read_public = response  # no handle in it: valid however it is loaded
        return response

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
        self.residency.close(space)
        space.revoked.clear()
        if self.orphans or self.residency.reconcile_needed:
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
        except BackendError as exc:
            log.warning("flush of session 0x%08x failed (%s); will flush again", handle, exc)
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

        Runs between commands (a job of its own), so no session is pinned; none that a
        command already written but not yet run names (`in_flight`) qualifies. A resident
        session is flushed like a saved one: both free a TPM session.
        """
        deadline = time.monotonic() - idle_for
        idle = [e for e in self.sessions if e.last_used <= deadline and e.handle not in in_flight]
        if not idle:
            return None
        victim = fair_victim(idle, self.sessions, self.active_sessions_max,
                             self.config.max_sessions_per_uid)  # uid-fair LRU (quotas.py)
        self.link.flush_quietly(victim.handle)
        if victim.owner is not None:
            victim.owner.revoked.add(victim.handle)
        self.sessions.forget(victim.handle)
        log.warning(
            "session 0x%08x (space %s, idle %.1f s) flushed: the TPM has no free session",
            victim.handle,
            victim.owner.id if victim.owner else "-",
            time.monotonic() - victim.last_used,
        )
        return victim

    def next_evictable_at(self, idle_for: float) -> float | None:
        """When the first session will have been idle for `idle_for` s."""
        times = [e.last_used for e in self.sessions]
        return min(times) + idle_for if times else None

    # -- transport failures ---------------------------------------------------------------

    def after_transport_failure(self) -> None:
        """The TPM may have done more than the RM heard of: reconcile now, or before the next
        command if the backend is still down."""
        self.reconcile_needed = True
        try:
            self.reconcile()
        except BackendError as exc:
            log.warning("TPM backend still failing (%s); will reconcile later", exc)

    def reconcile(self) -> None:
        """Bring the RM's tables and the TPM back together (residency.py: which contexts are
        resident); sessions the RM gave up but could not flush (`orphans`) are flushed again."""
        self.residency.reconcile(
            self.tpm_handles(TPM_HT.TRANSIENT),
            set(self.tpm_handles(TPM_HT.HMAC_SESSION)),
            self.baseline,
        )
        for handle in sorted(self.orphans):
            if self.sessions.get(handle) is None:  # else the TPM gave the number out again
                try:
                    self.link.flush(handle)
                except ContextError as exc:
                    if not exc.gone:
                        log.warning("%s; will flush again", exc)
                        continue
            self.orphans.discard(handle)
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
            attrs = self.table.lookup(cmd_code(command)) if len(command) >= 10 else None
            if attrs is None:
                continue
            try:
                cmd = parse_command(command, handle_count(cmd_code(command), attrs))
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
                entry.owner.revoked.add(entry.handle)
            self.sessions.forget(entry.handle)  # a client-saved session's token is spent too
        self.residency.forget_all()  # nothing of ours is resident in a restarted TPM
        for space in spaces:
            for vhandle in list(space.objects):
                space.lose_object(vhandle, errno.ENOENT)
        self.orphans.clear()
        self.reconcile_needed = False
        self.regapper.latest = 0  # the TPM numbers session saves from the start again


def cmd_code(command: bytes) -> int:
    return int.from_bytes(command[6:10], "big")


def map_command(command: bytes, cmd: Command, mapping: dict[int, int]) -> bytes:
    """The command with its virtual transient handles replaced by the physical ones."""
    if not mapping:
        return command
    wire = bytearray(command)
    for i, handle in enumerate(cmd.handles):
        physical = mapping.get(handle)
        if physical is not None:
            offset = TPM_HEADER_SIZE + 4 * i
            wire[offset : offset + 4] = physical.to_bytes(4, "big")
    return bytes(wire)


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

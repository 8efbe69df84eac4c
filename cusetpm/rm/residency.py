"""Which client contexts are in the TPM now; the only code that loads, saves or flushes them.

The kernel's prepare/commit pair is the shape (tpm2_prepare_space/tpm2_commit_space):
`prepare` makes resident what a command names and pins it for the command, `transmit` runs
the command with each TPM warning mapped to one fix (trunks' FixWarnings), `commit` records
what the command did, `finish` unpins and puts contexts away (eager mode: all of them;
resident mode: only what the headroom asks for).

Objects: a space's virtual handle maps to a TransientObject, `physical` while resident,
`context` once saved. A key is saved the first time it leaves and only flushed after that (its
saved context stays valid); a mutable object is saved every time it leaves. Sessions keep
their TPM handle; one is resident while its SessionEntry holds no saved context, and leaves by
ContextSave (which frees its slot and keeps it in the TPM).

The victim, when room is needed, is the least recently used resident context that the running
command does not name, whichever space owns it. Eviction never loses a context unless the
TPM refuses to save it; the owner then hears of it on its next use.
"""

from __future__ import annotations

import enum
import errno
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from cusetpm.backends.base import BackendError
from cusetpm.rm.errors import RMError
from cusetpm.rm.regap import Regapper
from cusetpm.rm.request import Request
from cusetpm.rm.sessions import SessionEntry, SessionTable
from cusetpm.rm.space import Space, TransientObject
from cusetpm.rm.tpmlink import ContextError, TpmLink
from cusetpm.tpm.constants import TPM_HEADER_SIZE
from cusetpm.tpm.rc import TPM_RC, rc_base

log = logging.getLogger(__name__)


class Fix(enum.Enum):
    """What the RM does about one TPM warning before sending the command again."""

    REGAP = "refresh every saved session, then resend"
    EVICT_OBJECT = "evict the least recently used object not named, then resend"
    EVICT_SESSION = "evict the least recently used session not named, then resend"
    EVICT_ANY = "evict the least recently used context not named, then resend"
    WAIT_FOR_SESSION = "no session handle is free: the command waits (manager.py)"
    RESEND = "resend after a delay (tpmlink.py, before anyone sees the warning)"


# Each TPM warning the RM reacts to, and its one fix. Used around the client's command
# (transmit) and around the RM's own ContextLoad/ContextSave.
WARNING_FIXES: dict[int, Fix] = {
    TPM_RC.CONTEXT_GAP: Fix.REGAP,
    TPM_RC.OBJECT_MEMORY: Fix.EVICT_OBJECT,
    TPM_RC.SESSION_MEMORY: Fix.EVICT_SESSION,
    TPM_RC.MEMORY: Fix.EVICT_ANY,
    TPM_RC.SESSION_HANDLES: Fix.WAIT_FOR_SESSION,
    TPM_RC.RETRY: Fix.RESEND,
}

# Fixes per operation: each eviction frees a slot, and the TPM has a handful.
MAX_FIXES = 8


class NoTpmMemory(Exception):
    """The TPM is full and nothing the RM holds can make room; the contexts are fine."""

    def __init__(self, rc: int):
        super().__init__(f"TPM memory full: rc 0x{rc:x}")
        self.rc = rc


@dataclass(frozen=True)
class Capacity:
    """Slots the RM may fill: the TPM's free slots at start, less the headroom between commands."""

    objects: int  # TPM_PT_HR_TRANSIENT_AVAIL with nothing of ours loaded
    sessions: int  # TPM_PT_HR_LOADED_AVAIL, likewise
    keep_free_objects: int = 0
    keep_free_sessions: int = 0


@dataclass
class ResidencyStats:
    loads: int = 0  # ContextLoads of client contexts
    saves: int = 0  # ContextSaves of client contexts
    flushes: int = 0  # FlushContexts of client contexts
    evictions: int = 0  # contexts taken out of the TPM to make room (or the headroom)
    fixes: int = 0  # TPM warnings fixed and the command resent


ObjectKey = tuple[Space, int]  # (space, virtual handle)


@dataclass
class _Command:
    """What the running command pinned, and what went wrong with its own contexts."""

    space: Space
    objects: set[ObjectKey] = field(default_factory=set)
    sessions: set[int] = field(default_factory=set)
    failures: list[RMError] = field(default_factory=list)
    created: list[ObjectKey] = field(default_factory=list)  # its new object, if any
    started: list[int] = field(default_factory=list)  # its new session, if any


class Residency:
    def __init__(
        self,
        link: TpmLink,
        sessions: SessionTable,
        regapper: Regapper,
        capacity: Capacity,
        eager: bool,
    ):
        self.link = link
        self.sessions = sessions
        self.regapper = regapper
        self.capacity = capacity
        self.eager = eager
        self.stats = ResidencyStats()
        self._objects: OrderedDict[ObjectKey, None] = OrderedDict()  # resident, LRU first
        self._running: _Command | None = None
        self.reconcile_needed = False  # a flush failed: the TPM may hold a slot the RM freed
        regapper.make_room = self._room_for_one_session

    # -- what is resident -----------------------------------------------------------------

    @property
    def resident_objects(self) -> int:
        return len(self._objects)

    @property
    def resident_sessions(self) -> int:
        return sum(1 for e in self.sessions if e.context is None)  # every command: no sort

    def physical_handles(self) -> set[int]:
        """The TPM handles of the resident objects (for reconcile and the tests' census)."""
        return {space.objects[vh].physical for space, vh in self._objects}  # type: ignore[misc]

    def _resident_sessions(self) -> list[SessionEntry]:
        """Resident sessions, least recently used first."""
        return sorted((e for e in self.sessions if e.context is None), key=lambda e: e.last_used)

    # -- prepare: make resident what the command names ------------------------------------

    def prepare(self, space: Space, req: Request) -> dict[int, int]:
        """Load what `req` names (evicting others for room) and pin it; vhandle -> physical."""
        running = _Command(space)
        running.objects = {(space, vh) for vh in req.objects}
        running.sessions = set(req.sessions)
        self._running = running
        missing = [vh for vh in req.objects if space.objects[vh].physical is None]
        # The headroom holds during the command too: the kernel's commands run between ours.
        capacity = self.capacity
        self._make_room_objects(
            len(missing) + (req.creates == "object") + capacity.keep_free_objects
        )
        for vh in missing:
            self._load_object(space, vh)
        for vh in req.objects:
            self._objects.move_to_end((space, vh))
        saved = [h for h in req.sessions if self._entry(h).context is not None]
        self._make_room_sessions(
            len(saved) + (req.creates == "session") + capacity.keep_free_sessions
        )
        for handle in saved:
            self._load_session(space, handle)
        for handle in req.sessions:
            self.sessions.touch(self._entry(handle))
        return {vh: space.objects[vh].physical for vh in req.objects}  # type: ignore[misc]

    def _entry(self, handle: int) -> SessionEntry:
        entry = self.sessions.get(handle)
        if entry is None:  # owned sessions are always in the table (check_ownership)
            raise RMError(errno.ENOENT, f"session 0x{handle:08x} is not in the RM's table")
        return entry

    def _load_object(self, space: Space, vhandle: int) -> None:
        obj = space.objects[vhandle]
        try:
            obj.physical = self._load(obj.context)
        except ContextError as exc:
            space.drop_object(vhandle)
            raise context_errno(space, exc, f"object 0x{vhandle:08x} lost") from exc
        self._objects[(space, vhandle)] = None

    def _load_session(self, space: Space, handle: int) -> None:
        entry = self._entry(handle)
        assert entry.context is not None
        try:
            loaded_as = self._load(entry.context)
        except ContextError as exc:
            # The context is useless now, but the TPM still counts the session: free it.
            self.link.flush_quietly(handle)
            self.sessions.forget(handle)
            raise context_errno(space, exc, f"session 0x{handle:08x} lost") from exc
        if loaded_as != handle:
            self.link.flush_quietly(loaded_as)
            self.sessions.forget(handle)
            raise RMError(errno.EFAULT, f"session 0x{handle:08x} came back as 0x{loaded_as:08x}")
        self.sessions.loaded(entry)  # the TPM now holds the only valid copy

    def _load(self, context: bytes) -> int:
        """ContextLoad with the warning fixes: a full TPM makes room, then loads again."""
        for _ in range(MAX_FIXES):
            try:
                handle = self.link.context_load(context)
            except ContextError as exc:
                if not self.fix(rc_base(exc.rc)):
                    if rc_base(exc.rc) in NO_MEMORY:
                        raise NoTpmMemory(exc.rc) from exc
                    raise
                continue
            self.stats.loads += 1
            return handle
        raise NoTpmMemory(TPM_RC.MEMORY)

    # -- transmit: the client's command, with the warning fixes ---------------------------

    def transmit(self, wire: Callable[[], bytes]) -> bytes:
        """Send the command `wire()` builds (handles mapped anew each time: pinned contexts
        keep their handles, so the mapping is the same) until no warning can be fixed."""
        response = self.link.transmit(wire())
        for _ in range(MAX_FIXES):
            if not self.fix(_rc(response)):
                break
            response = self.link.transmit(wire())
        return response

    def fix(self, rc: int) -> bool:
        """Apply the one fix for warning `rc`; False if there is none, or it cannot help."""
        fix = WARNING_FIXES.get(rc)
        if fix is None:
            return False
        if fix is Fix.REGAP:
            self.regapper.recover()
            done = True
        elif fix is Fix.EVICT_OBJECT:
            done = self._evict_object_lru()
        elif fix is Fix.EVICT_SESSION:
            done = self._evict_session_lru()
        elif fix is Fix.EVICT_ANY:
            done = self._evict_object_lru() or self._evict_session_lru()
        else:
            done = False  # WAIT_FOR_SESSION: the caller's; RESEND: tpmlink's
        if done:
            self.stats.fixes += 1
            log.debug("TPM warning 0x%03x: %s", rc, fix.value)
        return done

    # -- commit: what the command did -----------------------------------------------------

    def adopt_object(self, space: Space, physical: int, mutable: bool) -> int:
        """A new object from the command: the space's next virtual handle; resident."""
        vhandle = space.new_vhandle()
        space.objects[vhandle] = TransientObject(context=b"", mutable=mutable, physical=physical)
        self._objects[(space, vhandle)] = None
        if self._running is not None:
            self._running.objects.add((space, vhandle))
            self._running.created.append((space, vhandle))
        return vhandle

    def adopt_session(self, space: Space, handle: int) -> None:
        """A new session: resident (the TPM holds it loaded), the space's own."""
        self.sessions.add(handle, space)
        if self._running is not None:
            self._running.sessions.add(handle)
            self._running.started.append(handle)
        if self.eager:
            # A new session that cannot be saved is flushed now: the client must not be told it
            # has one whose first use would fail.
            self._put_session_away(self._entry(handle), self._running)

    def flushed_by_tpm(self, space: Space, vhandle: int) -> None:
        """The command itself flushed the object (SequenceComplete, EventSequenceComplete)."""
        self._objects.pop((space, vhandle), None)
        space.drop_object(vhandle)

    def session_ended(self, handle: int) -> None:
        """The TPM ended the session (no continueSession, or flushed): nothing to save."""
        self.sessions.forget(handle)

    def abandon(self) -> list[int]:
        """The transport failed mid-command: unpin; what the command created is dropped (the
        client got EIO, never its handle), and reconcile flushes whatever the TPM still holds
        of it. Returns the sessions it started, for the caller to flush again (a saved one is
        not in the TPM's list of loaded sessions, so reconcile would not see it)."""
        running, self._running = self._running, None
        if running is None:
            return []
        for space, vhandle in running.created:
            self._objects.pop((space, vhandle), None)
            space.drop_object(vhandle)
        for handle in running.started:
            self.sessions.forget(handle)
        if running.created or running.started:
            self.reconcile_needed = True
        return running.started

    def finish(self, report: bool = True) -> None:
        """After the command (or its failure): unpin, put away what must leave the TPM, and
        raise the first failure that befell the command's own contexts (`report`)."""
        running, self._running = self._running, None
        try:
            if self.eager:
                for key in list(self._objects):
                    self._put_object_away(key, running)
                for entry in self._resident_sessions():
                    self._put_session_away(entry, running)
            else:
                self._make_room_objects(self.capacity.keep_free_objects)
                self._make_room_sessions(self.capacity.keep_free_sessions)
        except BackendError:
            self._running = running  # for abandon(): the command's outcome is unknown
            raise
        if report and running is not None and running.failures:
            raise running.failures[0]

    # -- leaving the TPM ------------------------------------------------------------------

    def drop_object(self, space: Space, vhandle: int) -> None:
        """The client flushed it: out of the TPM if resident, out of the space."""
        obj = space.objects.get(vhandle)
        if obj is not None and obj.physical is not None:
            self._objects.pop((space, vhandle), None)
            self._flush(obj.physical)
        space.drop_object(vhandle)

    def close(self, space: Space) -> None:
        """A closing space's resident objects are flushed (never saved: nobody will load them)."""
        for vhandle, obj in list(space.objects.items()):
            if obj.physical is not None:
                self._objects.pop((space, vhandle), None)
                self._flush(obj.physical, at_close=True)
            space.drop_object(vhandle)
        space.lost.clear()

    def evict_for_save(self, entry: SessionEntry) -> None:
        """A client's ContextSave of a resident session: it leaves the TPM's slots first."""
        if entry.context is None:
            self._put_session_away(entry, self._running)
            if entry.context is None:
                raise RMError(errno.EFAULT, f"session 0x{entry.handle:08x} could not be saved")

    def _make_room_objects(self, needed: int) -> None:
        while self._objects and len(self._objects) + needed > self.capacity.objects:
            if not self._evict_object_lru():
                return  # everything resident is pinned: the TPM answers, and fix() tries

    def _make_room_sessions(self, needed: int) -> None:
        while self.resident_sessions + needed > self.capacity.sessions:
            if not self._evict_session_lru():
                return

    def _room_for_one_session(self) -> None:
        """For regapping's own load: one free session slot, if residency took them all."""
        self._make_room_sessions(1)

    def _evict_object_lru(self) -> bool:
        pinned = self._running.objects if self._running else set()
        for key in self._objects:
            if key not in pinned:
                self.stats.evictions += 1
                self._put_object_away(key, self._running)
                return True
        return False

    def _evict_session_lru(self) -> bool:
        pinned = self._running.sessions if self._running else set()
        for entry in self._resident_sessions():
            if entry.handle not in pinned:
                self.stats.evictions += 1
                self._put_session_away(entry, self._running)
                return True
        return False

    def _put_object_away(self, key: ObjectKey, running: _Command | None) -> None:
        """Save the object if its context changed (or was never saved), then flush it.

        A refused save loses the object: the running command hears of it if it is its own,
        else its owner on next use. A refused flush loses nothing (the saved context is good)
        but may leave the slot taken: the next command reconciles.
        """
        space, vhandle = key
        self._objects.pop(key, None)
        obj = space.objects[vhandle]
        physical, obj.physical = obj.physical, None
        assert physical is not None
        if obj.mutable or not obj.context:
            try:
                obj.context = self.link.context_save(physical)
                self.stats.saves += 1
            except BackendError:
                obj.physical = physical  # unknown outcome: still resident; reconcile decides
                self._objects[key] = None
                raise
            except ContextError as exc:
                self.link.flush_quietly(physical)
                failure = context_errno(space, exc, f"object 0x{vhandle:08x} lost")
                if running is not None and running.space is space:
                    space.drop_object(vhandle)
                    running.failures.append(failure)
                else:
                    space.lose_object(vhandle, failure.errno or errno.EFAULT)
                return
        self._flush(physical)

    def _put_session_away(self, entry: SessionEntry, running: _Command | None = None) -> None:
        """Save a resident session; one the TPM will not save is flushed and its owner told."""
        try:
            context = self.save_session(entry.handle)
        except ContextError as exc:
            self.link.flush_quietly(entry.handle)
            owner = entry.owner
            self.sessions.forget(entry.handle)
            if owner is None:
                return
            if running is not None and running.space is owner:
                running.failures.append(
                    context_errno(owner, exc, f"session 0x{entry.handle:08x} lost")
                )
            else:
                owner.revoked.add(entry.handle)  # its next use gets the RM-layer code
            return
        self.stats.saves += 1
        self.regapper.saved(entry, context)

    def save_session(self, handle: int) -> bytes:
        """ContextSave of a session; on TPM_RC_CONTEXT_GAP, regap and try once more."""
        try:
            return self.link.context_save(handle)
        except ContextError as exc:
            if exc.rc != TPM_RC.CONTEXT_GAP:
                raise
        self.fix(TPM_RC.CONTEXT_GAP)
        return self.link.context_save(handle)

    def _flush(self, physical: int, at_close: bool = False) -> None:
        """Flush a context the RM no longer accounts for; if the TPM may still hold it (a
        refused flush; at close, a failing transport too) the next reconcile flushes it
        again. Mid-command a transport failure propagates: the command gets EIO."""
        self.stats.flushes += 1
        try:
            self.link.flush(physical)
        except ContextError as exc:
            if not exc.gone:
                log.warning("%s; will reconcile", exc)
                self.reconcile_needed = True
        except BackendError as exc:
            if not at_close:
                raise
            log.warning("flush of 0x%08x failed (%s); will reconcile", physical, exc)
            self.reconcile_needed = True

    # -- reconcile ------------------------------------------------------------------------

    def reconcile(self, tpm_objects: list[int], tpm_loaded_sessions: set[int],
                  baseline: set[int]) -> None:
        """Bring the RM's picture and the TPM's back together after something went wrong.

        Resident objects the TPM no longer holds are out (a key with a saved context reloads
        on demand; anything else is lost, and its owner told); transient objects the RM does
        not account for are flushed (but those present when the RM started). Sessions: one the
        TPM holds loaded is resident whatever the RM thought (a saved context it had is stale
        once the TPM loaded it); one the RM thought resident that the TPM does not hold is
        lost; loaded sessions nobody accounts for are flushed.
        """
        present = set(tpm_objects)
        for key in list(self._objects):
            space, vhandle = key
            obj = space.objects[vhandle]
            if obj.physical in present:
                continue
            self._objects.pop(key)
            obj.physical = None
            if obj.mutable or not obj.context:
                log.warning("space %d: object 0x%08x was lost by the TPM", space.id, vhandle)
                space.lose_object(vhandle, errno.EFAULT)
        ours = self.physical_handles()
        for handle in tpm_objects:
            if handle not in ours and handle not in baseline:
                self.link.flush_quietly(handle)
        for handle in tpm_loaded_sessions:
            entry = self.sessions.get(handle)
            if entry is not None:
                if entry.context is not None:
                    self.sessions.loaded(entry)
            elif handle not in baseline:
                self.link.flush_quietly(handle)
        for entry in self.sessions:
            if entry.context is None and entry.handle not in tpm_loaded_sessions:
                self.link.flush_quietly(entry.handle)
                if entry.owner is not None:
                    entry.owner.revoked.add(entry.handle)
                self.sessions.forget(entry.handle)
        self.reconcile_needed = False
        if self.eager:
            self.finish()

    def forget_space(self, space: Space) -> None:
        """The space closed while the TPM is unreachable: its objects are forgotten without
        a TPM command; the next reconcile flushes what the TPM still holds of them."""
        for key in [k for k in self._objects if k[0] is space]:
            del self._objects[key]
            self.reconcile_needed = True
        space.objects.clear()
        space.lost.clear()

    def forget_all(self) -> None:
        """The TPM restarted: no context of ours is in it any more."""
        for space, vhandle in self._objects:
            obj = space.objects.get(vhandle)
            if obj is not None:
                obj.physical = None
        self._objects.clear()
        self._running = None
        self.reconcile_needed = False

    # -- status ---------------------------------------------------------------------------

    def status(self) -> dict[str, int]:
        return {
            "resident_objects": self.resident_objects,
            "resident_sessions": self.resident_sessions,
            "object_slots": self.capacity.objects,
            "session_slots": self.capacity.sessions,
            "keep_free_objects": self.capacity.keep_free_objects,
            "keep_free_sessions": self.capacity.keep_free_sessions,
            "evictions": self.stats.evictions,
        }


NO_MEMORY = frozenset({TPM_RC.OBJECT_MEMORY, TPM_RC.SESSION_MEMORY, TPM_RC.MEMORY})


def context_errno(space: Space, exc: ContextError, what: str) -> RMError:
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


def _rc(response: bytes) -> int:
    return int.from_bytes(response[6:10], "big") if len(response) >= TPM_HEADER_SIZE else -1

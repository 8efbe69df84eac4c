"""Random interleavings of what clients do to the RM, checked against a model after each step.

A hypothesis state machine drives several spaces of ONE resource manager (libtpms is one TPM
per process): open and close spaces, create objects (ECC primaries, each with its own unique
so every object has a distinct public area), read them, flush them, save them as a client
and load the blobs in the same or another space, start HMAC and policy sessions, use them
(handle area and authorization area), flush them, save them as a client and load them in
any space. After every step:

- each space's own view (GetCapability of the transient and session ranges through the
  space) equals the model, and each object still reads back its own public area;
- the TPM itself holds nothing loaded and exactly the saved sessions that spaces own or
  that clients saved (census at the TPM);
- handles a space does not own never reach the TPM: transient ones are refused with EINVAL,
  sessions get the TPM's own answer for an absent session.

Each example ends by closing every space and loading the client-saved session blobs nobody
loaded (a saved session outlives its descriptor by design): then the TPM must be empty.
"""

from __future__ import annotations

import errno
import sys
from collections import Counter
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from cusetpm.rm import ResourceManager
from cusetpm.rm.errors import RMError
from cusetpm.rm.space import VHANDLE_BASE
from cusetpm.tpm import commands as build
from cusetpm.tpm.constants import TPM_CC, TPM_HR_HANDLE_MASK, TPM_HT, TPM_SE, handle_type
from tests.rm.client import (
    RC_ATTRIBUTES_S1,
    RC_STALE_TOKEN,
    RawClient,
    assert_answered_as_absent,
    ecc_signing_template,
    get_random_with_session,
    policy_get_digest_command,
    policy_restart_command,
    raw_command,
    rc_of,
    space_objects,
    space_sessions,
    with_unique,
)

# These tests check the eager discipline (nothing of a space in the TPM between commands:
# census, saved contexts, round trips); resident mode is covered by test_residency.py until
# they are rewritten to hold in both modes.
pytestmark = pytest.mark.residency("eager")

MAX_SPACES = 5
RULES = (
    "open_space",
    "close_space",
    "create_object",
    "read_public",
    "flush_object",
    "save_object",
    "load_object",
    "start_session",
    "use_session",
    "flush_session",
    "save_session",
    "load_session",
    "load_stale_session",
    "foreign_handle",
)
MAX_LIVE_SESSIONS = 20  # well under libtpms' 64 active sessions, whoever holds them
MAX_OBJECTS_PER_SPACE = 12


def assert_tpm_empty_census(census: dict[str, list[int]]) -> None:
    """assert_tpm_empty, on a census already taken."""
    assert census == {"transient": [], "loaded_sessions": [], "saved_sessions": []}, census


def index(handle: int) -> int:
    return handle & TPM_HR_HANDLE_MASK


@dataclass
class ModelSpace:
    client: RawClient
    objects: dict[int, bytes] = field(default_factory=dict)  # vhandle -> public area
    sessions: dict[int, int] = field(default_factory=dict)  # handle -> TPM_SE


@dataclass
class SavedSession:
    handle: int
    kind: int
    blob: bytes


class RMMachine(RuleBasedStateMachine):
    rm: ResourceManager  # set by the test: one RM (one libtpms) for every example
    checks = 0  # invariant checks over all examples: proof the run was not degenerate
    rules_run: Counter[str] = Counter()

    def __init__(self) -> None:
        super().__init__()
        self.spaces: list[ModelSpace] = []
        self.object_blobs: list[tuple[bytes, bytes]] = []  # (blob, public area)
        self.saved_sessions: list[SavedSession] = []  # client-saved, not loaded again yet
        self.stale_session_blobs: list[bytes] = []  # loaded once already: the TPM refuses them
        self.counter = 0

    # -- helpers ----------------------------------------------------------------------------

    @staticmethod
    def count() -> None:
        """Tally the calling rule, so the test can show every rule really ran."""
        RMMachine.rules_run[sys._getframe(1).f_code.co_name] += 1

    def pick_space(self, data: st.DataObject) -> ModelSpace:
        return data.draw(st.sampled_from(self.spaces), label="space")

    def live_sessions(self) -> int:
        return sum(len(s.sessions) for s in self.spaces) + len(self.saved_sessions)

    def expect_einval(self, space: ModelSpace, command: bytes) -> None:
        with pytest.raises(RMError) as info:
            space.client.send(command)
        assert info.value.errno == errno.EINVAL, info.value

    @staticmethod
    def next_vhandle(space: ModelSpace) -> int:
        """The kernel's numbering: the lowest free slot index, counted down from 0x80FFFFFF."""
        i = 0
        while VHANDLE_BASE - i in space.objects:
            i += 1
        return VHANDLE_BASE - i

    def adopt_object(self, space: ModelSpace, handle: int, public: bytes) -> None:
        assert handle == self.next_vhandle(space), (hex(handle), space.objects.keys())
        space.objects[handle] = public
        assert space.client.read_public(handle) == public

    # -- spaces -----------------------------------------------------------------------------

    @precondition(lambda self: len(self.spaces) < MAX_SPACES)
    @rule()
    def open_space(self) -> None:
        self.count()
        self.spaces.append(ModelSpace(RawClient(self.rm, self.rm.open_space())))

    @precondition(lambda self: self.spaces)
    @rule(data=st.data())
    def close_space(self, data: st.DataObject) -> None:
        self.count()
        space = self.pick_space(data)
        self.rm.close_space(space.client.space)
        self.spaces.remove(space)
        with pytest.raises(RMError) as info:
            space.client.get_random(1)
        assert info.value.errno == errno.EBADF

    # -- objects ----------------------------------------------------------------------------

    @precondition(lambda self: self.spaces)
    @rule(data=st.data())
    def create_object(self, data: st.DataObject) -> None:
        self.count()
        space = self.pick_space(data)
        if len(space.objects) >= MAX_OBJECTS_PER_SPACE:
            return
        self.counter += 1
        template = with_unique(ecc_signing_template(), b"obj%d" % self.counter)
        handle = space.client.create_primary(template)
        assert handle == self.next_vhandle(space)
        space.objects[handle] = space.client.read_public(handle)

    @precondition(lambda self: any(s.objects for s in self.spaces))
    @rule(data=st.data())
    def read_public(self, data: st.DataObject) -> None:
        self.count()
        space = data.draw(st.sampled_from([s for s in self.spaces if s.objects]))
        handle = data.draw(st.sampled_from(sorted(space.objects)))
        assert space.client.read_public(handle) == space.objects[handle]

    @precondition(lambda self: any(s.objects for s in self.spaces))
    @rule(data=st.data())
    def flush_object(self, data: st.DataObject) -> None:
        self.count()
        space = data.draw(st.sampled_from([s for s in self.spaces if s.objects]))
        handle = data.draw(st.sampled_from(sorted(space.objects)))
        space.client.flush(handle)
        del space.objects[handle]

    @precondition(lambda self: any(s.objects for s in self.spaces))
    @rule(data=st.data())
    def save_object(self, data: st.DataObject) -> None:
        self.count()
        space = data.draw(st.sampled_from([s for s in self.spaces if s.objects]))
        handle = data.draw(st.sampled_from(sorted(space.objects)))
        blob = space.client.context_save(handle)
        self.object_blobs.append((blob, space.objects[handle]))

    @precondition(lambda self: self.spaces and self.object_blobs)
    @rule(data=st.data())
    def load_object(self, data: st.DataObject) -> None:
        self.count()
        space = self.pick_space(data)
        if len(space.objects) >= MAX_OBJECTS_PER_SPACE:
            return
        blob, public = data.draw(st.sampled_from(self.object_blobs), label="object blob")
        self.adopt_object(space, space.client.context_load(blob), public)

    # -- sessions ---------------------------------------------------------------------------

    @precondition(lambda self: self.spaces and self.live_sessions() < MAX_LIVE_SESSIONS)
    @rule(data=st.data(), kind=st.sampled_from([TPM_SE.HMAC, TPM_SE.POLICY]))
    def start_session(self, data: st.DataObject, kind: int) -> None:
        self.count()
        space = self.pick_space(data)
        handle = space.client.start_session(kind)
        expected_type = TPM_HT.POLICY_SESSION if kind == TPM_SE.POLICY else TPM_HT.HMAC_SESSION
        assert handle_type(handle) == expected_type, hex(handle)
        in_use = {index(h) for s in self.spaces for h in s.sessions}
        in_use |= {index(s.handle) for s in self.saved_sessions}
        assert index(handle) not in in_use, f"session 0x{handle:08x} handed out twice"
        space.sessions[handle] = kind

    def pick_session(self, data: st.DataObject) -> tuple[ModelSpace, int]:
        space = data.draw(st.sampled_from([s for s in self.spaces if s.sessions]))
        handle = data.draw(st.sampled_from(sorted(space.sessions)), label="session")
        return space, handle

    @precondition(lambda self: any(s.sessions for s in self.spaces))
    @rule(data=st.data(), how=st.sampled_from(["restart", "digest", "auth"]))
    def use_session(self, data: st.DataObject, how: str) -> None:
        self.count()
        space, handle = self.pick_session(data)
        policy = space.sessions[handle] == TPM_SE.POLICY
        if how == "restart":
            rc = rc_of(space.client.send(policy_restart_command(handle)))
            assert (rc == 0) == policy, hex(rc)  # an HMAC session: the TPM refuses, not the RM
        elif how == "digest":
            rc = rc_of(space.client.send(policy_get_digest_command(handle)))
            assert (rc == 0) == policy, hex(rc)
        else:
            # In the authorization area with continueSession: the TPM itself refuses the
            # session's attributes (it reached the TPM, loaded), and the session stays.
            rc = rc_of(space.client.send(get_random_with_session(handle)))
            assert rc == RC_ATTRIBUTES_S1, hex(rc)

    @precondition(lambda self: any(s.sessions for s in self.spaces))
    @rule(data=st.data())
    def flush_session(self, data: st.DataObject) -> None:
        self.count()
        space, handle = self.pick_session(data)
        space.client.flush(handle)
        del space.sessions[handle]

    @precondition(lambda self: any(s.sessions for s in self.spaces))
    @rule(data=st.data())
    def save_session(self, data: st.DataObject) -> None:
        self.count()
        space, handle = self.pick_session(data)
        blob = space.client.context_save(handle)
        # Like the kernel: a session the client saved leaves the space; the blob carries it.
        self.saved_sessions.append(SavedSession(handle, space.sessions.pop(handle), blob))

    @precondition(lambda self: self.spaces and self.saved_sessions)
    @rule(data=st.data())
    def load_session(self, data: st.DataObject) -> None:
        self.count()
        space = self.pick_space(data)
        saved = data.draw(st.sampled_from(self.saved_sessions), label="saved session")
        handle = space.client.context_load(saved.blob)
        assert handle == saved.handle, (hex(handle), hex(saved.handle))
        self.saved_sessions.remove(saved)
        self.stale_session_blobs.append(saved.blob)
        space.sessions[handle] = saved.kind

    @precondition(lambda self: self.spaces and self.stale_session_blobs)
    @rule(data=st.data())
    def load_stale_session(self, data: st.DataObject) -> None:
        """A session blob that was loaded once is spent: the TPM (or the RM) refuses it, and
        nobody gains a session by it, whoever owns that session now."""
        self.count()
        space = self.pick_space(data)
        blob = data.draw(st.sampled_from(self.stale_session_blobs))
        response = space.client.send(build.context_load_raw(blob))
        assert (len(response), rc_of(response)) == (10, RC_STALE_TOKEN), response.hex()

    # -- what a space does not own ----------------------------------------------------------

    @precondition(lambda self: self.spaces)
    @rule(
        data=st.data(),
        operation=st.sampled_from(["read", "flush", "save", "restart", "auth"]),
        random_transient=st.integers(0x80000000, 0x80FFFFFF),
        random_session=st.integers(0x02000000, 0x03FFFFFF),
    )
    def foreign_handle(
        self, data: st.DataObject, operation: str, random_transient: int, random_session: int
    ) -> None:
        self.count()
        space = self.pick_space(data)
        others = [random_transient, random_session]
        for other in self.spaces:
            others += list(other.objects) + list(other.sessions)
        others += [s.handle for s in self.saved_sessions]
        candidates = sorted(
            {h for h in others if h not in space.objects and h not in space.sessions}
        )
        handle = data.draw(st.sampled_from(candidates), label="foreign handle")
        if operation == "read":
            command = build.read_public(handle)
        elif operation == "flush":
            command = build.flush_context(handle)
        elif operation == "save":
            command = build.context_save(handle)
        elif operation == "restart":
            command = policy_restart_command(handle)
        else:
            if handle_type(handle) == TPM_HT.TRANSIENT:
                command = raw_command(TPM_CC.ReadPublic, [handle])
            else:
                command = get_random_with_session(handle)
        if handle_type(handle) == TPM_HT.TRANSIENT:
            self.expect_einval(space, command)  # as the kernel
        else:
            # another space's session reads like an absent one: the TPM's own answer
            assert_answered_as_absent(space.client, command, handle)

    # -- checks -----------------------------------------------------------------------------

    @invariant()
    def views_match_model(self) -> None:
        RMMachine.checks += 1
        for space in self.spaces:
            assert space_objects(space.client) == sorted(space.objects, reverse=True)
            assert space_sessions(space.client) == sorted(space.sessions, key=index)

    @invariant()
    def tpm_holds_only_saved_sessions(self) -> None:
        census = self.rm.tpm_census()
        assert census["transient"] == [], census
        assert census["loaded_sessions"] == [], census
        expected = sorted(
            [index(h) for s in self.spaces for h in s.sessions]
            + [index(s.handle) for s in self.saved_sessions]
        )
        assert sorted(index(h) for h in census["saved_sessions"]) == expected, census

    def teardown(self) -> None:
        for space in self.spaces:
            self.rm.close_space(space.client.space)
        # Client-saved sessions outlive their descriptors by design: load and drop them.
        for saved in self.saved_sessions:
            client = RawClient(self.rm, self.rm.open_space())
            try:
                assert client.context_load(saved.blob) == saved.handle
            finally:
                self.rm.close_space(client.space)
        assert self.rm.open_spaces == 0
        census = self.rm.tpm_census()
        if any(census.values()):
            # Leave the next example a clean TPM, so hypothesis can replay and shrink this
            # failure: nothing of the RM runs now (no space is open), so talk to the TPM.
            for handle in (h for handles in census.values() for h in handles):
                self.rm.backend.transmit(build.flush_context(handle))
        assert_tpm_empty_census(census)


def test_random_interleavings(rm: ResourceManager) -> None:
    RMMachine.rm = rm
    RMMachine.checks = 0
    RMMachine.rules_run = Counter()
    run_state_machine_as_test(
        RMMachine,
        settings=settings(
            max_examples=80,
            stateful_step_count=40,
            deadline=None,
            derandomize=True,  # the coverage assertion below must not depend on luck
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
    print(f"{RMMachine.checks} steps checked; rules run: {dict(RMMachine.rules_run)}")
    assert RMMachine.checks >= 1000
    assert all(RMMachine.rules_run[name] for name in RULES), RMMachine.rules_run

"""The profiles against libtpms's own command list, and handle-based decisions."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from cusetpm.backends.libtpms import LibtpmsBackend
from cusetpm.policy import PROFILES, NodePolicy, Rule, decide, profile_rules
from cusetpm.rm.commandtable import CommandTable
from cusetpm.tpm.command import Command
from cusetpm.tpm.constants import TPM_CC, TPM_RH, TPM_ST


@pytest.fixture(scope="module")
def libtpms_codes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[int]]:
    backend = LibtpmsBackend(tmp_path_factory.mktemp("state") / "s")
    try:
        table = CommandTable.read(backend.transmit)
        yield sorted(table._by_code)
    finally:
        backend.close()


@pytest.mark.parametrize("profile", PROFILES)
def test_every_libtpms_command_has_a_documented_decision(
    profile: str, libtpms_codes: list[int]
) -> None:
    assert len(libtpms_codes) > 100  # libtpms 0.9 reports ~110 commands
    rules = profile_rules(profile)
    for code in libtpms_codes:
        assert code in rules, f"{profile}: 0x{code:04x} has no decision"
        rule, reason = rules[code]
        assert isinstance(rule, Rule) and reason.strip()


def cmd(code: int, handles: list[int], parameters: bytes = b"") -> Command:
    return Command(tag=TPM_ST.SESSIONS, commandCode=code, handles=handles, parameters=parameters)


PERSISTENT_81000001 = struct.pack(">I", 0x81000001)
USER = NodePolicy.from_profile("user")
FULL = NodePolicy.from_profile("full")


def define_space(index: int) -> bytes:
    return struct.pack(">H", 0) + struct.pack(">HI", 14, index) + b"\0" * 10


def define(index: int) -> Command:
    return cmd(TPM_CC.NV_DefineSpace, [TPM_RH.OWNER], define_space(index))


@pytest.mark.parametrize(
    ("command", "user_ok"),
    [
        (cmd(TPM_CC.CreatePrimary, [TPM_RH.OWNER]), True),
        (cmd(TPM_CC.CreatePrimary, [TPM_RH.ENDORSEMENT]), True),
        (cmd(TPM_CC.CreatePrimary, [TPM_RH.PLATFORM]), False),
        (cmd(TPM_CC.Clear, [TPM_RH.LOCKOUT]), False),
        (cmd(TPM_CC.HierarchyChangeAuth, [TPM_RH.OWNER]), False),
        (cmd(TPM_CC.DictionaryAttackLockReset, [TPM_RH.LOCKOUT]), False),
        (cmd(TPM_CC.PCR_Extend, [0]), False),
        (cmd(TPM_CC.PCR_Extend, [15]), False),
        (cmd(TPM_CC.PCR_Extend, [16]), True),
        (cmd(TPM_CC.PCR_Reset, [23]), True),
        (cmd(TPM_CC.PCR_Event, [7]), False),
        (cmd(TPM_CC.NV_Write, [0x01800001, 0x01800001]), True),
        (cmd(TPM_CC.NV_Write, [TPM_RH.OWNER, 0x01C00002]), False),
        (cmd(TPM_CC.NV_Write, [TPM_RH.PLATFORM, 0x01800001]), False),
        (cmd(TPM_CC.NV_Read, [TPM_RH.OWNER, 0x01800001]), True),
        (cmd(TPM_CC.NV_DefineSpace, [TPM_RH.OWNER], define_space(0x01800001)), False),
        (cmd(TPM_CC.NV_UndefineSpace, [TPM_RH.OWNER, 0x01800001]), False),
        (cmd(TPM_CC.EvictControl, [TPM_RH.OWNER, 0x80000000], PERSISTENT_81000001), False),
        (cmd(TPM_CC.PolicySecret, [TPM_RH.LOCKOUT, 0x03000000]), False),
        (cmd(TPM_CC.Sign, [0x80000001]), True),
        (cmd(0x20000123, []), False),  # unnamed vendor code: allow-list
    ],
)
def test_user_decisions(command: Command, user_ok: bool) -> None:
    decision = decide(USER, command)
    assert decision.allowed is user_ok, decision.reason
    if not user_ok:
        assert decision.reason
    assert decide(FULL, command).allowed


def test_config_narrows_and_widens() -> None:
    policy = NodePolicy.from_profile(
        "user", allow=(TPM_CC.NV_DefineSpace,), deny=(TPM_CC.Sign,),
        nv_define=((0x01800000, 0x0180FFFF),), persistent=((0x81010000, 0x810100FF),))
    assert decide(policy, define(0x01C00000)).allowed
    assert not decide(policy, cmd(TPM_CC.Sign, [0x80000001])).allowed
    evict = cmd(TPM_CC.EvictControl, [TPM_RH.OWNER, 0x80000000], struct.pack(">I", 0x81010001))
    assert decide(policy, evict).allowed
    evict.parameters = struct.pack(">I", 0x81000001)
    assert not decide(policy, evict).allowed
    ranged = NodePolicy.from_profile("user", nv_define=((0x01800000, 0x0180FFFF),))
    assert decide(ranged, define(0x01800005)).allowed
    assert not decide(ranged, define(0x01900000)).allowed


def test_attest_is_narrower_than_user() -> None:
    user, attest = profile_rules("user"), profile_rules("attest")
    for code, (rule, _) in attest.items():
        if rule is not Rule.DENY:
            assert user[code][0] is not Rule.DENY, TPM_CC(code).name


def test_unknown_profile() -> None:
    with pytest.raises(ValueError, match="unknown profile"):
        NodePolicy.from_profile("admin")




def with_sessions(code: int, handles: list[int], *sessions: int) -> Command:
    from cusetpm.tpm.command import AuthCommand
    return Command(tag=TPM_ST.SESSIONS, commandCode=code, handles=handles,
                   sessions=[AuthCommand(h) for h in sessions])


POLICY_SESSION, HMAC_SESSION = 0x03000000, 0x02000001


@pytest.mark.parametrize(
    ("command", "reason"),
    [
        (with_sessions(TPM_CC.NV_Read, [TPM_RH.PLATFORM, 0x01800001], TPM_RH.PW),
         "session 1 (password session) authorizes hierarchy platform"),
        (with_sessions(TPM_CC.NV_Read, [TPM_RH.LOCKOUT, 0x01800001], POLICY_SESSION),
         "session 1 (policy session) authorizes hierarchy lockout"),
        (with_sessions(TPM_CC.NV_Certify, [0x80000001, TPM_RH.PLATFORM, 0x01800001],
                       TPM_RH.PW, HMAC_SESSION),
         "session 2 (HMAC session) authorizes hierarchy platform"),
        (with_sessions(TPM_CC.StartAuthSession, [TPM_RH.NULL, TPM_RH.PLATFORM]),
         "handle 2 names hierarchy platform"),
        (with_sessions(TPM_CC.CreatePrimary, [0x40000142], TPM_RH.PW),  # TPM_RH_FW_PLATFORM
         "authorizes permanent handle 0x40000142"),
        (with_sessions(TPM_CC.Sign, [0x80000001], TPM_RH.PLATFORM),  # not a session at all
         "session 1 of the authorization area is hierarchy platform"),
    ],
)
def test_auth_area_on_user(command: Command, reason: str) -> None:
    decision = decide(USER, command)
    assert not decision.allowed and reason in decision.reason, decision.reason
    assert decide(FULL, command).allowed  # full: the TPM decides


@pytest.mark.parametrize(
    "command",
    [
        with_sessions(TPM_CC.NV_Read, [TPM_RH.OWNER, 0x01800001], POLICY_SESSION),
        with_sessions(TPM_CC.NV_Read, [0x01800001, 0x01800001], TPM_RH.PW),
        with_sessions(TPM_CC.StartAuthSession, [TPM_RH.NULL, TPM_RH.NULL]),
        with_sessions(TPM_CC.CreatePrimary, [TPM_RH.NULL], TPM_RH.PW),
        with_sessions(TPM_CC.Sign, [0x80000001], HMAC_SESSION, POLICY_SESSION),
    ],
)
def test_auth_area_allowed_on_user(command: Command) -> None:
    assert decide(USER, command).allowed


def test_narrowed_full_node_is_an_allow_list_of_permanent_handles() -> None:
    """A `full` node whose config names its hierarchies refuses other permanent handles."""
    owner_only = NodePolicy.from_profile("full", hierarchies=("owner",))
    owner = with_sessions(TPM_CC.CreatePrimary, [TPM_RH.OWNER], TPM_RH.PW)
    assert decide(owner_only, owner).allowed
    for handle in (TPM_RH.ENDORSEMENT, 0x40000140, 0x40010000, 0x40000110):
        command = with_sessions(TPM_CC.CreatePrimary, [handle], TPM_RH.PW)
        assert not decide(owner_only, command).allowed, hex(handle)
        assert decide(FULL, command).allowed

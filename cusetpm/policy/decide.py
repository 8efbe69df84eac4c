"""(node policy, parsed command) -> allow | deny(reason). Pure: no I/O, no state.

Checks, in order:
1. the command code's rule in the node's profile (with the config's allow/deny on top);
   a code the profile does not name is allowed only by `full`;
2. the permanent handles (TPM_RH_...) of the handle area and of the authorization area. The
   n-th session of the authorization area authorizes the n-th handle (Part 1, 19.4: handles
   needing authorization come first), so a password, HMAC or policy session authorizing
   TPM_RH_PLATFORM or TPM_RH_LOCKOUT in an otherwise allowed command (NV_Read, PolicySecret,
   NV_Write by platform, ...) is refused here, as is a hierarchy named without authorization
   (StartAuthSession bound to it). On a node whose hierarchies are narrowed this is an
   allow-list: besides its hierarchies only TPM_RH_NULL passes, so the firmware- and
   SVN-limited hierarchies, ACT and vendor authorization handles are refused too;
3. for Rule.CHECK codes, the handle that matters: PCR index, NV index, persistent handle.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from cusetpm.policy.profiles import Rule, default_for_unnamed, profile_rules
from cusetpm.tpm.command import Command
from cusetpm.tpm.constants import TPM_CC, TPM_RH

HIERARCHIES: dict[str, int] = {
    "owner": TPM_RH.OWNER,
    "endorsement": TPM_RH.ENDORSEMENT,
    "platform": TPM_RH.PLATFORM,
    "lockout": TPM_RH.LOCKOUT,
    "platform_nv": TPM_RH.PLATFORM_NV,
}
_HIERARCHY_NAMES = {v: k for k, v in HIERARCHIES.items()}
ALL_HIERARCHIES = frozenset(HIERARCHIES.values())
PERMANENT_HT = 0x40  # TPM_HT_PERMANENT: the top byte of every TPM_RH_... handle

Range = tuple[int, int]  # inclusive
ALL_NV: Range = (0x01000000, 0x01FFFFFF)
OWNER_NV: Range = (0x01800000, 0x01BFFFFF)  # TCG handle registry: the owner's NV range
ALL_PERSISTENT: Range = (0x81000000, 0x81FFFFFF)

PCR_CODES = frozenset({TPM_CC.PCR_Extend, TPM_CC.PCR_Event, TPM_CC.PCR_Reset,
                       TPM_CC.EventSequenceComplete})
NV_WRITE_CODES = frozenset({TPM_CC.NV_Write, TPM_CC.NV_Increment, TPM_CC.NV_Extend,
                            TPM_CC.NV_SetBits, TPM_CC.NV_WriteLock, TPM_CC.NV_ReadLock})
NV_DEFINE_CODES = frozenset({TPM_CC.NV_DefineSpace, TPM_CC.NV_DefineSpace2,
                             TPM_CC.NV_UndefineSpace})


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str = ""


ALLOW = Decision(True)


@dataclass(frozen=True)
class NodePolicy:
    """What one node may do. Build with NodePolicy.from_profile()."""

    profile: str
    rules: dict[int, tuple[Rule, str]]
    hierarchies: frozenset[int]
    min_pcr: int = 0
    nv_write: tuple[Range, ...] = (ALL_NV,)
    nv_define: tuple[Range, ...] = (ALL_NV,)
    persistent: tuple[Range, ...] = (ALL_PERSISTENT,)
    unnamed: Rule = field(default=Rule.ALLOW)

    @classmethod
    def from_profile(
        cls,
        profile: str,
        *,
        allow: tuple[int, ...] = (),
        deny: tuple[int, ...] = (),
        hierarchies: tuple[str, ...] | None = None,
        min_pcr: int | None = None,
        nv_write: tuple[Range, ...] | None = None,
        nv_define: tuple[Range, ...] | None = None,
        persistent: tuple[Range, ...] | None = None,
    ) -> NodePolicy:
        """A profile's defaults, then the config's overrides (allow/deny win over the profile)."""
        rules = profile_rules(profile)
        for code in allow:
            rules[code] = (Rule.ALLOW, "allowed by the node's config")
        for code in deny:
            rules[code] = (Rule.DENY, "denied by the node's config")
        restricted = profile != "full"
        names = hierarchies if hierarchies is not None else (
            ("owner", "endorsement") if restricted else tuple(HIERARCHIES))
        return cls(
            profile=profile,
            rules=rules,
            hierarchies=frozenset(HIERARCHIES[n] for n in names),
            min_pcr=min_pcr if min_pcr is not None else (16 if restricted else 0),
            nv_write=nv_write if nv_write is not None else (
                (OWNER_NV,) if restricted else (ALL_NV,)),
            nv_define=nv_define if nv_define is not None else (() if restricted else (ALL_NV,)),
            persistent=persistent if persistent is not None else (
                () if restricted else (ALL_PERSISTENT,)),
            unnamed=default_for_unnamed(profile),
        )


def _name(code: int) -> str:
    try:
        return TPM_CC(code).name
    except ValueError:
        return f"0x{code:08x}"


def _in(ranges: tuple[Range, ...], handle: int) -> bool:
    return any(lo <= handle <= hi for lo, hi in ranges)


def _nv_public_index(parameters: bytes) -> int | None:
    """nvIndex of NV_DefineSpace's parameters: TPM2B_AUTH auth, TPM2B_NV_PUBLIC publicInfo."""
    try:
        (auth_size,) = struct.unpack_from(">H", parameters, 0)
        (index,) = struct.unpack_from(">I", parameters, 2 + auth_size + 2)
    except struct.error:
        return None
    return int(index)


def _u32_at(data: bytes, offset: int) -> int | None:
    try:
        return int(struct.unpack_from(">I", data, offset)[0])
    except struct.error:
        return None


def _load_external_hierarchy(parameters: bytes) -> int | None:
    """hierarchy of LoadExternal: after TPM2B_SENSITIVE inPrivate and TPM2B_PUBLIC inPublic."""
    try:
        (n,) = struct.unpack_from(">H", parameters, 0)
        (m,) = struct.unpack_from(">H", parameters, 2 + n)
    except struct.error:
        return None
    return _u32_at(parameters, 2 + n + 2 + m)


def _permanent_name(handle: int) -> str:
    name = _HIERARCHY_NAMES.get(handle)
    return f"hierarchy {name}" if name else f"permanent handle 0x{handle:08x}"


def _permanent_allowed(policy: NodePolicy, handle: int) -> bool:
    if handle in policy.hierarchies or handle == TPM_RH.NULL:
        return True
    # every hierarchy allowed (full): other permanent handles are the TPM's business
    return policy.hierarchies == ALL_HIERARCHIES and handle not in _HIERARCHY_NAMES


def _session_kind(handle: int) -> str:
    if handle == TPM_RH.PW:
        return "password session"
    return {0x02: "HMAC session", 0x03: "policy session"}.get(handle >> 24, "session")


def _authorization_check(policy: NodePolicy, cmd: Command) -> Decision:
    """Permanent handles in the handle area, and what each session of the auth area authorizes."""
    for i, handle in enumerate(cmd.handles):
        if handle >> 24 != PERMANENT_HT or _permanent_allowed(policy, handle):
            continue
        if i < len(cmd.sessions):
            kind = _session_kind(cmd.sessions[i].sessionHandle)
            return Decision(False, f"session {i + 1} ({kind}) authorizes "
                                   f"{_permanent_name(handle)}, not allowed here")
        return Decision(False, f"handle {i + 1} names {_permanent_name(handle)}, "
                               "not allowed here")
    for i, session in enumerate(cmd.sessions):
        handle = session.sessionHandle
        if (handle >> 24 == PERMANENT_HT and handle != TPM_RH.PW
                and not _permanent_allowed(policy, handle)):
            return Decision(False, f"session {i + 1} of the authorization area is "
                                   f"{_permanent_name(handle)}, not allowed here")
    return ALLOW


def _handle_check(policy: NodePolicy, cmd: Command) -> Decision:
    code, h = cmd.commandCode, cmd.handles
    if code in PCR_CODES and h:
        pcr = h[0]
        if pcr < 0x20 and pcr < policy.min_pcr:  # TPM_RH_NULL etc. are not PCRs
            return Decision(False, f"PCR {pcr} is below this node's lowest PCR {policy.min_pcr}")
    elif code in NV_WRITE_CODES and len(h) >= 2:
        if not _in(policy.nv_write, h[1]):
            return Decision(False, f"NV index 0x{h[1]:08x} is outside this node's NV write ranges")
    elif code == TPM_CC.NV_ChangeAuth and h:
        if not _in(policy.nv_write, h[0]):
            return Decision(False, f"NV index 0x{h[0]:08x} is outside this node's NV write ranges")
    elif code == TPM_CC.NV_UndefineSpace and len(h) >= 2:
        if not _in(policy.nv_define, h[1]):
            return Decision(False, f"NV index 0x{h[1]:08x} is outside this node's NV define ranges")
    elif code == TPM_CC.NV_DefineSpace:
        index = _nv_public_index(cmd.parameters)
        if index is None or not _in(policy.nv_define, index):
            shown = "unreadable" if index is None else f"0x{index:08x}"
            return Decision(False, f"NV index {shown} is outside this node's NV define ranges")
    elif code == TPM_CC.NV_DefineSpace2:
        # TPM2B_NV_PUBLIC_2 is a union; checked only when every index may be defined
        if policy.nv_define != (ALL_NV,):
            return Decision(False, "NV_DefineSpace2 needs an unrestricted NV define range")
    elif code == TPM_CC.EvictControl and len(h) >= 2:
        # objectHandle persistent: it is being removed; otherwise persistentHandle is the target
        target = h[1] if h[1] >> 24 == 0x81 else _u32_at(cmd.parameters, 0)
        if target is None or not _in(policy.persistent, target):
            shown = "unreadable" if target is None else f"0x{target:08x}"
            return Decision(False, f"persistent handle {shown} is outside this node's ranges")
    elif code == TPM_CC.LoadExternal:
        hierarchy = _load_external_hierarchy(cmd.parameters)
        if (hierarchy is not None and hierarchy >> 24 == PERMANENT_HT
                and not _permanent_allowed(policy, hierarchy)):
            return Decision(False, f"{_permanent_name(hierarchy)} is not allowed here")
    return ALLOW


def decide(policy: NodePolicy, cmd: Command) -> Decision:
    """May this node run `cmd`? A refusal's reason is one line, for the log and status."""
    code = cmd.commandCode
    rule, reason = policy.rules.get(code, (policy.unnamed, "not named by the profile"))
    if rule is Rule.DENY:
        return Decision(False, f"{_name(code)} denied by profile {policy.profile}: {reason}")
    verdict = _authorization_check(policy, cmd)
    if not verdict.allowed:
        return Decision(False, f"{_name(code)}: {verdict.reason}")
    if rule is Rule.CHECK:
        verdict = _handle_check(policy, cmd)
        if not verdict.allowed:
            return Decision(False, f"{_name(code)}: {verdict.reason}")
    return ALLOW

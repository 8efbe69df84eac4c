"""The profiles full, user and attest: one decision, with a reason, per TPM 2.0 command code.

Every code of TPM_CC (Part 2 6.5.2, the command list of Part 3) has an explicit entry per
profile. `user` and `attest` are allow-lists: a code they do not name (vendor commands, codes
newer than this table) is denied. `full` allows everything, named or not.

Rule.CHECK means "allowed if its handles pass the node's checks" (decide.py): hierarchies,
PCR index, NV index range, persistent range.
"""

from __future__ import annotations

from enum import Enum

from cusetpm.tpm.constants import TPM_CC


class Rule(Enum):
    ALLOW = "allow"
    DENY = "deny"
    CHECK = "check"  # allowed when the handles pass the node's checks


A, D, C = Rule.ALLOW, Rule.DENY, Rule.CHECK

# code: (user, attest, reason). `full` is ALLOW for every code (handles still checked for the
# node's own ranges only when a config narrows them).
_TABLE: dict[TPM_CC, tuple[Rule, Rule, str]] = {
    TPM_CC.NV_UndefineSpaceSpecial: (D, D, "deletes a platform NV index: platform administration"),
    TPM_CC.EvictControl: (C, D, "persists objects: user within the node's persistent ranges"),
    TPM_CC.HierarchyControl: (D, D, "enables/disables hierarchies for every user of the TPM"),
    TPM_CC.NV_UndefineSpace: (C, D, "deletes an NV index: user within the node's NV define ranges"),
    TPM_CC.ChangeEPS: (D, D, "replaces the endorsement seed: destroys every EK"),
    TPM_CC.ChangePPS: (D, D, "replaces the platform seed"),
    TPM_CC.Clear: (D, D, "clears the owner hierarchy of the shared TPM"),
    TPM_CC.ClearControl: (D, D, "disables/enables TPM2_Clear for everyone"),
    TPM_CC.ClockSet: (D, D, "sets the TPM clock every user's quotes rely on"),
    TPM_CC.HierarchyChangeAuth: (D, D, "changes a hierarchy's authorization for everyone"),
    TPM_CC.NV_DefineSpace: (C, D, "creates an NV index: user within the node's NV define ranges"),
    TPM_CC.PCR_Allocate: (D, D, "reallocates PCR banks (takes effect at the next reset)"),
    TPM_CC.PCR_SetAuthPolicy: (D, D, "platform sets a PCR's policy"),
    TPM_CC.PP_Commands: (D, D, "changes which commands need physical presence"),
    TPM_CC.SetPrimaryPolicy: (D, D, "sets a hierarchy's policy for everyone"),
    TPM_CC.FieldUpgradeStart: (D, D, "firmware upgrade"),
    TPM_CC.ClockRateAdjust: (D, D, "adjusts the TPM clock rate for everyone"),
    TPM_CC.CreatePrimary: (C, C, "derives a primary key: allowed under the node's hierarchies"),
    TPM_CC.NV_GlobalWriteLock: (D, D, "write-locks every NV index with TPMA_NV_GLOBALLOCK"),
    TPM_CC.GetCommandAuditDigest: (D, D, "needs the privacy administrator (endorsement)"),
    TPM_CC.NV_Increment: (C, D, "writes NV: user within the node's NV write ranges"),
    TPM_CC.NV_SetBits: (C, D, "writes NV: user within the node's NV write ranges"),
    TPM_CC.NV_Extend: (C, D, "writes NV: user within the node's NV write ranges"),
    TPM_CC.NV_Write: (C, D, "writes NV: user within the node's NV write ranges"),
    TPM_CC.NV_WriteLock: (C, D, "locks NV writes: user within the node's NV write ranges"),
    TPM_CC.DictionaryAttackLockReset: (D, D, "resets the lockout counter: lockout authorization"),
    TPM_CC.DictionaryAttackParameters: (D, D, "changes dictionary-attack parameters for everyone"),
    TPM_CC.NV_ChangeAuth: (C, D, "changes an NV index's authValue: user within NV write ranges"),
    TPM_CC.PCR_Event: (C, D, "extends a PCR: user only at or above the node's lowest PCR"),
    TPM_CC.PCR_Reset: (C, D, "resets a PCR: user only at or above the node's lowest PCR"),
    TPM_CC.SequenceComplete: (A, A, "completes the caller's own hash/HMAC sequence"),
    TPM_CC.SetAlgorithmSet: (D, D, "platform selects the algorithm set"),
    TPM_CC.SetCommandCodeAuditStatus: (D, D, "changes which commands are audited for everyone"),
    TPM_CC.FieldUpgradeData: (D, D, "firmware upgrade"),
    TPM_CC.IncrementalSelfTest: (A, A, "self test: harmless, may be slow"),
    TPM_CC.SelfTest: (A, A, "self test: harmless, may be slow"),
    TPM_CC.Startup: (D, D, "the RM owns TPM startup (the kernel refuses it the same way)"),
    TPM_CC.Shutdown: (D, D, "the RM owns TPM shutdown: it would end every space's sessions"),
    TPM_CC.StirRandom: (A, A, "adds entropy to the TPM's RNG: cannot weaken it"),
    TPM_CC.ActivateCredential: (A, A, "uses the caller's own keys (credential activation)"),
    TPM_CC.Certify: (A, A, "signs with the caller's own key"),
    TPM_CC.PolicyNV: (A, A, "policy assertion on NV contents: reads only"),
    TPM_CC.CertifyCreation: (A, A, "signs with the caller's own key"),
    TPM_CC.Duplicate: (A, D, "exports the caller's own duplicable key"),
    TPM_CC.GetTime: (D, D, "needs the privacy administrator (endorsement)"),
    TPM_CC.GetSessionAuditDigest: (D, D, "needs the privacy administrator (endorsement)"),
    TPM_CC.NV_Read: (C, C, "reads NV: denied only when authorized by a refused hierarchy"),
    TPM_CC.NV_ReadLock: (C, D, "locks NV reads: user within the node's NV write ranges"),
    TPM_CC.ObjectChangeAuth: (A, D, "changes the caller's own key's authValue"),
    TPM_CC.PolicySecret: (C, C, "policy assertion on a secret: refused for refused hierarchies"),
    TPM_CC.Rewrap: (A, D, "rewraps the caller's own duplicated key"),
    TPM_CC.Create: (A, A, "creates a key under the caller's own parent"),
    TPM_CC.ECDH_ZGen: (A, D, "uses the caller's own key"),
    TPM_CC.HMAC: (A, A, "uses the caller's own key"),
    TPM_CC.Import: (A, D, "imports a key under the caller's own parent"),
    TPM_CC.Load: (A, A, "loads the caller's own key"),
    TPM_CC.Quote: (A, A, "signs PCR values with the caller's own key"),
    TPM_CC.RSA_Decrypt: (A, D, "uses the caller's own key"),
    TPM_CC.HMAC_Start: (A, A, "starts a sequence with the caller's own key"),
    TPM_CC.SequenceUpdate: (A, A, "updates the caller's own sequence"),
    TPM_CC.Sign: (A, A, "signs with the caller's own key"),
    TPM_CC.Unseal: (A, D, "unseals the caller's own sealed object"),
    TPM_CC.PolicySigned: (A, A, "policy assertion on a signature"),
    TPM_CC.ContextLoad: (A, A, "the RM virtualizes contexts per space"),
    TPM_CC.ContextSave: (A, A, "the RM virtualizes contexts per space"),
    TPM_CC.ECDH_KeyGen: (A, D, "uses the caller's own public key"),
    TPM_CC.EncryptDecrypt: (A, D, "uses the caller's own key"),
    TPM_CC.FlushContext: (A, A, "flushes the caller's own object or session"),
    TPM_CC.LoadExternal: (C, C, "loads a key: refused in a refused hierarchy"),
    TPM_CC.MakeCredential: (A, A, "public-key operation"),
    TPM_CC.NV_ReadPublic: (A, A, "reads an NV index's public area"),
    TPM_CC.PolicyAuthorize: (A, A, "policy assertion"),
    TPM_CC.PolicyAuthValue: (A, A, "policy assertion"),
    TPM_CC.PolicyCommandCode: (A, A, "policy assertion"),
    TPM_CC.PolicyCounterTimer: (A, A, "policy assertion"),
    TPM_CC.PolicyCpHash: (A, A, "policy assertion"),
    TPM_CC.PolicyLocality: (A, A, "policy assertion"),
    TPM_CC.PolicyNameHash: (A, A, "policy assertion"),
    TPM_CC.PolicyOR: (A, A, "policy assertion"),
    TPM_CC.PolicyTicket: (A, A, "policy assertion"),
    TPM_CC.ReadPublic: (A, A, "reads the public area of a loaded object"),
    TPM_CC.RSA_Encrypt: (A, A, "public-key operation"),
    TPM_CC.StartAuthSession: (A, A, "starts a session of the caller's own (quota-counted)"),
    TPM_CC.VerifySignature: (A, A, "public-key operation"),
    TPM_CC.ECC_Parameters: (A, A, "reads curve parameters"),
    TPM_CC.FirmwareRead: (D, D, "reads TPM firmware"),
    TPM_CC.GetCapability: (A, A, "reads TPM properties (the RM virtualizes handle lists)"),
    TPM_CC.GetRandom: (A, A, "random bytes"),
    TPM_CC.GetTestResult: (A, A, "reads the self-test result"),
    TPM_CC.Hash: (A, A, "hashes data"),
    TPM_CC.PCR_Read: (A, A, "reads PCRs"),
    TPM_CC.PolicyPCR: (A, A, "policy assertion on PCR values"),
    TPM_CC.PolicyRestart: (A, A, "resets the caller's own policy session"),
    TPM_CC.ReadClock: (A, A, "reads the TPM clock"),
    TPM_CC.PCR_Extend: (C, D, "extends a PCR: user only at or above the node's lowest PCR"),
    TPM_CC.PCR_SetAuthValue: (D, D, "sets a PCR's authValue for everyone"),
    TPM_CC.NV_Certify: (A, A, "signs NV contents with the caller's own key"),
    TPM_CC.EventSequenceComplete: (C, D, "extends a PCR: user only from the node's lowest PCR"),
    TPM_CC.HashSequenceStart: (A, A, "starts a hash sequence"),
    TPM_CC.PolicyPhysicalPresence: (A, A, "policy assertion"),
    TPM_CC.PolicyDuplicationSelect: (A, A, "policy assertion"),
    TPM_CC.PolicyGetDigest: (A, A, "reads the caller's own policy digest"),
    TPM_CC.TestParms: (A, A, "checks algorithm parameters"),
    TPM_CC.Commit: (A, A, "ECDAA commit with the caller's own key"),
    TPM_CC.PolicyPassword: (A, A, "policy assertion"),
    TPM_CC.ZGen_2Phase: (A, D, "uses the caller's own key"),
    TPM_CC.EC_Ephemeral: (A, D, "ephemeral key for two-phase key exchange"),
    TPM_CC.PolicyNvWritten: (A, A, "policy assertion"),
    TPM_CC.PolicyTemplate: (A, A, "policy assertion"),
    TPM_CC.CreateLoaded: (C, C, "creates a key; a primary only under the node's hierarchies"),
    TPM_CC.PolicyAuthorizeNV: (A, A, "policy assertion on an NV index"),
    TPM_CC.EncryptDecrypt2: (A, D, "uses the caller's own key"),
    TPM_CC.AC_GetCapability: (D, D, "attached components: not offered"),
    TPM_CC.AC_Send: (D, D, "attached components: not offered"),
    TPM_CC.Policy_AC_SendSelect: (A, A, "policy assertion"),
    TPM_CC.CertifyX509: (A, A, "signs with the caller's own key"),
    TPM_CC.ACT_SetTimeout: (D, D, "authenticated countdown timers are platform administration"),
    TPM_CC.ECC_Encrypt: (A, D, "public-key operation"),
    TPM_CC.ECC_Decrypt: (A, D, "uses the caller's own key"),
    TPM_CC.PolicyCapability: (A, A, "policy assertion"),
    TPM_CC.PolicyParameters: (A, A, "policy assertion"),
    TPM_CC.NV_DefineSpace2: (C, D, "creates an NV index: user within the node's NV define ranges"),
    TPM_CC.NV_ReadPublic2: (A, A, "reads an NV index's public area"),
    TPM_CC.SetCapability: (D, D, "changes TPM properties for everyone"),
    TPM_CC.Vendor_TCG_Test: (D, D, "vendor test command"),
}

PROFILES = ("full", "user", "attest")


def profile_rules(name: str) -> dict[int, tuple[Rule, str]]:
    """(rule, reason) per command code of profile `name`."""
    if name == "full":
        return {int(cc): (C, "full: allowed (handles checked only against narrowed ranges)")
                for cc in _TABLE}
    if name not in ("user", "attest"):
        raise ValueError(f"unknown profile {name!r} (known: {', '.join(PROFILES)})")
    return {int(cc): (user if name == "user" else attest, reason)
            for cc, (user, attest, reason) in _TABLE.items()}


def default_for_unnamed(name: str) -> Rule:
    """What a profile does with a code it does not name: only `full` allows it."""
    return Rule.ALLOW if name == "full" else Rule.DENY

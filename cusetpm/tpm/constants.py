"""TPM 2.0 constants, named as in TPM 2.0 Library Part 2 (Structures)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, IntFlag

TPM_HEADER_SIZE = 10
TPM_MAX_SESSIONS = 3  # Part 1: at most three sessions in one authorization area


class TPM_ST(IntEnum):
    RSP_COMMAND = 0x00C4
    NULL = 0x8000
    NO_SESSIONS = 0x8001
    SESSIONS = 0x8002
    ATTEST_NV = 0x8014
    ATTEST_COMMAND_AUDIT = 0x8015
    ATTEST_SESSION_AUDIT = 0x8016
    ATTEST_CERTIFY = 0x8017
    ATTEST_QUOTE = 0x8018
    ATTEST_TIME = 0x8019
    ATTEST_CREATION = 0x801A
    ATTEST_NV_DIGEST = 0x801C
    CREATION = 0x8021
    VERIFIED = 0x8022
    AUTH_SECRET = 0x8023
    HASHCHECK = 0x8024
    AUTH_SIGNED = 0x8025
    FU_MANIFEST = 0x8029


class TPM_SU(IntEnum):
    CLEAR = 0x0000
    STATE = 0x0001


class TPM_SE(IntEnum):
    HMAC = 0x00
    POLICY = 0x01
    TRIAL = 0x03


class TPM_CC(IntEnum):
    NV_UndefineSpaceSpecial = 0x011F
    EvictControl = 0x0120
    HierarchyControl = 0x0121
    NV_UndefineSpace = 0x0122
    ChangeEPS = 0x0124
    ChangePPS = 0x0125
    Clear = 0x0126
    ClearControl = 0x0127
    ClockSet = 0x0128
    HierarchyChangeAuth = 0x0129
    NV_DefineSpace = 0x012A
    PCR_Allocate = 0x012B
    PCR_SetAuthPolicy = 0x012C
    PP_Commands = 0x012D
    SetPrimaryPolicy = 0x012E
    FieldUpgradeStart = 0x012F
    ClockRateAdjust = 0x0130
    CreatePrimary = 0x0131
    NV_GlobalWriteLock = 0x0132
    GetCommandAuditDigest = 0x0133
    NV_Increment = 0x0134
    NV_SetBits = 0x0135
    NV_Extend = 0x0136
    NV_Write = 0x0137
    NV_WriteLock = 0x0138
    DictionaryAttackLockReset = 0x0139
    DictionaryAttackParameters = 0x013A
    NV_ChangeAuth = 0x013B
    PCR_Event = 0x013C
    PCR_Reset = 0x013D
    SequenceComplete = 0x013E
    SetAlgorithmSet = 0x013F
    SetCommandCodeAuditStatus = 0x0140
    FieldUpgradeData = 0x0141
    IncrementalSelfTest = 0x0142
    SelfTest = 0x0143
    Startup = 0x0144
    Shutdown = 0x0145
    StirRandom = 0x0146
    ActivateCredential = 0x0147
    Certify = 0x0148
    PolicyNV = 0x0149
    CertifyCreation = 0x014A
    Duplicate = 0x014B
    GetTime = 0x014C
    GetSessionAuditDigest = 0x014D
    NV_Read = 0x014E
    NV_ReadLock = 0x014F
    ObjectChangeAuth = 0x0150
    PolicySecret = 0x0151
    Rewrap = 0x0152
    Create = 0x0153
    ECDH_ZGen = 0x0154
    HMAC = 0x0155
    Import = 0x0156
    Load = 0x0157
    Quote = 0x0158
    RSA_Decrypt = 0x0159
    HMAC_Start = 0x015B
    SequenceUpdate = 0x015C
    Sign = 0x015D
    Unseal = 0x015E
    PolicySigned = 0x0160
    ContextLoad = 0x0161
    ContextSave = 0x0162
    ECDH_KeyGen = 0x0163
    EncryptDecrypt = 0x0164
    FlushContext = 0x0165
    LoadExternal = 0x0167
    MakeCredential = 0x0168
    NV_ReadPublic = 0x0169
    PolicyAuthorize = 0x016A
    PolicyAuthValue = 0x016B
    PolicyCommandCode = 0x016C
    PolicyCounterTimer = 0x016D
    PolicyCpHash = 0x016E
    PolicyLocality = 0x016F
    PolicyNameHash = 0x0170
    PolicyOR = 0x0171
    PolicyTicket = 0x0172
    ReadPublic = 0x0173
    RSA_Encrypt = 0x0174
    StartAuthSession = 0x0176
    VerifySignature = 0x0177
    ECC_Parameters = 0x0178
    FirmwareRead = 0x0179
    GetCapability = 0x017A
    GetRandom = 0x017B
    GetTestResult = 0x017C
    Hash = 0x017D
    PCR_Read = 0x017E
    PolicyPCR = 0x017F
    PolicyRestart = 0x0180
    ReadClock = 0x0181
    PCR_Extend = 0x0182
    PCR_SetAuthValue = 0x0183
    NV_Certify = 0x0184
    EventSequenceComplete = 0x0185
    HashSequenceStart = 0x0186
    PolicyPhysicalPresence = 0x0187
    PolicyDuplicationSelect = 0x0188
    PolicyGetDigest = 0x0189
    TestParms = 0x018A
    Commit = 0x018B
    PolicyPassword = 0x018C
    ZGen_2Phase = 0x018D
    EC_Ephemeral = 0x018E
    PolicyNvWritten = 0x018F
    PolicyTemplate = 0x0190
    CreateLoaded = 0x0191
    PolicyAuthorizeNV = 0x0192
    EncryptDecrypt2 = 0x0193
    AC_GetCapability = 0x0194
    AC_Send = 0x0195
    Policy_AC_SendSelect = 0x0196
    CertifyX509 = 0x0197
    ACT_SetTimeout = 0x0198
    ECC_Encrypt = 0x0199
    ECC_Decrypt = 0x019A
    PolicyCapability = 0x019B
    PolicyParameters = 0x019C
    NV_DefineSpace2 = 0x019D
    NV_ReadPublic2 = 0x019E
    SetCapability = 0x019F
    Vendor_TCG_Test = 0x20000001


TPM_CC_FIRST = min(TPM_CC)
TPM_CC_VENDOR_BIT = 0x20000000  # TPMA_CC.V: vendor-specific command


def cc_name(cc: int) -> str:
    """TPM2_<name> for logging; unknown codes as hex."""
    try:
        return f"TPM2_{TPM_CC(cc).name}"
    except ValueError:
        return f"TPM_CC(0x{cc:08x})"


def command_name(command: bytes) -> str:
    """TPM2_<name> of a command's header code, for logging; "?" if it has no header."""
    return cc_name(int.from_bytes(command[6:10], "big")) if len(command) >= 10 else "?"


class TPM_HT(IntEnum):
    PCR = 0x00
    NV_INDEX = 0x01
    HMAC_SESSION = 0x02
    POLICY_SESSION = 0x03
    PERMANENT = 0x40
    TRANSIENT = 0x80
    PERSISTENT = 0x81
    AC = 0x90


# Part 2 7.5: in TPM_CAP_HANDLES the session types double as "loaded" and "saved" ranges.
TPM_HT_LOADED_SESSION = TPM_HT.HMAC_SESSION
TPM_HT_SAVED_SESSION = TPM_HT.POLICY_SESSION
TPM_HR_SHIFT = 24
TPM_HR_HANDLE_MASK = 0x00FFFFFF


def handle_type(handle: int) -> int:
    return handle >> TPM_HR_SHIFT


def is_session_handle(handle: int) -> bool:
    return handle_type(handle) in (TPM_HT.HMAC_SESSION, TPM_HT.POLICY_SESSION)


def is_transient_handle(handle: int) -> bool:
    return handle_type(handle) == TPM_HT.TRANSIENT


def session_types_at(cc: int, position: int, handle_count: int) -> frozenset[int]:
    """The session handle types the handle area accepts at `position` (Part 3): any session
    for TPM2_ContextSave's TPMI_DH_CONTEXT, a policy session for the policySession handle of
    a TPM2_Policy* command (always its last handle), none anywhere else."""
    if cc == TPM_CC.ContextSave and position == 0:
        return frozenset({TPM_HT.HMAC_SESSION, TPM_HT.POLICY_SESSION})
    name = TPM_CC(cc).name if cc in TPM_CC._value2member_map_ else ""
    if name.startswith("Policy") and position == handle_count - 1:
        return frozenset({TPM_HT.POLICY_SESSION})
    return frozenset()


class TPM_RH(IntEnum):
    SRK = 0x40000000
    OWNER = 0x40000001
    REVOKE = 0x40000002
    TRANSPORT = 0x40000003
    OPERATOR = 0x40000004
    ADMIN = 0x40000005
    EK = 0x40000006
    NULL = 0x40000007
    UNASSIGNED = 0x40000008
    PW = 0x40000009  # TPM_RS_PW: the password "session"
    LOCKOUT = 0x4000000A
    ENDORSEMENT = 0x4000000B
    PLATFORM = 0x4000000C
    PLATFORM_NV = 0x4000000D


TPM_RS_PW = TPM_RH.PW


class TPM_CAP(IntEnum):
    ALGS = 0x00000000
    HANDLES = 0x00000001
    COMMANDS = 0x00000002
    PP_COMMANDS = 0x00000003
    AUDIT_COMMANDS = 0x00000004
    PCRS = 0x00000005
    TPM_PROPERTIES = 0x00000006
    PCR_PROPERTIES = 0x00000007
    ECC_CURVES = 0x00000008
    AUTH_POLICIES = 0x00000009
    ACT = 0x0000000A
    VENDOR_PROPERTY = 0x00000100


class TPM_PT(IntEnum):
    FAMILY_INDICATOR = 0x100
    LEVEL = 0x101
    REVISION = 0x102
    DAY_OF_YEAR = 0x103
    YEAR = 0x104
    MANUFACTURER = 0x105
    VENDOR_STRING_1 = 0x106
    VENDOR_STRING_2 = 0x107
    VENDOR_STRING_3 = 0x108
    VENDOR_STRING_4 = 0x109
    VENDOR_TPM_TYPE = 0x10A
    FIRMWARE_VERSION_1 = 0x10B
    FIRMWARE_VERSION_2 = 0x10C
    INPUT_BUFFER = 0x10D
    HR_TRANSIENT_MIN = 0x10E
    HR_PERSISTENT_MIN = 0x10F
    HR_LOADED_MIN = 0x110
    ACTIVE_SESSIONS_MAX = 0x111
    PCR_COUNT = 0x112
    PCR_SELECT_MIN = 0x113
    CONTEXT_GAP_MAX = 0x114
    NV_COUNTERS_MAX = 0x116
    NV_INDEX_MAX = 0x117
    MEMORY = 0x118
    CLOCK_UPDATE = 0x119
    CONTEXT_HASH = 0x11A
    CONTEXT_SYM = 0x11B
    CONTEXT_SYM_SIZE = 0x11C
    ORDERLY_COUNT = 0x11D
    MAX_COMMAND_SIZE = 0x11E
    MAX_RESPONSE_SIZE = 0x11F
    MAX_DIGEST = 0x120
    MAX_OBJECT_CONTEXT = 0x121
    MAX_SESSION_CONTEXT = 0x122
    PS_FAMILY_INDICATOR = 0x123
    PS_LEVEL = 0x124
    PS_REVISION = 0x125
    PS_DAY_OF_YEAR = 0x126
    PS_YEAR = 0x127
    SPLIT_MAX = 0x128
    TOTAL_COMMANDS = 0x129
    LIBRARY_COMMANDS = 0x12A
    VENDOR_COMMANDS = 0x12B
    NV_BUFFER_MAX = 0x12C
    MODES = 0x12D
    MAX_CAP_BUFFER = 0x12E
    PERMANENT = 0x200
    STARTUP_CLEAR = 0x201
    HR_NV_INDEX = 0x202
    HR_LOADED = 0x203
    HR_LOADED_AVAIL = 0x204
    HR_ACTIVE = 0x205
    HR_ACTIVE_AVAIL = 0x206
    HR_TRANSIENT_AVAIL = 0x207
    HR_PERSISTENT = 0x208
    HR_PERSISTENT_AVAIL = 0x209
    NV_COUNTERS = 0x20A
    NV_COUNTERS_AVAIL = 0x20B
    ALGORITHM_SET = 0x20C
    LOADED_CURVES = 0x20D
    LOCKOUT_COUNTER = 0x20E
    MAX_AUTH_FAIL = 0x20F
    LOCKOUT_INTERVAL = 0x210
    LOCKOUT_RECOVERY = 0x211
    NV_WRITE_RECOVERY = 0x212
    AUDIT_COUNTER_0 = 0x213
    AUDIT_COUNTER_1 = 0x214


class TPMA_SESSION(IntFlag):
    continueSession = 0x01
    auditExclusive = 0x02
    auditReset = 0x04
    decrypt = 0x20
    encrypt = 0x40
    audit = 0x80


@dataclass(frozen=True, slots=True)
class TPMA_CC:
    """Command attributes as the TPM reports them in TPM_CAP_COMMANDS (Part 2 9.3)."""

    commandIndex: int
    nv: bool
    extensive: bool
    flushed: bool
    cHandles: int
    rHandle: bool
    V: bool

    @classmethod
    def from_int(cls, value: int) -> TPMA_CC:
        return cls(
            commandIndex=value & 0xFFFF,
            nv=bool(value >> 22 & 1),
            extensive=bool(value >> 23 & 1),
            flushed=bool(value >> 24 & 1),
            cHandles=value >> 25 & 0x7,
            rHandle=bool(value >> 28 & 1),
            V=bool(value >> 29 & 1),
        )

    def to_int(self) -> int:
        return (
            self.commandIndex
            | self.nv << 22
            | self.extensive << 23
            | self.flushed << 24
            | self.cHandles << 25
            | self.rHandle << 28
            | self.V << 29
        )

    @property
    def command_code(self) -> int:
        """The TPM_CC this entry describes (vendor commands carry the V bit)."""
        return self.commandIndex | (TPM_CC_VENDOR_BIT if self.V else 0)

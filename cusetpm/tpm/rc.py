"""TPM_RC response codes and their decoding (Part 2 6.6, plus the TSS2 layer byte)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class TPM_RC(IntEnum):
    SUCCESS = 0x000
    BAD_TAG = 0x01E
    # format 0, version 2.0 errors (RC_VER1 = 0x100)
    INITIALIZE = 0x100
    FAILURE = 0x101
    SEQUENCE = 0x103
    PRIVATE = 0x10B
    HMAC = 0x119
    DISABLED = 0x120
    EXCLUSIVE = 0x121
    AUTH_TYPE = 0x124
    AUTH_MISSING = 0x125
    POLICY = 0x126
    PCR = 0x127
    PCR_CHANGED = 0x128
    UPGRADE = 0x12D
    TOO_MANY_CONTEXTS = 0x12E
    AUTH_UNAVAILABLE = 0x12F
    REBOOT = 0x130
    UNBALANCED = 0x131
    COMMAND_SIZE = 0x142
    COMMAND_CODE = 0x143
    AUTHSIZE = 0x144
    AUTH_CONTEXT = 0x145
    NV_RANGE = 0x146
    NV_SIZE = 0x147
    NV_LOCKED = 0x148
    NV_AUTHORIZATION = 0x149
    NV_UNINITIALIZED = 0x14A
    NV_SPACE = 0x14B
    NV_DEFINED = 0x14C
    BAD_CONTEXT = 0x150
    CPHASH = 0x151
    PARENT = 0x152
    NEEDS_TEST = 0x153
    NO_RESULT = 0x154
    SENSITIVE = 0x155
    # format 1 (RC_FMT1 = 0x080): the number of the handle/parameter/session is added
    ASYMMETRIC = 0x081
    ATTRIBUTES = 0x082
    HASH = 0x083
    VALUE = 0x084
    HIERARCHY = 0x085
    KEY_SIZE = 0x087
    MGF = 0x088
    MODE = 0x089
    TYPE = 0x08A
    HANDLE = 0x08B
    KDF = 0x08C
    RANGE = 0x08D
    AUTH_FAIL = 0x08E
    NONCE = 0x08F
    PP = 0x090
    SCHEME = 0x092
    SIZE = 0x095
    SYMMETRIC = 0x096
    TAG = 0x097
    SELECTOR = 0x098
    INSUFFICIENT = 0x09A
    SIGNATURE = 0x09B
    KEY = 0x09C
    POLICY_FAIL = 0x09D
    INTEGRITY = 0x09F
    TICKET = 0x0A0
    RESERVED_BITS = 0x0A1
    BAD_AUTH = 0x0A2
    EXPIRED = 0x0A3
    POLICY_CC = 0x0A4
    BINDING = 0x0A5
    CURVE = 0x0A6
    ECC_POINT = 0x0A7
    FW_LIMITED = 0x0A8
    SVN_LIMITED = 0x0A9
    # format 0 warnings (RC_WARN = 0x900)
    CONTEXT_GAP = 0x901
    OBJECT_MEMORY = 0x902
    SESSION_MEMORY = 0x903
    MEMORY = 0x904
    SESSION_HANDLES = 0x905
    OBJECT_HANDLES = 0x906
    LOCALITY = 0x907
    YIELDED = 0x908
    CANCELED = 0x909
    TESTING = 0x90A
    REFERENCE_H0 = 0x910
    REFERENCE_H1 = 0x911
    REFERENCE_H2 = 0x912
    REFERENCE_H3 = 0x913
    REFERENCE_H4 = 0x914
    REFERENCE_H5 = 0x915
    REFERENCE_H6 = 0x916
    REFERENCE_S0 = 0x918
    REFERENCE_S1 = 0x919
    REFERENCE_S2 = 0x91A
    REFERENCE_S3 = 0x91B
    REFERENCE_S4 = 0x91C
    REFERENCE_S5 = 0x91D
    REFERENCE_S6 = 0x91E
    NV_RATE = 0x920
    LOCKOUT = 0x921
    RETRY = 0x922
    NV_UNAVAILABLE = 0x923
    NOT_USED = 0x97F


RC_VER1 = 0x100
RC_FMT1 = 0x080
RC_WARN = 0x900
RC_P = 0x040  # format 1: the number is a parameter number
RC_S = 0x800  # format 1 with P clear: the number is a session number
RC_N_SHIFT = 8

# TSS2 layer numbers (tss2_common.h); cusetpm answers in the resource manager's layer, as the
# kernel's /dev/tpmrm0 does (TPM2_RC_COMMAND_CODE | 0x000B0000).
RC_LAYER_SHIFT = 16
RC_LAYER_MASK = 0x00FF0000
TSS2_TPM_RC_LAYER = 0
TSS2_RESMGR_RC_LAYER = 11 << RC_LAYER_SHIFT
LAYER_NAMES = {
    0: "TPM",
    6: "FEATURE",
    7: "ESAPI",
    8: "SYS",
    9: "MU",
    10: "TCTI",
    11: "RESMGR",
    12: "RESMGR_TPM",
}


def rm_rc(rc: int) -> int:
    """A TPM_RC in the resource-manager layer (0x000B0000 | rc)."""
    return TSS2_RESMGR_RC_LAYER | rc


@dataclass(frozen=True, slots=True)
class RCInfo:
    """A decoded response code."""

    rc: int
    layer: int  # 0 for the TPM itself, 11 for a resource manager, ...
    format1: bool
    warning: bool
    base: int  # the code without layer and handle/parameter/session number
    handle: int | None = None  # format 1: which handle (1..7)
    parameter: int | None = None  # format 1: which parameter (1..15)
    session: int | None = None  # format 1: which session (1..7)
    vendor: bool = False

    @property
    def name(self) -> str:
        try:
            text = f"TPM_RC_{TPM_RC(self.base).name}"
        except ValueError:
            text = f"TPM_RC(0x{self.base:03x})"
        if self.handle is not None:
            text += f"+H{self.handle}"
        elif self.parameter is not None:
            text += f"+P{self.parameter}"
        elif self.session is not None:
            text += f"+S{self.session}"
        if self.layer:
            text = f"{LAYER_NAMES.get(self.layer, f'layer{self.layer}')}:{text}"
        return text


def decode_rc(rc: int) -> RCInfo:
    layer = (rc & RC_LAYER_MASK) >> RC_LAYER_SHIFT
    code = rc & 0xFFFF
    if code & RC_FMT1:
        number = (code >> RC_N_SHIFT) & 0xF
        info = RCInfo(rc=rc, layer=layer, format1=True, warning=False, base=code & 0xBF)
        if code & RC_P:
            return _with(info, parameter=number or None)
        if number & 0x8:
            return _with(info, session=number & 0x7 or None)
        return _with(info, handle=number or None)
    vendor = bool(code & 0x400)  # the T bit
    warning = bool(code & 0x800)  # the S bit
    return RCInfo(
        rc=rc, layer=layer, format1=False, warning=warning, base=code & 0xFFF, vendor=vendor
    )


def _with(
    info: RCInfo,
    handle: int | None = None,
    parameter: int | None = None,
    session: int | None = None,
) -> RCInfo:
    return RCInfo(
        rc=info.rc,
        layer=info.layer,
        format1=True,
        warning=False,
        base=info.base,
        handle=handle,
        parameter=parameter,
        session=session,
    )


def rc_base(rc: int) -> int:
    """The error without layer and handle/parameter/session number (what to compare against)."""
    return decode_rc(rc).base


def rc_name(rc: int) -> str:
    if rc == 0:
        return "TPM_RC_SUCCESS"
    return decode_rc(rc).name

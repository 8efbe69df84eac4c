"""TPM 2.0 command bytes for the scenarios, built here from the spec.

Self-contained on purpose (no ``cusetpm`` import): the scenarios judge a node,
so they must not share the project's own marshalling, and they must import
quickly in the TCG guest, where every module costs time.
"""

from __future__ import annotations

import os
import struct

ST_NO_SESSIONS = 0x8001
ST_SESSIONS = 0x8002
RH_OWNER = 0x40000001
RH_NULL = 0x40000007
RS_PW = 0x40000009
CAP_HANDLES = 1
CAP_TPM_PROPERTIES = 6
HT_TRANSIENT = 0x80000000
HT_HMAC_SESSION = 0x02000000
HT_POLICY_SESSION = 0x03000000
PT_ACTIVE_SESSIONS_MAX = 0x111
PT_CONTEXT_GAP_MAX = 0x114
PT_HR_ACTIVE = 0x205
SE_HMAC, SE_POLICY, SE_TRIAL = 0x00, 0x01, 0x03

RC_SESSION_HANDLES = 0x905  # TPM_RC_SESSION_HANDLES: no room for another session
RC_CONTEXT_GAP = 0x901
RM_COMMAND_CODE = 0x000B0143  # the kernel's synthesized "unknown command code"

_HEADER = struct.Struct(">HII")


def command(code: int, body: bytes = b"", tag: int = ST_NO_SESSIONS) -> bytes:
    return _HEADER.pack(tag, 10 + len(body), code) + body


def get_random(count: int = 8) -> bytes:
    return command(0x17B, struct.pack(">H", count))


def flush_context(handle: int) -> bytes:
    return command(0x165, struct.pack(">I", handle))


def get_capability(cap: int, prop: int, count: int) -> bytes:
    return command(0x17A, struct.pack(">III", cap, prop, count))


def context_save(handle: int) -> bytes:
    return command(0x162, struct.pack(">I", handle))


def context_load(blob: bytes) -> bytes:
    """``blob`` is the parameter area of a ContextSave response (a TPMS_CONTEXT)."""
    return command(0x161, blob)


def read_public(handle: int) -> bytes:
    return command(0x173, struct.pack(">I", handle))


def policy_get_digest(session: int) -> bytes:
    return command(0x189, struct.pack(">I", session))


def hash_sequence_start() -> bytes:
    """HashSequenceStart(empty auth, SHA-256): the cheapest way to make a transient object."""
    return command(0x186, struct.pack(">HH", 0, 0x000B))


def start_auth_session(kind: int = SE_HMAC) -> bytes:
    """Unbound, unsalted session, SHA-256, no symmetric algorithm."""
    body = struct.pack(">II", RH_NULL, RH_NULL) + struct.pack(">H", 16) + os.urandom(16)
    body += struct.pack(">HBHH", 0, kind, 0x0010, 0x000B)
    return command(0x176, body)


def create_primary_ecc() -> bytes:
    """CreatePrimary(owner, password auth) of an ECC P-256 restricted decryption key.

    ECC because it is the fastest primary under TCG; the template is fixed, so the
    key is the same every time (derived from the owner seed).
    """
    # TPMT_PUBLIC: ECC, SHA-256, fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|
    # restricted|decrypt; AES-128-CFB, no scheme, NIST P-256, no KDF, empty point.
    params = struct.pack(">HHH", 0x0006, 128, 0x0043) + struct.pack(">HHH", 0x0010, 0x0003, 0x0010)
    public = struct.pack(">HHIH", 0x0023, 0x000B, 0x00030072, 0) + params + b"\0\0\0\0"
    auth = struct.pack(">IHBH", RS_PW, 0, 0, 0)
    body = struct.pack(">I", RH_OWNER) + struct.pack(">I", len(auth)) + auth
    body += struct.pack(">HHH", 4, 0, 0)  # TPM2B_SENSITIVE_CREATE: empty auth and data
    body += struct.pack(">H", len(public)) + public
    body += b"\0\0" + b"\0\0\0\0"  # no outsideInfo, no creation PCRs
    return command(0x131, body, ST_SESSIONS)


def rc(response: bytes) -> int:
    return int(struct.unpack_from(">I", response, 6)[0])


def size(response: bytes) -> int:
    return int(struct.unpack_from(">I", response, 2)[0])


def handle(response: bytes) -> int:
    """The handle a CreatePrimary/Load/StartAuthSession/ContextLoad response carries."""
    return int(struct.unpack_from(">I", response, 10)[0])


def parameters(response: bytes) -> bytes:
    return response[10:]


def cap_handles(response: bytes) -> tuple[bool, list[int]]:
    """(moreData, handles) of a GetCapability(TPM_CAP_HANDLES) response."""
    more = response[10] != 0
    count = struct.unpack_from(">I", response, 15)[0]
    return more, list(struct.unpack_from(f">{count}I", response, 19))


def cap_property(response: bytes) -> dict[int, int]:
    """property -> value of a GetCapability(TPM_CAP_TPM_PROPERTIES) response."""
    count = struct.unpack_from(">I", response, 15)[0]
    values = struct.unpack_from(f">{2 * count}I", response, 19)
    return dict(zip(values[0::2], values[1::2], strict=True))

"""Raw TPM commands for the node tests, built with cusetpm.tpm where it has builders."""

from __future__ import annotations

import os
import struct

from cusetpm.tpm import commands as build

TPM_RC_SUCCESS = 0
TPM_RC_CANCELED = 0x909
TPM_RH_OWNER = 0x40000001
TPM_RS_PW = 0x40000009
TPM_CAP_HANDLES = 1
TPM_HT_TRANSIENT = 0x80000000
TPM_HT_HMAC_SESSION = 0x02000000
TPM_HT_POLICY_SESSION = 0x03000000


def get_random(count: int = 8) -> bytes:
    return build.get_random(count)


def flush_context(handle: int) -> bytes:
    return build.flush_context(handle)


def get_handles(first: int, count: int = 64) -> bytes:
    return build.get_capability(TPM_CAP_HANDLES, first, count)


def create_primary_rsa(bits: int = 2048, unique: bytes = b"") -> bytes:
    """CreatePrimary(owner, password auth) of an RSA storage key: the slow command.

    Another `unique` is another key, so another (deterministic) prime search time."""
    return _create(0x131, TPM_RH_OWNER, bits, unique)


def create_rsa(parent: int, bits: int = 2048) -> bytes:
    """Create under `parent`: a slow command that names a transient handle."""
    return _create(0x153, parent, bits)


def _create(code: int, parent: int, bits: int, unique: bytes = b"") -> bytes:
    # TPMT_PUBLIC: RSA, SHA-256, fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|
    # restricted|decrypt, no policy; AES-128-CFB, no scheme, `bits`, default exponent.
    params = struct.pack(">HHHHHI", 0x0006, 128, 0x0043, 0x0010, bits, 0)
    public = struct.pack(">HHIH", 0x0001, 0x000B, 0x00030072, 0) + params
    public += struct.pack(">H", len(unique)) + unique
    auth = struct.pack(">IHBH", TPM_RS_PW, 0, 0, 0)
    body = struct.pack(">I", parent) + struct.pack(">I", len(auth)) + auth
    body += struct.pack(">HHH", 4, 0, 0)  # TPM2B_SENSITIVE_CREATE: empty auth and data
    body += struct.pack(">H", len(public)) + public
    body += b"\0\0" + b"\0\0\0\0"  # no outsideInfo, no creation PCRs
    return struct.pack(">HII", 0x8002, 10 + len(body), code) + body


def rc(response: bytes) -> int:
    return int(struct.unpack_from(">I", response, 6)[0])


def size(response: bytes) -> int:
    return int(struct.unpack_from(">I", response, 2)[0])


def handles(response: bytes) -> list[int]:
    """The handle list of a GetCapability(TPM_CAP_HANDLES) response."""
    assert rc(response) == TPM_RC_SUCCESS, hex(rc(response))
    count = struct.unpack_from(">I", response, 15)[0]
    return list(struct.unpack_from(f">{count}I", response, 19))


def start_hmac_session() -> bytes:
    """StartAuthSession: unbound, unsalted HMAC session, SHA-256, no symmetric."""
    body = struct.pack(">II", 0x40000007, 0x40000007)  # tpmKey, bind: TPM_RH_NULL
    body += struct.pack(">H", 16) + os.urandom(16)  # nonceCaller
    body += struct.pack(">HBHH", 0, 0x00, 0x0010, 0x000B)  # no salt, HMAC, sym NULL, SHA-256
    return struct.pack(">HII", 0x8001, 10 + len(body), 0x176) + body

"""Raw TPM 2.0 I/O on a device node, the way tpm2-tss's device TCTI does it.

Deliberately independent of ``cusetpm.tpm`` so a guest test checks the node,
not the project's own marshalling.
"""

from __future__ import annotations

import os
import struct

TPM_ST_NO_SESSIONS = 0x8001
TPM_CC_GETRANDOM = 0x0000017B
HEADER = struct.Struct(">HII")  # tag, size, command code / response code
MAX_RESPONSE = 4096


def getrandom_command(count: int) -> bytes:
    """TPM2_GetRandom(bytesRequested=count)."""
    body = struct.pack(">H", count)
    return HEADER.pack(TPM_ST_NO_SESSIONS, HEADER.size + len(body), TPM_CC_GETRANDOM) + body


def transact(node: str, command: bytes) -> bytes:
    """One write of ``command`` and one read of the whole response on a fresh descriptor."""
    fd = os.open(node, os.O_RDWR)
    try:
        written = os.write(fd, command)
        if written != len(command):
            raise OSError(f"short write to {node}: {written} of {len(command)} bytes")
        return os.read(fd, MAX_RESPONSE)
    finally:
        os.close(fd)


def parse_getrandom_response(response: bytes) -> bytes:
    """The random bytes of a successful TPM2_GetRandom response; AssertionError otherwise."""
    assert len(response) >= HEADER.size, f"response too short: {response.hex()}"
    tag, size, rc = HEADER.unpack_from(response)
    assert rc == 0, f"TPM2_GetRandom failed: rc {rc:#010x} ({response.hex()})"
    assert tag == TPM_ST_NO_SESSIONS, f"unexpected tag {tag:#06x}"
    assert size == len(response), f"header size {size} != {len(response)} bytes read"
    (count,) = struct.unpack_from(">H", response, HEADER.size)
    data = response[HEADER.size + 2 :]
    assert len(data) == count, f"TPM2B size {count} != {len(data)} bytes"
    return data


# -- more commands, for the CUSE tests' census of the TPM --------------------------------

TPM_ST_SESSIONS = 0x8002
TPM_CC_CREATE_PRIMARY = 0x00000131
TPM_CC_FLUSH_CONTEXT = 0x00000165
TPM_CC_GET_CAPABILITY = 0x0000017A
TPM_CC_START_AUTH_SESSION = 0x00000176
TPM_CAP_TPM_PROPERTIES = 0x00000006
TPM_RH_OWNER = 0x40000001
TPM_RH_NULL = 0x40000007
TPM_RS_PW = 0x40000009

# TPM_PT_HR_*: the TPM's own counts (PT_VAR + n); the RM passes these through unchanged.
TPM_PT_HR_LOADED = 0x203  # sessions loaded in TPM RAM
TPM_PT_HR_LOADED_AVAIL = 0x204
TPM_PT_HR_ACTIVE = 0x205  # sessions the TPM tracks, loaded or saved
TPM_PT_HR_ACTIVE_AVAIL = 0x206
TPM_PT_HR_TRANSIENT_AVAIL = 0x207  # further transient objects that would fit


def _command(tag: int, code: int, body: bytes) -> bytes:
    return HEADER.pack(tag, HEADER.size + len(body), code) + body


def response_code(response: bytes) -> int:
    assert len(response) >= HEADER.size, f"response too short: {response.hex()}"
    return int(HEADER.unpack_from(response)[2])


def get_properties_command(first: int, count: int) -> bytes:
    """GetCapability(TPM_CAP_TPM_PROPERTIES, first, count)."""
    body = struct.pack(">III", TPM_CAP_TPM_PROPERTIES, first, count)
    return _command(TPM_ST_NO_SESSIONS, TPM_CC_GET_CAPABILITY, body)


def parse_properties(response: bytes) -> dict[int, int]:
    """TPM_PT -> value from a GetCapability(TPM_CAP_TPM_PROPERTIES) response."""
    rc = response_code(response)
    assert rc == 0, f"GetCapability failed: rc {rc:#010x}"
    # moreData (1), capability (4), count (4), then (property, value) pairs
    capability, count = struct.unpack_from(">II", response, HEADER.size + 1)
    assert capability == TPM_CAP_TPM_PROPERTIES, f"capability {capability:#x}"
    pairs = struct.unpack_from(f">{2 * count}I", response, HEADER.size + 9)
    return dict(zip(pairs[0::2], pairs[1::2], strict=True))


def _password_auth() -> bytes:
    session = struct.pack(">IHBH", TPM_RS_PW, 0, 0, 0)  # empty nonce, no attributes, no hmac
    return struct.pack(">I", len(session)) + session


def create_primary_ecc_command() -> bytes:
    """CreatePrimary(owner) of an ECC P-256 storage key: quick, unlike RSA key generation."""
    # TPMT_PUBLIC: ECC, SHA-256, fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|
    # restricted|decrypt, no policy; AES-128-CFB, no scheme, NIST P-256, no KDF, empty unique.
    params = struct.pack(">HHHHHH", 0x0006, 128, 0x0043, 0x0010, 0x0003, 0x0010)
    public = struct.pack(">HHIH", 0x0023, 0x000B, 0x00030072, 0) + params + struct.pack(">HH", 0, 0)
    body = struct.pack(">I", TPM_RH_OWNER) + _password_auth()
    body += struct.pack(">HHH", 4, 0, 0)  # TPM2B_SENSITIVE_CREATE: empty auth and data
    body += struct.pack(">H", len(public)) + public
    body += struct.pack(">HI", 0, 0)  # no outsideInfo, no creation PCRs
    return _command(TPM_ST_SESSIONS, TPM_CC_CREATE_PRIMARY, body)


def create_primary_rsa_command(bits: int = 2048, unique: bytes = b"") -> bytes:
    """CreatePrimary(owner) of an RSA storage key: key generation, the slow command.

    A different `unique` gives a different key, and so a different prime search time."""
    params = struct.pack(">HHHHHI", 0x0006, 128, 0x0043, 0x0010, bits, 0)
    public = struct.pack(">HHIH", 0x0001, 0x000B, 0x00030072, 0) + params
    public += struct.pack(">H", len(unique)) + unique
    body = struct.pack(">I", TPM_RH_OWNER) + _password_auth()
    body += struct.pack(">HHH", 4, 0, 0)
    body += struct.pack(">H", len(public)) + public
    body += struct.pack(">HI", 0, 0)
    return _command(TPM_ST_SESSIONS, TPM_CC_CREATE_PRIMARY, body)


def created_handle(response: bytes) -> int:
    """The object handle of a successful CreatePrimary response."""
    rc = response_code(response)
    assert rc == 0, f"CreatePrimary failed: rc {rc:#010x}"
    return int(struct.unpack_from(">I", response, HEADER.size)[0])


def start_hmac_session_command() -> bytes:
    """StartAuthSession: unbound, unsalted HMAC session, no symmetric, SHA-256."""
    body = struct.pack(">II", TPM_RH_NULL, TPM_RH_NULL)
    body += struct.pack(">H", 16) + os.urandom(16)  # nonceCaller
    body += struct.pack(">HBHH", 0, 0x00, 0x0010, 0x000B)  # no salt, HMAC, NULL, SHA-256
    return _command(TPM_ST_NO_SESSIONS, TPM_CC_START_AUTH_SESSION, body)


def flush_context_command(handle: int) -> bytes:
    return _command(TPM_ST_NO_SESSIONS, TPM_CC_FLUSH_CONTEXT, struct.pack(">I", handle))


def exchange(fd: int, command: bytes) -> bytes:
    """One command and its whole response on an open (blocking) descriptor."""
    written = os.write(fd, command)
    if written != len(command):
        raise OSError(f"short write: {written} of {len(command)} bytes")
    return os.read(fd, MAX_RESPONSE)


# -- signing and policy sessions, for the loops beside the kernel's resource manager ------

TPM_CC_SIGN = 0x0000015D
TPM_CC_VERIFY_SIGNATURE = 0x00000177
TPM_CC_POLICY_COMMAND_CODE = 0x0000016C
TPM_CC_POLICY_RESTART = 0x00000180
TPM_CC_POLICY_GET_DIGEST = 0x00000189
TPM_ST_HASHCHECK = 0x8024
TPM_ALG_ECDSA, TPM_ALG_SHA256, TPM_ALG_NULL, TPM_ECC_NIST_P256 = 0x0018, 0x000B, 0x0010, 0x0003
TPM_SE_POLICY = 0x01


def create_primary_ecc_signing_command(unique: bytes = b"") -> bytes:
    """CreatePrimary(owner) of an unrestricted ECDSA-SHA256 P-256 signing key."""
    # fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|sign; no symmetric, ECDSA,
    # NIST P-256, no KDF; `unique.x` picks the key.
    params = struct.pack(">HHHHH", TPM_ALG_NULL, TPM_ALG_ECDSA, TPM_ALG_SHA256,
                         TPM_ECC_NIST_P256, TPM_ALG_NULL)
    public = struct.pack(">HHIH", 0x0023, TPM_ALG_SHA256, 0x00040072, 0) + params
    public += struct.pack(">H", len(unique)) + unique + struct.pack(">H", 0)
    body = struct.pack(">I", TPM_RH_OWNER) + _password_auth()
    body += struct.pack(">HHH", 4, 0, 0)
    body += struct.pack(">H", len(public)) + public
    body += struct.pack(">HI", 0, 0)
    return _command(TPM_ST_SESSIONS, TPM_CC_CREATE_PRIMARY, body)


def _tpm2b(data: bytes, offset: int) -> tuple[bytes, int]:
    (size,) = struct.unpack_from(">H", data, offset)
    return data[offset + 2 : offset + 2 + size], offset + 2 + size


def created_ecc_point(response: bytes) -> tuple[bytes, bytes]:
    """(x, y) of the ECC public key in a successful CreatePrimary response (its outPublic)."""
    created_handle(response)
    offset = HEADER.size + 4 + 4 + 2  # handle, parameterSize, TPM2B_PUBLIC.size
    offset += 2 + 2 + 4  # type, nameAlg, objectAttributes
    _, offset = _tpm2b(response, offset)  # authPolicy
    offset += 10  # symmetric (NULL), scheme + hash, curve, kdf (NULL)
    x, offset = _tpm2b(response, offset)
    y, _ = _tpm2b(response, offset)
    return x, y


def sign_command(key: int, digest: bytes) -> bytes:
    """Sign(key, digest) with the key's own scheme and a null hash-check ticket."""
    body = struct.pack(">I", key) + _password_auth()
    body += struct.pack(">H", len(digest)) + digest
    body += struct.pack(">H", TPM_ALG_NULL)  # inScheme: the key's
    body += struct.pack(">HIH", TPM_ST_HASHCHECK, TPM_RH_NULL, 0)
    return _command(TPM_ST_SESSIONS, TPM_CC_SIGN, body)


def parse_ecdsa_signature(response: bytes) -> bytes:
    """The TPMT_SIGNATURE (ECDSA) of a successful Sign response, as VerifySignature takes it."""
    rc = response_code(response)
    assert rc == 0, f"Sign failed: rc {rc:#010x}"
    (size,) = struct.unpack_from(">I", response, HEADER.size)  # parameterSize
    signature = response[HEADER.size + 4 : HEADER.size + 4 + size]
    alg, hash_alg = struct.unpack_from(">HH", signature)
    assert (alg, hash_alg) == (TPM_ALG_ECDSA, TPM_ALG_SHA256), (hex(alg), hex(hash_alg))
    return signature


def ecdsa_r_s(signature: bytes) -> tuple[int, int]:
    r, offset = _tpm2b(signature, 4)
    s, _ = _tpm2b(signature, offset)
    return int.from_bytes(r, "big"), int.from_bytes(s, "big")


def verify_signature_command(key: int, digest: bytes, signature: bytes) -> bytes:
    body = struct.pack(">I", key) + struct.pack(">H", len(digest)) + digest + signature
    return _command(TPM_ST_NO_SESSIONS, TPM_CC_VERIFY_SIGNATURE, body)


def start_policy_session_command() -> bytes:
    """StartAuthSession: unbound, unsalted policy session, no symmetric, SHA-256."""
    body = struct.pack(">II", TPM_RH_NULL, TPM_RH_NULL)
    body += struct.pack(">H", 16) + os.urandom(16)
    body += struct.pack(">HBHH", 0, TPM_SE_POLICY, TPM_ALG_NULL, TPM_ALG_SHA256)
    return _command(TPM_ST_NO_SESSIONS, TPM_CC_START_AUTH_SESSION, body)


def started_session(response: bytes) -> int:
    rc = response_code(response)
    assert rc == 0, f"StartAuthSession failed: rc {rc:#010x}"
    return int(struct.unpack_from(">I", response, HEADER.size)[0])


def policy_restart_command(session: int) -> bytes:
    return _command(TPM_ST_NO_SESSIONS, TPM_CC_POLICY_RESTART, struct.pack(">I", session))


def policy_command_code_command(session: int, code: int) -> bytes:
    body = struct.pack(">II", session, code)
    return _command(TPM_ST_NO_SESSIONS, TPM_CC_POLICY_COMMAND_CODE, body)


def policy_get_digest_command(session: int) -> bytes:
    return _command(TPM_ST_NO_SESSIONS, TPM_CC_POLICY_GET_DIGEST, struct.pack(">I", session))


def parse_policy_digest(response: bytes) -> bytes:
    rc = response_code(response)
    assert rc == 0, f"PolicyGetDigest failed: rc {rc:#010x}"
    digest, _ = _tpm2b(response, HEADER.size)
    return digest


# -- ECDSA P-256 verification without the TPM (and without importing a crypto library,
# which costs many seconds under TCG) ------------------------------------------------------

_P = 0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF
_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_A = _P - 3
_B = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
_G = (0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296,
      0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5)
_Point = tuple[int, int] | None


def _add(p: _Point, q: _Point) -> _Point:
    if p is None:
        return q
    if q is None:
        return p
    if p[0] == q[0] and (p[1] + q[1]) % _P == 0:
        return None
    if p == q:
        slope = (3 * p[0] * p[0] + _A) * pow(2 * p[1], -1, _P) % _P
    else:
        slope = (q[1] - p[1]) * pow(q[0] - p[0], -1, _P) % _P
    x = (slope * slope - p[0] - q[0]) % _P
    return x, (slope * (p[0] - x) - p[1]) % _P


def _mul(k: int, p: _Point) -> _Point:
    result: _Point = None
    while k:
        if k & 1:
            result = _add(result, p)
        p = _add(p, p)
        k >>= 1
    return result


def ecdsa_p256_verify(x: bytes, y: bytes, digest: bytes, r: int, s: int) -> bool:
    """FIPS 186-4 ECDSA verification of (r, s) over a SHA-256 digest with key (x, y)."""
    q = (int.from_bytes(x, "big"), int.from_bytes(y, "big"))
    if (q[1] * q[1] - q[0] ** 3 - _A * q[0]) % _P != _B:
        return False  # not on the curve
    if not (0 < r < _N and 0 < s < _N):
        return False
    w = pow(s, -1, _N)
    e = int.from_bytes(digest, "big")
    point = _add(_mul(e * w % _N, _G), _mul(r * w % _N, q))
    return point is not None and point[0] % _N == r

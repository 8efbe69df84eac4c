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

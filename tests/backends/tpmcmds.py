"""The TPM commands the backend tests send.

The ones the resource manager builds itself come from cusetpm.tpm.commands;
the rest (CreatePrimary, EvictControl) and the few response fields the tests
read are marshalled here with struct.
"""

from __future__ import annotations

import struct

from cusetpm.tpm import commands

TPM_ST_SESSIONS = 0x8002

TPM_CC_EVICT_CONTROL = 0x120
TPM_CC_CREATE_PRIMARY = 0x131

TPM_RC_SUCCESS = 0x000
TPM_RC_INITIALIZE = 0x100
TPM_RC_CANCELED = 0x909

TPM_SU_CLEAR = 0
TPM_SU_STATE = 1
TPM_RH_OWNER = 0x40000001
TPM_RS_PW = 0x40000009
TPM_CAP_HANDLES = 1
PERSISTENT_FIRST = 0x81000000
TRANSIENT_FIRST = 0x80000000

_ALG_RSA = 0x0001
_ALG_SHA256 = 0x000B
_ALG_AES = 0x0006
_ALG_CFB = 0x0043
_ALG_NULL = 0x0010
_ALG_ECC = 0x0023
_ECC_NIST_P256 = 0x0003
# fixedTPM | fixedParent | sensitiveDataOrigin | userWithAuth | restricted | decrypt
_STORAGE_KEY_ATTRS = 0x00030072


def command(tag: int, cc: int, body: bytes = b"") -> bytes:
    return struct.pack(">HII", tag, 10 + len(body), cc) + body


def rc(response: bytes) -> int:
    return int(struct.unpack_from(">I", response, 6)[0])


def _pw_session() -> bytes:
    # TPM_RS_PW, empty nonce, no attributes, empty password.
    session = struct.pack(">IHBH", TPM_RS_PW, 0, 0, 0)
    return struct.pack(">I", len(session)) + session


def _tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def startup(su: int = TPM_SU_CLEAR) -> bytes:
    return commands.startup(su)


def shutdown(su: int = TPM_SU_CLEAR) -> bytes:
    return commands.shutdown(su)


def get_random(n: int) -> bytes:
    return commands.get_random(n)


def _storage_template(alg: str, unique: bytes) -> bytes:
    sym = struct.pack(">HHH", _ALG_AES, 128, _ALG_CFB)
    head = struct.pack(">HHI", _ALG_RSA if alg == "rsa" else _ALG_ECC, _ALG_SHA256,
                       _STORAGE_KEY_ATTRS) + _tpm2b(b"")
    if alg == "rsa":
        params = sym + struct.pack(">HHI", _ALG_NULL, 2048, 0)
        return head + params + _tpm2b(unique)
    params = sym + struct.pack(">HHH", _ALG_NULL, _ECC_NIST_P256, _ALG_NULL)
    return head + params + _tpm2b(unique) + _tpm2b(b"")


def create_primary(alg: str, unique: bytes = b"") -> bytes:
    """CreatePrimary of a storage key ("rsa": RSA-2048, "ecc": P-256) under owner.

    unique varies the template, and so the key (and, for RSA, how long it takes).
    """
    sensitive = _tpm2b(_tpm2b(b"") + _tpm2b(b""))
    params = (sensitive + _tpm2b(_storage_template(alg, unique)) + _tpm2b(b"")
              + struct.pack(">I", 0))
    body = struct.pack(">I", TPM_RH_OWNER) + _pw_session() + params
    return command(TPM_ST_SESSIONS, TPM_CC_CREATE_PRIMARY, body)


def response_handle(response: bytes) -> int:
    return int(struct.unpack_from(">I", response, 10)[0])


def context_save(handle: int) -> bytes:
    return commands.context_save(handle)


def context_blob(response: bytes) -> bytes:
    """The TPMS_CONTEXT of a ContextSave response (the whole parameter area)."""
    return response[10:]


def context_load(context: bytes) -> bytes:
    return commands.context_load_raw(context)


def flush_context(handle: int) -> bytes:
    return commands.flush_context(handle)


def evict_control(object_handle: int, persistent: int) -> bytes:
    body = (struct.pack(">II", TPM_RH_OWNER, object_handle) + _pw_session()
            + struct.pack(">I", persistent))
    return command(TPM_ST_SESSIONS, TPM_CC_EVICT_CONTROL, body)


def get_capability_handles(first: int, count: int = 64) -> bytes:
    return commands.get_capability(TPM_CAP_HANDLES, first, count)


def handles(response: bytes) -> list[int]:
    """The handle list of a GetCapability(TPM_CAP_HANDLES) response."""
    _more, _cap, n = struct.unpack_from(">BII", response, 10)
    return list(struct.unpack_from(f">{n}I", response, 19))

"""Client workloads shared by the benchmark sections: raw TPM commands, no client library.

A workload is set up once per system under test (it creates what it needs through that
system) and then yields one command to repeat; every system is driven with the same bytes.
The keys used for signing carry an all-zero authPolicy and no userWithAuth, so a fresh policy
session authorizes them with no HMAC to compute: the workload measures the RM, not Python
cryptography.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from cusetpm.tpm import commands as build
from cusetpm.tpm.command import AuthCommand, Command
from cusetpm.tpm.constants import TPM_CC, TPM_RH, TPM_RS_PW, TPM_SE, TPM_ST, TPMA_SESSION
from cusetpm.tpm.response import parse_response

Transmit = Callable[[bytes], bytes]

ALG_SHA256, ALG_NULL, ALG_ECC, ALG_AES, ALG_CFB, ALG_ECDSA = 0x0B, 0x10, 0x23, 0x06, 0x43, 0x18
ECC_NIST_P256 = 0x0003
ST_HASHCHECK = 0x8024
# fixedTPM | fixedParent | sensitiveDataOrigin | userWithAuth | restricted | decrypt
STORAGE = 0x00030072
# fixedTPM | fixedParent | sensitiveDataOrigin | sign: no userWithAuth, so a policy authorizes
POLICY_SIGNING = 0x00040032
ZERO_POLICY = bytes(32)  # the policyDigest of a policy session with no assertions


def _tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def _public(attributes: bytes, policy: bytes, params: bytes) -> bytes:
    body = struct.pack(">HH", ALG_ECC, ALG_SHA256) + attributes + _tpm2b(policy) + params
    return _tpm2b(body + b"\0\0\0\0")  # unique: empty x and y


def storage_template() -> bytes:
    params = struct.pack(">HHHHHH", ALG_AES, 128, ALG_CFB, ALG_NULL, ECC_NIST_P256, ALG_NULL)
    return _public(struct.pack(">I", STORAGE), b"", params)


def policy_signing_template(unique: int = 0) -> bytes:
    params = struct.pack(">HHHHH", ALG_NULL, ALG_ECDSA, ALG_SHA256, ECC_NIST_P256, ALG_NULL)
    # Different authPolicy-free keys from one template would be one key: vary the unique x.
    body = struct.pack(">HHI", ALG_ECC, ALG_SHA256, POLICY_SIGNING) + _tpm2b(ZERO_POLICY)
    body += params + _tpm2b(unique.to_bytes(4, "big") if unique else b"") + b"\0\0"
    return _tpm2b(body)


def create_primary(transmit: Transmit, template: bytes) -> int:
    params = struct.pack(">HHH", 4, 0, 0) + template + b"\0\0" + b"\0\0\0\0"
    command = Command(
        TPM_ST.SESSIONS, TPM_CC.CreatePrimary, [TPM_RH.OWNER], [AuthCommand(TPM_RS_PW)], params
    )
    return _handle(transmit(command.to_bytes()))


def start_session(transmit: Transmit, session_type: int) -> int:
    params = (
        _tpm2b(os.urandom(16)) + b"\0\0" + struct.pack(">BHH", session_type, ALG_NULL, ALG_SHA256)
    )
    command = Command(
        TPM_ST.NO_SESSIONS, TPM_CC.StartAuthSession, [TPM_RH.NULL, TPM_RH.NULL], [], params
    )
    return _handle(transmit(command.to_bytes()))


def sign(key: int, session: int) -> bytes:
    """Sign a SHA-256 digest with `key`, authorized by the policy session `session`."""
    digest = hashlib.sha256(b"cusetpm").digest()
    params = _tpm2b(digest) + struct.pack(">H", ALG_NULL)  # inScheme: the key's own
    params += struct.pack(">HI", ST_HASHCHECK, TPM_RH.NULL) + b"\0\0"  # a NULL ticket
    auth = AuthCommand(session, b"", TPMA_SESSION.continueSession, b"")
    return Command(TPM_ST.SESSIONS, TPM_CC.Sign, [key], [auth], params).to_bytes()


def _handle(response: bytes) -> int:
    parsed = parse_response(response, has_handle=True)
    if parsed.responseCode or parsed.handle is None:
        raise RuntimeError(f"setup command failed: rc 0x{parsed.responseCode:08x}")
    return parsed.handle


def check(response: bytes) -> None:
    rc = int.from_bytes(response[6:10], "big")
    if rc:
        raise RuntimeError(f"workload command failed: rc 0x{rc:08x}")


@dataclass
class Workload:
    name: str
    setup: Callable[[Transmit], bytes]  # creates what it needs; returns the command to repeat
    kernel_round_trips: int  # what the kernel's RM spends on the same command


def _get_random(transmit: Transmit) -> bytes:
    return build.get_random(16)


def _read_public(transmit: Transmit) -> bytes:
    return build.read_public(create_primary(transmit, storage_template()))


def _sign_3_objects(transmit: Transmit) -> bytes:
    keys = [create_primary(transmit, policy_signing_template(i + 1)) for i in range(3)]
    session = start_session(transmit, TPM_SE.POLICY)
    return sign(keys[1], session)


WORKLOADS = [
    # kernel: 1 command + load/save/flush per object in the space + load/save per session
    Workload("GetRandom", _get_random, kernel_round_trips=1),
    Workload("ReadPublic, 1 object", _read_public, kernel_round_trips=1 + 3),
    Workload("Sign, 3 objects + 1 policy session", _sign_3_objects, kernel_round_trips=1 + 9 + 2),
]

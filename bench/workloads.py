"""Client workloads shared by the benchmark sections: raw TPM commands, no client library.

A workload is set up once per system under test (it creates what it needs through that
system) and then yields one command to repeat; every system is driven with the same bytes.
The keys used for signing carry an all-zero authPolicy and no userWithAuth, so a fresh policy
session authorizes them with no HMAC to compute: the workload measures the RM, not Python
cryptography.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from cusetpm.tpm import commands as build
from cusetpm.tpm.command import AuthCommand, Command
from cusetpm.tpm.constants import TPM_CC, TPM_RH, TPM_RS_PW, TPM_SE, TPM_ST, TPMA_SESSION
from cusetpm.tpm.response import parse_response

Transmit = Callable[[bytes], bytes]

ALG_SHA256, ALG_NULL, ALG_ECC, ALG_AES, ALG_CFB, ALG_ECDSA = 0x0B, 0x10, 0x23, 0x06, 0x43, 0x18
ALG_RSA = 0x01
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


def rsa2048_storage_template() -> bytes:
    """An RSA-2048 restricted decryption key: the TPM generates primes (slow)."""
    params = struct.pack(">HHHHHI", ALG_AES, 128, ALG_CFB, ALG_NULL, 2048, 0)
    body = struct.pack(">HHI", ALG_RSA, ALG_SHA256, STORAGE) + _tpm2b(b"") + params
    return _tpm2b(body + _tpm2b(b""))


def create_primary_command(template: bytes) -> bytes:
    params = struct.pack(">HHH", 4, 0, 0) + template + b"\0\0" + b"\0\0\0\0"
    return Command(
        TPM_ST.SESSIONS, TPM_CC.CreatePrimary, [TPM_RH.OWNER], [AuthCommand(TPM_RS_PW)], params
    ).to_bytes()


def create_primary(transmit: Transmit, template: bytes) -> int:
    return _handle(transmit(create_primary_command(template)))


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


def rate(transmit: Transmit, command: bytes, seconds: float) -> tuple[float, int]:
    """(commands/s, commands sent) repeating `command` for about `seconds`, after one checked
    run; the clock is read every 16 commands, which is noise next to a TPM command."""
    check(transmit(command))
    n = 0
    start = time.perf_counter()
    while True:
        for _ in range(16):
            transmit(command)
        n += 16
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return n / elapsed, n


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


# --- the comparison workloads (bench.compare, bench.scale, bench.guest_bench) ------------------
#
# Some of these cannot repeat fixed bytes: an HMAC session's nonces roll with every command,
# and create/load/flush feeds one command's output into the next. So a comparison workload
# prepares a client operation: `prepare(transmit)` sets up what it needs through `transmit`
# and returns `op()`, which sends exactly one TPM command and returns its response.

Op = Callable[[], bytes]

ALG_KEYEDHASH, ALG_HMAC = 0x08, 0x05
RC_RETRY = struct.pack(">I", 0x922)
PCR_SELECT_0 = struct.pack(">IHB", 1, ALG_SHA256, 3) + b"\x01\x00\x00"  # TPML: sha256 {PCR 0}


def _u16(data: bytes, at: int) -> tuple[int, int]:
    return int.from_bytes(data[at:at + 2], "big"), at + 2


def _tpm2b_at(data: bytes, at: int) -> tuple[bytes, int]:
    size, at = _u16(data, at)
    return data[at:at + size], at + size


def _password_auth() -> AuthCommand:
    return AuthCommand(TPM_RS_PW, b"", 0, b"")


def start_session_nonce(transmit: Transmit, session_type: int) -> tuple[int, bytes]:
    """StartAuthSession (unbound, unsalted, no symmetric): (handle, nonceTPM)."""
    params = (
        _tpm2b(os.urandom(16)) + b"\0\0" + struct.pack(">BHH", session_type, ALG_NULL, ALG_SHA256)
    )
    command = Command(
        TPM_ST.NO_SESSIONS, TPM_CC.StartAuthSession, [TPM_RH.NULL, TPM_RH.NULL], [], params
    )
    response = transmit(command.to_bytes())
    handle = _handle(response)
    nonce, _ = _tpm2b_at(response, 14)
    return handle, nonce


def policy_pcr(session: int) -> bytes:
    """PolicyPCR(session, empty pcrDigest, sha256 {PCR 0}): no authorization, fixed bytes."""
    return Command(
        TPM_ST.NO_SESSIONS, TPM_CC.PolicyPCR, [session], [], b"\0\0" + PCR_SELECT_0
    ).to_bytes()


def create_primary_public(transmit: Transmit, template: bytes) -> tuple[int, bytes]:
    """CreatePrimary under the owner hierarchy: (handle, outPublic as a TPM2B)."""
    params = struct.pack(">HHH", 4, 0, 0) + template + b"\0\0" + b"\0\0\0\0"
    response = transmit(Command(
        TPM_ST.SESSIONS, TPM_CC.CreatePrimary, [TPM_RH.OWNER], [_password_auth()], params
    ).to_bytes())
    handle = _handle(response)
    public, _ = _tpm2b_at(response, 18)  # header, handle, parameterSize
    return handle, _tpm2b(public)


def load_external_public(public: bytes) -> bytes:
    """LoadExternal of a public area alone into the NULL hierarchy: a cheap 'object'."""
    return Command(
        TPM_ST.NO_SESSIONS, TPM_CC.LoadExternal, [], [],
        b"\0\0" + public + struct.pack(">I", TPM_RH.NULL),
    ).to_bytes()


def load_object(transmit: Transmit, command: bytes) -> int:
    return _handle(transmit(command))


class AuditedGetRandom:
    """GetRandom(16) with an unbound, unsalted HMAC session set for audit.

    GetRandom authorizes nothing, so a session on it must be an audit, encrypt or decrypt
    session; audit is the one that needs no symmetric key. The session's HMAC key is
    sessionKey || authValue (Part 1, 19.6): both empty for an unbound, unsalted session, so
    the HMAC is cheap and every command still carries a fresh, checked HMAC and rolls the
    nonces the way a real client's session does.
    """

    ATTRIBUTES = TPMA_SESSION.continueSession | TPMA_SESSION.audit

    def __init__(self, transmit: Transmit) -> None:
        self.transmit = transmit
        self.handle, self.nonce_tpm = start_session_nonce(transmit, TPM_SE.HMAC)
        self.params = struct.pack(">H", 16)
        self.cp_hash = hashlib.sha256(struct.pack(">I", TPM_CC.GetRandom) + self.params).digest()
        self.counter = 0

    def __call__(self) -> bytes:
        self.counter += 1
        nonce = self.counter.to_bytes(16, "big")  # fresh per command; its value is free
        mac = hmac.new(
            b"", self.cp_hash + nonce + self.nonce_tpm + bytes([self.ATTRIBUTES]), hashlib.sha256
        ).digest()
        auth = AuthCommand(self.handle, nonce, self.ATTRIBUTES, mac)
        response = self.transmit(
            Command(TPM_ST.SESSIONS, TPM_CC.GetRandom, [], [auth], self.params).to_bytes()
        )
        check(response)
        # parameterSize, then the parameters, then the session's nonceTPM for the next HMAC.
        at = 14 + int.from_bytes(response[10:14], "big")
        self.nonce_tpm, _ = _tpm2b_at(response, at)
        return response


class Churn:
    """Create an ECC key under a storage primary, Load it, FlushContext it: one command a call."""

    def __init__(self, transmit: Transmit) -> None:
        self.transmit = transmit
        self.parent = create_primary(transmit, storage_template())
        self.step = 0
        self.blob = b""
        self.loaded = 0
        sensitive = _tpm2b(b"\0\0\0\0")  # empty userAuth, empty data
        self.create = Command(
            TPM_ST.SESSIONS, TPM_CC.Create, [self.parent], [_password_auth()],
            sensitive + policy_signing_template() + b"\0\0" + b"\0\0\0\0",
        ).to_bytes()

    def __call__(self) -> bytes:
        step, self.step = self.step, (self.step + 1) % 3
        if step == 0:
            response = self.transmit(self.create)
            # libtpms answers about one ECC Create in 60 with TPM_RC_RETRY; a client that
            # sees it (there is no RM, or the RM passes it on) simply sends it again.
            while response[6:10] == RC_RETRY:
                response = self.transmit(self.create)
            check(response)
            private, at = _tpm2b_at(response, 14)
            public, _ = _tpm2b_at(response, at)
            self.blob = _tpm2b(private) + _tpm2b(public)
        elif step == 1:
            response = self.transmit(Command(
                TPM_ST.SESSIONS, TPM_CC.Load, [self.parent], [_password_auth()], self.blob
            ).to_bytes())
            self.loaded = _handle(response)
        else:
            response = self.transmit(build.flush_context(self.loaded))
            check(response)
        return response


def _repeat(transmit: Transmit, command: bytes) -> Op:
    check(transmit(command))
    return lambda: transmit(command)


@dataclass
class CompareWorkload:
    name: str
    short: str  # for the chart's axis
    prepare: Callable[[Transmit], Op]
    kernel_round_trips: float  # the kernel RM's TPM commands per client command (DESIGN.md)


COMPARE_WORKLOADS = [
    CompareWorkload("GetRandom", "GetRandom", lambda t: _repeat(t, _get_random(t)), 1),
    CompareWorkload("ReadPublic, 1 object", "ReadPublic",
                    lambda t: _repeat(t, _read_public(t)), 1 + 3),
    CompareWorkload("Sign, ECC key, 3 objects + policy session", "Sign",
                    lambda t: _repeat(t, _sign_3_objects(t)), 1 + 9 + 2),
    CompareWorkload("GetRandom + HMAC (audit) session", "HMAC sess.", AuditedGetRandom, 1 + 2),
    CompareWorkload("PolicyPCR on a policy session", "PolicyPCR",
                    lambda t: _repeat(t, policy_pcr(start_session(t, TPM_SE.POLICY))), 1 + 2),
    # The kernel loads every object of the space before each command and saves + flushes
    # each after: Create 1 + 3 (parent), Load 1 + 1 + 2 * 2 (parent and the new key),
    # FlushContext 1 + 2 loads + 2 (the parent saved again) + 1 ContextSave of the flushed
    # key, which fails with TPM_RC_REFERENCE_H0 and is how the kernel learns the slot is
    # free: 16 for 3 client commands (counted in the guest by bench.guest_slowtpm).
    CompareWorkload("Create/Load/Flush churn (per command)", "Churn", Churn, (4 + 6 + 6) / 3),
]


def flush_all(transmit: Transmit) -> None:
    """Flush every transient object and session: a direct client has no RM to do it."""
    from cusetpm.tpm.constants import TPM_CAP, TPM_HT

    for kind in (TPM_HT.TRANSIENT, TPM_HT.HMAC_SESSION, TPM_HT.POLICY_SESSION):
        _, data = build.parse_get_capability(
            transmit(build.get_capability(TPM_CAP.HANDLES, kind << 24, 254))
        )
        for handle in data.handles:
            transmit(build.flush_context(handle))

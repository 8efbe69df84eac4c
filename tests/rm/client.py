"""A raw client of the resource manager for tests: builds commands, parses responses.

Commands are built with cusetpm.tpm (the wire layer under test elsewhere); templates and
session-protected flows that need real cryptography go through tpm2-pytss's ESAPI instead
(see RMTCTI), so no TPM behaviour is imitated here.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from tpm2_pytss import ESAPI
from tpm2_pytss.constants import TPM2_ALG, TPMA_SESSION
from tpm2_pytss.TCTI import PyTCTI
from tpm2_pytss.types import TPMT_SYM_DEF, TPMU_SYM_KEY_BITS, TPMU_SYM_MODE

from cusetpm.rm import ResourceManager, RMError, Space
from cusetpm.tpm import commands as build
from cusetpm.tpm.command import AuthCommand, Command, parse_command
from cusetpm.tpm.constants import TPM_CAP, TPM_CC, TPM_RH, TPM_RS_PW, TPM_SE, TPM_ST
from cusetpm.tpm.response import Response, parse_response

ALG_SHA256 = 0x000B
ALG_NULL = 0x0010
ALG_ECC = 0x0023
ALG_RSA = 0x0001
ALG_AES = 0x0006
ALG_CFB = 0x0043
ALG_KEYEDHASH = 0x0008
ECC_NIST_P256 = 0x0003

# TPMA_OBJECT: fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|restricted|decrypt
STORAGE_ATTRS = 0x00030072
# fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|sign
SIGNING_ATTRS = 0x00040072


def ecc_storage_template() -> bytes:
    params = struct.pack(">HHHHHH", ALG_AES, 128, ALG_CFB, ALG_NULL, ECC_NIST_P256, ALG_NULL)
    body = struct.pack(">HHIH", ALG_ECC, ALG_SHA256, STORAGE_ATTRS, 0) + params + b"\0\0\0\0"
    return struct.pack(">H", len(body)) + body


def ecc_signing_template() -> bytes:
    # scheme ECDSA/SHA256, curve P-256, kdf NULL, empty unique
    params = struct.pack(">HHHHH", ALG_NULL, 0x0018, ALG_SHA256, ECC_NIST_P256, ALG_NULL)
    body = struct.pack(">HHIH", ALG_ECC, ALG_SHA256, SIGNING_ATTRS, 0) + params + b"\0\0\0\0"
    return struct.pack(">H", len(body)) + body


def pw_session() -> list[AuthCommand]:
    return [AuthCommand(TPM_RS_PW, b"", 0, b"")]


EMPTY_SENSITIVE = struct.pack(">HHH", 4, 0, 0)  # TPM2B_SENSITIVE_CREATE: empty auth and data
NO_OUTSIDE_INFO_NO_PCRS = b"\0\0" + b"\0\0\0\0"


class TPMFailure(AssertionError):
    def __init__(self, what: str, rc: int):
        super().__init__(f"{what} failed: rc 0x{rc:08x}")
        self.rc = rc


@dataclass
class RawClient:
    """One space of an RM, spoken to with raw commands."""

    rm: ResourceManager
    space: Space

    def send(self, command: bytes) -> bytes:
        return self.rm.transmit(self.space, command)

    def call(self, command: bytes, has_handle: bool = False, what: str = "command") -> Response:
        response = parse_response(self.send(command), has_handle=has_handle)
        if response.responseCode:
            raise TPMFailure(what, response.responseCode)
        return response

    def create_primary(self, template: bytes | None = None, hierarchy: int = TPM_RH.OWNER) -> int:
        params = EMPTY_SENSITIVE + (template or ecc_storage_template()) + NO_OUTSIDE_INFO_NO_PCRS
        cmd = Command(TPM_ST.SESSIONS, TPM_CC.CreatePrimary, [hierarchy], pw_session(), params)
        handle = self.call(cmd.to_bytes(), True, "CreatePrimary").handle
        assert handle is not None
        return handle

    def read_public(self, handle: int) -> bytes:
        return self.call(build.read_public(handle), what="ReadPublic").parameters

    def flush(self, handle: int) -> None:
        self.call(build.flush_context(handle), what="FlushContext")

    def context_save(self, handle: int) -> bytes:
        return self.call(build.context_save(handle), what="ContextSave").parameters

    def context_load(self, blob: bytes) -> int:
        handle = self.call(build.context_load_raw(blob), True, "ContextLoad").handle
        assert handle is not None
        return handle

    def start_session(self, session_type: int = TPM_SE.HMAC) -> int:
        """An unbound, unsalted session (tpmKey and bind TPM_RH_NULL)."""
        nonce_caller = struct.pack(">H", 16) + os.urandom(16)
        no_salt = b"\0\0"
        # sessionType, symmetric TPM_ALG_NULL, authHash SHA-256
        params = nonce_caller + no_salt + struct.pack(">BHH", session_type, ALG_NULL, ALG_SHA256)
        cmd = Command(
            TPM_ST.NO_SESSIONS, TPM_CC.StartAuthSession, [TPM_RH.NULL, TPM_RH.NULL], [], params
        )
        handle = self.call(cmd.to_bytes(), True, "StartAuthSession").handle
        assert handle is not None
        return handle

    def handles(self, first: int, count: int = 254) -> tuple[bool, list[int]]:
        response = self.call(build.get_capability(TPM_CAP.HANDLES, first, count))
        more, data = build.unmarshal_capability(response.parameters)
        return more, data.handles

    def all_handles(self, first: int) -> list[int]:
        """Pages through GetCapability(HANDLES) with count 1 and property + 1, as the kernel
        selftest's get_cap does."""
        found: list[int] = []
        prop = first
        while True:
            more, page = self.handles(prop, 1)
            found += page
            if not more:
                return found
            prop += 1

    def get_random(self, n: int = 8) -> bytes:
        return build.parse_get_random(self.send(build.get_random(n)))


class RMTCTI(PyTCTI):
    """A TCTI for tpm2-pytss that talks to one space of an in-process RM.

    An RMError (the errno a device node's write would return) reaches ESAPI as a TCTI
    failure; the RMError itself is kept in `last_error` for the test to look at.
    """

    def __init__(self, rm: ResourceManager, space: Space):
        super().__init__()
        self.rm = rm
        self.space = space
        self._response = b""
        self.last_error: RMError | None = None

    def do_transmit(self, command: bytes) -> None:
        self.last_error = None
        try:
            self._response = self.rm.transmit(self.space, bytes(command))
        except RMError as exc:
            self.last_error = exc
            raise

    def do_receive(self, timeout: int) -> bytes:
        response, self._response = self._response, b""
        return response


def esapi(rm: ResourceManager, space: Space) -> ESAPI:
    return ESAPI(RMTCTI(rm, space))


# -- helpers for the RM behaviour tests (test_kernel_space, test_isolation, test_objects, ...) --

ALG_SHA1 = 0x0004
ALG_SHA384 = 0x000C


def with_unique(template: bytes, unique: bytes) -> bytes:
    """One of the ECC templates above (empty unique) with unique.x set: a distinct primary."""
    body = template[2:-4] + struct.pack(">H", len(unique)) + unique + b"\0\0"
    return struct.pack(">H", len(body)) + body


def rc_of(response: bytes) -> int:
    return int.from_bytes(response[6:10], "big")


def raw_command(
    cc: int, handles: list[int], params: bytes = b"", sessions: list[AuthCommand] | None = None
) -> bytes:
    tag = TPM_ST.SESSIONS if sessions else TPM_ST.NO_SESSIONS
    return Command(tag, cc, handles, sessions or [], params).to_bytes()


def tpm2b_of(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def split_tpm2b(buf: bytes, offset: int = 0) -> tuple[bytes, int]:
    """(content, offset after it) of the TPM2B at offset."""
    (size,) = struct.unpack_from(">H", buf, offset)
    return buf[offset + 2 : offset + 2 + size], offset + 2 + size


def name_of(client: RawClient, handle: int) -> bytes:
    """The object's Name as ReadPublic reports it."""
    params = client.read_public(handle)
    _, offset = split_tpm2b(params)  # outPublic
    name, _ = split_tpm2b(params, offset)
    return name


def create_child(client: RawClient, parent: int, template: bytes) -> tuple[bytes, bytes]:
    """TPM2_Create under parent: (TPM2B_PRIVATE, TPM2B_PUBLIC) as wire bytes."""
    params = EMPTY_SENSITIVE + template + NO_OUTSIDE_INFO_NO_PCRS
    out = client.call(
        raw_command(TPM_CC.Create, [parent], params, pw_session()), what="Create"
    ).parameters
    _, offset = split_tpm2b(out)
    private = out[:offset]
    _, end = split_tpm2b(out, offset)
    return private, out[offset:end]


def load_child(client: RawClient, parent: int, private: bytes, public: bytes) -> int:
    cmd = raw_command(TPM_CC.Load, [parent], private + public, pw_session())
    handle = client.call(cmd, True, "Load").handle
    assert handle is not None
    return handle


def hash_sequence_start(client: RawClient, alg: int = ALG_SHA256) -> int:
    cmd = raw_command(TPM_CC.HashSequenceStart, [], tpm2b_of(b"") + struct.pack(">H", alg))
    handle = client.call(cmd, True, "HashSequenceStart").handle
    assert handle is not None
    return handle


def sequence_update(client: RawClient, seq: int, data: bytes) -> None:
    cmd = raw_command(TPM_CC.SequenceUpdate, [seq], tpm2b_of(data), pw_session())
    client.call(cmd, what="SequenceUpdate")


def sequence_complete(client: RawClient, seq: int, data: bytes = b"") -> bytes:
    params = tpm2b_of(data) + struct.pack(">I", TPM_RH.NULL)
    cmd = raw_command(TPM_CC.SequenceComplete, [seq], params, pw_session())
    digest, _ = split_tpm2b(client.call(cmd, what="SequenceComplete").parameters)
    return digest


def policy_restart(client: RawClient, session: int) -> bytes:
    """TPM2_PolicyRestart: the raw response."""
    return client.send(raw_command(TPM_CC.PolicyRestart, [session]))


# -- helpers for the RM robustness tests (test_stateful, test_fuzz, test_faults) -------------

TPM_HT_TRANSIENT_FIRST = 0x80000000
TPM_HT_LOADED_SESSION_FIRST = 0x02000000


def policy_restart_command(session: int) -> bytes:
    """TPM2_PolicyRestart(sessionHandle): a command naming a session in its handle area."""
    return raw_command(TPM_CC.PolicyRestart, [session])


def policy_get_digest_command(session: int) -> bytes:
    return raw_command(TPM_CC.PolicyGetDigest, [session])


def get_random_with_session(session: int, attributes: int = 0x01) -> bytes:
    """GetRandom with one session in the authorization area (continueSession by default);
    the HMAC is empty, so the TPM may refuse it: what matters is what the RM does with it."""
    auth = [AuthCommand(session, os.urandom(16), attributes, b"")]
    return Command(TPM_ST.SESSIONS, TPM_CC.GetRandom, [], auth, struct.pack(">H", 8)).to_bytes()


def space_objects(client: RawClient) -> list[int]:
    """The transient handles the space sees (GetCapability through the space itself)."""
    more, found = client.handles(TPM_HT_TRANSIENT_FIRST)
    assert not more
    return found


def space_sessions(client: RawClient) -> list[int]:
    more, found = client.handles(TPM_HT_LOADED_SESSION_FIRST)
    assert not more
    return found


# -- helpers for the global-resource tests (continuation, regap, exhaustion) -----------------

# ContextLoad of a spent, unknown or dead session token: TPM_RC_HANDLE|P|1 in the RM's layer.
RC_STALE_TOKEN = 0x000B01CB
# The TPM's own answer to get_random_with_session(): a session on a command without an
# authorization handle must be for audit, encrypt or decrypt (libtpms, HMAC and policy alike).
RC_ATTRIBUTES_S1 = 0x982  # TPM_RC_ATTRIBUTES, session 1
RC_RM_SESSION_MEMORY = 0x000B0903  # over the space's session limit
RC_RM_SESSION_HANDLES = 0x000B0905  # no TPM session became free within session_wait_max
RC_RM_EVICTED_H0 = 0x000B0910  # an evicted session in the handle area, position 0 (+n)
RC_RM_EVICTED_S0 = 0x000B0918  # an evicted session in the authorization area, position 0 (+n)


def start_session_command(session_type: int = TPM_SE.POLICY) -> bytes:
    """StartAuthSession as RawClient.start_session sends it: unbound, unsalted, SHA-256."""
    nonce_caller = struct.pack(">H", 16) + os.urandom(16)
    params = nonce_caller + b"\0\0" + struct.pack(">BHH", session_type, ALG_NULL, ALG_SHA256)
    return Command(
        TPM_ST.NO_SESSIONS, TPM_CC.StartAuthSession, [TPM_RH.NULL, TPM_RH.NULL], [], params
    ).to_bytes()


def handle_of(response: bytes) -> int:
    """The handle of a successful response that returns one (StartAuthSession, ContextLoad)."""
    assert rc_of(response) == 0, hex(rc_of(response))
    return int.from_bytes(response[10:14], "big")


# Session settings the ESAPI-level tests share.
CONTINUE = TPMA_SESSION.CONTINUESESSION
NULL_SYM = TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL)
AES_CFB = TPMT_SYM_DEF(
    algorithm=TPM2_ALG.AES,
    keyBits=TPMU_SYM_KEY_BITS(aes=128),
    mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB),
)


SESSION_INDEX = 0x00FFFFFF


def absent_session_answer(rm: ResourceManager, command: bytes, handle: int) -> bytes:
    """What the TPM itself answers when session `handle` is not there: the same command with
    `handle` replaced by a session number the TPM does not hold, sent straight to the backend
    (call it while no command of the RM runs). The RM must answer foreign sessions so."""
    census = rm.tpm_census()
    used = {h & SESSION_INDEX for h in census["loaded_sessions"] + census["saved_sessions"]}
    free = max(set(range(64)) - used - {handle & SESSION_INDEX})
    absent = (handle & ~SESSION_INDEX) | free
    code = int.from_bytes(command[6:10], "big")
    attrs = rm._executor.table.lookup(code)  # type: ignore[union-attr]
    assert attrs is not None
    cmd = parse_command(command, 1 if code == TPM_CC.FlushContext else attrs.cHandles)
    cmd.handles = [absent if h == handle else h for h in cmd.handles]
    for session in cmd.sessions:
        if session.sessionHandle == handle:
            session.sessionHandle = absent
    swapped = cmd.to_bytes()
    assert swapped != command
    return rm.backend.transmit(swapped)


def assert_answered_as_absent(client: RawClient, command: bytes, handle: int) -> int:
    """The RM answers a session that is not the client's exactly as the TPM answers an absent
    one, and the command never reaches the TPM. Returns the response code."""
    trips = client.rm.round_trips
    response = client.send(command)
    assert client.rm.round_trips == trips, "a command naming a foreign session reached the TPM"
    expected = absent_session_answer(client.rm, command, handle)
    assert response == expected, f"RM {response.hex()} vs TPM {expected.hex()}"
    assert rc_of(response) != 0
    return rc_of(response)

"""What libtpms's responses must parse to: shared by the captured and the live tests."""

from __future__ import annotations

import struct

from cusetpm.tpm import commands as builders
from cusetpm.tpm.command import AuthCommand, Command, parse_command
from cusetpm.tpm.constants import (
    TPM_CAP,
    TPM_CC,
    TPM_PT,
    TPM_RH,
    TPM_RS_PW,
    TPM_ST,
    TPMA_CC,
    TPMA_SESSION,
)
from cusetpm.tpm.marshal import Reader, tpm2b, u16, u32
from cusetpm.tpm.rc import TPM_RC, decode_rc
from cusetpm.tpm.response import AuthResponse, Response, parse_response
from cusetpm.tpm.structures import TPMS_CAPABILITY_DATA, TPMS_CONTEXT

TPM_ALG_ECC = 0x0023
TPM_ALG_SHA256 = 0x000B
TPM_ALG_AES = 0x0006
TPM_ALG_CFB = 0x0043
TPM_ALG_NULL = 0x0010
TPM_ECC_NIST_P256 = 0x0003
# fixedTPM | fixedParent | sensitiveDataOrigin | userWithAuth | restricted | decrypt
STORAGE_KEY_ATTRIBUTES = 0x00030072

# TPMT_PUBLIC of an ECC P-256 storage key (the tpm2-tools default primary, with AES-128-CFB)
ECC_TEMPLATE = (
    u16(TPM_ALG_ECC)
    + u16(TPM_ALG_SHA256)
    + u32(STORAGE_KEY_ATTRIBUTES)
    + tpm2b(b"")  # authPolicy
    + u16(TPM_ALG_AES)
    + u16(128)
    + u16(TPM_ALG_CFB)
    + u16(TPM_ALG_NULL)  # scheme
    + u16(TPM_ECC_NIST_P256)
    + u16(TPM_ALG_NULL)  # kdf
    + tpm2b(b"")  # unique.x
    + tpm2b(b"")  # unique.y
)

CREATE_PRIMARY_ECC = Command(
    TPM_ST.SESSIONS,
    TPM_CC.CreatePrimary,
    handles=[TPM_RH.OWNER],
    sessions=[AuthCommand(TPM_RS_PW, b"", TPMA_SESSION.continueSession, b"")],
    parameters=tpm2b(tpm2b(b"") + tpm2b(b""))  # inSensitive: empty userAuth and data
    + tpm2b(ECC_TEMPLATE)
    + tpm2b(b"")  # outsideInfo
    + u32(0),  # creationPCR: no banks
).to_bytes()

NONCE_CALLER = bytes(range(16))
# unbound, unsalted HMAC session with SHA-256 and no parameter encryption
START_AUTH_SESSION = Command(
    TPM_ST.NO_SESSIONS,
    TPM_CC.StartAuthSession,
    handles=[TPM_RH.NULL, TPM_RH.NULL],  # tpmKey, bind
    parameters=tpm2b(NONCE_CALLER)
    + tpm2b(b"")
    + bytes([0])
    + u16(TPM_ALG_NULL)
    + u16(TPM_ALG_SHA256),
).to_bytes()

# what libtpms 0.9.2 reports in TPM_CAP_COMMANDS: (cHandles, rHandle) of a few commands
EXPECTED_COMMANDS = {
    TPM_CC.ContextSave: (1, False),
    TPM_CC.ContextLoad: (0, True),
    TPM_CC.FlushContext: (0, False),
    TPM_CC.CreatePrimary: (1, True),
    TPM_CC.Create: (1, False),
    TPM_CC.Load: (1, True),
    TPM_CC.LoadExternal: (0, True),
    TPM_CC.StartAuthSession: (2, True),
    TPM_CC.PolicySecret: (2, False),
    TPM_CC.PolicyNV: (3, False),
    TPM_CC.NV_Read: (2, False),
    TPM_CC.EvictControl: (2, False),
    TPM_CC.GetCapability: (0, False),
    TPM_CC.GetRandom: (0, False),
    TPM_CC.HashSequenceStart: (0, True),
    TPM_CC.SequenceComplete: (1, False),
    TPM_CC.ReadPublic: (1, False),
}


def ok(response: bytes, has_handle: bool = False) -> Response:
    parsed = parse_response(response, has_handle)
    assert parsed.responseCode == 0, hex(parsed.responseCode)
    assert parsed.to_bytes() == response
    return parsed


def check_get_random(response: bytes, requested: int) -> bytes:
    data = builders.parse_get_random(response)
    assert len(data) == requested
    assert ok(response).parameters == struct.pack(">H", requested) + data
    return data


def check_commands(response: bytes) -> dict[int, TPMA_CC]:
    """TPM_CAP_COMMANDS from TPM_CC_FIRST: every command decodes to a known code."""
    more, data = builders.parse_get_capability(response)
    assert not more
    assert data.capability == TPM_CAP.COMMANDS
    assert data.handles == [] and data.properties == []
    table = {attrs.command_code: attrs for attrs in data.commands}
    assert len(table) == len(data.commands) > 60
    assert list(table) == sorted(table)
    for cc, attrs in table.items():
        TPM_CC(cc)  # a code this layer knows
        assert not attrs.V
        assert 0 <= attrs.cHandles <= 3
    for cc, expected in EXPECTED_COMMANDS.items():
        assert (table[cc].cHandles, table[cc].rHandle) == expected, TPM_CC(cc).name
    # libtpms sets no reserved bit: re-marshalling gives the TPM's bytes back
    assert builders.get_capability_parameters(more, data) == ok(response).parameters
    return table


def check_fixed_properties(response: bytes) -> dict[int, int]:
    more, data = builders.parse_get_capability(response)
    assert data.capability == TPM_CAP.TPM_PROPERTIES
    props = {p.property: p.value for p in data.properties}
    assert list(props) == sorted(props)
    assert all(TPM_PT.FAMILY_INDICATOR <= p < TPM_PT.PERMANENT for p in props)
    assert not more  # libtpms' fixed group fits in one answer
    assert props[TPM_PT.FAMILY_INDICATOR] == int.from_bytes(b"2.0\0", "big")
    assert props[TPM_PT.ACTIVE_SESSIONS_MAX] == 64
    assert props[TPM_PT.CONTEXT_GAP_MAX] == 0xFFFF
    assert props[TPM_PT.HR_TRANSIENT_MIN] == 3
    assert props[TPM_PT.HR_LOADED_MIN] == 3
    assert props[TPM_PT.MAX_COMMAND_SIZE] == props[TPM_PT.MAX_RESPONSE_SIZE] == 4096
    assert builders.get_capability_parameters(more, data) == ok(response).parameters
    return props


def check_algorithms(response: bytes) -> TPMS_CAPABILITY_DATA:
    """TPM_CAP_ALGS stays opaque: raw is a TPML_ALG_PROPERTY (count, 6-byte entries)."""
    more, data = builders.parse_get_capability(response)
    assert data.capability == TPM_CAP.ALGS
    (count,) = struct.unpack_from(">I", data.raw)
    assert count > 10 and len(data.raw) == 4 + 6 * count
    algs = [struct.unpack_from(">H", data.raw, 4 + 6 * i)[0] for i in range(count)]
    assert {TPM_ALG_ECC, TPM_ALG_SHA256, TPM_ALG_AES} <= set(algs)
    assert builders.get_capability_parameters(more, data) == ok(response).parameters
    return data


def check_create_primary_command(command: bytes, handle_count: int) -> None:
    cmd = parse_command(command, handle_count)
    assert cmd.handles == [TPM_RH.OWNER]
    assert cmd.sessions == [AuthCommand(TPM_RS_PW, b"", 1, b"")]
    assert cmd.parameters.startswith(tpm2b(tpm2b(b"") + tpm2b(b"")) + tpm2b(ECC_TEMPLATE))


def check_create_primary(response: bytes) -> int:
    """SESSIONS tag, objectHandle, parameterSize, the five out parameters, one auth."""
    resp = ok(response, has_handle=True)
    assert resp.tag == TPM_ST.SESSIONS
    assert resp.handle is not None and resp.handle >> 24 == 0x80
    assert resp.sessions == [AuthResponse(b"", TPMA_SESSION.continueSession, b"")]
    (param_size,) = struct.unpack_from(">I", response, 14)
    assert param_size == len(resp.parameters)
    reader = Reader(resp.parameters)
    out_public = reader.tpm2b("outPublic")
    reader.tpm2b("creationData")
    assert len(reader.tpm2b("creationHash")) == 32
    assert reader.u16("creationTicket.tag") == TPM_ST.CREATION
    assert reader.u32("creationTicket.hierarchy") == TPM_RH.OWNER
    reader.tpm2b("creationTicket.digest")
    name = reader.tpm2b("name")
    assert reader.remaining() == 0
    # the template comes back with unique filled in: two 32-byte coordinates
    assert out_public[: len(ECC_TEMPLATE) - 4] == ECC_TEMPLATE[:-4]
    assert len(out_public) == len(ECC_TEMPLATE) + 64
    assert name[:2] == u16(TPM_ALG_SHA256) and len(name) == 34
    return resp.handle


def check_transient_handles(response: bytes, expected: list[int]) -> None:
    more, data = builders.parse_get_capability(response)
    assert (more, data.capability, data.handles) == (False, TPM_CAP.HANDLES, expected)


def check_context_save(response: bytes, saved_handle: int, hierarchy: int) -> TPMS_CONTEXT:
    ctx = builders.parse_context_save(response)
    assert ctx.savedHandle == saved_handle
    assert ctx.hierarchy == hierarchy
    assert ctx.sequence > 0
    assert len(ctx.contextBlob) > 100  # integrity HMAC + encrypted state
    assert ctx.to_bytes() == ok(response).parameters
    return ctx


def check_context_load_command(command: bytes, ctx: TPMS_CONTEXT) -> None:
    cmd = parse_command(command, 0)
    assert cmd.commandCode == TPM_CC.ContextLoad
    assert TPMS_CONTEXT.from_bytes(cmd.parameters) == ctx
    assert command == builders.context_load(ctx)


def check_context_load(response: bytes, handle_type: int = 0x80) -> int:
    handle = builders.parse_context_load(response)
    assert ok(response, has_handle=True).parameters == b""
    assert handle >> 24 == handle_type
    return handle


def check_success(response: bytes) -> None:
    assert ok(response) == Response(TPM_ST.NO_SESSIONS, 0)
    assert len(response) == 10


def check_start_auth_session(response: bytes) -> int:
    resp = ok(response, has_handle=True)
    assert resp.tag == TPM_ST.NO_SESSIONS
    assert resp.handle is not None and resp.handle >> 24 == 0x02  # an HMAC session
    reader = Reader(resp.parameters)
    assert len(reader.tpm2b("nonceTPM")) == len(NONCE_CALLER)
    assert reader.remaining() == 0
    return resp.handle


def check_error(response: bytes, base: int, handle: int | None, parameter: int | None) -> int:
    resp = parse_response(response, has_handle=True)
    assert resp == Response(TPM_ST.NO_SESSIONS, resp.responseCode)
    info = decode_rc(resp.responseCode)
    assert info.format1 and not info.warning and info.layer == 0
    assert (info.base, info.handle, info.parameter, info.session) == (
        base,
        handle,
        parameter,
        None,
    )
    return resp.responseCode


# libtpms 0.9.2: a transient handle that is not loaded is TPM_RC_VALUE, numbered after
# where the handle sits (the handle area for ContextSave/ReadPublic, a parameter for Flush)
UNLOADED_IN_HANDLE_AREA = (TPM_RC.VALUE, 1, None)
UNLOADED_AS_PARAMETER = (TPM_RC.VALUE, None, 1)

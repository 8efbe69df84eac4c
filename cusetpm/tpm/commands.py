"""Builders for the commands the resource manager sends itself, and readers of their responses."""

from __future__ import annotations

from cusetpm.tpm.command import Command, pack_header
from cusetpm.tpm.constants import TPM_CC, TPM_HEADER_SIZE, TPM_ST
from cusetpm.tpm.errors import SizeMismatchError, TPMParseError
from cusetpm.tpm.marshal import Reader, u16, u32
from cusetpm.tpm.response import Response, parse_response
from cusetpm.tpm.structures import TPMS_CAPABILITY_DATA, TPMS_CONTEXT, pack_yes_no


def _no_sessions(cc: int, body: bytes = b"") -> bytes:
    return pack_header(TPM_ST.NO_SESSIONS, TPM_HEADER_SIZE + len(body), cc) + body


def startup(startup_type: int) -> bytes:
    return _no_sessions(TPM_CC.Startup, u16(startup_type))


def shutdown(shutdown_type: int) -> bytes:
    return _no_sessions(TPM_CC.Shutdown, u16(shutdown_type))


def get_random(bytes_requested: int) -> bytes:
    return _no_sessions(TPM_CC.GetRandom, u16(bytes_requested))


def get_capability(capability: int, prop: int, property_count: int) -> bytes:
    return _no_sessions(TPM_CC.GetCapability, u32(capability) + u32(prop) + u32(property_count))


def context_save(save_handle: int) -> bytes:
    return _no_sessions(TPM_CC.ContextSave, u32(save_handle))


def context_load(context: TPMS_CONTEXT) -> bytes:
    return _no_sessions(TPM_CC.ContextLoad, context.to_bytes())


def flush_context(flush_handle: int) -> bytes:
    return _no_sessions(TPM_CC.FlushContext, u32(flush_handle))


def read_public(object_handle: int) -> bytes:
    return Command(TPM_ST.NO_SESSIONS, TPM_CC.ReadPublic, handles=[object_handle]).to_bytes()


class TPMError(Exception):
    """A command the caller itself built failed in the TPM."""

    def __init__(self, command: str, rc: int):
        from cusetpm.tpm.rc import rc_name

        super().__init__(f"{command}: {rc_name(rc)} (0x{rc:08x})")
        self.command = command
        self.rc = rc


def _ok(command: str, response: bytes, has_handle: bool = False) -> Response:
    parsed = parse_response(response, has_handle=has_handle)
    if parsed.responseCode:
        raise TPMError(command, parsed.responseCode)
    return parsed


def _exactly(reader: Reader, what: str) -> None:
    if reader.remaining():
        raise SizeMismatchError(f"{reader.remaining()} bytes after {what}")


def parse_context_save(response: bytes) -> TPMS_CONTEXT:
    """ContextSave's TPMS_CONTEXT; TPMError if the TPM refused."""
    return TPMS_CONTEXT.from_bytes(_ok("TPM2_ContextSave", response).parameters)


def parse_context_load(response: bytes) -> int:
    """ContextLoad's loadedHandle; TPMError if the TPM refused."""
    handle = _ok("TPM2_ContextLoad", response, has_handle=True).handle
    assert handle is not None
    return handle


def parse_get_random(response: bytes) -> bytes:
    reader = Reader(_ok("TPM2_GetRandom", response).parameters)
    data = reader.tpm2b("randomBytes")
    _exactly(reader, "randomBytes")
    return data


def parse_get_capability(response: bytes) -> tuple[bool, TPMS_CAPABILITY_DATA]:
    """(moreData, capabilityData) of a GetCapability response; TPMError if the TPM refused."""
    return unmarshal_capability(_ok("TPM2_GetCapability", response).parameters)


def unmarshal_capability(parameters: bytes) -> tuple[bool, TPMS_CAPABILITY_DATA]:
    reader = Reader(parameters)
    more = reader.u8("moreData")
    if more > 1:
        raise TPMParseError(f"moreData {more} is not a TPMI_YES_NO")
    data = TPMS_CAPABILITY_DATA.unmarshal(reader)
    _exactly(reader, "TPMS_CAPABILITY_DATA")
    return bool(more), data


def get_capability_parameters(more_data: bool, data: TPMS_CAPABILITY_DATA) -> bytes:
    """The parameter area of a GetCapability response (for answers the RM writes itself)."""
    return pack_yes_no(more_data) + data.to_bytes()


def context_load_raw(context: bytes) -> bytes:
    """ContextLoad of a TPMS_CONTEXT kept as the bytes ContextSave returned (no re-marshalling)."""
    return _no_sessions(TPM_CC.ContextLoad, context)

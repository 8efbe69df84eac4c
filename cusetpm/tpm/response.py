"""Responses (Part 1 18.8): header, response handle, parameterSize, parameters, auth area."""

from __future__ import annotations

from dataclasses import dataclass, field

from cusetpm.tpm.command import check_framing, pack_header
from cusetpm.tpm.constants import TPM_HEADER_SIZE, TPM_MAX_SESSIONS, TPM_ST
from cusetpm.tpm.errors import BadTagError, SizeMismatchError, TooManySessionsError
from cusetpm.tpm.marshal import Reader, tpm2b, u8, u32


@dataclass(slots=True)
class AuthResponse:
    """TPMS_AUTH_RESPONSE: one session's part of the response authorization area."""

    nonce: bytes = b""
    sessionAttributes: int = 0
    hmac: bytes = b""

    def to_bytes(self) -> bytes:
        return tpm2b(self.nonce) + u8(self.sessionAttributes) + tpm2b(self.hmac)


@dataclass(slots=True)
class Response:
    """A parsed response. `handle` is set only for commands whose TPMA_CC.rHandle is set."""

    tag: int
    responseCode: int
    handle: int | None = None
    parameters: bytes = b""
    sessions: list[AuthResponse] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        body = b"" if self.handle is None else u32(self.handle)
        if self.tag == TPM_ST.SESSIONS:
            body += u32(len(self.parameters)) + self.parameters
            body += b"".join(s.to_bytes() for s in self.sessions)
        else:
            body += self.parameters
        return pack_header(self.tag, TPM_HEADER_SIZE + len(body), self.responseCode) + body


def error_response(rc: int) -> bytes:
    """The 10-byte response a TPM (or a resource manager) sends for a failed command."""
    return pack_header(TPM_ST.NO_SESSIONS, TPM_HEADER_SIZE, rc)


def parse_response(buf: bytes | bytearray | memoryview, has_handle: bool = False) -> Response:
    header = check_framing(buf)
    if header.code != 0:
        if header.size != TPM_HEADER_SIZE:
            raise SizeMismatchError(f"error response 0x{header.code:x} of {header.size} bytes")
        if header.tag != TPM_ST.NO_SESSIONS:
            raise BadTagError("an error response must carry TPM_ST_NO_SESSIONS")
        return Response(tag=header.tag, responseCode=header.code)
    reader = Reader(buf, TPM_HEADER_SIZE)
    handle = reader.u32("response handle") if has_handle else None
    if header.tag == TPM_ST.NO_SESSIONS:
        return Response(tag=header.tag, responseCode=0, handle=handle, parameters=reader.rest())
    param_size = reader.u32("parameterSize")
    if param_size > reader.remaining():
        raise SizeMismatchError(
            f"parameterSize {param_size} exceeds the {reader.remaining()} bytes left"
        )
    parameters = reader.raw(param_size, "parameters")
    sessions: list[AuthResponse] = []
    while reader.remaining():
        if len(sessions) == TPM_MAX_SESSIONS:
            raise TooManySessionsError(f"more than {TPM_MAX_SESSIONS} sessions in the response")
        sessions.append(
            AuthResponse(
                nonce=reader.tpm2b("nonceTPM"),
                sessionAttributes=reader.u8("sessionAttributes"),
                hmac=reader.tpm2b("hmac"),
            )
        )
    if not sessions:
        # a TPM answers each command session with one response session; none is a torn response
        raise SizeMismatchError("TPM_ST_SESSIONS response with an empty authorization area")
    return Response(
        tag=header.tag, responseCode=0, handle=handle, parameters=parameters, sessions=sessions
    )

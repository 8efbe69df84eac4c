"""Commands (Part 1 18.2 / Part 3): header, handle area, authorization area, parameters."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from cusetpm.tpm.constants import TPM_HEADER_SIZE, TPM_MAX_SESSIONS, TPM_ST
from cusetpm.tpm.errors import (
    BadTagError,
    SizeMismatchError,
    TooManySessionsError,
    TruncatedError,
)
from cusetpm.tpm.marshal import Reader, tpm2b, u8, u32

_HEADER = struct.Struct(">HII")


@dataclass(frozen=True, slots=True)
class Header:
    """tag, size and commandCode (or responseCode) of any command or response."""

    tag: int
    size: int
    code: int


def parse_header(buf: bytes | bytearray | memoryview) -> Header:
    """Reads the 10-byte header without checking it against the buffer."""
    if len(buf) < TPM_HEADER_SIZE:
        raise TruncatedError(f"header: need {TPM_HEADER_SIZE} bytes, got {len(buf)}")
    return Header(*_HEADER.unpack_from(buf, 0))


def pack_header(tag: int, size: int, code: int) -> bytes:
    return _HEADER.pack(tag, size, code)


@dataclass(slots=True)
class AuthCommand:
    """TPMS_AUTH_COMMAND: one session of the authorization area."""

    sessionHandle: int
    nonce: bytes = b""
    sessionAttributes: int = 0
    hmac: bytes = b""

    def to_bytes(self) -> bytes:
        return (
            u32(self.sessionHandle)
            + tpm2b(self.nonce)
            + u8(self.sessionAttributes)
            + tpm2b(self.hmac)
        )


@dataclass(slots=True)
class Command:
    """A parsed command. `handles` is the handle area as the TPM's TPMA_CC.cHandles says."""

    tag: int
    commandCode: int
    handles: list[int] = field(default_factory=list)
    sessions: list[AuthCommand] = field(default_factory=list)
    parameters: bytes = b""

    def to_bytes(self) -> bytes:
        body = b"".join(u32(h) for h in self.handles)
        if self.tag == TPM_ST.SESSIONS:
            auth = b"".join(s.to_bytes() for s in self.sessions)
            body += u32(len(auth)) + auth
        body += self.parameters
        return pack_header(self.tag, TPM_HEADER_SIZE + len(body), self.commandCode) + body


def check_framing(buf: bytes | bytearray | memoryview) -> Header:
    """Tag and size of a command or response: the checks that need no command table."""
    header = parse_header(buf)
    if header.tag not in (TPM_ST.NO_SESSIONS, TPM_ST.SESSIONS):
        raise BadTagError(
            f"tag 0x{header.tag:04x} is neither TPM_ST_NO_SESSIONS nor TPM_ST_SESSIONS"
        )
    if header.size != len(buf):
        raise SizeMismatchError(f"header size {header.size} but {len(buf)} bytes present")
    return header


def parse_auth_area(reader: Reader) -> list[AuthCommand]:
    """Reads authorizationSize and the sessions it covers; the reader ends up after the area."""
    auth_size = reader.u32("authorizationSize")
    if auth_size > reader.remaining():
        raise SizeMismatchError(
            f"authorizationSize {auth_size} exceeds the {reader.remaining()} bytes left"
        )
    end = reader.pos + auth_size
    area = Reader(reader.buf, reader.pos, end)
    sessions: list[AuthCommand] = []
    while area.remaining():
        if len(sessions) == TPM_MAX_SESSIONS:
            raise TooManySessionsError(
                f"more than {TPM_MAX_SESSIONS} sessions in the authorization area"
            )
        try:
            sessions.append(
                AuthCommand(
                    sessionHandle=area.u32("sessionHandle"),
                    nonce=area.tpm2b("nonceCaller"),
                    sessionAttributes=area.u8("sessionAttributes"),
                    hmac=area.tpm2b("hmac"),
                )
            )
        except TruncatedError as exc:
            raise SizeMismatchError(f"authorization area of {auth_size} bytes: {exc}") from exc
    if not sessions:
        raise SizeMismatchError("TPM_ST_SESSIONS with an empty authorization area")
    reader.pos = end
    return sessions


def parse_command(buf: bytes | bytearray | memoryview, handle_count: int) -> Command:
    """Splits a command into its areas. `handle_count` comes from the TPM's TPMA_CC.cHandles."""
    header = check_framing(buf)
    reader = Reader(buf, TPM_HEADER_SIZE)
    handles = [reader.u32(f"handle {i + 1}") for i in range(handle_count)]
    sessions = parse_auth_area(reader) if header.tag == TPM_ST.SESSIONS else []
    return Command(
        tag=header.tag,
        commandCode=header.code,
        handles=handles,
        sessions=sessions,
        parameters=reader.rest(),
    )

"""Malformed input: the parsers raise TPMParseError subclasses and nothing else.

Whatever a parser accepts it must have read exactly: re-serializing a parsed command or
response gives back the input byte for byte, so a corrupted buffer can never parse into
something that silently means another thing (fewer handles, a shorter auth area, ...).
"""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from cusetpm.tpm import commands as builders
from cusetpm.tpm.command import AuthCommand, Command, check_framing, parse_command
from cusetpm.tpm.commands import unmarshal_capability
from cusetpm.tpm.constants import TPM_CAP, TPM_CC, TPM_HEADER_SIZE, TPM_RS_PW, TPM_ST
from cusetpm.tpm.errors import (
    BadTagError,
    SizeMismatchError,
    TooManySessionsError,
    TPMParseError,
    TruncatedError,
)
from cusetpm.tpm.marshal import Reader, tpm2b, u8, u32
from cusetpm.tpm.response import AuthResponse, Response, parse_response
from cusetpm.tpm.structures import TPMS_CAPABILITY_DATA, TPMS_CONTEXT
from tests.tpm.helpers import check_command, check_response, parse_or_none, with_size, with_tag
from tests.tpm.strategies import (
    PROPERTY,
    TPMA_CC_DEFINED_BITS,
    capability_data,
    commands,
    contexts,
    responses,
    u32s,
)

TAGS = (TPM_ST.NO_SESSIONS, TPM_ST.SESSIONS)


# --- truncation -------------------------------------------------------------------------


def command_boundaries(cmd: Command) -> list[int]:
    """Offsets where a field of cmd ends: the cuts most likely to read as a shorter command."""
    ends = [TPM_HEADER_SIZE]
    ends += [ends[-1] + 4 * (i + 1) for i in range(len(cmd.handles))]
    if cmd.tag == TPM_ST.SESSIONS:
        ends.append(ends[-1] + 4)
        for s in cmd.sessions:
            ends.append(ends[-1] + len(s.to_bytes()))
    return ends


def response_boundaries(resp: Response) -> list[int]:
    ends = [TPM_HEADER_SIZE]
    if resp.handle is not None:
        ends.append(ends[-1] + 4)
    if resp.tag == TPM_ST.SESSIONS:
        ends += [ends[-1] + 4, ends[-1] + 4 + len(resp.parameters)]
        for s in resp.sessions:
            ends.append(ends[-1] + len(s.to_bytes()))
    return ends


def cut_points(wire: bytes, boundaries: list[int]) -> st.SearchStrategy[int]:
    """Where to cut wire short: anywhere after the header, often right at a field boundary."""
    anywhere = st.integers(TPM_HEADER_SIZE, len(wire) - 1)
    inside = [b for b in boundaries if b < len(wire)]
    return st.one_of(st.sampled_from(inside), anywhere) if inside else anywhere


@PROPERTY
@given(commands(), st.data())
def test_truncated_command_keeps_header(cmd: Command, data: st.DataObject) -> None:
    wire = cmd.to_bytes()
    cut = wire[: data.draw(st.integers(0, len(wire) - 1))]
    expected = TruncatedError if len(cut) < TPM_HEADER_SIZE else SizeMismatchError
    with pytest.raises(expected):
        parse_command(cut, len(cmd.handles))


@PROPERTY
@given(commands(), st.data())
def test_truncated_command_with_fixed_header(cmd: Command, data: st.DataObject) -> None:
    """A cut that the header agrees with: only the parameters may come out shorter."""
    wire = cmd.to_bytes()
    assume(len(wire) > TPM_HEADER_SIZE)
    cut = with_size(wire[: data.draw(cut_points(wire, command_boundaries(cmd)))])
    parsed = check_command(cut, len(cmd.handles))
    if parsed is None:
        return
    assert parsed.handles == cmd.handles
    assert parsed.sessions == cmd.sessions
    assert cmd.parameters.startswith(parsed.parameters)


@PROPERTY
@given(st.lists(u32s, max_size=3), st.sampled_from(TAGS), st.integers(1, 3))
def test_truncated_handle_area(handles: list[int], tag: int, missing: int) -> None:
    """Asking for more handles than the command holds never yields fewer handles."""
    wire = Command(TPM_ST.NO_SESSIONS, TPM_CC.PolicySecret, handles).to_bytes()
    with pytest.raises(TruncatedError):
        parse_command(with_tag(wire, tag), len(handles) + missing)


@PROPERTY
@given(responses(), st.data())
def test_truncated_response_keeps_header(resp: Response, data: st.DataObject) -> None:
    wire = resp.to_bytes()
    cut = wire[: data.draw(st.integers(0, len(wire) - 1))]
    expected = TruncatedError if len(cut) < TPM_HEADER_SIZE else SizeMismatchError
    with pytest.raises(expected):
        parse_response(cut, resp.handle is not None)


@PROPERTY
@given(responses(), st.data())
def test_truncated_response_with_fixed_header(resp: Response, data: st.DataObject) -> None:
    wire = resp.to_bytes()
    assume(len(wire) > TPM_HEADER_SIZE)
    cut = with_size(wire[: data.draw(cut_points(wire, response_boundaries(resp)))])
    parsed = check_response(cut, resp.handle is not None)
    if parsed is None:
        return
    assert parsed.handle == resp.handle
    if resp.tag == TPM_ST.SESSIONS:
        # a cut on a session boundary is indistinguishable from fewer sessions; the
        # parameters are still whole
        assert parsed.parameters == resp.parameters
        assert parsed.sessions == resp.sessions[: len(parsed.sessions)]
        assert parsed.sessions
    else:
        assert resp.parameters.startswith(parsed.parameters)


@PROPERTY
@given(contexts(), st.data())
def test_truncated_context(ctx: TPMS_CONTEXT, data: st.DataObject) -> None:
    wire = ctx.to_bytes()
    with pytest.raises(TruncatedError):
        TPMS_CONTEXT.from_bytes(wire[: data.draw(st.integers(0, len(wire) - 1))])
    with pytest.raises(SizeMismatchError):
        TPMS_CONTEXT.from_bytes(wire + data.draw(st.binary(min_size=1, max_size=8)))


@PROPERTY
@given(capability_data(), st.booleans(), st.data())
def test_truncated_capability(cap: TPMS_CAPABILITY_DATA, more: bool, data: st.DataObject) -> None:
    wire = builders.get_capability_parameters(more, cap)
    cut = wire[: data.draw(st.integers(0, len(wire) - 1))]
    if cap.capability in (TPM_CAP.HANDLES, TPM_CAP.COMMANDS, TPM_CAP.TPM_PROPERTIES):
        with pytest.raises((TruncatedError, SizeMismatchError)):
            unmarshal_capability(cut)
    else:
        # an opaque capability is whatever follows; only the fixed fields can be cut short
        parsed = parse_or_none(lambda: unmarshal_capability(cut))
        if len(cut) < 5:
            assert parsed is None
        else:
            assert parsed == (more, TPMS_CAPABILITY_DATA(cap.capability, raw=cut[5:]))


# --- corruption and garbage -------------------------------------------------------------


@st.composite
def corrupted(draw: st.DrawFn, wire: bytes) -> bytes:
    """wire with 1-4 bytes overwritten, maybe the header's size fixed up afterwards."""
    buf = bytearray(wire)
    for _ in range(draw(st.integers(1, 4))):
        buf[draw(st.integers(0, len(buf) - 1))] = draw(st.integers(0, 255))
    return with_size(bytes(buf)) if draw(st.booleans()) else bytes(buf)


@PROPERTY
@given(commands(), st.integers(0, 4), st.data())
def test_corrupted_command(cmd: Command, handle_count: int, data: st.DataObject) -> None:
    check_command(data.draw(corrupted(cmd.to_bytes())), handle_count)


@PROPERTY
@given(responses(), st.booleans(), st.data())
def test_corrupted_response(resp: Response, has_handle: bool, data: st.DataObject) -> None:
    check_response(data.draw(corrupted(resp.to_bytes())), has_handle)


@st.composite
def framed_garbage(draw: st.DrawFn) -> bytes:
    """Random bytes behind a header that passes check_framing: reaches the inner parsers."""
    body = draw(st.binary(max_size=200))
    tag = draw(st.sampled_from(TAGS))
    code = draw(st.sampled_from([0, 0x101])) if draw(st.booleans()) else draw(u32s)
    return struct.pack(">HII", tag, TPM_HEADER_SIZE + len(body), code) + body


garbage = st.one_of(st.binary(max_size=64), framed_garbage())


@PROPERTY
@given(garbage, st.integers(0, 4))
def test_garbage_command(buf: bytes, handle_count: int) -> None:
    check_command(buf, handle_count)


@PROPERTY
@given(garbage, st.booleans())
def test_garbage_response(buf: bytes, has_handle: bool) -> None:
    check_response(buf, has_handle)


@PROPERTY
@given(st.one_of(st.binary(max_size=64), contexts().map(TPMS_CONTEXT.to_bytes)), st.data())
def test_garbage_context(buf: bytes, data: st.DataObject) -> None:
    if buf and data.draw(st.booleans()):
        buf = data.draw(corrupted(buf))
    ctx = parse_or_none(lambda: TPMS_CONTEXT.from_bytes(buf))
    if ctx is not None:
        assert ctx.to_bytes() == buf


@st.composite
def capability_garbage(draw: st.DrawFn) -> bytes:
    """moreData, a capability this parser decodes (mostly), a count, random items."""
    cap = draw(st.sampled_from([TPM_CAP.HANDLES, TPM_CAP.COMMANDS, TPM_CAP.TPM_PROPERTIES]))
    count = draw(st.one_of(st.integers(0, 12), u32s))
    return u8(draw(st.integers(0, 2))) + u32(cap) + u32(count) + draw(st.binary(max_size=100))


@PROPERTY
@given(st.one_of(st.binary(max_size=64), capability_garbage()))
def test_garbage_capability(buf: bytes) -> None:
    parsed = parse_or_none(lambda: unmarshal_capability(buf))
    if parsed is None:
        return
    more, cap = parsed
    again = builders.get_capability_parameters(more, cap)
    assert len(again) == len(buf)
    if cap.capability == TPM_CAP.COMMANDS:
        words = struct.unpack(f">{len(cap.commands)}I", buf[9:])
        assert [c.to_int() for c in cap.commands] == [w & TPMA_CC_DEFINED_BITS for w in words]
    else:
        assert again == buf


@PROPERTY
@given(garbage)
def test_garbage_builder_readers(buf: bytes) -> None:
    """The RM's readers of its own responses: TPMParseError, TPMError or an answer."""
    for reader in (
        builders.parse_context_save,
        builders.parse_context_load,
        builders.parse_get_random,
        builders.parse_get_capability,
    ):
        with contextlib.suppress(TPMParseError, builders.TPMError):
            reader(buf)


# --- specific malformations -------------------------------------------------------------


def session(handle: int = TPM_RS_PW, nonce: bytes = b"", hmac: bytes = b"") -> AuthCommand:
    return AuthCommand(handle, nonce, 1, hmac)


@pytest.mark.parametrize("size_delta", [-9, -1, 1, 100, 0xFFFF_0000])
def test_wrong_header_size(size_delta: int) -> None:
    wire = Command(TPM_ST.SESSIONS, TPM_CC.Create, [0x80000000], [session()], b"xyz").to_bytes()
    bad = with_size(wire, len(wire) + size_delta)
    with pytest.raises(SizeMismatchError):
        parse_command(bad, 1)
    with pytest.raises(SizeMismatchError):
        check_framing(bad)
    resp = Response(TPM_ST.NO_SESSIONS, 0, parameters=b"abc").to_bytes()
    with pytest.raises(SizeMismatchError):
        parse_response(with_size(resp, len(resp) + size_delta))


@pytest.mark.parametrize("length", range(TPM_HEADER_SIZE))
def test_shorter_than_header(length: int) -> None:
    wire = builders.get_random(8)[:length]
    with pytest.raises(TruncatedError):
        parse_command(wire, 0)
    with pytest.raises(TruncatedError):
        parse_response(wire)


@PROPERTY
@given(st.integers(0, 0xFFFF).filter(lambda t: t not in TAGS), st.booleans())
def test_bad_tag(tag: int, error: bool) -> None:
    wire = struct.pack(">H", tag) + builders.get_random(8)[2:]
    with pytest.raises(BadTagError):
        parse_command(wire, 0)
    resp = struct.pack(">HII", tag, 10, 0x101 if error else 0)
    with pytest.raises(BadTagError):
        parse_response(resp)


def test_tpm12_style_tags() -> None:
    # TPM 1.2 tags (TPM_TAG_RQU_COMMAND, TPM_TAG_RSP_COMMAND) and TPM_ST_NULL
    for tag in (0x00C1, 0x00C4, TPM_ST.NULL):
        with pytest.raises(BadTagError):
            parse_command(struct.pack(">HII", tag, 10, TPM_CC.Startup), 0)


def test_error_response_must_be_bare() -> None:
    with pytest.raises(BadTagError):
        parse_response(struct.pack(">HII", TPM_ST.SESSIONS, 10, 0x9A2))
    with pytest.raises(SizeMismatchError):
        parse_response(struct.pack(">HII", TPM_ST.NO_SESSIONS, 14, 0x101) + b"\0" * 4, True)


@pytest.mark.parametrize("count", [4, 5, 20])
def test_too_many_command_sessions(count: int) -> None:
    sessions = [session(0x02000000 + i, bytes(16), bytes(32)) for i in range(count)]
    auth = b"".join(s.to_bytes() for s in sessions)
    wire = with_size(
        struct.pack(">HII", TPM_ST.SESSIONS, 0, TPM_CC.Unseal)
        + u32(0x80000000)
        + u32(len(auth))
        + auth
    )
    with pytest.raises(TooManySessionsError):
        parse_command(wire, 1)
    # Command.to_bytes writes what it is given; the parser is the one that refuses
    with pytest.raises(TooManySessionsError):
        parse_command(Command(TPM_ST.SESSIONS, TPM_CC.Unseal, [1], sessions).to_bytes(), 1)


@pytest.mark.parametrize("count", [4, 7])
def test_too_many_response_sessions(count: int) -> None:
    sessions = [AuthResponse(bytes(16), 1, bytes(32))] * count
    resp = Response(TPM_ST.SESSIONS, 0, parameters=b"p", sessions=sessions)
    with pytest.raises(TooManySessionsError):
        parse_response(resp.to_bytes())


def _sessions_command(auth_size: int, auth: bytes, params: bytes = b"") -> bytes:
    return with_size(
        struct.pack(">HII", TPM_ST.SESSIONS, 0, TPM_CC.NV_Read)
        + u32(0x40000001)
        + u32(0x01000000)
        + u32(auth_size)
        + auth
        + params
    )


@pytest.mark.parametrize("extra", [1, 2, 1000, 0xFFFF_FFFF - 9])
def test_authorization_size_beyond_end(extra: int) -> None:
    auth = session().to_bytes()
    with pytest.raises(SizeMismatchError):
        parse_command(_sessions_command(len(auth) + extra, auth), 2)


@pytest.mark.parametrize("short", [1, 2, 5, 8])
def test_authorization_size_cuts_a_session(short: int) -> None:
    """authorizationSize ending inside a session, the rest left to the parameters."""
    auth = session(nonce=b"n" * 16, hmac=b"h" * 32).to_bytes()
    with pytest.raises(SizeMismatchError):
        parse_command(_sessions_command(len(auth) - short, auth, b"params"), 2)


def test_empty_authorization_area() -> None:
    with pytest.raises(SizeMismatchError):
        parse_command(_sessions_command(0, b"", b"params"), 2)
    with pytest.raises(SizeMismatchError):
        parse_command(Command(TPM_ST.SESSIONS, TPM_CC.NV_Read, [1, 2]).to_bytes(), 2)


def test_missing_authorization_size() -> None:
    wire = with_size(struct.pack(">HII", TPM_ST.SESSIONS, 0, TPM_CC.NV_Read) + u32(1) + u32(2))
    with pytest.raises(TruncatedError):
        parse_command(wire, 2)
    with pytest.raises(TruncatedError):
        parse_command(with_size(wire + b"\0\0"), 2)


def test_session_tpm2b_beyond_area() -> None:
    """A nonce size pointing past authorizationSize (but not past the buffer)."""
    auth = u32(TPM_RS_PW) + b"\x00\x40" + bytes(4) + u8(0) + tpm2b(b"")
    with pytest.raises(SizeMismatchError):
        parse_command(_sessions_command(len(auth), auth, bytes(100)), 2)


@pytest.mark.parametrize("extra", [1, 4, 0xFFFF_FFFF - 20])
def test_parameter_size_beyond_end(extra: int) -> None:
    resp = Response(TPM_ST.SESSIONS, 0, 0x80000000, b"params", [AuthResponse(b"", 1, b"")])
    wire = bytearray(resp.to_bytes())
    struct.pack_into(">I", wire, 14, len(resp.parameters) + 5 + extra)
    with pytest.raises(SizeMismatchError):
        parse_response(bytes(wire), has_handle=True)


def test_parameter_size_too_small() -> None:
    """The rest after a short parameterSize does not read as whole sessions."""
    resp = Response(TPM_ST.SESSIONS, 0, None, b"params", [AuthResponse(b"", 1, b"")])
    wire = bytearray(resp.to_bytes())
    struct.pack_into(">I", wire, 10, 2)
    with pytest.raises(TPMParseError):
        parse_response(bytes(wire))


def test_sessions_response_without_sessions() -> None:
    wire = with_size(struct.pack(">HII", TPM_ST.SESSIONS, 0, 0) + u32(3) + b"abc")
    with pytest.raises(SizeMismatchError):
        parse_response(wire)
    with pytest.raises(SizeMismatchError):
        parse_response(Response(TPM_ST.SESSIONS, 0, 0x80000001, b"x").to_bytes(), True)


def test_response_missing_handle() -> None:
    for tag in TAGS:
        with pytest.raises(TruncatedError):
            parse_response(struct.pack(">HII", tag, 10, 0), has_handle=True)
        with pytest.raises(TruncatedError):
            parse_response(struct.pack(">HII", tag, 12, 0) + b"\x80\0", has_handle=True)


@pytest.mark.parametrize(
    ("cap", "item"), [(TPM_CAP.HANDLES, 4), (TPM_CAP.COMMANDS, 4), (TPM_CAP.TPM_PROPERTIES, 8)]
)
@pytest.mark.parametrize("count", [1, 2, 3, 0x4000_0000, 0xFFFF_FFFF])
def test_capability_count_beyond_end(cap: int, item: int, count: int) -> None:
    body = bytes(item * (count - 1)) if count < 10 else bytes(item * 3)
    params = u8(0) + u32(cap) + u32(count) + body
    with pytest.raises(SizeMismatchError):
        unmarshal_capability(params)
    with pytest.raises(SizeMismatchError):
        TPMS_CAPABILITY_DATA.unmarshal(Reader(params[1:]))
    wire = Response(TPM_ST.NO_SESSIONS, 0, parameters=params).to_bytes()
    with pytest.raises(SizeMismatchError):
        builders.parse_get_capability(wire)


def test_capability_trailing_bytes() -> None:
    params = u8(1) + u32(TPM_CAP.HANDLES) + u32(1) + u32(0x80000000) + b"\0"
    with pytest.raises(SizeMismatchError):
        unmarshal_capability(params)


@pytest.mark.parametrize("more", [2, 0x80, 0xFF])
def test_more_data_not_yes_no(more: int) -> None:
    with pytest.raises(TPMParseError):
        unmarshal_capability(u8(more) + u32(TPM_CAP.HANDLES) + u32(0))


def test_get_random_size_mismatch() -> None:
    for params in (b"\0\x10" + bytes(15), b"\0\x01ab", b"\0"):
        wire = Response(TPM_ST.NO_SESSIONS, 0, parameters=params).to_bytes()
        with pytest.raises((TruncatedError, SizeMismatchError)):
            builders.parse_get_random(wire)


def test_context_save_response_trailing_bytes() -> None:
    ctx = TPMS_CONTEXT(1, 0x80000000, 0x40000001, b"blob")
    wire = Response(TPM_ST.NO_SESSIONS, 0, parameters=ctx.to_bytes() + b"x").to_bytes()
    with pytest.raises(SizeMismatchError):
        builders.parse_context_save(wire)

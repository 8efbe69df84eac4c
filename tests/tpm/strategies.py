"""Hypothesis strategies for the wire layer's structures (shared by the tests of tests/tpm)."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st

from cusetpm.tpm.command import AuthCommand, Command
from cusetpm.tpm.constants import TPM_CAP, TPM_MAX_SESSIONS, TPM_ST, TPMA_CC
from cusetpm.tpm.response import AuthResponse, Response
from cusetpm.tpm.structures import TPMS_CAPABILITY_DATA, TPMS_CONTEXT, TPMS_TAGGED_PROPERTY

u8s = st.integers(0, 0xFF)
u16s = st.integers(0, 0xFFFF)
u32s = st.integers(0, 0xFFFF_FFFF)
u64s = st.integers(0, 0xFFFF_FFFF_FFFF_FFFF)
# TPM2B contents: small (a digest is at most 64 bytes), sometimes empty
digests = st.binary(max_size=64)
parameter_bytes = st.binary(max_size=256)


def auth_commands() -> st.SearchStrategy[AuthCommand]:
    return st.builds(
        AuthCommand, sessionHandle=u32s, nonce=digests, sessionAttributes=u8s, hmac=digests
    )


@st.composite
def commands(draw: st.DrawFn) -> Command:
    """Any well-formed command: either tag, 0-3 handles, 1-3 sessions when tagged SESSIONS."""
    tag = draw(st.sampled_from([TPM_ST.NO_SESSIONS, TPM_ST.SESSIONS]))
    sessions = (
        draw(st.lists(auth_commands(), min_size=1, max_size=TPM_MAX_SESSIONS))
        if tag == TPM_ST.SESSIONS
        else []
    )
    return Command(
        tag=tag,
        commandCode=draw(u32s),
        handles=draw(st.lists(u32s, max_size=3)),
        sessions=sessions,
        parameters=draw(parameter_bytes),
    )


def auth_responses() -> st.SearchStrategy[AuthResponse]:
    return st.builds(AuthResponse, nonce=digests, sessionAttributes=u8s, hmac=digests)


@st.composite
def responses(draw: st.DrawFn, has_handle: bool | None = None) -> Response:
    """A well-formed success response, or (when has_handle is not True) a 10-byte error."""
    if has_handle is None:
        has_handle = draw(st.booleans())
    if not has_handle and draw(st.booleans()):
        return Response(tag=TPM_ST.NO_SESSIONS, responseCode=draw(st.integers(1, 0xFFFF_FFFF)))
    tag = draw(st.sampled_from([TPM_ST.NO_SESSIONS, TPM_ST.SESSIONS]))
    sessions = (
        draw(st.lists(auth_responses(), min_size=1, max_size=TPM_MAX_SESSIONS))
        if tag == TPM_ST.SESSIONS
        else []
    )
    return Response(
        tag=tag,
        responseCode=0,
        handle=draw(u32s) if has_handle else None,
        parameters=draw(parameter_bytes),
        sessions=sessions,
    )


def contexts() -> st.SearchStrategy[TPMS_CONTEXT]:
    return st.builds(
        TPMS_CONTEXT,
        sequence=u64s,
        savedHandle=u32s,
        hierarchy=u32s,
        contextBlob=st.binary(max_size=1024),
    )


# TPMA_CC: bits 16-21 and 30-31 are reserved and do not survive from_int
TPMA_CC_DEFINED_BITS = 0x3FC0_FFFF
tpma_ccs = u32s.map(TPMA_CC.from_int)


@st.composite
def capability_data(draw: st.DrawFn) -> TPMS_CAPABILITY_DATA:
    kind = draw(st.one_of(st.sampled_from(list(TPM_CAP)), u32s))
    data = TPMS_CAPABILITY_DATA(capability=kind)
    if kind == TPM_CAP.HANDLES:
        data.handles = draw(st.lists(u32s, max_size=40))
    elif kind == TPM_CAP.COMMANDS:
        data.commands = draw(st.lists(tpma_ccs, max_size=40))
    elif kind == TPM_CAP.TPM_PROPERTIES:
        data.properties = draw(
            st.lists(st.builds(TPMS_TAGGED_PROPERTY, property=u32s, value=u32s), max_size=40)
        )
    else:
        data.raw = draw(st.binary(max_size=128))
    return data


# every property in tests/tpm: enough examples to find framing bugs, fast enough for CI
PROPERTY = settings(max_examples=200, deadline=None)

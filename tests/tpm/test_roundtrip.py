"""Build → parse → equal, for everything the wire layer both writes and reads."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from cusetpm.tpm import commands as builders
from cusetpm.tpm.command import Command, check_framing, parse_command, parse_header
from cusetpm.tpm.commands import get_capability_parameters, unmarshal_capability
from cusetpm.tpm.constants import TPM_CC, TPM_HEADER_SIZE, TPM_ST, TPMA_CC
from cusetpm.tpm.marshal import Reader
from cusetpm.tpm.response import Response, error_response, parse_response
from cusetpm.tpm.structures import TPMS_CAPABILITY_DATA, TPMS_CONTEXT
from tests.tpm.strategies import (
    PROPERTY,
    TPMA_CC_DEFINED_BITS,
    capability_data,
    commands,
    contexts,
    responses,
    u16s,
    u32s,
)


@PROPERTY
@given(commands())
def test_command_round_trip(cmd: Command) -> None:
    wire = cmd.to_bytes()
    header = check_framing(wire)
    assert (header.tag, header.size, header.code) == (cmd.tag, len(wire), cmd.commandCode)
    assert parse_command(wire, len(cmd.handles)) == cmd
    # memoryview and bytearray inputs parse the same
    assert parse_command(memoryview(wire), len(cmd.handles)) == cmd
    assert parse_command(bytearray(wire), len(cmd.handles)) == cmd


@PROPERTY
@given(responses())
def test_response_round_trip(resp: Response) -> None:
    wire = resp.to_bytes()
    assert parse_response(wire, has_handle=resp.handle is not None) == resp


@PROPERTY
@given(u32s.filter(bool))
def test_error_response(rc: int) -> None:
    wire = error_response(rc)
    assert wire == struct.pack(">HII", TPM_ST.NO_SESSIONS, TPM_HEADER_SIZE, rc)
    # an error response has no handle even for commands whose TPMA_CC.rHandle is set
    for has_handle in (False, True):
        assert parse_response(wire, has_handle) == Response(TPM_ST.NO_SESSIONS, rc)


@PROPERTY
@given(contexts())
def test_context_round_trip(ctx: TPMS_CONTEXT) -> None:
    wire = ctx.to_bytes()
    assert len(wire) == 8 + 4 + 4 + 2 + len(ctx.contextBlob)
    assert TPMS_CONTEXT.from_bytes(wire) == ctx
    reader = Reader(wire + b"tail")
    assert TPMS_CONTEXT.unmarshal(reader) == ctx
    assert reader.rest() == b"tail"


@PROPERTY
@given(capability_data(), st.booleans())
def test_capability_data_round_trip(data: TPMS_CAPABILITY_DATA, more: bool) -> None:
    assert TPMS_CAPABILITY_DATA.unmarshal(Reader(data.to_bytes())) == data
    assert unmarshal_capability(get_capability_parameters(more, data)) == (more, data)
    # and as a whole GetCapability response
    resp = Response(TPM_ST.NO_SESSIONS, 0, parameters=get_capability_parameters(more, data))
    assert builders.parse_get_capability(resp.to_bytes()) == (more, data)


@PROPERTY
@given(u32s)
def test_tpma_cc_round_trip(value: int) -> None:
    attrs = TPMA_CC.from_int(value)
    assert attrs.to_int() == value & TPMA_CC_DEFINED_BITS
    assert TPMA_CC.from_int(attrs.to_int()) == attrs
    assert attrs.commandIndex == value & 0xFFFF
    assert attrs.cHandles == (value >> 25) & 7
    assert attrs.rHandle == bool(value & 1 << 28)
    assert attrs.command_code == (value & 0xFFFF) | (value & 1 << 29)


def test_tpma_cc_fields() -> None:
    # CreatePrimary as libtpms reports it: 1 handle, a response handle, no other flags
    attrs = TPMA_CC.from_int(0x12000131)
    assert attrs == TPMA_CC(
        commandIndex=0x131,
        nv=False,
        extensive=False,
        flushed=False,
        cHandles=1,
        rHandle=True,
        V=False,
    )
    assert attrs.command_code == TPM_CC.CreatePrimary
    vendor = TPMA_CC.from_int(0x20000001 | 0x01C0_0000)
    assert vendor.V and vendor.nv and vendor.extensive and vendor.flushed
    assert vendor.command_code == TPM_CC.Vendor_TCG_Test


# --- builders: each parses back to the fields it was given ---------------------------------


def _parsed(wire: bytes, cc: int, handle_count: int = 0) -> Command:
    cmd = parse_command(wire, handle_count)
    assert cmd.tag == TPM_ST.NO_SESSIONS
    assert cmd.commandCode == cc
    assert cmd.sessions == []
    assert parse_header(wire).size == len(wire)
    return cmd


@PROPERTY
@given(u16s)
def test_build_startup_shutdown(su: int) -> None:
    assert _parsed(builders.startup(su), TPM_CC.Startup).parameters == struct.pack(">H", su)
    assert _parsed(builders.shutdown(su), TPM_CC.Shutdown).parameters == struct.pack(">H", su)


@PROPERTY
@given(u16s)
def test_build_get_random(n: int) -> None:
    assert _parsed(builders.get_random(n), TPM_CC.GetRandom).parameters == struct.pack(">H", n)


@PROPERTY
@given(u32s, u32s, u32s)
def test_build_get_capability(cap: int, prop: int, count: int) -> None:
    params = _parsed(builders.get_capability(cap, prop, count), TPM_CC.GetCapability).parameters
    assert struct.unpack(">III", params) == (cap, prop, count)


@PROPERTY
@given(u32s)
def test_build_handle_commands(handle: int) -> None:
    # ContextSave and FlushContext carry their handle as a parameter (TPMA_CC.cHandles 0) ...
    for wire, cc in (
        (builders.context_save(handle), TPM_CC.ContextSave),
        (builders.flush_context(handle), TPM_CC.FlushContext),
    ):
        assert _parsed(wire, cc).parameters == struct.pack(">I", handle)
    # ... ContextSave's is in the handle area for the TPM (cHandles 1): both views agree
    assert _parsed(builders.context_save(handle), TPM_CC.ContextSave, 1).handles == [handle]
    read_public = _parsed(builders.read_public(handle), TPM_CC.ReadPublic, 1)
    assert read_public.handles == [handle]
    assert read_public.parameters == b""


@PROPERTY
@given(contexts())
def test_build_context_load(ctx: TPMS_CONTEXT) -> None:
    cmd = _parsed(builders.context_load(ctx), TPM_CC.ContextLoad)
    assert TPMS_CONTEXT.from_bytes(cmd.parameters) == ctx


# --- readers of the RM's own responses -------------------------------------------------


@PROPERTY
@given(contexts())
def test_parse_context_save(ctx: TPMS_CONTEXT) -> None:
    wire = Response(TPM_ST.NO_SESSIONS, 0, parameters=ctx.to_bytes()).to_bytes()
    assert builders.parse_context_save(wire) == ctx


@PROPERTY
@given(u32s)
def test_parse_context_load(handle: int) -> None:
    wire = Response(TPM_ST.NO_SESSIONS, 0, handle=handle).to_bytes()
    assert builders.parse_context_load(wire) == handle


@PROPERTY
@given(st.binary(max_size=64))
def test_parse_get_random(data: bytes) -> None:
    wire = Response(TPM_ST.NO_SESSIONS, 0, parameters=struct.pack(">H", len(data)) + data)
    assert builders.parse_get_random(wire.to_bytes()) == data


@PROPERTY
@given(u32s.filter(bool))
def test_readers_raise_tpm_error(rc: int) -> None:
    wire = error_response(rc)
    for reader in (
        builders.parse_context_save,
        builders.parse_context_load,
        builders.parse_get_random,
        builders.parse_get_capability,
    ):
        try:
            reader(wire)
        except builders.TPMError as exc:
            assert exc.rc == rc
            assert f"0x{rc:08x}" in str(exc)
        else:
            raise AssertionError(f"{reader.__name__} accepted rc 0x{rc:08x}")

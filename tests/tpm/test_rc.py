"""Response-code decoding (Part 2 6.6): formats, numbers, warnings, layers, names."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from cusetpm.tpm.rc import (
    LAYER_NAMES,
    RC_FMT1,
    RC_P,
    RC_S,
    RC_VER1,
    RC_WARN,
    TPM_RC,
    TSS2_RESMGR_RC_LAYER,
    decode_rc,
    rc_base,
    rc_name,
    rm_rc,
)
from tests.tpm.strategies import PROPERTY

FORMAT1 = [rc for rc in TPM_RC if rc & RC_FMT1]
FORMAT0_ERRORS = [rc for rc in TPM_RC if rc & RC_VER1 and not rc & RC_FMT1 and rc < RC_WARN]
WARNINGS = [rc for rc in TPM_RC if rc & RC_WARN == RC_WARN]
layers = st.integers(0, 0xFF)


def test_tables_are_what_the_spec_says() -> None:
    assert len(FORMAT1) > 30
    assert all(0x081 <= rc <= 0x0BF for rc in FORMAT1)
    assert [rc for rc in WARNINGS if rc <= 0x923] == [rc for rc in WARNINGS if 0x901 <= rc <= 0x923]


@PROPERTY
@given(st.sampled_from(FORMAT1), st.integers(1, 7), layers)
def test_format1_handle(base: int, n: int, layer: int) -> None:
    info = decode_rc(layer << 16 | n << 8 | base)
    assert (info.format1, info.warning, info.base, info.layer) == (True, False, base, layer)
    assert (info.handle, info.parameter, info.session) == (n, None, None)
    assert rc_base(info.rc) == base
    assert rc_name(info.rc).endswith(f"TPM_RC_{TPM_RC(base).name}+H{n}")


@PROPERTY
@given(st.sampled_from(FORMAT1), st.integers(1, 15), layers)
def test_format1_parameter(base: int, n: int, layer: int) -> None:
    info = decode_rc(layer << 16 | n << 8 | RC_P | base)
    assert (info.format1, info.warning, info.base, info.layer) == (True, False, base, layer)
    assert (info.handle, info.parameter, info.session) == (None, n, None)
    assert rc_name(info.rc).endswith(f"TPM_RC_{TPM_RC(base).name}+P{n}")


@PROPERTY
@given(st.sampled_from(FORMAT1), st.integers(1, 7), layers)
def test_format1_session(base: int, n: int, layer: int) -> None:
    rc = layer << 16 | RC_S | n << 8 | base
    info = decode_rc(rc)
    assert (info.format1, info.warning, info.base, info.layer) == (True, False, base, layer)
    assert (info.handle, info.parameter, info.session) == (None, None, n)
    assert rc_name(rc).endswith(f"TPM_RC_{TPM_RC(base).name}+S{n}")


@PROPERTY
@given(st.sampled_from(FORMAT1))
def test_format1_without_number(base: int) -> None:
    for rc in (base, base | RC_P):
        info = decode_rc(rc)
        assert (info.handle, info.parameter, info.session) == (None, None, None)
        assert rc_name(rc) == f"TPM_RC_{TPM_RC(base).name}"


@PROPERTY
@given(st.sampled_from(FORMAT0_ERRORS), layers)
def test_format0_errors(base: int, layer: int) -> None:
    info = decode_rc(layer << 16 | base)
    assert (info.format1, info.warning, info.vendor, info.base) == (False, False, False, base)
    assert (info.handle, info.parameter, info.session) == (None, None, None)


@PROPERTY
@given(st.sampled_from(WARNINGS), layers)
def test_warnings(base: int, layer: int) -> None:
    info = decode_rc(layer << 16 | base)
    assert info.warning and not info.format1
    assert info.base == base
    assert info.layer == layer


def test_warning_range() -> None:
    for rc in range(0x901, 0x924):
        assert decode_rc(rc).warning, hex(rc)
    assert rc_name(0x901) == "TPM_RC_CONTEXT_GAP"
    assert rc_name(0x922) == "TPM_RC_RETRY"
    assert not decode_rc(0x101).warning


def test_known_codes() -> None:
    # the kernel's /dev/tpmrm0 answer to an unknown command code
    info = decode_rc(0x000B0143)
    assert info.layer == 11 and LAYER_NAMES[info.layer] == "RESMGR"
    assert info.base == TPM_RC.COMMAND_CODE
    assert not info.format1 and not info.warning
    assert rc_name(0x000B0143) == "RESMGR:TPM_RC_COMMAND_CODE"
    assert rm_rc(TPM_RC.COMMAND_CODE) == 0x000B0143
    assert rm_rc(TPM_RC.SESSION_MEMORY) == TSS2_RESMGR_RC_LAYER | 0x903 == 0x000B0903
    assert decode_rc(rm_rc(TPM_RC.SESSION_MEMORY)).warning
    # what libtpms answers for a handle that is not loaded (captured, see captured.py)
    assert rc_name(0x184) == "TPM_RC_VALUE+H1"
    assert rc_name(0x1C4) == "TPM_RC_VALUE+P1"
    assert rc_name(0x98E) == "TPM_RC_AUTH_FAIL+S1"
    assert rc_name(0x18B) == "TPM_RC_HANDLE+H1"
    assert rc_name(0) == "TPM_RC_SUCCESS"
    assert rc_name(0x100) == "TPM_RC_INITIALIZE"
    assert rc_name(0x01E) == "TPM_RC_BAD_TAG"
    assert rc_name(0x000A0000 | 0x101) == "TCTI:TPM_RC_FAILURE"


@PROPERTY
@given(st.integers(0, 0xFFFF_FFFF))
def test_any_code_decodes_and_names(rc: int) -> None:
    info = decode_rc(rc)
    name = rc_name(rc)
    assert isinstance(name, str) and name
    assert info.layer == (rc >> 16) & 0xFF
    if info.format1:
        assert info.base == rc & 0xBF
        assert sum(x is not None for x in (info.handle, info.parameter, info.session)) <= 1
    else:
        assert info.base == rc & 0xFFF

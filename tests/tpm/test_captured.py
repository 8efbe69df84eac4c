"""libtpms's own responses, as captured in captured.py: parsed without a TPM at hand."""

from __future__ import annotations

import pytest

from cusetpm.tpm import commands as builders
from cusetpm.tpm.command import parse_command, parse_header
from cusetpm.tpm.constants import TPM_CC, TPM_PT, TPM_RH, TPMA_CC
from cusetpm.tpm.errors import TPMParseError
from cusetpm.tpm.response import parse_response
from tests.tpm import captured as cap
from tests.tpm import checks
from tests.tpm.helpers import check_command, check_response, with_size


@pytest.fixture(scope="module")
def table() -> dict[int, TPMA_CC]:
    return checks.check_commands(cap.GETCAP_COMMANDS.response)


def test_get_random() -> None:
    checks.check_get_random(cap.GET_RANDOM.response, 16)


def test_commands(table: dict[int, TPMA_CC]) -> None:
    # the table's size is the TPM's own count of its commands
    props = checks.check_fixed_properties(cap.GETCAP_PROPERTIES_FIXED.response)
    assert len(table) == props[TPM_PT.TOTAL_COMMANDS] == 110


def test_fixed_properties() -> None:
    checks.check_fixed_properties(cap.GETCAP_PROPERTIES_FIXED.response)


def test_algorithms() -> None:
    checks.check_algorithms(cap.GETCAP_ALGS.response)


def test_every_command_parses_with_its_table_entry(table: dict[int, TPMA_CC]) -> None:
    """The captured commands split into areas by the TPM's own cHandles."""
    for exchange in cap.ALL.values():
        cc = parse_header(exchange.command).code
        cmd = parse_command(exchange.command, table[cc].cHandles)
        assert cmd.to_bytes() == exchange.command
        resp = parse_response(exchange.response, table[cc].rHandle)
        assert resp.to_bytes() == exchange.response


def test_create_primary(table: dict[int, TPMA_CC]) -> None:
    assert cap.CREATE_PRIMARY_ECC.command == checks.CREATE_PRIMARY_ECC
    checks.check_create_primary_command(
        cap.CREATE_PRIMARY_ECC.command, table[TPM_CC.CreatePrimary].cHandles
    )
    assert checks.check_create_primary(cap.CREATE_PRIMARY_ECC.response) == 0x80000000
    checks.check_transient_handles(cap.GETCAP_HANDLES_TRANSIENT.response, [0x80000000])


def test_object_context() -> None:
    ctx = checks.check_context_save(cap.CONTEXT_SAVE_OBJECT.response, 0x80000000, TPM_RH.OWNER)
    checks.check_context_load_command(cap.CONTEXT_LOAD_OBJECT.command, ctx)
    assert checks.check_context_load(cap.CONTEXT_LOAD_OBJECT.response) == 0x80000001
    assert parse_command(cap.FLUSH_CONTEXT.command, 0).parameters == b"\x80\0\0\x01"
    checks.check_success(cap.FLUSH_CONTEXT.response)


def test_session_context() -> None:
    assert cap.START_AUTH_SESSION.command == checks.START_AUTH_SESSION
    handle = checks.check_start_auth_session(cap.START_AUTH_SESSION.response)
    assert handle == 0x02000000
    checks.check_context_save(cap.CONTEXT_SAVE_SESSION.response, handle, TPM_RH.NULL)


def test_errors() -> None:
    rc = checks.check_error(cap.FLUSH_CONTEXT_BAD_HANDLE.response, *checks.UNLOADED_AS_PARAMETER)
    assert rc == 0x1C4
    for exchange in (cap.CONTEXT_SAVE_BAD_HANDLE, cap.READ_PUBLIC_BAD_HANDLE):
        rc = checks.check_error(exchange.response, *checks.UNLOADED_IN_HANDLE_AREA)
        assert rc == 0x184
    with pytest.raises(builders.TPMError) as err:
        builders.parse_context_save(cap.CONTEXT_SAVE_BAD_HANDLE.response)
    assert err.value.rc == 0x184
    assert "TPM_RC_VALUE+H1" in str(err.value)


@pytest.mark.parametrize("name", list(cap.ALL))
def test_captured_truncations(name: str, table: dict[int, TPMA_CC]) -> None:
    """Every cut of a real command or response: a TPMParseError or an exact re-parse."""
    exchange = cap.ALL[name]
    cc = parse_header(exchange.command).code
    has_handle = table[cc].rHandle
    for n in range(len(exchange.command)):
        with pytest.raises(TPMParseError):  # the header still says the full size
            parse_command(exchange.command[:n], table[cc].cHandles)
        check_command(with_size(exchange.command[:n]), table[cc].cHandles)
    for n in range(len(exchange.response)):
        with pytest.raises(TPMParseError):
            parse_response(exchange.response[:n], has_handle)
        check_response(with_size(exchange.response[:n]), has_handle)

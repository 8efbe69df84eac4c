"""The wire layer against a live libtpms: the responses of captured.py, fresh from the TPM.

libtpms is one TPM per process, so this module opens one backend for all its tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cusetpm.tpm import commands as builders
from cusetpm.tpm.command import pack_header
from cusetpm.tpm.constants import (
    TPM_CAP,
    TPM_CC,
    TPM_CC_FIRST,
    TPM_HT,
    TPM_PT,
    TPM_RH,
    TPM_ST,
    TPMA_CC,
)
from cusetpm.tpm.rc import decode_rc
from tests.tpm import checks
from tests.tpm.helpers import check_response

libtpms = pytest.importorskip("cusetpm.backends.libtpms")


@pytest.fixture(scope="module")
def tpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[libtpms.LibtpmsBackend]:
    state: Path = tmp_path_factory.mktemp("libtpms-state")
    try:
        backend = libtpms.LibtpmsBackend(state)
    except libtpms.BackendError as exc:  # no libtpms.so.0 on this machine
        pytest.skip(str(exc))
    try:
        yield backend
    finally:
        backend.close()


@pytest.fixture(scope="module")
def table(tpm: libtpms.LibtpmsBackend) -> dict[int, TPMA_CC]:
    return checks.check_commands(
        tpm.transmit(builders.get_capability(TPM_CAP.COMMANDS, TPM_CC_FIRST, 256))
    )


def transient_handles(tpm: libtpms.LibtpmsBackend) -> list[int]:
    more, data = builders.parse_get_capability(
        tpm.transmit(builders.get_capability(TPM_CAP.HANDLES, TPM_HT.TRANSIENT << 24, 64))
    )
    assert not more
    return data.handles


def test_get_random(tpm: libtpms.LibtpmsBackend) -> None:
    for n in (0, 1, 16, 32):
        checks.check_get_random(tpm.transmit(builders.get_random(n)), n)


def test_commands(tpm: libtpms.LibtpmsBackend, table: dict[int, TPMA_CC]) -> None:
    props = checks.check_fixed_properties(
        tpm.transmit(builders.get_capability(TPM_CAP.TPM_PROPERTIES, TPM_PT.FAMILY_INDICATOR, 256))
    )
    assert len(table) == props[TPM_PT.TOTAL_COMMANDS]


def test_paged_commands(tpm: libtpms.LibtpmsBackend, table: dict[int, TPMA_CC]) -> None:
    """A short page sets moreData; the next page starts after the last code."""
    more, first = builders.parse_get_capability(
        tpm.transmit(builders.get_capability(TPM_CAP.COMMANDS, TPM_CC_FIRST, 10))
    )
    assert more and len(first.commands) == 10
    after = first.commands[-1].command_code + 1
    _, rest = builders.parse_get_capability(
        tpm.transmit(builders.get_capability(TPM_CAP.COMMANDS, after, 256))
    )
    assert first.commands + rest.commands == list(table.values())


def test_algorithms(tpm: libtpms.LibtpmsBackend) -> None:
    checks.check_algorithms(tpm.transmit(builders.get_capability(TPM_CAP.ALGS, 0, 256)))


def test_primary_and_its_context(tpm: libtpms.LibtpmsBackend, table: dict[int, TPMA_CC]) -> None:
    checks.check_create_primary_command(
        checks.CREATE_PRIMARY_ECC, table[TPM_CC.CreatePrimary].cHandles
    )
    before = transient_handles(tpm)
    primary = checks.check_create_primary(tpm.transmit(checks.CREATE_PRIMARY_ECC))
    try:
        assert transient_handles(tpm) == sorted([*before, primary])
        ctx = checks.check_context_save(
            tpm.transmit(builders.context_save(primary)), 0x80000000, TPM_RH.OWNER
        )
        load = builders.context_load(ctx)
        checks.check_context_load_command(load, ctx)
        copy = checks.check_context_load(tpm.transmit(load))
        assert copy != primary
        assert transient_handles(tpm) == sorted([*before, primary, copy])
        checks.check_success(tpm.transmit(builders.flush_context(copy)))
        # the same context loads again: objects' contexts are not one-shot
        again = checks.check_context_load(tpm.transmit(load))
        checks.check_success(tpm.transmit(builders.flush_context(again)))
    finally:
        check_response(tpm.transmit(builders.flush_context(primary)), False)
    assert transient_handles(tpm) == before


def test_session_context(tpm: libtpms.LibtpmsBackend) -> None:
    session = checks.check_start_auth_session(tpm.transmit(checks.START_AUTH_SESSION))
    try:
        ctx = checks.check_context_save(
            tpm.transmit(builders.context_save(session)), session, TPM_RH.NULL
        )
        # a saved session reloads at its own handle
        assert checks.check_context_load(tpm.transmit(builders.context_load(ctx)), 2) == session
    finally:
        checks.check_success(tpm.transmit(builders.flush_context(session)))


def test_errors(tpm: libtpms.LibtpmsBackend) -> None:
    checks.check_error(
        tpm.transmit(builders.flush_context(0x80FFFFFF)), *checks.UNLOADED_AS_PARAMETER
    )
    checks.check_error(
        tpm.transmit(builders.context_save(0x80FFFFFF)), *checks.UNLOADED_IN_HANDLE_AREA
    )
    checks.check_error(
        tpm.transmit(builders.read_public(0x80FFFFFF)), *checks.UNLOADED_IN_HANDLE_AREA
    )
    with pytest.raises(builders.TPMError):
        builders.parse_context_load(
            tpm.transmit(builders.context_load(builders.TPMS_CONTEXT(1, 0x80000000, 1, b"x")))
        )


def test_tpm_answers_parse(tpm: libtpms.LibtpmsBackend, table: dict[int, TPMA_CC]) -> None:
    """Whatever the TPM says to a bare header of each of its commands, this layer parses."""
    skip = {TPM_CC.Startup, TPM_CC.Shutdown, TPM_CC.SelfTest, TPM_CC.IncrementalSelfTest}
    for cc, attrs in table.items():
        if cc in skip:
            continue
        response = tpm.transmit(pack_header(TPM_ST.NO_SESSIONS, 10, cc))
        parsed = check_response(response, attrs.rHandle)
        assert parsed is not None, (TPM_CC(cc).name, response.hex())
        if parsed.responseCode:
            assert decode_rc(parsed.responseCode).layer == 0
    # and the TPM is still fine
    checks.check_get_random(tpm.transmit(builders.get_random(8)), 8)

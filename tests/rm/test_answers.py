"""Answers the RM writes itself where the kernel would let the TPM answer: they must be the
TPM's own bytes, and refusals must not flood the log."""

from __future__ import annotations

import logging

import pytest

from cusetpm.rm import ResourceManager
from cusetpm.rm.refusals import WARN_FIRST
from cusetpm.tpm import commands as build
from tests.rm.client import RawClient, policy_restart_command, rc_of

TPM_RC_BAD_TAG = 0x01E
TPM_RC_VALUE = 0x084
TPM_RC_SIZE = 0x095


@pytest.mark.parametrize(("tag", "expected"), [
    (0x8000, TPM_RC_BAD_TAG), (0x8003, TPM_RC_VALUE), (0x00C1, TPM_RC_VALUE),
    (0x0000, TPM_RC_VALUE), (0xFFFF, TPM_RC_VALUE),
])
def test_bad_tag_gets_the_tpms_answer(client: RawClient, tag: int, expected: int) -> None:
    """As the kernel, which passes the command on: the TPM's answer (libtpms gives
    TPM_RC_BAD_TAG for TPM_ST_NULL and TPM_RC_VALUE for other tags), not EINVAL."""
    key = client.create_primary()  # a virtual handle the TPM must never see
    command = bytearray(build.read_public(key))
    command[0:2] = tag.to_bytes(2, "big")
    trips = client.rm.round_trips
    response = client.send(bytes(command))
    assert client.rm.round_trips == trips + 1  # the header alone
    assert response == client.rm.backend.transmit(bytes(command))
    assert rc_of(response) == expected, hex(rc_of(response))
    assert len(client.read_public(key)) > 10  # the space goes on


def refusal_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name == "cusetpm.rm"
    ]


def test_refusal_warnings_are_rate_limited_per_space(
    rm: ResourceManager, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cusetpm")
    hostile, other = RawClient(rm, rm.open_space()), RawClient(rm, rm.open_space())
    for index in range(50):
        hostile.send(policy_restart_command(0x03000000 | index))
    warnings = refusal_warnings(caplog)
    assert len(warnings) == WARN_FIRST + 1, warnings  # the first few, and that more are counted
    assert all(f"space {hostile.space.id}:" in w for w in warnings)
    # another space's first refusal is still logged
    other.send(policy_restart_command(0x03000000))
    assert len(refusal_warnings(caplog)) == WARN_FIRST + 2
    rm.close_space(hostile.space)
    closing = refusal_warnings(caplog)[-1]
    assert f"space {hostile.space.id} closed: {50 - WARN_FIRST} more refusals" in closing


def test_read_public_is_answered_from_the_first_answer(client: RawClient) -> None:
    """ReadPublic without sessions: the first goes to the TPM (load, command, flush), the
    next ones are the same bytes with no TPM command; other objects keep their own."""
    from tests.rm.client import ecc_signing_template, with_unique

    key = client.create_primary(with_unique(ecc_signing_template(), b"one"))
    other = client.create_primary(with_unique(ecc_signing_template(), b"two"))
    trips = client.rm.round_trips
    first = client.send(build.read_public(key))
    assert client.rm.round_trips > trips
    trips = client.rm.round_trips
    again = [client.send(build.read_public(key)) for _ in range(5)]
    assert client.rm.round_trips == trips
    assert again == [first] * 5
    assert client.send(build.read_public(other)) != first
    # a malformed one (trailing bytes) is not answered from the copy: the TPM says what it is
    trailing = bytearray(build.read_public(key) + b"\0\0")
    trailing[2:6] = len(trailing).to_bytes(4, "big")
    trips = client.rm.round_trips
    assert rc_of(client.send(bytes(trailing))) == TPM_RC_SIZE
    assert client.rm.round_trips > trips
    client.flush(key)
    client.flush(other)


def test_read_public_with_an_audit_session_goes_to_the_tpm(rm: ResourceManager) -> None:
    from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_SE, TPMA_SESSION
    from tpm2_pytss.types import TPMT_SYM_DEF

    from tests.rm.client import esapi

    space = rm.open_space()
    esys = esapi(rm, space)
    raw = RawClient(rm, space)
    key = raw.create_primary()
    plain = raw.send(build.read_public(key))
    audit = esys.start_auth_session(
        ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.HMAC, TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
        TPM2_ALG.SHA256,
    )
    esys.trsess_set_attributes(audit, TPMA_SESSION.CONTINUESESSION | TPMA_SESSION.AUDIT)
    handle = esys.tr_from_tpmpublic(key)
    trips = rm.round_trips
    _, name, _ = esys.read_public(handle, session1=audit)
    assert rm.round_trips > trips  # the TPM answered (and signed the audit digest)
    assert bytes(name) in plain
    rm.close_space(space)

"""clevis's tpm2 pin through the node (it runs tpm2-tools: TPM2TOOLS_TCTI=device:NODE)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from tests.clients.tools import pcr_extend, run

SECRET = b"a disk key clevis keeps in the TPM"


def clevis(tcti: str, cwd: Path, *argv: str, input: bytes) -> bytes:
    return run(["clevis", *argv], cwd, {"TPM2TOOLS_TCTI": tcti}, input=input).stdout


def pin_header(jwe: bytes) -> dict[str, str]:
    """The tpm2 pin's part of the JWE's protected header (compact form: header first)."""
    protected = jwe.split(b".")[0]
    header = json.loads(base64.urlsafe_b64decode(protected + b"=" * (-len(protected) % 4)))
    assert header["clevis"]["pin"] == "tpm2"
    pin: dict[str, str] = header["clevis"]["tpm2"]
    return pin


@pytest.mark.parametrize("config", ["{}", '{"key":"rsa"}'])
def test_round_trip(tcti: str, tmp_path: Path, config: str) -> None:
    jwe = clevis(tcti, tmp_path, "encrypt", "tpm2", config, input=SECRET)
    assert SECRET not in jwe
    pin = pin_header(jwe)
    assert pin["key"] == json.loads(config).get("key", "ecc")
    assert clevis(tcti, tmp_path, "decrypt", input=jwe) == SECRET


def test_bound_to_pcr_7_refused_after_an_extend(tcti: str, tmp_path: Path) -> None:
    jwe = clevis(tcti, tmp_path, "encrypt", "tpm2", '{"pcr_ids":"7"}', input=SECRET)
    pin = pin_header(jwe)
    assert pin["pcr_ids"] == "7"
    assert clevis(tcti, tmp_path, "decrypt", input=jwe) == SECRET
    pcr_extend(tcti, tmp_path, f"{pin['pcr_bank']}:7")  # the bank clevis bound to
    refused = run(["clevis", "decrypt"], tmp_path, {"TPM2TOOLS_TCTI": tcti}, input=jwe,
                  check=False)
    assert refused.returncode == 1 and refused.stdout == b"", refused.returncode
    # The unseal itself was refused by the TPM's policy check (TPM_RC_POLICY_FAIL in
    # session 1), not some other failure.
    assert b"Esys_Unseal(0x99D)" in refused.stderr, refused.stderr

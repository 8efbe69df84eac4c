"""Running real client programs against the node, with results checked by the caller."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from cusetpm.tpm import commands as build
from cusetpm.tpm.constants import TPM_CAP, TPM_HEADER_SIZE, TPM_PT


def run(argv: list[str], cwd: Path, env: dict[str, str] | None = None,
        input: bytes | None = None, check: bool = True,
        timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    done = subprocess.run(argv, cwd=cwd, env={**os.environ, **(env or {})}, input=input,
                          capture_output=True, timeout=timeout)
    if check:
        assert done.returncode == 0, (
            f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr.decode(errors='replace')}")
    return done


def pcr_extend(tcti: str, cwd: Path, pcr: str) -> None:
    """Extend PCR `pcr` (e.g. 'sha256:7') with tpm2-tools through the node."""
    bank, index = pcr.split(":")
    digest = {"sha1": "00" * 20, "sha256": "11" * 32}[bank]
    run(["tpm2_pcrextend", f"{index}:{bank}={digest}"], cwd, {"TPM2TOOLS_TCTI": tcti})


# The TPM's own counts, which the RM passes through unchanged (GetCapability of
# TPM_PROPERTIES): what any node, served here or in the guest, lets a test take a census by.
CENSUS = (TPM_PT.HR_LOADED, TPM_PT.HR_ACTIVE, TPM_PT.HR_TRANSIENT_AVAIL)


def tpm_counts(node: str) -> dict[str, int]:
    """Sessions loaded, sessions active (loaded or saved), free object slots, in the TPM."""
    fd = os.open(node, os.O_RDWR)
    try:
        os.write(fd, build.get_capability(TPM_CAP.TPM_PROPERTIES, TPM_PT.HR_LOADED, 5))
        response = os.read(fd, 4096)
    finally:
        os.close(fd)
    rc = int.from_bytes(response[6:10], "big")
    assert rc == 0, f"GetCapability(TPM_PROPERTIES) answered {rc:#x}"
    _, data = build.unmarshal_capability(response[TPM_HEADER_SIZE:])
    values = {p.property: p.value for p in data.properties}
    return {TPM_PT(p).name: values[p] for p in CENSUS}


def wait_for_counts(node: str, expected: dict[str, int], timeout: float = 10.0) -> dict[str, int]:
    """A closed client's release reaches the daemon asynchronously: poll until the TPM's
    counts are `expected` or `timeout` passes (the caller asserts on what is returned)."""
    deadline = time.monotonic() + timeout
    while True:
        counts = tpm_counts(node)
        if counts == expected or time.monotonic() > deadline:
            return counts
        time.sleep(0.2)

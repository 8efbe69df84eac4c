"""Running real client programs against the node, with results checked by the caller."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


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

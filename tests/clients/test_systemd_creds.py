"""systemd-creds (systemd 252) through the node: --with-key=tpm2 --tpm2-device=NODE."""

from __future__ import annotations

from pathlib import Path

from tests.clients.tools import pcr_extend, run

SECRET = b"a service credential sealed by the TPM"


def creds(node: str, cwd: Path, *argv: str) -> bytes:
    return run(["systemd-creds", *argv, f"--tpm2-device={node}", "--name=cusetpm"], cwd).stdout


def test_encrypt_decrypt(node: str, tmp_path: Path) -> None:
    (tmp_path / "plain").write_bytes(SECRET)
    creds(node, tmp_path, "encrypt", "--with-key=tpm2", "plain", "cred")
    sealed = (tmp_path / "cred").read_bytes()
    assert SECRET not in sealed and len(sealed) > len(SECRET)
    assert creds(node, tmp_path, "decrypt", "cred", "-") == SECRET


def test_bound_to_pcr_7_refused_after_an_extend(node: str, tcti: str, tmp_path: Path) -> None:
    # A fresh TPM's PCR 7 is all zeros, which systemd calls uninitialised firmware (and
    # warns that the policy is unenforced): give it a measurement first, as firmware would.
    pcr_extend(tcti, tmp_path, "sha256:7")
    (tmp_path / "plain").write_bytes(SECRET)
    done = run(["systemd-creds", "encrypt", "--with-key=tpm2", f"--tpm2-device={node}",
                "--tpm2-pcrs=7", "--name=cusetpm", "plain", "cred"], tmp_path)
    assert b"unenforced" not in done.stderr, done.stderr
    assert creds(node, tmp_path, "decrypt", "cred", "-") == SECRET
    pcr_extend(tcti, tmp_path, "sha256:7")
    refused = run(["systemd-creds", "decrypt", f"--tpm2-device={node}", "--name=cusetpm",
                   "cred", "-"], tmp_path, check=False)
    assert refused.returncode == 1 and SECRET not in refused.stdout, refused.returncode
    assert b"policy digest does not match" in refused.stderr, refused.stderr

"""The `user` profile with real tpm2-tools through a served FUSE node: what an unprivileged
program needs works, administration is refused with 0x000B0120 (which tpm2_rc_decode reads as
"the command is disabled") and leaves the TPM unchanged, seen from the `full` node of the same
daemon (one --config, two nodes). The NV index the user reads and writes is defined first
through the full node; tpm2_evictcontrol works there too."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.frontends.conftest import Daemon, lazy_unmount, require_fuse
from tests.frontends.test_nodes import REFUSED, ConfigDaemon, write_config

NV_INDEX = "0x1800020"
PERSISTENT = "0x81000020"


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    """(full tcti, user tcti, a work directory): one daemon for the whole matrix."""
    require_fuse()
    tmp = tmp_path_factory.mktemp("user-node")
    full, user = tmp / "full", tmp / "user"
    config = tmp / "nodes.toml"
    write_config(config, full, user)
    d = ConfigDaemon(mount=full, state=tmp / "state", log_path=tmp / "d.log", config=config)
    d.start()
    try:
        yield f"device:{full}/tpmrm0", f"device:{user}/tpmrm0", tmp
    finally:
        d.stop()
        lazy_unmount(user)


def run(*args: str, tcti: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([*args, "-T", tcti], capture_output=True, text=True, timeout=60,
                         check=False)
    if ok:
        assert out.returncode == 0, f"{' '.join(args)}: {out.stderr}"
    return out


@pytest.fixture(scope="module")
def primary(nodes: tuple[str, str, Path]) -> Path:
    _, user, tmp = nodes
    ctx = tmp / "primary.ctx"
    run("tpm2_createprimary", "-C", "o", "-c", str(ctx), tcti=user)
    return ctx


def test_keys_sign_and_verify(nodes, primary: Path) -> None:  # type: ignore[no-untyped-def]
    _, user, tmp = nodes
    pub, priv, key = tmp / "k.pub", tmp / "k.priv", tmp / "k.ctx"
    run("tpm2_create", "-C", str(primary), "-G", "ecc", "-u", str(pub), "-r", str(priv),
        tcti=user)
    run("tpm2_load", "-C", str(primary), "-u", str(pub), "-r", str(priv), "-c", str(key),
        tcti=user)
    message, sig = tmp / "msg", tmp / "msg.sig"
    message.write_bytes(b"signed through the user node")
    run("tpm2_sign", "-c", str(key), "-g", "sha256", "-o", str(sig), str(message), tcti=user)
    run("tpm2_verifysignature", "-c", str(key), "-g", "sha256", "-m", str(message),
        "-s", str(sig), tcti=user)
    message.write_bytes(b"another message")
    bad = run("tpm2_verifysignature", "-c", str(key), "-g", "sha256", "-m", str(message),
              "-s", str(sig), tcti=user, ok=False)
    assert bad.returncode != 0 and REFUSED not in bad.stderr.lower()  # the TPM said no


def test_seal_unseal_with_a_pcr_policy(nodes, primary: Path) -> None:  # type: ignore[no-untyped-def]
    _, user, tmp = nodes
    session, policy = tmp / "s.ctx", tmp / "pcr.policy"
    run("tpm2_startauthsession", "-S", str(session), tcti=user)
    run("tpm2_policypcr", "-S", str(session), "-l", "sha256:16", "-L", str(policy), tcti=user)
    run("tpm2_flushcontext", str(session), tcti=user)
    secret = tmp / "secret"
    secret.write_bytes(b"sealed under PCR 16")
    pub, priv, sealed = tmp / "seal.pub", tmp / "seal.priv", tmp / "seal.ctx"
    run("tpm2_create", "-C", str(primary), "-L", str(policy), "-i", str(secret),
        "-u", str(pub), "-r", str(priv), tcti=user)
    run("tpm2_load", "-C", str(primary), "-u", str(pub), "-r", str(priv), "-c", str(sealed),
        tcti=user)
    out = run("tpm2_unseal", "-c", str(sealed), "-p", "pcr:sha256:16", tcti=user)
    assert out.stdout.encode() == b"sealed under PCR 16"
    # PCR 16 is the user's to extend; afterwards the policy no longer holds
    run("tpm2_pcrextend", "16:sha256=" + "33" * 32, tcti=user)
    refused = run("tpm2_unseal", "-c", str(sealed), "-p", "pcr:sha256:16", tcti=user, ok=False)
    assert refused.returncode != 0 and REFUSED not in refused.stderr.lower()


def test_quote(nodes, primary: Path) -> None:  # type: ignore[no-untyped-def]
    _, user, tmp = nodes
    pub, priv, ak = tmp / "ak.pub", tmp / "ak.priv", tmp / "ak.ctx"
    attestation_key = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign"
    run("tpm2_create", "-C", str(primary), "-G", "ecc:ecdsa-sha256:null", "-u", str(pub),
        "-r", str(priv), "-a", attestation_key, tcti=user)
    run("tpm2_load", "-C", str(primary), "-u", str(pub), "-r", str(priv), "-c", str(ak),
        tcti=user)
    msg, sig, pcrs = tmp / "q.msg", tmp / "q.sig", tmp / "q.pcrs"
    run("tpm2_quote", "-c", str(ak), "-l", "sha256:0,7,16", "-q", "abcdef", "-m", str(msg),
        "-s", str(sig), "-o", str(pcrs), "-g", "sha256", tcti=user)
    assert msg.stat().st_size > 0 and sig.stat().st_size > 0
    check = subprocess.run(
        ["tpm2_checkquote", "-u", str(pub), "-m", str(msg), "-s", str(sig), "-f", str(pcrs),
         "-g", "sha256", "-q", "abcdef"], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr


def test_nv_read_write_of_an_index_the_full_node_defined(nodes) -> None:  # type: ignore[no-untyped-def]
    full, user, tmp = nodes
    run("tpm2_nvdefine", NV_INDEX, "-C", "o", "-s", "16", "-a",
        "ownerread|ownerwrite|authread|authwrite", tcti=full)
    data = tmp / "nv.in"
    data.write_bytes(b"written by user!")
    run("tpm2_nvwrite", NV_INDEX, "-C", NV_INDEX, "-i", str(data), tcti=user)
    out = subprocess.run(["tpm2_nvread", NV_INDEX, "-C", "o", "-s", "16", "-T", user],
                         capture_output=True, timeout=60)
    assert out.returncode == 0 and out.stdout == b"written by user!", out.stderr
    # and the full node reads what the user wrote
    out = subprocess.run(["tpm2_nvread", NV_INDEX, "-C", NV_INDEX, "-s", "16", "-T", full],
                         capture_output=True, timeout=60)
    assert out.stdout == b"written by user!"
    # undefining is administration: refused on user, done on full
    refused = run("tpm2_nvundefine", NV_INDEX, "-C", "o", tcti=user, ok=False)
    assert REFUSED in refused.stderr.lower(), refused.stderr
    run("tpm2_nvundefine", NV_INDEX, "-C", "o", tcti=full)


def test_getrandom_and_pcrread(nodes) -> None:  # type: ignore[no-untyped-def]
    _, user, _ = nodes
    assert len(bytes.fromhex(run("tpm2_getrandom", "16", "--hex", tcti=user).stdout)) == 16
    assert "sha256" in run("tpm2_pcrread", "sha256:0,16", tcti=user).stdout


def test_administration_refused_and_the_tpm_unchanged(nodes, primary: Path) -> None:  # type: ignore[no-untyped-def]
    full, user, tmp = nodes
    pcrs = "sha256:" + ",".join(str(i) for i in range(16))
    before = run("tpm2_pcrread", pcrs, tcti=full).stdout
    persistent_before = run("tpm2_getcap", "handles-persistent", tcti=full).stdout
    nv_before = run("tpm2_nvreadpublic", tcti=full).stdout
    refused = {
        "tpm2_clear": ["tpm2_clear"],
        "tpm2_clear -c p": ["tpm2_clear", "-c", "p"],
        "tpm2_evictcontrol": ["tpm2_evictcontrol", "-C", "o", "-c", str(primary), PERSISTENT],
        "tpm2_nvdefine": ["tpm2_nvdefine", "0x1800021", "-C", "o", "-s", "8"],
        "tpm2_changeauth -c owner": ["tpm2_changeauth", "-c", "owner", "secret"],
        "tpm2_changeauth -c lockout": ["tpm2_changeauth", "-c", "lockout", "secret"],
        "tpm2_changeauth -c endorsement": ["tpm2_changeauth", "-c", "e", "secret"],
        "tpm2_dictionarylockout --clear-lockout": ["tpm2_dictionarylockout", "-c"],
        "tpm2_dictionarylockout --setup-parameters": [
            "tpm2_dictionarylockout", "-s", "-n", "5", "-t", "6", "-l", "7"],
        **{f"tpm2_pcrextend {i}": ["tpm2_pcrextend", f"{i}:sha256=" + "44" * 32]
           for i in range(16)},
    }
    for what, argv in refused.items():
        out = run(*argv, tcti=user, ok=False)
        assert out.returncode != 0, what
        assert REFUSED in out.stderr.lower(), (what, out.stderr)
    decoded = subprocess.run(["tpm2_rc_decode", "0x000b0120"], capture_output=True, text=True,
                             check=True).stdout
    assert "the command is disabled" in decoded and decoded.startswith("rmt:")
    # nothing changed, as the full node sees it: PCRs, persistent handles, NV, and the owner
    # and lockout authorizations are still empty (owner and lockout commands work without one)
    assert run("tpm2_pcrread", pcrs, tcti=full).stdout == before
    assert run("tpm2_getcap", "handles-persistent", tcti=full).stdout == persistent_before
    assert run("tpm2_nvreadpublic", tcti=full).stdout == nv_before
    run("tpm2_createprimary", "-C", "o", "-c", str(tmp / "full-primary.ctx"), tcti=full)
    run("tpm2_dictionarylockout", "-s", "-n", "32", "-t", "600", "-l", "1800", tcti=full)


def test_evictcontrol_through_the_full_node(nodes) -> None:  # type: ignore[no-untyped-def]
    full, user, tmp = nodes
    ctx = tmp / "persist-me.ctx"
    run("tpm2_createprimary", "-C", "o", "-c", str(ctx), tcti=full)
    run("tpm2_evictcontrol", "-C", "o", "-c", str(ctx), PERSISTENT, tcti=full)
    try:
        assert PERSISTENT in run("tpm2_getcap", "handles-persistent", tcti=user).stdout
        # the user may use the persistent key, not remove it
        run("tpm2_readpublic", "-c", PERSISTENT, tcti=user)
        out = run("tpm2_evictcontrol", "-C", "o", "-c", PERSISTENT, tcti=user, ok=False)
        assert REFUSED in out.stderr.lower(), out.stderr
    finally:
        run("tpm2_evictcontrol", "-C", "o", "-c", PERSISTENT, tcti=full)
    assert PERSISTENT not in run("tpm2_getcap", "handles-persistent", tcti=full).stdout


def test_single_node_policy_user_on_the_command_line(make_daemon: type[Daemon]) -> None:
    """`serve --policy user` (no --config) serves the same profile."""
    d = make_daemon(extra=["--policy", "user"]).start()
    assert REFUSED in run("tpm2_clear", tcti=d.tcti, ok=False).stderr.lower()
    run("tpm2_getrandom", "8", "--hex", tcti=d.tcti)
    run("tpm2_pcrextend", "23:sha256=" + "55" * 32, tcti=d.tcti)

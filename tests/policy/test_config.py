"""cusetpm serve --config: errors name file, line and key; the sample config parses."""

from __future__ import annotations

from pathlib import Path

import pytest

from cusetpm.config import ConfigError, load
from cusetpm.policy import decide
from cusetpm.tpm.command import Command
from cusetpm.tpm.constants import TPM_CC, TPM_RH, TPM_ST

SAMPLE = Path(__file__).parents[2] / "udev" / "cusetpm.toml"


def test_sample_config() -> None:
    config = load(SAMPLE)
    assert [n.key for n in config.nodes] == ["tpmrm0", "tpmrm-user", "tpmrm-attest"]
    assert [n.policy.profile for n in config.nodes] == ["full", "user", "attest"]
    assert config.limits["max_spaces_per_uid"] == 64
    clear = Command(TPM_ST.SESSIONS, TPM_CC.Clear, [TPM_RH.LOCKOUT])
    assert [decide(n.policy, clear).allowed for n in config.nodes] == [True, False, False]


def test_profile_plus_allow_deny(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[[node]]\nname = "a"\nprofile = "attest"\nallow = ["Unseal"]\n'
                 'deny = ["TPM2_Quote"]\n')
    policy = load(f).nodes[0].policy
    assert decide(policy, Command(TPM_ST.SESSIONS, TPM_CC.Unseal, [0x80000001])).allowed
    assert not decide(policy, Command(TPM_ST.SESSIONS, TPM_CC.Quote, [0x80000001])).allowed


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[node]]\nname = "a"\n\n[[node]]\nname = "b"\nprofile = "admin"\n',
         ":6: profile: 'admin': one of full, user, attest"),
        ('[[node]]\nname = "a"\nallow = ["Clear", "NoSuchCommand"]\n',
         ":3: allow: 'NoSuchCommand' is not a TPM 2.0 command name"),
        ('[[node]]\nname = "a"\ncolour = "red"\n', ":3: colour: unknown node key"),
        ('[[node]]\nname = "a"\nfuse_mount = "/x"\n', ":2: name: each node needs exactly one"),
        ('[[node]]\nname = "a"\n[[node]]\nname = "a"\n', ":4: name: a is served twice"),
        ('[[node]]\nname = "a"\nmode = "rw"\n', ":3: mode: 'rw': an octal mode"),
        ('[[node]]\nname = "a"\nnv_write = [[2, 1]]\n', ":3: nv_write: a list of [first, last]"),
        ('[[node]]\nname = "a"\nmin_pcr = 40\n', ":3: min_pcr: a PCR index 0..32"),
        ('[limits]\nmax_sessions = 0\n[[node]]\nname = "a"\n',
         ":2: max_sessions: a whole number of at least 1"),
        ('[[node]]\nname = "a"\nprofile = \n', "Invalid value (at line 3, column 11)"),
        ('control = "/run/c"\n', ":1: node: at least one [[node]]"),
    ],
)
def test_errors_name_file_line_and_key(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load(f)
    assert str(err.value).startswith(str(f)), err.value
    assert message in str(err.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        load(tmp_path / "none.toml")


def test_node_limits(tmp_path: Path) -> None:
    from cusetpm.rm.quotas import NO_LIMITS, NodeLimits

    f = tmp_path / "c.toml"
    f.write_text('[limits]\nmax_objects_per_uid = 8\n\n'
                 '[[node]]\nname = "a"\nlimits = { sessions_per_uid = 4 }\n\n'
                 '[[node]]\nname = "b"\nprofile = "user"\n\n[node.limits]\nspaces = 16\n'
                 'objects = 32\n\n[[node]]\nname = "c"\n')
    config = load(f)
    assert config.limits == {"max_objects_per_uid": 8}
    assert [n.limits for n in config.nodes] == [
        NodeLimits(sessions_per_uid=4), NodeLimits(spaces=16, objects=32), NO_LIMITS]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[node]]\nname = "a"\n[node.limits]\nspaces = 1\nsessoins = 2\n',
         ":5: sessoins: unknown node limit"),
        ('[[node]]\nname = "a"\nlimits = { objects = 0 }\n',
         ":3: objects: a whole number of at least 1"),
        ('[[node]]\nname = "a"\nlimits = 3\n', ":3: limits: a table"),
    ],
)
def test_node_limit_errors(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load(f)

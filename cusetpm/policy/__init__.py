"""What a node may do: pure decisions on parsed commands (imports only cusetpm.tpm)."""

from cusetpm.policy.decide import Decision, NodePolicy, decide
from cusetpm.policy.profiles import PROFILES, Rule, profile_rules

__all__ = ["PROFILES", "Decision", "NodePolicy", "Rule", "decide", "profile_rules"]

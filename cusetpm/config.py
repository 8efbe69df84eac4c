"""`cusetpm serve --config FILE`: the nodes one daemon serves, from TOML, as dataclasses.

Every error names the file, the line and the key; load() reads the whole file before anything
is served, so a file with one bad node serves none (and on SIGHUP leaves the running config as
it was). All nodes share one RM and one TPM.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cusetpm.policy import PROFILES, NodePolicy
from cusetpm.policy.decide import HIERARCHIES, Range
from cusetpm.rm.quotas import NO_LIMITS, NODE_LIMIT_KEYS, NodeLimits
from cusetpm.tpm.constants import TPM_CC

NODE_KEYS = frozenset({
    "name", "fuse_mount", "mode", "user", "group", "profile", "allow", "deny",
    "hierarchies", "min_pcr", "nv_write", "nv_define", "persistent", "limits",
})
# [limits]: RMConfig fields. max_objects/max_sessions are per space; *_per_uid over every node
LIMIT_KEYS = frozenset({"max_objects", "max_sessions", "max_spaces", "max_spaces_per_uid",
                        "max_objects_per_uid", "max_sessions_per_uid"})
TOP_KEYS = frozenset({"node", "limits", "control"})


class ConfigError(Exception):
    """FILE:LINE: key: what is wrong."""


@dataclass(frozen=True)
class NodeConfig:
    name: str | None  # CUSE /dev/NAME; or
    fuse_mount: str | None  # DIR/tpmrm0 on a FUSE mount
    mode: str | None
    user: str | None
    group: str | None
    policy: NodePolicy
    limits: NodeLimits = NO_LIMITS  # [node.limits]: quotas of the node (rm/quotas.py)

    @property
    def key(self) -> str:
        """What identifies the node across a SIGHUP (its path)."""
        return self.name if self.name is not None else f"{self.fuse_mount}/tpmrm0"


@dataclass(frozen=True)
class DaemonConfig:
    path: str
    nodes: list[NodeConfig]
    limits: dict[str, int] = field(default_factory=dict)  # RMConfig fields
    control: str | None = None


class _Where:
    """Finds the line of a key in the file's text (tomllib gives values, not positions)."""

    def __init__(self, path: str, text: str):
        self.path = path
        self.lines = text.splitlines()
        self.headers = [i for i, line in enumerate(self.lines)
                        if re.match(r"\s*\[\[\s*node\s*\]\]", line)]

    def line(self, key: str, node: int | None = None, table: str | None = None) -> int:
        start, end = 0, len(self.lines)
        if node is not None and node < len(self.headers):
            start = self.headers[node]
            # up to the next table that is not one of this node's ([node.limits])
            end = next((i for i in range(start + 1, len(self.lines))
                        if re.match(r"\s*\[", self.lines[i])
                        and not re.match(r"\s*\[\s*node\s*\.", self.lines[i])),
                       len(self.lines))
        elif table is not None:
            start = next((i for i, line in enumerate(self.lines)
                          if re.match(rf"\s*\[\s*{table}\s*\]", line)), 0)
        for i in range(start, end):
            if re.match(rf"\s*{re.escape(key)}\s*=", self.lines[i]):
                return i + 1
        for i in range(start, end):  # a key of an inline table: limits = { objects = 0 }
            if re.search(rf"[{{,]\s*{re.escape(key)}\s*=", self.lines[i]):
                return i + 1
        return start + 1

    def error(self, key: str, message: str, node: int | None = None,
              table: str | None = None) -> ConfigError:
        return ConfigError(f"{self.path}:{self.line(key, node, table)}: {key}: {message}")


def load(path: str | Path) -> DaemonConfig:
    """Parse and check the whole file; ConfigError on the first problem."""
    path = str(path)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror or e}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    where = _Where(path, text)
    for key in data:
        if key not in TOP_KEYS:
            raise where.error(key, f"unknown key (known: {', '.join(sorted(TOP_KEYS))})")
    nodes_raw = data.get("node", [])
    if not isinstance(nodes_raw, list) or not nodes_raw:
        raise ConfigError(f"{path}:1: node: at least one [[node]] table is needed")
    nodes = [_node(where, i, raw) for i, raw in enumerate(nodes_raw)]
    keys = [n.key for n in nodes]
    for i, key in enumerate(keys):
        if key in keys[:i]:
            raise where.error("name" if nodes[i].name else "fuse_mount",
                              f"{key} is served twice", node=i)
    limits = _limits(where, data.get("limits", {}))
    control = data.get("control")
    if control is not None and not isinstance(control, str):
        raise where.error("control", "a path (string)")
    return DaemonConfig(path=path, nodes=nodes, limits=limits, control=control)


def _limits(where: _Where, raw: Any) -> dict[str, int]:
    if not isinstance(raw, dict):
        raise where.error("limits", "a table")
    for key, value in raw.items():
        if key not in LIMIT_KEYS:
            raise where.error(key, f"unknown limit (known: {', '.join(sorted(LIMIT_KEYS))})",
                              table="limits")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise where.error(key, f"a whole number of at least 1, not {value!r}", table="limits")
    return dict(raw)


def _string(where: _Where, i: int, raw: dict[str, Any], key: str) -> str | None:
    value = raw.get(key)
    if value is not None and not isinstance(value, str):
        raise where.error(key, f"a string, not {value!r}", node=i)
    return value


def _codes(where: _Where, i: int, raw: dict[str, Any], key: str) -> tuple[int, ...]:
    names = raw.get(key, [])
    if not isinstance(names, list):
        raise where.error(key, "a list of command names, like [\"NV_DefineSpace\"]", node=i)
    codes = []
    for name in names:
        if isinstance(name, int):
            codes.append(name)
            continue
        try:
            codes.append(int(TPM_CC[str(name).removeprefix("TPM_CC_").removeprefix("TPM2_")]))
        except KeyError:
            raise where.error(key, f"{name!r} is not a TPM 2.0 command name", node=i) from None
    return tuple(codes)


def _ranges(where: _Where, i: int, raw: dict[str, Any], key: str) -> tuple[Range, ...] | None:
    value = raw.get(key)
    if value is None:
        return None
    ok = isinstance(value, list) and all(
        isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) for x in r)
        and r[0] <= r[1] for r in value)
    if not ok:
        raise where.error(key, "a list of [first, last] handle pairs, like "
                          "[[0x01800000, 0x01BFFFFF]]", node=i)
    return tuple((r[0], r[1]) for r in value)


def _node(where: _Where, i: int, raw: Any) -> NodeConfig:
    for key in raw:
        if key not in NODE_KEYS:
            raise where.error(key, f"unknown node key (known: {', '.join(sorted(NODE_KEYS))})",
                              node=i)
    name, mount = _string(where, i, raw, "name"), _string(where, i, raw, "fuse_mount")
    if (name is None) == (mount is None):
        raise where.error("name", "each node needs exactly one of name (CUSE) or fuse_mount",
                          node=i)
    if name is not None and (not name or "/" in name or name in (".", "..")):
        raise where.error("name", f"{name!r}: a device name, like tpmrm1", node=i)
    mode = _string(where, i, raw, "mode")
    if mode is not None and not re.fullmatch(r"0?[0-7]{3}", mode):
        raise where.error("mode", f"{mode!r}: an octal mode like \"0660\"", node=i)
    profile = _string(where, i, raw, "profile") or "full"
    if profile not in PROFILES:
        raise where.error("profile", f"{profile!r}: one of {', '.join(PROFILES)}", node=i)
    hierarchies = raw.get("hierarchies")
    if hierarchies is not None and (not isinstance(hierarchies, list)
                                    or any(h not in HIERARCHIES for h in hierarchies)):
        raise where.error("hierarchies", f"a list of {', '.join(HIERARCHIES)}", node=i)
    min_pcr = raw.get("min_pcr")
    if min_pcr is not None and (isinstance(min_pcr, bool) or not isinstance(min_pcr, int)
                                or not 0 <= min_pcr <= 32):
        raise where.error("min_pcr", f"a PCR index 0..32, not {min_pcr!r}", node=i)
    policy = NodePolicy.from_profile(
        profile,
        allow=_codes(where, i, raw, "allow"),
        deny=_codes(where, i, raw, "deny"),
        hierarchies=tuple(hierarchies) if hierarchies is not None else None,
        min_pcr=min_pcr,
        nv_write=_ranges(where, i, raw, "nv_write"),
        nv_define=_ranges(where, i, raw, "nv_define"),
        persistent=_ranges(where, i, raw, "persistent"),
    )
    return NodeConfig(name=name, fuse_mount=mount, mode=mode,
                      user=_string(where, i, raw, "user"), group=_string(where, i, raw, "group"),
                      policy=policy, limits=_node_limits(where, i, raw.get("limits", {})))


def _node_limits(where: _Where, i: int, raw: Any) -> NodeLimits:
    if not isinstance(raw, dict):
        raise where.error("limits", "a table, like limits = { sessions_per_uid = 4 }", node=i)
    for key, value in raw.items():
        if key not in NODE_LIMIT_KEYS:
            raise where.error(key, f"unknown node limit (known: "
                              f"{', '.join(sorted(NODE_LIMIT_KEYS))})", node=i)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise where.error(key, f"a whole number of at least 1, not {value!r}", node=i)
    return NodeLimits(**raw)

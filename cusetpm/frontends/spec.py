"""Where a node appears; shared by the daemon and the native session (no native imports)."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class NodeSpec:
    """Where the node appears: a CUSE device /dev/<name>, or <mountpoint>/tpmrm0."""

    cuse_name: str | None = None
    fuse_mount: str | None = None
    mode: int = 0o600
    uid: int = 0
    gid: int = 0

    @property
    def path(self) -> str:
        if self.cuse_name is not None:
            return f"/dev/{self.cuse_name}"
        assert self.fuse_mount is not None
        return os.path.join(self.fuse_mount, "tpmrm0")

    @property
    def kind(self) -> str:
        return "CUSE" if self.cuse_name is not None else "FUSE"

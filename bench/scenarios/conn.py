"""Where the scenarios send commands: a device node, or tpm2-abrmd through its TCTI.

A :class:`Target` names one system under test (``kernel``, ``cusetpm-CUSE``,
``cusetpm-FUSE``, ``tpm2-abrmd``) and how to reach it: a node path for raw
file I/O, and a TCTI string for tpm2-tools. It is JSON-able, so a scenario can
hand it to a child process (cleanup after SIGKILL, continuation across processes).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

MAX_RESPONSE = 4096


@dataclass(frozen=True)
class Target:
    system: str
    node: str | None = None  # a device node: raw file semantics are testable
    tcti: str = ""  # for tpm2-tools (TPM2TOOLS_TCTI)
    env: dict[str, str] = field(default_factory=dict)  # e.g. DBUS_SESSION_BUS_ADDRESS

    @property
    def is_node(self) -> bool:
        return self.node is not None

    def open(self, nonblock: bool = False) -> Conn:
        if self.node is not None:
            return NodeConn(self.node, nonblock)
        return TctiConn(self.tcti, self.env)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Target:
        data: dict[str, Any] = json.loads(text)
        return cls(**data)


class Conn:
    """One connection = one space. ``transact`` raises OSError for an RM errno."""

    def transact(self, command: bytes) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NodeConn(Conn):
    def __init__(self, node: str, nonblock: bool = False) -> None:
        self.fd = os.open(node, os.O_RDWR | (os.O_NONBLOCK if nonblock else 0))

    def transact(self, command: bytes) -> bytes:
        # The kernel's write runs the command (blocking mode), read returns it whole.
        os.write(self.fd, command)
        return os.read(self.fd, MAX_RESPONSE)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class TctiConn(Conn):
    """A TCTI connection through tpm2-pytss (used for tpm2-abrmd: one connection per
    instance, like one open file on a node). Imported lazily: tpm2-pytss is slow to load."""

    def __init__(self, tcti: str, env: dict[str, str]) -> None:
        os.environ.update(env)  # the tabrmd TCTI reads DBUS_SESSION_BUS_ADDRESS
        from tpm2_pytss import TCTILdr

        name, _, conf = tcti.partition(":")
        self.tcti: Any = TCTILdr(name, conf)

    def transact(self, command: bytes) -> bytes:
        self.tcti.transmit(command)
        return bytes(self.tcti.receive(MAX_RESPONSE, -1))

    def close(self) -> None:
        if self.tcti is not None:
            self.tcti.finalize()
            self.tcti = None

"""Claiming a session token through a space, for quota and policy tests."""

from __future__ import annotations

from cusetpm.rm.continuation import RC_STALE_TOKEN
from cusetpm.tpm import commands as build
from tests.rm.client import RawClient

RC_STALE = RC_STALE_TOKEN


def claim_rc(client: RawClient, blob: bytes) -> int:
    """The response code of ContextLoad of a token blob."""
    return int.from_bytes(client.send(build.context_load_raw(blob))[6:10], "big")

"""Helpers of the malformed-input tests: fix up headers, parse-or-refuse with exactness."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from cusetpm.tpm.command import Command, parse_command
from cusetpm.tpm.errors import TPMParseError
from cusetpm.tpm.response import Response, parse_response


def with_size(buf: bytes, size: int | None = None) -> bytes:
    """buf with its header's size field set (to its own length unless told)."""
    if len(buf) < 6:
        return buf
    return buf[:2] + struct.pack(">I", len(buf) if size is None else size) + buf[6:]


def with_tag(buf: bytes, tag: int) -> bytes:
    return struct.pack(">H", tag) + buf[2:]


def parse_or_none(parse: Callable[[], Any]) -> Any:
    """The parser's result, or None if it raised TPMParseError (any other exception fails)."""
    try:
        return parse()
    except TPMParseError:
        return None


def check_command(buf: bytes, handle_count: int) -> Command | None:
    cmd = parse_or_none(lambda: parse_command(buf, handle_count))
    if cmd is not None:
        assert len(cmd.handles) == handle_count
        assert cmd.to_bytes() == buf
    return cmd


def check_response(buf: bytes, has_handle: bool) -> Response | None:
    resp = parse_or_none(lambda: parse_response(buf, has_handle))
    if resp is not None:
        assert resp.to_bytes() == buf
        assert (resp.handle is not None) == (has_handle and resp.responseCode == 0)
    return resp

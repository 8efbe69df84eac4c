"""Raw TPM 2.0 I/O on a device node, the way tpm2-tss's device TCTI does it.

Deliberately independent of ``cusetpm.tpm`` so a guest test checks the node,
not the project's own marshalling.
"""

from __future__ import annotations

import os
import struct

TPM_ST_NO_SESSIONS = 0x8001
TPM_CC_GETRANDOM = 0x0000017B
HEADER = struct.Struct(">HII")  # tag, size, command code / response code
MAX_RESPONSE = 4096


def getrandom_command(count: int) -> bytes:
    """TPM2_GetRandom(bytesRequested=count)."""
    body = struct.pack(">H", count)
    return HEADER.pack(TPM_ST_NO_SESSIONS, HEADER.size + len(body), TPM_CC_GETRANDOM) + body


def transact(node: str, command: bytes) -> bytes:
    """One write of ``command`` and one read of the whole response on a fresh descriptor."""
    fd = os.open(node, os.O_RDWR)
    try:
        written = os.write(fd, command)
        if written != len(command):
            raise OSError(f"short write to {node}: {written} of {len(command)} bytes")
        return os.read(fd, MAX_RESPONSE)
    finally:
        os.close(fd)


def parse_getrandom_response(response: bytes) -> bytes:
    """The random bytes of a successful TPM2_GetRandom response; AssertionError otherwise."""
    assert len(response) >= HEADER.size, f"response too short: {response.hex()}"
    tag, size, rc = HEADER.unpack_from(response)
    assert rc == 0, f"TPM2_GetRandom failed: rc {rc:#010x} ({response.hex()})"
    assert tag == TPM_ST_NO_SESSIONS, f"unexpected tag {tag:#06x}"
    assert size == len(response), f"header size {size} != {len(response)} bytes read"
    (count,) = struct.unpack_from(">H", response, HEADER.size)
    data = response[HEADER.size + 2 :]
    assert len(data) == count, f"TPM2B size {count} != {len(data)} bytes"
    return data

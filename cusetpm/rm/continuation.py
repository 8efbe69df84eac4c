"""Session continuation: a client's saved session is a token; the RM keeps the real context.

tpm2-tools runs one process per step (startauthsession -S s.ctx, then policy*, then the
command using it), so a session saved by one descriptor must be loadable by another.
The client gets a TPMS_CONTEXT whose blob is an unguessable token: holding it is the right
to load the session. The RM keeps the TPM's real context and can save it again at will
(regapping) without the client's copy going stale.
"""

from __future__ import annotations

import secrets

from cusetpm.rm.sessions import SessionEntry
from cusetpm.tpm.constants import TPM_RH
from cusetpm.tpm.rc import RC_P, TPM_RC, rm_rc
from cusetpm.tpm.structures import TPMS_CONTEXT

TOKEN_MAGIC = b"cusetpm session\0"
TOKEN_SIZE = len(TOKEN_MAGIC) + 32

# ContextLoad of a token whose session is gone (loaded already, flushed, evicted, or from an
# earlier run of the daemon): TPM_RC_HANDLE for parameter 1, in the resource manager's layer.
RC_STALE_TOKEN = rm_rc(TPM_RC.HANDLE | RC_P | 1 << 8)


def new_token() -> bytes:
    return TOKEN_MAGIC + secrets.token_bytes(TOKEN_SIZE - len(TOKEN_MAGIC))


def token_context(entry: SessionEntry, token: bytes) -> bytes:
    """The TPMS_CONTEXT the client gets: the real sequence and handle, a token as the blob."""
    sequence = entry.sequence if entry.context is not None else 0
    return TPMS_CONTEXT(sequence, entry.handle, TPM_RH.NULL, token).to_bytes()


def token_of(context: bytes) -> bytes | None:
    """The token inside a client's ContextLoad parameter, if it carries one of ours."""
    try:
        parsed = TPMS_CONTEXT.from_bytes(context)
    except ValueError:
        return None
    blob = parsed.contextBlob
    return blob if len(blob) == TOKEN_SIZE and blob.startswith(TOKEN_MAGIC) else None

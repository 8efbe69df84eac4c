"""The TPM's own command list (TPM_CAP_COMMANDS): which codes exist, how many handles each has."""

from __future__ import annotations

from collections.abc import Callable

from cusetpm.tpm import commands as build
from cusetpm.tpm.constants import TPM_CAP, TPM_CC, TPM_CC_FIRST, TPMA_CC

MAX_PAGES = 64  # a TPM with more pages than this is broken; stop rather than loop


class CommandTable:
    """TPMA_CC per command code, read once from the TPM."""

    def __init__(self, attributes: list[TPMA_CC]):
        self._by_code = {a.command_code: a for a in attributes}

    @classmethod
    def read(cls, transmit: Callable[[bytes], bytes]) -> CommandTable:
        entries: list[TPMA_CC] = []
        start: int = TPM_CC_FIRST
        for _ in range(MAX_PAGES):
            more, data = build.parse_get_capability(
                transmit(build.get_capability(TPM_CAP.COMMANDS, start, 256))
            )
            entries.extend(data.commands)
            if not more or not data.commands:
                break
            start = data.commands[-1].command_code + 1
        return cls(entries)

    def lookup(self, code: int) -> TPMA_CC | None:
        return self._by_code.get(code)

    def __contains__(self, code: int) -> bool:
        return code in self._by_code

    def __len__(self) -> int:
        return len(self._by_code)


# Commands whose new handle is a session rather than an object.
SESSION_CREATING = frozenset({TPM_CC.StartAuthSession})

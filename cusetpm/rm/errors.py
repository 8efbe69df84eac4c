"""Errors the resource manager reports as an errno (the kernel's /dev/tpmrm0 convention)."""

from __future__ import annotations

import errno
import os


class RMError(OSError):
    """A command or space operation refused or failed with an errno, like the kernel's RM.

    TPM-style refusals (unknown command code, limits) are *responses*, not RMErrors.
    """

    def __init__(self, err: int, reason: str):
        super().__init__(err, f"{os.strerror(err)}: {reason}")
        self.reason = reason


def foreign_handle(handle: int, where: str) -> RMError:
    return RMError(errno.EINVAL, f"handle 0x{handle:08x} in the {where} is not in this space")

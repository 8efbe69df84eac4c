"""The interface every backend implements, and the one exception it raises.

A backend moves one TPM command to a TPM and brings its response back. It knows
nothing of the TPM wire format beyond the 10-byte header (tag, size, code): the
size tells it where a response ends, and it checks that size against what came
back so a torn or padded response never reaches the resource manager.
"""

from __future__ import annotations

import abc
import struct
from types import TracebackType
from typing import Self

HEADER_SIZE = 10
# tag (u16), size (u32), command or response code (u32), all big-endian.
_HEADER = struct.Struct(">HII")


class BackendError(Exception):
    """A transport failure: the TPM could not be reached or answered nonsense.

    TPM error codes are not BackendErrors; they are ordinary responses.
    """


def header_size(name: str, data: bytes | bytearray | memoryview) -> int:
    """The size field of a command or response header; BackendError if too short."""
    if len(data) < HEADER_SIZE:
        raise BackendError(f"{name}: response of {len(data)} bytes is shorter than a header")
    return int(_HEADER.unpack_from(data)[1])


def check_response(name: str, response: bytes) -> bytes:
    """Return response unchanged if its header's size matches its length."""
    size = header_size(name, response)
    if size != len(response):
        raise BackendError(
            f"{name}: response header says {size} bytes but {len(response)} arrived"
        )
    return response


def response_code(response: bytes) -> int:
    """The response code of a well-formed response."""
    return int(_HEADER.unpack_from(response)[2])


class Backend(abc.ABC):
    """One TPM. Called from one worker thread at a time, except cancel()."""

    name: str
    # Others may use the same TPM (a kernel /dev/tpmN: its /dev/tpmrmN spaces, trusted keys):
    # the RM leaves slots free for them between commands (--keep-free-*).
    shared: bool = False
    # Whether transmit may reconnect a transport it found dropped, by itself. The RM turns
    # this off (rm/backendstate.py): after a reconnect it must first ask the TPM whether it
    # restarted, so it reconnects through reopen() only.
    auto_reconnect: bool = True

    @abc.abstractmethod
    def transmit(self, command: bytes) -> bytes:
        """Send one TPM command, return its response (length checked)."""

    @abc.abstractmethod
    def cancel(self) -> None:
        """Ask the TPM to cancel the running command. Safe from another thread."""

    def reopen(self) -> None:
        """Reconnect the transport after a failure; BackendError if the TPM is still out of
        reach. Whether the TPM behind it restarted is the caller's question (a TPM command
        answers it). The default has nothing to reconnect: an in-process TPM cannot go away,
        and a wrapper's inner backend is the one to ask."""
        return

    @abc.abstractmethod
    def close(self) -> None:
        """Release the TPM. Idempotent."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

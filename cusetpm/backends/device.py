"""A kernel TPM character device (/dev/tpmN, /dev/tpmrmN) or anything like one.

The kernel's protocol: write the whole command in one write(), then read() the
response. A read with a buffer at least as large as the response returns all of
it at once; older kernels drop whatever a short read leaves behind, so the first
read asks for a full buffer rather than for the header alone. Stand-ins (a pty, a
pipe) may hand the response over in pieces: keep reading until the header's size.
"""

from __future__ import annotations

import logging
import os

from .base import HEADER_SIZE, Backend, BackendError, check_response, header_size

log = logging.getLogger(__name__)

# Larger than any TPM response (TPM2 buffers are 4 KiB, some firmware 8 KiB).
_READ_SIZE = 65536


class DeviceBackend(Backend):
    """A TPM reached through read/write on a device node."""

    shared = True  # the kernel and its /dev/tpmrmN users share the chip

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.name = f"device:{self.path}"
        self._fd = -1
        self._closed = False
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as e:
            raise BackendError(f"{self.name}: cannot open: {e}") from e

    def transmit(self, command: bytes) -> bytes:
        if self._fd < 0:
            what = "closed" if self._closed else "lost and not reopened"
            raise BackendError(f"{self.name}: transmit on a backend {what}")
        try:
            self._write_all(command)
            return self._read_response()
        except OSError as e:
            raise BackendError(f"{self.name}: {e}") from e

    def _write_all(self, command: bytes) -> None:
        view = memoryview(command)
        while view:
            n = os.write(self._fd, view)
            if n <= 0:
                raise BackendError(f"{self.name}: write accepted nothing")
            view = view[n:]

    def _read_response(self) -> bytes:
        data = os.read(self._fd, _READ_SIZE)
        while len(data) < HEADER_SIZE:
            data += self._read_more(_READ_SIZE)
        size = header_size(self.name, data)
        if size < HEADER_SIZE:
            raise BackendError(f"{self.name}: response header claims {size} bytes")
        while len(data) < size:
            data += self._read_more(size - len(data))
        return check_response(self.name, data)

    def _read_more(self, n: int) -> bytes:
        chunk = os.read(self._fd, n)
        if not chunk:
            raise BackendError(f"{self.name}: end of file in the middle of a response")
        return chunk

    def reopen(self) -> None:
        """Close and open the node again (a vtpm-proxy chip comes back under the same name
        when its swtpm is restarted; a hardware TPM's driver may have been reloaded)."""
        if self._closed:
            raise BackendError(f"{self.name}: reopen of a closed backend")
        self._close_fd()
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as e:
            raise BackendError(f"{self.name}: cannot reopen: {e}") from e

    def cancel(self) -> None:
        # The kernel offers user space no cancel for TPM 2.0 devices (the sysfs
        # "cancel" attribute exists only for TPM 1.2); the command runs to its end.
        log.debug("%s: cancel is not supported by kernel TPM devices", self.name)

    def close(self) -> None:
        self._closed = True
        self._close_fd()

    def _close_fd(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

"""TPM state blobs in a directory, in swtpm's on-disk format.

Using swtpm's format means a state directory can move between cusetpm's embedded
libtpms and a `swtpm --tpmstate dir=...` in both directions.

File ``tpm2-00.<name>`` (name: permall, volatilestate, savestate) holds:

    header (10 bytes, big-endian):
        u8 version (2), u8 min_version (1), u16 hdrsize (10), u16 flags, u32 totlen
    then, for version 2, TLVs:  u16 tag | u32 length | value

totlen is the whole file: header plus everything after it. The libtpms blob is the
value of the TAG_DATA (1) TLV. Version 1 files carry the blob right after the
header with no TLV. Encrypted state (a swtpm --key) is refused: cusetpm has no key.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_BLOB_HEADER = struct.Struct(">BBHHI")
_TLV_HEADER = struct.Struct(">HI")
_VERSION = 2
_MIN_VERSION = 1
_TAG_DATA = 1
_FLAG_ENCRYPTED = 0x01

NAMES = ("permall", "volatilestate", "savestate")

LOCK_FILE = ".lock"
# struct flock on Linux x86-64/aarch64: short l_type, short l_whence, off_t l_start,
# off_t l_len, pid_t l_pid (padded to 32 bytes).
_FLOCK = struct.Struct("hhxxxxqqixxxx")


class StateFormatError(ValueError):
    """A state file exists but is not something we can read."""


class StateDirLocked(OSError):
    """Another process (a cusetpm, a swtpm) holds the state directory's lock."""


def _holder(fd: int) -> str:
    """Who holds a conflicting lock on fd's file: "swtpm (pid 123)", or "" if unknown."""
    try:
        probe = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        l_type, _, _, _, pid = _FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_GETLK, probe))
    except OSError:
        return ""
    if l_type == fcntl.F_UNLCK or pid <= 0:
        return ""
    try:
        comm = open(f"/proc/{pid}/comm").read().strip()  # noqa: SIM115 - one read
    except OSError:
        comm = "process"
    return f"{comm} (pid {pid})"


@dataclass
class StateLock:
    """swtpm's exclusive lock on DIR/.lock, taken the way swtpm takes it.

    swtpm (SWTPM_NVRAM_Lock_Lockfile) opens DIR/.lock and puts a POSIX record lock
    (fcntl F_SETLK, F_WRLCK, whole file) on it for its whole life. cusetpm does exactly
    the same, so a cusetpm and a swtpm, or two of either, never run one state directory at
    once; the kernel drops the lock when the holder dies, even by SIGKILL. A POSIX lock
    belongs to the process and goes away when *any* descriptor of the file is closed in it:
    nothing else in cusetpm opens .lock.
    """

    path: Path
    fd: int = -1

    @classmethod
    def acquire(cls, directory: Path) -> StateLock:
        path = Path(directory) / LOCK_FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o660)
        try:
            fcntl.fcntl(fd, fcntl.F_SETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
        except OSError as e:
            holder = _holder(fd) if e.errno in (errno.EACCES, errno.EAGAIN) else ""
            os.close(fd)
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            by = f" by {holder}" if holder else " by another process"
            raise StateDirLocked(
                e.errno,
                f"state directory {directory} is in use{by} (it holds {path}): a second "
                "TPM on the same state would overwrite the first one's NV; stop it or "
                "choose another --state-dir",
            ) from None
        log.debug("locked %s", path)
        return cls(path, fd)

    def release(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)  # closing the descriptor drops the POSIX lock


def file_name(name: str, tpm_number: int = 0) -> str:
    """swtpm's name for a TPM 2 state blob."""
    return f"tpm2-{tpm_number:02x}.{name}"


def encode(blob: bytes) -> bytes:
    """A libtpms blob as the contents of a swtpm state file."""
    body = _TLV_HEADER.pack(_TAG_DATA, len(blob)) + blob
    total = _BLOB_HEADER.size + len(body)
    return _BLOB_HEADER.pack(_VERSION, _MIN_VERSION, _BLOB_HEADER.size, 0, total) + body


def decode(data: bytes) -> bytes:
    """The libtpms blob inside a swtpm state file."""
    if len(data) < _BLOB_HEADER.size:
        raise StateFormatError(f"{len(data)} bytes is too short for a state header")
    version, min_version, hdrsize, flags, total = _BLOB_HEADER.unpack_from(data)
    if total != len(data):
        raise StateFormatError(f"header totlen {total} but the file has {len(data)} bytes")
    if min_version > _VERSION:
        raise StateFormatError(f"state needs format version {min_version}, we know {_VERSION}")
    if hdrsize != _BLOB_HEADER.size:
        raise StateFormatError(f"header size {hdrsize}, expected {_BLOB_HEADER.size}")
    if flags & _FLAG_ENCRYPTED:
        raise StateFormatError("state is encrypted (swtpm --key); cusetpm cannot read it")
    if version < 2:
        return data[hdrsize:]
    return _find_tlv(data, hdrsize, _TAG_DATA)


def _find_tlv(data: bytes, offset: int, tag: int) -> bytes:
    while offset + _TLV_HEADER.size <= len(data):
        t, length = _TLV_HEADER.unpack_from(data, offset)
        start = offset + _TLV_HEADER.size
        if start + length > len(data):
            raise StateFormatError(f"TLV tag {t} runs past the end of the file")
        if t == tag:
            return data[start : start + length]
        offset = start + length
    raise StateFormatError(f"no TLV with tag {tag}")


@dataclass
class StateDir:
    """One TPM's state directory."""

    path: Path
    tpm_number: int = 0

    def __post_init__(self) -> None:
        self.path = Path(self.path)

    def file(self, name: str) -> Path:
        return self.path / file_name(name, self.tpm_number)

    def exists(self, name: str) -> bool:
        return self.file(name).exists()

    def load(self, name: str) -> bytes | None:
        """The blob stored under name, or None if there is none."""
        try:
            data = self.file(name).read_bytes()
        except FileNotFoundError:
            return None
        return decode(data)

    def store(self, name: str, blob: bytes) -> None:
        """Write atomically: a crash leaves the old file or the new one, never half."""
        final = self.file(name)
        tmp = self.path / f"TMP2-{self.tpm_number:02x}.{name}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "wb") as f:
            f.write(encode(blob))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        self._sync_dir()

    def delete(self, name: str, must_exist: bool = False) -> None:
        try:
            self.file(name).unlink()
        except FileNotFoundError:
            if must_exist:
                raise
            return
        self._sync_dir()

    def _sync_dir(self) -> None:
        # The rename/unlink is durable only once the directory entry is on disk.
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with contextlib.suppress(OSError):
                os.fsync(fd)
        finally:
            os.close(fd)

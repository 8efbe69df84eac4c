"""Big-endian readers and writers for TPM 2.0 basic types (Part 2 section 5 and TPM2B)."""

from __future__ import annotations

import struct

from cusetpm.tpm.errors import TruncatedError

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


class Reader:
    """Reads fields from a buffer, raising TruncatedError instead of IndexError."""

    __slots__ = ("buf", "end", "pos")

    def __init__(self, buf: bytes | bytearray | memoryview, pos: int = 0, end: int | None = None):
        self.buf = bytes(buf)
        self.pos = pos
        self.end = len(self.buf) if end is None else end

    def remaining(self) -> int:
        return self.end - self.pos

    def _need(self, n: int, what: str) -> int:
        if self.pos + n > self.end:
            raise TruncatedError(
                f"{what}: need {n} bytes at offset {self.pos}, only {self.end - self.pos} left"
            )
        start = self.pos
        self.pos += n
        return start

    def u8(self, what: str = "UINT8") -> int:
        return self.buf[self._need(1, what)]

    def u16(self, what: str = "UINT16") -> int:
        return int(_U16.unpack_from(self.buf, self._need(2, what))[0])

    def u32(self, what: str = "UINT32") -> int:
        return int(_U32.unpack_from(self.buf, self._need(4, what))[0])

    def u64(self, what: str = "UINT64") -> int:
        return int(_U64.unpack_from(self.buf, self._need(8, what))[0])

    def raw(self, n: int, what: str = "bytes") -> bytes:
        start = self._need(n, what)
        return self.buf[start : start + n]

    def tpm2b(self, what: str = "TPM2B") -> bytes:
        return self.raw(self.u16(f"{what}.size"), what)

    def rest(self) -> bytes:
        data = self.buf[self.pos : self.end]
        self.pos = self.end
        return data


def u8(v: int) -> bytes:
    return bytes((v,))


def u16(v: int) -> bytes:
    return _U16.pack(v)


def u32(v: int) -> bytes:
    return _U32.pack(v)


def u64(v: int) -> bytes:
    return _U64.pack(v)


def tpm2b(data: bytes) -> bytes:
    return _U16.pack(len(data)) + data

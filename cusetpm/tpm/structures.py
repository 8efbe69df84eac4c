"""The TPM 2.0 structures the resource manager reads and writes itself (Part 2)."""

from __future__ import annotations

from dataclasses import dataclass, field

from cusetpm.tpm.constants import TPM_CAP, TPMA_CC
from cusetpm.tpm.errors import SizeMismatchError
from cusetpm.tpm.marshal import Reader, tpm2b, u8, u32, u64


@dataclass(frozen=True, slots=True)
class TPMS_CONTEXT:
    """A saved context (Part 2 14.5): what ContextSave returns and ContextLoad takes."""

    sequence: int
    savedHandle: int
    hierarchy: int
    contextBlob: bytes

    def to_bytes(self) -> bytes:
        return (
            u64(self.sequence)
            + u32(self.savedHandle)
            + u32(self.hierarchy)
            + tpm2b(self.contextBlob)
        )

    @classmethod
    def unmarshal(cls, reader: Reader) -> TPMS_CONTEXT:
        return cls(
            sequence=reader.u64("TPMS_CONTEXT.sequence"),
            savedHandle=reader.u32("TPMS_CONTEXT.savedHandle"),
            hierarchy=reader.u32("TPMS_CONTEXT.hierarchy"),
            contextBlob=reader.tpm2b("TPMS_CONTEXT.contextBlob"),
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> TPMS_CONTEXT:
        reader = Reader(data)
        ctx = cls.unmarshal(reader)
        if reader.remaining():
            raise SizeMismatchError(f"{reader.remaining()} bytes after TPMS_CONTEXT")
        return ctx


@dataclass(frozen=True, slots=True)
class TPMS_TAGGED_PROPERTY:
    property: int
    value: int


@dataclass(slots=True)
class TPMS_CAPABILITY_DATA:
    """GetCapability's capabilityData. Handles, commands and TPM properties are decoded; other
    capabilities keep their union bytes in `raw`."""

    capability: int
    handles: list[int] = field(default_factory=list)
    commands: list[TPMA_CC] = field(default_factory=list)
    properties: list[TPMS_TAGGED_PROPERTY] = field(default_factory=list)
    raw: bytes = b""

    def to_bytes(self) -> bytes:
        if self.capability == TPM_CAP.HANDLES:
            body = u32(len(self.handles)) + b"".join(u32(h) for h in self.handles)
        elif self.capability == TPM_CAP.COMMANDS:
            body = u32(len(self.commands)) + b"".join(u32(c.to_int()) for c in self.commands)
        elif self.capability == TPM_CAP.TPM_PROPERTIES:
            body = u32(len(self.properties)) + b"".join(
                u32(p.property) + u32(p.value) for p in self.properties
            )
        else:
            body = self.raw
        return u32(self.capability) + body

    @classmethod
    def unmarshal(cls, reader: Reader) -> TPMS_CAPABILITY_DATA:
        capability = reader.u32("capability")
        data = cls(capability=capability)
        if capability == TPM_CAP.HANDLES:
            count = _count(reader, 4, "TPML_HANDLE")
            data.handles = [reader.u32("TPM_HANDLE") for _ in range(count)]
        elif capability == TPM_CAP.COMMANDS:
            count = _count(reader, 4, "TPML_CCA")
            data.commands = [TPMA_CC.from_int(reader.u32("TPMA_CC")) for _ in range(count)]
        elif capability == TPM_CAP.TPM_PROPERTIES:
            count = _count(reader, 8, "TPML_TAGGED_TPM_PROPERTY")
            data.properties = [
                TPMS_TAGGED_PROPERTY(reader.u32("property"), reader.u32("value"))
                for _ in range(count)
            ]
        else:
            data.raw = reader.rest()
        return data


def _count(reader: Reader, item_size: int, what: str) -> int:
    count = reader.u32(f"{what}.count")
    if count * item_size > reader.remaining():
        raise SizeMismatchError(f"{what}.count {count} exceeds the {reader.remaining()} bytes left")
    return count


def pack_yes_no(value: bool) -> bytes:
    return u8(1 if value else 0)

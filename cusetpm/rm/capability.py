"""GetCapability(TPM_CAP_HANDLES) answered from the caller's own space.

The TPM's own lists say nothing useful about a space (they hold every space's contexts, or
none); the RM knows exactly what each space owns and answers for it, as the kernel does:

- transient objects: the kernel loads a space's objects in slot order into an otherwise
  empty TPM, so the TPM lists them as 0x80000000, 0x80000001, ... and the kernel maps each
  back to its virtual handle. `property` therefore counts slots, not virtual handles: the
  kernel selftest pages with count 1 and `property += 1`. The RM answers the same way: the
  space's objects in slot order (0x80FFFFFF first), starting at slot `property - 0x80000000`;
- sessions keep their physical handles: ascending by session index from `property`.

At most `propertyCount` handles, moreData when more remain.
"""

from __future__ import annotations

from cusetpm.rm.residency import Capacity
from cusetpm.rm.space import Space
from cusetpm.tpm.commands import get_capability_parameters, unmarshal_capability
from cusetpm.tpm.constants import (
    TPM_CAP,
    TPM_HEADER_SIZE,
    TPM_HR_HANDLE_MASK,
    TPM_HT,
    TPM_PT,
    TPM_ST,
    handle_type,
)
from cusetpm.tpm.errors import TPMParseError
from cusetpm.tpm.response import Response
from cusetpm.tpm.structures import TPMS_CAPABILITY_DATA, TPMS_TAGGED_PROPERTY

UINT32_MAX = 0xFFFFFFFF

# libtpms and the reference implementation cap one list at MAX_CAP_HANDLES = 254.
MAX_CAP_HANDLES = 254

LOCAL_RANGES = frozenset({TPM_HT.TRANSIENT, TPM_HT.HMAC_SESSION, TPM_HT.POLICY_SESSION})


def handles_query(parameters: bytes) -> tuple[int, int] | None:
    """(property, propertyCount) if this GetCapability asks for a range the RM answers."""
    if len(parameters) != 12:
        return None
    capability = int.from_bytes(parameters[0:4], "big")
    prop = int.from_bytes(parameters[4:8], "big")
    count = int.from_bytes(parameters[8:12], "big")
    if capability != TPM_CAP.HANDLES or handle_type(prop) not in LOCAL_RANGES:
        return None
    return prop, count


def answer_handles(space: Space, prop: int, count: int, client_saved: list[int]) -> bytes:
    """The full response to GetCapability(TPM_CAP_HANDLES, prop, count) for this space."""
    kind = handle_type(prop)
    if kind == TPM_HT.TRANSIENT:
        # Slot order: virtual handles count downward from 0x80FFFFFF.
        slots = sorted(space.objects, reverse=True)
        candidates = slots[prop & TPM_HR_HANDLE_MASK :]
    else:
        # Session lists are ordered by session index (the low 24 bits), whatever the type.
        sessions = space.sessions if kind == TPM_HT.HMAC_SESSION else client_saved
        start = prop & TPM_HR_HANDLE_MASK
        candidates = sorted(
            (h for h in sessions if h & TPM_HR_HANDLE_MASK >= start),
            key=lambda h: h & TPM_HR_HANDLE_MASK,
        )
    count = min(count, MAX_CAP_HANDLES)
    data = TPMS_CAPABILITY_DATA(capability=TPM_CAP.HANDLES, handles=candidates[:count])
    more = len(candidates) > count
    parameters = get_capability_parameters(more, data)
    return Response(TPM_ST.NO_SESSIONS, 0, parameters=parameters).to_bytes()


def rewrite_properties(response: bytes, capacity: Capacity) -> bytes:
    """TPM_PT_CONTEXT_GAP_MAX reads UINT32_MAX: this RM regaps (tpm2-abrmd's convention).

    TPM_PT_HR_TRANSIENT_AVAIL and TPM_PT_HR_LOADED_AVAIL read what the TPM had free at start,
    as a space sees it through the kernel (which empties the TPM for each command): the TPM's
    own figure would count other spaces' resident contexts."""
    try:
        more, data = unmarshal_capability(response[TPM_HEADER_SIZE:])
    except TPMParseError:
        return response
    if data.capability != TPM_CAP.TPM_PROPERTIES:
        return response
    shown: dict[int, int] = {
        TPM_PT.CONTEXT_GAP_MAX: UINT32_MAX,
        TPM_PT.HR_TRANSIENT_AVAIL: capacity.objects,
        TPM_PT.HR_LOADED_AVAIL: capacity.sessions,
    }
    changed = False
    for i, prop in enumerate(data.properties):
        value = shown.get(prop.property)
        if value is not None and value != prop.value:
            data.properties[i] = TPMS_TAGGED_PROPERTY(prop.property, value)
            changed = True
    if not changed:
        return response
    parameters = get_capability_parameters(more, data)
    return Response(TPM_ST.NO_SESSIONS, 0, parameters=parameters).to_bytes()

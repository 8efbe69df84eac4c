"""Transient objects beyond the TPM's 3 slots: many per space, many spaces, handles named twice,
client ContextSave/ContextLoad, and sequence objects that change with every command."""

from __future__ import annotations

import hashlib
import os
import random
import struct

import pytest
from tpm2_pytss import ESAPI
from tpm2_pytss.constants import TPM2_ALG, TPM2_SE, TPMA_SESSION
from tpm2_pytss.types import (
    TPM2B_PUBLIC,
    TPMS_ATTEST,
    TPMT_SIG_SCHEME,
)

from cusetpm.rm import ResourceManager
from cusetpm.tpm import commands as build
from cusetpm.tpm.constants import TPM_CAP, TPM_PT
from tests.rm.client import (
    AES_CFB,
    ALG_SHA1,
    ALG_SHA256,
    ALG_SHA384,
    RawClient,
    create_child,
    ecc_signing_template,
    ecc_storage_template,
    esapi,
    hash_sequence_start,
    load_child,
    name_of,
    sequence_complete,
    sequence_update,
    split_tpm2b,
    with_unique,
)
from tests.rm.conftest import assert_tpm_empty

# These tests check the eager discipline (nothing of a space in the TPM between commands:
# census, saved contexts, round trips); resident mode is covered by test_residency.py until
# they are rewritten to hold in both modes.
pytestmark = pytest.mark.residency("eager")

TRANSIENT_FIRST = 0x80000000
NULL_SCHEME = TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)


def transient_avail(client: RawClient) -> int:
    response = client.call(
        build.get_capability(TPM_CAP.TPM_PROPERTIES, TPM_PT.HR_TRANSIENT_AVAIL, 1)
    )
    _, data = build.unmarshal_capability(response.parameters)
    (prop,) = data.properties
    assert prop.property == TPM_PT.HR_TRANSIENT_AVAIL
    return prop.value


def public_of(client: RawClient, handle: int) -> TPM2B_PUBLIC:
    public, _ = TPM2B_PUBLIC.unmarshal(client.read_public(handle))
    return public


def new_key(client: RawClient, signing: bool) -> int:
    template = ecc_signing_template() if signing else ecc_storage_template()
    return client.create_primary(with_unique(template, os.urandom(32)))


def certify(client: RawClient, esys: ESAPI, obj: int, key: int) -> TPMS_ATTEST:
    """Certify(objectHandle=obj, signHandle=key) through the space; the signature checked
    against key's public area as read from the TPM."""
    attest, signature = esys.certify(
        esys.tr_from_tpmpublic(obj), esys.tr_from_tpmpublic(key), b"nonce", NULL_SCHEME
    )
    signature.verify_signature(public_of(client, key), bytes(attest))
    info, _ = TPMS_ATTEST.unmarshal(bytes(attest))
    return info


def test_64_objects_in_one_space_any_pair_in_one_command(client: RawClient) -> None:
    rm = client.rm
    esys = esapi(rm, client.space)
    signing = [new_key(client, signing=True) for _ in range(32)]
    storage = [new_key(client, signing=False) for _ in range(32)]
    everything = signing + storage
    assert len(set(everything)) == 64
    assert client.handles(TRANSIENT_FIRST) == (False, sorted(everything, reverse=True))
    names = {h: name_of(client, h) for h in everything}
    assert len(set(names.values())) == 64
    picks = random.Random(64)
    for _ in range(12):
        obj = picks.choice(everything)
        key = picks.choice([k for k in signing if k != obj])
        info = certify(client, esys, obj, key)
        assert bytes(info.attested.certify.name) == names[obj]
    # StartAuthSession naming two objects: salted with one, bound to another
    for _ in range(3):
        salt_key = picks.choice(storage)
        bind = picks.choice([h for h in everything if h != salt_key])
        session = esys.start_auth_session(
            esys.tr_from_tpmpublic(salt_key),
            esys.tr_from_tpmpublic(bind),
            TPM2_SE.HMAC,
            AES_CFB,
            TPM2_ALG.SHA256,
        )
        esys.trsess_set_attributes(session, TPMA_SESSION.ENCRYPT | TPMA_SESSION.CONTINUESESSION)
        # a response encrypted with the session key (salt + bind): ESAPI checks its HMAC
        assert len(esys.get_random(16, session1=session)) == 16
        esys.flush_context(session)
    assert {h: name_of(client, h) for h in everything} == names
    assert transient_avail(client) == 3
    rm.close_space(client.space)
    assert_tpm_empty(rm)


def test_children_under_one_primary(client: RawClient) -> None:
    parent = client.create_primary()
    blobs = [create_child(client, parent, ecc_signing_template()) for _ in range(4)]
    children = [load_child(client, parent, *blobs[i % 4]) for i in range(12)]
    assert len(set(children)) == 12
    for i, child in enumerate(children):
        # same blob, same Name; a child loaded from another blob differs
        assert name_of(client, child) == name_of(client, children[i % 4])
    assert len({name_of(client, c) for c in children}) == 4
    assert client.rm.tpm_census()["transient"] == []
    client.rm.close_space(client.space)
    assert_tpm_empty(client.rm)


def test_ten_spaces_twenty_objects_interleaved(rm: ResourceManager) -> None:
    clients = [RawClient(rm, rm.open_space()) for _ in range(10)]
    names: list[dict[int, bytes]] = [{} for _ in clients]
    order = random.Random(10)
    for _ in range(20):
        for i in order.sample(range(10), 10):
            handle = new_key(clients[i], signing=bool(i % 2))
            names[i][handle] = name_of(clients[i], handle)
    for client, mine in zip(clients, names, strict=True):
        assert client.handles(TRANSIENT_FIRST) == (False, sorted(mine, reverse=True))
        assert sorted(mine) == [0x80FFFFFF - k for k in range(19, -1, -1)]
    all_names = [n for mine in names for n in mine.values()]
    assert len(set(all_names)) == 200
    # read back in another interleaving
    pairs = [(i, h) for i, mine in enumerate(names) for h in mine]
    order.shuffle(pairs)
    for i, handle in pairs:
        assert name_of(clients[i], handle) == names[i][handle]
    assert transient_avail(clients[0]) == 3
    for client in clients:
        rm.close_space(client.space)
    assert_tpm_empty(rm)


def test_same_handle_twice_is_loaded_once(client: RawClient) -> None:
    rm = client.rm
    esys = esapi(rm, client.space)
    key = new_key(client, signing=True)
    storage = new_key(client, signing=False)
    key_tr = esys.tr_from_tpmpublic(key)
    storage_tr = esys.tr_from_tpmpublic(storage)
    before = rm.round_trips
    client.context_save(key)  # a command on the key alone: load, command, flush
    one_handle = rm.round_trips - before
    # Certify with objectHandle == signHandle (self-certification)
    before, retries = rm.round_trips, rm.link.stats.retries
    attest, signature = esys.certify(key_tr, key_tr, b"", NULL_SCHEME)
    # (libtpms may answer an ECDSA signature with TPM_RC_RETRY once: the RM resends it)
    twice = rm.round_trips - before - (rm.link.stats.retries - retries)
    assert twice == one_handle, (twice, one_handle)
    signature.verify_signature(public_of(client, key), bytes(attest))
    info, _ = TPMS_ATTEST.unmarshal(bytes(attest))
    assert bytes(info.attested.certify.name) == name_of(client, key)
    # StartAuthSession with tpmKey == bind
    session = esys.start_auth_session(
        storage_tr,
        storage_tr,
        TPM2_SE.HMAC,
        AES_CFB,
        TPM2_ALG.SHA256,
    )
    esys.trsess_set_attributes(session, TPMA_SESSION.ENCRYPT | TPMA_SESSION.CONTINUESESSION)
    assert len(esys.get_random(16, session1=session)) == 16
    assert rm.tpm_census()["transient"] == []
    assert transient_avail(client) == 3
    rm.close_space(client.space)
    assert_tpm_empty(rm)


def parse_context(blob: bytes) -> tuple[int, int, int, bytes]:
    sequence, saved_handle, hierarchy = struct.unpack_from(">QII", blob)
    inner, end = split_tpm2b(blob, 16)
    assert end == len(blob)
    return sequence, saved_handle, hierarchy, inner


def test_client_context_save_and_load_of_an_object(rm: ResourceManager) -> None:
    a = RawClient(rm, rm.open_space())
    b = RawClient(rm, rm.open_space())
    b.create_primary()  # b's first slot is taken
    key = new_key(a, signing=True)
    name = name_of(a, key)
    blob = a.context_save(key)
    _, saved_handle, hierarchy, inner = parse_context(blob)
    # TPM-internal savedHandle (not the virtual handle), owner hierarchy, an opaque blob
    assert saved_handle in (0x80000000, 0x80000001, 0x80000002)
    assert hierarchy == 0x40000001
    assert len(inner) > 32
    # The object itself is untouched
    assert a.handles(TRANSIENT_FIRST) == (False, [key])
    copy = a.context_load(blob)
    assert copy == 0x80FFFFFE
    assert name_of(a, copy) == name
    elsewhere = b.context_load(blob)
    assert elsewhere == 0x80FFFFFE
    assert name_of(b, elsewhere) == name
    # copies are independent objects
    a.flush(key)
    assert name_of(a, copy) == name
    again = a.context_load(blob)
    assert again == 0x80FFFFFF
    assert name_of(a, again) == name
    assert a.handles(TRANSIENT_FIRST) == (False, [0x80FFFFFF, 0x80FFFFFE])
    rm.close_space(a.space)
    assert name_of(b, elsewhere) == name
    rm.close_space(b.space)
    assert_tpm_empty(rm)


HASHES = {ALG_SHA1: "sha1", ALG_SHA256: "sha256", ALG_SHA384: "sha384"}


def test_hash_sequences_interleaved(client: RawClient) -> None:
    rm = client.rm
    chunks = random.Random(7)
    algs = [ALG_SHA256, ALG_SHA1, ALG_SHA384, ALG_SHA256, ALG_SHA256, ALG_SHA1]
    sequences = [(hash_sequence_start(client, alg), hashlib.new(HASHES[alg])) for alg in algs]
    keys = []
    for round_ in range(8):
        for seq, expected in chunks.sample(sequences, len(sequences)):
            data = os.urandom(chunks.randrange(1, 1024))
            sequence_update(client, seq, data)
            expected.update(data)
        if round_ % 3 == 0:  # other objects come and go between updates
            keys.append(new_key(client, signing=True))
    assert rm.tpm_census()["transient"] == []
    for seq, expected in sequences:
        tail = os.urandom(17)
        expected.update(tail)
        assert sequence_complete(client, seq, tail) == expected.digest()
        # a completed sequence is flushed by the TPM: it leaves the space
        assert seq not in client.handles(TRANSIENT_FIRST)[1]
    assert client.handles(TRANSIENT_FIRST) == (False, sorted(keys, reverse=True))
    assert transient_avail(client) == 3
    rm.close_space(client.space)
    assert_tpm_empty(rm)


def test_hash_sequences_in_two_spaces(rm: ResourceManager) -> None:
    a = RawClient(rm, rm.open_space())
    b = RawClient(rm, rm.open_space())
    seq_a = hash_sequence_start(a)
    seq_b = hash_sequence_start(b)
    assert seq_a == seq_b == 0x80FFFFFF  # same virtual handle, different sequences
    ha, hb = hashlib.sha256(), hashlib.sha256()
    for i in range(5):
        sequence_update(a, seq_a, b"a%d" % i)
        ha.update(b"a%d" % i)
        sequence_update(b, seq_b, b"bb%d" % i)
        hb.update(b"bb%d" % i)
    assert sequence_complete(b, seq_b) == hb.digest()
    assert sequence_complete(a, seq_a) == ha.digest()
    rm.close_space(a.space)
    rm.close_space(b.space)
    assert_tpm_empty(rm)


def test_sequence_context_saved_by_the_client(rm: ResourceManager) -> None:
    """A client's ContextSave/ContextLoad of a sequence: the loaded copy goes on from there."""
    a = RawClient(rm, rm.open_space())
    seq = hash_sequence_start(a)
    sequence_update(a, seq, b"first part, ")
    blob = a.context_save(seq)
    sequence_update(a, seq, b"original goes on")
    copy = a.context_load(blob)
    sequence_update(a, copy, b"copy goes on")
    sequence_update(a, copy, b" and on")
    assert sequence_complete(a, copy) == hashlib.sha256(b"first part, copy goes on and on").digest()
    assert sequence_complete(a, seq) == hashlib.sha256(b"first part, original goes on").digest()
    rm.close_space(a.space)
    assert_tpm_empty(rm)


def test_close_with_objects_and_sequences_leaves_nothing(rm: ResourceManager) -> None:
    clients = [RawClient(rm, rm.open_space()) for _ in range(3)]
    for c in clients:
        for _ in range(5):
            new_key(c, signing=False)
        seq = hash_sequence_start(c)
        sequence_update(c, seq, b"left open")
    for c in clients:
        rm.close_space(c.space)
    assert_tpm_empty(rm)
    assert rm.open_spaces == 0

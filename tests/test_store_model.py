"""The data model of Table 4: every type's rules, positive and negative, and the threshold reads."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
from collections.abc import Mapping
from typing import Any

import nacl.public
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from appliance.apps.store import model
from appliance.apps.store.model import (
    Client,
    DataType,
    Quorum,
    ReadRequest,
    Refused,
    StoreState,
    WriteRequest,
)
from appliance.crypto import local, tdh2
from appliance.crypto.errors import DecodeError, NotEnoughSharesError
from appliance.crypto.groups import ED25519 as G
from appliance.crypto.keyshare import KeyShare, PublicSharing
from appliance.crypto.secret import DeterministicSource
from appliance.protocols import approvals
from appliance.protocols.state import KeyEntry, KeyTable

N, T, PERIOD = 4, 1, 3
NOW = 1_800_000_000.0
APP, OTHER = "vault", "other"


class Net:
    """n servers: store-key shares, period keys in a KeyTable, each server's view (clock, verifiers)."""

    def __init__(self, n: int = N, t: int = T, seed: int = 1, quotas: model.Quotas | None = None) -> None:
        self.n, self.t = n, t
        self.rand = DeterministicSource(seed, G.order)
        self.keys: dict[int, KeyShare[bytes]] = local.run_dkg(G, n, t, self.rand).keys
        self.public: PublicSharing[bytes] = self.keys[1].public
        self.period_keys = {i: SigningKey(bytes([i]) * 32) for i in range(1, n + 1)}
        entries = {
            i: KeyEntry(bytes(k.verify_key), bytes(32), bytes(64)) for i, k in self.period_keys.items()
        }
        self.group_key = SigningKey(b"g" * 32)  # stands for Scert: it signs every KeyTable
        table = KeyTable(PERIOD, entries, {}, frozenset())
        self.table = table.signed(bytes(self.group_key.sign(table.payload()).signature))
        self.authority = model.Authority(bytes(self.group_key.verify_key), n)
        self.verifiers = {APP: b"v" * 32, OTHER: b"o" * 32}
        self.clock = [NOW] * (n + 1)
        self.views = {i: model.GroupView(self.authority, lambda i=i: self.clock[i]) for i in range(1, n + 1)}
        self.states = {i: StoreState(G, self.public.public_key, t, quotas) for i in range(1, n + 1)}

    def quorum(
        self,
        app: str,
        digest: bytes,
        voters: range | list[int] | None = None,
        verifier: bytes = b"",
        table: KeyTable | None = None,
    ) -> Quorum:
        """The certificate the approvals service makes (``approvals.store_certificate``)."""
        v = verifier or self.verifiers[app]
        table = table or self.table
        ticket = approvals.ticket(v, table.period, digest)
        rid = approvals.request_id(digest, ticket)
        voters = voters if voters is not None else range(1, self.n // 2 + 2)
        votes = {
            j: bytes(self.period_keys[j].sign(approvals.vote_payload(table.period, j, rid)).signature)
            for j in voters
        }
        return Quorum.from_obj(approvals.store_certificate(app, table, digest, ticket, votes))

    def write(self, request: WriteRequest, requester: model.Requester) -> None:
        """Apply at every server (what the agreement engine will do); they must agree."""
        for i in self.states:
            self.states[i].apply_write(request, requester, self.views[i])
        assert len({s.digest() for s in self.states.values()}) == 1

    def refused_everywhere(self, request: WriteRequest, requester: model.Requester, code: str) -> str:
        reasons = set()
        for i, state in self.states.items():
            with pytest.raises(Refused) as info:
                state.apply_write(request, requester, self.views[i])
            assert info.value.code == code, info.value.reason
            reasons.add(info.value.reason)
        return reasons.pop()

    def contribute(
        self, data_id: str, server: int, value: bytes, period: int = PERIOD
    ) -> tuple[bytes, bytes]:
        """Server ``server``'s contribution to a random joint secret, signed by its channel key
        (a certificate its period key issued), as its store node makes it."""
        from appliance.net._tls import channel_certificate_der, channel_identity, channel_sign

        ident = channel_identity(server, period, bytes([server]) * 32)
        return model.contribute(
            G,
            self.public.public_key,
            APP,
            data_id,
            1,
            server,
            value,
            period,
            channel_certificate_der(ident),
            lambda payload: channel_sign(ident, payload),
            self.rand,
        )

    def sealed(self, request: WriteRequest, plaintext: bytes, part: int = 0) -> bytes:
        return model.seal_value(G, self.public.public_key, request, plaintext, self.rand, part)

    def shares(
        self, request: ReadRequest, requester: model.Requester, servers: list[int], part: int = 0
    ) -> dict[int, bytes]:
        return {
            i: self.states[i].read_share(request, requester, self.views[i], self.keys[i], self.rand)[part]
            for i in servers
        }

    def read(
        self, request: ReadRequest, requester: model.Requester, reader: nacl.public.PrivateKey, part: int = 0
    ) -> bytes:
        boxed = self.shares(request, requester, list(range(1, self.t + 2)), part)
        record = self.states[1].get(request.app, request.data_id)
        return model.open_value(G, self.public, record, part, boxed, reader)

    def read_refused(self, request: ReadRequest, requester: model.Requester, code: str) -> str:
        reasons = set()
        for i, state in self.states.items():
            with pytest.raises(Refused) as info:
                state.read_share(request, requester, self.views[i], self.keys[i], self.rand)
            assert info.value.code == code, info.value.reason
            reasons.add(info.value.reason)
        return reasons.pop()


def secret_write(net: Net, dtype: DataType, data_id: str, plaintext: bytes, **kw: Any) -> WriteRequest:
    bare = WriteRequest(APP, data_id, dtype, kw.pop("version", 1), **kw)
    return WriteRequest(
        bare.app,
        bare.data_id,
        dtype,
        bare.version,
        sealed={0: net.sealed(bare, plaintext)},
        reader=bare.reader,
        until_ms=bare.until_ms,
    )


ALICE = Client(APP, b"alice")
BOB = Client(APP, b"bob")
MALLORY = Client(OTHER, b"alice")  # same unique id, another application


# Public data -------------------------------------------------------------------------------------


def test_public_write_once() -> None:
    net = Net()
    w = WriteRequest(APP, "motd", DataType.PUBLIC_ONCE, 1, value=b"hello")
    net.write(w, ALICE)
    assert net.states[2].read_public(APP, "motd", BOB, net.views[2]).value == b"hello"
    with pytest.raises(Refused, match="cannot read"):
        net.states[2].read_public(APP, "motd", MALLORY, net.views[2])
    assert "write-once" in net.refused_everywhere(
        WriteRequest(APP, "motd", DataType.PUBLIC_ONCE, 2, value=b"x"), ALICE, "exists"
    )
    assert "cannot write" in net.refused_everywhere(
        WriteRequest(APP, "x", DataType.PUBLIC_ONCE, 1, value=b"x"), MALLORY, "not-permitted"
    )
    # the same id in another application is another item
    net.write(WriteRequest(OTHER, "motd", DataType.PUBLIC_ONCE, 1, value=b"theirs"), MALLORY)
    assert net.states[1].get(APP, "motd").value == b"hello"
    with pytest.raises(Refused) as info:
        net.states[1].read_public(APP, "nothing", ALICE, net.views[1])
    assert info.value.code == "not-found"
    assert "needs no decryption" in net.read_refused(
        ReadRequest(APP, "motd", 1, bytes(32)), ALICE, "bad-request"
    )
    assert "no data" in net.read_refused(ReadRequest(APP, "nothing", 1, bytes(32)), ALICE, "not-found")


def test_public_read_write_changes_only_by_a_quorum() -> None:
    net = Net()
    w1 = WriteRequest(APP, "config", DataType.PUBLIC_RW, 1, value=b"v1")
    assert "only by a quorum" in net.refused_everywhere(w1, ALICE, "not-permitted")
    net.write(w1, net.quorum(APP, w1.digest()))
    w2 = WriteRequest(APP, "config", DataType.PUBLIC_RW, 2, value=b"v2")
    # a quorum for another request, too few votes, a bad vote, another password, another application
    assert "another request" in net.refused_everywhere(w2, net.quorum(APP, w1.digest()), "not-permitted")
    assert "valid votes" in net.refused_everywhere(
        w2, net.quorum(APP, w2.digest(), voters=[1, 2]), "not-permitted"
    )
    forged = net.quorum(APP, w2.digest())
    forged = dataclasses.replace(forged, votes={**forged.votes, 3: bytes(64)})
    assert "valid votes" in net.refused_everywhere(w2, forged, "not-permitted")
    # votes of one password's clients do not count for another ticket (they are on another rid)
    swapped = dataclasses.replace(forged, ticket=net.quorum(APP, w2.digest(), verifier=b"p" * 32).ticket)
    assert "valid votes" in net.refused_everywhere(w2, swapped, "not-permitted")
    assert "cannot write" in net.refused_everywhere(w2, net.quorum(OTHER, w2.digest()), "not-permitted")
    stale = WriteRequest(APP, "config", DataType.PUBLIC_RW, 3, value=b"v3")
    assert "next is 2" in net.refused_everywhere(stale, net.quorum(APP, stale.digest()), "stale-version")
    net.write(w2, net.quorum(APP, w2.digest()))
    assert net.states[4].get(APP, "config").value == b"v2"


def test_a_quorum_is_checked_alike_at_every_server_in_every_period() -> None:
    """The check reads the certificate, the group key and n only: no server's own verifier or
    current KeyTable. A KeyTable the group key did not sign, or of another period, is refused."""
    net = Net()
    w = WriteRequest(APP, "config", DataType.PUBLIC_RW, 1, value=b"v1")
    q = net.quorum(APP, w.digest())
    # a server that moved on to a later period, and one with no client of the application,
    # give the same verdict as the others
    later = model.GroupView(net.authority, lambda: NOW + 86400 * 365)
    for view in (later, net.views[1]):
        assert net.states[1].check_write(w, q, view).value == b"v1"
    # the table must be the group's: signed by another key, unsigned, or of another period
    rogue = SigningKey(b"r" * 32)
    unsigned = dataclasses.replace(net.table, signature=b"")
    resigned = net.table.signed(bytes(rogue.sign(net.table.payload()).signature))
    for table in (unsigned, resigned):
        assert "group key signed" in net.refused_everywhere(
            w, net.quorum(APP, w.digest(), table=table), "not-permitted"
        )
    moved = dataclasses.replace(q, period=PERIOD + 1)
    assert "of period 3, not 4" in net.refused_everywhere(w, moved, "not-permitted")
    # a table of period p + 1 with other keys: votes under period p's keys do not verify there
    entries = {
        i: KeyEntry(bytes(SigningKey(bytes([i + 9]) * 32).verify_key), bytes(32), bytes(64))
        for i in range(1, N + 1)
    }
    table2 = KeyTable(PERIOD + 1, entries, {}, frozenset())
    table2 = table2.signed(bytes(net.group_key.sign(table2.payload()).signature))
    assert "valid votes" in net.refused_everywhere(
        w, net.quorum(APP, w.digest(), table=table2), "not-permitted"
    )
    # a server that cannot check a quorum refuses it; a view may refuse certificates too old
    blind = model.GroupView(None, lambda: NOW)
    with pytest.raises(Refused, match="cannot check a quorum"):
        net.states[1].check_write(w, q, blind)
    with pytest.raises(Refused, match="too old"):
        net.states[1].check_write(w, q, model.GroupView(net.authority, lambda: NOW, oldest_period=PERIOD + 1))
    net.write(w, q)
    # replayed, the same certificate is refused alike (the version moved on)
    assert "next is 2" in net.refused_everywhere(w, q, "stale-version")


def test_approval_payloads_decode_for_the_clients_deciding() -> None:
    w = WriteRequest(APP, "config", DataType.PUBLIC_RW, 2, value=b"v2")
    r = ReadRequest(APP, "seed", 1, bytes(32))
    assert model.decode_approval_payload(w.approval_payload()) == w
    assert model.decode_approval_payload(r.approval_payload()) == r
    assert (
        w.digest()
        == hashlib.sha256(approvals.distributed_payload(APP, "store", w.approval_payload())).digest()
    )
    assert w.digest() != r.digest()
    from appliance.crypto import encoding

    with pytest.raises(DecodeError, match="neither"):
        model.decode_approval_payload(encoding.encode({"dom": "x", "store": "write", "req": w.to_obj()}))


# Secret data -------------------------------------------------------------------------------------


def test_secret_single_writer_reader_only_its_owner_reads() -> None:
    net = Net()
    owner_key, other_key = nacl.public.PrivateKey.generate(), nacl.public.PrivateKey.generate()
    reader = bytes(owner_key.public_key)
    w = secret_write(net, DataType.SECRET_SINGLE, "pin", b"1234", reader=reader)
    net.write(w, ALICE)
    r = ReadRequest(APP, "pin", 1, reader)
    assert net.read(r, ALICE, owner_key) == b"1234"
    assert "only its owner" in net.read_refused(r, BOB, "not-permitted")
    assert "only its owner" in net.read_refused(r, net.quorum(APP, r.digest()), "not-permitted")
    assert "cannot read" in net.read_refused(r, MALLORY, "not-permitted")
    elsewhere = ReadRequest(APP, "pin", 1, bytes(other_key.public_key))
    assert "owner's key" in net.read_refused(elsewhere, ALICE, "not-permitted")
    # shares sealed to the owner are useless to anyone else
    with pytest.raises(NotEnoughSharesError, match="reader"):
        model.open_value(
            G, net.public, net.states[1].get(APP, "pin"), 0, net.shares(r, ALICE, [1, 2]), other_key
        )
    assert "write-once" in net.refused_everywhere(
        secret_write(net, DataType.SECRET_SINGLE, "pin", b"x", reader=reader, version=2), ALICE, "exists"
    )
    by_quorum = secret_write(net, DataType.SECRET_SINGLE, "pin-q", b"1", reader=reader)
    assert "single writer" in net.refused_everywhere(
        by_quorum, net.quorum(APP, by_quorum.digest()), "not-permitted"
    )
    plain = WriteRequest(APP, "pin2", DataType.SECRET_SINGLE, 1, value=b"1234", reader=reader)
    assert "never in clear" in net.refused_everywhere(plain, ALICE, "bad-request")


def test_secret_single_writer_distributed_reader_needs_a_quorum_to_read() -> None:
    net = Net()
    w = secret_write(net, DataType.SECRET_SW_DR, "seed", b"entropy")
    net.write(w, ALICE)
    reader = nacl.public.PrivateKey.generate()
    r = ReadRequest(APP, "seed", 1, bytes(reader.public_key))
    assert "only by a quorum" in net.read_refused(r, ALICE, "not-permitted")
    assert net.read(r, net.quorum(APP, r.digest()), reader) == b"entropy"
    other = ReadRequest(APP, "seed", 1, bytes(nacl.public.PrivateKey.generate().public_key))
    assert "another request" in net.read_refused(other, net.quorum(APP, r.digest()), "not-permitted")
    w2 = secret_write(net, DataType.SECRET_SW_DR, "seed2", b"entropy")
    assert "single writer" in net.refused_everywhere(w2, net.quorum(APP, w2.digest()), "not-permitted")


def test_secret_distributed_writer_reader() -> None:
    net = Net()
    w1 = secret_write(net, DataType.SECRET_DW_DR, "db-key", b"k1")
    assert "only by a quorum" in net.refused_everywhere(w1, ALICE, "not-permitted")
    net.write(w1, net.quorum(APP, w1.digest()))
    w2 = secret_write(net, DataType.SECRET_DW_DR, "db-key", b"k2", version=2)
    net.write(w2, net.quorum(APP, w2.digest()))
    reader = nacl.public.PrivateKey.generate()
    r1 = ReadRequest(APP, "db-key", 1, bytes(reader.public_key))
    assert "stored one is 2" in net.read_refused(r1, net.quorum(APP, r1.digest()), "stale-version")
    r2 = ReadRequest(APP, "db-key", 2, bytes(reader.public_key))
    assert net.read(r2, net.quorum(APP, r2.digest()), reader) == b"k2"
    assert "only by a quorum" in net.read_refused(r2, ALICE, "not-permitted")


def test_a_ciphertext_cannot_be_replayed_under_another_id_or_version() -> None:
    net = Net()
    w = secret_write(net, DataType.SECRET_SW_DR, "a", b"for a")
    moved = WriteRequest(APP, "b", DataType.SECRET_SW_DR, 1, sealed=w.sealed)
    assert "another label" in net.refused_everywhere(moved, ALICE, "bad-request")
    theirs = WriteRequest(OTHER, "a", DataType.SECRET_SW_DR, 1, sealed=w.sealed)
    assert "another label" in net.refused_everywhere(theirs, MALLORY, "bad-request")
    net.write(w, ALICE)
    d1 = secret_write(net, DataType.SECRET_DW_DR, "rw", b"one")
    net.write(d1, net.quorum(APP, d1.digest()))
    again = WriteRequest(APP, "rw", DataType.SECRET_DW_DR, 2, sealed=d1.sealed)
    assert "another label" in net.refused_everywhere(again, net.quorum(APP, again.digest()), "bad-request")
    garbage = WriteRequest(APP, "c", DataType.SECRET_SW_DR, 1, sealed={0: b"\x00garbage"})
    assert "tdh2 sealed data" in net.refused_everywhere(garbage, ALICE, "bad-request")


def test_store_until_is_refused_by_every_server_before_its_date() -> None:
    net = Net()
    until_ms = int((NOW + 3600) * 1000)
    w = secret_write(net, DataType.STORE_UNTIL, "will", b"open at noon", until_ms=until_ms)
    net.write(w, ALICE)
    reader = nacl.public.PrivateKey.generate()
    r = ReadRequest(APP, "will", 1, bytes(reader.public_key))
    assert "kept secret until" in net.read_refused(r, ALICE, "too-early")
    assert "kept secret until" in net.read_refused(r, net.quorum(APP, r.digest()), "too-early")
    # t faulty servers whose clocks run ahead are not enough
    net.clock[1] = NOW + 7200
    boxed = net.shares(r, ALICE, [1])
    with pytest.raises(NotEnoughSharesError):
        model.open_value(G, net.public, net.states[1].get(APP, "will"), 0, boxed, reader)
    for i in range(2, N + 1):
        with pytest.raises(Refused):
            net.states[i].read_share(r, ALICE, net.views[i], net.keys[i], net.rand)
    net.clock = [NOW + 3600] * (N + 1)
    assert net.read(r, BOB, reader) == b"open at noon"
    assert "cannot read" in net.read_refused(r, MALLORY, "not-permitted")
    far = secret_write(net, DataType.STORE_UNTIL, "far", b"x", until_ms=int((NOW + 1e10) * 1000))
    assert "beyond the limit" in net.refused_everywhere(far, ALICE, "quota")
    undated = secret_write(net, DataType.STORE_UNTIL, "undated", b"x")
    assert "release date" in net.refused_everywhere(undated, ALICE, "bad-request")


def test_joint_secret_random_from_t_plus_1_servers_or_specified() -> None:
    net = Net()
    contributions = {i: os.urandom(32) for i in (1, 2)}  # t + 1 servers, each its own random value
    made = {i: net.contribute("joint", i, v) for i, v in contributions.items()}
    sealed = {i: blob for i, (blob, _proof) in made.items()}
    proofs = {i: proof for i, (_blob, proof) in made.items()}
    few = WriteRequest(APP, "joint", DataType.JOINT_SECRET, 1, sealed={1: sealed[1]}, proofs={1: proofs[1]})
    assert "at least 2 servers" in net.refused_everywhere(few, net.quorum(APP, few.digest()), "bad-request")
    # a faulty origin cannot make up another server's contribution: without its proof, with a
    # proof of another server or of another contribution, or of another period
    bare = WriteRequest(APP, "joint", DataType.JOINT_SECRET, 1)
    forged_blob = net.sealed(bare, b"the origin knows this", part=2)
    cases = [
        ({1: proofs[1]}, sealed, "without its proof"),
        ({1: proofs[1], 2: proofs[1]}, sealed, "not issued by its period 3 key"),
        (proofs, {1: sealed[1], 2: forged_blob}, "does not verify"),
        ({1: proofs[1], 2: net.contribute("joint", 2, b"x", period=PERIOD + 1)[1]}, sealed, "of period 4"),
    ]
    for case_proofs, case_sealed, words in cases:
        bad = WriteRequest(APP, "joint", DataType.JOINT_SECRET, 1, sealed=case_sealed, proofs=case_proofs)
        assert words in net.refused_everywhere(bad, net.quorum(APP, bad.digest()), "bad-request")
    w = WriteRequest(APP, "joint", DataType.JOINT_SECRET, 1, sealed=sealed, proofs=proofs)
    assert WriteRequest.decode(w.encode()) == w
    assert "only by a quorum" in net.refused_everywhere(w, ALICE, "not-permitted")
    net.write(w, net.quorum(APP, w.digest()))
    reader = nacl.public.PrivateKey.generate()
    r = ReadRequest(APP, "joint", 1, bytes(reader.public_key))
    q = net.quorum(APP, r.digest())
    opened = {i: net.read(r, q, reader, part=i) for i in contributions}
    assert opened == contributions
    assert model.joint_value(opened) == model.joint_value(contributions) != model.joint_value({1: opened[1]})
    assert "only by a quorum" in net.read_refused(r, ALICE, "not-permitted")
    specified = secret_write(net, DataType.JOINT_SECRET, "chosen", b"the quorum's value")
    net.write(specified, net.quorum(APP, specified.digest()))
    r2 = ReadRequest(APP, "chosen", 1, bytes(reader.public_key))
    assert net.read(r2, net.quorum(APP, r2.digest()), reader) == b"the quorum's value"


def test_t_servers_do_not_decrypt_and_t_plus_1_do() -> None:
    net = Net(n=7, t=2, seed=5)
    w = secret_write(net, DataType.SECRET_SW_DR, "s", b"threshold")
    net.write(w, ALICE)
    reader = nacl.public.PrivateKey.generate()
    r = ReadRequest(APP, "s", 1, bytes(reader.public_key))
    q = net.quorum(APP, r.digest())
    record = net.states[1].get(APP, "s")
    colluding = net.shares(r, q, [3, 5])
    with pytest.raises(NotEnoughSharesError):
        model.open_value(G, net.public, record, 0, colluding, reader)
    # even interpolating the t shares as if they were enough gives a key that does not open the data
    sealed = tdh2.Sealed.decode(G, record.sealed[0])
    opened = {i: tdh2.open_share(G, reader, b) for i, b in colluding.items()}
    pretend = PublicSharing(net.public.n, net.t - 1, net.public.commitment)
    with pytest.raises(tdh2.InvalidCiphertext):
        tdh2.open_sealed(sealed, tdh2.combine(G, pretend, sealed.kem, opened))
    assert model.open_value(G, net.public, record, 0, net.shares(r, q, [3, 5, 7]), reader) == b"threshold"


def test_quotas_are_clear_errors() -> None:
    quotas = model.Quotas(max_id_length=8, max_value_size=16, max_records=2, max_bytes=40)
    net = Net(quotas=quotas)
    assert "1 to 8 bytes" in net.refused_everywhere(
        WriteRequest(APP, "x" * 9, DataType.PUBLIC_ONCE, 1, value=b"v"), ALICE, "quota"
    )
    assert "limit of 16" in net.refused_everywhere(
        WriteRequest(APP, "big", DataType.PUBLIC_ONCE, 1, value=b"v" * 17), ALICE, "quota"
    )
    net.write(WriteRequest(APP, "a", DataType.PUBLIC_ONCE, 1, value=b"v" * 16), ALICE)
    net.write(WriteRequest(APP, "b", DataType.PUBLIC_ONCE, 1, value=b"v" * 16), ALICE)
    assert "holds 2 items" in net.refused_everywhere(
        WriteRequest(APP, "c", DataType.PUBLIC_ONCE, 1, value=b"v"), ALICE, "quota"
    )
    net.write(
        WriteRequest(OTHER, "c", DataType.PUBLIC_ONCE, 1, value=b"v"), MALLORY
    )  # quotas are per application
    net2 = Net(quotas=model.Quotas(max_value_size=16, max_bytes=20))
    net2.write(WriteRequest(APP, "a", DataType.PUBLIC_ONCE, 1, value=b"v" * 16), ALICE)
    assert "limit is 20" in net2.refused_everywhere(
        WriteRequest(APP, "b", DataType.PUBLIC_ONCE, 1, value=b"v" * 5), ALICE, "quota"
    )
    secret = secret_write(net2, DataType.SECRET_SW_DR, "s", b"x" * 17)
    assert "exceeds the limit of 16" in net2.refused_everywhere(secret, ALICE, "quota")
    assert net2.states[1].usage(APP) == (1, 16)


# The replicated state's encoding ------------------------------------------------------------------


def _populated() -> Net:
    net = Net(seed=2)
    net.write(WriteRequest(APP, "motd", DataType.PUBLIC_ONCE, 1, value=b"hi"), ALICE)
    net.write(secret_write(net, DataType.SECRET_SINGLE, "pin", b"1", reader=bytes(32)), ALICE)
    net.write(secret_write(net, DataType.STORE_UNTIL, "will", b"2", until_ms=int(NOW * 1000) + 5), BOB)
    return net


_NET = _populated()
_ENCODED = _NET.states[1].encode()


def _decode(data: bytes) -> StoreState[bytes]:
    return StoreState.decode(G, _NET.public.public_key, T, data)


def test_state_encoding_round_trips() -> None:
    state = _decode(_ENCODED)
    assert state.records == _NET.states[1].records
    assert state.encode() == _ENCODED and state.digest() == _NET.states[3].digest()
    with pytest.raises(DecodeError, match="group"):
        StoreState.decode(G, _NET.public.public_key, T, _ENCODED.replace(b"ed25519", b"ed25518"))


def _mutations(obj: Mapping[str, Any]) -> list[Any]:
    rec = dict(obj["records"][0])
    return [
        {**obj, "v": 2},
        {**obj, "records": [*obj["records"], obj["records"][0]]},
        {**obj, "records": list(reversed(obj["records"]))},
        {**obj, "records": [{**rec, "type": "public-maybe"}]},
        {**obj, "records": [{**rec, "v": 0}]},
        {**obj, "records": [{**rec, "sealed": {0: b"x"}}]},
        {**obj, "records": [{**rec, "reader": b"short"}]},
        {**obj, "records": [{**rec, "app": ""}]},
        {**obj, "records": [{k: v for k, v in rec.items() if k != "owner"}]},
    ]


def test_state_decoder_refuses_inconsistent_states() -> None:
    from appliance.crypto import encoding

    obj = encoding.decode(_ENCODED)
    for bad in _mutations(obj):
        with pytest.raises(DecodeError):
            _decode(encoding.encode(bad))


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=400))
def test_fuzz_state_decoder_random_bytes(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        _decode(data)


@settings(max_examples=200, deadline=None)
@given(pos=st.integers(0, 100_000), value=st.integers(0, 255), cut=st.integers(0, 100_000))
def test_fuzz_state_decoder_mutations(pos: int, value: int, cut: int) -> None:
    mutated = bytearray(_ENCODED)
    mutated[pos % len(mutated)] = value
    for candidate in (bytes(mutated), _ENCODED[: cut % len(_ENCODED)]):
        with contextlib.suppress(DecodeError):
            _decode(candidate)


# Request decoders --------------------------------------------------------------------------------

_WRITE = secret_write(_NET, DataType.STORE_UNTIL, "w", b"x", until_ms=5)
_CONTRIBUTION = _NET.contribute("j", 2, b"r" * 32)
_REQUESTS: dict[str, tuple[bytes, Any]] = {
    "write": (_WRITE.encode(), WriteRequest.decode),
    "public-write": (WriteRequest(APP, "p", DataType.PUBLIC_RW, 2, value=b"v").encode(), WriteRequest.decode),
    "read": (ReadRequest(APP, "w", 1, bytes(32)).encode(), ReadRequest.decode),
    "quorum": (_NET.quorum(APP, _WRITE.digest()).encode(), Quorum.decode),
    "contribution": (_CONTRIBUTION[1], model.Contribution.decode),
    "approval-payload": (_WRITE.approval_payload(), model.decode_approval_payload),
    "joint-write": (
        WriteRequest(
            APP, "j", DataType.JOINT_SECRET, 1, sealed={2: _CONTRIBUTION[0]}, proofs={2: _CONTRIBUTION[1]}
        ).encode(),
        WriteRequest.decode,
    ),
}


def test_requests_round_trip_and_refuse_bad_shapes() -> None:
    assert WriteRequest.decode(_WRITE.encode()) == _WRITE
    assert WriteRequest.decode(_WRITE.encode()).digest() == _WRITE.digest()
    q = _NET.quorum(APP, _WRITE.digest())
    assert Quorum.decode(q.encode()) == q
    assert ReadRequest.decode(ReadRequest(APP, "w", 1, bytes(32)).encode()) == ReadRequest(
        APP, "w", 1, bytes(32)
    )
    from appliance.crypto import encoding

    bad_writes = [
        {**_WRITE.to_obj(), "type": "secret-maybe"},
        {**_WRITE.to_obj(), "value": b"clear"},
        {**_WRITE.to_obj(), "sealed": {}},
        {**_WRITE.to_obj(), "sealed": {-1: b"x"}},
        {**_WRITE.to_obj(), "v": 0},
        {**_WRITE.to_obj(), "app": ""},
        {**_WRITE.to_obj(), "extra": 1},
    ]
    for obj in bad_writes:
        with pytest.raises(DecodeError, match="store write request"):
            WriteRequest.decode(encoding.encode(obj))
    for obj in ({**q.to_obj(), "votes": {0: bytes(64)}}, {**q.to_obj(), "digest": b"short"}):
        with pytest.raises(DecodeError, match="quorum evidence"):
            Quorum.decode(encoding.encode(obj))
    with pytest.raises(DecodeError, match="reader key"):
        ReadRequest.decode(encoding.encode({**ReadRequest(APP, "w", 1, bytes(32)).to_obj(), "reader": b"k"}))


@pytest.mark.parametrize("kind", sorted(_REQUESTS))
@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=300), pos=st.integers(0, 100_000), value=st.integers(0, 255))
def test_fuzz_request_decoders(kind: str, data: bytes, pos: int, value: int) -> None:
    valid, decode = _REQUESTS[kind]
    assert decode(valid) is not None
    mutated = bytearray(valid)
    mutated[pos % len(mutated)] = value
    for candidate in (data, bytes(mutated), valid[: pos % len(valid)]):
        with contextlib.suppress(DecodeError):
            decode(candidate)

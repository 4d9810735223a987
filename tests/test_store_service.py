"""The store's service in one server (sans-IO, seeded, no sockets): agreed operations applied
alike everywhere, the state saved and loaded, the read protocol's messages, the client's side."""

from __future__ import annotations

import contextlib

import nacl.public
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.apps.store import model
from appliance.apps.store.attest import Attestation
from appliance.apps.store.client import ReadRefused, StoreKey, combine_answers, open_answers, seal_write
from appliance.apps.store.model import Client, DataType, ReadRequest, Refused, WriteRequest
from appliance.apps.store.node import answers_to_obj
from appliance.apps.store.service import (
    ALERT_CODES,
    MAX_QUORUM_AGE,
    NETWORK_QUOTAS,
    ContributeAsk,
    Contributed,
    Marked,
    Operation,
    Outcome,
    PeriodMark,
    ReadAnswer,
    ReadAsk,
    Release,
    StoreService,
    decode_entry,
    decode_read_message,
)
from appliance.crypto import encoding, local, tdh2
from appliance.crypto.errors import DecodeError
from appliance.crypto.groups import P256 as G
from appliance.crypto.keyshare import KeyShare
from appliance.crypto.secret import DeterministicSource

N, T = 4, 1
NOW = 1_800_000_000.0
ALICE = Client("vault", b"alice")
MALLORY = Client("vault", b"mallory")
INTRUDER = Client("other", b"alice")


class Net:
    """n services with the store key dealt by a DKG; a key-holder's share making (``answer``)."""

    def __init__(self, seed: int = 7) -> None:
        self.rand = DeterministicSource(seed, G.order)
        self.keys: dict[int, KeyShare[object]] = local.run_dkg(G, N, T, self.rand).keys
        self.public = self.keys[1].public
        self.services = {i: StoreService(G, self.public.public_key, T) for i in range(1, N + 1)}
        self.sequence: list[bytes] = []
        self.key = StoreKey.from_result(
            {"group": G.name, "n": N, "t": T, "period": 3, "commitment": self.public.commitment.encode(G)}
        )

    def order(self, op: Operation | PeriodMark | Attestation | bytes) -> list[Outcome]:
        """The agreed sequence grows by one; every server applies it (they must agree)."""
        entry = op if isinstance(op, bytes) else op.encode()
        index = len(self.sequence)
        self.sequence.append(entry)
        outcomes = [s.apply(index, entry) for s in self.services.values()]
        assert len({s.digest() for s in self.services.values()}) == 1
        return outcomes

    def answer(self, i: int, ask: ReadAsk, clock: float = NOW) -> ReadAnswer:
        """Server ``i``'s answer: its rule with its clock, then its key-holder's sealed shares."""
        try:
            parts = self.services[i].authorize(ask.request, ask.requester, lambda: clock)
        except Refused as exc:
            return ReadAnswer(ask.rid, code=exc.code, reason=f"server {i}: {exc.reason}")
        shares = {}
        for part, kem, lbl in parts:
            share = tdh2.decryption_share(G, self.keys[i], tdh2.Ciphertext.decode(G, kem), self.rand, lbl)
            shares[part] = tdh2.share_for_reader(G, share, ask.request.reader)
        return ReadAnswer(ask.rid, 3, tuple(self.public.commitment.encode(G)), shares)


def _put(net: Net, client: Client, data_id: str, value: bytes, dtype: DataType, **kw: object) -> Operation:
    request = seal_write(net.key, client.app, data_id, dtype, value, rand=net.rand, **kw)  # type: ignore[arg-type]
    return Operation(request, client, int(NOW * 1000))


def _read(
    net: Net, client: Client, data_id: str, reader: nacl.public.PrivateKey, clock: float = NOW
) -> bytes:
    record = net.services[1].state.get(client.app, data_id)
    ask = ReadAsk(
        b"r" * 16, ReadRequest(client.app, data_id, record.version, bytes(reader.public_key)), client, 0
    )
    wire = decode_read_message(ask.encode()[0:], T)  # what a peer decodes
    assert wire == ask
    answers = {}
    for i in net.services:
        raw = net.answer(i, ask, clock).encode()
        got = decode_read_message(raw, T)
        assert isinstance(got, ReadAnswer)
        answers[i] = got
    return open_answers(
        net.key, record.to_obj(), encoding.decode(encoding.encode(answers_to_obj(answers))), reader
    )


def test_agreed_writes_give_the_same_state_everywhere_and_secrets_read_back() -> None:
    net = Net()
    owner = nacl.public.PrivateKey(bytes(range(32)))
    [rec, *_] = net.order(_put(net, ALICE, "motd", b"hello", DataType.PUBLIC_ONCE))
    assert isinstance(rec, model.Record) and rec.owner == b"alice" and rec.value == b"hello"
    net.order(
        _put(
            net, ALICE, "seed", b"kept by the network", DataType.SECRET_SINGLE, reader=bytes(owner.public_key)
        )
    )
    # A second write of write-once data is refused at every server alike, nothing changes.
    outcomes = net.order(_put(net, MALLORY, "motd", b"changed", DataType.PUBLIC_ONCE))
    assert all(isinstance(o, Refused) and o.code == model.EXISTS for o in outcomes)
    assert net.services[2].state.get("vault", "motd").value == b"hello"
    assert _read(net, ALICE, "seed", owner) == b"kept by the network"
    assert all(s.applied == 3 for s in net.services.values())


def test_garbage_in_the_sequence_is_refused_alike_and_order_is_enforced() -> None:
    net = Net()
    outcomes = net.order(b"\xa1\x61x\x01")  # a faulty origin's bytes
    assert all(isinstance(o, Refused) and o.code == model.BAD_REQUEST for o in outcomes)
    with pytest.raises(ValueError, match="out of order"):
        net.services[1].apply(5, b"")


def test_the_date_limit_is_checked_with_the_operations_time_not_the_servers_clock() -> None:
    net = Net()
    far = NOW + NETWORK_QUOTAS.max_until + 10
    op = _put(net, ALICE, "late", b"x", DataType.STORE_UNTIL, until_ms=int(far * 1000))
    outcomes = net.order(op)  # every server: refused, whatever its clock
    assert all(isinstance(o, Refused) and o.code == model.QUOTA for o in outcomes)
    ok = Operation(op.request, op.client, int((NOW + 20) * 1000))
    assert all(isinstance(o, model.Record) for o in net.order(ok))


def test_reads_are_refused_by_rule_at_every_server() -> None:
    net = Net()
    owner, other = nacl.public.PrivateKey(b"\x01" * 32), nacl.public.PrivateKey(b"\x02" * 32)
    net.order(
        _put(net, ALICE, "diary", b"alice only", DataType.SECRET_SINGLE, reader=bytes(owner.public_key))
    )
    net.order(_put(net, ALICE, "will", b"later", DataType.STORE_UNTIL, until_ms=int((NOW + 60) * 1000)))
    net.order(_put(net, ALICE, "pool", b"quorum", DataType.SECRET_SW_DR))
    cases = [
        (MALLORY, "diary", owner, model.NOT_PERMITTED, NOW),  # not the owner, even with its key
        (ALICE, "diary", other, model.NOT_PERMITTED, NOW),  # the owner, another key
        (ALICE, "will", other, model.TOO_EARLY, NOW + 59),
        (ALICE, "pool", other, model.NOT_PERMITTED, NOW),  # a quorum's data, one client
    ]
    for client, data_id, reader, code, clock in cases:
        with pytest.raises(ReadRefused) as info:
            _read(net, client, data_id, reader, clock)
        assert info.value.code == code
        assert set(info.value.refusals) == {1, 2, 3, 4}
        assert code in ALERT_CODES
    with pytest.raises(Refused) as missing:  # another application does not see the id
        net.services[1].authorize(ReadRequest("other", "diary", 1, bytes(32)), INTRUDER, lambda: NOW)
    assert missing.value.code == model.NOT_FOUND
    with pytest.raises(Refused) as cross:  # nor read it by naming it
        net.services[1].authorize(ReadRequest("vault", "diary", 1, bytes(32)), INTRUDER, lambda: NOW)
    assert cross.value.code == model.NOT_PERMITTED
    assert _read(net, ALICE, "will", other, NOW + 60) == b"later"  # from the date on


def test_t_answers_do_not_open_and_bad_shares_are_named() -> None:
    net = Net()
    owner = nacl.public.PrivateKey(b"\x03" * 32)
    net.order(_put(net, ALICE, "s", b"v", DataType.SECRET_SINGLE, reader=bytes(owner.public_key)))
    record = net.services[1].state.get("vault", "s")
    ask = ReadAsk(b"q" * 16, ReadRequest("vault", "s", 1, bytes(owner.public_key)), ALICE, 0)
    one = {1: net.answer(1, ask)}
    with pytest.raises(ReadRefused, match="fewer than t"):
        open_answers(net.key, record.to_obj(), answers_to_obj(one), owner)
    # Server 2's share swapped for server 1's: named, and the two good ones still open it.
    answers = {i: net.answer(i, ask) for i in (1, 2, 3)}
    answers[2] = ReadAnswer(ask.rid, 3, answers[1].commitment, answers[1].shares)
    assert open_answers(net.key, record.to_obj(), answers_to_obj(answers), owner) == b"v"


class Group:
    """The group key (Vcert), the period keys of two periods in signed KeyTables, and the
    certificates the approvals service makes from the servers' votes (protocol ``store``)."""

    def __init__(self) -> None:
        from nacl.signing import SigningKey

        from appliance.protocols.state import KeyEntry, KeyTable

        self.scert = SigningKey(b"s" * 32)
        self.keys = {p: {i: SigningKey(bytes([i, p]) * 16) for i in range(1, N + 1)} for p in (3, 4, 7, 8)}
        self.tables = {}
        for p, keys in self.keys.items():
            entries = {i: KeyEntry(bytes(k.verify_key), bytes(32), bytes(64)) for i, k in keys.items()}
            table = KeyTable(p, entries, {}, frozenset())
            self.tables[p] = table.signed(bytes(self.scert.sign(table.payload()).signature))
        self.authority = model.Authority(bytes(self.scert.verify_key), N)

    def quorum(
        self, app: str, digest: bytes, voters: tuple[int, ...] = (1, 2, 3), period: int = 3
    ) -> model.Quorum:
        from appliance.protocols import approvals

        ticket = approvals.ticket(b"v" * 32, period, digest)
        rid = approvals.request_id(digest, ticket)
        votes = {
            j: bytes(self.keys[period][j].sign(approvals.vote_payload(period, j, rid)).signature)
            for j in voters
        }
        return model.Quorum.from_obj(
            approvals.store_certificate(app, self.tables[period], digest, ticket, votes)
        )


def test_a_quorums_writes_apply_alike_everywhere_and_its_reads_open() -> None:
    """A quorum's operation carries its certificate; every server gives the same verdict, in
    whatever period it is, and a single client or a short quorum is refused alike."""
    net, group = Net(), Group()
    for service in net.services.values():
        service.authority = group.authority
    request = seal_write(net.key, "vault", "db", DataType.SECRET_DW_DR, b"k1", rand=net.rand)
    alone = Operation(request, ALICE, int(NOW * 1000))
    assert all(isinstance(o, Refused) and "only by a quorum" in o.reason for o in net.order(alone))
    short = Operation(
        request, Client("vault", b""), int(NOW * 1000), group.quorum("vault", request.digest(), (1, 2))
    )
    assert all(isinstance(o, Refused) and "2 valid votes" in o.reason for o in net.order(short))
    foreign = Operation(request, INTRUDER, int(NOW * 1000), group.quorum("other", request.digest()))
    assert all(isinstance(o, Refused) and o.code == model.NOT_PERMITTED for o in net.order(foreign))
    op = Operation(request, Client("vault", b""), int(NOW * 1000), group.quorum("vault", request.digest()))
    assert Operation.decode(op.encode()) == op
    assert all(isinstance(o, model.Record) and o.owner == b"" for o in net.order(op))
    # the next version, approved in the next period: the same at every server
    v2 = seal_write(net.key, "vault", "db", DataType.SECRET_DW_DR, b"k2", version=2, rand=net.rand)
    op2 = Operation(v2, Client("vault", b""), int(NOW * 1000), group.quorum("vault", v2.digest(), period=4))
    assert all(isinstance(o, model.Record) and o.version == 2 for o in net.order(op2))
    # read by a quorum (for this version and reader key), refused to one client at every server
    reader = nacl.public.PrivateKey(b"\x05" * 32)
    read = ReadRequest("vault", "db", 2, bytes(reader.public_key))
    ask = ReadAsk(b"d" * 16, read, Client("vault", b""), 2, group.quorum("vault", read.digest(), period=4))
    assert decode_read_message(ask.encode(), T) == ask
    answers = {i: net.answer(i, ask) for i in net.services}
    record = net.services[1].state.get("vault", "db")
    assert open_answers(net.key, record.to_obj(), answers_to_obj(answers), reader) == b"k2"
    lonely = ReadAsk(b"e" * 16, read, ALICE, 2)
    refusals = {i: net.answer(i, lonely) for i in net.services}
    assert {a.code for a in refusals.values()} == {model.NOT_PERMITTED}


def test_a_quorums_certificate_is_refused_at_apply_once_the_sequence_is_past_its_age() -> None:
    """The store's sequence carries its period (period marks: the period's KeyTable the group
    key signed); a certificate more than MAX_QUORUM_AGE periods older than where the sequence
    is is refused at apply, alike at every server, whatever their clocks (none is read)."""
    from nacl.signing import SigningKey

    net, group = Net(), Group()
    for service in net.services.values():
        service.authority = group.authority
    assert MAX_QUORUM_AGE == 3
    old = seal_write(net.key, "vault", "db", DataType.PUBLIC_RW, b"late")
    early = group.quorum("vault", old.digest(), period=3)  # approved in period 3, ordered late
    assert [o.period for o in net.order(PeriodMark(group.tables[4].encode())) if isinstance(o, Marked)] == [
        4
    ] * N
    # a mark the group key did not sign, or one that is not ahead, moves nothing
    rogue = group.tables[8].signed(bytes(SigningKey(b"r" * 32).sign(group.tables[8].payload()).signature))
    assert all(
        isinstance(o, Refused) and o.code == model.NOT_PERMITTED
        for o in net.order(PeriodMark(rogue.encode()))
    )
    assert all(
        isinstance(o, Refused) and o.code == model.STALE
        for o in net.order(PeriodMark(group.tables[3].encode()))
    )
    assert {s.period for s in net.services.values()} == {4}
    assert [o.period for o in net.order(PeriodMark(group.tables[7].encode())) if isinstance(o, Marked)] == [
        7
    ] * N
    outcomes = net.order(Operation(old, Client("vault", b""), int(NOW * 1000), early))
    assert all(
        isinstance(o, Refused)
        and o.code == model.NOT_PERMITTED
        and "of period 3, too old" in o.reason
        and "oldest taken is of period 4" in o.reason
        for o in outcomes
    )
    assert all(("vault", "db") not in s.state.records for s in net.services.values())
    # a certificate of period 4 is exactly MAX_QUORUM_AGE behind: still taken
    fresh = Operation(
        old, Client("vault", b""), int(NOW * 1000), group.quorum("vault", old.digest(), period=4)
    )
    assert all(isinstance(o, model.Record) for o in net.order(fresh))
    # a quorum's certificate applied moves the sequence's period too (its table is signed)
    v2 = seal_write(net.key, "vault", "db", DataType.PUBLIC_RW, b"v2", version=2)
    assert all(
        isinstance(o, model.Record)
        for o in net.order(
            Operation(v2, Client("vault", b""), int(NOW * 1000), group.quorum("vault", v2.digest(), period=8))
        )
    )
    assert {s.period for s in net.services.values()} == {8}
    # the period is part of the saved state and of the digest
    s = net.services[2]
    again = StoreService.decode(G, net.public.public_key, T, s.encode())
    assert again.period == 8 and again.digest() == s.digest()
    again.period = 7
    assert again.digest() != s.digest()
    # a server that applies the whole sequence again (wiped) ends at the same period and verdicts
    fresh_server = StoreService(G, net.public.public_key, T)
    fresh_server.authority = group.authority
    replayed = [fresh_server.apply(i, e) for i, e in enumerate(net.sequence)]
    assert fresh_server.period == 8 and fresh_server.digest() == s.digest()
    assert isinstance(replayed[4], Refused) and "too old" in replayed[4].reason


def test_the_state_is_saved_and_loaded() -> None:
    net = Net()
    net.order(_put(net, ALICE, "a", b"1", DataType.PUBLIC_ONCE))
    net.order(_put(net, ALICE, "b", b"2", DataType.SECRET_SW_DR))
    s = net.services[3]
    again = StoreService.decode(G, net.public.public_key, T, s.encode())
    assert again.applied == 2 and again.digest() == s.digest()
    with pytest.raises(DecodeError):
        StoreService.decode(G, net.public.public_key, T, s.encode()[:-3])


@settings(max_examples=60, deadline=None)
@given(
    app=st.text(min_size=1, max_size=20),
    data_id=st.text(min_size=1, max_size=40),
    value=st.binary(max_size=200),
    uid=st.binary(max_size=64),
    at=st.integers(min_value=0, max_value=2**62),
)
def test_operations_round_trip(app: str, data_id: str, value: bytes, uid: bytes, at: int) -> None:
    op = Operation(WriteRequest(app, data_id, DataType.PUBLIC_ONCE, 1, value=value), Client(app, uid), at)
    assert Operation.decode(op.encode()) == op


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_decoders_raise_decode_error_only(data: bytes) -> None:
    for decode in (
        Operation.decode,
        decode_entry,
        lambda d: decode_read_message(d, T),
        lambda d: StoreService.decode(G, G.mul_base(1), T, d),
    ):
        with contextlib.suppress(DecodeError):
            decode(data)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_changed_messages(data: st.DataObject) -> None:
    """Single-byte changes of valid messages: decoded or DecodeError, nothing else."""
    net_answer = ReadAnswer(b"a" * 16, 2, (G.encode(G.mul_base(1)),) * (T + 1), {0: b"s" * 80})
    group = Group()
    public_rw = WriteRequest("vault", "x", DataType.PUBLIC_RW, 1, value=b"v")
    samples = [
        Operation(WriteRequest("vault", "x", DataType.PUBLIC_ONCE, 1, value=b"v"), ALICE, 5).encode(),
        Operation(public_rw, ALICE, 5, group.quorum("vault", public_rw.digest())).encode(),
        ReadAsk(b"r" * 16, ReadRequest("vault", "x", 1, bytes(32)), ALICE, 3).encode(),
        net_answer.encode(),
        ReadAnswer(b"a" * 16, code="too-early", reason="later").encode(),
        ContributeAsk(b"c" * 16, "vault", "dice", 1).encode(),
        Contributed(b"c" * 16, b"s" * 200, b"p" * 300).encode(),
        Contributed(b"c" * 16, code="exists", reason="vault/dice exists").encode(),
    ]
    raw = bytearray(data.draw(st.sampled_from(samples)))
    pos = data.draw(st.integers(0, len(raw) - 1))
    raw[pos] = data.draw(st.integers(0, 255))
    for decode in (Operation.decode, lambda d: decode_read_message(d, T)):
        with contextlib.suppress(DecodeError):
            decode(bytes(raw))


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["group", "n", "t", "period", "commitment"]),
        st.one_of(
            st.integers(-5, 2000),
            st.text(max_size=10),
            st.lists(st.binary(max_size=40), max_size=4),
            st.sampled_from(["p256", "ed25519", "dsa2048"]),
        ),
    )
)
def test_fuzz_store_key(result: dict[str, object]) -> None:
    with contextlib.suppress(DecodeError):
        StoreKey.from_result(result)


def test_cluster_init_store_adds_the_store_key_to_c() -> None:
    from appliance.node.cluster import _secrets
    from appliance.protocols.state import ConfigError

    assert _secrets("off", store="p256") == {"scert": "ed25519", "store": "p256"}
    assert _secrets("key", ca=True, store="ed25519")["store"] == "ed25519"
    assert "store" not in _secrets("key")
    with pytest.raises(ConfigError, match="--store 'dsa2048'"):
        _secrets("off", store="dsa2048")


def test_store_until_is_released_by_the_network_at_its_date() -> None:
    """A server whose clock passed the date combines t+1 shares (its own reader key) and puts the
    data key in the sequence; every server checks that it opens the value and keeps the value."""
    net = Net()
    until = NOW + 60
    net.order(_put(net, ALICE, "will", b"read me later", DataType.STORE_UNTIL, until_ms=int(until * 1000)))
    assert [r.data_id for r in net.services[2].due_releases(until)] == ["will"]
    assert net.services[2].due_releases(until - 1) == []
    record = net.services[1].state.get("vault", "will")
    reader = nacl.public.PrivateKey(b"\x09" * 32)
    ask = ReadAsk(
        b"z" * 16, ReadRequest("vault", "will", 1, bytes(reader.public_key)), Client("vault", b""), 0
    )
    early = {i: net.answer(i, ask, until - 1) for i in net.services}
    with pytest.raises(ReadRefused) as refused:  # before the date, no server helps
        combine_answers(net.key, record, answers_to_obj(early), reader)
    assert refused.value.code == model.TOO_EARLY
    answers = {i: net.answer(i, ask, until) for i in (1, 2)}
    _sealed, data_key = combine_answers(net.key, record, answers_to_obj(answers), reader)
    for bad, code in [
        (Release("vault", "will", 1, bytes(32), int(until * 1000)), model.BAD_REQUEST),  # a wrong key
        (Release("vault", "will", 1, data_key, int(until * 1000) - 1), model.TOO_EARLY),
        (Release("vault", "motd", 1, data_key, int(until * 1000)), model.NOT_FOUND),
    ]:
        assert all(isinstance(o, Refused) and o.code == code for o in net.order(bad.encode()))
    outcomes = net.order(Release("vault", "will", 1, data_key, int(until * 1000)).encode())
    assert all(isinstance(o, model.Record) and o.value == b"read me later" for o in outcomes)
    assert net.services[3].due_releases(until + 100) == []
    again = net.order(Release("vault", "will", 1, data_key, int(until * 1000)).encode())
    assert all(isinstance(o, Refused) and o.code == model.EXISTS for o in again)
    # The released record survives the state's encoding.
    s = net.services[4]
    assert StoreService.decode(G, net.public.public_key, T, s.encode()).digest() == s.digest()


def _attestation(
    service: StoreService[object], server: int, period: int, digest: bytes | None = None
) -> Attestation:
    """Server ``server``'s signed digest at ``service``'s latest mark, with its channel key of
    ``period`` (the Group's period keys are the channel identities' seeds)."""
    from appliance.apps.store.attest import attestation_payload
    from appliance.net._tls import channel_certificate_der, channel_identity, channel_sign

    ident = channel_identity(server, period, bytes([server, period]) * 16)
    count = service.verifier.mark_count
    digest = service.verifier.mark_digest if digest is None else digest
    sig = channel_sign(ident, attestation_payload(count, digest, period, server))
    return Attestation(count, digest, period, server, channel_certificate_der(ident), sig)


def test_signed_digests_verify_a_copy_rebuilt_from_the_sequence_and_name_a_damaged_one() -> None:
    """At a period mark each server signs its digest (channel key of the mark's period) into
    the sequence; every server checks the signatures alike against the mark's KeyTable. t+1
    signers agreeing with a server's own digest verify its copy (also for a wiped server that
    applies the whole sequence again); t+1 signers of another digest show a changed copy as
    damaged; a server signing another digest than the verified one is named."""
    from appliance.apps.store.attest import Attested

    net, group = Net(), Group()
    for service in net.services.values():
        service.authority = group.authority
    changed = StoreService(G, net.public.public_key, T)  # a copy changed on disk
    changed.authority = group.authority
    changed.state.put(model.Record("vault", "planted", DataType.PUBLIC_ONCE, b"mallory", 1, value=b"x"))

    def order(entry: Operation | PeriodMark | Attestation) -> list[Outcome]:
        changed.apply(len(net.sequence), entry.encode())
        return net.order(entry)

    order(_put(net, ALICE, "a", b"1", DataType.PUBLIC_ONCE))
    order(PeriodMark(group.tables[4].encode()))
    one = net.services[1]
    count, digest = one.verifier.mark_count, one.verifier.mark_digest
    at_mark = one.encode()
    assert count == 2 and {s.verifier.mark_digest for s in net.services.values()} == {digest}
    assert changed.verifier.mark_digest != digest
    assert all(o == Attested(1, count, True) for o in order(_attestation(one, 1, 4)))
    assert {s.verifier.verified for s in net.services.values()} == {0}  # one signer: not yet
    # refused alike: signed again, in another period, with another server's certificate, stale
    again = order(_attestation(one, 1, 4))
    assert all(isinstance(o, Refused) and o.code == model.EXISTS for o in again)
    other_period = order(_attestation(one, 2, 3))
    assert all(isinstance(o, Refused) and o.code == model.NOT_PERMITTED for o in other_period)
    honest = _attestation(one, 2, 4)
    forged = Attestation(count, digest, 4, 3, honest.cert, honest.sig)
    assert all(isinstance(o, Refused) and o.code == model.NOT_PERMITTED for o in order(forged))
    assert changed.verifier.damaged is None
    assert all(isinstance(o, Attested) and o.agrees for o in order(honest))
    assert {s.verifier.verified for s in net.services.values()} == {count}
    assert changed.verifier.verified == 0 and changed.verifier.damaged is not None
    assert "servers 1, 2 signed another store digest after 2 operations" in changed.verifier.damaged
    # server 3 signs another digest: named by every server whose copy is verified
    order(_attestation(one, 3, 4, bytes(32)))
    assert all(s.verifier.dissenters == [(3, count)] for s in net.services.values())
    # a wiped server applies the whole sequence again: verified at the mark, not damaged
    wiped = StoreService(G, net.public.public_key, T)
    wiped.authority = group.authority
    for index, entry in enumerate(net.sequence):
        wiped.apply(index, entry)
    assert wiped.verifier.verified == count and wiped.verifier.damaged is None
    assert wiped.digest() == one.digest()
    # the mark is in the snapshot: a server restarted after it checks server 4's signature
    # alike (its own digest at the mark is not known: a snapshot does not say it)
    restored = StoreService.decode(G, net.public.public_key, T, one.encode())
    restored.authority = group.authority
    late = _attestation(one, 4, 4)
    assert restored.apply(restored.applied, late.encode()) == Attested(4, count, None)
    assert restored.apply(restored.applied, late.encode()).code == model.EXISTS  # type: ignore[union-attr]
    # restarted from a snapshot taken right at the mark: its digest recomputed, verified by t+1
    right = StoreService.decode(G, net.public.public_key, T, at_mark)
    right.authority = group.authority
    for index in range(right.applied, len(net.sequence)):
        right.apply(index, net.sequence[index])
    assert right.verifier.verified == count and right.verifier.mark_digest == digest
    stale = order(PeriodMark(group.tables[7].encode()))
    assert all(isinstance(o, Marked) for o in stale)
    assert all(isinstance(o, Refused) and o.code == model.STALE for o in order(late))

"""The synchronous signed broadcast: agreement, equivocation caught and named, bad bundles rejected."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from appliance.crypto.errors import DecodeError
from appliance.protocols._core import EVERYONE, AlertKind, Outgoing, Signer, key_table_verifier
from appliance.protocols.broadcast import AUTH, CLEAR, Item, SyncBroadcast, decode_bundle, item_statement
from appliance.sim import NetworkConfig, Simulation

DELTA = 0.1
SESSION = b"test-session"
PERIOD = 3


def keys(n: int, seed: int) -> dict[int, SigningKey]:
    rnd = random.Random(seed)
    return {i: SigningKey(rnd.randbytes(32)) for i in range(1, n + 1)}


class Node:
    def __init__(self, b: SyncBroadcast) -> None:
        self.b = b

    def receive(self, sender: int, data: bytes, now: float) -> None:
        self.b.receive(sender, data, now)

    def tick(self, now: float) -> list[Outgoing]:
        return self.b.tick(now)


def make(n: int, t: int, sk: dict[int, SigningKey], *, allow_clear: bool = False) -> dict[int, SyncBroadcast]:
    public = {i: bytes(k.verify_key) for i, k in sk.items()}
    verify = key_table_verifier(public)

    def classify(item: Item) -> str | None:
        statement = item_statement(SESSION, PERIOD, item.author, item.payload)
        if verify(item.author, statement, item.signature):
            return AUTH
        return CLEAR if allow_clear and len(item.payload) >= 32 and _self_signed(item) else None

    return {
        i: SyncBroadcast(
            n=n,
            t=t,
            me=i,
            period=PERIOD,
            session=SESSION,
            start=0.0,
            delta=DELTA,
            signer=Signer(sk[i]),
            relay_verify=verify,
            classify=classify,
            allow_clear=allow_clear,
        )
        for i in sk
    }


def _self_signed(item: Item) -> bool:
    from appliance.protocols._core import ed25519_verify

    return ed25519_verify(
        item.payload[:32], item_statement(SESSION, PERIOD, item.author, item.payload), item.signature
    )


def run(
    bs: dict[int, SyncBroadcast], seed: int, config: NetworkConfig | None = None, **kw: object
) -> Simulation:
    sim = Simulation({i: Node(b) for i, b in bs.items()}, seed, config or NetworkConfig(max_delay=0.06))
    for hook, value in kw.items():
        setattr(sim, hook, value)
    sim.run_until(max(b.end for b in bs.values()) + DELTA)
    return sim


@settings(max_examples=25, deadline=None)
@given(
    st.integers(2, 7).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, (n - 1) // 2 or 1))),
    st.integers(0, 2**32),
)
def test_honest_servers_agree_on_every_item(params: tuple[int, int], seed: int) -> None:
    n, t = params
    sk = keys(n, seed)
    bs = make(n, t, sk)
    for i, b in bs.items():
        b.broadcast(b.make_item(f"item of {i}".encode(), Signer(sk[i])))
    run(bs, seed)
    results = [b.single_values() for b in bs.values()]
    assert all(r == results[0] for r in results)
    assert {a: it.payload for a, it in results[0].items()} == {i: f"item of {i}".encode() for i in sk}
    assert not any(b.alerts or b.rejected for b in bs.values())


def test_equivocating_server_is_named_by_every_honest_server_and_excluded() -> None:
    n, t = 4, 1
    sk = keys(n, 1)
    bs = make(n, t, sk)
    for i, b in bs.items():
        b.broadcast(b.make_item(f"item of {i}".encode(), Signer(sk[i])))
    liar = bs[4]
    other = Item(
        4, b"another item of 4", Signer(sk[4]).sign(item_statement(SESSION, PERIOD, 4, b"another item of 4"))
    )
    from appliance.protocols.broadcast import encode_bundle

    def equivocate(
        sender: int, to: int, data: bytes, now: float, rng: random.Random
    ) -> list[tuple[float, bytes]]:
        if now < DELTA and to == 2:  # server 2 gets a different round-1 item from server 4
            return [(0.0, encode_bundle(SESSION, PERIOD, 4, [(other, {})]))]
        return [(0.0, data)]

    run(bs, 1, faults={4: equivocate})
    for i in (1, 2, 3):
        kinds = [(a.kind, a.server) for a in bs[i].alerts]
        assert (AlertKind.EQUIVOCATION, 4) in kinds, i
        assert 4 not in bs[i].single_values()
        assert set(bs[i].single_values()) == {1, 2, 3}
        assert len(bs[i].alerts[0].evidence) == 4
    assert liar.alerts  # even the liar's own view shows the conflict


def test_a_server_that_sends_to_only_one_peer_is_still_agreed_on() -> None:
    n, t = 5, 2
    sk = keys(n, 2)
    bs = make(n, t, sk)
    for i, b in bs.items():
        b.broadcast(b.make_item(f"item of {i}".encode(), Signer(sk[i])))

    def selective(
        sender: int, to: int, data: bytes, now: float, rng: random.Random
    ) -> list[tuple[float, bytes]]:
        return [(0.0, data)] if to == 1 or now >= DELTA else []

    run(bs, 2, faults={5: selective})
    views = [bs[i].single_values() for i in (1, 2, 3, 4)]
    assert all(v == views[0] for v in views) and 5 in views[0]


def test_crashed_server_is_absent_for_everyone() -> None:
    n, t = 4, 1
    sk = keys(n, 3)
    bs = make(n, t, sk)
    for i, b in bs.items():
        if i != 3:
            b.broadcast(b.make_item(f"item of {i}".encode(), Signer(sk[i])))
    run(bs, 3)
    for i in (1, 2, 4):
        assert set(bs[i].single_values()) == {1, 2, 4}


def test_clear_items_need_an_extra_round_and_are_agreed() -> None:
    n, t = 4, 1
    sk = keys(n, 4)
    bs = make(n, t, sk, allow_clear=True)
    fresh = SigningKey(b"\x07" * 32)
    for i, b in bs.items():
        if i == 2:  # a recovering server: its item is signed with a fresh key carried in the payload
            payload = bytes(fresh.verify_key) + b"announcement"
            b.broadcast(Item(2, payload, Signer(fresh).sign(item_statement(SESSION, PERIOD, 2, payload))))
        else:
            b.broadcast(b.make_item(f"item of {i}".encode(), Signer(sk[i])))
    assert bs[1].rounds == t + 2
    run(bs, 4)
    results = [bs[i].result()[2] for i in (1, 3, 4)]
    assert all(r == results[0] and CLEAR in r and AUTH not in r for r in results)


def test_replayed_bundle_from_another_period_is_rejected_with_a_reason() -> None:
    sk = keys(4, 5)
    old = make(4, 1, sk)
    item = old[1].make_item(b"x", Signer(sk[1]))
    from appliance.protocols.broadcast import encode_bundle

    bundle = encode_bundle(SESSION, PERIOD - 1, 1, [(item, {})])
    b = old[2]
    b.receive(1, bundle, 0.01)
    assert b.rejected and "period" in b.rejected[0].reason and b.rejected[0].peer == 1


def test_forged_item_and_short_chain_are_rejected() -> None:
    sk = keys(4, 6)
    bs = make(4, 1, sk)
    from appliance.protocols.broadcast import encode_bundle

    forged = Item(3, b"forged", Signer(sk[1]).sign(item_statement(SESSION, PERIOD, 3, b"forged")))
    bs[2].receive(1, encode_bundle(SESSION, PERIOD, 1, [(forged, {})]), 0.01)
    late = bs[1].make_item(b"late", Signer(sk[1]))
    bs[2].receive(
        1, encode_bundle(SESSION, PERIOD, 1, [(late, {})]), DELTA * 1.5
    )  # round 2 needs 2 signatures
    reasons = [r.reason for r in bs[2].rejected]
    assert "invalid author signature" in reasons[0] and "need 2" in reasons[1]
    assert bs[2].single_values() == {}


@given(st.binary(max_size=300))
def test_bundle_decoder_raises_only_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_bundle(data, SESSION, PERIOD, 5)


def test_garbage_from_a_peer_never_raises() -> None:
    bs = make(4, 1, keys(4, 7))
    for junk in (b"", b"\xff" * 10, b"\xa0", bytes(10_000)):
        bs[1].receive(2, junk, 0.01)
    assert len(bs[1].rejected) == 4 and all(r.peer == 2 for r in bs[1].rejected)


def test_outgoing_goes_to_everyone() -> None:
    sk = keys(3, 8)
    bs = make(3, 1, sk)
    bs[1].broadcast(bs[1].make_item(b"hello", Signer(sk[1])))
    out = bs[1].tick(0.0)
    assert len(out) == 1 and out[0].to == EVERYONE

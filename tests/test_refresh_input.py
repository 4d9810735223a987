"""Bad input from peers never crashes the refresh engine and never changes what it decided.

Every message is decoded once at the boundary; whatever a peer sends (any phase, any body,
properly signed objects with garbage inside, replays of another period, floods) ends in
``rejected`` naming the peer, or is ignored, and never raises.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.crypto import encoding
from appliance.protocols._signed import sign
from appliance.protocols.refresh import MAX_HELD, MAX_MESSAGE, PEER_BUDGET, PeriodRefresh
from appliance.protocols.state import Constants
from appliance.sim import NetworkConfig, Simulation
from appliance.sim.cluster import SimServer
from appliance.sim.setup import make_network, seeded_bytes

C = Constants(n=4, t=1, period_length=4.0, delta=0.05, genesis=-3.5)
PHASES = [
    "pushm",
    "ann",
    "attest",
    "agree/keytable",
    "deal",
    "want",
    "checked",
    "agree/dealings",
    "catchup",
    "nonce",
    "signreq",
    "sigshare",
    "kt-sig",
    "rpoint",
    "phase2",
    "undecided",
    "signed-kt",
    "zzz",
]
KINDS = ["announce", "attest", "deal", "complain", "nonce", "signreq", "sigshare", "rpoint"]
bodies = st.recursive(
    st.none() | st.integers(-5, 2**70) | st.binary(max_size=80) | st.text(max_size=10),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=12,
)


def servers_mid_refresh() -> dict[int, SimServer]:
    setups = make_network(C, 5)
    servers = {i: SimServer(s, C, seeded_bytes(f"x{i}".encode())) for i, s in setups.items()}
    sim = Simulation(dict(servers), 5, NetworkConfig(max_delay=0.01))

    def kt_decided() -> bool:
        e = servers[1].engine
        return e is not None and e.kt is not None

    sim.run_until(C.period_start(1) + 2.0, stop=kt_decided)
    return servers


SERVERS = servers_mid_refresh()
ENGINE: PeriodRefresh = SERVERS[1].engine  # type: ignore[assignment]
assert ENGINE.kt is not None and not ENGINE.decided
KT_VALUE = ENGINE.kt.value


def _state() -> tuple[bytes | None, bool, int]:
    return (ENGINE.kt.value if ENGINE.kt else None, ENGINE.decided, len(ENGINE.dealings))


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(PHASES), bodies, st.sampled_from([2, 3]))
def test_any_body_in_any_phase_is_rejected_not_raised(phase: str, body: Any, sender: int) -> None:
    before = _state()
    ENGINE.receive(sender, phase, body, 100, 1.0)
    assert ENGINE.kt is not None and ENGINE.kt.value == KT_VALUE
    assert _state()[1] == before[1]
    assert all(r.peer in (2, 3) for r in ENGINE.rejected)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(KINDS), st.sampled_from(PHASES), bodies, st.sampled_from([2, 3]))
def test_properly_signed_objects_with_garbage_inside_are_rejected(
    kind: str, phase: str, body: Any, sender: int
) -> None:
    engine = SERVERS[sender].engine
    assert engine is not None
    raw = sign(kind, 1, body, engine.signer)
    ENGINE.receive(sender, phase, raw, len(raw), 1.0)
    assert ENGINE.kt is not None and ENGINE.kt.value == KT_VALUE


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_bytes_are_rejected_with_the_sender_named(data: bytes) -> None:
    core = SERVERS[1]
    before = len(core.rejected)
    core.receive(3, data, 1.0)
    assert len(core.rejected) == before + 1 and core.rejected[-1].startswith("server 3:")


def test_a_message_of_another_period_is_not_taken_for_this_one() -> None:
    core = SERVERS[1]
    data = encoding.encode({"period": 0, "phase": "ann", "body": b"x"})
    core.receive(2, data, 1.0)
    assert "period 0" in core.rejected[-1]


def test_an_oversized_message_is_refused_before_decoding() -> None:
    core = SERVERS[1]
    data = encoding.encode({"period": 1, "phase": "deal", "body": bytes(MAX_MESSAGE + 1)})
    core.receive(2, data, 1.0)
    assert "exceeds the limit" in core.rejected[-1]


def test_a_flooding_peer_is_cut_off_at_its_byte_budget() -> None:
    engine = SERVERS[2].engine
    assert engine is not None
    for _ in range(PEER_BUDGET // MAX_MESSAGE + 2):
        engine.receive(4, "zzz", None, MAX_MESSAGE, 1.0)
    assert any("byte budget" in r.reason for r in engine.rejected if r.peer == 4)
    count = len(engine.rejected)
    engine.receive(4, "zzz", None, 10, 1.0)
    assert len(engine.rejected) == count  # ignored, no more work


def test_early_messages_are_bounded_per_peer() -> None:
    setups = make_network(C, 6)
    s = setups[1]
    from appliance.protocols.refresh import MemoryDurable, PublicData

    engine = PeriodRefresh(
        me=1,
        period=1,
        vstart=s.vstart,
        public=PublicData(),  # no M yet: everything is held until PushM brings it
        private=None,
        rand=seeded_bytes(b"early"),
        durable=MemoryDurable(),
        now=0.0,
    )
    for _ in range(MAX_HELD + 5):
        engine.receive(3, "deal", b"x", 1, 0.0)
    assert sum(len(v) for v in engine._held.values()) == MAX_HELD
    assert any("too many early messages" in r.reason for r in engine.rejected)


def test_a_pushm_with_a_keytable_of_a_negative_period_is_refused_not_raised() -> None:
    """Review finding: it used to raise ValueError out of ServerCore.receive and stop the node."""
    from appliance.protocols.state import KeyTable

    core = SERVERS[1]
    assert core.public.m is not None and core.public.key_table is not None
    bad = KeyTable(-1, dict(core.public.key_table.entries), {}, frozenset()).encode()
    body = {
        "M": core.public.m.encode(),
        "keytable": bad,
        "sharings": {},
        "transcript": None,
        "upgrades": None,
    }
    core.receive(2, encoding.encode({"period": 1, "phase": "pushm", "body": body}), 1.0)
    core.receive(2, encoding.encode({"period": 2, "phase": "pushm", "body": body}), 1.0)
    assert ENGINE.rejected and "negative period" in str(ENGINE.rejected[-1])

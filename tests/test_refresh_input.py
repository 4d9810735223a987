"""Bad input from peers never crashes the refresh engine and never changes its state."""

from __future__ import annotations

import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from appliance.crypto import encoding
from appliance.protocols.refresh import CONTEXT, PeriodRefresh
from appliance.protocols.state import Constants
from appliance.sim import NetworkConfig, Simulation
from appliance.sim.cluster import SimServer
from appliance.sim.setup import make_network, seeded_bytes

C = Constants(n=4, t=1, period_length=4.0, delta=0.1, genesis=-3.5)
PHASES = [
    "pushm",
    "announce",
    "sign-request",
    "sign-share",
    "keytable-sig",
    "shares",
    "contrib",
    "deal",
    "zzz",
]
bodies = st.recursive(
    st.none() | st.integers(-5, 2**70) | st.binary(max_size=80) | st.text(max_size=10),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=12,
)


def engine_after_announce() -> tuple[PeriodRefresh, dict[int, SigningKey]]:
    setups = make_network(C, 5)
    servers = {i: SimServer(s, C, seeded_bytes(f"x{i}".encode())) for i, s in setups.items()}
    sim = Simulation(dict(servers), 5, NetworkConfig(max_delay=0.03))
    sim.run_until(C.period_start(1) + 0.75)  # inside the signing attempts: new keys are known
    engine = servers[1].engine
    assert engine is not None and engine.entries
    keys = {i: SigningKey(servers[i].engine.signing_seed) for i in (2, 3)}  # type: ignore[union-attr]
    return engine, keys


ENGINE, KEYS = engine_after_announce()


def signed(sender: int, phase: str, body: Any, period: int = 1) -> bytes:
    payload = encoding.signing_payload(phase, 1, CONTEXT, period, {"from": sender, "body": body})
    sig = bytes(KEYS[sender].sign(payload).signature)
    return encoding.encode({"phase": phase, "period": period, "from": sender, "body": body, "sig": sig})


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(PHASES), bodies, st.sampled_from([2, 3]))
def test_signed_messages_with_garbage_bodies_are_rejected_not_raised(
    phase: str, body: Any, sender: int
) -> None:
    before = len(ENGINE.rejected)
    table = ENGINE.table
    ENGINE.receive(sender, signed(sender, phase, body), ENGINE.schedule.at(ENGINE.schedule.sign) + 0.01)  # type: ignore[union-attr]
    assert ENGINE.table is table or (table is not None and ENGINE.table.body() == table.body())  # type: ignore[union-attr]
    assert len(ENGINE.rejected) >= before


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_bytes_are_rejected_with_the_sender_named(data: bytes) -> None:
    before = len(ENGINE.rejected)
    ENGINE.receive(3, data, 1.0)
    assert len(ENGINE.rejected) == before + 1 and ENGINE.rejected[-1].peer == 3


def test_replayed_message_of_another_period_is_rejected_with_a_reason() -> None:
    ENGINE.receive(2, signed(2, "sign-share", {"attempt": 0}, period=0), 1.0)
    assert "period 0" in ENGINE.rejected[-1].reason


def test_message_claiming_another_sender_is_rejected() -> None:
    ENGINE.receive(3, signed(2, "sign-share", {"attempt": 0}), 1.0)
    assert "claims to come from server 2" in ENGINE.rejected[-1].reason


def test_unsigned_message_is_rejected() -> None:
    data = encoding.encode(
        {"phase": "sign-share", "period": 1, "from": 2, "body": {}, "sig": random.randbytes(64)}
    )
    ENGINE.receive(2, data, 1.0)
    assert "not signed" in ENGINE.rejected[-1].reason

"""Seeded simulation of the agreement engine alone, with asynchrony and Byzantine members.

Each family builds n engines over :class:`~appliance.sim._net.Simulation`, injects its
faults (chosen by the seed) and checks, from the engines' own state:

* **agreement**: no two servers decide different values, and every decision carries a
  commit QC that verifies against the committee;
* **validity**: the decided value is one an honest server proposed or validated;
* **termination**: once the network behaves (after the family's GST), every honest server
  that is up decides within a bounded time;
* **no false alerts**: every alert names a Byzantine server.

Adversaries act on typed messages (:mod:`appliance.protocols.agreement._messages`) and
sign with the Byzantine server's own key, so they survive refactors of the engine.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nacl.signing import SigningKey

from appliance.crypto import encoding
from appliance.protocols._core import Outgoing, Signer
from appliance.protocols.agreement import (
    ACCEPT,
    Committee,
    Engine,
    Instance,
    MemoryStore,
    SafetyRules,
    Verdict,
    decode,
    digest,
    encode,
)
from appliance.protocols.agreement._messages import (
    COMMIT,
    PREPARE,
    Decide,
    Proposal,
    Timeout,
    Vote,
    proposal_statement,
    timeout_statement,
    vote_statement,
)
from appliance.sim._net import NetworkConfig, Simulation

INST = Instance("pst/sim", 1, "value")


class AgreementFailure(AssertionError):
    pass


@dataclass
class ValueApp:
    """Proposes its own value; accepts any value an honest server could propose."""

    me: int
    valid: set[bytes]

    def propose(self) -> bytes | None:
        return b"value of server %d" % self.me

    def validate(self, value: bytes, view: int) -> Verdict:
        from appliance.protocols.agreement import reject

        return ACCEPT if value in self.valid else reject("not a value an honest server proposed")


class EngineNode:
    """An engine on the simulated wire (CBOR in, CBOR out)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def receive(self, sender: int, data: bytes, now: float) -> None:
        self.engine.receive(sender, encoding.decode(data), now)

    def tick(self, now: float) -> list[Outgoing]:
        return [Outgoing(to, encoding.encode(obj)) for to, obj in self.engine.tick(now)]

    def next_wakeup(self, now: float) -> float | None:
        return self.engine.next_wakeup(now)


@dataclass
class AgreementRun:
    name: str
    seed: int
    n: int
    t: int
    sim: Simulation
    nodes: dict[int, EngineNode]
    signers: dict[int, Signer]
    committee: Committee
    stores: dict[int, MemoryStore]
    byzantine: set[int] = field(default_factory=set)
    down: set[int] = field(default_factory=set)
    gst: float = 0.0

    def fail(self, why: str) -> AgreementFailure:
        return AgreementFailure(f"agreement {self.name} seed {self.seed}: {why}")


BASE_TIMEOUT = 0.2


def build(name: str, seed: int, *, latency: float = 0.01) -> AgreementRun:
    rng = random.Random(seed)
    n, t = rng.choice([(4, 1), (5, 1), (7, 2), (10, 3)])
    signers = {i: Signer(SigningKey(rng.randbytes(32))) for i in range(1, n + 1)}
    committee = Committee(n, t, {i: s.public for i, s in signers.items()}, rotation=rng.randrange(n))
    valid = {b"value of server %d" % i for i in range(1, n + 1)}
    stores = {i: MemoryStore() for i in signers}
    nodes = {i: EngineNode(_engine(i, signers[i], committee, stores[i], valid, 0.0)) for i in signers}
    sim = Simulation(dict(nodes), seed, NetworkConfig(min_delay=latency / 4, max_delay=latency))
    return AgreementRun(name, seed, n, t, sim, nodes, signers, committee, stores)


def _engine(
    i: int, signer: Signer, committee: Committee, store: MemoryStore, valid: set[bytes], now: float
) -> Engine:
    return Engine(
        me=i,
        inst=INST,
        committee=committee,
        safety=SafetyRules(INST, signer, store),
        app=ValueApp(i, valid),
        base_timeout=BASE_TIMEOUT,
        now=now,
    )


def check(run: AgreementRun, *, deadline: float) -> None:
    run.sim.run_until(deadline, stop=lambda: _all_decided(run))
    decided: dict[int, bytes] = {}
    for i, node in run.nodes.items():
        if i in run.byzantine:
            continue
        d = node.engine.decided
        if d is not None:
            if d.qc.phase != COMMIT or d.qc.digest != digest(d.value):
                raise run.fail(f"server {i} decided without a matching commit QC")
            run.committee.verify_qc(INST, d.qc)
            decided[i] = d.value
        elif i not in run.down:
            raise run.fail(f"honest server {i} did not decide by {deadline:.1f} s (view {node.engine.view})")
    if len(set(decided.values())) > 1:
        raise run.fail(f"two different decisions: {sorted(set(decided.values()))}")
    for i, node in run.nodes.items():
        if i in run.byzantine:
            continue
        for a in node.engine.alerts:
            if a.server not in run.byzantine:
                raise run.fail(f"server {i} raised a false alert: {a}")


def _all_decided(run: AgreementRun) -> bool:
    return all(
        run.nodes[i].engine.decided is not None
        for i in run.nodes
        if i not in run.byzantine and i not in run.down
    )


# Adversaries ----------------------------------------------------------------------------------


def equivocator(run: AgreementRun, bad: int, rng: random.Random) -> Callable[..., list[tuple[float, bytes]]]:
    """Proposes two values (to two halves), votes for both in both phases, reports no QC in timeouts."""
    signer = run.signers[bad]
    other_value = b"value of server %d" % rng.choice([i for i in run.nodes if i != bad])
    half = set(rng.sample(sorted(run.nodes), len(run.nodes) // 2))

    def fault(sender: int, to: int, data: bytes, now: float, r: random.Random) -> list[tuple[float, bytes]]:
        msg = decode(encoding.decode(data))
        if to not in half:
            return [(0.0, data)]
        if isinstance(msg, Proposal):
            sig = signer.sign(proposal_statement(INST, msg.view, digest(other_value)))
            msg = Proposal(msg.view, other_value, msg.justify, sig)
        elif isinstance(msg, Vote):
            d = digest(other_value)
            msg = Vote(msg.phase, msg.view, d, signer.sign(vote_statement(INST, msg.phase, msg.view, d)))
        elif isinstance(msg, Timeout):
            msg = Timeout(msg.view, None, None, signer.sign(timeout_statement(INST, msg.view, -1, b"")))
        return [(0.0, encoding.encode(encode(msg)))]

    return fault


def garbage(run: AgreementRun, bad: int, rng: random.Random) -> Callable[..., list[tuple[float, bytes]]]:
    """Sends, besides its real messages, malformed and forged ones."""

    def fault(sender: int, to: int, data: bytes, now: float, r: random.Random) -> list[tuple[float, bytes]]:
        forged: list[Any] = [
            {"k": "vote", "phase": COMMIT, "view": 0, "digest": r.randbytes(32), "sig": r.randbytes(64)},
            {
                "k": "decide",
                "qc": {"phase": COMMIT, "view": 0, "digest": r.randbytes(32), "sigs": {}},
                "value": b"x",
            },
            {"k": "timeout", "view": 2**41, "qc": None, "value": None, "sig": r.randbytes(64)},
            {"k": "propose", "view": 1, "value": b"v", "tc": None, "sig": r.randbytes(64)},
            {"k": "nonsense"},
            [1, 2, 3],
        ]
        return [(0.0, data)] + [(0.0, encoding.encode(f)) for f in r.sample(forged, 2)]

    return fault


# Families ---------------------------------------------------------------------------------------


def honest(seed: int) -> AgreementRun:
    run = build("honest", seed)
    check(run, deadline=5.0)
    return run


def asynchrony(seed: int) -> AgreementRun:
    """Delays up to 10x the usual latency with reordering, and partitions that heal; in half
    the runs up to t members also equivocate."""
    rng = random.Random(seed)
    run = build("asynchrony", seed, latency=0.01 * rng.choice([1, 5, 10]))
    run.gst = rng.uniform(0.0, 3.0)
    members = sorted(run.nodes)
    if rng.random() < 0.5:
        _corrupt(run, rng, kinds=["equivocate"])
    cut = set(rng.sample(members, rng.randint(1, len(members) - 1)))
    for a in cut:
        for b in members:
            if b not in cut:
                run.sim.partition(a, b)

    def slow(sender: int, to: int, data: bytes, now: float, r: random.Random) -> list[tuple[float, bytes]]:
        return [(r.uniform(0, 0.1) if now < run.gst else 0.0, data)]

    for i in members:
        run.sim.faults[i] = slow
    run.sim.run_until(run.gst)
    run.sim.heal()
    check(run, deadline=run.gst + 60.0)
    return run


def late_votes(seed: int) -> AgreementRun:
    """The schedule that breaks protocols without locks: one server sees a decision in view v
    while the commit votes reach the others only after they gave up on v (late by up to 20
    view timeouts); in half the runs up to t members also equivocate."""
    rng = random.Random(seed)
    run = build("late-votes", seed, latency=0.01)
    lucky = rng.choice(sorted(run.nodes))
    lateness = rng.uniform(1, 20) * BASE_TIMEOUT
    phases = {COMMIT} if rng.random() < 0.7 else {PREPARE, COMMIT}
    until = rng.uniform(0.5, 5.0)
    if rng.random() < 0.5:
        _corrupt(run, rng, kinds=["equivocate", "garbage"])

    def late(sender: int, to: int, data: bytes, now: float, r: random.Random) -> list[tuple[float, bytes]]:
        msg = decode(encoding.decode(data))
        vote = isinstance(msg, Vote) and msg.phase in phases
        slow = (vote or isinstance(msg, Decide)) and to != lucky and now < until
        return [(lateness if slow else 0.0, data)]

    for i in run.nodes:
        if i not in run.byzantine:
            run.sim.faults[i] = late
    run.gst = until
    check(run, deadline=until + lateness + 60.0)
    return run


def byzantine(seed: int) -> AgreementRun:
    """Up to t Byzantine members: equivocating, sending garbage, or silent."""
    rng = random.Random(seed)
    run = build("byzantine", seed, latency=0.01 * rng.choice([1, 3]))
    _corrupt(run, rng, kinds=["equivocate", "garbage", "silent"])
    check(run, deadline=60.0)
    return run


def _corrupt(run: AgreementRun, rng: random.Random, *, kinds: list[str]) -> None:
    """Up to t Byzantine members, often the first leaders (whose lies matter most)."""
    count = rng.randint(1, run.t)
    if rng.random() < 0.5:
        first = [run.committee.leader(v) for v in range(run.n)]
        bad = set(first[:count])
    else:
        bad = set(rng.sample(sorted(run.nodes), count))
    run.byzantine |= bad
    for b in sorted(bad):
        kind = rng.choice(kinds)
        if kind == "equivocate":
            run.sim.faults[b] = equivocator(run, b, rng)
        elif kind == "garbage":
            run.sim.faults[b] = garbage(run, b, rng)
        else:
            run.sim.crash(b)


def crash_restart(seed: int) -> AgreementRun:
    """Up to t members crash at random times and restart from their persisted SafetyData."""
    rng = random.Random(seed)
    run = build("crash", seed, latency=0.01 * rng.choice([1, 3]))
    victims = rng.sample(sorted(run.nodes), rng.randint(1, run.t))
    valid = {b"value of server %d" % i for i in run.nodes}
    for v in victims:
        run.sim.run_until(rng.uniform(0.0, 0.03))
        run.sim.crash(v)
        run.sim.run_until(run.sim.now + rng.uniform(0.0, 1.0))
        node = EngineNode(_engine(v, run.signers[v], run.committee, run.stores[v], valid, run.sim.now))
        run.nodes[v] = node
        run.sim.restart(v, node)
    check(run, deadline=60.0)
    return run


def lossy(seed: int) -> AgreementRun:
    """Up to t members are down and, until the network behaves, each message is lost with
    probability up to 1/2 (a connection that breaks drops its frames): a certificate that moved
    one server to a later view may reach nobody else, and nobody sends it again unasked."""
    rng = random.Random(seed)
    run = build("lossy", seed, latency=0.01 * rng.choice([1, 3]))
    for b in rng.sample(sorted(run.nodes), rng.randint(1, run.t)):
        run.down.add(b)
        run.sim.crash(b)
    loss = rng.uniform(0.1, 0.5)
    run.gst = rng.uniform(0.5, 5.0)

    def lose(sender: int, to: int, data: bytes, now: float, r: random.Random) -> list[tuple[float, bytes]]:
        return [] if now < run.gst and r.random() < loss else [(0.0, data)]

    for i in run.nodes:
        run.sim.faults[i] = lose
    check(run, deadline=run.gst + 60.0)
    return run


FAMILIES: dict[str, Callable[[int], AgreementRun]] = {
    "agree-honest": honest,
    "agree-asynchrony": asynchrony,
    "agree-byzantine": byzantine,
    "agree-late-votes": late_votes,
    "agree-crash": crash_restart,
    "agree-lossy": lossy,
}


def run_seed(args: tuple[str, int]) -> str | None:
    name, seed = args
    try:
        FAMILIES[name](seed)
    except AgreementFailure as exc:
        return str(exc)
    except Exception as exc:
        return f"agreement {name} seed {seed}: {type(exc).__name__}: {exc}"
    return None

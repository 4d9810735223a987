"""Scenario families for the deterministic simulation; each run is a function of its seed.

``run(name, seed)`` builds a network, injects the family's faults (chosen by the seed),
runs the periods and checks the invariants that must hold whatever the faults:

* every honest server that was not crashed ends operational, with a share that matches
  its public verification share, and the network's public key never changes;
* any t+1 final shares of the honest servers reconstruct the group secret;
* all honest servers hold the same signed KeyTable;
* every alert names a server that was actually faulty (or the server itself, when it is
  the one that lost its data), and the injected fault is alerted when the family says so.

A failing run raises :class:`ScenarioFailure` whose message starts with the scenario
and seed, so that ``pst sim --scenario NAME --seed N`` replays it exactly.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from appliance.crypto import encoding, frost, shamir
from appliance.crypto.groups import ED25519
from appliance.crypto.secret import SecretScalar
from appliance.protocols._core import AlertKind, Outgoing
from appliance.protocols.refresh import PeriodRefresh, PrivateData, PublicData, Schedule, Status
from appliance.protocols.state import SCERT, Constants, InvariantInfo
from appliance.sim._net import NetworkConfig, Simulation
from appliance.sim.cluster import SimServer
from appliance.sim.setup import ServerSetup, make_network, seeded_bytes


class ScenarioFailure(AssertionError):
    pass


@dataclass
class Run:
    name: str
    seed: int
    constants: Constants
    sim: Simulation
    servers: dict[int, SimServer]
    faulty: set[int] = field(default_factory=set)
    crashed: set[int] = field(default_factory=set)
    #: Servers about which alerts are legitimate even though they end honest (crashed, wiped).
    alertable: set[int] = field(default_factory=set)
    expect_alerts: set[tuple[AlertKind, int]] = field(default_factory=set)
    periods: int = 1

    def fail(self, why: str) -> ScenarioFailure:
        return ScenarioFailure(f"scenario {self.name} seed {self.seed}: {why}")


# Byzantine engines ---------------------------------------------------------------------------


class BadShareEngine(PeriodRefresh):
    """Sends a wrong (but signed) refresh sub-share to one victim."""

    victim = 0

    def _deliver_sub(
        self, private: dict[int, list[list[Any]]], kind: str, sid: str, r: int, j: int, value: int
    ) -> None:
        if j == self.victim and kind == "refresh":
            value = (value + 1) % self.constants.group(sid).order
        super()._deliver_sub(private, kind, sid, r, j, value)


class SilentEngine(PeriodRefresh):
    """Takes part in nothing (a crashed or cut-off server that still answers PushM)."""

    def tick(self, now: float) -> list[Outgoing]:
        super().tick(now)
        return []


class FalseComplaintEngine(PeriodRefresh):
    """Complains about a correct sub-share, claiming it is bad (its evidence convicts itself)."""

    def _victim(self) -> int:
        return min(x for x in self.operational if x != self.me)

    def _batch_ok(self, kind: str, sid: str, r: int, received: Any) -> bool:
        return False if self._victim() in received else super()._batch_ok(kind, sid, r, received)

    def _check_sub(
        self, d: int, kind: str, sid: str, r: int, value: int, recipient: int | None = None
    ) -> bool:
        if recipient is None and d == self._victim():
            return False
        return super()._check_sub(d, kind, sid, r, value, recipient)


class BadFrostShareEngine(PeriodRefresh):
    """Sends wrong FROST signature shares for the KeyTable."""

    def _envelope(self, phase: str, body: Any, signer: Any) -> bytes:
        if phase == "sign-share" and isinstance(body, dict):
            share = frost.SignatureShare.from_bytes(body["share"])
            bad = frost.SignatureShare(share.identifier, (share.share + 1) % ED25519.order)
            body = {**body, "share": bad.to_bytes()}
        return super()._envelope(phase, body, signer)


EngineFactory = Callable[..., PeriodRefresh]


# Building and checking -------------------------------------------------------------------------


def build(
    name: str, seed: int, constants: Constants, *, periods: int = 1, config: NetworkConfig | None = None
) -> Run:
    setups = _setups(constants, seed)
    servers = {i: SimServer(s, constants, seeded_bytes(f"{seed}/{i}".encode())) for i, s in setups.items()}
    rng = random.Random(seed)
    cfg = config or NetworkConfig(
        min_delay=0.001,
        max_delay=rng.uniform(0.005, 0.6) * constants.delta,
        tick_interval=constants.delta / 4,
    )
    sim = Simulation(dict(servers), seed, cfg)
    return Run(name, seed, constants, sim, servers, periods=periods)


#: Period-0 key material is made from one of KEY_SETS seeds per configuration and copied
#: for each run (runs wipe and replace what they hold); everything else follows the run's
#: own seed. This keeps hundreds of seeds per family within the test budget.
KEY_SETS = 32
_SETUP_CACHE: dict[tuple[int, int, int], dict[int, ServerSetup]] = {}


def _setups(constants: Constants, seed: int) -> dict[int, ServerSetup]:
    key = (constants.n, constants.t, seed % KEY_SETS)
    if key not in _SETUP_CACHE:
        _SETUP_CACHE[key] = make_network(constants, seed % KEY_SETS)
    out = {}
    for i, s in _SETUP_CACHE[key].items():
        assert s.private is not None
        private = PrivateData(
            s.private.period,
            s.private.signing_seed,
            s.private.encryption_seed,
            {sid: SecretScalar(v.value, ED25519.order) for sid, v in s.private.shares.items()},
        )
        public = PublicData(s.public.m, s.public.key_table, dict(s.public.sharings))
        out[i] = ServerSetup(s.me, s.vstart, public, private)
    return out


def run_periods(run: Run) -> None:
    c = run.constants
    end = c.period_start(run.periods) + Schedule(0.0, c.delta, c.t).duration + 2 * c.delta
    run.sim.run_until(end)


def check(run: Run) -> None:
    c = run.constants
    honest = [i for i in c.ids if i not in run.faulty and i not in run.crashed]
    last = run.periods
    first = run.servers[honest[0]].public.m
    vcert = first.vcert if first is not None else b""
    tables = set()
    shares: dict[int, int] = {}
    for i in honest:
        s = run.servers[i]
        outcome = s.outcomes.get(last)
        if outcome is None:
            raise run.fail(f"server {i} has no outcome for period {last}")
        if outcome.status != Status.OPERATIONAL:
            raise run.fail(f"honest server {i} ends {outcome.status.value}: {outcome.failure}")
        if s.public.m is None or s.public.m.vcert != vcert:
            raise run.fail(f"server {i} holds another Vcert")
        table = s.public.key_table
        if table is None or not table.verify(vcert) or table.period != last:
            raise run.fail(f"server {i} holds no valid KeyTable for period {last}")
        tables.add(table.payload())
        sharing = s.public.sharings[SCERT]
        if sharing.public_key != vcert:
            raise run.fail(f"server {i}: the group public key changed")
        assert s.private is not None
        share = s.private.shares[SCERT].value
        if ED25519.mul_base(share) != sharing.verification_share(ED25519, i):
            raise run.fail(f"server {i}: share does not match its verification share")
        shares[i] = share
    if len(tables) != 1:
        raise run.fail("honest servers hold different KeyTables")
    if len(shares) >= c.t + 1:
        ids = sorted(shares)[: c.t + 1]
        secret = shamir.interpolate({i: shares[i] for i in ids}, ED25519.order)
        if ED25519.mul_base(secret) != vcert:
            raise run.fail("t+1 honest shares do not reconstruct the group key")
    alerted: set[tuple[AlertKind, int]] = set()
    for i in honest:
        for p, outcome in run.servers[i].outcomes.items():
            for a in outcome.alerts:
                alerted.add((a.kind, a.server))
                allowed = a.server in run.faulty | run.crashed | run.alertable or a.server == i
                if not allowed:
                    raise run.fail(f"server {i} raised a false alert in period {p}: {a}")
    missing = run.expect_alerts - alerted
    if missing:
        raise run.fail(f"expected alerts not raised: {sorted((k.value, s) for k, s in missing)}")


# Families --------------------------------------------------------------------------------------


def _constants(rng: random.Random, *, long_run: bool = False) -> Constants:
    # Every configuration meets n >= 3t+1; (4, 1) and (7, 2) are the smallest n for their t. An
    # n=7 run takes about twice as long as an n=5 one, so it is drawn less often, and least often
    # for runs over several periods (crash, partition, replay, late).
    weights = [5, 3, 1] if long_run else [4, 3, 1.5]
    n, t = rng.choices([(4, 1), (5, 1), (7, 2)], weights=weights)[0]
    # Period 1 starts half a second in; a period (4 s) is longer than a refresh (at most 2.6 s here).
    return Constants(n=n, t=t, period_length=4.0, delta=0.1, genesis=-3.5)


def honest(seed: int) -> Run:
    rng = random.Random(seed)
    run = build("honest", seed, _constants(rng))
    run_periods(run)
    return run


def bad_share(seed: int) -> Run:
    rng = random.Random(seed)
    c = _constants(rng)
    run = build("bad-share", seed, c)
    liar, victim = rng.sample(list(c.ids), 2)
    run.faulty.add(liar)
    engine = type("Liar", (BadShareEngine,), {"victim": victim})
    _use_engine(run.servers[liar], engine)
    run.expect_alerts.add((AlertKind.BAD_SHARE, liar))
    run_periods(run)
    return run


def silent(seed: int) -> Run:
    rng = random.Random(seed)
    c = _constants(rng)
    run = build("silent", seed, c)
    quiet = set(rng.sample(list(c.ids), rng.randint(1, c.t)))
    run.faulty |= quiet
    for q in quiet:
        _use_engine(run.servers[q], SilentEngine)
    run_periods(run)
    return run


def false_complaint(seed: int) -> Run:
    rng = random.Random(seed)
    c = _constants(rng)
    run = build("false-complaint", seed, c)
    liar = rng.choice(list(c.ids))
    run.faulty.add(liar)
    _use_engine(run.servers[liar], FalseComplaintEngine)
    run.expect_alerts.add((AlertKind.FALSE_COMPLAINT, liar))
    run_periods(run)
    return run


def crash(seed: int) -> Run:
    """Scenario E: a server is killed at a random point of the refresh, restarts, rejoins next period."""
    rng = random.Random(seed)
    c = _constants(rng, long_run=True)
    run = build("crash", seed, c, periods=2)
    victim = rng.choice(list(c.ids))
    at = c.period_start(1) + rng.uniform(0, Schedule(0.0, c.delta, c.t).duration)
    run.sim.run_until(at)
    saved = run.servers[victim]
    run.sim.crash(victim)
    run.sim.run_until(rng.uniform(at + 0.05, c.period_start(2) - 0.2))
    restarted = SimServer.__new__(SimServer)
    restarted.__dict__.update(saved.__dict__)
    restarted.engine = None  # in-memory protocol state is lost; persisted data survives
    restarted.next_period = c.period_at(run.sim.now) + 1
    restarted._early = []
    run.sim.restart(victim, restarted)
    run.servers[victim] = restarted
    run.alertable.add(victim)  # alerts about it are legitimate in the crash period
    run_periods(run)
    _require_rejoined(run, victim)
    return run


def corrupt(seed: int) -> Run:
    """Scenario B: a server's public data (M, KeyTable) is corrupted and its shares deleted."""
    rng = random.Random(seed)
    c = _constants(rng)
    run = build("corrupt", seed, c)
    victim = rng.choice(list(c.ids))
    s = run.servers[victim]
    assert s.public.m is not None
    m = s.public.m
    if rng.random() < 0.5:
        s.public.m = InvariantInfo(
            m.vcert, Constants(c.n, c.t, c.period_length, c.delta * 2), m.m, m.scert_signature
        )
    else:
        s.public.m = None
    s.public.key_table = None if rng.random() < 0.5 else s.public.key_table
    s.public.sharings = {}
    s.private = None
    run.alertable.add(victim)
    run_periods(run)
    return run


def impersonate(seed: int) -> Run:
    """Scenario C: the attacker holds server v's period key and announces a key of its own for v."""
    rng = random.Random(seed)
    c = _constants(rng)
    run = build("impersonate", seed, c)
    victim = rng.choice(list(c.ids))
    stolen = run.servers[victim].private
    assert stolen is not None
    from nacl.signing import SigningKey

    from appliance.protocols.broadcast import Item, encode_bundle, item_statement
    from appliance.protocols.state import KeyEntry, encryption_key_payload

    attacker_key = SigningKey(random.Random(seed + 1).randbytes(32))
    e = bytes(attacker_key.verify_key)
    entry = KeyEntry(e, e, bytes(attacker_key.sign(encryption_key_payload(victim, 1, e)).signature))
    payload = encoding.encode({"K": entry.to_obj(), "sharings": {}, "frost": []})
    session = encoding.encode(["pst/refresh", 1, "announce"])
    sig = bytes(SigningKey(stolen.signing_seed).sign(item_statement(session, 1, victim, payload)).signature)
    bundle = encode_bundle(session, 1, victim, [(Item(victim, payload, sig), {})])
    data = encoding.encode({"phase": "announce", "period": 1, "from": victim, "body": bundle, "sig": b""})
    targets = rng.sample([i for i in c.ids if i != victim], rng.randint(1, c.n - 1))
    start = c.period_start(1) + c.delta * 1.05
    run.sim.run_until(start)
    for j in targets:  # the attacker speaks for the victim (the transport cannot tell them apart)
        run.sim._push(start + 0.001, "deliver", j, victim, data)
    run.faulty.add(victim)
    run.expect_alerts.add((AlertKind.CONFLICTING_ANNOUNCEMENTS, victim))
    run_periods(run)
    return run


def partition(seed: int) -> Run:
    """A server is cut off from everyone for one refresh; it recovers at the next one."""
    rng = random.Random(seed)
    c = _constants(rng, long_run=True)
    run = build("partition", seed, c, periods=2)
    victim = rng.choice(list(c.ids))
    for j in c.ids:
        if j != victim:
            run.sim.partition(victim, j)
    run.sim.run_until(c.period_start(2) - 0.5)
    run.sim.heal()
    run.alertable.add(victim)
    run_periods(run)
    _require_rejoined(run, victim)
    return run


def bad_frost_share(seed: int) -> Run:
    rng = random.Random(seed)
    c = _constants(rng)
    run = build("bad-frost-share", seed, c)
    liar = 1  # the first leader always names itself as a signer: its bad share is always seen
    run.faulty.add(liar)
    _use_engine(run.servers[liar], BadFrostShareEngine)
    run.expect_alerts.add((AlertKind.BAD_SIGNATURE_SHARE, liar))
    run_periods(run)
    return run


def byzantine(seed: int) -> Run:
    """Scenario D: one of the malicious behaviours, chosen by the seed."""
    kinds = [bad_share, silent, false_complaint, impersonate, bad_frost_share]
    result = kinds[seed % len(kinds)](seed)
    result.name = f"byzantine/{result.name}"
    return result


def replay(seed: int) -> Run:
    """The network replays, in period 2, what a server sent in period 1: all of it is rejected."""
    rng = random.Random(seed)
    c = _constants(rng, long_run=True)
    run = build("replay", seed, c, periods=2)
    source = rng.choice(list(c.ids))
    recorded: list[tuple[int, bytes, float]] = []

    def record_and_replay(
        sender: int, to: int, data: bytes, now: float, r: random.Random
    ) -> list[tuple[float, bytes]]:
        wire = [(0.0, data)]
        period = c.period_at(now)
        if period == 1:
            recorded.append((to, data, now - c.period_start(1)))
        elif period == 2:
            offset = now - c.period_start(2)
            wire += [
                (0.0, old) for target, old, at in recorded if target == to and abs(at - offset) < c.delta
            ]
        return wire

    run.sim.faults[source] = record_and_replay
    run_periods(run)
    if not recorded:
        raise run.fail("nothing was recorded to replay")
    if not any("replayed" in r for i, srv in run.servers.items() if i != source for r in srv.rejected):
        raise run.fail("replayed messages were not rejected with a reason")
    return run


def late(seed: int) -> Run:
    """The synchrony assumption broken for one refresh: during period 1's dealing, complaints,
    reveals and confirmations, half the links deliver 2.5 rounds late, so servers may disagree
    on who dealt. CONFIRM keeps any server from erasing its old shares for new ones fewer
    than n-t servers hold; within two more refreshes every server is operational again on
    one sharing of the unchanged group key."""
    rng = random.Random(seed)
    c = _constants(rng, long_run=True)
    run = build("late", seed, c, periods=3)
    s = Schedule(c.period_start(1), c.delta, c.t)
    lo, hi = s.at(s.deal), s.at(s.end)
    slow = {(a, b) for a in c.ids for b in c.ids if a != b and rng.random() < 0.5}

    def fault(
        sender: int, to: int, data: bytes, now: float, _rng: random.Random
    ) -> list[tuple[float, bytes]]:
        return [(2.5 * c.delta if lo <= now < hi and (sender, to) in slow else 0.0, data)]

    for i in c.ids:
        run.sim.faults[i] = fault
    run.alertable |= set(c.ids)
    run_periods(run)
    return run


def faults(seed: int) -> Run:
    """Scenario E and friends: a crash at a random step, a partition, replayed old messages,
    or messages later than a round (broken synchrony)."""
    return (crash, partition, replay, late)[seed % 4](seed)


def _use_engine(server: SimServer, engine: type[PeriodRefresh]) -> None:
    original = server._start

    def start(period: int, now: float) -> None:
        original(period, now)
        assert server.engine is not None
        server.engine.__class__ = engine

    server._start = start  # type: ignore[method-assign]


def _require_rejoined(run: Run, victim: int) -> None:
    outcome = run.servers[victim].outcomes.get(run.periods)
    if outcome is None or outcome.status != Status.OPERATIONAL:
        why = outcome.failure if outcome else "no outcome"
        raise run.fail(f"crashed server {victim} did not rejoin by period {run.periods}: {why}")


#: The families that ``make test`` runs with hundreds of seeds each.
SEEDED_FAMILIES = ("honest", "byzantine", "faults", "corrupt")

FAMILIES: dict[str, Callable[[int], Run]] = {
    "byzantine": byzantine,
    "faults": faults,
    "partition": partition,
    "replay": replay,
    "late": late,
    "bad-frost-share": bad_frost_share,
    "honest": honest,
    "bad-share": bad_share,
    "silent": silent,
    "false-complaint": false_complaint,
    "crash": crash,
    "corrupt": corrupt,
    "impersonate": impersonate,
}


def run_seed(args: tuple[str, int]) -> str | None:
    """For process pools: None when the run passed, else the failure message (with its seed)."""
    name, seed = args
    try:
        run(name, seed)
    except ScenarioFailure as exc:
        return str(exc)
    except Exception as exc:  # a crash in the protocol code is a failure of the run, with its seed
        return f"scenario {name} seed {seed}: {type(exc).__name__}: {exc}"
    return None


def run(name: str, seed: int) -> Run:
    """Run one scenario and check it; raises ScenarioFailure naming the scenario and seed."""
    if name not in FAMILIES:
        raise KeyError(f"unknown scenario {name!r}; known: {', '.join(FAMILIES)}")
    result = FAMILIES[name](seed)
    check(result)
    return result

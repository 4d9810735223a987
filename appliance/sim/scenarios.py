"""Scenario families for the deterministic simulation; each run is a function of its seed.

``run(name, seed)`` builds a network, injects the family's faults (chosen by the seed),
runs the periods and checks, **from the servers' state** (not from what they report):

* **the key is never lost**: t+1 honest servers hold valid shares of one sharing of the
  unchanged group key, and those shares reconstruct it;
* **at most one KeyTable per period**: every KeyTable any honest server ever decided or
  signed for a period is the same;
* **old shares are gone after the decision**: an honest server holds shares of its last
  decided period only, and no pending record of a decided period;
* **no honest server is accused**: every alert names a faulty server (or the server itself
  when it is the one that lost its data or had its key stolen), except that any server may be
  named for missing a refresh (``server-missed-refresh``: silence, not misbehaviour), and such
  an alert must be true: the server named is not in that period's KeyTable;
* **progress once the network behaves**: every honest server that is up ends operational
  in the last period, on one signed KeyTable.

A failing run raises :class:`ScenarioFailure` whose message starts with the scenario and
seed, so that ``pst sim --scenario NAME --seed N`` replays it exactly.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from appliance.crypto import shamir
from appliance.crypto.groups import ED25519
from appliance.crypto.secret import SecretScalar
from appliance.protocols._core import AlertKind
from appliance.protocols.refresh import (
    MemoryDurable,
    Outcome,
    PeriodRefresh,
    PrivateData,
    PublicData,
    Status,
    base_timeout,
)
from appliance.protocols.state import SCERT, Constants, InvariantInfo, sharing_digest
from appliance.sim import adversaries
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
    #: Every KeyTable payload decided or signed, per period, by any honest server.
    tables: dict[int, set[bytes]] = field(default_factory=dict)
    #: (server, period, [time it finished that period]): it must finish before the period ends.
    deadlines: list[tuple[int, int, list[float]]] = field(default_factory=list)
    #: The payload of the KeyTable each distinct (proposal, period, old keys, TPM keys, previous
    #: KeyTable) judges to (judge_keytable is a function of these; failures are not kept).
    judged: dict[tuple[object, ...], bytes] = field(default_factory=dict)

    def fail(self, why: str) -> ScenarioFailure:
        return ScenarioFailure(f"scenario {self.name} seed {self.seed}: {why}")


# Building and checking -------------------------------------------------------------------------


PERIOD = 4.0


def build(
    name: str,
    seed: int,
    constants: Constants,
    *,
    periods: int = 1,
    config: NetworkConfig | None = None,
    tpm: frozenset[int] = frozenset(),
) -> Run:
    setups = _setups(constants, seed, tpm)
    servers = {i: SimServer(s, constants, seeded_bytes(f"{seed}/{i}".encode())) for i, s in setups.items()}
    rng = random.Random(seed)
    cfg = config or NetworkConfig(min_delay=0.001, max_delay=rng.uniform(0.002, 0.05), tick_interval=0.05)
    sim = Simulation(dict(servers), seed, cfg)
    run = Run(name, seed, constants, sim, servers, periods=periods)
    for i, s in servers.items():
        _watch(run, i, s)
    return run


def _watch(run: Run, i: int, server: SimServer) -> None:
    """Record every KeyTable the server decides or signs (the at-most-one-per-period check)."""
    previous = server.on_outcome

    def on_outcome(period: int, outcome: Outcome) -> None:
        pub = outcome.public
        if pub.transcript is not None and pub.transcript.period == period:
            from appliance.protocols.refresh import judge_keytable

            kt = run.constants
            try:
                engine = server.engine
                old = engine.old_keys if engine is not None else {}
                ann_keys = engine.ann_keys if engine is not None else {}
                prev = engine.prev if engine is not None else b""
                value = pub.transcript.kt_value
                # Every server's outcome holds the same transcript: judged once per distinct input.
                key = (value, period, tuple(sorted(old.items())), tuple(sorted(ann_keys.items())), prev)
                payload = run.judged.get(key)
                if payload is None:
                    table = judge_keytable(value, period, kt, old, ann_keys=ann_keys, prev=prev).table
                    payload = run.judged[key] = table.payload()
                run.tables.setdefault(period, set()).add(payload)
            except Exception:  # judged again by the checker below
                pass
        if pub.key_table is not None:
            run.tables.setdefault(pub.key_table.period, set()).add(pub.key_table.payload())
        if previous is not None:
            previous(period, outcome)

    server.on_outcome = on_outcome


#: Period-0 key material is made from one of KEY_SETS seeds per configuration and copied
#: for each run (runs wipe and replace what they hold); everything else follows the run's
#: own seed. This keeps hundreds of seeds per family within the test budget.
KEY_SETS = 32
#: Keyed by the whole of C (M holds C: a setup made for other constants would run this run with
#: that setup's period length, delta and genesis).
_SETUP_CACHE: dict[tuple[bytes, int, frozenset[int]], dict[int, ServerSetup]] = {}


def _setups(constants: Constants, seed: int, tpm: frozenset[int] = frozenset()) -> dict[int, ServerSetup]:
    key = (constants.encode(), seed % KEY_SETS, tpm)
    if key not in _SETUP_CACHE:
        _SETUP_CACHE[key] = make_network(constants, seed % KEY_SETS, tpm=tpm)
    out = {}
    for i, s in _SETUP_CACHE[key].items():
        assert s.private is not None
        private = PrivateData(
            s.private.period,
            s.private.signing_seed,
            s.private.encryption_seed,
            {sid: SecretScalar(v.value, constants.group(sid).order) for sid, v in s.private.shares.items()},
        )
        public = PublicData(s.public.m, s.public.key_table, dict(s.public.sharings))
        out[i] = ServerSetup(s.me, s.vstart, public, private, s.ann_key)
    return out


def end_of(c: Constants, period: int) -> float:
    return c.period_start(period) + PERIOD - 0.1


def run_periods(run: Run) -> None:
    run.sim.run_until(end_of(run.constants, run.periods))


def check(run: Run) -> None:
    c = run.constants
    honest = [i for i in c.ids if i not in run.faulty and i not in run.crashed]
    last = run.periods
    vcert = _vcert(run)
    signed: set[bytes] = set()
    holders: dict[int, int] = {}
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
        signed.add(table.payload())
    if len(signed) != 1:
        raise run.fail("honest servers hold different KeyTables")
    for period, tables in sorted(run.tables.items()):
        if len(tables) > 1:
            raise run.fail(f"{len(tables)} different KeyTables for period {period}")
    # The key is never lost; old shares are gone (checked on every honest server that is up).
    by_sharing: dict[bytes, dict[int, int]] = {}
    for i in honest:
        s = run.servers[i]
        priv, pub = s.private, s.public
        if priv is None or priv.period != pub.decided_period:
            raise run.fail(f"server {i} holds private data of another period than its last decision")
        if any(int(k.split("/")[0]) <= pub.decided_period for k in _durable(s).data):
            raise run.fail(f"server {i} still holds pending records of a decided period")
        sharing = pub.sharings.get(SCERT)
        share = priv.shares.get(SCERT)
        if sharing is None or share is None:
            continue
        if sharing.public_key != vcert:
            raise run.fail(f"server {i}: the group public key changed")
        if ED25519.mul_base(share.value) != sharing.verification_share(ED25519, i):
            raise run.fail(f"server {i}: share does not match its verification share")
        by_sharing.setdefault(sharing_digest(ED25519, sharing), {})[i] = share.value
        holders[i] = share.value
    best = max(by_sharing.values(), key=len, default={})
    if len(best) < c.t + 1:
        raise run.fail(f"only {len(best)} honest servers hold shares of one sharing: the key is lost")
    ids = sorted(best)[: c.t + 1]
    if ED25519.mul_base(shamir.interpolate({i: best[i] for i in ids}, ED25519.order)) != vcert:
        raise run.fail("t+1 honest shares do not reconstruct the group key")
    alerted: set[tuple[AlertKind, int]] = set()
    for i in honest:
        for a in run.servers[i].alert_log:
            alerted.add((a.kind, a.server))
            if a.kind == AlertKind.MISSED_REFRESH:
                done = run.servers[i].outcomes.get(a.period)
                table = done.public.key_table if done is not None else None
                if table is None or table.period != a.period or a.server in table.entries:
                    raise run.fail(
                        f"server {i} raised a false alert: server {a.server} is in that KeyTable: {a}"
                    )
                continue
            allowed = a.server in run.faulty | run.crashed | run.alertable or a.server == i
            if not allowed:
                raise run.fail(f"server {i} raised a false alert in period {a.period}: {a}")
    for server, period, finished in run.deadlines:
        if not finished or finished[0] >= c.period_start(period + 1):
            raise run.fail(f"server {server} finished period {period} only after it ended")
    missing = run.expect_alerts - alerted
    if missing:
        raise run.fail(f"expected alerts not raised: {sorted((k.value, s) for k, s in missing)}")


def _durable(s: SimServer) -> MemoryDurable:
    assert isinstance(s.durable, MemoryDurable)
    return s.durable


def _vcert(run: Run) -> bytes:
    for s in run.servers.values():
        if s.public.m is not None:
            return s.public.m.vcert
    raise run.fail("no server holds M")


# Families --------------------------------------------------------------------------------------


def _constants(rng: random.Random, *, long_run: bool = False) -> Constants:
    weights = [6, 3, 2, 0] if long_run else [5, 3, 2, 0.3]
    n, t = rng.choices([(4, 1), (5, 1), (7, 2), (10, 3)], weights=weights)[0]
    # Period 1 starts half a second in; a refresh takes well under a period here.
    return Constants(n=n, t=t, period_length=PERIOD, delta=0.05, genesis=0.5 - PERIOD)


def honest(seed: int) -> Run:
    rng = random.Random(seed)
    run = build("honest", seed, _constants(rng))
    run_periods(run)
    return run


def _byzantine(run: Run, rng: random.Random, kind: str) -> int:
    c = run.constants
    liar = rng.choice(list(c.ids))
    if kind == "hasty-leader":
        liar = sorted(c.ids)[1 % c.n]  # the first leader of period 1's KeyTable agreement
    run.faulty.add(liar)
    server = run.servers[liar]
    others = [i for i in c.ids if i != liar]
    if kind == "bad-share":
        _use_engine(server, type("Liar", (adversaries.BadDealingEngine,), {"victim": rng.choice(others)}))
        run.expect_alerts.add((AlertKind.BAD_SHARE, liar))
    elif kind == "false-complaint":
        _use_engine(server, adversaries.FalseComplaintEngine)
        run.expect_alerts.add((AlertKind.FALSE_COMPLAINT, liar))
    elif kind == "silent":
        run.sim.crash(liar)
    elif kind == "bad-frost-share":
        run.sim.faults[liar] = adversaries.bad_frost_shares(server)
    elif kind == "share-spammer":
        run.sim.faults[liar] = adversaries.share_spammer(server)
    elif kind == "foreign-commitments":
        run.sim.faults[liar] = adversaries.foreign_commitments(server, rng.choice(others))
    elif kind == "clear-forger":
        run.sim.faults[liar] = adversaries.clear_forger(server, rng.choice(others), run.seed)
    elif kind == "equivocating-leader":
        run.sim.faults[liar] = adversaries.equivocating_leader(server)
    elif kind == "equivocating-dealer":
        victim = rng.choice(others)
        _use_engine(server, type("Liar", (adversaries.TwoDealingsEngine,), {"victim": victim}))
        run.sim.faults[victim] = adversaries.slow_deal_forwards(1, 2.0)
        run.expect_alerts.add((AlertKind.EQUIVOCATION, liar))
    elif kind == "hasty-leader":
        victims = tuple(rng.sample(others, c.t))
        _use_engine(server, type("Liar", (adversaries.HastyLeaderEngine,), {"victims": victims}))
        run.sim.faults[liar] = adversaries.silent_after_keytable(1)
        for v in victims:
            run.sim.faults[v] = adversaries.slow_announcements(1, rng.uniform(0.03, 0.15))
    else:  # pragma: no cover - the families below name their kinds
        raise ValueError(kind)
    return liar


BYZANTINE = (
    "bad-share",
    "false-complaint",
    "silent",
    "bad-frost-share",
    "share-spammer",
    "foreign-commitments",
    "clear-forger",
    "equivocating-leader",
    "equivocating-dealer",
    "hasty-leader",
)


def byzantine(seed: int) -> Run:
    """Scenario D: one malicious behaviour, chosen by the seed; it is named and the refresh completes."""
    rng = random.Random(seed)
    kind = BYZANTINE[seed % len(BYZANTINE)]
    run = build(f"byzantine/{kind}", seed, _constants(rng), periods=2)
    _byzantine(run, rng, kind)
    run_periods(run)
    return run


def _single(kind: str) -> Callable[[int], Run]:
    def family(seed: int) -> Run:
        rng = random.Random(seed)
        run = build(kind, seed, _constants(rng), periods=2)
        _byzantine(run, rng, kind)
        run_periods(run)
        return run

    return family


def crash(seed: int) -> Run:
    """Scenario E: a server is killed at a random point, restarts from what it persisted, rejoins."""
    rng = random.Random(seed)
    c = _constants(rng, long_run=True)
    run = build("crash", seed, c, periods=3)
    victim = rng.choice(list(c.ids))
    at = c.period_start(1) + rng.uniform(0, 0.4)
    run.sim.run_until(at)
    saved = run.servers[victim]
    run.sim.crash(victim)
    run.sim.run_until(at + rng.uniform(0.01, 2.0))
    _restart(run, victim, saved)  # in-memory protocol state is lost; persisted data survives
    run_periods(run)
    return run


def corrupt(seed: int) -> Run:
    """Scenario B: a server's public data (M, KeyTable) is corrupted and its shares deleted."""
    rng = random.Random(seed)
    c = _constants(rng)
    run = build("corrupt", seed, c, periods=2)
    victim = rng.choice(list(c.ids))
    s = run.servers[victim]
    assert s.public.m is not None
    m = s.public.m
    damage = rng.choice(["M changed", "M deleted", "sharings deleted"])
    if damage == "M changed":
        s.public.m = InvariantInfo(
            m.vcert, Constants(c.n, c.t, c.period_length, c.delta * 2), m.m, m.scert_signature
        )
    elif damage == "M deleted":
        s.public.m = None
    if damage != "sharings deleted":
        s.public.key_table = None if rng.random() < 0.5 else s.public.key_table
    s.public.sharings = {}
    s.private = None
    run.alertable.add(victim)
    if damage == "sharings deleted" and rng.random() < 0.5:
        # It keeps M and the KeyTable, so it starts at once; the PushM that brings the sharing is
        # late: at the decision it lacks the sharing, and must not blame the helpers for it.
        for i in c.ids:
            if i != victim:
                run.sim.faults[i] = adversaries.slow_pushm_to(victim, 1, 1.5)
    run_periods(run)
    return run


def impersonate(seed: int) -> Run:
    """Scenario C: the attacker holds server v's period key and announces a key of its own for v."""
    from nacl.signing import SigningKey

    from appliance.crypto import vdec
    from appliance.protocols._core import Signer
    from appliance.protocols._signed import sign
    from appliance.protocols.state import KeyEntry, encryption_key_payload

    rng = random.Random(seed)
    c = _constants(rng)
    run = build("impersonate", seed, c, periods=2)
    victim = rng.choice(list(c.ids))
    stolen = run.servers[victim].private
    assert stolen is not None
    attacker = Signer(SigningKey(random.Random(seed + 1).randbytes(32)))
    e = vdec.public_key(777)
    entry = KeyEntry(attacker.public, e, attacker.sign(encryption_key_payload(victim, 1, e)))
    body = {"server": victim, "K": entry.to_obj(), "sharings": {}, "clear": False}
    ann = sign("announce", 1, body, Signer(SigningKey(stolen.signing_seed)))
    from appliance.crypto import encoding

    data = encoding.encode({"period": 1, "phase": "ann", "body": ann})
    targets = rng.sample([i for i in c.ids if i != victim], rng.randint(1, c.n - 1))
    start = c.period_start(1) + rng.uniform(0.0, 0.01)
    run.sim.run_until(start)
    for j in targets:  # the attacker speaks for the victim (the transport cannot tell them apart)
        run.sim._push(start + 0.001, "deliver", j, victim, data)
    run.faulty.add(victim)
    run.expect_alerts.add((AlertKind.CONFLICTING_ANNOUNCEMENTS, victim))
    run_periods(run)
    _require_rejoined(run, victim)
    return run


def tpm_impostor(seed: int, *, tpm: bool = True) -> Run:
    """Scenario C with TPM ROMs (issue 8): an attacker broke into server v, stole its period key,
    wiped its disk and left; from then on it announces keys for v on v's connection, every period:
    a clear announcement its TPM did not sign (sometimes with a made-up "TPM" signature) and, in
    the first period, one signed with v's stolen period key. v's own announcement is signed by its
    TPM over the previous KeyTable, so it counts: v recovers in the first period, and the
    impostor is named. With ``tpm=False`` (today's rule) the test shows v staying blocked."""
    from nacl.signing import SigningKey

    from appliance.crypto import encoding, vdec
    from appliance.crypto.annkey import SoftAnnouncementKey
    from appliance.protocols._core import Signer
    from appliance.protocols._signed import sign
    from appliance.protocols.state import KeyEntry, encryption_key_payload

    rng = random.Random(seed)
    c = _constants(rng)
    periods = 2
    victim = rng.choice(list(c.ids))
    others = [i for i in c.ids if i != victim]
    # Every server with a TPM, or the victim and a random set of the others.
    with_tpm = frozenset(c.ids) if rng.random() < 0.5 else frozenset([victim, *rng.sample(others, c.t)])
    run = build(
        "tpm-impostor" if tpm else "no-tpm-impostor",
        seed,
        c,
        periods=periods,
        tpm=with_tpm if tpm else frozenset(),
    )
    s = run.servers[victim]
    stolen = s.private
    assert stolen is not None
    # The wipe: only the ROM (Vstart) and the TPM are left.
    s.public = PublicData()
    s.private = None
    _durable(s).data.clear()
    run.alertable.add(victim)
    attacker = random.Random(seed + 1)
    fake_tpm = SoftAnnouncementKey(attacker.randbytes(32))
    for p in range(1, periods + 1):
        at = c.period_start(p) + rng.uniform(0.0, 0.01)
        run.sim.run_until(at)
        fake = Signer(SigningKey(attacker.randbytes(32)))
        e = vdec.public_key(1000 + p)
        entry = KeyEntry(fake.public, e, fake.sign(encryption_key_payload(victim, p, e)))
        body = {"server": victim, "K": entry.to_obj(), "sharings": {}, "clear": True}
        if tpm and rng.random() < 0.3:
            body["tpm"] = fake_tpm.sign(b"a signature by a key that is not v's")
        anns = [sign("announce", p, body, fake)]
        if p == 1 and rng.random() < 0.5:
            auth = {"server": victim, "K": entry.to_obj(), "sharings": {}, "clear": False}
            anns.append(sign("announce", p, auth, Signer(SigningKey(stolen.signing_seed))))
        targets = rng.sample(others, rng.randint(max(1, len(others) - c.t), len(others)))
        for ann in anns:
            data = encoding.encode({"period": p, "phase": "ann", "body": ann})
            for j in targets:  # the attacker speaks for the victim (the transport cannot tell them apart)
                run.sim._push(at + 0.001, "deliver", j, victim, data)
    if tpm:
        run.expect_alerts.add((AlertKind.CONFLICTING_ANNOUNCEMENTS, victim))
    run_periods(run)
    if tpm:
        first = run.servers[victim].outcomes.get(1)
        if first is None or first.status != Status.OPERATIONAL:
            why = first.failure if first is not None else "no outcome"
            raise run.fail(f"server {victim} (TPM-backed, wiped) did not recover in period 1: {why}")
    return run


def partition(seed: int) -> Run:
    """A server is cut off from everyone for one to three periods; it rejoins and heals."""
    rng = random.Random(seed)
    c = _constants(rng, long_run=True)
    cut = rng.randint(1, 3)
    run = build("partition", seed, c, periods=cut + 1)
    victim = rng.choice(list(c.ids))
    for j in c.ids:
        if j != victim:
            run.sim.partition(victim, j)
    run.sim.run_until(c.period_start(cut) + rng.uniform(0.5, 3.5))
    run.sim.heal()
    run.alertable.add(victim)
    run_periods(run)
    return run


def stale(seed: int) -> Run:
    """A server is down for two refreshes and restarts just after the third began, holding a
    KeyTable two periods old and shares that match it: it missed its peers' PushM and can verify
    nothing they send. Its peers push again when it announces itself with a key they do not know,
    or show it the signed KeyTable once they decided: it finishes that period (recovering, or
    even operational) before the period ends, and is operational in the next."""
    rng = random.Random(seed)
    c = _constants(rng, long_run=True)
    run = build("stale", seed, c, periods=4)
    victim = rng.choice(list(c.ids))
    run.sim.run_until(c.period_start(1) - rng.uniform(0.05, 0.4))
    saved = run.servers[victim]
    run.sim.crash(victim)
    run.sim.run_until(c.period_start(3) + rng.uniform(0.0, 0.1))
    _restart(run, victim, saved)
    _require_decided_in_time(run, victim, 3)
    run_periods(run)
    return run


def _require_decided_in_time(run: Run, victim: int, period: int) -> None:
    """After the run, fail unless ``victim`` finished ``period`` (decided or gave way) before it ended."""
    finished: list[float] = []
    server = run.servers[victim]
    previous = server.on_outcome

    def on_outcome(p: int, outcome: Outcome) -> None:
        if p == period and outcome.public.complete and not finished:
            finished.append(run.sim.now)
        if previous is not None:
            previous(p, outcome)

    server.on_outcome = on_outcome
    run.deadlines.append((victim, period, finished))


def _restart(run: Run, victim: int, saved: SimServer) -> None:
    """Start ``victim`` again from what ``saved`` persisted; alerts about it are expected."""
    restarted = _restarted(saved)
    run.sim.restart(victim, restarted)
    run.servers[victim] = restarted
    run.alertable.add(victim)


def _restarted(saved: SimServer) -> SimServer:
    """The server as a new process builds it from what it persisted (memory is lost)."""
    restarted = SimServer.__new__(SimServer)
    restarted.__dict__.update(saved.__dict__)
    restarted.engine = None
    restarted.next_period = restarted.public.decided_period + 1
    restarted._early = {}
    restarted._persisted = (-1, 0)
    restarted.code_results = []
    return restarted


def late_restarts(seed: int) -> Run:
    """Issue 8, a known liveness bug (test_simulation marks it xfail): two of four servers are
    down when period 2's refresh begins, so it cannot decide (beyond the fault budget, rightly).
    They restart a period later and start the refresh of the clock's period, 3, while the two
    that stayed up wait on period 2: each pair holds the other's messages as early and neither
    refresh decides, although all four are up again (within the budget). Expected: the network
    refreshes again within two periods of the restarts."""
    rng = random.Random(seed)
    c = Constants(n=4, t=1, period_length=PERIOD, delta=0.05, genesis=0.5 - PERIOD)
    run = build("late-restarts", seed, c, periods=6)
    victims = rng.sample(list(c.ids), 2)
    run.sim.run_until(c.period_start(2) - rng.uniform(0.05, 0.3))
    saved = {v: run.servers[v] for v in victims}
    for v in victims:
        run.sim.crash(v)
    run.sim.run_until(c.period_start(3) + rng.uniform(0.05, 0.5))
    for v in victims:
        _restart(run, v, saved[v])
    for i in c.ids:
        _require_decided_in_time(run, i, 5)
    run_periods(run)
    return run


def cut_after_decision(seed: int) -> Run:
    """Issue 8 (found by test_wan): a server is cut off right after it decided period 1 and
    persisted its new shares, before the KeyTable was signed, and comes back three periods
    later. It waited for period 1's KeyTable signature, which its peers, three refreshes on,
    no longer send. Now a signed KeyTable of a later period (in their PushM) shows it that its
    shares are superseded: it erases them, recovers, and is operational again."""
    rng = random.Random(seed)
    c = Constants(n=4, t=1, period_length=PERIOD, delta=0.05, genesis=0.5 - PERIOD)
    run = build("cut-after-decision", seed, c, periods=7)
    victim = rng.choice(list(c.ids))
    server = run.servers[victim]

    def decided_not_signed() -> bool:
        return server.public.decided_period == 1 and not server.public.complete

    run.sim.run_until(c.period_start(2), stop=decided_not_signed)
    if not decided_not_signed():
        raise run.fail(f"server {victim} never was between its decision and the signature")
    run.sim.crash(victim)
    run.sim.run_until(c.period_start(4) + rng.uniform(0.05, 0.5))
    _restart(run, victim, server)
    _require_decided_in_time(run, victim, 6)
    run_periods(run)
    return run


def late_recovering(seed: int) -> Run:
    """A server that lost its shares (its period key kept) starts the refresh up to a few tenths
    of a second after the others (its process got the CPU last: test_ca_tsa_faults on a busy
    2-core machine). Its clear announcement then needs t+1 attestations after the others'
    announcements are all in: the first leader waits for them, and a first leader that does not
    is refused by the servers that hold them. It must be operational after that refresh, not a
    whole period later.

    What the rule guarantees, and so what the family draws: a start up to half a view timeout
    (the voters' wait for missing announcements) less the time its announcement and the
    attestations take (two message delays and a tick). A server later than that may be left
    out of this refresh and recovers at the next one, with alerts on both sides (3 of 500 seeds
    drawn up to 0.3 s late at 0.32 s of wait fell there)."""
    rng = random.Random(seed)
    c = Constants(n=rng.choice([4, 5, 7]), t=1, period_length=PERIOD, delta=0.08, genesis=0.5 - PERIOD)
    if c.n == 7 and rng.random() < 0.5:
        c = Constants(n=7, t=2, period_length=PERIOD, delta=0.08, genesis=0.5 - PERIOD)
    run = build("late-recovering", seed, c, periods=1)
    victim = rng.choice(list(c.ids))
    server = run.servers[victim]
    assert server.private is not None
    server.private.shares = {}
    run.alertable.add(victim)
    net = run.sim.config
    bound = base_timeout(c) / 2 - 2 * net.max_delay - net.tick_interval
    late = rng.uniform(min(0.1, bound / 2), bound)

    def starts_late(
        sender: int, to: int, data: bytes, now: float, rng: random.Random
    ) -> list[tuple[float, bytes]]:
        return [(max(0.0, c.period_start(1) + late - now), data)]

    run.sim.faults[victim] = starts_late
    run_periods(run)
    _require_rejoined(run, victim)
    return run


def _wipe_shares(server: SimServer) -> None:
    """The attacker deleted the server's shares; its period key (and the rest) is kept."""
    assert server.private is not None
    server.private.shares = {}


class SlowCodeCheck:
    """A recovering server's code check (``CodeCheck``) that takes ``cost`` seconds, as hashing
    the installed code does (about 0.2 s warm and up to 17 s cold on the loaded 2-core machine).
    It runs off the server's loop, as the node runs it (a worker thread): the server goes on
    with the refresh meanwhile and its result is an event ``cost`` later (``SimServer``)."""

    def __init__(self, run: Run, victim: int, cost: float) -> None:
        self.run, self.victim, self.cost = run, victim, cost
        self.running: list[tuple[float, float]] = []
        self.calls = 0

    def chain(self) -> bytes | None:
        return None

    def check(self, m: InvariantInfo, chains: list[bytes]) -> str | None:
        now = self.run.sim.now
        self.running.append((now, now + self.cost))
        self.calls += 1
        return None

    def install(self, server: SimServer) -> None:
        server.code = self
        server.code_seconds = self.cost


def wiped_restart(seed: int) -> Run:
    """(docs/tsa.md, test_tsa_threshold_faults) A server is stopped, its shares wiped (its period
    key kept), and restarted at a random point of a period: before, during or after that period's
    refresh. As a recovering server it checks its installed code at every refresh, which takes a
    while (``SlowCodeCheck``, off its loop), and its process may also be a little slow to get
    going. It must be operational after the next refresh that begins once it is up.
    Before the check moved after the announcement, the announcement left only once the check was
    done, beyond the first leader's grace, and the server stayed recovering (39 of 40 seeds)."""
    rng = random.Random(seed)
    c = _constants(rng, long_run=True)
    up = rng.randint(1, 2)
    run = build("wiped-restart", seed, c, periods=up + 1)
    victim = rng.choice(list(c.ids))
    down = c.period_start(up) - rng.uniform(0.1, 1.5)
    run.sim.run_until(down)
    saved = run.servers[victim]
    run.sim.crash(victim)
    cost = rng.uniform(0.3, 1.5)
    # Not so late that the check it runs at once still runs when the next period starts (the
    # check no longer keeps the server busy, but that period's decision would wait for it).
    back = c.period_start(up) + rng.uniform(-0.05, PERIOD - 0.6 - cost)
    run.sim.run_until(max(down + 0.01, back))
    _wipe_shares(saved)
    _restart(run, victim, saved)
    check = SlowCodeCheck(run, victim, cost)
    check.install(run.servers[victim])
    slow = rng.uniform(0.0, 0.3)

    def busy(sender: int, to: int, data: bytes, now: float, r: random.Random) -> list[tuple[float, bytes]]:
        return [(max(back + slow - now, 0.0), data)]

    run.sim.faults[victim] = busy
    run_periods(run)
    if not check.calls:
        raise run.fail(f"server {victim} never checked its code while recovering")
    _require_rejoined(run, victim)
    return run


def stale_wiped(seed: int) -> Run:
    """(docs/tsa.md) A server is stopped across a refresh; it restarts at a random point of a later
    period with its shares wiped and a period key that is now stale (the KeyTable it holds is one
    or two refreshes old). As a recovering server it checks its code at every refresh
    (``SlowCodeCheck``). It must be operational after the next refresh that begins once it is up.
    Before the check moved after the announcement, it stayed out of every KeyTable."""
    rng = random.Random(seed)
    c = _constants(rng, long_run=True)
    missed = rng.randint(1, 2)
    run = build("stale-wiped", seed, c, periods=missed + 2)
    victim = rng.choice(list(c.ids))
    down = c.period_start(1) - rng.uniform(0.05, 1.0)
    run.sim.run_until(down)
    saved = run.servers[victim]
    run.sim.crash(victim)
    cost = rng.uniform(0.3, 1.5)
    back = c.period_start(missed) + rng.uniform(0.3, PERIOD - 0.6 - cost)
    run.sim.run_until(back)
    _wipe_shares(saved)
    _restart(run, victim, saved)
    check = SlowCodeCheck(run, victim, cost)
    check.install(run.servers[victim])
    run_periods(run)
    if not check.calls:
        raise run.fail(f"server {victim} never checked its code while recovering")
    _require_rejoined(run, victim)
    return run


def deaf(seed: int) -> Run:
    """A server hears nothing (or says nothing) for a while in one period (a connection churning
    through a rekey):
    it may miss the decision, and a recovering server (an observer of both agreements) has
    nothing of its own to send that would make its peers answer. Within a timeout of hearing
    again it learns the decision, before the period ends, and is operational in the next."""
    rng = random.Random(seed)
    c = _constants(rng, long_run=True)
    recovering = rng.random() < 0.5  # first cut off for period 1: recovering (an observer) in 2
    period = 2 if recovering else rng.randint(1, 2)
    run = build("deaf", seed, c, periods=period + 1)
    victim = rng.choice(list(c.ids))
    if recovering:
        for j in c.ids:
            if j != victim:
                run.sim.partition(victim, j)
        run.sim.run_until(c.period_start(2) - rng.uniform(0.0, 0.5))
        run.sim.heal()
    lo = c.period_start(period) + rng.uniform(0.0, 0.4)
    hi = lo + rng.uniform(0.5, PERIOD - 1.5)  # and over a second before the period ends
    loss = rng.choice([1.0, 0.7])
    both = rng.random() < 0.5  # or its own messages are lost too

    def fault(sender: int, to: int, data: bytes, now: float, r: random.Random) -> list[tuple[float, bytes]]:
        if (to == victim or (both and sender == victim)) and lo <= now < hi and r.random() < loss:
            return []
        return [(0.0, data)]

    for i in c.ids:
        run.sim.faults[i] = fault
    run.alertable.add(victim)
    _require_decided_in_time(run, victim, period)
    run_periods(run)
    return run


def replay(seed: int) -> Run:
    """The network replays, in period 2, what a server sent in period 1: all of it is refused."""
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
            wire += [(0.0, old) for target, old, at in recorded if target == to and abs(at - offset) < 0.05]
        return wire

    run.sim.faults[source] = record_and_replay
    run_periods(run)
    if not recorded:
        raise run.fail("nothing was recorded to replay")
    return run


def asynchrony(seed: int) -> Run:
    """Scenario G: for a while, delays up to 10x the usual latency with reordering, and partitions
    that heal, at any step; in half the runs one server is also Byzantine. Safety holds
    throughout; once the network behaves, every refresh completes."""
    rng = random.Random(seed)
    c = _constants(rng, long_run=True)
    run = build("asynchrony", seed, c, periods=3)
    if rng.random() < 0.5:
        _byzantine(run, rng, rng.choice(["bad-share", "equivocating-leader", "bad-frost-share", "silent"]))
    lo = c.period_start(1) + rng.uniform(0.0, 0.3)
    hi = lo + rng.uniform(0.3, 4.0)
    latency = run.sim.config.max_delay
    slow = {(a, b) for a in c.ids for b in c.ids if a != b and rng.random() < 0.6}

    def fault(sender: int, to: int, data: bytes, now: float, r: random.Random) -> list[tuple[float, bytes]]:
        late = lo <= now < hi and (sender, to) in slow
        return [(r.uniform(0.0, 10 * latency + 0.2) if late else 0.0, data)]

    for i in c.ids:
        if i not in run.sim.faults:
            run.sim.faults[i] = fault
    run.sim.run_until(lo)
    members = list(c.ids)
    for _ in range(rng.randint(0, 2)):
        a, b = rng.sample(members, 2)
        run.sim.partition(a, b)
    run.sim.run_until(hi)
    run.sim.heal()
    # Lateness is silence, never evidence: no honest server may be named (I4 is checked here too).
    run_periods(run)
    return run


def late_complaint(seed: int) -> Run:
    """Same-period repair: a dealer sends one server a bad sub-share and that server's complaint
    arrives after the others decided a set holding the bad dealing. The server still ends the
    period operational, with a valid new share (the others' points on the convicted dealer's
    polynomial), and nobody but the dealer is named."""
    rng = random.Random(seed)
    c = _constants(rng)
    run = build("late-complaint", seed, c, periods=1)
    liar, victim = rng.sample(list(c.ids), 2)
    run.faulty.add(liar)
    _use_engine(run.servers[liar], type("Liar", (adversaries.BadDealingEngine,), {"victim": victim}))
    run.expect_alerts.add((AlertKind.BAD_SHARE, liar))
    run.sim.faults[victim] = adversaries.slow_checks(1, 1.0)
    run_periods(run)
    outcome = run.servers[victim].outcomes.get(1)
    if outcome is None or outcome.status != Status.OPERATIONAL:
        raise run.fail(f"server {victim} did not end period 1 operational: {outcome and outcome.failure}")
    return run


def faults(seed: int) -> Run:
    """Scenario E and friends: a crash at a random step, a partition, replayed old messages, a
    server deaf for a while, or one back with a KeyTable two periods old."""
    return (crash, partition, replay, deaf, stale)[seed % 5](seed)


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
        raise run.fail(f"server {victim} did not rejoin by period {run.periods}: {why}")


#: The families that ``make test`` runs with hundreds of seeds each.
SEEDED_FAMILIES = ("honest", "byzantine", "faults", "corrupt", "asynchrony", "impersonate")

FAMILIES: dict[str, Callable[[int], Run]] = {
    "honest": honest,
    "byzantine": byzantine,
    "faults": faults,
    "corrupt": corrupt,
    "asynchrony": asynchrony,
    "late-complaint": late_complaint,
    "impersonate": impersonate,
    "tpm-impostor": tpm_impostor,
    "crash": crash,
    "partition": partition,
    "replay": replay,
    "deaf": deaf,
    "stale": stale,
    "late-restarts": late_restarts,
    "late-recovering": late_recovering,
    "wiped-restart": wiped_restart,
    "stale-wiped": stale_wiped,
    "cut-after-decision": cut_after_decision,
    **{kind: _single(kind) for kind in BYZANTINE},
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

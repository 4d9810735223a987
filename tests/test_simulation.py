"""Deterministic simulation of the refresh: 500 seeds per scenario family.

After every run the checker asserts the invariants from the servers' state (key never lost,
one KeyTable per period, old shares gone after the decision, no honest server accused,
completion once the network behaves). A failing seed is printed with its scenario; replay
it with ``pst sim --scenario NAME --seed N``. The seeds run in the background while the rest of
the suite runs (tests/conftest.py).
"""

from __future__ import annotations

import os
import random

import pytest

from appliance.crypto import shamir
from appliance.crypto.groups import ED25519
from appliance.protocols._core import AlertKind
from appliance.protocols.messages import RepairRequest
from appliance.protocols.refresh import Status
from appliance.protocols.state import SCERT
from appliance.sim import scenarios

#: Seeds per family (issue 8: at least 500 in `make test`).
SEEDS = int(os.environ.get("PST_SIM_SEEDS", "500"))
#: Seeds of each Byzantine behaviour run alone: SEEDS, like every family (issue 8). The
#: ``byzantine`` family (SEEDS seeds) draws one of the ten per seed, so each behaviour gets about
#: SEEDS / 10 more there. At 500 each the families cost less CPU than they did with 200 before
#: the caches of checks that passed (docs/performance.md); PST_BEHAVIOUR_SEEDS=N for fewer.
BEHAVIOUR_SEEDS = int(os.environ.get("PST_BEHAVIOUR_SEEDS", str(SEEDS)))

#: The families: the scenarios, the asynchrony family, the TPM impostor, recovering servers that
#: start late or come back wiped, and one family per Byzantine behaviour.
FAMILIES = [
    *((f, SEEDS) for f in scenarios.SEEDED_FAMILIES),
    *((f, SEEDS) for f in ("tpm-impostor", "late-recovering", "wiped-restart", "stale-wiped")),
    *((f, BEHAVIOUR_SEEDS) for f in scenarios.BYZANTINE),
]


@pytest.mark.parametrize(
    ("family", "seeds"),
    [pytest.param(f, n, marks=pytest.mark.seeds("scenarios", f, n), id=f) for f, n in FAMILIES],
)
def test_scenario_family_over_many_seeds(family: str, seeds: int, seed_failures: list[str]) -> None:
    assert not seed_failures, f"{len(seed_failures)} of {seeds} seeds failed; first: " + "; ".join(
        seed_failures[:3]
    )


def test_same_seed_replays_exactly() -> None:
    a = scenarios.run("byzantine", 7)
    b = scenarios.run("byzantine", 7)
    assert a.sim.sent == b.sim.sent and a.sim.delivered == b.sim.delivered
    tables = [
        (i, s.public.key_table.payload() if s.public.key_table else b"") for i, s in sorted(a.servers.items())
    ]
    again = [
        (i, s.public.key_table.payload() if s.public.key_table else b"") for i, s in sorted(b.servers.items())
    ]
    assert tables == again


@pytest.mark.parametrize(("family", "seed"), [("byzantine", 13), ("tpm-impostor", 3)])
def test_a_seed_replays_the_same_messages_whether_the_check_caches_are_cold_or_warm(
    family: str, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caches of checks that passed (canonical CBOR, signatures, vdec ephemerals, points) are
    shared by every server of a run and by the runs of one process: they must change nothing. The
    digest of every message sent (time, sender, recipient, bytes) is the same with all of them
    emptied first as with them full of this very run. (tpm-impostor: the simulated TPMs sign
    with RFC 6979 nonces; with random ones each replay sent other bytes.)"""
    import hashlib

    from appliance.crypto import encoding, vdec
    from appliance.crypto.groups import ed25519
    from appliance.protocols import _core, _signed
    from appliance.sim._net import Simulation

    original = Simulation._send

    def recorded(self: Simulation, sender: int, out: object) -> None:
        trace = self.__dict__.setdefault("_digest", hashlib.sha256())
        trace.update(repr((round(self.now, 9), sender, out.to, out.data)).encode())  # type: ignore[attr-defined]
        original(self, sender, out)  # type: ignore[arg-type]

    monkeypatch.setattr(Simulation, "_send", recorded)
    traces = []
    for cold in (True, False):
        if cold:
            for cache in (
                encoding._CANONICAL,
                vdec._EPHEMERALS,
                ed25519._VALID,
                _core._VERIFIED,
                _signed._OPENED,
            ):
                cache.clear()
        run = scenarios.run(family, seed)
        traces.append((run.sim.__dict__["_digest"].hexdigest(), run.sim.sent, run.sim.delivered))
    assert traces[0] == traces[1] and traces[0][1] > 100


def test_scenario_a_shares_stolen_before_a_refresh_are_useless_after_it() -> None:
    """Scenario A: copy every secret of t servers in period 0; after the refresh they do not combine."""
    run = scenarios.build("A", 11, scenarios._constants(random.Random(11)))
    c = run.constants
    stolen = {i: run.servers[i].private.shares[SCERT].value for i in range(1, c.t + 1)}  # type: ignore[union-attr]
    vcert = run.servers[1].public.sharings[SCERT].public_key
    scenarios.run_periods(run)
    scenarios.check(run)
    later = {i: run.servers[i].private.shares[SCERT].value for i in c.ids}  # type: ignore[union-attr]
    for j in range(c.t + 1, c.n + 1):
        mixed = dict(stolen) | {j: later[j]}
        assert ED25519.mul_base(shamir.interpolate(mixed, ED25519.order)) != vcert
    fresh = {i: later[i] for i in range(1, c.t + 2)}
    assert ED25519.mul_base(shamir.interpolate(fresh, ED25519.order)) == vcert


def test_scenario_b_corrupted_server_recovers_m_and_its_shares_by_itself() -> None:
    for seed in range(4):
        run = scenarios.run("corrupt", seed)
        victim = next(iter(run.alertable))
        assert run.servers[victim].outcomes[2].status == Status.OPERATIONAL


def test_scenario_c_impersonation_with_a_stolen_key_raises_an_alert() -> None:
    run = scenarios.run("impersonate", 3)
    victim = next(iter(run.faulty))
    kinds = {(a.kind, a.server) for i, s in run.servers.items() if i != victim for a in s.alert_log}
    assert (AlertKind.CONFLICTING_ANNOUNCEMENTS, victim) in kinds


@pytest.mark.parametrize(
    ("family", "kind"),
    [
        ("bad-share", AlertKind.BAD_SHARE),
        ("false-complaint", AlertKind.FALSE_COMPLAINT),
        ("bad-frost-share", AlertKind.BAD_SIGNATURE_SHARE),
        ("silent", None),
    ],
)
def test_scenario_d_malicious_server_is_named_and_the_refresh_completes(
    family: str, kind: AlertKind | None
) -> None:
    caught = 0
    for seed in range(6):
        run = scenarios.run(family, seed)
        cheater = next(iter(run.faulty))
        honest = [i for i in run.constants.ids if i not in run.faulty]
        for i in honest:
            assert run.servers[i].outcomes[2].status == Status.OPERATIONAL
        named = {(a.kind, a.server) for i in honest for a in run.servers[i].alert_log}
        assert all(server == cheater for _kind, server in named)
        caught += (kind, cheater) in named
    # A bad FROST signer is seen only when a leader picks it; the others are always seen.
    assert kind is None or caught >= (1 if kind == AlertKind.BAD_SIGNATURE_SHARE else 6)


def test_scenario_e_crashed_server_rejoins() -> None:
    for seed in (0, 2, 4):
        run = scenarios.run("crash", seed)
        victim = next(iter(run.alertable))
        assert run.servers[victim].outcomes[3].status == Status.OPERATIONAL


def test_a_server_down_across_a_refresh_is_named_by_every_server_that_completed_it() -> None:
    """Issue 10 §4: alerts came only from servers that took part and misbehaved; a server that is
    simply down across refreshes is now named by each server that completed them without it."""
    run = scenarios.build("down", 5, scenarios._constants(random.Random(5)), periods=2)
    down = run.constants.n
    run.sim.crash(down)  # before period 1's refresh begins
    run.crashed.add(down)
    scenarios.run_periods(run)
    scenarios.check(run)  # among others: each such alert is true (the server is not in that KeyTable)
    for i in run.constants.ids:
        if i == down:
            continue
        missed = [a for a in run.servers[i].alert_log if a.kind == AlertKind.MISSED_REFRESH]
        assert [(a.server, a.period) for a in missed] == [(down, 1), (down, 2)]
        assert missed[0].detail.startswith("a member of period 0's KeyTable, not in the KeyTable of period 1")
        assert not missed[1].detail.startswith("a member")  # it was not in period 1's either
        assert {a.kind for a in run.servers[i].alert_log} == {AlertKind.MISSED_REFRESH}


def test_a_refresh_with_every_server_raises_no_alert() -> None:
    for seed in range(3):
        run = scenarios.run("honest", seed)
        assert [a for s in run.servers.values() for a in s.alert_log] == []


def test_scenario_g_broken_timing_never_loses_the_key() -> None:
    """Scenario G on a few seeds, with the checker's invariants restated here as the claim."""
    for seed in range(6):
        run = scenarios.run("asynchrony", seed)
        for period, tables in run.tables.items():
            assert len(tables) == 1, f"period {period}"


def test_the_checker_catches_a_lost_key() -> None:
    """The invariants can fail: wipe t+1... all honest shares but t and the checker says so."""
    run = scenarios.run("honest", 1)
    c = run.constants
    for i in range(1, c.n - c.t + 1):
        run.servers[i].private.shares.clear()  # type: ignore[union-attr]
    with pytest.raises(scenarios.ScenarioFailure, match="the key is lost"):
        scenarios.check(run)


def test_unknown_scenario_is_refused_with_the_known_names() -> None:
    with pytest.raises(KeyError, match="known: "):
        scenarios.run("nonsense", 1)


def test_an_equivocating_dealer_does_not_cost_its_victim_the_period() -> None:
    """Review finding: the victim saw the decided dealing second and never finished the decision."""
    for seed in range(4):
        run = scenarios.run("equivocating-dealer", seed)
        for i in run.constants.ids:
            if i not in run.faulty:
                assert run.servers[i].outcomes[1].status == Status.OPERATIONAL, (seed, i)


def test_a_recovering_server_that_missed_the_decision_learns_it_before_the_period_ends() -> None:
    """CI finding (test_wan): a recovering server, an observer of both agreements, lost its
    peers' messages after the KeyTable was decided and, having nothing of its own to send, never
    made them answer; it learned the decision only from the next period's PushM. Its steady
    "undecided" message now brings the transcript within a timeout (the checker fails the run if
    the period ended first)."""
    for seed in (10, 16, 31, 45):
        scenarios.run("deaf", seed)


def test_a_server_back_with_a_keytable_two_periods_old_finishes_that_period() -> None:
    """It missed the PushM sent at the start and can verify nothing its peers send. Its peers push
    again when its announcement does not verify, and show it the signed KeyTable once decided."""
    for seed in range(4):
        run = scenarios.run("stale", seed)
        victim = next(iter(run.alertable))
        assert run.servers[victim].outcomes[4].status == Status.OPERATIONAL


def test_servers_restarted_after_a_refresh_began_do_not_stall_the_network() -> None:
    """Issue 8 (found by test_chaos): two of four servers down when period 2's refresh began
    restart in period 3 and start the clock's period, while the two that stayed up wait on
    period 2. Each pair held the other's messages as early and no refresh ever decided again.
    Now a server whose refresh is undecided joins the later period t+1 peers run."""
    for seed in range(4):
        run = scenarios.run("late-restarts", seed)  # every server completes period 5 in time
        stayed = [i for i in run.constants.ids if i not in run.alertable]
        assert all(run.servers[i].moved_up == [(2, 3)] for i in stayed), [
            run.servers[i].moved_up for i in stayed
        ]
        assert all(s.outcomes[6].status == Status.OPERATIONAL for s in run.servers.values())


def test_a_server_cut_off_between_its_decision_and_the_signature_rejoins() -> None:
    """Issue 8 (found by test_wan): back three periods later, it waited forever for a KeyTable
    signature its peers no longer send. A signed KeyTable of a later period (their PushM) shows
    that its new shares are superseded: it erases them and recovers."""
    for seed in range(4):
        run = scenarios.run("cut-after-decision", seed)  # it completes period 6 in time
        victim = next(iter(run.alertable))
        assert run.servers[victim].outcomes[7].status == Status.OPERATIONAL


def test_a_signed_keytable_of_this_period_does_not_cost_a_slow_server_its_shares() -> None:
    """A server that can check this period's transcript decides from it and keeps its new shares;
    the signed KeyTable alone (a late answer that overtook the transcript) must not make it give
    its old shares up, or n=4 with one server down would be left with two operational servers."""
    from appliance.crypto import encoding

    run = scenarios.build("slow", 3, scenarios._constants(random.Random(3)))
    c = run.constants
    slow = c.n

    def kt_decided() -> bool:
        e = run.servers[slow].engine
        return e is not None and e.kt is not None

    run.sim.run_until(c.period_start(1) + 2.0, stop=kt_decided)
    assert kt_decided() and slow in run.servers[slow].engine.kt.table.entries  # type: ignore[union-attr]
    for j in c.ids:
        if j != slow:
            run.sim.partition(slow, j)
    run.sim.run_until(scenarios.end_of(c, 1) - 1.0)
    signed = run.servers[1].public.key_table
    assert signed is not None and signed.period == 1
    engine = run.servers[slow].engine
    assert engine is not None and not engine.decided and engine.keys
    msg = encoding.encode({"period": 1, "phase": "signed-kt", "body": signed.encode()})
    run.servers[slow].receive(1, msg, run.sim.now)
    assert not engine.complete and engine.keys  # still waiting for the transcript, shares kept
    run.sim.heal()
    scenarios.run_periods(run)
    assert run.servers[slow].outcomes[1].status == Status.OPERATIONAL


def test_a_hasty_first_leader_that_then_goes_silent_does_not_stop_the_refresh() -> None:
    """Known gap (1) of the last review, as an attack by one Byzantine server: as the first leader
    it proposed at once, leaving out t honest servers whose announcements were a little late, and
    then went silent; the dealings agreement among the remaining operational members (exactly a
    quorum, itself among them) could never decide, and every later period waited behind it
    (56 of 60 seeds stalled for good). Voters now give announcements a moment before they judge a
    first proposal, and refuse one that leaves out an announcement they hold."""
    for seed in range(6):
        run = scenarios.run("hasty-leader", seed)
        for i in run.constants.ids:
            if i not in run.faulty:
                assert run.servers[i].outcomes[2].status == Status.OPERATIONAL, (seed, i)


def test_a_bad_sub_share_in_the_decided_set_is_repaired_in_the_same_period() -> None:
    """Item 2 of the init/refresh work: the victim's complaint is late, the bad dealing is decided,
    and the victim still ends the period operational with a valid share (the checker verifies
    every share against its verification share and that only the dealer is named)."""
    decided_bad = 0
    for seed in range(6):
        run = scenarios.run("late-complaint", seed)
        (liar,) = run.faulty
        for i in run.constants.ids:
            transcript = run.servers[i].public.transcript
            if i != liar and transcript is not None and liar in transcript.dealings:
                decided_bad += 1
                break
    assert decided_bad >= 3  # most seeds really decide the bad dealing (the path under test)


def test_repair_requests_before_the_keytable_or_malformed_are_held_or_rejected() -> None:
    run = scenarios.build("honest", 1, scenarios._constants(random.Random(1)), periods=1)
    c = run.constants
    run.sim.run_until(c.period_start(1) + 0.001)
    engine = run.servers[1].engine
    assert engine is not None and engine.kt is None
    engine.receive(2, "repair-req", [b"x"], 10, run.sim.now)
    assert engine._held.get(2) == [RepairRequest((b"x",))] and not engine.rejected
    scenarios.run_periods(run)
    engine = run.servers[1].engine
    assert engine is not None and engine.kt is not None
    before = len(engine.rejected)
    for body in (b"x", [b"x"], [[1]], list(range(99)), {"dealer": 2}):
        engine.receive(2, "repair-req", body, 10, run.sim.now)
    assert len(engine.rejected) - before == 5
    for body in (b"x", {"dealer": 2, "values": {}}, {"dealer": "x"}):
        engine.receive(2, "repair", body, 10, run.sim.now)  # malformed: rejected at the boundary
    assert len(engine.rejected) - before == 7  # the well-formed one is ignored: no repair under way


def test_a_recovering_server_that_starts_late_is_in_that_refresh() -> None:
    """Found by test_ca_tsa_faults on a busy machine: a server that lost its shares started the
    refresh 0.2-0.3 s after the others, its clear announcement's attestations came after the
    first leader's proposal, and it stayed recovering period after period (16 of 30 seeds
    here before the fix). Now the first leader waits for them, and the servers that hold an
    attested clear announcement refuse a first proposal without it. (The family runs over SEEDS
    seeds above; here one seed, read for what the fix is about.)"""
    run = scenarios.run("late-recovering", 3)
    late = next(iter(run.alertable))
    assert run.servers[late].outcomes[1].status == Status.OPERATIONAL

"""A recovering server's code check runs off its loop (issue 8): the server keeps talking while
its installed code is hashed, and rebuilds no share before the check's OK.

The check (``CodeCheck.check``: 0.2 s warm, many seconds cold on a loaded machine) is asked of
the owner as a :class:`~appliance.protocols.refresh.CodeCheckRequest`; the simulation delivers
its result ``cost`` virtual seconds later, the node runs it in a worker thread
(``PServer._check_code``). Here it is slower than the whole refresh of the others.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from pathlib import Path

import trio

from appliance.crypto import encoding
from appliance.host import config as node_config
from appliance.host.files import atomic_write
from appliance.node.cluster import init_cluster, node_dir
from appliance.node.server import PServer
from appliance.node.store import StateDir
from appliance.protocols._core import AlertKind
from appliance.protocols.core import ServerCore
from appliance.protocols.refresh import Outcome, Status
from appliance.protocols.state import SCERT, Constants, InvariantInfo
from appliance.sim import scenarios

VICTIM = 2


Outcomes = list[tuple[float, Status, bool]]


def _slow_check_run(
    seed: int, cost: float
) -> tuple[scenarios.Run, scenarios.SlowCodeCheck, list[float], Outcomes]:
    """Four servers; the victim lost its shares before period 1 and its code check takes ``cost``."""
    c = Constants(n=4, t=1, period_length=scenarios.PERIOD, delta=0.05, genesis=0.5 - scenarios.PERIOD)
    run = scenarios.build("slow-code-check", seed, c, periods=1)
    victim = run.servers[VICTIM]
    scenarios._wipe_shares(victim)
    run.alertable.add(VICTIM)
    check = scenarios.SlowCodeCheck(run, VICTIM, cost)
    check.install(victim)
    sent: list[float] = []

    def record(
        sender: int, to: int, data: bytes, now: float, rng: random.Random
    ) -> list[tuple[float, bytes]]:
        sent.append(now)
        return [(0.0, data)]

    run.sim.faults[VICTIM] = record
    outcomes: Outcomes = []
    previous = victim.on_outcome

    def on_outcome(period: int, outcome: Outcome) -> None:
        shares = outcome.private is not None and bool(outcome.private.shares)
        outcomes.append((run.sim.now, outcome.status, shares))
        if previous is not None:
            previous(period, outcome)

    victim.on_outcome = on_outcome
    return run, check, sent, outcomes


def test_the_server_keeps_talking_during_a_slow_check_and_rebuilds_nothing_before_its_ok() -> None:
    for seed in range(5):
        run, check, sent, outcomes = _slow_check_run(seed, cost=2.5)
        scenarios.run_periods(run)
        scenarios.check(run)
        assert check.calls == 1, seed
        start, end = check.running[0]
        # It went on with the refresh while the check ran: announcement resent, relays, votes
        # (the decision it waits for comes from its peers), never silent.
        during = [t for t in sent if start < t < end]
        assert len(during) >= 3, (seed, start, end, len(during))
        # The others took it in their KeyTable (as a recovering member) and decided without
        # waiting for it, long before its check was done.
        for i, s in run.servers.items():
            if i != VICTIM:
                assert s.public.key_table is not None and VICTIM in s.public.key_table.entries, (seed, i)
                named = {a.kind for a in s.alert_log if a.server == VICTIM}
                assert not named & {AlertKind.SILENT, AlertKind.MISSED_REFRESH}, (seed, i, named)
        # Nothing rebuilt before the check's OK: its decision (and every share) comes after it.
        assert outcomes and all(at >= end for at, _status, _shares in outcomes), (seed, end, outcomes)
        assert any(shares for _at, _status, shares in outcomes), seed
        assert run.servers[VICTIM].outcomes[1].status == Status.OPERATIONAL, seed


class _Refuse:
    def chain(self) -> bytes | None:
        return None

    def check(self, m: InvariantInfo, chains: list[bytes]) -> str | None:
        return "appliance/x.py: changed"


def test_a_slow_check_that_fails_leaves_the_server_recovering_with_no_share() -> None:
    run, _check, _sent, outcomes = _slow_check_run(7, cost=1.5)
    victim = run.servers[VICTIM]
    victim.code = _Refuse()
    scenarios.run_periods(run)
    outcome = victim.outcomes[1]
    assert outcome.status == Status.RECOVERING and "code in force" in (outcome.failure or "")
    assert [a.kind.value for a in outcome.alerts if a.server == VICTIM] == ["code-mismatch"]
    assert outcomes and not any(shares for _at, _status, shares in outcomes)
    for i, s in run.servers.items():
        if i != VICTIM:
            assert s.outcomes[1].status == Status.OPERATIONAL


# The node: PServers under trio (one loop, an in-memory hub), the victim's check in a thread ----------


class _Hub:
    def __init__(self, n: int) -> None:
        self.inboxes: dict[int, object] = {}
        self.ids = set(range(1, n + 1))
        #: (time, sender, receiver) of every message delivered.
        self.log: list[tuple[float, int, int]] = []

    def send(self, me: int, to: int, data: bytes) -> None:
        targets = [j for j in self.ids if j != me] if to == 0 else [to]
        for j in targets:
            if j in self.inboxes:
                self.log.append((time.monotonic(), me, j))
                self.inboxes[j](me, data)  # type: ignore[operator]


class _HubTransport:
    def __init__(self, hub: _Hub, me: int) -> None:
        self.hub, self.me = hub, me

    def send(self, to: int, data: bytes) -> None:
        self.hub.send(self.me, to, data)

    async def rekey(self, period: int, keys: Mapping[int, bytes], seed: bytes) -> None:
        pass


class _BusyCheck:
    """Holds the GIL in Python code for ``cost`` seconds (hashing does so between reads), then OK."""

    def __init__(self, cost: float) -> None:
        self.cost = cost
        self.running: list[tuple[float, float]] = []

    def chain(self) -> bytes | None:
        return None

    def check(self, m: InvariantInfo, chains: list[bytes]) -> str | None:
        start = time.monotonic()
        while time.monotonic() < start + self.cost:
            sum(range(1000))
        self.running.append((start, time.monotonic()))
        return None


class _SlowServer(PServer):
    check: _BusyCheck
    saves: list[tuple[float, bool]]

    def _load(self) -> ServerCore:
        core = super()._load()
        core.code = self.check
        return core

    def _persist(self, period: int, outcome: Outcome) -> None:
        self.saves.append((time.monotonic(), outcome.private is not None and bool(outcome.private.shares)))
        super()._persist(period, outcome)


def _wipe_shares(state: Path) -> None:
    """The attacker deleted the server's shares; its period key (and the rest) is kept."""
    period_file = state / "private" / "period.cbor"
    obj = encoding.decode(period_file.read_bytes())
    assert obj["shares"]
    obj["shares"] = {}
    atomic_write(period_file, encoding.encode(obj), private=True)


async def test_a_node_keeps_serving_while_its_code_check_runs_in_a_thread(tmp_path: Path) -> None:
    root = tmp_path / "cluster"
    init_cluster(root, n=4, t=1, period_seconds=4, round_ms=30, progress=lambda _: None, log="off")
    configs = {i: node_config.load(node_dir(root, i) / "config.toml") for i in range(1, 5)}
    vcert = StateDir(configs[1].state_dir).load().public.sharings[SCERT].public_key
    _wipe_shares(configs[4].state_dir)
    hub = _Hub(4)

    def factory_for(i: int):  # type: ignore[no-untyped-def]
        async def factory(config, server, nursery, deliver):  # type: ignore[no-untyped-def]
            hub.inboxes[i] = deliver
            return _HubTransport(hub, i)

        return factory

    servers: dict[int, PServer] = {i: PServer(configs[i], factory_for(i)) for i in (1, 2, 3)}
    victim = _SlowServer(configs[4], factory_for(4))
    victim.check, victim.saves = _BusyCheck(2.0), []
    servers[4] = victim
    probes: list[float] = []

    async def probe() -> None:  # the loop's pulse (what the network-facing process's ping sees)
        while True:
            probes.append(time.monotonic())
            await trio.sleep(0.02)

    async with trio.open_nursery() as nursery:
        for s in servers.values():
            await nursery.start(s.run)
        nursery.start_soon(probe)
        with trio.fail_after(40):
            while not any(shares for _at, shares in victim.saves) or not victim.check.running:
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    start, end = victim.check.running[0]
    # The loop went on during the check: the probe ran, and the victim's messages reached the others.
    assert len([t for t in probes if start < t < end]) >= 3  # none at all if the check blocked the loop
    assert len([t for t, sender, _to in hub.log if sender == 4 and start < t < end]) >= 3
    # Nothing with shares was saved before the check's OK; the shares came after it.
    assert victim.saves and all(not shares for at, shares in victim.saves if at < end), victim.saves
    assert any(shares for _at, shares in victim.saves)
    loaded = StateDir(configs[4].state_dir).load()
    assert loaded.private is not None and loaded.private.shares
    assert loaded.public.sharings[SCERT].public_key == vcert

"""A recovering server checks its code against the C in force before it is recovered, and learns
the upgrade chain from its peers' PushM (issue 8: left open in the earlier notes)."""

from __future__ import annotations

import random

from appliance.protocols._core import AlertKind
from appliance.protocols.refresh import PublicData, Status
from appliance.protocols.state import InvariantInfo
from appliance.sim import scenarios


class FakeCheck:
    def __init__(self, chain: bytes | None, problem: str | None) -> None:
        self._chain = chain
        self.problem = problem
        self.seen: list[list[bytes]] = []

    def chain(self) -> bytes | None:
        return self._chain

    def check(self, m: InvariantInfo, chains: list[bytes]) -> str | None:
        self.seen.append(list(chains))
        return self.problem


def _corrupted_run(seed: int, problem: str | None) -> tuple[scenarios.Run, int, FakeCheck]:
    run = scenarios.build("code", seed, scenarios._constants(random.Random(seed)), periods=1)
    victim = 2
    for i, s in run.servers.items():
        s.code = FakeCheck(b"chain of server %d" % i, problem if i == victim else None)
    s = run.servers[victim]
    s.public = PublicData()  # lost everything but its ROM: M, the KeyTable and the chain come by PushM
    s.private = None
    return run, victim, s.code  # type: ignore[return-value]


def test_a_recovering_server_with_the_right_code_is_recovered_and_sees_the_pushed_chains() -> None:
    run, victim, check = _corrupted_run(3, None)
    scenarios.run_periods(run)
    assert run.servers[victim].outcomes[1].status == Status.OPERATIONAL
    assert check.seen and any(b"chain of server" in c for c in check.seen[0])


def test_a_recovering_server_with_other_code_refuses_recovery_and_alerts() -> None:
    run, victim, _check = _corrupted_run(4, "appliance/x.py: changed")
    scenarios.run_periods(run)
    outcome = run.servers[victim].outcomes[1]
    assert outcome.status == Status.RECOVERING and "code in force" in (outcome.failure or "")
    assert any(a.kind == AlertKind.CODE_MISMATCH and a.server == victim for a in outcome.alerts)
    for i, s in run.servers.items():
        if i != victim:
            assert s.outcomes[1].status == Status.OPERATIONAL

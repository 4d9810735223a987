"""The log replica's catch-up when the server already holds every entry of the state t+1
servers report (it missed only slots without entries, e.g. the committee's period changes):
it takes that state without fetching anything (it asked for an empty range before, which every
peer refused, and stayed behind for good)."""

from __future__ import annotations

import pytest
from test_log_replication import Net, check_same_log, entries

from appliance.apps.log import replication


def test_a_server_that_missed_only_empty_slots_catches_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replication, "RETAIN", 3)
    net = Net(seed=21)
    net.submit(1, entries("before", 3))
    net.run_until(net.settled)
    net.crash(4)  # it keeps its storage: every entry so far
    for _ in range(8):  # slots that only move the committee to the next period
        net.new_period()
        slot = net.replicas[1].slot
        net.run_until(lambda slot=slot: all(net.replicas[i].slot > slot for i in (1, 2, 3)))
    assert net.replicas[1].slot - 3 > 1  # the others no longer keep the slots it missed
    net.start(4)
    r4 = net.replicas[4]
    net.run_until(lambda: r4.slot == net.replicas[1].slot, limit=60)
    assert r4.caught_up == 1
    net.submit(4, entries("back", 2))
    net.run_until(net.settled)
    check_same_log(net)

"""PServers under trio on the wall clock, in one process, over an in-memory hub (the real
transport is tested in test_net.py and across processes in test_cluster.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path

import trio

from appliance.node import config as node_config
from appliance.node.cluster import init_cluster, node_dir
from appliance.node.server import PServer
from appliance.node.store import StateDir
from appliance.protocols.state import SCERT


class Hub:
    def __init__(self) -> None:
        self.inboxes: dict[int, object] = {}

    def transport(self, me: int, deliver: object) -> HubTransport:
        self.inboxes[me] = deliver
        return HubTransport(self, me)


class HubTransport:
    def __init__(self, hub: Hub, me: int) -> None:
        self.hub, self.me = hub, me
        self.rekeys: list[int] = []

    def send(self, to: int, data: bytes) -> None:
        targets = [j for j in self.hub.inboxes if j != self.me] if to == 0 else [to]
        for j in targets:
            self.hub.inboxes[j](self.me, data)  # type: ignore[operator]

    async def rekey(self, period: int, keys: Mapping[int, bytes], seed: bytes) -> None:
        self.rekeys.append(period)


async def test_servers_refresh_on_the_clock_and_persist_each_period(tmp_path: Path) -> None:
    root = tmp_path / "cluster"
    init_cluster(root, n=4, t=1, period_seconds=1.5, round_ms=30, progress=lambda _: None)
    hub = Hub()
    transports: dict[int, HubTransport] = {}

    def factory_for(i: int):  # type: ignore[no-untyped-def]
        async def factory(config, server, nursery, deliver):  # type: ignore[no-untyped-def]
            transports[i] = hub.transport(i, deliver)
            return transports[i]

        return factory

    configs = {i: node_config.load(node_dir(root, i) / "config.toml") for i in range(1, 5)}
    vcert = StateDir(configs[1].state_dir).load().public.sharings[SCERT].public_key
    servers = {i: PServer(configs[i], factory_for(i)) for i in configs}
    start_period = configs[1].constants.period_at(time.time())
    async with trio.open_nursery() as nursery:
        for s in servers.values():
            await nursery.start(s.run)
        with trio.fail_after(15):
            while not all(len(t.rekeys) >= 2 for t in transports.values()):
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    for cfg in configs.values():
        status = json.loads((cfg.state_dir / "public" / "status.json").read_text())
        assert status["status"] == "operational" and status["period"] > start_period
        assert status["group_public_key"] == vcert.hex()
        loaded = StateDir(cfg.state_dir).load()
        assert loaded.problems == []
        assert loaded.public.sharings[SCERT].public_key == vcert
        assert loaded.private is not None and loaded.private.period == status["period"]

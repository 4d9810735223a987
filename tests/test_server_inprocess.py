"""PServers under trio on the wall clock, in one process, over an in-memory hub (the real
transport is tested in test_net.py and across processes in test_cluster.py)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from pathlib import Path

import trio

from appliance.host import config as node_config
from appliance.host.config import NodeConfig
from appliance.node.cluster import init_cluster, node_dir
from appliance.node.server import PServer
from appliance.node.store import StateDir
from appliance.protocols.state import SCERT


class Hub:
    """Delivers at once; holds messages for servers that are not up yet (like a peer's send queue)."""

    def __init__(self, n: int = 0) -> None:
        self.inboxes: dict[int, object] = {}
        self.held: dict[int, list[tuple[int, bytes]]] = {}
        self.ids = set(range(1, n + 1))

    def transport(self, me: int, deliver: object) -> HubTransport:
        self.inboxes[me] = deliver
        for sender, data in self.held.pop(me, []):
            deliver(sender, data)  # type: ignore[operator]
        return HubTransport(self, me)


class HubTransport:
    def __init__(self, hub: Hub, me: int) -> None:
        self.hub, self.me = hub, me
        self.rekeys: list[int] = []

    def send(self, to: int, data: bytes) -> None:
        everyone = self.hub.ids | set(self.hub.inboxes)
        targets = [j for j in everyone if j != self.me] if to == 0 else [to]
        for j in targets:
            if j in self.hub.inboxes:
                self.hub.inboxes[j](self.me, data)  # type: ignore[operator]
            else:
                self.hub.held.setdefault(j, []).append((self.me, data))

    async def rekey(self, period: int, keys: Mapping[int, bytes], seed: bytes) -> None:
        self.rekeys.append(period)


async def test_servers_refresh_on_the_clock_and_persist_each_period(tmp_path: Path) -> None:
    root = tmp_path / "cluster"
    init_cluster(root, n=4, t=1, period_seconds=1.5, round_ms=30, progress=lambda _: None, log="off")
    hub = Hub(4)
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
        # Stopped between a decision and its signed KeyTable, the private state is already the
        # decided period's (status.json says so: refresh_in_progress); otherwise it is the current one.
        in_progress = status.get("refresh_in_progress") or {}
        assert loaded.private is not None
        assert loaded.private.period == in_progress.get("period", status["period"]), status


def _signing_cluster(tmp_path: Path) -> tuple[dict[int, NodeConfig], bytes, dict[int, PServer]]:
    """Seven servers (t=2, n >= 3t+1) on an in-memory hub, long periods: for signing on request."""
    root = tmp_path / "cluster"
    init_cluster(root, n=7, t=2, period_seconds=60, round_ms=30, progress=lambda _: None, log="off")
    hub = Hub(7)

    def factory_for(i: int):  # type: ignore[no-untyped-def]
        async def factory(config, server, nursery, deliver):  # type: ignore[no-untyped-def]
            return hub.transport(i, deliver)

        return factory

    configs = {i: node_config.load(node_dir(root, i) / "config.toml") for i in range(1, 8)}
    vcert = StateDir(configs[1].state_dir).load().public.sharings[SCERT].public_key
    return configs, vcert, {i: PServer(configs[i], factory_for(i)) for i in configs}


async def test_group_key_signatures_on_request_verify_with_cryptography(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from appliance.crypto import encoding
    from appliance.protocols.signing import SigningRefused

    _configs, vcert, servers = _signing_cluster(tmp_path)
    async with trio.open_nursery() as nursery:
        for s in servers.values():
            await nursery.start(s.run)
        await trio.sleep(0.2)  # nonce batches go out
        for i, message in [(1, b"hello"), (3, b"x" * 1000), (5, b"")]:
            sig = await servers[i].sign_payload(message)
            Ed25519PublicKey.from_public_bytes(vcert).verify(sig, message)
        # What the key-holder signs for the API: the payload it builds from the name and message.
        from appliance.api import app_signing_payload

        sig = await servers[2].sign_app("payments", hashlib.sha512(b"pay 5").digest())
        Ed25519PublicKey.from_public_bytes(vcert).verify(sig, app_signing_payload("payments", b"pay 5"))
        with trio.fail_after(10):
            sigs = []

            async def one(k: int) -> None:
                sigs.append(await servers[1 + k % 7].sign_payload(f"m{k}".encode()))

            async with trio.open_nursery() as inner:
                for k in range(40):
                    inner.start_soon(one, k)
        assert len(sigs) == 40
        r1, input1 = await servers[1].random(b"client nonce")
        r2, input2 = await servers[4].random(b"client nonce")
        r3, _ = await servers[4].random(b"another nonce")
        assert r1 == r2 and input1 == input2 and len(r1) == 64 and r3 != r1  # unique per input: unbiasable
        times = await servers[2].time_vector()
        assert set(times) == set(range(1, 8)) and all(t is not None for t in times.values())
        assert max(times.values()) - min(times.values()) < 1.0  # type: ignore[operator, type-var]
        protocol_payload = encoding.signing_payload("KeyTable", 1, "pst/refresh/keytable", 9, {})
        try:
            await servers[2].sign_payload(protocol_payload)
        except SigningRefused as exc:
            assert "protocol payload" in str(exc)
        else:
            raise AssertionError("signed a protocol payload on request")
        nursery.cancel_scope.cancel()


async def test_a_bad_signature_share_is_named_in_alerts_jsonl_and_signing_goes_on(tmp_path: Path) -> None:
    """Scenario D for signing on request: server 3 returns wrong FROST shares."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from appliance.crypto.groups import ED25519

    configs, vcert, servers = _signing_cluster(tmp_path)
    async with trio.open_nursery() as nursery:
        for s in servers.values():
            await nursery.start(s.run)
        await trio.sleep(0.2)
        core = servers[3].core
        assert core is not None and core.signing is not None
        liar = core.signing
        honest_send = liar._send

        def lying_send(to: int, kind: str, body: object) -> None:
            if kind == "share" and isinstance(body, dict):
                ident, scalar = body["share"][:32], body["share"][32:]  # identifier || share
                value = (int.from_bytes(scalar, "little") + 1) % ED25519.order
                body = {**body, "share": ident + value.to_bytes(32, "little")}
            honest_send(to, kind, body)

        liar._send = lying_send  # type: ignore[method-assign]
        with trio.fail_after(30):
            for k in range(12):
                message = f"signed despite a liar {k}".encode()
                signature = await servers[1].sign_payload(message)
                Ed25519PublicKey.from_public_bytes(vcert).verify(signature, message)
        await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    lines = (configs[1].state_dir / "public" / "alerts.jsonl").read_text().splitlines()
    alerts = [json.loads(line) for line in lines]
    assert alerts and all(a["kind"] == "bad-signature-share" and a["server"] == 3 for a in alerts), alerts


def test_an_unusable_private_state_is_an_alert_and_set_aside_not_a_crash(tmp_path: Path) -> None:
    """Issue 10 §4: a directory where private/period.cbor should be (or garbage, or a file the
    server may not read) made the key-holder fail; now it starts recovering, with one alert."""
    root = tmp_path / "cluster"
    init_cluster(root, n=4, t=1, period_seconds=60, round_ms=30, progress=lambda _: None, log="off")
    config = node_config.load(node_dir(root, 2) / "config.toml")
    private = config.state_dir / "private"
    (private / "period.cbor").unlink()
    (private / "period.cbor").mkdir()

    async def no_transport(*_: object) -> HubTransport:  # never started: only the state is loaded
        raise AssertionError

    core = PServer(config, no_transport, clock=lambda: 1e9)._load()
    assert core.private is None  # recovering: the others restore its shares at the next refresh
    moved = private / "period.cbor.unusable-1000000000"
    assert moved.is_dir() and not (private / "period.cbor").exists()
    lines = (config.state_dir / "public" / "alerts.jsonl").read_text().splitlines()
    [alert] = [json.loads(line) for line in lines]
    assert (alert["kind"], alert["server"], alert["period"]) == ("private-state-unreadable", 2, 0)
    why = f"private state unusable: {private / 'period.cbor'}: not a regular file"
    assert alert["detail"].startswith(why)
    assert f"moved to {moved}" in alert["detail"]
    PServer(config, no_transport)._load()  # the next key-holder child: nothing more to say
    assert len((config.state_dir / "public" / "alerts.jsonl").read_text().splitlines()) == 1

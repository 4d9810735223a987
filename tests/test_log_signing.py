"""Threshold-signed log checkpoints: every signer checks the checkpoint against its own log first.

Servers are ServerCores of one period exchanging messages in process (seeded delays), each with
its own TileLog in memory and its CheckpointGuard registered on the log's own FROST key (the
secret ``log`` of C, dealt beside the group key at setup by a DKG of its own). A Byzantine
coordinator is a server whose log (or check) says what it wants signed.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.apps.log.checkpoint import Checkpoint, Verifier, open_checkpoint
from appliance.apps.log.guard import CheckpointGuard, checkpoint_note
from appliance.apps.log.tiles import MemoryStorage, PosixStorage, TileLog
from appliance.crypto import local
from appliance.crypto.groups import ED25519
from appliance.crypto.keyshare import KeyShare
from appliance.protocols import signing
from appliance.protocols._core import EVERYONE, AlertKind
from appliance.protocols.core import ServerCore
from appliance.protocols.signing import SigningRefused, SigningService
from appliance.protocols.state import SCERT, Constants
from appliance.sim import scenarios
from appliance.sim.setup import ServerSetup, make_network, seeded_bytes

LOG = "log"
ORIGIN = "log.example/pst"
C = Constants(n=4, t=1, period_length=1000.0, delta=0.1, secrets={SCERT: "ed25519", LOG: "ed25519"})
_SETUPS: dict[int, ServerSetup] = make_network(C, 21)


@pytest.fixture(autouse=True)
def _small_nonce_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fewer preprocessed FROST nonces per server: these tests sign a handful of checkpoints."""
    monkeypatch.setattr(signing, "BATCH", 16)
    monkeypatch.setattr(signing, "LOW_WATER", 4)


def entries(n: int, tag: str = "line", start: int = 0) -> list[bytes]:
    return [f"<13>1 - host app - - - {tag} {i}".encode() for i in range(start, start + n)]


class Net:
    """Four servers, one period; every message delivered after a seeded delay."""

    def __init__(
        self, seed: int, setups: dict[int, ServerSetup] = _SETUPS, c: Constants = C, key: str = LOG
    ) -> None:
        #: The key that signs checkpoints: the log's own, or the group key it borrows.
        self.key = key
        self.rng = random.Random(seed)
        self.seed = seed
        self.c = c
        self.setups = setups
        self.now = 1.0
        self.cores: dict[int, ServerCore] = {}
        self.storages: dict[int, MemoryStorage] = {}
        self.logs: dict[int, TileLog] = {}
        self._queue: list[tuple[float, int, int, int, bytes]] = []
        self._seq = 0
        self.log_key = setups[1].public.sharings[key].public_key
        for i in setups:
            self.storages[i] = MemoryStorage()
            self.start(i)

    def start(self, i: int) -> None:
        """(Re)start server i: a new core and signing services, its log and guard reopened from storage."""
        setup = self.setups[i]
        core = ServerCore(
            i,
            setup.vstart,
            setup.public,
            setup.private,
            self.c,
            seeded_bytes(f"{self.seed}/{i}/{self.now}".encode()),
            signing=True,
        )
        self.logs[i] = TileLog.open(self.storages[i], ORIGIN)
        # Each reading of the guards' clock is a minute after the last: a smaller tree is a
        # truncation here, never a coordinator that was just overtaken (test_log_guard.py).
        guard = CheckpointGuard.open(
            self.logs[i], claim_all=self.key != SCERT, clock=_minutes(), wall=_minutes()
        )
        core.add_payload_check(self.key, guard)
        core.start_signing()
        self.cores[i] = core
        self.flush(i)

    def service(self, i: int) -> SigningService:
        service = self.cores[i].signing_service(self.key)
        assert service is not None
        return service

    def alerts(self, i: int) -> list[tuple[AlertKind, int, str]]:
        return [(a.kind, a.server, a.detail) for a in self.service(i).alerts]

    def flush(self, i: int) -> None:
        for out in self.cores[i].tick(self.now):
            for j in [k for k in self.cores if k != i] if out.to == EVERYONE else [out.to]:
                self._seq += 1
                delay = self.rng.uniform(0.001, 0.03)
                heapq.heappush(self._queue, (self.now + delay, self._seq, j, i, out.data))

    def run(self, seconds: float) -> None:
        end = self.now + seconds
        while True:
            nxt = self._queue[0][0] if self._queue else end
            self.now = min(nxt, end, self.now + 0.05)
            while self._queue and self._queue[0][0] <= self.now:
                _, _, to, sender, data = heapq.heappop(self._queue)
                self.cores[to].receive(sender, data, self.now)
                self.flush(to)
            for i in self.cores:
                self.flush(i)
            if self.now >= end:
                return

    def append(self, items: list[bytes], servers: list[int] | None = None) -> None:
        for i in servers or list(self.logs):
            self.logs[i].append(items)

    def sign(self, i: int, body: Checkpoint) -> bytes | str:
        """Server i coordinates the log key's signature on ``body``: the signature, or why not."""
        service = self.service(i)
        try:
            rid = service.request(body.text().encode(), self.now)
        except SigningRefused as exc:
            return f"refused by the coordinator: {exc}"
        self.flush(i)
        for _ in range(200):
            self.run(0.05)
            if rid in service.done:
                return service.done.pop(rid)
            if rid in service.failed:
                return service.failed.pop(rid)
        return "no answer"

    def note(self, body: Checkpoint, signature: bytes) -> bytes:
        return checkpoint_note(body, self.log_key, signature)


def verifier(net: Net) -> Verifier:
    return Verifier(ORIGIN, net.log_key)


class Anything:
    """A Byzantine server's "check": it claims every message and accepts it."""

    name = f"checkpoint of {ORIGIN}"
    alert = AlertKind.CHECKPOINT_REFUSED

    def claims(self, message: bytes) -> bool:
        return True

    def check(self, message: bytes) -> str | None:
        return None


def byzantine(net: Net, i: int) -> None:
    """Server i coordinates whatever it likes: its own check is replaced by one that accepts all."""
    net.service(i).checks = [Anything()]


def _minutes() -> Callable[[], float]:
    ticks = itertools.count()
    return lambda: 60.0 * next(ticks)


def guard(net: Net, i: int) -> CheckpointGuard:
    check = net.service(i).checks[0]
    assert isinstance(check, CheckpointGuard)
    return check


@pytest.mark.parametrize("seed", range(3))
def test_honest_servers_holding_the_same_entries_sign_a_checkpoint_that_verifies(seed: int) -> None:
    net = Net(seed)
    net.run(0.2)  # nonce batches
    net.append(entries(300))
    body = net.logs[1].checkpoint()
    signature = net.sign(1 + seed, body)
    assert isinstance(signature, bytes), signature
    note = net.note(body, signature)
    assert open_checkpoint(note, ORIGIN, [verifier(net)]) == body
    # The log key is not the group key: a checkpoint means the log key's signers checked it.
    assert net.log_key != _SETUPS[1].public.sharings[SCERT].public_key
    # The coordinator and its signer recorded it; no alert anywhere.
    signed = [i for i in net.cores if net.storages[i].read("state/signed") == body.text().encode()]
    assert len(signed) >= C.t + 1 and 1 + seed in signed
    assert all(not net.alerts(i) for i in net.cores)
    # It grows: a later checkpoint of the longer log verifies too.
    net.append(entries(20, start=300))
    later = net.logs[2].checkpoint()
    signature = net.sign(3, later)
    assert isinstance(signature, bytes), signature
    assert open_checkpoint(net.note(later, signature), ORIGIN, [verifier(net)]).size == 320


def _refused_everywhere(
    net: Net, coordinator: int, result: bytes | str, reason: str, *, alert: bool = True
) -> None:
    assert isinstance(result, str), "a Byzantine coordinator got a signature"
    assert result.startswith("refused by its signers' checks"), result
    honest = [i for i in net.cores if i != coordinator]
    for i in honest:
        assert f"server {i}: {reason}" in result, (i, result)
        alerts = net.alerts(i)
        if not alert:
            assert alerts == []
            continue
        assert [(kind, server) for kind, server, _ in alerts] == [(AlertKind.CHECKPOINT_REFUSED, coordinator)]
        assert alerts[0][2].startswith(f"asked us to sign a checkpoint of {ORIGIN} that we refuse: {reason}")


def test_a_coordinator_with_a_forked_log_gets_no_signature_and_every_signer_names_it() -> None:
    net = Net(5)
    net.run(0.2)
    net.append(entries(40), [1, 2, 3])
    net.append(entries(40, "forged"), [4])  # server 4's log says something else
    result = net.sign(4, net.logs[4].checkpoint())
    _refused_everywhere(net, 4, result, "fork: this server's root at size 40 is ")
    # The honest ones still sign their log.
    assert isinstance(net.sign(2, net.logs[2].checkpoint()), bytes)


def test_a_coordinator_asking_for_a_smaller_tree_than_was_signed_gets_no_signature() -> None:
    net = Net(6)
    net.run(0.2)
    net.append(entries(30))
    assert isinstance(net.sign(1, net.logs[1].checkpoint()), bytes)
    # t+1 servers signed 30; the others would sign it too (they hold the entries): record it.
    for i in (1, 2, 3):
        assert guard(net, i).check(net.logs[i].checkpoint().text().encode()) is None
    byzantine(net, 4)
    result = net.sign(4, Checkpoint(ORIGIN, 20, net.logs[4].root_at(20)))
    _refused_everywhere(net, 4, result, "truncation: size 20 is smaller than 30")


def test_a_coordinator_asking_for_entries_the_signers_do_not_hold_gets_no_signature_and_no_alert() -> None:
    net = Net(7)
    net.run(0.2)
    net.append(entries(10))
    net.append(entries(5, start=10), [4])  # only server 4 holds entries 10..14
    result = net.sign(4, net.logs[4].checkpoint())
    # Refused, but accusing nobody: a signer that has not applied the last entries yet sees the same.
    _refused_everywhere(net, 4, result, "this server holds 10 entries, fewer than the 15", alert=False)


def test_the_log_key_signs_nothing_but_checkpoints() -> None:
    net = Net(8)
    net.run(0.2)
    byzantine(net, 4)
    service4 = net.service(4)
    rid = service4.request(b"transfer 10 to mallory", net.now)
    net.flush(4)
    net.run(1.0)
    why = service4.failed.pop(rid)
    assert "malformed checkpoint" in why and rid not in service4.done
    assert all(net.alerts(i) and net.alerts(i)[0][:2] == (AlertKind.CHECKPOINT_REFUSED, 4) for i in (1, 2, 3))
    with pytest.raises(SigningRefused, match="malformed checkpoint"):
        net.service(1).request(b"transfer 10 to mallory", net.now)


def test_a_signer_restarted_after_signing_refuses_a_fork_of_what_it_signed() -> None:
    net = Net(9)
    net.run(0.2)
    net.append(entries(50))
    body = net.logs[2].checkpoint()
    assert isinstance(net.sign(2, body), bytes)  # server 2 coordinates: it signed 50
    # Server 2 restarts; meanwhile someone rewrote its tiles to a fork of 60 entries.
    forked = TileLog.open(MemoryStorage(), ORIGIN)
    forked.append(entries(60, "forged"))
    assert isinstance(forked.storage, MemoryStorage)
    net.storages[2].files.update(forked.storage.files)  # state/signed is not touched
    net.start(2)
    net.run(0.3)  # fresh nonces from the restarted server (its old ones are stale)
    # Server 4, Byzantine, serves the same fork; servers 1 and 3 refuse it at once (fork at 50 or
    # beyond their log), and server 2 refuses it because it does not extend what it signed.
    net.storages[4].files.update(forked.storage.files)
    net.logs[4] = TileLog.open(net.storages[4], ORIGIN)
    byzantine(net, 4)
    result = net.sign(4, forked.checkpoint())
    assert isinstance(result, str), result
    assert "server 2: fork: the tree of size 60 does not extend the checkpoint of size 50" in result
    assert [(k, s) for k, s, _ in net.alerts(2)] == [(AlertKind.CHECKPOINT_REFUSED, 4)]
    # ... and a smaller tree than it signed before the restart.
    result = net.sign(4, Checkpoint(ORIGIN, 10, forked.root_at(10)))
    assert isinstance(result, str) and "server 2: truncation: size 10 is smaller than 50" in result


def test_a_signer_restarted_after_signing_refuses_a_prefix_of_its_own_log() -> None:
    """Without the durable record the prefix would pass (it is our own log's root at that size)."""
    net = Net(10)
    net.run(0.2)
    net.append(entries(50))
    assert isinstance(net.sign(3, net.logs[3].checkpoint()), bytes)
    net.start(3)
    net.run(0.3)
    byzantine(net, 1)
    for i in (2, 4):  # they never signed 50 and would sign 40 (no fork): have server 1 ask 3 alone
        net.service(1)._avoid[i] = net.now + 1000
    result = net.sign(1, Checkpoint(ORIGIN, 40, net.logs[1].root_at(40)))
    assert isinstance(result, str), "signed a prefix of what server 3 signed before its restart"
    ((kind, server, detail),) = net.alerts(3)
    assert (kind, server) == (AlertKind.CHECKPOINT_REFUSED, 1)
    assert detail.endswith(
        "truncation: size 40 is smaller than 50, the size of the last checkpoint this server signed"
    )


def test_a_coordinator_retrying_after_it_signed_more_does_not_sign_a_smaller_tree() -> None:
    net = Net(11)
    net.run(0.2)
    net.append(entries(20))
    service = net.service(1)
    small = service.request(net.logs[1].checkpoint().text().encode(), net.now)  # our share: 20
    net.append(entries(5, start=20))
    assert guard(net, 1).check(net.logs[1].checkpoint().text().encode()) is None  # then 25
    service._attempt(service._requests[small], net.now)  # a retry (its signer was silent)
    assert service.failed[small].startswith(f"this server now refuses the checkpoint of {ORIGIN}: truncation")


def test_the_group_key_checks_checkpoints_when_the_log_borrows_it() -> None:
    """A network without a log key: the guard on the group key claims checkpoint-like texts only."""
    c = Constants(n=4, t=1, period_length=1000.0, delta=0.1)
    setups = make_network(c, 22)
    net = Net(12, setups, c, key=SCERT)
    net.run(0.2)
    net.append(entries(8), [1, 2, 3])
    net.append(entries(8, "forged"), [4])
    group = net.cores[1].signing
    assert group is not None and net.cores[1].signing_service(LOG) is None
    rid = group.request(b"plain message", net.now)  # unclaimed: signed as before
    net.flush(1)
    net.run(0.5)
    assert rid in group.done
    group4 = net.cores[4].signing
    assert group4 is not None
    rid = group4.request(net.logs[4].checkpoint().text().encode(), net.now)
    net.flush(4)
    net.run(1.0)
    assert rid not in group4.done and "fork: " in group4.failed[rid]
    for i in (1, 2, 3):
        signing_alerts = net.cores[i].signing
        assert signing_alerts is not None
        assert [(a.kind, a.server) for a in signing_alerts.alerts] == [(AlertKind.CHECKPOINT_REFUSED, 4)]


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    honest_sizes=st.lists(st.integers(1, 30), min_size=1, max_size=3),
    lie=st.sampled_from(["fork", "truncate", "beyond"]),
    seed=st.integers(0, 1000),
)
def test_whatever_a_byzantine_coordinator_asks_it_never_gets_a_bad_checkpoint_signed(
    honest_sizes: list[int], lie: str, seed: int
) -> None:
    net = Net(seed)
    net.run(0.2)
    total = 0
    for count in honest_sizes:
        net.append(entries(count, start=total))
        total += count
        signer = 1 + (seed + total) % 3
        assert isinstance(net.sign(signer, net.logs[signer].checkpoint()), bytes)
    byzantine(net, 4)
    if lie == "fork":
        bad = Checkpoint(ORIGIN, total, bytes(32))
    elif lie == "truncate":
        bad = Checkpoint(ORIGIN, total - 1, net.logs[1].root_at(total - 1))
    else:
        net.append(entries(1, start=total), [4])
        bad = net.logs[4].checkpoint()
    if lie == "truncate":  # refused only by servers that signed `total`: make it all of them
        for i in (1, 2, 3):
            assert guard(net, i).check(net.logs[i].checkpoint().text().encode()) is None
    result = net.sign(4, bad)
    assert isinstance(result, str) and result.startswith("refused by its signers' checks"), result
    for i in (1, 2, 3):
        expected = [] if lie == "beyond" else [(AlertKind.CHECKPOINT_REFUSED, 4)]
        assert [(k, s) for k, s, _ in net.alerts(i)] == expected


def test_a_refresh_keeps_the_log_key_and_renews_its_shares() -> None:
    """Refresh treats every secret of C alike: the log key survives a period change, new shares."""
    c = Constants(
        n=4,
        t=1,
        period_length=scenarios.PERIOD,
        delta=0.05,
        genesis=0.5 - scenarios.PERIOD,
        secrets={SCERT: "ed25519", LOG: "ed25519"},
    )
    run = scenarios.build("honest", 3, c)
    log_key = run.servers[1].public.sharings[LOG].public_key
    before = {i: s.private.shares[LOG].value for i, s in run.servers.items() if s.private is not None}
    scenarios.run_periods(run)
    scenarios.check(run)
    shares = {}
    for i, s in run.servers.items():
        assert s.private is not None and s.private.period == 1
        sharing, share = s.public.sharings[LOG], s.private.shares[LOG]
        assert sharing.public_key == log_key and share.value != before[i]
        assert ED25519.mul_base(share.value) == sharing.verification_share(ED25519, i)
        shares[i] = KeyShare(i, share, sharing)
    message = Checkpoint(ORIGIN, 0, bytes(32)).text().encode()
    signature = local.frost_sign(shares, [2, 4], message, seeded_bytes(b"sig"))
    assert Verifier(ORIGIN, log_key).verifies(message, signature)


# Through running PServers (trio, wall clock, in-memory hub) -----------------------------------------


async def test_running_pservers_sign_a_checkpoint_with_the_logs_key(tmp_path: Path) -> None:
    import trio
    from test_server_inprocess import Hub

    from appliance.host import config as node_config
    from appliance.node.cluster import init_cluster, node_dir
    from appliance.node.server import PServer

    root = tmp_path / "cluster"
    secrets = {SCERT: "ed25519", LOG: "ed25519"}
    init_cluster(root, n=4, t=1, period_seconds=60, round_ms=30, progress=lambda _: None, secrets=secrets)
    hub = Hub(4)

    def factory_for(i: int):  # type: ignore[no-untyped-def]
        async def factory(config, server, nursery, deliver):  # type: ignore[no-untyped-def]
            return hub.transport(i, deliver)

        return factory

    configs = {i: node_config.load(node_dir(root, i) / "config.toml") for i in range(1, 5)}
    assert all(cfg.constants.secrets == secrets for cfg in configs.values())
    servers = {i: PServer(configs[i], factory_for(i)) for i in configs}
    logs = {}
    for i, server in servers.items():
        logs[i] = TileLog.open(PosixStorage(tmp_path / f"log-{i}"), ORIGIN)
        logs[i].append(entries(5, "forged" if i == 4 else "line"))
        server.add_payload_check(
            LOG, CheckpointGuard.open(logs[i], claim_all=True, clock=_minutes(), wall=_minutes())
        )
    async with trio.open_nursery() as nursery:
        for s in servers.values():
            await nursery.start(s.run)
        await trio.sleep(0.3)  # nonce batches go out
        body = logs[1].checkpoint()
        note = await servers[1].sign_checkpoint(body)
        core = servers[1].core
        assert core is not None
        log_key = core.public.sharings[LOG].public_key
        assert open_checkpoint(note, ORIGIN, [Verifier(ORIGIN, log_key)]) == body
        assert (tmp_path / "log-1" / "state" / "signed").read_bytes() == body.text().encode()
        with pytest.raises(SigningRefused, match="refused by its signers' checks"):
            await servers[4].sign_checkpoint(logs[4].checkpoint())  # server 4's log is a fork
        await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    for i in (1, 2, 3):
        alerts = (configs[i].state_dir / "public" / "alerts.jsonl").read_text()
        assert '"kind": "checkpoint-refused", "server": 4' in alerts, alerts


@pytest.mark.parametrize("seed", range(3))
def test_a_server_that_lost_its_shares_gets_its_log_key_share_back(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scenario B with a log key: the others rebuild the victim's shares of both secrets."""
    c = Constants(
        n=4,
        t=1,
        period_length=scenarios.PERIOD,
        delta=0.05,
        genesis=0.5 - scenarios.PERIOD,
        secrets={SCERT: "ed25519", LOG: "ed25519"},
    )
    monkeypatch.setattr(scenarios, "_constants", lambda rng, long_run=False: c)
    run = scenarios.run("corrupt", seed)
    scenarios.check(run)
    (victim,) = run.alertable
    log_key = next(s.public.sharings[LOG].public_key for i, s in run.servers.items() if i != victim)
    for i, s in run.servers.items():
        assert s.private is not None and LOG in s.private.shares, i
        sharing = s.public.sharings[LOG]
        assert sharing.public_key == log_key
        assert ED25519.mul_base(s.private.shares[LOG].value) == sharing.verification_share(ED25519, i)


def test_a_bad_point_in_a_nonce_batch_names_its_sender_when_it_is_used() -> None:
    """Nonce batches are checked for their signer's id when they arrive and point by point when a
    commitment is used (at every refresh n(n-1) batches arrive at once). A bad point: its signer
    is named, its stock dropped and avoided, and the signature is made with another signer."""
    net = Net(11)
    net.run(0.2)
    net.append(entries(20))
    service = net.service(1)
    good = service._stock[2][0]
    bad = good[:32] + b"\xff" * 32 + good[64:]
    service._stock[2].appendleft(bad)  # the fullest stock: used first
    body = net.logs[1].checkpoint()
    signature = net.sign(1, body)
    assert isinstance(signature, bytes), signature
    assert open_checkpoint(net.note(body, signature), ORIGIN, [verifier(net)]) == body
    named = [e for e in service.rejected if e.peer == 2 and "nonce batch" in e.reason]
    assert named, service.rejected
    assert service._avoid[2] > net.now and bad not in service._stock[2] and good not in service._stock[2]

"""Distributed applications (paper §5.1, password based): a strict majority of the servers' clients.

Five ServerCores (t=1) of one period exchange messages in process, with seeded delays and
reordering; clients are played by calls on each server's ApprovalService. Signatures that
come out are checked with the group public key.
"""

from __future__ import annotations

import heapq
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from appliance.api import ApiCore, PeerCred, PServerBackend, RegistrationStore
from appliance.api._distributed import password_verifier
from appliance.crypto import encoding
from appliance.host import config as node_config
from appliance.node._approvals import LocalApprovals, use_registration_clients
from appliance.node.cluster import init_cluster, node_dir
from appliance.node.server import PServer
from appliance.node.store import StateDir
from appliance.protocols import approvals, signing
from appliance.protocols._core import EVERYONE, AlertKind, Signer
from appliance.protocols.approvals import (
    APPROVALS,
    HOLD,
    ApprovalService,
    distributed_sign_payload,
    request_id,
    vote_payload,
)
from appliance.protocols.core import ServerCore
from appliance.protocols.services import seal
from appliance.protocols.state import SCERT, Constants
from appliance.sim.setup import make_network, seeded_bytes

C = Constants(n=5, t=1, period_length=1000.0, delta=0.1)
APP = "ledger"
GOOD = password_verifier(APP, b"correct horse")
BAD = password_verifier(APP, b"wrong horse")
_SETUPS = make_network(C, 11)


@pytest.fixture(autouse=True)
def _small_nonce_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fewer preprocessed FROST nonces per server: these tests sign a handful of messages."""
    monkeypatch.setattr(signing, "BATCH", 16)
    monkeypatch.setattr(signing, "LOW_WATER", 4)


class Net:
    """Delivers every message after a seeded delay (so in a seeded order); ticks the sender at once."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.now = 1.0
        self.cores: dict[int, ServerCore] = {}
        for i, setup in _SETUPS.items():
            core = ServerCore(
                i, setup.vstart, setup.public, setup.private, C, seeded_bytes(bytes([seed, i])), signing=True
            )
            core.start_signing()
            core.distributed_clients = {APP: GOOD}
            self.cores[i] = core
        self.group_key = _SETUPS[1].public.sharings[SCERT].public_key
        self._queue: list[tuple[float, int, int, int, bytes]] = []
        self._seq = 0
        #: Everything sent: (sender, to, data), for replays.
        self.log: list[tuple[int, int, bytes]] = []
        #: sender -> a function that decides what actually goes out (Byzantine servers).
        self.filters: dict[int, Callable[[int, bytes], bytes | None]] = {}
        for i in self.cores:
            self.flush(i)

    def svc(self, i: int) -> ApprovalService:
        service = self.cores[i].approvals
        assert service is not None
        return service

    def send(self, sender: int, to: int, data: bytes) -> None:
        for j in [k for k in self.cores if k != sender] if to == EVERYONE else [to]:
            self.log.append((sender, j, data))
            self._seq += 1
            delay = self.rng.uniform(0.001, 0.03)
            heapq.heappush(self._queue, (self.now + delay, self._seq, j, sender, data))

    def flush(self, i: int) -> None:
        for out in self.cores[i].tick(self.now):
            data: bytes | None = out.data
            if i in self.filters:
                data = self.filters[i](out.to, out.data)
            if data is not None:
                self.send(i, out.to, data)

    def run(self, seconds: float) -> None:
        end = self.now + seconds
        while True:
            nxt = self._queue[0][0] if self._queue else end
            step = min(nxt, end, self.now + 0.05)
            self.now = step
            while self._queue and self._queue[0][0] <= self.now:
                _, _, to, sender, data = heapq.heappop(self._queue)
                self.cores[to].receive(sender, data, self.now)
                self.flush(to)
            for i in self.cores:
                self.flush(i)
            if self.now >= end:
                return

    def sign(self, i: int, message: bytes) -> bytes | str:
        signing = self.cores[i].signing
        assert signing is not None
        rid = signing.request(message, self.now)
        self.flush(i)
        for _ in range(100):
            self.run(0.05)
            if rid in signing.done:
                return signing.done.pop(rid)
            if rid in signing.failed:
                return signing.failed.pop(rid)
        return "no answer"

    def verify(self, message: bytes, signature: bytes) -> bool:
        try:
            VerifyKey(self.group_key).verify(message, signature)
        except BadSignatureError:
            return False
        return True


def ask(net: Net, i: int, payload: bytes, verifier: bytes = GOOD, timeout: float = 5.0) -> int:
    lid = net.svc(i).request(APP, verifier, "sign", payload, net.now, timeout)
    net.flush(i)
    return lid


def approve_all(net: Net, servers: list[int], payload: bytes) -> None:
    for j in servers:
        pending = net.svc(j).pending(APP, GOOD, net.now)
        assert [p.payload for p in pending] == [payload], (j, pending)
        net.svc(j).approve(APP, GOOD, pending[0].request_id, net.now)
        net.flush(j)


@pytest.mark.parametrize("seed", range(4))
def test_majority_of_clients_gets_a_group_signature(seed: int) -> None:
    net = Net(seed)
    payload = b"transfer 10 to alice"
    lid = ask(net, 1, payload)
    net.run(0.2)
    pending = net.svc(2).pending(APP, GOOD, net.now)
    assert len(pending) == 1 and pending[0].servers == (1,) and pending[0].protocol == "sign"
    assert not net.svc(2).pending(APP, BAD, net.now)  # another password does not even see it
    approve_all(net, [2], payload)
    net.run(0.2)
    assert lid not in net.svc(1).done  # two of five is no majority
    # Server 3's client asks for the same thing on its own: that is its approval.
    lid3 = ask(net, 3, payload)
    net.run(0.3)
    message = net.svc(1).done.pop(lid)
    assert message == net.svc(3).done.pop(lid3) == distributed_sign_payload(APP, payload)
    signature = net.sign(1, message)
    assert isinstance(signature, bytes) and net.verify(message, signature)
    # Domain-separated: not the centralized payload, not a protocol payload.
    assert encoding.decode(message)["dom"] == "pst/app-distributed/v1"
    for j in (2, 4, 5):  # the other servers hold the certificate
        assert any(net.svc(j).authorized)
        assert not net.svc(j).alerts and not net.svc(j).rejected


def test_minority_is_refused_at_the_deadline_with_every_server_named() -> None:
    net = Net(7)
    lid = ask(net, 1, b"minority", timeout=2.0)
    net.run(0.2)
    approve_all(net, [2], b"minority")
    net.run(2.5)
    why = net.svc(1).failed.pop(lid)
    assert why.startswith("no majority in time: 2 of 5 servers' clients approved, 3 needed")
    assert "approved by server 1, server 2" in why and "no decision from server 3, server 4, server 5" in why
    assert not net.svc(1).done


def test_denials_make_the_majority_unreachable_and_fail_at_once() -> None:
    net = Net(8)
    lid = ask(net, 1, b"pay mallory", timeout=60.0)
    net.run(0.2)
    for j in (2, 3, 4):
        (p,) = net.svc(j).pending(APP, GOOD, net.now)
        net.svc(j).deny(APP, GOOD, p.request_id, net.now)
        net.flush(j)
    net.run(0.2)
    why = net.svc(1).failed.pop(lid)
    assert why.startswith("a majority is out of reach")
    assert "server 2: its client denied the request" in why and "server 4: its client denied" in why
    with pytest.raises(Exception, match="already decided"):
        net.svc(2).approve(APP, GOOD, p.request_id, net.now)


def test_wrong_password_is_refused_by_the_approving_servers() -> None:
    net = Net(9)
    for j in (2, 3, 4):  # these servers' clients registered with another password
        net.cores[j].distributed_clients = {APP: BAD}
    net.cores[5].distributed_clients = {}
    lid = ask(net, 1, b"with the good password", timeout=60.0)
    net.run(0.3)
    why = net.svc(1).failed.pop(lid)
    assert "server 2: its client registered this application with another password" in why
    assert "server 5: no client of this application is registered there" in why
    for j in (2, 3, 4):
        assert not net.svc(j).pending(APP, BAD, net.now)
        assert not net.svc(j).pending(APP, GOOD, net.now)


def test_an_impostor_with_another_password_never_adds_to_a_request() -> None:
    net = Net(10)
    net.cores[3].distributed_clients = {APP: BAD}
    lid = ask(net, 1, b"x", timeout=1.5)
    net.run(0.2)
    approve_all(net, [2], b"x")
    impostor = ask(net, 3, b"x", verifier=BAD, timeout=1.5)  # same payload, other password
    net.run(2.0)
    assert lid in net.svc(1).failed and impostor in net.svc(3).failed
    assert (
        "server 1: its client registered this application with another password"
        in net.svc(3).failed[impostor]
    )


def test_replayed_messages_are_ignored() -> None:
    net = Net(12)
    lid = ask(net, 1, b"once", timeout=3.0)
    net.run(0.2)
    approve_all(net, [2], b"once")
    net.run(0.2)
    before_pending = net.svc(3).pending(APP, GOOD, net.now)
    for sender, to, data in list(net.log):  # replay everything sent so far
        net.send(sender, to, data)
    net.run(0.3)
    assert net.svc(3).pending(APP, GOOD, net.now) == before_pending  # asked once, not twice
    assert lid not in net.svc(1).done  # replayed votes still count once each
    assert not net.svc(3).rejected
    # A message of another period is rejected, naming its sender.
    signer = Signer(SigningKey(_SETUPS[2].private.signing_seed))
    old = seal(APPROVALS, "vote", 7, 2, {"rid": bytes(32), "vote": bytes(64)}, signer)
    net.send(2, 3, old)
    net.run(0.1)
    assert [str(r) for r in net.svc(3).rejected] == [
        "server 2: approvals message for another service, sender or period"
    ]


def test_a_byzantine_server_cannot_forge_approvals_of_others() -> None:
    net = Net(13)
    payload = b"byzantine wants this"
    message = distributed_sign_payload(APP, payload)
    lid = ask(net, 5, payload, timeout=3.0)
    net.run(0.2)
    svc5 = net.svc(5)
    (req,) = svc5._requests.values()
    # Server 5 certifies with its own vote and made-up votes of servers 1 and 2 (signed with its key).
    key5 = SigningKey(_SETUPS[5].private.signing_seed)
    forged = {
        i: bytes(key5.sign(vote_payload(0, i, req.rid)).signature) if i != 5 else svc5._votes[req.rid][5]
        for i in (1, 2, 5)
    }
    body = {"digest": req.digest, "ticket": req.ticket, "votes": forged}
    net.send(5, EVERYONE, seal(APPROVALS, "cert", 0, 5, body, svc5.signer))
    # ... and a vote envelope for server 1's vote, sent under its own name.
    vote1 = {"rid": req.rid, "vote": forged[1]}
    net.send(5, EVERYONE, seal(APPROVALS, "vote", 0, 5, vote1, svc5.signer))
    net.run(0.2)
    assert request_id(req.digest, req.ticket) == req.rid
    for j in (1, 2, 3, 4):
        assert not net.svc(j).authorized
        assert any("vote of server 1 that does not verify" in str(r) for r in net.svc(j).rejected)
        assert [(a.kind, a.server) for a in net.svc(j).alerts] == [(AlertKind.BAD_MESSAGE, 5)]
    # Coordinating the signature anyway: the honest signers hold the request, then refuse it.
    result = net.sign(5, message)
    assert isinstance(result, str), "a signature without a majority"
    net.run(3 * (HOLD + 0.1))  # t=1: one signer per attempt, each holds it for HOLD, then refuses
    for j in (1, 2, 3, 4):
        assert any("without a majority of approvals" in str(r) for r in net.svc(j).rejected if r.peer == 5)
    assert lid in svc5.failed  # and its own request found no majority


def test_honest_signers_refuse_a_distributed_payload_without_a_certificate() -> None:
    net = Net(14)
    # Ordinary (non-distributed) messages are not held up.
    signature = net.sign(3, b"plain message")
    assert isinstance(signature, bytes) and net.verify(b"plain message", signature)
    message = distributed_sign_payload(APP, b"never asked")
    assert isinstance(net.sign(3, message), str)
    net.run(HOLD + 0.1)
    alerted = [(a.kind, a.server) for j in (1, 2, 4, 5) for a in net.svc(j).alerts]
    assert alerted and set(alerted) == {(AlertKind.BAD_MESSAGE, 3)}


# Through the local API of real PServers (trio, wall clock, in-memory hub) ---------------------------


async def test_distributed_signature_through_the_api_of_running_pservers(tmp_path: Path) -> None:
    from test_server_inprocess import Hub

    root = tmp_path / "cluster"
    init_cluster(root, n=4, t=1, period_seconds=600, round_ms=30, progress=lambda _: None, log="off")
    hub = Hub(4)

    def factory_for(i: int):  # type: ignore[no-untyped-def]
        async def factory(config, server, nursery, deliver):  # type: ignore[no-untyped-def]
            return hub.transport(i, deliver)

        return factory

    configs = {i: node_config.load(node_dir(root, i) / "config.toml") for i in range(1, 5)}
    vcert = StateDir(configs[1].state_dir).load().public.sharings[SCERT].public_key
    servers = {i: PServer(configs[i], factory_for(i)) for i in configs}
    me = PeerCred(pid=os.getpid(), uid=os.getuid(), gid=os.getgid())

    async def call(i: int, op: str, **fields: Any) -> dict[str, Any]:
        return await apis[i].handle({"v": 1, "op": op, "id": 1, **fields}, me)

    async with trio.open_nursery() as nursery:
        apis: dict[int, ApiCore] = {}
        for i, server in servers.items():
            await nursery.start(server.run)
            use_registration_clients(server)
            backend = PServerBackend(server.sign_app, i, distributed=LocalApprovals(server))
            store = RegistrationStore.in_state_dir(configs[i].state_dir)
            apis[i] = ApiCore(backend, store=store, request_wait=5.0)
        await trio.sleep(0.2)  # the signing nonces go out
        handles = {}
        for i in servers:  # server 3's client uses another password
            r = await call(i, "register_distributed", name="ledger", password=b"other" if i == 3 else b"pw")
            handles[i] = r["result"]["handle"]
        answers: list[dict[str, Any]] = []

        async def request(payload: bytes) -> None:
            answers.append(await call(1, "request", handle=handles[1], protocol="sign", payload=payload))

        async def waiting_at(i: int) -> list[dict[str, Any]]:
            with trio.fail_after(5):
                while True:
                    requests: list[dict[str, Any]] = (await call(i, "pending", handle=handles[i]))["result"][
                        "requests"
                    ]
                    if requests:
                        return requests
                    await trio.sleep(0.02)

        nursery.start_soon(request, b"entry 1")
        (waiting,) = await waiting_at(2)
        assert waiting["payload"] == b"entry 1" and waiting["servers"] == [1]
        assert (await call(3, "pending", handle=handles[3]))["result"]["requests"] == []
        assert (await call(2, "approve", handle=handles[2], request_id=waiting["request_id"]))["ok"]
        (waiting,) = await waiting_at(4)  # a majority of four is three
        assert (await call(4, "approve", handle=handles[4], request_id=waiting["request_id"]))["ok"]
        with trio.fail_after(10):
            while not answers:
                await trio.sleep(0.02)
        signature = answers.pop()["result"]["signature"]
        VerifyKey(vcert).verify(distributed_sign_payload("ledger", b"entry 1"), signature)

        nursery.start_soon(request, b"entry 2")
        (waiting,) = await waiting_at(2)
        assert (await call(2, "deny", handle=handles[2], request_id=waiting["request_id"]))["ok"]
        with trio.fail_after(5):
            while not answers:
                await trio.sleep(0.02)
        error = answers.pop()["error"]
        assert error["code"] == "refused" and error["message"].startswith("a majority is out of reach")
        assert "server 2: its client denied the request" in error["message"]
        assert "server 3: its client registered this application with another password" in error["message"]
        nursery.cancel_scope.cancel()


def test_a_store_request_gets_a_certificate_every_server_checks_alike() -> None:
    """Protocol ``store``: once a majority approved, the outcome is the certificate (the votes
    with the period's KeyTable signed by the group key), nothing is signed; the store's check
    accepts it with the group key and n alone, and refuses it for another request."""
    from appliance.apps.store import model

    net = Net(7)
    write = model.WriteRequest(APP, "config", model.DataType.PUBLIC_RW, 1, value=b"v1")
    payload = write.approval_payload()
    lid = net.svc(1).request(APP, GOOD, "store", payload, net.now, 5.0)
    net.flush(1)
    net.run(0.2)
    pending = net.svc(2).pending(APP, GOOD, net.now)
    assert [p.protocol for p in pending] == ["store"]
    assert model.decode_approval_payload(pending[0].payload) == write
    approve_all(net, [2, 3], payload)
    net.run(0.3)
    assert net.svc(1).done.pop(lid) == approvals.distributed_payload(APP, "store", payload)
    quorum = model.Quorum.from_obj(net.svc(1).certificates.pop(lid))
    assert quorum.period == net.cores[1].public.key_table.period and len(quorum.votes) >= 3
    authority = model.Authority(net.group_key, C.n)
    for oldest in (0, quorum.period):
        model.check_quorum(model.GroupView(authority, lambda: 0.0, oldest), quorum, APP, write.digest(), "w")
    other = model.WriteRequest(APP, "config", model.DataType.PUBLIC_RW, 1, value=b"v2")
    with pytest.raises(model.Refused, match="another request"):
        model.check_quorum(model.GroupView(authority, lambda: 0.0), quorum, APP, other.digest(), "w")
    with pytest.raises(model.Refused, match="group key signed"):
        model.check_quorum(
            model.GroupView(model.Authority(bytes(32), C.n), lambda: 0.0), quorum, APP, write.digest(), "w"
        )

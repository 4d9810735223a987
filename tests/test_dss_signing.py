"""Threshold DSS signing over the network (protocols/dss_signing.py), in a seeded simulation.

Servers are DSSSigningServices of one period (the P-256 secret ``tsa`` of C, dealt by DKG at
setup) on appliance.sim's network: seeded delays, so messages arrive reordered. A Byzantine
server is a service whose outgoing messages a fault rewrites (it re-signs them with its own
period key, so they are authentic and wrong).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from appliance.crypto import dss, encoding
from appliance.crypto.keyshare import KeyShare
from appliance.crypto.secret import SecretScalar
from appliance.protocols import dss_signing
from appliance.protocols._core import AlertKind, Outgoing, Signer
from appliance.protocols.dss_signing import DSSSigningService, lock_quorum
from appliance.protocols.services import open_envelope, seal
from appliance.protocols.signing import PayloadCheck, SigningRefused
from appliance.protocols.state import SCERT, Constants
from appliance.sim._net import NetworkConfig, Simulation
from appliance.sim.setup import ServerSetup, make_network, seeded_bytes

TSA = "tsa"
_NETWORKS: dict[tuple[int, int, str], dict[int, ServerSetup]] = {}


def network(n: int, t: int, group: str = "p256") -> tuple[Constants, dict[int, ServerSetup]]:
    c = Constants(n=n, t=t, period_length=1000.0, delta=0.1, secrets={SCERT: "ed25519", TSA: group})
    key = (n, t, group)
    if key not in _NETWORKS:
        _NETWORKS[key] = make_network(c, 40 + n)
    return c, _NETWORKS[key]


@pytest.fixture(autouse=True)
def _small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two presignatures per session: the tests sign a handful of messages."""
    monkeypatch.setattr(dss_signing, "BATCH", 2)
    monkeypatch.setattr(dss_signing, "LOW_WATER", 2)


class Node:
    """A server: its DSS service behind the wire format (decode once, size-capped)."""

    def __init__(self, service: DSSSigningService[Any]) -> None:
        self.service = service

    def receive(self, sender: int, data: bytes, now: float) -> None:
        self.service.receive(sender, encoding.decode(data, max_size=512 * 1024), now)

    def tick(self, now: float) -> list[Outgoing]:
        return self.service.tick(now)


def make_service(c: Constants, setup: ServerSetup, seed: str, **kw: Any) -> DSSSigningService[Any]:
    group = c.group(TSA)
    table = setup.public.key_table
    assert table is not None
    share = setup.private.shares[TSA]
    key = KeyShare(setup.me, SecretScalar(share.value, group.order), setup.public.sharings[TSA])
    return DSSSigningService(
        me=setup.me,
        t=c.t,
        table=table,
        group=group,
        key=key,
        signer=Signer(SigningKey(setup.private.signing_seed)),
        rand=seeded_bytes(f"{seed}/{setup.me}".encode()),
        service=f"sign/{TSA}",
        **kw,
    )


class Net:
    def __init__(
        self,
        n: int,
        t: int,
        seed: int,
        *,
        max_delay: float = 0.02,
        coordinators: set[int] | None = None,
        group: str = "p256",
        **kw: Any,
    ) -> None:
        self.c, self.setups = network(n, t, group)
        self.group = self.c.group(TSA)
        self.services = {
            i: make_service(self.c, s, f"{seed}", coordinate=coordinators is None or i in coordinators, **kw)
            for i, s in self.setups.items()
        }
        config = NetworkConfig(min_delay=0.001, max_delay=max_delay, tick_interval=0.02)
        self.sim = Simulation({i: Node(s) for i, s in self.services.items()}, seed, config)

    def run_until(self, end: float, stop: Callable[[], bool] | None = None) -> None:
        self.sim.run_until(end, stop)

    def fill(self, who: list[int], timeout: float = 30.0) -> None:
        """Run until every server in ``who`` has a full stock."""
        self.run_until(
            self.sim.now + timeout, lambda: all(self.services[i].stock >= dss_signing.LOW_WATER for i in who)
        )
        assert all(self.services[i].stock >= dss_signing.LOW_WATER for i in who), self.stocks()

    def stocks(self) -> dict[int, int]:
        return {i: s.stock for i, s in self.services.items()}

    def sign(self, coordinator: int, message: bytes, timeout: float = 20.0) -> dss.DSSSignature:
        service = self.services[coordinator]
        rid = service.request(message, self.sim.now)
        self.run_until(self.sim.now + timeout, lambda: rid in service.done or rid in service.failed)
        assert rid in service.done, service.failed.get(rid, "still pending")
        return service.done.pop(rid)

    def public_key(self) -> Any:
        return self.services[1].public_key


def verify_p256(group: Any, y: Any, message: bytes, sig: dss.DSSSignature) -> bool:
    key = dss.cryptography_public_key(group, y)
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return dss.verify_with_cryptography(group, y, message, sig.der)


def alerts(net: Net) -> list[tuple[AlertKind, int]]:
    return sorted({(a.kind, a.server) for s in net.services.values() for a in s.alerts}, key=str)


# Honest runs -------------------------------------------------------------------------


def test_n4_t1_every_coordinator_signs_and_cryptography_verifies() -> None:
    net = Net(4, 1, seed=1)
    net.fill([1, 2, 3, 4])
    for i in (1, 2, 3, 4):
        message = f"token {i}".encode()
        sig = net.sign(i, message)
        assert verify_p256(net.group, net.public_key(), message, sig)
    assert alerts(net) == []
    assert all(not s.rejected for s in net.services.values()), [s.rejected for s in net.services.values()]


def test_signature_verifies_with_openssl_dgst(tmp_path: Path) -> None:
    net = Net(4, 1, seed=2)
    net.fill([2])
    message = b"a document that existed at this time"
    sig = net.sign(2, message)
    (tmp_path / "pub.pem").write_bytes(dss.public_key_pem(net.group, net.public_key()))
    (tmp_path / "sig.der").write_bytes(sig.der)
    (tmp_path / "msg").write_bytes(message)
    cmd = ["openssl", "dgst", "-sha256", "-verify", "pub.pem", "-signature", "sig.der", "msg"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "Verified OK" in result.stdout, result.stdout + result.stderr
    (tmp_path / "msg").write_bytes(message + b"!")
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert result.returncode != 0 and "Verification failure" in result.stdout


def test_n7_t2_with_long_reordering_delays_signs_and_refills_the_stock() -> None:
    net = Net(7, 2, seed=3, max_delay=0.2, coordinators={1})  # the others only hold and sign
    net.fill([1])
    made = net.services[1].made
    for k in range(2):
        message = f"token {k}".encode()
        assert verify_p256(net.group, net.public_key(), message, net.sign(1, message))
    net.fill([1])  # the stock fell below the low-water mark and was refilled in the background
    assert net.services[1].made >= made + 2
    assert alerts(net) == []


def test_stock_runs_dry_then_requests_wait_for_the_next_presignature() -> None:
    net = Net(4, 1, seed=4)
    service = net.services[3]
    rids = [service.request(f"burst {k}".encode(), net.sim.now) for k in range(5)]  # stock is empty
    net.run_until(30.0, lambda: all(r in service.done for r in rids))
    for k, rid in enumerate(rids):
        assert verify_p256(net.group, net.public_key(), f"burst {k}".encode(), service.done[rid])
    assert service.made >= 5


def test_empty_stock_and_a_partitioned_coordinator_fail_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dss_signing, "REQUEST_TIMEOUT", 3.0)
    net = Net(4, 1, seed=5)
    for j in (2, 3, 4):
        net.sim.partition(1, j)
    service = net.services[1]
    rid = service.request(b"no one hears me", net.sim.now)
    net.run_until(10.0, lambda: rid in service.failed)
    assert service.stock == 0
    assert "no presignature in stock" in service.failed[rid]
    assert "2t+1 = 3 servers" in service.failed[rid]
    # Healed, the same server refills its stock and signs.
    net.sim.heal()
    net.fill([1])
    message = b"after the partition"
    assert verify_p256(net.group, net.public_key(), message, net.sign(1, message))


# Byzantine servers --------------------------------------------------------------------


class BadDealer(DSSSigningService[Any]):
    """Deals server 3 a share that fails its commitments, signed (so the complaint convicts it)."""

    def _nonce_dealing(self, sid: bytes) -> Any:
        dealing, values = super()._nonce_dealing(sid)
        v = values[3]
        values[3] = ((v[0] + 1) % self.group.order, *v[1:])
        return dealing, values


class BadOpener(DSSSigningService[Any]):
    """Opens a wrong z_i (and, asked for its proofs, proves that wrong z_i)."""

    def _opening_z(self, sess: Any, k: int) -> int:
        return dss.product_value(self.group, sess.states[k], _z_offset=1)

    def _opening(self, sess: Any, k: int) -> dss.ProductOpening:
        return dss.open_product(self.group, sess.publics[k], sess.states[k], self._scalar, _z_offset=1)


class OpenerThatProvesAnother(DSSSigningService[Any]):
    """Opens a wrong z_i, and when asked for its proofs proves the right one."""

    def _opening_z(self, sess: Any, k: int) -> int:
        return dss.product_value(self.group, sess.states[k], _z_offset=1)


class BadWDealer(DSSSigningService[Any]):
    """Deals w_i = kappa_i x_i + 1 (its proof fails; presigning does not check it: the signature
    fails, and only then are the proofs checked, which names it)."""

    def _w_dealing(self, sess: Any, k: int) -> Any:
        return dss.deal_w(
            self.group, sess.publics[k], sess.nonces[k], sess.states[k], self.key, self._scalar, _w_offset=1
        )


class BadWShare(DSSSigningService[Any]):
    """Deals server 3 a w share that fails its commitments (caught by 3's batched check)."""

    def _w_dealing(self, sess: Any, k: int) -> Any:
        dealing, values = super()._w_dealing(sess, k)
        if 3 in values:
            v = values[3]
            values[3] = ((v[0] + 1) % self.group.order, v[1])
        return dealing, values


class BadSigner(DSSSigningService[Any]):
    def _signature_share(self, presig: Any, message: bytes) -> dss.SignatureShare:
        share = super()._signature_share(presig, message)
        return dss.SignatureShare(share.sid, share.signer, (share.s + 1) % self.group.order, share.tau)


@pytest.mark.parametrize(
    ("cheat", "kind"),
    [
        (BadDealer, AlertKind.BAD_SHARE),
        (BadOpener, AlertKind.BAD_SHARE),
        (OpenerThatProvesAnother, AlertKind.BAD_SHARE),
        (BadWDealer, AlertKind.BAD_SHARE),
        (BadWShare, AlertKind.BAD_SHARE),
        (BadSigner, AlertKind.BAD_SIGNATURE_SHARE),
    ],
)
def test_a_byzantine_server_is_named_and_the_signature_completes(
    cheat: type[DSSSigningService[Any]], kind: AlertKind
) -> None:
    net = Net(4, 1, seed=6)
    bad = cheat.__new__(cheat)
    bad.__dict__.update(net.services[2].__dict__)  # server 2, with its own keys, runs the cheat
    net.services[2] = bad
    net.sim.nodes[2] = Node(bad)
    net.fill([1])
    named: set[tuple[AlertKind, int]] = set()
    for k in range(6):  # until server 2 is among the signers (a bad share needs to be asked for)
        message = f"token under attack {k}".encode()
        assert verify_p256(net.group, net.public_key(), message, net.sign(1, message))
        named = {(a.kind, a.server) for i, s in net.services.items() if i != 2 for a in s.alerts}
        if named:
            break
    assert named and all(server == 2 for _, server in named), named
    assert (kind, 2) in named
    if cheat in (BadDealer, BadWShare):
        assert net.services[3].alerts[0].kind == AlertKind.BAD_SHARE  # the victim saw it first
    if cheat is BadWDealer:
        # Found by the coordinator when a signature failed: the w proofs, checked then.
        assert any("kappa_i x_i" in a.detail for a in net.services[1].alerts if a.server == 2)
    if cheat is BadOpener:
        # Its z_i broke the consistency of the openings: proofs were asked for, and its failed.
        assert any("product opening" in a.detail for a in net.services[1].alerts if a.server == 2)
    if cheat is OpenerThatProvesAnother:
        assert any("another z_i than opened" in a.detail for a in net.services[1].alerts if a.server == 2)


def test_a_coordinator_cannot_bind_one_presignature_to_two_messages() -> None:
    """Two shares of one presignature on two messages would give kappa and kappa x: the key."""
    net = Net(4, 1, seed=7)
    net.fill([1])
    c = net.services[1]
    stock = c._stock[0]
    period, svc = c.period, c.service
    signer1 = c.signer

    def deliver(to: int, kind: str, body: dict[str, Any]) -> list[tuple[str, dict[str, Any], bytes]]:
        data = seal(svc, kind, period, 1, body, signer1)
        service = net.services[to]
        service.receive(1, encoding.decode(data), net.sim.now)
        answers = []
        for out in service.drain():
            obj = encoding.decode(out.data)
            k, b = open_envelope(svc, obj, to, service.table)
            answers.append((k, b, out.data))
        return answers

    sid = stock.public.sid
    digest1 = dss_signing._digest(b"message one")
    digest2 = dss_signing._digest(b"message two")
    locks = []
    for j in stock.holders:
        if j == 1:
            continue
        (kind, _body, raw), *_ = deliver(j, "lock", {"rid": 1, "attempt": 1, "sid": sid, "digest": digest1})
        assert kind == "locked"
        locks.append(raw)
        (kind, _body, _raw), *_ = deliver(j, "lock", {"rid": 2, "attempt": 1, "sid": sid, "digest": digest2})
        assert kind == "conflict"
        assert any(a.kind == AlertKind.EQUIVOCATION and a.server == 1 for a in net.services[j].alerts)
    assert len(locks) >= lock_quorum(len(stock.holders), 1)
    # Asked to sign message two with the locks for message one: refused, no share.
    answers = deliver(
        2, "request", {"rid": 3, "attempt": 1, "sid": sid, "message": b"message two", "locks": locks}
    )
    assert [k for k, _, _ in answers] == ["conflict"]
    # Message one with its locks: one share; a second request for it finds the presignature gone.
    answers = deliver(
        2, "request", {"rid": 4, "attempt": 1, "sid": sid, "message": b"message one", "locks": locks}
    )
    assert [k for k, _, _ in answers] == ["share"]
    answers = deliver(
        2, "request", {"rid": 5, "attempt": 1, "sid": sid, "message": b"message one", "locks": locks}
    )
    assert [k for k, _, _ in answers] == ["missing"]


def test_a_request_without_a_quorum_of_locks_gets_no_share() -> None:
    net = Net(4, 1, seed=8)
    net.fill([1])
    c = net.services[1]
    sid = c._stock[0].public.sid
    body = {"rid": 1, "attempt": 1, "sid": sid, "message": b"m", "locks": []}
    target = net.services[3]
    target.receive(1, encoding.decode(seal(c.service, "request", c.period, 1, body, c.signer)), net.sim.now)
    assert target.drain() == []
    assert [r.peer for r in target.rejected] == [1]
    assert "too few holders" in target.rejected[0].reason


def test_a_batch_is_taken_item_by_item_and_a_bad_item_spoils_only_itself() -> None:
    """A peer's batch: each sealed item handled as if it came alone; junk in it is recorded
    against the peer, and an item of a kind that is never batched is refused."""
    net = Net(4, 1, seed=19)
    net.fill([1])
    c = net.services[1]
    sid = c._stock[0].public.sid
    lock = seal(
        c.service, "lock", c.period, 1, {"rid": 1, "attempt": 1, "sid": sid, "digest": bytes(32)}, c.signer
    )
    opened = seal(c.service, "open", c.period, 1, {"s": 99, "parts": [1, 2, 3], "count": 1}, c.signer)
    batch = seal(c.service, "batch", c.period, 1, {"items": [b"junk", opened, lock]}, c.signer)
    target = net.services[3]
    target.receive(1, encoding.decode(batch), net.sim.now)
    answers = [open_envelope(c.service, encoding.decode(o.data), 3, target.table)[0] for o in target.drain()]
    assert answers == ["locked"]
    assert [r.peer for r in target.rejected] == [1, 1]
    assert "never batched" in target.rejected[1].reason
    assert 99 not in [s.s for s in target._sessions.values()]


# Payload checks -----------------------------------------------------------------------


class TimeCheck:
    """Claims b"ts:" payloads; refuses them on the servers in ``refuse``."""

    name = "timestamp token"
    alert = AlertKind.BAD_MESSAGE

    def __init__(self, refuses: bool) -> None:
        self.refuses = refuses

    def claims(self, message: bytes) -> bool:
        return message.startswith(b"ts:")

    def check(self, message: bytes) -> str | None:
        return "genTime is an hour off our clock" if self.refuses else None


def _checked_net(seed: int, refusing: set[int], only_checked: bool = False) -> Net:
    net = Net(4, 1, seed=seed)
    for i, s in net.services.items():
        check: PayloadCheck = TimeCheck(i in refusing)
        s.checks.append(check)
        s.only_checked = only_checked
    return net


def test_a_signer_whose_check_refuses_alerts_and_another_signer_is_used() -> None:
    net = _checked_net(9, refusing={2})
    net.fill([1])
    refusals = []
    for k in range(6):  # until server 2 is among the signers asked (the first t to lock are)
        message = f"ts: 2026-11-30T18:00:0{k}Z".encode()
        assert verify_p256(net.group, net.public_key(), message, net.sign(1, message))
        refusals = [a for a in net.services[2].alerts if a.kind == AlertKind.BAD_MESSAGE]
        if refusals:
            break
    assert refusals and refusals[0].server == 1 and "hour off" in refusals[0].detail


class RefuseBad:
    """Claims every payload; refuses those containing b"bad" (a genTime an hour off, say)
    when ``refuses``."""

    name = "timestamp token"
    alert = AlertKind.BAD_MESSAGE

    def __init__(self, refuses: bool) -> None:
        self.refuses = refuses

    def claims(self, message: bytes) -> bool:
        return True

    def check(self, message: bytes) -> str | None:
        return "genTime is an hour off our clock" if self.refuses and b"bad" in message else None


def test_requests_made_together_go_in_one_batch_and_each_is_checked_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Three tokens at once from one coordinator: their locks and requests travel in one batch
    per peer; the one the signers refuse fails with their reasons and an alert from each signer
    asked, naming the coordinator; the two others are signed."""
    monkeypatch.setattr(dss_signing, "BATCH", 4)
    monkeypatch.setattr(dss_signing, "LOW_WATER", 4)
    net = Net(4, 1, seed=20)
    for i, s in net.services.items():  # the coordinator's check accepts all three (its clock is off)
        s.checks.append(RefuseBad(refuses=i != 1))
    net.fill([1])
    c = net.services[1]
    sent: list[Outgoing] = []
    drain = c.drain

    def recording_drain() -> list[Outgoing]:
        out = drain()
        sent.extend(out)
        return out

    c.drain = recording_drain  # type: ignore[method-assign]
    messages = [b"ts: good one", b"ts: bad one", b"ts: good two"]
    rids = [c.request(m, net.sim.now) for m in messages]
    net.run_until(net.sim.now + 20.0, lambda: all(r in c.done or r in c.failed for r in rids))
    good = [0, 2]
    for k in good:
        assert rids[k] in c.done, c.failed.get(rids[k])
        assert verify_p256(net.group, net.public_key(), messages[k], c.done[rids[k]])
    why = c.failed[rids[1]]
    assert "refused by its signers' checks" in why and "hour off" in why
    refusers = [
        j for j in (2, 3, 4) if any(a.server == 1 and "hour off" in a.detail for a in net.services[j].alerts)
    ]
    assert refusers == [2, 3, 4]  # each signer asked refused it, and only it
    assert all(a.kind == AlertKind.BAD_MESSAGE for j in refusers for a in net.services[j].alerts)
    # One batch per peer carried the three locks, and the requests went together too.
    kinds = []
    for out in sent:
        kind, body = open_envelope(c.service, encoding.decode(out.data), 1, c.table)
        inner = (
            [open_envelope(c.service, encoding.decode(x), 1, c.table)[0] for x in body["items"]]
            if kind == "batch"
            else [kind]
        )
        kinds.append((out.to, inner))
    first_locks = {to: next(inner for t, inner in kinds if t == to and "lock" in inner) for to in (2, 3, 4)}
    assert all(inner.count("lock") == 3 for inner in first_locks.values()), first_locks
    assert any(inner.count("request") >= 2 for _to, inner in kinds)


def test_when_too_many_signers_refuse_the_request_fails_with_their_reasons() -> None:
    net = _checked_net(10, refusing={2, 3, 4})
    net.fill([1])
    service = net.services[1]
    rid = service.request(b"ts: an hour ago", net.sim.now)
    net.run_until(net.sim.now + 20.0, lambda: rid in service.failed or rid in service.done)
    assert rid not in service.done
    assert "refused by its signers' checks" in service.failed[rid] and "hour off" in service.failed[rid]


def test_only_checked_key_signs_nothing_unclaimed() -> None:
    net = _checked_net(11, refusing=set(), only_checked=True)
    with pytest.raises(SigningRefused, match="signs only what its checks accept"):
        net.services[1].request(b"anything else", 0.0)
    net.fill([1])
    assert verify_p256(net.group, net.public_key(), b"ts: now", net.sign(1, b"ts: now"))


def test_protocol_payloads_and_oversized_messages_are_refused() -> None:
    net = Net(4, 1, seed=12)
    payload = encoding.signing_payload("keytable", 1, "pst/refresh", 0, {})
    with pytest.raises(SigningRefused, match="protocol payload"):
        net.services[1].request(payload, 0.0)
    with pytest.raises(SigningRefused, match="larger than"):
        net.services[1].request(b"x" * (dss_signing.MAX_MESSAGE + 1), 0.0)


# Period end and hostile input ---------------------------------------------------------------


def test_wipe_erases_every_presignature() -> None:
    net = Net(4, 1, seed=13)
    net.fill([1, 2])
    held = [h.presig for s in net.services.values() for by_c in s._held.values() for h in by_c.values()]
    assert held
    for s in net.services.values():
        s.wipe()
    assert all(p.used for p in held)
    assert all(s.stock == 0 for s in net.services.values())


KINDS = sorted(
    {
        "open",
        "deal",
        "shares",
        "echo",
        "opening",
        "oproofs",
        "needproofs",
        "wdeal",
        "wshares",
        "qual",
        "final",
        "abort",
    }
    | {
        "report",
        "wreport",
        "lock",
        "locked",
        "conflict",
        "missing",
        "refuse",
        "request",
        "share",
        "discard",
        "batch",
        "x",
    }
)
_FUZZ: list[Net] = []


def fuzz_net() -> Net:
    if not _FUZZ:
        _FUZZ.append(Net(4, 1, seed=14))
        _FUZZ[0].fill([2])
    return _FUZZ[0]


cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.binary(max_size=40) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=12,
)
fields = st.sampled_from(["c", "s", "parts", "count", "dealings", "shares", "digest", "openings", "have"])
bodies = st.dictionaries(
    fields | st.sampled_from(["rid", "attempt", "sid", "message", "locks", "share"]), cbor_values
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(KINDS), body=bodies, sender=st.sampled_from([1, 3, 4]))
def test_receive_records_a_peers_bad_message_and_never_raises(kind: str, body: Any, sender: int) -> None:
    """Well-signed envelopes with arbitrary bodies: rejected or ignored, never an exception."""
    service = fuzz_net().services[2]
    peer = fuzz_net().services[sender]
    obj = encoding.decode(seal(service.service, kind, service.period, sender, body, peer.signer))
    service.receive(sender, obj, 1.0)
    service.tick(1.0)
    assert all(r.peer in (1, 3, 4, 2) for r in service.rejected)
    service.rejected.clear()
    service.drain()


@settings(max_examples=100, deadline=None)
@given(obj=cbor_values)
def test_receive_rejects_anything_that_is_not_a_signed_envelope(obj: Any) -> None:
    service = fuzz_net().services[2]
    service.receive(3, obj, 1.0)
    assert service.rejected and all(r.peer == 3 for r in service.rejected)
    service.rejected.clear()


def test_a_server_that_does_not_coordinate_holds_and_signs_for_others_only() -> None:
    net = Net(4, 1, seed=15, coordinators={1})
    net.fill([1])
    assert net.services[2].stock == 0 and net.services[2].made == 0
    with pytest.raises(SigningRefused, match="no presignatures of its own"):
        net.services[2].request(b"m", net.sim.now)
    assert verify_p256(net.group, net.public_key(), b"m", net.sign(1, b"m"))


def test_with_one_server_down_presigning_and_signing_go_on() -> None:
    net = Net(4, 1, seed=16, coordinators={1, 2})
    net.sim.crash(4)
    net.fill([1, 2])
    for i in (1, 2):
        message = f"one down, from {i}".encode()
        assert verify_p256(net.group, net.public_key(), message, net.sign(i, message))
    assert alerts(net) == []


def test_dsa_2048_signs_through_the_same_protocol_and_openssl_verifies(tmp_path: Path) -> None:
    net = Net(4, 1, seed=17, coordinators={1}, group="dsa2048")
    net.fill([1])
    message = b"DSA 2048/256 over SHA-256"
    sig = net.sign(1, message)
    assert dss.verify_with_cryptography(net.group, net.public_key(), message, sig.der)
    (tmp_path / "pub.pem").write_bytes(dss.public_key_pem(net.group, net.public_key()))
    (tmp_path / "sig.der").write_bytes(sig.der)
    (tmp_path / "msg").write_bytes(message)
    cmd = ["openssl", "dgst", "-sha256", "-verify", "pub.pem", "-signature", "sig.der", "msg"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "Verified OK" in result.stdout, result.stdout + result.stderr


class EquivocatingCoordinator(DSSSigningService[Any]):
    """Tells server 4 another QUAL1 than the others (one dealer fewer)."""

    def _send_all(self, to: Any, kind: str, body: Any) -> None:
        if kind != "qual" or len(body["digests"]) <= self.t + 1:
            super()._send_all(to, kind, body)
            return
        others = [i for i in to if i != 4]
        super()._send_all(others, kind, body)
        fewer = dict(sorted(body["digests"].items())[1:])
        super()._send_all([i for i in to if i == 4], kind, {**body, "digests": fewer})


def test_a_coordinator_telling_members_different_sets_is_caught_by_the_echo() -> None:
    net = Net(4, 1, seed=18, coordinators={1})
    bad = EquivocatingCoordinator.__new__(EquivocatingCoordinator)
    bad.__dict__.update(net.services[1].__dict__)
    net.services[1] = bad
    net.sim.nodes[1] = Node(bad)
    net.run_until(6.0)
    assert bad.stock == 0 and bad.made == 0
    for j in (2, 3, 4):
        assert any(a.kind == AlertKind.EQUIVOCATION and a.server == 1 for a in net.services[j].alerts), j
        assert not net.services[j]._held.get(1)  # nobody opened, nobody holds anything for it


def test_qual_keeping_one_of_two_cancelling_dealers_is_checked_again_and_named() -> None:
    """Shares checked by their sum over all dealers: two dealers' errors can cancel. If QUAL1
    then keeps one of them only, the member checks that subset again, names the culprit and
    leaves the session rather than use a wrong share."""
    net = Net(4, 1, seed=3)
    svc = net.services[4]
    group = net.group
    sess: Any = dss_signing._Session(1, 1, (1, 2, 3, 4), 2, svc._sids(1, 1, 2))
    for d in (1, 2, 3):
        dealt = [dss.deal_nonce(group, sid, d, 4, 1, svc._scalar) for sid in sess.sids]
        sess.r1.deals[d] = (bytes(32), [dealing for dealing, _ in dealt])
        sess.r1.shares[d] = [(tuple(shares[4]), b"") for _, shares in dealt]
    q = group.order
    v1, v2 = sess.r1.shares[1][0][0], sess.r1.shares[2][0][0]
    sess.r1.shares[1][0] = (((v1[0] + 5) % q, *v1[1:]), b"")
    sess.r1.shares[2][0] = (((v2[0] - 5) % q, *v2[1:]), b"")
    sess.r1.summed = frozenset({1, 2, 3})
    assert svc._qual_sums_hold(sess, [1, 2, 3])  # both kept: our summed share is right
    assert svc._qual_sums_hold(sess, [3, 4])  # both left out: right too
    assert not svc._qual_sums_hold(sess, [1, 3, 4])  # one kept without the other: caught
    assert [(a.kind, a.server) for a in svc.alerts] == [(AlertKind.BAD_SHARE, 1)]


def test_one_signature_per_session_convicts_a_bad_dealer_and_protects_an_honest_one() -> None:
    """A dealer signs each recipient's shares of a session at once; a complaint carries them all.
    A bad share convicts the dealer; a complaint about a good share, or with edited evidence,
    convicts the accuser."""
    net = Net(4, 1, seed=5)
    dealer, judge = net.services[2], net.services[1]
    group = net.group
    sess: Any = dss_signing._Session(1, 1, (1, 2, 3, 4), 3, judge._sids(1, 1, 3))
    dealt = [dss.deal_nonce(group, sid, 2, 4, 1, dealer._scalar) for sid in sess.sids]
    sess.r1.deals[2] = (bytes(32), [dealing for dealing, _ in dealt])
    sessions = judge._share_sessions(sess, sess.r1.deals[2][1], False)
    good = [list(shares[4]) for _, shares in dealt]
    bad = [list(v) for v in good]
    bad[1][0] = (bad[1][0] + 1) % group.order

    def verdict(values: list[list[int]], k: int, sig: bytes) -> tuple[int, str]:
        (v,) = judge._judge(4, [[2, k, values, sig]], sess.r1, sess, False)
        return v.guilty, v.reason

    assert verdict(bad, 1, dealer._sign_shares(sessions, 4, bad))[0] == 2  # the dealer signed it
    assert verdict(good, 1, dealer._sign_shares(sessions, 4, good))[0] == 4  # a false complaint
    signed_good = dealer._sign_shares(sessions, 4, good)
    assert verdict(bad, 1, signed_good)[0] == 4  # evidence edited: not the dealer's signature
    assert dealer._sign_shares(sessions, 2, good) == b""  # no signature on its own shares

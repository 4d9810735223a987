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
    def __init__(self, n: int, t: int, seed: int, *, max_delay: float = 0.02, **kw: Any) -> None:
        self.c, self.setups = network(n, t)
        self.group = self.c.group(TSA)
        self.services = {i: make_service(self.c, s, f"{seed}", **kw) for i, s in self.setups.items()}
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

"""Threshold ECDSA through a real cluster: four `pst serve` processes on loopback sign with the
P-256 secret ``dss`` of C from presignatures made over the network, and openssl verifies."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from clusterutil import free_base_port, pst, status

from appliance.api.client import PstClient, PstError
from appliance.host import config as node_config
from appliance.node.cluster import init_cluster
from appliance.protocols.state import SCERT


@pytest.fixture
def cluster(tmp_path: Path):  # type: ignore[no-untyped-def]
    root = tmp_path / "c"
    init_cluster(
        root,
        n=4,
        t=1,
        period_seconds=600.0,
        round_ms=80,
        base_port=free_base_port(4),
        progress=lambda _line: None,
        secrets={SCERT: "ed25519", "dss": "p256"},
        log="off",
    )
    up = pst("cluster", "up", "--dir", str(root), "--detach")
    assert up.returncode == 0, up.stdout + up.stderr
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(r.get("status") == "operational" for r in status(root)):
        time.sleep(0.5)
    yield root
    pst("cluster", "down", "--dir", str(root))


def _sign(client: PstClient, message: bytes, deadline: float) -> bytes:
    """dss_sign, asked again while the stock is still being made (the first seconds of a period)."""
    while True:
        try:
            return client.dss_sign("dss", message)
        except PstError as exc:
            if time.monotonic() > deadline:
                raise
            assert exc.code == "unavailable", exc  # no presignature yet, a refresh in between, ...
            time.sleep(0.5)


def _openssl_verifies(tmp: Path, pem: bytes, message: bytes, der: bytes) -> bool:
    (tmp / "pub.pem").write_bytes(pem)
    (tmp / "msg").write_bytes(message)
    (tmp / "sig.der").write_bytes(der)
    cmd = ["openssl", "dgst", "-sha256", "-verify", "pub.pem", "-signature", "sig.der", "msg"]
    result = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, check=False)
    return result.returncode == 0 and "Verified OK" in result.stdout


def test_threshold_ecdsa_signature_made_through_the_network_verifies_with_openssl(
    cluster: Path, tmp_path: Path
) -> None:
    sockets = {i: str(node_config.load(cluster / f"node-{i}" / "config.toml").api_socket) for i in (1, 3)}
    with PstClient(sockets[1]) as one, PstClient(sockets[3]) as three:
        pem = one.dss_public_key("dss")
        assert pem.startswith(b"-----BEGIN PUBLIC KEY-----") and three.dss_public_key("dss") == pem
        first = b"a token signed by t+1 servers"
        der = _sign(one, first, time.monotonic() + 30)
        assert _openssl_verifies(tmp_path, pem, first, der)
        assert not _openssl_verifies(tmp_path, pem, first + b"!", der)
        other = b"another coordinator, another stock"
        assert _openssl_verifies(tmp_path, pem, other, _sign(three, other, time.monotonic() + 30))
        # After a refresh (new shares, the old presignatures wiped) the same key signs.
        out = pst("refresh", "--now", "--dir", str(cluster))
        assert out.returncode == 0, out.stdout + out.stderr
        assert all(r["period"] == 1 and r["status"] == "operational" for r in status(cluster))
        later = b"signed after a refresh"
        assert _openssl_verifies(tmp_path, pem, later, _sign(one, later, time.monotonic() + 30))
        with pytest.raises(PstError, match="no DSS secret"):
            one.dss_sign("nope", b"x")

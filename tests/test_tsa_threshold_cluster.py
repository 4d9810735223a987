"""Threshold mode in real `pst serve` processes: four servers on loopback (n=4, t=1) with the
P-256 secret ``tsa`` and the CA key ``ca`` in C and ``[tsa] mode = "threshold"`` in every config.

Each token is signed by t+1 servers with threshold ECDSA from presignatures, every signer
checking the TSTInfo with its own clock first; the TSA certificate is the group CA's, for the
network's key. curl posts what `openssl ts -query` made to two servers, and `openssl ts -verify`
accepts the replies with only the group root as trust anchor.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from clusterutil import free_base_port, pst, status
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from appliance.api.client import PstClient
from appliance.apps.tsa import rfc3161
from appliance.apps.tsa.authority import serial_server
from appliance.host import config as node_config
from appliance.node.cluster import init_cluster
from appliance.protocols.state import CA_SECRET, SCERT

POLICY = "1.3.6.1.4.1.99999.1.1"

pytestmark = [pytest.mark.interop, pytest.mark.slow]


def run(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*map(str, args)], capture_output=True, text=True, check=check, timeout=60)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("tsa-threshold") / "c"
    init_cluster(
        root,
        n=4,
        t=1,
        period_seconds=600.0,
        round_ms=100,
        base_port=free_base_port(4),
        progress=lambda _line: None,
        secrets={SCERT: "ed25519", CA_SECRET: "ed25519", "tsa": "p256"},
        log="off",
    )
    for i in range(1, 5):
        config = root / f"node-{i}" / "config.toml"
        config.write_text(
            config.read_text()
            + '\n[ca]\ntsa_names = ["tsa.example.org"]\n'
            + f'\n[tsa]\nmode = "threshold"\npolicy = "{POLICY}"\n'
        )
    up = pst("cluster", "up", "--dir", str(root), "--detach")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield root
    finally:
        pst("cluster", "down", "--dir", str(root))


def stamp(url: str, query: Path, reply: Path) -> rfc3161.TimeStampResponse:
    """POST the query; again while the certificate and the first presignatures are on their way."""
    deadline = time.monotonic() + 40
    while True:
        out = run(
            "curl", "-sS", "--fail", "--retry", "20", "--retry-connrefused", "--retry-delay", "1",
            "-H", "Content-Type: application/timestamp-query", "--data-binary", f"@{query}",
            "-o", reply, "-w", "%{http_code} %{content_type}", f"{url}/tsa",
        )  # fmt: skip
        assert out.stdout == "200 application/timestamp-reply"
        response = rfc3161.decode_response(reply.read_bytes())
        if response.tst_info is not None or time.monotonic() > deadline:
            return response
        time.sleep(0.5)


def test_threshold_tokens_verify_against_the_group_root(cluster: Path, tmp_path: Path) -> None:
    (tmp_path / "data.txt").write_bytes(b"stamped by t+1 servers\n")
    run("openssl", "ts", "-query", "-data", tmp_path / "data.txt", "-cert", "-out", tmp_path / "q.tsq")
    root_pem = pst("ca", "root", "--dir", str(cluster), "--node", "2", "--wait", "30")
    assert root_pem.returncode == 0, root_pem.stdout + root_pem.stderr
    (tmp_path / "root.pem").write_text(root_pem.stdout)
    api = node_config.load(cluster / "node-1" / "config.toml").api_socket
    with PstClient(str(api)) as client:
        network_key = serialization.load_pem_public_key(client.dss_public_key("tsa"))
    for server in (1, 3):
        url = node_config.load(cluster / f"node-{server}" / "config.toml").http.url
        reply = tmp_path / f"r{server}.tsr"
        response = stamp(url, tmp_path / "q.tsq", reply)
        assert response.tst_info is not None, response
        assert serial_server(rfc3161.decode_tst_info(response.tst_info).serial) == server
        for how in (("-queryfile", tmp_path / "q.tsq"), ("-data", tmp_path / "data.txt")):
            verify = run("openssl", "ts", "-verify", *how, "-in", reply, "-CAfile", tmp_path / "root.pem")
            assert "Verification: OK" in verify.stdout, verify.stdout + verify.stderr
        # The token's certificate is the group CA's, for the network's threshold key.
        run("openssl", "ts", "-reply", "-in", reply, "-token_out", "-out", tmp_path / "token.der")
        pem = run("openssl", "pkcs7", "-inform", "DER", "-in", tmp_path / "token.der", "-print_certs").stdout
        (cert,) = x509.load_pem_x509_certificates(pem.encode())
        assert cert.public_key() == network_key
        assert cert.issuer == x509.load_pem_x509_certificate(root_pem.stdout.encode()).subject
    # Nobody refused anything: no timestamp alerts anywhere.
    for row in status(cluster):
        assert row.get("status") == "operational", row
    for i in range(1, 5):
        alerts = cluster / f"node-{i}" / "state" / "public" / "alerts.jsonl"
        text = alerts.read_text() if alerts.exists() else ""
        assert "timestamp-" not in text, text

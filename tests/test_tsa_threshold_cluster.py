"""Threshold mode in real `pst serve` processes: four servers on loopback (n=4, t=1) with the
P-256 secret ``tsa`` and the CA key ``ca`` in C and ``[tsa] mode = "threshold"`` in every config.

Each token is signed by t+1 servers with threshold ECDSA from presignatures, every signer
checking the TSTInfo with its own clock first; the TSA certificate is the group CA's, for the
network's key. curl posts what `openssl ts -query` made to two servers, and `openssl ts -verify`
accepts the replies with only the group root as trust anchor.
"""

from __future__ import annotations

import hashlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from clusterutil import free_base_port, pst, status
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from appliance.api.client import PstClient, PstError
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


def group_root(cluster: Path, node: int, folder: Path) -> str:
    """The group root PEM (written to ``folder/root.pem``), asked again while it is being made."""
    deadline = time.monotonic() + 40
    while True:
        out = pst("ca", "root", "--dir", str(cluster), "--node", str(node), "--wait", "30")
        if out.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert out.returncode == 0, out.stdout + out.stderr
    (folder / "root.pem").write_text(out.stdout)
    return out.stdout


def test_threshold_tokens_verify_against_the_group_root(cluster: Path, tmp_path: Path) -> None:
    (tmp_path / "data.txt").write_bytes(b"stamped by t+1 servers\n")
    run("openssl", "ts", "-query", "-data", tmp_path / "data.txt", "-cert", "-out", tmp_path / "q.tsq")
    root_pem = group_root(cluster, 2, tmp_path)
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
        assert cert.issuer == x509.load_pem_x509_certificate(root_pem.encode()).subject
    # Nobody refused anything: no timestamp alerts anywhere.
    for row in status(cluster):
        assert row.get("status") == "operational", row
    for i in range(1, 5):
        alerts = cluster / f"node-{i}" / "state" / "public" / "alerts.jsonl"
        text = alerts.read_text() if alerts.exists() else ""
        assert "timestamp-" not in text, text


def test_local_api_timestamp_and_pst_ts_request_give_tokens_openssl_verifies(
    cluster: Path, tmp_path: Path
) -> None:
    """The local API's ``timestamp`` (a digest in, a TimeStampResp out), through the client
    library and through ``pst ts request --file/--digest``."""
    data = tmp_path / "doc.txt"
    data.write_bytes(b"stamped through the local API\n")
    group_root(cluster, 1, tmp_path)
    api = node_config.load(cluster / "node-2" / "config.toml").api_socket
    digest = hashlib.sha512(data.read_bytes()).digest()
    with PstClient(str(api)) as client:
        deadline = time.monotonic() + 30
        while True:
            body = client.timestamp(digest, "sha512", nonce=99)
            response = rfc3161.decode_response(body)
            if response.tst_info is not None or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        with pytest.raises(PstError) as info:
            client.timestamp(digest, "sha1")
        assert info.value.code == "bad-request" and "'hash' must be one of" in str(info.value)
        wrong = rfc3161.decode_response(client.timestamp(digest[:20], "sha256"))
        assert wrong.tst_info is None and wrong.failures == {rfc3161.FailureInfo.BAD_DATA_FORMAT}
    assert response.tst_info is not None, response
    tst = rfc3161.decode_tst_info(response.tst_info)
    assert tst.nonce == 99 and serial_server(tst.serial) == 2
    (tmp_path / "api.tsr").write_bytes(body)
    verify = run(
        "openssl",
        "ts",
        "-verify",
        "-data",
        data,
        "-in",
        tmp_path / "api.tsr",
        "-CAfile",
        tmp_path / "root.pem",
    )
    assert "Verification: OK" in verify.stdout, verify.stdout + verify.stderr
    # pst ts request: a file (hashed by pst) and a digest.
    out = pst("ts", "request", "--dir", str(cluster), "--node", "3", "--file", str(data),
              "--out", str(tmp_path / "cli.tsr"), "--query-out", str(tmp_path / "cli.tsq"))  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith(f"{tmp_path / 'cli.tsr'}: serial 3")
    verify = run("openssl", "ts", "-verify", "-queryfile", tmp_path / "cli.tsq", "-in", tmp_path / "cli.tsr",
                 "-CAfile", tmp_path / "root.pem")  # fmt: skip
    assert "Verification: OK" in verify.stdout, verify.stdout + verify.stderr
    sha256 = hashlib.sha256(data.read_bytes()).hexdigest()
    out = pst("ts", "request", "--dir", str(cluster), "--node", "4", "--digest", sha256,
              "--out", str(tmp_path / "digest.tsr"), "--no-cert")  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    verify = run("openssl", "ts", "-verify", "-digest", sha256, "-in", tmp_path / "digest.tsr",
                 "-CAfile", tmp_path / "root.pem", check=False)  # fmt: skip
    assert "Verification: OK" not in verify.stdout  # no certificate in the token: openssl needs it
    out = pst(
        "ts",
        "request",
        "--dir",
        str(cluster),
        "--node",
        "4",
        "--digest",
        "abcd",
        "--out",
        str(tmp_path / "x"),
    )
    assert out.returncode == 2 and "a sha256 digest has 32 bytes, not 2" in out.stderr

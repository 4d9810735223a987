"""The timestamping authority with a period key certified by the group's CA (issue 12: "Its
certificate chain is issued by the network itself"), in real `pst serve` processes (n=4, t=1).

Each server makes a fresh P-256 key each period; the group (threshold key ``ca``, every signer
checking the ``tsa`` profile) certifies it; `openssl ts -verify` accepts the tokens with only the
group root as trust anchor, before and after a refresh, and the certificate changes with the
period. Every token's record is in the secure log.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from clusterutil import init_cluster, pst, status
from cryptography import x509

from appliance.apps.tsa import rfc3161
from appliance.host import config as node_config

POLICY = "1.3.6.1.4.1.99999.1.2"
pytestmark = [pytest.mark.interop, pytest.mark.slow]


def run(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*map(str, args)], capture_output=True, text=True, check=check, timeout=60)


def stamp(url: str, query: Path, reply: Path) -> None:
    """POST the query, retrying while the first period certificate is on its way."""
    deadline = time.monotonic() + 40
    while True:
        out = run(
            "curl", "-sS", "--retry", "20", "--retry-connrefused", "--retry-delay", "1",
            "-H", "Content-Type: application/timestamp-query", "--data-binary", f"@{query}",
            "-o", reply, "-w", "%{http_code}", f"{url}/tsa",
        )  # fmt: skip
        assert out.stdout == "200"
        if rfc3161.decode_response(reply.read_bytes()).tst_info is not None or time.monotonic() > deadline:
            return
        time.sleep(0.5)


def token_certificate(reply: Path, tmp_path: Path) -> x509.Certificate:
    run("openssl", "ts", "-reply", "-in", reply, "-token_out", "-out", tmp_path / "token.der")
    pem = run("openssl", "pkcs7", "-inform", "DER", "-in", tmp_path / "token.der", "-print_certs").stdout
    (cert,) = x509.load_pem_x509_certificates(pem.encode())
    return cert


def test_tokens_verify_against_the_group_root_across_a_refresh(tmp_path: Path) -> None:
    root = tmp_path / "c"
    init_cluster(root, n=4, period=600, round_ms=80, extra=("--ca",), log="key")
    for config in root.glob("node-*/config.toml"):
        config.write_text(
            config.read_text()
            + '\n[ca]\ntsa_names = ["tsa.example.org"]\n'
            + f'\n[tsa]\nmode = "period-key"\npolicy = "{POLICY}"\ncert = "period"\n'
        )
    (tmp_path / "data.txt").write_bytes(b"stamped under the group's own certificate\n")
    query = tmp_path / "q.tsq"
    run("openssl", "ts", "-query", "-data", tmp_path / "data.txt", "-cert", "-out", query)
    url = node_config.load(root / "node-2" / "config.toml").http.url
    try:
        up = pst("cluster", "up", "--dir", str(root), "--detach")
        assert up.returncode == 0, up.stdout + up.stderr
        root_pem = pst("ca", "root", "--dir", str(root), "--node", "2", "--wait", "30")
        assert root_pem.returncode == 0, root_pem.stdout + root_pem.stderr
        (tmp_path / "root.pem").write_text(root_pem.stdout)
        serials = []
        for when in ("before", "after"):
            reply = tmp_path / f"{when}.tsr"
            stamp(url, query, reply)
            verify = run(
                "openssl",
                "ts",
                "-verify",
                "-queryfile",
                query,
                "-in",
                reply,
                "-CAfile",
                tmp_path / "root.pem",
            )
            assert "Verification: OK" in verify.stdout, verify.stdout + verify.stderr
            cert = token_certificate(reply, tmp_path)
            assert cert.issuer == x509.load_pem_x509_certificate(root_pem.stdout.encode()).subject
            names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert names.get_values_for_type(x509.DNSName) == ["tsa.example.org"]
            serials.append(cert.serial_number)
            if when == "before":
                refreshed = pst("refresh", "--now", "--dir", str(root))
                assert refreshed.returncode == 0, refreshed.stdout + refreshed.stderr
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and not all(r.get("period") == 1 for r in status(root)):
                    time.sleep(0.3)
                # The new period's certificate is on its way: the next token carries it.
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    stamp(url, query, tmp_path / "probe.tsr")
                    if token_certificate(tmp_path / "probe.tsr", tmp_path).serial_number != serials[0]:
                        break
                    time.sleep(0.5)
        assert serials[0] != serials[1]  # a new key and certificate for the new period
        # A token from an operator's own certificate would not verify against the group root:
        other = run("openssl", "ts", "-verify", "-queryfile", query, "-in", tmp_path / "after.tsr",
                    "-CAfile", "/etc/ssl/certs/ca-certificates.crt", check=False)  # fmt: skip
        assert "Verification: OK" not in other.stdout
    finally:
        pst("cluster", "down", "--dir", str(root))

"""Applications' period certificates over HTTP with real processes (issue 13 §1, "HTTP endpoint").

A 4-server cluster (t = 1) with the ``ca`` key and the log, ``[ca.apps.web-tunnel]`` with an
``enroll_ca`` on every server. The real agent (clients/pst-keys ``--url``, signing with an
external command, ``openssl dgst``, as a TPM's or HSM's tool would) and curl (the challenge
fetched, the documented payload signed by ``openssl dgst``, the JSON posted) get certificates
that ``openssl verify -CAfile root.pem`` accepts; a credential of another CA, a reused
challenge and a name outside the policy are refused with a 403 and a JSON reason; every
certificate is in the secure log, naming the credential.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from clusterutil import alert_kinds, init_cluster, pst
from cryptography import x509
from enrollutil import make_enroll_ca

from appliance.host import config as node_config

REPO = Path(__file__).resolve().parent.parent
AGENT = REPO / "clients" / "pst-keys"
APP, NAME = "web-tunnel", "tunnel.example.org"

pytestmark = [pytest.mark.interop, pytest.mark.slow]


def run(*args: str | Path, data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*map(str, args)], input=data, capture_output=True, timeout=60, check=False)


def agent(url: str, directory: Path, cert: Path, key: Path, *args: str) -> subprocess.CompletedProcess[str]:
    urls = [x for u in url.split() for x in ("--url", u)]
    command = [
        sys.executable, str(AGENT), "--app", APP, "--dir", str(directory), *urls,
        "--enroll-cert", str(cert), "--enroll-sign", f"openssl dgst -sha256 -sign {key}", "--once", *args,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again: nothing listens there


def curl_json(url: str, body: bytes | None = None) -> tuple[int, dict[str, object]]:
    args: list[str | Path] = ["curl", "-sS", "-o", "-", "-w", "\n%{http_code}"]
    if body is not None:
        args += ["-H", "Content-Type: application/json", "--data-binary", "@-"]
    out = run(*args, url, data=body)
    assert out.returncode == 0, out.stderr
    text, _, code = out.stdout.decode().rpartition("\n")
    return int(code), json.loads(text)


def test_enrollment_over_http_with_the_agent_and_curl(tmp_path: Path) -> None:
    root = tmp_path / "c"
    init_cluster(root, n=4, period=600, round_ms=80, extra=("--ca",), log="key")
    operator_ca, stranger_ca = make_enroll_ca(), make_enroll_ca("someone else's CA")
    (tmp_path / "enroll-ca.pem").write_bytes(operator_ca.pem)
    for i in range(1, 5):  # the same policy on every server
        config = root / f"node-{i}" / "config.toml"
        config.write_text(
            config.read_text()
            + f'\n[ca]\n[ca.apps.{APP}]\nnames = ["{NAME}", "*.vpn.example.org"]\n'
            + f'enroll_ca = "{tmp_path / "enroll-ca.pem"}"\n'
        )
    cert, key = operator_ca.credential(APP).write(tmp_path, "enroll")
    bad_cert, bad_key = stranger_ca.credential(APP).write(tmp_path, "stranger")
    url1 = node_config.load(root / "node-1" / "config.toml").http.url
    url3 = node_config.load(root / "node-3" / "config.toml").http.url
    keys = tmp_path / "keys"
    up = pst("cluster", "up", "--dir", str(root), "--detach")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        # The real agent, a CSR, the enrollment key used through a command (a TPM's tool would do);
        # the first URL is a server that does not answer: the agent goes on to the next.
        deadline = time.monotonic() + 40
        while True:
            out = agent(f"http://127.0.0.1:{dead_port()} {url1}", keys, cert, key, "--csr")
            if out.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert out.returncode == 0, out.stderr
        assert "new certificate" in out.stderr
        got = pst("ca", "root", "--dir", str(root), "--node", "2", "--wait", "30")
        assert got.returncode == 0, got.stderr
        (tmp_path / "root.pem").write_text(got.stdout)
        verified = run("openssl", "verify", "-CAfile", tmp_path / "root.pem", keys / "cert.pem")
        assert verified.returncode == 0 and b": OK" in verified.stdout, verified.stdout + verified.stderr
        first = x509.load_pem_x509_certificate((keys / "cert.pem").read_bytes())
        san = first.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [NAME]

        # Refused, the old files kept: another CA's credential; a name outside the policy.
        out = agent(url1, keys, bad_cert, bad_key, "--csr")
        assert out.returncode == 1, out.stderr
        assert "403 forbidden" in out.stderr and "not issued by the enrollment CA" in out.stderr
        out = agent(url1, keys, cert, key, "--csr", "--name", "bank.example.com")
        assert out.returncode == 1 and "403 not-permitted" in out.stderr, out.stderr
        assert "outside the profile" in out.stderr
        assert x509.load_pem_x509_certificate((keys / "cert.pem").read_bytes()) == first

        # curl at server 3, as an operator would script it: the server makes the key (loopback).
        code, doc = curl_json(f"{url3}/ca/enroll/challenge")
        assert code == 200 and doc["server"] == 3
        challenge = base64.b64decode(str(doc["challenge"]))
        credential = cert.read_bytes()
        payload = (
            "pst/enroll/v1\nserver=3\n"
            f"challenge={challenge.hex()}\napp={APP}\n"
            f"credential={hashlib.sha256(credential).hexdigest()}\ncsr=-\nnames=a.vpn.example.org\n"
        ).encode()
        signed = run("openssl", "dgst", "-sha256", "-sign", key, data=payload)
        assert signed.returncode == 0, signed.stderr
        body = json.dumps(
            {
                "app": APP,
                "challenge": doc["challenge"],
                "credential": credential.decode(),
                "names": ["a.vpn.example.org"],
                "signature": base64.b64encode(signed.stdout).decode(),
            }
        ).encode()
        code, issued = curl_json(f"{url3}/ca/enroll", body)
        assert code == 200, issued
        (tmp_path / "curl.pem").write_text(str(issued["certificate"]))
        verified = run("openssl", "verify", "-CAfile", tmp_path / "root.pem", tmp_path / "curl.pem")
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert "PRIVATE KEY" in str(issued["key"])
        # The same body again: the challenge was good once.
        code, refused = curl_json(f"{url3}/ca/enroll", body)
        assert code == 403 and "challenge" in str(refused["error"]), refused  # type: ignore[index]

        # Both certificates are in the secure log, each naming the credential that asked.
        serial = x509.load_pem_x509_certificate(cert.read_bytes()).serial_number
        curl_leaf = x509.load_pem_x509_certificate(str(issued["certificate"]).encode())
        deadline = time.monotonic() + 20
        while True:
            tail = pst("log", "tail", "--dir", str(root), "--node", "2", "-n", "200").stdout
            found = [base64.b64encode(c.tbs_certificate_bytes).decode() in tail for c in (first, curl_leaf)]
            if all(found) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert all(found), tail
        args = ("--node", "2", "--since", "1h", "--app", "pst-ca", "--json")
        shown = pst("log", "show", "--dir", str(root), *args)
        assert shown.returncode == 0, shown.stderr
        raw = [base64.b64decode(json.loads(line)["raw_b64"]) for line in shown.stdout.splitlines()]
        requester = f'client="enroll credential {serial:x} (CN=tunnel host) app {APP}"'.encode()
        assert [requester in r for r in raw] == [True, True], raw
        assert "certificate-outside-policy" not in alert_kinds(root)
    finally:
        pst("cluster", "down", "--dir", str(root))

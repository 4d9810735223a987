"""The [tsa] section in real `pst serve` processes: one 4-server cluster on loopback (n=4, t=1,
with the group's CA key and the log's), each server its own period-key authority.

* Servers 1 and 3 sign with an operator's key and certificate (a stand-in CA): curl posts what
  `openssl ts -query` made, `openssl ts -verify` checks the replies against the operator's root,
  the serials carry the servers' ids, and every token's record is in the secure log before the
  token is released (replicated: servers 2 and 4 hold both servers' records).
* Servers 2 and 4 have `cert = "period"` (issue 12: "Its certificate chain is issued by the
  network itself"): a fresh P-256 key each period, certified by the group's CA (threshold key
  `ca`, every signer checking the `tsa` profile). `openssl ts -verify` accepts their tokens with
  only the group root as trust anchor, before and after a refresh, and the certificate changes
  with the period.
* A key file that does not match its certificate stops `pst serve` at start, naming the files.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from clusterutil import init_cluster, pst, status
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from tsautil import StandIn, make_stand_in

from appliance.apps.tsa import rfc3161
from appliance.apps.tsa.authority import serial_server
from appliance.host import config as node_config

POLICY = "1.3.6.1.4.1.99999.1.1"
OPERATOR_KEYED = (1, 3)
PERIOD_KEYED = (2, 4)

pytestmark = [pytest.mark.interop, pytest.mark.slow]


def run(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*map(str, args)], capture_output=True, text=True, check=check, timeout=60)


class Cluster:
    def __init__(self, root: Path, folder: Path, stand_in: StandIn) -> None:
        self.root = root
        self.folder = folder
        self.stand_in = stand_in

    def node(self, i: int) -> Path:
        return self.root / f"node-{i}"

    def url(self, i: int) -> str:
        return node_config.load(self.node(i) / "config.toml").http.url


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    folder = tmp_path_factory.mktemp("tsa")
    root = folder / "cluster"
    init_cluster(root, n=4, period=600, round_ms=100, extra=("--ca",), log="key")
    stand_in = make_stand_in()
    stand_in.write(folder)
    for i in range(1, 5):
        config = root / f"node-{i}" / "config.toml"
        if i in OPERATOR_KEYED:
            tsa = f'cert = "{folder / "tsa.pem"}"\nkey = "{folder / "tsa.key"}"\n'
        else:
            tsa = 'cert = "period"\n'
        config.write_text(
            config.read_text()
            + '\n[ca]\ntsa_names = ["tsa.example.org"]\n'  # the same policy on every server
            + f'\n[tsa]\nmode = "period-key"\npolicy = "{POLICY}"\n{tsa}'
        )
    (folder / "data.txt").write_bytes(b"stamped by a cluster\n")
    run("openssl", "ts", "-query", "-data", folder / "data.txt", "-cert", "-out", folder / "q.tsq")
    up = pst("cluster", "up", "--dir", str(root), "--detach")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield Cluster(root, folder, stand_in)
    finally:
        pst("cluster", "down", "--dir", str(root))


def stamp(url: str, query: Path, reply: Path) -> None:
    """POST the query, again while the authority's first period certificate is on its way."""
    deadline = time.monotonic() + 40
    while True:
        out = run(
            "curl", "-sS", "--fail", "--retry", "20", "--retry-connrefused", "--retry-delay", "1",
            "-H", "Content-Type: application/timestamp-query", "--data-binary", f"@{query}",
            "-o", reply, "-w", "%{http_code} %{content_type}", f"{url}/tsa",
        )  # fmt: skip
        assert out.stdout == "200 application/timestamp-reply"
        if rfc3161.decode_response(reply.read_bytes()).tst_info is not None or time.monotonic() > deadline:
            return
        time.sleep(0.5)


def token_certificate(reply: Path, folder: Path) -> x509.Certificate:
    run("openssl", "ts", "-reply", "-in", reply, "-token_out", "-out", folder / "token.der")
    pem = run("openssl", "pkcs7", "-inform", "DER", "-in", folder / "token.der", "-print_certs").stdout
    (cert,) = x509.load_pem_x509_certificates(pem.encode())
    return cert


def test_operator_keyed_servers_issue_logged_tokens_that_openssl_verifies(cluster: Cluster) -> None:
    query, serials = cluster.folder / "q.tsq", []
    for server in OPERATOR_KEYED:
        reply = cluster.folder / f"r{server}.tsr"
        stamp(cluster.url(server), query, reply)
        verify = run(
            "openssl",
            "ts",
            "-verify",
            "-queryfile",
            query,
            "-in",
            reply,
            "-CAfile",
            cluster.folder / "root.pem",
        )
        assert "Verification: OK" in verify.stdout
        tst = rfc3161.decode_response(reply.read_bytes()).tst_info
        assert tst is not None
        serials.append(rfc3161.decode_tst_info(tst).serial)
    assert [serial_server(s) for s in serials] == list(OPERATOR_KEYED)
    assert (cluster.node(1) / "state" / "serve" / "tsa-serial").read_text() == "4096\n"
    # Each token was in the secure log before it was released, and the log is replicated.
    wanted = {f"{s:x}" for s in serials}
    for node in PERIOD_KEYED:
        deadline = time.monotonic() + 20
        while True:
            args = ("--node", str(node), "--since", "1h", "--app", "pst-tsa", "--json")
            shown = pst("log", "show", "--dir", str(cluster.root), *args)
            assert shown.returncode == 0, shown.stdout + shown.stderr
            entries = [json.loads(line) for line in shown.stdout.splitlines()]
            found = {e["message"].split()[1] for e in entries}
            if wanted <= found or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert wanted <= found, shown.stdout
        assert {e["msgid"] for e in entries} == {"TST"}
        assert {"pst-server-1", "pst-server-3"} <= {e["host"] for e in entries}


def test_period_keyed_tokens_verify_against_the_group_root_across_a_refresh(cluster: Cluster) -> None:
    root_pem = pst("ca", "root", "--dir", str(cluster.root), "--node", "2", "--wait", "30")
    assert root_pem.returncode == 0, root_pem.stdout + root_pem.stderr
    group_root = cluster.folder / "group-root.pem"
    group_root.write_text(root_pem.stdout)
    query, url, folder = cluster.folder / "q.tsq", cluster.url(2), cluster.folder
    serials = []
    for when in ("before", "after"):
        reply = folder / f"{when}.tsr"
        stamp(url, query, reply)
        verify = run("openssl", "ts", "-verify", "-queryfile", query, "-in", reply, "-CAfile", group_root)
        assert "Verification: OK" in verify.stdout, verify.stdout + verify.stderr
        cert = token_certificate(reply, folder)
        assert cert.issuer == x509.load_pem_x509_certificate(root_pem.stdout.encode()).subject
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert names.get_values_for_type(x509.DNSName) == ["tsa.example.org"]
        serials.append(cert.serial_number)
        if when == "before":
            period = max(int(r.get("period") or 0) for r in status(cluster.root))
            refreshed = pst("refresh", "--now", "--dir", str(cluster.root))
            assert refreshed.returncode == 0, refreshed.stdout + refreshed.stderr
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not all(
                int(r.get("period") or 0) > period for r in status(cluster.root)
            ):
                time.sleep(0.3)
            # The new period's certificate is on its way: the next token carries it.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                stamp(url, query, folder / "probe.tsr")
                if token_certificate(folder / "probe.tsr", folder).serial_number != serials[0]:
                    break
                time.sleep(0.5)
    assert serials[0] != serials[1]  # a new key and certificate for the new period
    # The operator's root does not vouch for the group's tokens, nor the group's for the operator's.
    other = run("openssl", "ts", "-verify", "-queryfile", query, "-in", folder / "after.tsr",
                "-CAfile", folder / "root.pem", check=False)  # fmt: skip
    assert "Verification: OK" not in other.stdout
    other = run("openssl", "ts", "-verify", "-queryfile", query, "-in", folder / "r1.tsr",
                "-CAfile", group_root, check=False)  # fmt: skip
    assert "Verification: OK" not in other.stdout


def test_a_key_that_is_not_the_certificates_stops_pst_serve_at_start(cluster: Cluster) -> None:
    pst("cluster", "down", "--dir", str(cluster.root))  # its ports must be free
    other = make_stand_in()
    (cluster.folder / "tsa.key").write_bytes(
        other.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    serve = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "serve", "--config", str(cluster.node(1) / "config.toml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert serve.returncode == 2
    assert "tsa.cert / tsa.key" in serve.stderr and "is not the key of the certificate" in serve.stderr

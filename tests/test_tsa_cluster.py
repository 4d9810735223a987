"""The [tsa] section in real `pst serve` processes: a 4-server cluster on loopback, each server
its own period-key authority (the stand-in operator's key and certificate), curl posting what
`openssl ts -query` made, `openssl ts -verify` checking the replies, every token's record in the
secure log (replicated: each server holds both servers' records); and a bad key file stopping
`pst serve` at start."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from clusterutil import init_cluster, pst
from cryptography.hazmat.primitives import serialization
from tsautil import make_stand_in

from appliance.apps.tsa import rfc3161
from appliance.apps.tsa.authority import serial_server
from appliance.host import config as node_config

POLICY = "1.3.6.1.4.1.99999.1.1"

pytestmark = [pytest.mark.interop, pytest.mark.slow]


def add_tsa(node: Path, folder: Path) -> None:
    config = node / "config.toml"
    config.write_text(
        config.read_text()
        + f'\n[tsa]\nmode = "period-key"\npolicy = "{POLICY}"\n'
        + f'cert = "{folder / "tsa.pem"}"\nkey = "{folder / "tsa.key"}"\n'
    )


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*map(str, args)], capture_output=True, text=True, check=True, timeout=60)


def test_servers_issue_tokens_that_openssl_verifies(tmp_path: Path) -> None:
    root = tmp_path / "cluster"
    init_cluster(root, n=4, period=30, round_ms=100, log="key")
    stand_in = make_stand_in()
    stand_in.write(tmp_path)
    nodes = sorted(root.glob("node-*"))
    for node in nodes:
        add_tsa(node, tmp_path)
    (tmp_path / "data.txt").write_bytes(b"stamped by a cluster\n")
    run("openssl", "ts", "-query", "-data", tmp_path / "data.txt", "-cert", "-out", tmp_path / "q.tsq")
    up = pst("cluster", "up", "--dir", str(root), "--detach")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        serials = []
        for server in (1, 3):
            url = node_config.load(nodes[server - 1] / "config.toml").http.url
            reply = tmp_path / f"r{server}.tsr"
            curl = run(
                "curl", "-sS", "--fail", "--retry", "20", "--retry-connrefused", "--retry-delay", "1",
                "-H", "Content-Type: application/timestamp-query", "--data-binary", f"@{tmp_path / 'q.tsq'}",
                "-o", reply, "-w", "%{http_code} %{content_type}", f"{url}/tsa",
            )  # fmt: skip
            assert curl.stdout == "200 application/timestamp-reply"
            verify = run(
                "openssl", "ts", "-verify", "-queryfile", tmp_path / "q.tsq", "-in", reply,
                "-CAfile", tmp_path / "root.pem",
            )  # fmt: skip
            assert "Verification: OK" in verify.stdout
            tst = rfc3161.decode_response(reply.read_bytes()).tst_info
            assert tst is not None
            serials.append(rfc3161.decode_tst_info(tst).serial)
        assert [serial_server(s) for s in serials] == [1, 3]
        assert (nodes[0] / "state" / "serve" / "tsa-serial").read_text() == "4096\n"
        # Each token was in the secure log before it was released, and the log is replicated.
        wanted = sorted(f"{s:x}" for s in serials)
        for node in (2, 4):
            deadline = time.monotonic() + 20
            while True:
                args = ("--node", str(node), "--since", "1h", "--app", "pst-tsa", "--json")
                shown = pst("log", "show", "--dir", str(root), *args)
                assert shown.returncode == 0, shown.stdout + shown.stderr
                entries = [json.loads(line) for line in shown.stdout.splitlines()]
                found = sorted(e["message"].split()[1] for e in entries)
                if found == wanted or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert found == wanted, shown.stdout
            assert {e["host"] for e in entries} == {"pst-server-1", "pst-server-3"}
            assert {e["msgid"] for e in entries} == {"TST"}
    finally:
        pst("cluster", "down", "--dir", str(root))

    # A key that is not the certificate's stops pst serve at start, naming the files
    other = make_stand_in()
    (tmp_path / "tsa.key").write_bytes(
        other.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    serve = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "serve", "--config", str(nodes[0] / "config.toml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert serve.returncode == 2
    assert "tsa.cert / tsa.key" in serve.stderr and "is not the key of the certificate" in serve.stderr

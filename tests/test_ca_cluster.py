"""The group root certificate from real `pst serve` processes (n=4, t=1), with the ``ca`` key in C."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

from clusterutil import alert_kinds, init_cluster, pst, status
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from appliance.apps.ca.x509 import check_root, root_tbs
from appliance.host import config as node_config
from appliance.node.store import StateDir
from appliance.protocols.state import CA_SECRET


def _ca_public(root: Path) -> bytes:
    public = StateDir(root / "node-1" / "state").load().public
    return public.sharings[CA_SECRET].public_key


def test_pst_ca_root_is_the_same_certificate_on_every_server_and_survives_a_refresh(tmp_path: Path) -> None:
    root = tmp_path / "c"
    init_cluster(root, n=4, period=600, round_ms=80, extra=("--ca",))
    constants = node_config.load(root / "node-1" / "config.toml").constants
    try:
        up = pst("cluster", "up", "--dir", str(root), "--detach")
        assert up.returncode == 0, up.stdout + up.stderr
        first = pst("ca", "root", "--dir", str(root), "--node", "2")
        assert first.returncode == 0, first.stdout + first.stderr
        pem = first.stdout.encode()
        # Server 3 takes server 2's (it fetches and checks it) rather than making its own.
        second = pst("ca", "root", "--config", str(root / "node-3" / "config.toml"))
        assert second.returncode == 0, second.stdout + second.stderr
        assert second.stdout.encode() == pem
        cert = x509.load_pem_x509_certificate(pem)
        public = _ca_public(root)
        raw = cert.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        assert raw == public
        assert cert.tbs_certificate_bytes == root_tbs(public, constants)
        cert.verify_directly_issued_by(cert)  # cryptography accepts its self-signature
        (tmp_path / "root.pem").write_bytes(pem)
        out = subprocess.run(
            ["openssl", "verify", "-CAfile", str(tmp_path / "root.pem"), str(tmp_path / "root.pem")],
            capture_output=True,
            text=True,
            check=False,
        )
        assert out.returncode == 0 and ": OK" in out.stdout, out.stdout + out.stderr
        # The ca key is not the group key, and its certificate is kept in the public state dir.
        assert public != bytes.fromhex(str(status(root)[0]["group_public_key"]))
        assert (root / "node-2" / "state" / "public" / "ca-root.pem").read_bytes() == pem
        # A refresh renews the shares of 'ca', not its public key: the same root.
        refreshed = pst("refresh", "--now", "--dir", str(root))
        assert refreshed.returncode == 0, refreshed.stdout + refreshed.stderr
        assert all(r["period"] == 1 for r in status(root))
        assert _ca_public(root) == public
        again = pst("ca", "root", "--dir", str(root), "--node", "4")
        assert again.returncode == 0, again.stdout + again.stderr
        assert again.stdout.encode() == pem
        check_root(pem, _ca_public(root), constants)
        assert "certificate-outside-policy" not in alert_kinds(root)
    finally:
        pst("cluster", "down", "--dir", str(root))


def _alerts(root: Path, i: int) -> list[dict[str, object]]:
    path = root / f"node-{i}" / "state" / "public" / "alerts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_scenario_h_a_server_whose_policy_was_altered_gets_no_certificate_and_is_named(
    tmp_path: Path,
) -> None:
    """MISSION scenario H, certificate part, with real processes: server 4's [ca] was edited (by an
    attacker) to allow a name the network's policy does not, and its syslog asks for a period
    certificate for that name. Its own check accepts; every honest server refuses its share and
    names it in a certificate-outside-policy alert; no certificate is made."""
    root = tmp_path / "c"
    init_cluster(root, n=4, period=600, round_ms=80, extra=("--ca",), log="group")
    config = root / "node-4" / "config.toml"
    port = _free_port()
    config.write_text(
        config.read_text()
        + f'tls = "127.0.0.1:{port}"\ntls_cert = "period"\ntls_names = ["bank.example.com"]\n'
        + '\n[ca]\ntls_names = ["bank.example.com"]\n'
    )
    try:
        up = pst("cluster", "up", "--dir", str(root), "--detach")
        assert up.returncode == 0, up.stdout + up.stderr
        deadline = time.monotonic() + 30
        named: dict[int, list[dict[str, object]]] = {}
        while time.monotonic() < deadline:
            named = {
                i: [a for a in _alerts(root, i) if a["kind"] == "certificate-outside-policy"]
                for i in (1, 2, 3)
            }
            if all(named.values()):
                break
            time.sleep(0.5)
        for i in (1, 2, 3):
            assert named[i], f"server {i} raised no certificate-outside-policy alert: {_alerts(root, i)}"
            assert {a["server"] for a in named[i]} == {4}
            assert all("bank.example.com" in str(a["detail"]) for a in named[i])
        assert not (root / "node-4" / "state" / "serve" / "syslog-period.crt").exists()
        assert "no syslog TLS certificate" in (root / "node-4" / "server.log").read_text()
        # The honest servers still issue the root (their policy is theirs).
        got = pst("ca", "root", "--dir", str(root), "--node", "1")
        assert got.returncode == 0, got.stdout + got.stderr
    finally:
        pst("cluster", "down", "--dir", str(root))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])

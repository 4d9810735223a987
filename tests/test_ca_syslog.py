"""Syslog over TLS with a period certificate (``[log] tls_cert = "period"``), with real processes.

A 4-server cluster with the ``ca`` key in C; server 1 listens for syslog over TLS with a fresh
P-256 key each period and a leaf the group issues for it. rsyslog (omfwd, gtls driver) trusts
only the group root (``pst ca root``) and the leaf's name; ``openssl s_client`` shows the issuer
is the group root, and that a refresh brings another certificate.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from clusterutil import alert_kinds, init_cluster, pst
from cryptography import x509
from logutil import rsyslog_config
from test_log_rsyslog import HAVE_GTLS, PROTOCOL23, RETRY, RSYSLOGD

NAME = "syslog.pst.test"

pytestmark = pytest.mark.skipif(
    not (os.path.exists(RSYSLOGD) and HAVE_GTLS and shutil.which("openssl")),
    reason="rsyslogd with its gtls driver and openssl are needed (`make deps`)",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _served(port: int, ca: Path | None = None) -> tuple[x509.Certificate | None, str]:
    """The certificate server 1 presents (openssl s_client), and s_client's output."""
    command = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", NAME]
    if ca is not None:
        command += ["-CAfile", str(ca), "-verify_return_error", "-verify_hostname", NAME]
    out = subprocess.run(command, input="", capture_output=True, text=True, timeout=20, check=False)
    text = out.stdout + out.stderr
    found = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", out.stdout, re.DOTALL)
    if found is None:
        return None, text
    return x509.load_pem_x509_certificate(found.group(0).encode()), text


def _wait_for_certificate(port: int, other_than: x509.Certificate | None = None) -> x509.Certificate:
    deadline = time.monotonic() + 30
    text = ""
    while time.monotonic() < deadline:
        cert, text = _served(port)
        if cert is not None and (other_than is None or cert != other_than):
            return cert
        time.sleep(0.5)
    raise AssertionError(f"server 1 presents no (new) period certificate: {text[-800:]}")


def test_syslog_over_tls_with_a_period_certificate_of_the_group(tmp_path: Path) -> None:
    root = tmp_path / "c"
    init_cluster(root, n=4, period=600, round_ms=80, extra=("--ca",), log="group")
    port = _free_port()
    for i in range(1, 5):
        config = root / f"node-{i}" / "config.toml"
        text = config.read_text()
        assert text.rstrip().endswith('"') and "[log]" in text  # [log] is the last section
        if i == 1:
            text += f'tls = "127.0.0.1:{port}"\ntls_cert = "period"\ntls_names = ["{NAME}"]\n'
        text += f'\n[ca]\ngrace_seconds = 30\ntls_names = ["{NAME}"]\n'  # the same policy everywhere
        config.write_text(text)
    try:
        up = pst("cluster", "up", "--dir", str(root), "--detach")
        assert up.returncode == 0, up.stdout + up.stderr
        first = _wait_for_certificate(port)
        got = pst("ca", "root", "--dir", str(root), "--node", "1")
        assert got.returncode == 0, got.stdout + got.stderr
        ca = tmp_path / "root.pem"
        ca.write_text(got.stdout)
        group_root = x509.load_pem_x509_certificate(got.stdout.encode())
        # openssl: issued by the group root, for our name, and it verifies against the root alone.
        cert, text = _served(port, ca)
        assert cert == first, text
        assert "Verify return code: 0 (ok)" in text, text
        assert first.issuer == group_root.subject
        first.verify_directly_issued_by(group_root)
        names = first.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert names.get_values_for_type(x509.DNSName) == [NAME]
        assert first.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
        life = first.not_valid_after_utc - first.not_valid_before_utc
        assert life.total_seconds() <= 600 + 30 + 2
        # rsyslog trusts the group root and the name, and forwards over TLS.
        lines = tmp_path / "input.log"
        lines.write_text("".join(f"period tls line {k}\n" for k in range(20)))
        conf = rsyslog_config(
            tmp_path,
            lines,
            [
                f'action(type="omfwd" target="127.0.0.1" port="{port}" protocol="tcp" '
                f'TCP_Framing="octet-counted" StreamDriver="gtls" StreamDriverMode="1" '
                f'StreamDriverAuthMode="x509/name" StreamDriverPermittedPeers="{NAME}" '
                f'StreamDriver.CAFile="{ca}" {RETRY} {PROTOCOL23})'
            ],
        )
        with open(tmp_path / "rsyslogd.out", "wb") as out:
            rsyslogd = subprocess.Popen(
                [RSYSLOGD, "-n", "-f", str(conf), "-i", str(tmp_path / "rsyslogd.pid")],
                stdout=out,
                stderr=out,
            )
        try:
            deadline = time.monotonic() + 30
            tail = ""
            while time.monotonic() < deadline:
                tail = pst("log", "tail", "--dir", str(root), "--node", "1", "-n", "30").stdout
                if tail.count("period tls line") >= 20:
                    break
                time.sleep(0.5)
            assert tail.count("period tls line") == 20, tail + (tmp_path / "rsyslogd.out").read_text()
        finally:
            rsyslogd.terminate()
            rsyslogd.wait(10)
        # A refresh: a new KeyTable, a new key and certificate from the same root.
        refreshed = pst("refresh", "--now", "--dir", str(root))
        assert refreshed.returncode == 0, refreshed.stdout + refreshed.stderr
        second = _wait_for_certificate(port, other_than=first)
        assert second.issuer == group_root.subject and second.serial_number != first.serial_number
        assert second.public_key() != first.public_key()
        second.verify_directly_issued_by(group_root)
        cert, text = _served(port, ca)
        assert cert == second and "Verify return code: 0 (ok)" in text, text
        assert "certificate-outside-policy" not in alert_kinds(root)
        key = root / "node-1" / "state" / "serve" / "syslog-period.key"
        assert key.stat().st_mode & 0o077 == 0
    finally:
        pst("cluster", "down", "--dir", str(root))

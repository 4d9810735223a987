"""Period certificates for real tunnel software (issue 13 §2), with real processes.

A 4-server cluster (t = 1) with the ``ca`` key in C and two application profiles in every
server's ``[ca.apps]``. The pst-keys agent (clients/pst-keys) gets a period certificate for
application ``tunnel-server`` at server 1 (the server makes the key) and one for
``tunnel-client`` at server 2 (a CSR: the key is made by the agent). stunnel in server mode and
stunnel in client mode, with mutual TLS (``verifyChain``, ``requireCert``, CAfile = the group
root, ``checkHost``), carry bytes to an echo server; ``openssl s_client`` checks the handshake.
After ``pst refresh --now`` the agent renews, its reload command sends stunnel SIGHUP, and the new
certificate is presented. A name outside the policy is not obtained; a stunnel whose clock is a
day ahead (libfaketime: the certificates' expiry cannot be waited for in a test) refuses the
client's certificate as expired. Every certificate issued is in the secure log.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from clusterutil import alert_kinds, init_cluster, pst
from cryptography import x509

REPO = Path(__file__).resolve().parent.parent
AGENT = REPO / "clients" / "pst-keys"
STUNNEL = shutil.which("stunnel4") or shutil.which("stunnel")
FAKETIME = shutil.which("faketime")
SERVER_NAME, CLIENT_NAME = "server.tunnel.test", "client.tunnel.test"

pytestmark = pytest.mark.skipif(
    STUNNEL is None or FAKETIME is None or shutil.which("openssl") is None,
    reason="stunnel4, faketime and openssl are needed (`make deps`)",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _echo_server() -> Iterator[int]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(10)
                with contextlib.suppress(OSError):
                    while data := conn.recv(65536):
                        conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def _agent(root: Path, node: int, *args: str) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        str(AGENT),
        "--socket",
        str(root / f"node-{node}" / "api.sock"),
        "--once",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def _agent_until_ok(root: Path, node: int, *args: str) -> subprocess.CompletedProcess[str]:
    """The first certificates wait for the servers to be operational and the root to be made."""
    deadline = time.monotonic() + 30
    while True:
        out = _agent(root, node, *args)
        if out.returncode == 0 or time.monotonic() > deadline:
            return out
        time.sleep(0.5)


def _stunnel(conf: Path, text: str, log: Path, *, faketime: str | None = None) -> subprocess.Popen[bytes]:
    conf.write_text("foreground = yes\ndebug = info\n" + text)
    command = [str(STUNNEL), str(conf)]
    if faketime is not None:
        command = [str(FAKETIME), "-f", faketime, *command]
    with open(log, "ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)


def _wait_port(port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on {port}")


def _through(port: int, data: bytes) -> bytes:
    """Bytes sent into the client-side stunnel, as they come back from the echo server."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        got = b""
        with contextlib.suppress(TimeoutError, OSError):
            while len(got) < len(data):
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
        return got


def _s_client(port: int, cert: Path, key: Path, root_pem: Path) -> tuple[x509.Certificate | None, str]:
    command = [
        "openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", SERVER_NAME,
        "-cert", str(cert), "-key", str(key), "-CAfile", str(root_pem),
        "-verify_return_error", "-verify_hostname", SERVER_NAME,
    ]  # fmt: skip
    out = subprocess.run(command, input="", capture_output=True, text=True, timeout=20, check=False)
    found = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", out.stdout, re.DOTALL)
    cert_seen = x509.load_pem_x509_certificate(found.group(0).encode()) if found else None
    return cert_seen, out.stdout + out.stderr


def test_stunnel_with_period_certificates_from_the_agent(tmp_path: Path) -> None:
    t0 = time.monotonic()

    def mark(what: str) -> None:
        print(f"{time.monotonic() - t0:6.1f} s  {what}")

    root = tmp_path / "c"
    init_cluster(root, n=4, period=600, round_ms=80, extra=("--ca",), log="group")
    for i in range(1, 5):  # the same policy on every server
        config = root / f"node-{i}" / "config.toml"
        config.write_text(
            config.read_text()
            + f'\n[ca]\ngrace_seconds = 60\n[ca.apps.tunnel-server]\nnames = ["{SERVER_NAME}"]\n'
            + f'[ca.apps.tunnel-client]\nnames = ["{CLIENT_NAME}", "*.clients.tunnel.test"]\n'
        )
    server_dir, client_dir = tmp_path / "server-keys", tmp_path / "client-keys"
    hook_log, pid_file = tmp_path / "hook.log", tmp_path / "stunnel-server.pid"
    reload = f'echo "$PST_KEYS_APP" >> {hook_log}; kill -HUP "$(cat {pid_file})"'
    procs: list[subprocess.Popen[bytes]] = []
    try:
        mark("init")
        up = pst("cluster", "up", "--dir", str(root), "--detach")
        assert up.returncode == 0, up.stdout + up.stderr
        # The server's key made by the server (node 1), the client's by the agent (CSR, node 2).
        out = _agent_until_ok(root, 1, "--app", "tunnel-server", "--dir", str(server_dir))
        assert out.returncode == 0, out.stderr
        out = _agent_until_ok(root, 2, "--app", "tunnel-client", "--dir", str(client_dir), "--csr")
        assert out.returncode == 0, out.stderr
        mark("certificates")
        got = pst("ca", "root", "--dir", str(root), "--node", "1")
        assert got.returncode == 0, got.stderr
        root_pem = tmp_path / "root.pem"
        root_pem.write_text(got.stdout)
        group_root = x509.load_pem_x509_certificate(got.stdout.encode())
        first = x509.load_pem_x509_certificate((server_dir / "cert.pem").read_bytes())
        first.verify_directly_issued_by(group_root)
        assert (server_dir / "key.pem").stat().st_mode & 0o077 == 0
        assert (server_dir / "bundle.pem").read_bytes() == (
            server_dir / "cert.pem"
        ).read_bytes() + got.stdout.encode()
        san = first.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [SERVER_NAME]
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:pst:app:tunnel-server"]

        with _echo_server() as echo:
            p_server, p_client = _free_port(), _free_port()
            common = f"CAfile = {root_pem}\nverifyChain = yes\nrequireCert = yes\n"
            server = _stunnel(
                tmp_path / "server.conf",
                f"[tunnel]\naccept = 127.0.0.1:{p_server}\nconnect = 127.0.0.1:{echo}\n"
                f"cert = {server_dir / 'cert.pem'}\nkey = {server_dir / 'key.pem'}\n{common}"
                f"checkHost = {CLIENT_NAME}\n",
                tmp_path / "stunnel-server.log",
            )
            procs.append(server)
            pid_file.write_text(f"{server.pid}\n")
            client = _stunnel(
                tmp_path / "client.conf",
                f"client = yes\n[tunnel]\naccept = 127.0.0.1:{p_client}\nconnect = 127.0.0.1:{p_server}\n"
                f"cert = {client_dir / 'cert.pem'}\nkey = {client_dir / 'key.pem'}\n{common}"
                f"checkHost = {SERVER_NAME}\n",
                tmp_path / "stunnel-client.log",
            )
            procs.append(client)
            _wait_port(p_server)
            _wait_port(p_client)
            mark("stunnel up")
            payload = bytes(range(256)) * 64
            assert _through(p_client, payload) == payload, (tmp_path / "stunnel-server.log").read_text()[
                -2000:
            ]
            seen, text = _s_client(p_server, client_dir / "cert.pem", client_dir / "key.pem", root_pem)
            assert seen == first and "Verify return code: 0 (ok)" in text, text

            mark("through")
            # Outside the policy: another application's name, a name deeper than the wildcard.
            out = _agent(root, 1, "--app", "tunnel-server", "--dir", str(server_dir), "--name", CLIENT_NAME)
            assert out.returncode == 1 and "outside the profile of application 'tunnel-server'" in out.stderr
            out = _agent(
                root,
                2,
                "--app",
                "tunnel-client",
                "--dir",
                str(client_dir),
                "--name",
                "a.b.clients.tunnel.test",
            )
            assert out.returncode == 1 and "outside the profile" in out.stderr
            assert x509.load_pem_x509_certificate((server_dir / "cert.pem").read_bytes()) == first  # kept

            # A refresh; then the agent renews and reloads stunnel, which presents the new certificate.
            mark("refused")
            refreshed = pst("refresh", "--now", "--dir", str(root))
            assert refreshed.returncode == 0, refreshed.stdout + refreshed.stderr
            time.sleep(3)  # the refresh starts in two seconds
            out = _agent_until_ok(
                root, 1, "--app", "tunnel-server", "--dir", str(server_dir), "--reload", reload
            )
            assert out.returncode == 0, out.stderr
            assert hook_log.read_text() == "tunnel-server\n"
            mark("renewed")
            second = x509.load_pem_x509_certificate((server_dir / "cert.pem").read_bytes())
            assert second.serial_number != first.serial_number and second.public_key() != first.public_key()
            second.verify_directly_issued_by(group_root)
            deadline = time.monotonic() + 10
            while True:
                seen, text = _s_client(p_server, client_dir / "cert.pem", client_dir / "key.pem", root_pem)
                if seen == second or time.monotonic() > deadline:
                    break
                time.sleep(0.3)
            assert seen == second and "Verify return code: 0 (ok)" in text, text
            assert _through(p_client, payload) == payload

            mark("new cert presented")
            # A stunnel whose clock is a day ahead: the client's certificate has expired for it.
            p_late = _free_port()
            late_log = tmp_path / "stunnel-late.log"
            late = _stunnel(
                tmp_path / "late.conf",
                f"[tunnel]\naccept = 127.0.0.1:{p_late}\nconnect = 127.0.0.1:{echo}\n"
                f"cert = {server_dir / 'cert.pem'}\nkey = {server_dir / 'key.pem'}\n{common}",
                late_log,
                faketime="+1d",
            )
            procs.append(late)
            _wait_port(p_late)
            _s_client(p_late, client_dir / "cert.pem", client_dir / "key.pem", root_pem)
            deadline = time.monotonic() + 5
            while "certificate has expired" not in late_log.read_text() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert "certificate has expired" in late_log.read_text(), late_log.read_text()[-2000:]

        mark("expired")
        # One server stopped (t = 1 of n = 4): the client's certificate is still renewed, via server 2.
        os.kill(int((root / "node-4" / "server.pid").read_text()), signal.SIGTERM)
        before = (client_dir / "cert.pem").read_bytes()
        out = _agent_until_ok(root, 2, "--app", "tunnel-client", "--dir", str(client_dir), "--csr")
        assert out.returncode == 0, out.stderr
        assert (client_dir / "cert.pem").read_bytes() != before
        x509.load_pem_x509_certificate((client_dir / "cert.pem").read_bytes()).verify_directly_issued_by(
            group_root
        )
        mark("stopped server")

        # Every certificate issued is in the secure log (server 1's two, server 2's two).
        tail = pst("log", "tail", "--dir", str(root), "--node", "1", "-n", "200").stdout
        client_cert = x509.load_pem_x509_certificate((client_dir / "cert.pem").read_bytes())
        for cert in (first, second, client_cert):  # the message is its TBSCertificate (base64 DER)
            assert base64.b64encode(cert.tbs_certificate_bytes).decode() in tail, tail
        assert tail.count("pst-ca") == 4
        assert "certificate-outside-policy" not in alert_kinds(root)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        pst("cluster", "down", "--dir", str(root))

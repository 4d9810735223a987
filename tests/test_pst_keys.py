"""The pst-keys agent's logic (clients/pst_keys.py): atomic files, renewal at half-life (not before
the server's renew_after), the reload command, and failures that keep the old files.

The server side is a stand-in that issues real certificates under a local root (the API and
the threshold CA are tested in test_api_certificate.py and, with real processes and stunnel,
in test_keys_stunnel.py)."""

from __future__ import annotations

import importlib.util
import os
import stat
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from test_api_certificate import ROOT_PUBLIC, C, LocalCa

from appliance.api._certs import csr_public_key, generate_key, spki_of
from appliance.api.client import IssuedCertificate, PstError
from appliance.apps.ca import x509 as ca

_spec = importlib.util.spec_from_file_location(
    "pst_keys", Path(__file__).resolve().parent.parent / "clients" / "pst_keys.py"
)
assert _spec is not None and _spec.loader is not None
pst_keys = importlib.util.module_from_spec(_spec)
sys.modules["pst_keys"] = pst_keys
_spec.loader.exec_module(pst_keys)


class Server:
    """What the agent's client talks to: certificates of a local root, or a failure."""

    def __init__(self) -> None:
        self.authority = LocalCa()
        self.fail: PstError | None = None
        self.wrong_key = False
        self.calls: list[dict[str, Any]] = []

    def issue(self, csr: bytes | None, names: Sequence[str] | None) -> IssuedCertificate:
        self.calls.append({"csr": csr, "names": names})
        if self.fail is not None:
            raise self.fail
        key_pem: bytes | None = None
        if csr is None:
            spki, key_pem = generate_key()
        else:
            spki = spki_of(csr_public_key(csr))
        if self.wrong_key:
            spki = generate_key()[0]
        builder = ca.leaf_builder(
            root_public=ROOT_PUBLIC,
            constants=C,
            subject_key=serialization.load_der_public_key(spki),
            names=list(names or ["tunnel.example.org"]),
            eku=ca.TLS_EKU,
            eku_critical=False,
            validity=ca.leaf_validity(C, time.time(), 60.0),
            app="web-tunnel",
        )
        tbs = ca.tbs_of(builder, ROOT_PUBLIC)
        from test_api_certificate import ROOT

        leaf = ca.pem(ca.assemble(builder, ROOT_PUBLIC, tbs, ROOT.sign(tbs).signature))
        cert = x509.load_pem_x509_certificate(leaf)
        start, end = int(cert.not_valid_before_utc.timestamp()), int(cert.not_valid_after_utc.timestamp())
        return IssuedCertificate(
            leaf, leaf + self.authority.root, start, end, start + (end - start) // 2, key_pem
        )


class Client:
    def __init__(self, server: Server) -> None:
        self.server = server

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def register(self, name: str) -> bytes:
        assert name == "web-tunnel"
        return bytes(32)

    def certificate(
        self, *, csr: bytes | None = None, names: Sequence[str] | None = None
    ) -> IssuedCertificate:
        return self.server.issue(csr, names)


def agent(tmp_path: Path, server: Server, **kw: Any) -> tuple[Any, list[str]]:
    said: list[str] = []
    a = pst_keys.Agent(tmp_path / "keys", "web-tunnel", lambda: Client(server), say=said.append, **kw)
    return a, said


def files(directory: Path) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in ("key.pem", "cert.pem", "bundle.pem")}


def test_a_renewal_writes_the_key_0600_the_certificate_and_the_bundle_then_runs_the_hook(
    tmp_path: Path,
) -> None:
    server = Server()
    marker = tmp_path / "hook-ran"
    a, said = agent(tmp_path, server, reload=f'echo "$PST_KEYS_DIR $PST_KEYS_APP" >> {marker}')
    assert a.due() == 0.0  # nothing there yet
    assert a.once() == 0
    d = tmp_path / "keys"
    got = files(d)
    assert stat.S_IMODE((d / "key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((d / "cert.pem").stat().st_mode) == 0o644
    assert got["bundle.pem"] == got["cert.pem"] + server.authority.root
    key = serialization.load_pem_private_key(got["key.pem"], None)
    leaf = x509.load_pem_x509_certificate(got["cert.pem"])
    assert leaf.public_key() == key.public_key()
    assert marker.read_text() == f"{d} web-tunnel\n"
    assert not [p for p in d.iterdir() if p.name.startswith(".")]  # no temporary files left
    assert "new certificate" in said[-1]


def test_with_a_csr_the_key_is_made_here_and_never_sent(tmp_path: Path) -> None:
    server = Server()
    a, _ = agent(tmp_path, server, csr=True, names=["a.vpn.example.org"])
    assert a.once() == 0
    call = server.calls[-1]
    assert call["csr"] is not None and call["names"] == ["a.vpn.example.org"]
    key = serialization.load_pem_private_key((tmp_path / "keys" / "key.pem").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert csr_public_key(call["csr"]) == key.public_key()
    a, _ = agent(tmp_path, server, csr=True, key_type="ed25519")
    assert a.once() == 0


def test_renewal_at_half_life_not_before_the_servers_renew_after(tmp_path: Path) -> None:
    server = Server()
    now = [time.time()]
    a, _ = agent(tmp_path, server, clock=lambda: now[0])
    assert a.once() == 0
    current = a.current()
    assert current is not None
    half = current.not_before + (current.not_after - current.not_before) / 2
    assert current.renew_after == pytest.approx(half, abs=1)
    now[0] = half - 10
    assert a.due() == pytest.approx(10, abs=1)
    wait, failures = a.step(0)
    assert len(server.calls) == 1 and 0 < wait <= 11 and failures == 0  # not due: no request
    now[0] = half + 1
    assert a.due() == 0.0
    # The server's renew_after, if later (the next period), wins; never past the end.
    pst_keys.atomic_write(
        tmp_path / "keys" / "renew.json",
        f'{{"serial": {current.serial}, "renew_after": {int(half) + 100}}}'.encode(),
        0o644,
    )
    assert a.due() == pytest.approx(99, abs=1)
    pst_keys.atomic_write(
        tmp_path / "keys" / "renew.json",
        f'{{"serial": {current.serial}, "renew_after": {int(current.not_after) + 999}}}'.encode(),
        0o644,
    )
    assert a.current().renew_after == current.not_after
    # A renew.json of another certificate is ignored.
    pst_keys.atomic_write(
        tmp_path / "keys" / "renew.json", b'{"serial": 1, "renew_after": 99999999999}', 0o644
    )
    assert a.current().renew_after == pytest.approx(half, abs=1)


def test_any_failure_keeps_the_old_files_and_says_why(tmp_path: Path) -> None:
    server = Server()
    a, said = agent(tmp_path, server, reload="exit 7")
    assert a.once() == 2  # renewed, but the reload command failed
    assert "exited with status 7" in said[-1]
    d = tmp_path / "keys"
    before = files(d)
    # The server refuses.
    server.fail = PstError("not-permitted", "names ['x.org'] are outside the profile")
    assert a.once() == 1
    assert "not renewed, the old files are kept" in said[-1] and "outside the profile" in said[-1]
    assert files(d) == before
    # A certificate for another key than the one returned.
    server.fail, server.wrong_key = None, True
    assert a.once() == 1 and "not for the private key" in said[-1]
    assert files(d) == before
    # The server is not there at all.
    a2 = pst_keys.Agent(
        d, "web-tunnel", lambda: pst_keys.PstClient(str(tmp_path / "no.sock")), say=said.append
    )
    assert a2.once() == 1 and "cannot reach the server" in said[-1]
    assert files(d) == before
    # A file that cannot be replaced: nothing else changes.
    server.wrong_key = False
    (d / "cert.pem").unlink()
    (d / "cert.pem").mkdir()
    assert a.once() == 1 and "cannot write" in said[-1]
    assert (d / "bundle.pem").read_bytes() == before["bundle.pem"]
    assert not [p for p in d.iterdir() if p.name.startswith(".")]


def test_failures_back_off_and_a_success_resets(tmp_path: Path) -> None:
    server = Server()
    server.fail = PstError("unavailable", "no certificate now")
    a, _ = agent(tmp_path, server)
    delays = []
    failures = 0
    for _ in range(8):
        wait, failures = a.step(failures)
        delays.append(wait)
    assert delays == [5, 10, 20, 40, 80, 160, 300, 300]
    server.fail = None
    wait, failures = a.step(failures)
    assert failures == 0 and wait > 5  # renewed; next look at half-life


def test_files_that_do_not_go_together_are_renewed(tmp_path: Path) -> None:
    server = Server()
    a, said = agent(tmp_path, server)
    assert a.once() == 0
    d = tmp_path / "keys"
    other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pst_keys.atomic_write(d / "key.pem", other, 0o600)
    assert a.current() is None and "do not go together" in said[-1]
    assert a.due() == 0.0


def test_the_agent_runs_as_a_program(tmp_path: Path) -> None:
    import subprocess

    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve().parent.parent / "clients" / "pst-keys"), "--help"],
        capture_output=True,
        text=True,
        check=False,
        env=dict(os.environ),
    )
    assert out.returncode == 0 and "--reload" in out.stdout
    out = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve().parent.parent / "clients" / "pst-keys"),
            "--app",
            "web-tunnel",
            "--dir",
            str(tmp_path / "k"),
            "--socket",
            str(tmp_path / "none.sock"),
            "--once",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 1 and "cannot reach the server" in out.stderr

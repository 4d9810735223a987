"""Certificate-based registration of distributed applications (paper §5.1, option 2).

The API core against a fake backend, with CAs and client certificates made by ``cryptography``
(an Ed25519 CA and a P-256 CA) and by the ``openssl`` command line, as an operator would: each
refusal the issue names (forged, reused, wrong server, wrong index) and the others (expired,
no proof of possession, a stale or foreign challenge, a CA certificate, no URI). Real servers
with certified clients reaching a majority are in test_distributed_real.py.
"""

from __future__ import annotations

import datetime
import hashlib
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st
from test_api import ME, OTHER, FakeDistributed, req

from appliance.api import NOT_PERMITTED, UNAVAILABLE, ApiCore
from appliance.api._certreg import (
    CertificateRefused,
    ClientCA,
    UsedCertificates,
    client_uri,
    registration_payload,
)

NOW = datetime.datetime(2026, 11, 30, 12, 0, tzinfo=datetime.UTC)
SERVER = 3
Key = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _sign(builder: x509.CertificateBuilder, key: Key) -> x509.Certificate:
    return builder.sign(key, None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256())


def make_ca(kind: str = "ed25519", cn: str = "Clients CA") -> tuple[x509.Certificate, Key]:
    key: Key = (
        ed25519.Ed25519PrivateKey.generate() if kind == "ed25519" else ec.generate_private_key(ec.SECP256R1())
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    )
    return _sign(builder, key), key


def make_client(
    ca: tuple[x509.Certificate, Key],
    *,
    name: str = "ledger",
    index: int = SERVER,
    server: int = SERVER,
    uris: list[str] | None = None,
    days: int = 1,
    is_ca: bool = False,
    kind: str = "ed25519",
) -> tuple[bytes, Key]:
    key: Key = (
        ed25519.Ed25519PrivateKey.generate() if kind == "ed25519" else ec.generate_private_key(ec.SECP256R1())
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(f"{name} component {index}"))
        .issuer_name(ca[0].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(days=10))
        .not_valid_after(NOW + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    names = [client_uri(name, index, server)] if uris is None else uris
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in names]), critical=False
        )
    return _sign(builder, ca[1]).public_bytes(serialization.Encoding.PEM), key


def proof(key: Key, challenge: bytes, pem: bytes, server: int = SERVER) -> bytes:
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    payload = registration_payload(server, challenge, hashlib.sha256(der).digest())
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(payload)
    return key.sign(payload, ec.ECDSA(hashes.SHA256()))


def core_for(ca_cert: x509.Certificate, tmp_path: Path | None = None) -> ApiCore:
    used = UsedCertificates(tmp_path / "used" if tmp_path is not None else None)
    return ApiCore(
        FakeDistributed(),
        client_ca=ClientCA([ca_cert], "test CA"),
        server_id=SERVER,
        used_certificates=used,
        wall=lambda: NOW.timestamp(),
    )


async def register(
    core: ApiCore, pem: bytes, key: Key, peer: Any = ME, server: int = SERVER
) -> dict[str, Any]:
    challenge = (await core.handle(req("challenge"), peer))["result"]["challenge"]
    signature = proof(key, challenge, pem, server)
    return await core.handle(
        req("register_certified", certificate=pem, challenge=challenge, signature=signature), peer
    )


def refused(answer: dict[str, Any], says: str) -> None:
    assert answer["ok"] is False, answer
    assert answer["error"]["code"] == NOT_PERMITTED, answer
    assert says in answer["error"]["message"], answer["error"]["message"]


@pytest.mark.parametrize("kind", ["ed25519", "p256"])
async def test_a_certified_client_registers_once_and_requests_like_a_password_client(
    kind: str, tmp_path: Path
) -> None:
    ca = make_ca(kind)
    core = core_for(ca[0], tmp_path)
    pem, key = make_client(ca, kind=kind)
    answer = await register(core, pem, key)
    assert answer["ok"], answer
    handle = answer["result"]["handle"]
    r = await core.handle(req("request", handle=handle, protocol="sign", payload=b"entry"), ME)
    assert r["ok"], r
    backend = core.backend
    assert isinstance(backend, FakeDistributed)
    ((app, verifier, *_),) = backend.requests
    assert (app, verifier) == ("ledger", ClientCA([ca[0]], "x").verifier("ledger"))
    # One-time: the same certificate again is refused, here and after a restart (the file).
    refused(await register(core, pem, key), "this one-time certificate registered before")
    refused(await register(core_for(ca[0], tmp_path), pem, key), "registered before")


async def test_a_forged_certificate_is_refused() -> None:
    ca = make_ca()
    core = core_for(ca[0])
    # A certificate by another CA with the same name, and one whose signature was altered.
    impostor = make_ca(cn="Clients CA")
    pem, key = make_client(impostor)
    refused(await register(core, pem, key), "not issued by the CA this server trusts")
    pem, key = make_client(ca)
    der = bytearray(x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER))
    der[-5] ^= 1
    challenge = (await core.handle(req("challenge"), ME))["result"]["challenge"]
    answer = await core.handle(
        req("register_certified", certificate=bytes(der), challenge=challenge, signature=b"\0" * 64), ME
    )
    refused(answer, "not issued by the CA")


async def test_a_certificate_for_another_server_or_component_is_refused() -> None:
    ca = make_ca()
    core = core_for(ca[0])
    pem, key = make_client(ca, index=2, server=2)
    refused(await register(core, pem, key, server=2), "the certificate is for server 2, this is server 3")
    pem, key = make_client(ca, index=2, server=SERVER)
    refused(await register(core, pem, key), "for component 2 of 'ledger'; component 3 runs at this server")


async def test_possession_and_challenges_are_checked() -> None:
    ca = make_ca()
    core = core_for(ca[0])
    pem, key = make_client(ca)
    other_key = ed25519.Ed25519PrivateKey.generate()
    refused(await register(core, pem, other_key), "does not prove possession of the certified key")
    # A challenge is good once, for the uid that asked, for a minute.
    challenge = (await core.handle(req("challenge"), ME))["result"]["challenge"]
    signature = proof(key, challenge, pem)
    answer = await core.handle(
        req("register_certified", certificate=pem, challenge=challenge, signature=signature), OTHER
    )
    refused(answer, "unknown or expired challenge")
    core.clock = lambda: 10**9  # type: ignore[method-assign]
    answer = await core.handle(
        req("register_certified", certificate=pem, challenge=challenge, signature=signature), ME
    )
    refused(answer, "unknown or expired challenge")
    # The failed attempts did not spend the certificate.
    core.clock = lambda: 10**9 + 1  # type: ignore[method-assign]
    assert (await register(core, pem, key))["ok"]


async def test_expired_ca_and_uri_less_certificates_are_refused() -> None:
    ca = make_ca()
    core = core_for(ca[0])
    pem, key = make_client(ca, days=-2)
    refused(await register(core, pem, key), "the certificate is not valid now")
    pem, key = make_client(ca, is_ca=True)
    refused(await register(core, pem, key), "a CA certificate cannot register a client")
    pem, key = make_client(ca, uris=[])
    refused(await register(core, pem, key), "has no subjectAltName URI")
    pem, key = make_client(ca, uris=[client_uri("a", 3, 3), client_uri("b", 3, 3)])
    refused(await register(core, pem, key), "exactly one URI")
    pem, key = make_client(ca, uris=["urn:pst:distributed:ledger:x:3"])
    refused(await register(core, pem, key), "malformed client URI")


async def test_without_a_configured_ca_certificate_registration_is_unavailable() -> None:
    core = ApiCore(FakeDistributed())
    answer = await core.handle(
        req("register_certified", certificate=b"x", challenge=b"c", signature=b"s"), ME
    )
    assert answer["error"]["code"] == UNAVAILABLE and "distributed_ca" in answer["error"]["message"]


def test_certificates_made_with_openssl_are_read(tmp_path: Path) -> None:
    """What an operator does with the openssl command line: a CA, a key and a certificate with the URI."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp_path, check=True, capture_output=True)

    run("genpkey", "-algorithm", "ed25519", "-out", "ca.key")
    ca_args = [
        "-subj",
        "/CN=Ledger clients CA",
        "-days",
        "30",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
    ]
    run("req", "-x509", "-new", "-key", "ca.key", *ca_args, "-out", "ca.pem")
    run("genpkey", "-algorithm", "ed25519", "-out", "c.key")
    run("req", "-new", "-key", "c.key", "-subj", "/CN=ledger 3", "-out", "c.csr")
    (tmp_path / "ext").write_text(f"subjectAltName=URI:{client_uri('ledger', 3, 3)}\n")
    issue = ["-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2", "-extfile", "ext"]
    run("x509", "-req", "-in", "c.csr", *issue, "-out", "c.pem")
    ca = ClientCA.load(tmp_path / "ca.pem")
    now = datetime.datetime.now(datetime.UTC)
    client = ca.check((tmp_path / "c.pem").read_bytes(), server=3, now=now)
    assert (client.name, client.index, client.server) == ("ledger", 3, 3)
    with pytest.raises(CertificateRefused, match="for server 3, this is server 2"):
        ca.check((tmp_path / "c.pem").read_bytes(), server=2, now=now)
    with pytest.raises(ValueError, match="not a CA certificate"):
        ClientCA.load(tmp_path / "c.pem")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3000))
def test_any_bytes_as_a_certificate_are_refused_with_a_reason(data: bytes) -> None:
    ca = ClientCA([_CA[0]], "test CA")
    with pytest.raises(CertificateRefused):
        ca.check(data, server=SERVER, now=NOW)


_CA = make_ca()

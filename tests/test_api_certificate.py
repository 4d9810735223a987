"""The local API's ``certificate`` operation (issue 13 §1): the core, with a CA that checks every
leaf with the signers' own policy check and signs with a local Ed25519 key (the threshold
signing itself is tested with real processes in tests/test_keys_stunnel.py)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey
from test_api import ME, OTHER, FakeBackend, req

from appliance.api import ApiCore, BackendUnavailable, Limits
from appliance.apps.ca import x509 as ca
from appliance.apps.ca.policy import CaPolicy, CertificateCheck, app_profile
from appliance.protocols.state import CA_SECRET, SCERT, Constants

C = Constants(
    n=4,
    t=1,
    period_length=600.0,
    delta=0.1,
    genesis=time.time() - 3600,
    peers={i: f"127.0.0.{i}:{7100 + i}" for i in range(1, 5)},
    secrets={SCERT: "ed25519", CA_SECRET: "ed25519"},
)
ROOT = SigningKey(bytes(range(32)))
ROOT_PUBLIC = bytes(ROOT.verify_key)
APPS = {"web-tunnel": ("tunnel.example.org", "*.vpn.example.org"), "db": ("db.example.org",)}


class LocalCa:
    """A CertificateBackend: the key-holder's leaf and the signers' check, one local key."""

    def __init__(self) -> None:
        policy = CaPolicy(60.0, tuple(app_profile(a, n) for a, n in APPS.items()))
        self.check = CertificateCheck(C, lambda: ROOT_PUBLIC, policy)
        self.records: list[tuple[str, str, bytes]] = []
        self.fail_record = False
        self.root = ca.pem(
            ca.assemble(
                ca.root_builder(ROOT_PUBLIC, C),
                ROOT_PUBLIC,
                t := ca.root_tbs(ROOT_PUBLIC, C),
                ROOT.sign(t).signature,
            )
        )

    def app_names(self, app: str) -> Sequence[str] | None:
        return APPS.get(app)

    def next_period(self) -> float:
        return C.period_start(C.period_at(time.time()) + 1)

    async def issue_certificate(
        self, client: str, app: str, spki: bytes, names: Sequence[str]
    ) -> tuple[bytes, bytes]:
        builder = ca.leaf_builder(
            root_public=ROOT_PUBLIC,
            constants=C,
            subject_key=serialization.load_der_public_key(spki),
            names=names,
            eku=ca.TLS_EKU,
            eku_critical=False,
            validity=ca.leaf_validity(C, time.time(), 60.0),
            app=app,
        )
        tbs = ca.tbs_of(builder, ROOT_PUBLIC)
        why = self.check.check(tbs)
        assert why is None, why
        leaf = ca.pem(ca.assemble(builder, ROOT_PUBLIC, tbs, ROOT.sign(tbs).signature))
        if self.fail_record:
            raise BackendUnavailable("the certificate's record could not be stored in the secure log")
        self.records.append((client, app, leaf))
        return leaf, self.root


def core(limits: Limits | None = None) -> tuple[ApiCore, LocalCa]:
    authority = LocalCa()
    return ApiCore(FakeBackend(), certificates=authority, limits=limits), authority


async def register(api: ApiCore, name: str, peer: Any = ME) -> bytes:
    r = await api.handle(req("register", name=name, unique_id=b"default"), peer)
    assert r["ok"], r
    handle = r["result"]["handle"]
    assert isinstance(handle, bytes)
    return handle


def csr_for(key: Any, name: str = "tunnel.example.org") -> bytes:
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, algorithm)
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def verify_chain(leaf_pem: bytes, root_pem: bytes) -> x509.Certificate:
    leaf = x509.load_pem_x509_certificate(leaf_pem)
    root = x509.load_pem_x509_certificate(root_pem)
    leaf.verify_directly_issued_by(root)
    return leaf


async def test_a_generated_key_comes_back_with_its_certificate_and_the_bundle() -> None:
    api, authority = core()
    handle = await register(api, "web-tunnel")
    r = await api.handle(
        req("certificate", handle=handle, names=["Tunnel.example.org", "a.vpn.example.org"]), ME
    )
    assert r["ok"], r
    result = r["result"]
    leaf = verify_chain(result["certificate"], authority.root)
    assert result["bundle"] == result["certificate"] + authority.root
    key = serialization.load_pem_private_key(result["key"], None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
    assert leaf.public_key() == key.public_key()
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["tunnel.example.org", "a.vpn.example.org"]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:pst:app:web-tunnel"]
    assert result["not_after"] == int(leaf.not_valid_after_utc.timestamp())
    assert result["not_before"] < time.time() < result["not_after"]
    half = (result["not_before"] + result["not_after"]) // 2
    assert result["renew_after"] == max(half, math.ceil(C.period_start(C.period_at(time.time()) + 1)))
    assert authority.records == [(f"uid {ME.uid} app web-tunnel", "web-tunnel", result["certificate"])]


@pytest.mark.parametrize("kind", ["p256-pem", "p256-der", "ed25519"])
async def test_a_csr_is_certified_for_its_own_key_and_no_key_is_returned(kind: str) -> None:
    api, authority = core()
    handle = await register(api, "db")
    key: Any = (
        ed25519.Ed25519PrivateKey.generate() if kind == "ed25519" else ec.generate_private_key(ec.SECP256R1())
    )
    csr = csr_for(key)
    if kind == "p256-der":
        csr = x509.load_pem_x509_csr(csr).public_bytes(serialization.Encoding.DER)
    r = await api.handle(req("certificate", handle=handle, csr=csr), ME)
    assert r["ok"], r
    assert "key" not in r["result"]
    leaf = verify_chain(r["result"]["certificate"], authority.root)
    assert leaf.public_key() == key.public_key()
    # Without names: the profile's (the CSR's subject asked for another name; it is not taken).
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["db.example.org"]


async def test_refusals_name_the_reason() -> None:
    api, authority = core()
    handle = await register(api, "web-tunnel")
    r = await api.handle(req("certificate", handle=handle, names=["db.example.org"]), ME)
    assert r["error"]["code"] == "not-permitted"
    assert "['db.example.org'] are outside the profile of application 'web-tunnel'" in r["error"]["message"]
    r = await api.handle(req("certificate", handle=handle, names=["a.b.vpn.example.org"]), ME)
    assert r["error"]["code"] == "not-permitted"
    other = await register(api, "mail")
    r = await api.handle(req("certificate", handle=other), ME)
    assert r["error"]["code"] == "not-permitted" and "[ca.apps.mail]" in r["error"]["message"]
    # A CSR whose signature does not verify: no proof of possession.
    good = csr_for(ec.generate_private_key(ec.SECP256R1()))
    der = bytearray(x509.load_pem_x509_csr(good).public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01
    r = await api.handle(req("certificate", handle=handle, csr=bytes(der)), ME)
    assert r["error"]["code"] == "bad-request"
    assert "does not verify" in r["error"]["message"] or "not a PKCS #10" in r["error"]["message"]
    p384 = csr_for(ec.generate_private_key(ec.SECP384R1()))
    r = await api.handle(req("certificate", handle=handle, csr=p384), ME)
    assert r["error"] == {
        "code": "bad-request",
        "message": "field 'csr': the CSR's key is neither P-256 nor Ed25519",
    }
    r = await api.handle(req("certificate", handle=handle, names=[]), ME)
    assert r["error"]["code"] == "bad-request"
    # Another uid's handle, and a server without a CA.
    r = await api.handle(req("certificate", handle=handle), OTHER)
    assert r["error"]["code"] == "not-permitted"
    plain = ApiCore(FakeBackend())
    h = await register(plain, "web-tunnel")
    r = await plain.handle(req("certificate", handle=h), ME)
    assert r["error"]["code"] == "unavailable"
    assert authority.records == []


async def test_no_record_in_the_log_no_certificate() -> None:
    api, authority = core()
    authority.fail_record = True
    handle = await register(api, "web-tunnel")
    r = await api.handle(req("certificate", handle=handle), ME)
    assert r["error"]["code"] == "unavailable"
    assert "could not be stored in the secure log" in r["error"]["message"]
    assert "certificate" not in r.get("result", {})


async def test_certificates_are_rate_limited_with_the_registration() -> None:
    api, _ = core(Limits(sign_rate=0.001, sign_burst=2.0))
    handle = await register(api, "db")
    for _ in range(2):
        assert (await api.handle(req("certificate", handle=handle), ME))["ok"]
    r = await api.handle(req("certificate", handle=handle), ME)
    assert r["error"]["code"] == "quota" and r["error"]["retry_after_ms"] > 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_fuzz_csr_bytes_never_crash_and_are_never_certified(data: bytes) -> None:
    from appliance.api._certs import CsrError, csr_public_key

    with pytest.raises(CsrError):
        csr_public_key(data)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(min_value=0, max_value=10_000), st.integers(min_value=1, max_value=255))
def test_fuzz_a_changed_byte_of_a_csr_is_refused_or_still_proves_possession(position: int, flip: int) -> None:
    from appliance.api._certs import CsrError, csr_public_key

    key = ec.generate_private_key(ec.SECP256R1())
    der = bytearray(x509.load_pem_x509_csr(csr_for(key)).public_bytes(serialization.Encoding.DER))
    der[position % len(der)] ^= flip
    try:
        got = csr_public_key(bytes(der))
    except CsrError:
        return
    # Accepted only if the changed bytes still carry a key with a valid signature over the request.
    csr = x509.load_der_x509_csr(bytes(der))
    assert csr.is_signature_valid and got == csr.public_key()


@pytest.mark.parametrize("library", ["appliance", "standalone"])
async def test_both_client_libraries_get_period_certificates_over_the_socket(
    nursery: Any, library: str, tmp_path: Any
) -> None:
    import functools

    import trio
    from test_api_clients import LIBRARIES

    from appliance.api import serve_api

    authority = LocalCa()
    path = tmp_path / "api.sock"
    await nursery.start(functools.partial(serve_api, path, FakeBackend(), certificates=authority))
    lib = LIBRARIES[library]

    def run() -> tuple[Any, Any, Any]:
        with lib.PstClient(path) as client:
            client.register("web-tunnel")
            generated = client.certificate(names=["a.vpn.example.org"])
            key = ec.generate_private_key(ec.SECP256R1())
            with_csr = client.certificate(csr=csr_for(key))
            try:
                client.certificate(names=["db.example.org"])
            except lib.PstError as exc:
                refused = exc
            return generated, (with_csr, key), refused

    generated, (with_csr, key), refused = await trio.to_thread.run_sync(run)
    assert generated.key is not None and with_csr.key is None
    leaf = verify_chain(generated.certificate, authority.root)
    assert serialization.load_pem_private_key(generated.key, None).public_key() == leaf.public_key()
    assert generated.bundle == generated.certificate + authority.root
    assert generated.not_before < generated.renew_after <= generated.not_after
    assert verify_chain(with_csr.certificate, authority.root).public_key() == key.public_key()
    assert refused.code == "not-permitted" and "outside the profile" in refused.message

"""X.509 certificates signed by the network's threshold Ed25519 key ``ca`` (cryptography).

The group root certificate is a deterministic function of public data: the ``ca`` public key
and C (its genesis). Every server rebuilds its TBSCertificate byte for byte
(:func:`root_tbs`), which is how each signer's check recognises it.

Leaf certificates (:func:`leaf_builder`) are issued by the root for a public key and names,
valid for one period plus a grace, with a random serial.

Signing is two-pass (:func:`tbs_of`, :func:`assemble`): cryptography's ``CertificateBuilder``
signs with any subclass of ``Ed25519PrivateKey`` whose ``sign(data)`` returns the 64-byte
signature (docs/ca.md; pinned in pyproject.toml, tests/test_ca.py fails if it changes). The first
pass captures the TBS bytes; the network's threshold signature is made over them; the second
pass builds again with that signature, and the TBS must not have changed.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance.protocols.state import Constants

__all__ = [
    "ROOT_SPAN",
    "TLS_EKU",
    "TSA_EKU",
    "CertificateError",
    "assemble",
    "check_root",
    "general_names",
    "leaf_builder",
    "leaf_validity",
    "network_name",
    "pem",
    "root_builder",
    "root_subject",
    "root_tbs",
    "sign_certificate",
    "tbs_of",
]

#: How long the group root is valid, from C's genesis (about 20 years).
ROOT_SPAN = datetime.timedelta(days=7305)
ORGANIZATION = "Proactive Security Toolkit"
#: What a TLS leaf's and a TSA leaf's extended key usage name (policy.py checks the same OIDs).
TLS_EKU = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)
TSA_EKU = (ExtendedKeyUsageOID.TIME_STAMPING,)


class CertificateError(Exception):
    """A certificate could not be built or signed; the message says why."""


def network_name(constants: Constants) -> str:
    """The network's name in its root's subject: the same on every server (from C's genesis)."""
    return f"pst-{int(constants.genesis)}"


def _utc(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)


def root_subject(constants: Constants) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{network_name(constants)} group root"),
        ]
    )


def _root_serial(public: bytes, constants: Constants) -> int:
    digest = hashlib.sha256(b"pst ca root serial\0" + public + network_name(constants).encode()).digest()
    return (int.from_bytes(digest[:16], "big") >> 1) | 1  # positive, at most 16 octets


def _public_key(public: bytes) -> Ed25519PublicKey:
    if len(public) != 32:
        raise CertificateError(f"the ca public key must be 32 bytes, got {len(public)}")
    return Ed25519PublicKey.from_public_bytes(public)


def root_builder(public: bytes, constants: Constants) -> x509.CertificateBuilder:
    """The group root's builder: only public data, so every server's is the same."""
    key = _public_key(public)
    start = int(constants.genesis)
    subject = root_subject(constants)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key)
        .serial_number(_root_serial(public, constants))
        .not_valid_before(_utc(start))
        .not_valid_after(_utc(start) + ROOT_SPAN)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)
    )


def root_tbs(public: bytes, constants: Constants) -> bytes:
    """The exact TBSCertificate of the group root (what ``sign/ca`` signs for it)."""
    return tbs_of(root_builder(public, constants), public)


def general_names(names: Sequence[str]) -> list[x509.GeneralName]:
    """DNS names and IP addresses as subjectAltName entries (an address is an iPAddress)."""
    out: list[x509.GeneralName] = []
    for name in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def leaf_validity(constants: Constants, now: float, grace: float) -> tuple[int, int]:
    """(notBefore, notAfter) in whole seconds: the period of ``now``, plus ``grace`` after it."""
    period = constants.period_at(now)
    start = math.floor(constants.period_start(period))
    end = math.ceil(constants.period_start(period + 1) + grace)
    return start, end


def leaf_builder(
    *,
    root_public: bytes,
    constants: Constants,
    subject_key: Any,
    names: Sequence[str],
    eku: Sequence[x509.ObjectIdentifier],
    eku_critical: bool,
    validity: tuple[int, int],
    serial: int | None = None,
    issuer: x509.Name | None = None,
    app: str | None = None,
) -> x509.CertificateBuilder:
    """A leaf issued by the group root for ``subject_key`` (a cryptography public key);
    ``issuer`` is the root's subject unless given (tests of the signers' check); ``app``, an
    application's name, goes into the subjectAltName as the URI ``urn:pst:app:<app>``."""
    if not names:
        raise CertificateError("a leaf certificate needs at least one name")
    root_key = _public_key(root_public)
    ku = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(issuer if issuer is not None else root_subject(constants))
        .public_key(subject_key)
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(_utc(validity[0]))
        .not_valid_after(_utc(validity[1]))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(ku, critical=True)
        .add_extension(x509.ExtendedKeyUsage(list(eku)), critical=eku_critical)
        .add_extension(
            x509.SubjectAlternativeName(
                general_names(names)
                + ([x509.UniformResourceIdentifier(f"urn:pst:app:{app}")] if app is not None else [])
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(subject_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key),
            critical=False,
        )
    )


class _ExternalKey(Ed25519PrivateKey):
    """An Ed25519 "private key" for cryptography's builder: its signature comes from elsewhere.

    With no ``signature`` it records the bytes it is asked to sign (the TBS) and returns a
    placeholder; with one, it returns it, for exactly the TBS it was made for.
    """

    def __init__(self, public: bytes, tbs: bytes | None = None, signature: bytes | None = None) -> None:
        self._public = _public_key(public)
        self.tbs = tbs
        self._signature = signature

    def public_key(self) -> Ed25519PublicKey:
        return self._public

    def sign(self, data: bytes | bytearray | memoryview) -> bytes:
        data = bytes(data)
        if self._signature is None:
            self.tbs = data
            return bytes(64)
        if data != self.tbs:
            raise CertificateError("the second pass built another TBSCertificate than the first")
        return self._signature

    def _no_private(self) -> NoReturn:
        raise CertificateError("the ca key is threshold-shared: no server holds its private bytes")

    def private_bytes(self, *args: Any, **kwargs: Any) -> bytes:
        self._no_private()

    def private_bytes_raw(self) -> bytes:
        self._no_private()

    def __copy__(self) -> _ExternalKey:
        return self

    def __deepcopy__(self, memo: Any) -> _ExternalKey:
        return self


def tbs_of(builder: x509.CertificateBuilder, public: bytes) -> bytes:
    """First pass: the TBSCertificate ``builder`` makes under the issuer key ``public``."""
    capture = _ExternalKey(public)
    cert = builder.sign(capture, None)
    if capture.tbs is None or capture.tbs != cert.tbs_certificate_bytes:
        raise CertificateError(
            "cryptography did not hand the TBSCertificate to the external key (its version changed?)"
        )
    return capture.tbs


def assemble(
    builder: x509.CertificateBuilder, public: bytes, tbs: bytes, signature: bytes
) -> x509.Certificate:
    """Second pass: the certificate with ``signature``; checks the signature and that the TBS
    did not change."""
    try:
        _public_key(public).verify(signature, tbs)
    except InvalidSignature:
        raise CertificateError("the signature does not verify with the ca public key") from None
    cert = builder.sign(_ExternalKey(public, tbs, signature), None)
    if cert.tbs_certificate_bytes != tbs or cert.signature != signature:
        raise CertificateError("the signed certificate does not carry the TBS and signature it was given")
    return cert


async def sign_certificate(
    builder: x509.CertificateBuilder, public: bytes, sign: Callable[[bytes], Awaitable[bytes]]
) -> x509.Certificate:
    """Both passes around ``sign`` (the network's threshold signature through ``sign/ca``)."""
    tbs = tbs_of(builder, public)
    return assemble(builder, public, tbs, await sign(tbs))


def check_root(pem: bytes, public: bytes, constants: Constants) -> x509.Certificate:
    """``pem`` as the group root: its TBS is ours byte for byte and its signature verifies."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise CertificateError(f"not a PEM certificate: {exc}") from None
    if cert.tbs_certificate_bytes != root_tbs(public, constants):
        raise CertificateError("not this network's group root (its TBSCertificate differs)")
    try:
        _public_key(public).verify(cert.signature, cert.tbs_certificate_bytes)
    except InvalidSignature:
        raise CertificateError("the group root's signature does not verify") from None
    return cert


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)

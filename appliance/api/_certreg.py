"""Certificate-based registration of distributed applications (paper §5.1, option 2).

Theory of operation
-------------------
The operator names a certificate authority common to the clients of distributed applications
(``[server] distributed_ca``, a PEM file of one or more CA certificates; any CA will do:
``openssl``, step-ca, a company PKI). Before it registers, the client that runs next to server
i as component i of application ``name`` gets from that CA a *one-time* X.509 certificate

    Cert_CA(Client_PubKey, name, i, server_id, validity)

with the name, the component index and the server in one subjectAltName URI,
``urn:pst:distributed:<name>:<i>:<server_id>``, and its own Ed25519 or P-256 public key. To
register, it asks its server for a fresh challenge (``challenge``) and sends the certificate with
its signature over :func:`registration_payload` (the server, the challenge, the certificate's
SHA-256): ``register_certified``. The server accepts only a certificate that

* its configured CA issued (the signature verifies with a CA certificate's key), that is valid
  now, is not itself a CA, and carries exactly one such URI;
* names *this* server, with the component index of this server (component i runs at server i):
  a certificate for another server or another index is refused, so a stolen certificate works at
  one server only (the paper: "a different certificate (and secret key) is needed at each machine");
* was never used to register here before (one-time: the SHA-256 of every certificate used is
  kept, synced, in the server's state before the handle is returned);
* comes with a valid signature by the certified key over this server's fresh challenge
  (proof of possession; a challenge is good once, for one uid, for a minute).

The registration is then a distributed registration like the password one, with the verifier
:meth:`ClientCA.verifier` (SHA-256 of the CA's fingerprint and the name) in place of the
password's: every server derives the same value for the same CA and name, so the approval
protocol (:mod:`appliance.protocols.approvals`) links the requests of the application's
components exactly as for passwords, and a request is serviced only with a majority of the
servers' certified clients. That value is not a secret: what authenticates a component is its
own server's check of its certificate, and a server votes only for its own client.

Refusals raise :class:`CertificateRefused` with a message safe to show the client.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from appliance.crypto import encoding

REGISTER_DOMAIN: Final = "pst/cert-register/v1"
URI_PREFIX: Final = "urn:pst:distributed:"
MAX_CERTIFICATE: Final = 16 * 1024
CHALLENGE_SIZE: Final = 32


class CertificateRefused(ValueError):
    """A certificate registration is refused; the message says why (safe to show the client)."""


@dataclass(frozen=True)
class CertifiedClient:
    """What a checked certificate says: the application, component, server and the client's key."""

    name: str
    index: int
    server: int
    public_key: ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey
    digest: bytes


def registration_payload(server: int, challenge: bytes, certificate_digest: bytes) -> bytes:
    """What the client signs with its certified key to register at ``server``."""
    return encoding.encode(
        {"dom": REGISTER_DOMAIN, "server": server, "challenge": challenge, "cert": certificate_digest}
    )


def client_uri(name: str, index: int, server: int) -> str:
    """The subjectAltName URI a client certificate carries (what the CA puts in it)."""
    return f"{URI_PREFIX}{name}:{index}:{server}"


def _load(data: bytes, what: str) -> list[x509.Certificate]:
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise CertificateRefused(f"{what} is not an X.509 certificate ({str(exc)[:100]})") from None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


class ClientCA:
    """The operator's CA for the clients of distributed applications (one or more certificates)."""

    def __init__(self, cas: Sequence[x509.Certificate], source: str) -> None:
        if not cas:
            raise ValueError(f"{source}: no CA certificate")
        for ca in cas:
            if not _is_ca(ca):
                raise ValueError(f"{source}: {ca.subject.rfc4514_string()} is not a CA certificate")
        self.cas = list(cas)
        self.source = source
        self.fingerprint = hashlib.sha256(b"".join(ca.fingerprint(hashes.SHA256()) for ca in cas)).digest()

    @classmethod
    def load(cls, path: Path) -> ClientCA:
        """The CA certificates in the PEM file at ``path``; ValueError naming the file."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ValueError(f"{path}: {exc.strerror}") from None
        try:
            cas = x509.load_pem_x509_certificates(data)
        except ValueError as exc:
            raise ValueError(f"{path}: not a PEM file of CA certificates ({str(exc)[:100]})") from None
        return cls(cas, str(path))

    def verifier(self, name: str) -> bytes:
        """The value that links the components of ``name`` certified by this CA (not a secret)."""
        return hashlib.sha256(b"pst/cert-app/v1\0" + self.fingerprint + name.encode()).digest()

    def check(self, data: bytes, *, server: int, now: datetime.datetime) -> CertifiedClient:
        """The client certificate ``data`` (PEM or DER) as this ``server`` must see it at ``now``."""
        if len(data) > MAX_CERTIFICATE:
            raise CertificateRefused(f"the certificate has {len(data)} bytes, over {MAX_CERTIFICATE}")
        certs = _load(data, "the certificate")
        if len(certs) != 1:
            raise CertificateRefused("send exactly one certificate (the client's own)")
        cert = certs[0]
        if not any(self._issued(ca, cert) for ca in self.cas):
            raise CertificateRefused(
                "the certificate was not issued by the CA this server trusts for clients"
            )
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise CertificateRefused(
                f"the certificate is not valid now (valid {cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} to "
                f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ})"
            )
        if _is_ca(cert):
            raise CertificateRefused("a CA certificate cannot register a client")
        name, index, for_server = self._identity(cert)
        if for_server != server:
            raise CertificateRefused(f"the certificate is for server {for_server}, this is server {server}")
        if index != server:
            raise CertificateRefused(
                f"the certificate is for component {index} of {name!r}; "
                f"component {server} runs at this server"
            )
        key = cert.public_key()
        if not isinstance(key, ed25519.Ed25519PublicKey) and not (
            isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)
        ):
            raise CertificateRefused("the client's key must be Ed25519 or P-256")
        digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()
        return CertifiedClient(name, index, for_server, key, digest)

    @staticmethod
    def _issued(ca: x509.Certificate, cert: x509.Certificate) -> bool:
        if cert.issuer != ca.subject:
            return False
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True

    @staticmethod
    def _identity(cert: x509.Certificate) -> tuple[str, int, int]:
        """(name, component index, server) from the certificate's one ``urn:pst:distributed:`` URI."""
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            raise CertificateRefused(f"the certificate has no subjectAltName URI {URI_PREFIX}...") from None
        uris = [
            u for u in san.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith(URI_PREFIX)
        ]
        expected = f"{URI_PREFIX}<name>:<i>:<server>"
        if len(uris) != 1:
            raise CertificateRefused(f"the certificate must carry exactly one URI {expected}")
        parts = uris[0][len(URI_PREFIX) :].rsplit(":", 2)
        if len(parts) != 3 or not parts[0] or not parts[1].isdigit() or not parts[2].isdigit():
            raise CertificateRefused(f"malformed client URI {uris[0][:120]!r} (expected {expected})")
        name = parts[0]
        if len(name) > 64 or not name.isprintable():
            raise CertificateRefused("the application name in the certificate is too long or not printable")
        return name, int(parts[1]), int(parts[2])


def verify_possession(client: CertifiedClient, payload: bytes, signature: bytes) -> bool:
    """Did the certified key sign ``payload`` (Ed25519, or ECDSA P-256 with SHA-256, DER)?"""
    try:
        if isinstance(client.public_key, ed25519.Ed25519PublicKey):
            client.public_key.verify(signature, payload)
        else:
            client.public_key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


class UsedCertificates:
    """The SHA-256 of every certificate that registered here: one per line, appended and synced."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._used: set[bytes] = set()
        if path is not None and path.exists():
            for line in path.read_text().splitlines():
                try:
                    self._used.add(bytes.fromhex(line.strip()))
                except ValueError:
                    continue

    def __contains__(self, digest: object) -> bool:
        return digest in self._used

    def add(self, digest: bytes) -> None:
        """Record ``digest`` durably before anything is granted for it."""
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, digest.hex().encode() + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
        self._used.add(digest)

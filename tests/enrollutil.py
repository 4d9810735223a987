"""An operator's enrollment CA and credentials for the HTTP enrollment tests (urn:pst:enroll:APP)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from appliance.api._enroll import enroll_uri


@dataclass
class Credential:
    key: Any
    cert: x509.Certificate

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return bytes(
            self.key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )

    def sign(self, payload: bytes) -> bytes:
        if isinstance(self.key, ed25519.Ed25519PrivateKey):
            return bytes(self.key.sign(payload))
        return bytes(self.key.sign(payload, ec.ECDSA(hashes.SHA256())))

    def write(self, folder: Path, stem: str) -> tuple[Path, Path]:
        cert, key = folder / f"{stem}.pem", folder / f"{stem}.key"
        cert.write_bytes(self.pem)
        key.write_bytes(self.key_pem)
        key.chmod(0o600)
        return cert, key


@dataclass
class EnrollCa:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(
        self,
        uris: list[str],
        *,
        key: Any = None,
        ca: bool = False,
        days: float = 30,
        start: dt.datetime | None = None,
    ) -> Credential:
        key = key or ec.generate_private_key(ec.SECP256R1())
        now = start or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tunnel host")]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if uris:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), critical=False
            )
        return Credential(key, builder.sign(self.key, hashes.SHA256()))

    def credential(self, app: str, **kwargs: Any) -> Credential:
        return self.issue([enroll_uri(app)], **kwargs)


def make_enroll_ca(name: str = "enrollment CA") -> EnrollCa:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return EnrollCa(key, cert)

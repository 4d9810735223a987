"""A stand-in for the group's CA in the timestamping tests: an Ed25519 root made with
``cryptography`` issuing a P-256 TSA certificate (EKU timeStamping, critical); the P-256 key signs
locally."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance.apps.tsa.rfc3161 import SigningChain


@dataclass
class StandIn:
    root: x509.Certificate
    tsa: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    chain: SigningChain

    def sign(self, data: bytes) -> bytes:
        return self.key.sign(data, ec.ECDSA(hashes.SHA256()))

    def write(self, folder: Path) -> tuple[Path, Path, Path]:
        """root.pem, tsa.pem, tsa.key in ``folder``."""
        root, tsa, key = folder / "root.pem", folder / "tsa.pem", folder / "tsa.key"
        root.write_bytes(self.root.public_bytes(serialization.Encoding.PEM))
        tsa.write_bytes(self.tsa.public_bytes(serialization.Encoding.PEM))
        key.write_bytes(
            self.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return root, tsa, key


def make_tsa_certificate(
    root_key: ed25519.Ed25519PrivateKey,
    root_name: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    *,
    eku_critical: bool = True,
    eku: list[x509.ObjectIdentifier] | None = None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test TSA")]))
        .issuer_name(root_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
        )
        .add_extension(
            x509.ExtendedKeyUsage(eku or [ExtendedKeyUsageOID.TIME_STAMPING]), critical=eku_critical
        )
        .sign(root_key, None)
    )


def make_stand_in() -> StandIn:
    root_key = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test group root")])
    now = dt.datetime.now(dt.UTC)
    root = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(root_key, None)
    )
    key = ec.generate_private_key(ec.SECP256R1())
    tsa = make_tsa_certificate(root_key, name, key)
    chain = SigningChain(tsa.public_bytes(serialization.Encoding.DER))
    return StandIn(root, tsa, key, chain)

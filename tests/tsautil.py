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


def make_ca(
    key: ed25519.Ed25519PrivateKey,
    name: x509.Name,
    issuer_key: ed25519.Ed25519PrivateKey,
    issuer_name: x509.Name,
    path_length: int,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(issuer_key, None)
    )


def make_stand_in(*, intermediate: bool = False) -> StandIn:
    """The root signs the TSA certificate, or (``intermediate``) an intermediate CA that does;
    the chain then carries the intermediate."""
    root_key = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test group root")])
    root = make_ca(root_key, name, root_key, name, 1)
    key = ec.generate_private_key(ec.SECP256R1())
    der = serialization.Encoding.DER
    if not intermediate:
        tsa = make_tsa_certificate(root_key, name, key)
        return StandIn(root, tsa, key, SigningChain(tsa.public_bytes(der)))
    middle_key = ed25519.Ed25519PrivateKey.generate()
    middle_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test intermediate")])
    middle = make_ca(middle_key, middle_name, root_key, name, 0)
    tsa = make_tsa_certificate(middle_key, middle_name, key)
    return StandIn(root, tsa, key, SigningChain(tsa.public_bytes(der), (middle.public_bytes(der),)))

"""TLS 1.3 with per-period Ed25519 certificates, trusted through the KeyTable's keys.

Theory of operation. Each server i holds, for period p, an Ed25519 signing seed whose public
key V_i(p) is in the period's KeyTable. It presents a certificate for that key signed with
that key (:func:`period_certificate`: CN ``pst-server-{i}``, SAN ``server-{i}.pst``, the
period in a private extension). A verifier cannot rebuild that certificate byte for byte
(it lacks the seed), and OpenSSL only trusts a self-issued leaf that is byte-identical to a
trust anchor. So the leaf names as its issuer ``pst-period-key-{i}``, and every verifier
builds, from the public key alone, a trust anchor with that name and key
(:func:`trust_anchor`): a CA certificate signed by a fixed, public "null" key. Its own
signature is meaningless and never checked: the contexts set ``VERIFY_X509_PARTIAL_CHAIN``,
so the anchor certificate is trusted as it stands (RFC 5280 treats a trust anchor as a
name and a key). OpenSSL therefore accepts exactly the leaves signed by some key of the
period's KeyTable, and TLS 1.3's CertificateVerify proves the peer holds that key.

The contexts (:func:`server_context`, :func:`client_context`) allow TLS 1.3 only and disable
session tickets (no resumption without certificates). The client context presents our
certificate and requires the server's. The server context *requests* a client certificate
with ``CERT_OPTIONAL``: OpenSSL then still verifies any certificate the client presents and
aborts the handshake when it does not chain to an anchor (exactly as with ``CERT_REQUIRED``;
checked with OpenSSL 3.0 in tests/test_net.py), but lets a client that presents none finish
the handshake. Such a connection is *unauthenticated*; :mod:`appliance.net._peers` treats it
so. Hostname checking is off: after the handshake each side calls :func:`check_peer` to
compare the peer certificate's public key (and period) with the KeyTable key of the server
id the peer claims in its hello, and closes the connection otherwise.

Unauthenticated connections (see :mod:`appliance.net._peers` for why they are safe): a
server that missed a refresh has a stale period key or none, so it cannot take part in the
exchange above. :func:`anonymous_client_context` presents no certificate and does not verify
the server's (still TLS 1.3 only); :func:`anonymous_server_context` is the listening context
of a server with no period key at all: it presents a throwaway certificate for a random key
made on the spot (TLS 1.3 has no certificate-less cipher suites) and requests no client
certificate.

Channel keys (the key-holder split). The period signing key S_i lives only in the
key-holder process (:mod:`appliance.node.keyholder`); the network-facing process must not
hold it. So a running server presents a *channel certificate* instead
(:func:`channel_identity`): a fresh Ed25519 key made for the period, in a leaf that the
period key issues (same issuer name, signed with S_i). OpenSSL checks it against the same
anchors, and :func:`check_peer` checks the leaf's signature with the claimed server's
KeyTable key. Whoever breaks into the network-facing process learns a channel key good
for the rest of that period only, which is no more than control of the server during the
period gives anyway. A 32-byte period seed is still accepted wherever an identity is (the
leaf is then self-issued by the period key, as above): the initialization ceremony and the
tests use it.

Private keys reach OpenSSL through an anonymous memory file (``memfd``) that is closed at
once; they are never written to disk where memfd exists, and never logged.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import ssl
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID, ObjectIdentifier

#: Private extension holding the period (a DER INTEGER); an OID under the UUID arc 2.25.
PERIOD_OID = ObjectIdentifier("2.25.229761353440364358791218960917413787871")
#: The public, fixed key that "signs" locally built trust anchors (never trusted by itself).
_NULL_KEY = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"pst/net/null-anchor-key").digest())
_UTC = datetime.UTC
_ANCHOR_NOT_BEFORE = datetime.datetime(1970, 1, 2, tzinfo=_UTC)
_ANCHOR_NOT_AFTER = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=_UTC)
DEFAULT_LIFETIME = datetime.timedelta(days=366)
_CLOCK_SKEW = datetime.timedelta(days=1)


class PeerCertificateError(Exception):
    """The peer's certificate does not match the server it claims to be."""


def server_name(server: int) -> str:
    return f"server-{server}.pst"


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pst"), x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    )


def _anchor_name(server: int) -> x509.Name:
    return _name(f"pst-period-key-{server}")


def _der_uint(value: int) -> bytes:
    if value < 0:
        raise ValueError("period must be non-negative")
    body = value.to_bytes(value.bit_length() // 8 + 1, "big")  # leading 0 bit: positive
    if len(body) > 127:
        raise ValueError("period too large")
    return bytes([0x02, len(body)]) + body


def _parse_der_uint(data: bytes) -> int:
    if len(data) < 3 or data[0] != 0x02 or data[1] != len(data) - 2 or data[2] & 0x80:
        raise PeerCertificateError("malformed period extension")
    return int.from_bytes(data[2:], "big")


def _period_extension(period: int) -> x509.UnrecognizedExtension:
    return x509.UnrecognizedExtension(PERIOD_OID, _der_uint(period))


def certificate_period(cert: x509.Certificate) -> int:
    """The period a certificate of ours was issued for (PeerCertificateError if absent)."""
    try:
        ext = cert.extensions.get_extension_for_oid(PERIOD_OID).value
    except x509.ExtensionNotFound:
        raise PeerCertificateError("certificate has no period extension") from None
    if not isinstance(ext, x509.UnrecognizedExtension):
        raise PeerCertificateError("malformed period extension")
    return _parse_der_uint(ext.value)


def _public_key(verify_key: bytes) -> Ed25519PublicKey:
    if len(verify_key) != 32:
        raise ValueError(f"an Ed25519 public key has 32 bytes, got {len(verify_key)}")
    return Ed25519PublicKey.from_public_bytes(verify_key)


def period_certificate(
    server: int,
    period: int,
    seed: bytes,
    *,
    not_before: datetime.datetime | None = None,
    lifetime: datetime.timedelta = DEFAULT_LIFETIME,
) -> x509.Certificate:
    """Server ``server``'s certificate for ``period``, signed with its Ed25519 period key.

    Issuer is the key's trust-anchor name (see the module docstring); the validity window
    starts a day before ``not_before`` (default: now) to absorb clock skew.
    """
    if len(seed) != 32:
        raise ValueError("an Ed25519 seed has 32 bytes")
    key = Ed25519PrivateKey.from_private_bytes(seed)
    return _leaf(server, period, key.public_key(), key, not_before, lifetime)


def _leaf(
    server: int,
    period: int,
    public: Ed25519PublicKey,
    issuer: Ed25519PrivateKey,
    not_before: datetime.datetime | None,
    lifetime: datetime.timedelta,
) -> x509.Certificate:
    """Server ``server``'s leaf for ``period``: key ``public``, issued and signed by ``issuer``."""
    start = (not_before or datetime.datetime.now(_UTC)) - _CLOCK_SKEW
    ski = x509.SubjectKeyIdentifier.from_public_key(public)
    aki = x509.SubjectKeyIdentifier.from_public_key(issuer.public_key()).digest
    return (
        x509.CertificateBuilder()
        .subject_name(_name(f"pst-server-{server}"))
        .issuer_name(_anchor_name(server))
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + _CLOCK_SKEW + lifetime)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(server_name(server))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH, x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier(aki, None, None), critical=False)
        .add_extension(_period_extension(period), critical=False)
        .sign(issuer, None)
    )


@dataclass(frozen=True, repr=False)
class ChannelIdentity:
    """A period's TLS identity: a leaf certificate issued by the period key, and its key.

    ``repr`` never shows the private key.
    """

    period: int
    cert_pem: bytes
    key_pem: bytes

    def __repr__(self) -> str:
        return f"ChannelIdentity(period={self.period})"


#: What a network is keyed with: a channel identity, or the 32-byte period seed itself.
Credential = ChannelIdentity | bytes


def channel_identity(
    server: int, period: int, seed: bytes, *, lifetime: datetime.timedelta = DEFAULT_LIFETIME
) -> ChannelIdentity:
    """A fresh channel key for ``period`` and its leaf, issued (signed) by the period key ``seed``."""
    if len(seed) != 32:
        raise ValueError("an Ed25519 seed has 32 bytes")
    issuer = Ed25519PrivateKey.from_private_bytes(seed)
    channel = Ed25519PrivateKey.generate()
    cert = _leaf(server, period, channel.public_key(), issuer, None, lifetime)
    return ChannelIdentity(
        period,
        cert.public_bytes(serialization.Encoding.PEM),
        channel.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )


def trust_anchor(server: int, period: int, verify_key: bytes) -> x509.Certificate:
    """The trust anchor for ``server``'s period key, built from the public key alone.

    Deterministic: every server builds the same bytes from the same KeyTable entry.
    """
    public = _public_key(verify_key)
    serial = int.from_bytes(hashlib.sha256(b"pst/net/anchor" + verify_key).digest()[:16], "big") | 1
    return (
        x509.CertificateBuilder()
        .subject_name(_anchor_name(server))
        .issuer_name(_name("pst-null-anchor-signer"))
        .public_key(public)
        .serial_number(serial)
        .not_valid_before(_ANCHOR_NOT_BEFORE)
        .not_valid_after(_ANCHOR_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, False, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(_period_extension(period), critical=False)
        .sign(_NULL_KEY, None)
    )


def trust_anchors_pem(period: int, keys: Mapping[int, bytes]) -> str:
    """The PEM trust anchors of every server of the period's key table."""
    return "".join(
        trust_anchor(i, period, key).public_bytes(serialization.Encoding.PEM).decode("ascii")
        for i, key in sorted(keys.items())
    )


@contextlib.contextmanager
def _secret_file(data: bytes) -> Iterator[str]:
    """A path OpenSSL can read ``data`` from: an anonymous memfd if possible."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("pst-tls", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
    else:  # pragma: no cover - non-Linux fallback: private directory, removed at once
        with tempfile.TemporaryDirectory(prefix="pst-tls-") as tmp:
            path = os.path.join(tmp, "credential.pem")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            yield path


def _tls13_context(protocol: int) -> ssl.SSLContext:
    """A TLS 1.3-only context without session tickets or hostname checks."""
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    if protocol == ssl.PROTOCOL_TLS_SERVER:
        ctx.num_tickets = 0
    ctx.options |= ssl.OP_NO_TICKET
    return ctx


def _identity_pem(server: int, period: int, cred: Credential) -> tuple[bytes, bytes]:
    """Our certificate and private key, PEM."""
    if isinstance(cred, ChannelIdentity):
        return cred.cert_pem, cred.key_pem
    cert_pem = period_certificate(server, period, cred).public_bytes(serialization.Encoding.PEM)
    key_pem = Ed25519PrivateKey.from_private_bytes(cred).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert_pem, key_pem


def _load_identity(ctx: ssl.SSLContext, identity: tuple[bytes, bytes]) -> None:
    cert_pem, key_pem = identity
    with _secret_file(cert_pem) as cert_path, _secret_file(key_pem) as key_path:
        ctx.load_cert_chain(cert_path, key_path)


def _context(protocol: int, identity: tuple[bytes, bytes], anchors_pem: str) -> ssl.SSLContext:
    ctx = _tls13_context(protocol)
    # The server only requests a client certificate: one that is presented is verified
    # (and a bad one fails the handshake); none at all makes an unauthenticated connection.
    ctx.verify_mode = ssl.CERT_OPTIONAL if protocol == ssl.PROTOCOL_TLS_SERVER else ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    ctx.load_verify_locations(cadata=anchors_pem)
    _load_identity(ctx, identity)
    return ctx


def server_context(server: int, period: int, seed: Credential, keys: Mapping[int, bytes]) -> ssl.SSLContext:
    """Context accepting connections: TLS 1.3, client certificate requested (CERT_OPTIONAL)
    and verified against the table anchors when presented."""
    return _context(
        ssl.PROTOCOL_TLS_SERVER, _identity_pem(server, period, seed), trust_anchors_pem(period, keys)
    )


def client_context(server: int, period: int, seed: Credential, keys: Mapping[int, bytes]) -> ssl.SSLContext:
    """Context opening connections: TLS 1.3, our certificate, table anchors, no hostname check."""
    return _context(
        ssl.PROTOCOL_TLS_CLIENT, _identity_pem(server, period, seed), trust_anchors_pem(period, keys)
    )


def period_contexts(
    server: int, period: int, seed: Credential, keys: Mapping[int, bytes]
) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """The period's server and client contexts (:func:`server_context`, :func:`client_context`),
    built together once per rekey: the trust anchors and our certificate are made once for both."""
    identity = _identity_pem(server, period, seed)
    anchors = trust_anchors_pem(period, keys)
    return (
        _context(ssl.PROTOCOL_TLS_SERVER, identity, anchors),
        _context(ssl.PROTOCOL_TLS_CLIENT, identity, anchors),
    )


def anonymous_client_context() -> ssl.SSLContext:
    """Context opening unauthenticated connections: TLS 1.3, no certificate presented, the
    server's certificate not verified (``CERT_NONE``, no hostname check)."""
    ctx = _tls13_context(ssl.PROTOCOL_TLS_CLIENT)
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def anonymous_server_context(server: int) -> ssl.SSLContext:
    """Listening context of a server without period keys: TLS 1.3, a throwaway certificate
    for a fresh random key (never trusted by anyone), no client certificate requested."""
    ctx = _tls13_context(ssl.PROTOCOL_TLS_SERVER)
    ctx.verify_mode = ssl.CERT_NONE
    _load_identity(ctx, _identity_pem(server, 0, os.urandom(32)))
    return ctx


def check_peer(cert_der: bytes | None, claimed: int, period: int, keys: Mapping[int, bytes]) -> None:
    """Check that the peer certificate is ``claimed``'s key for ``period``.

    Raises PeerCertificateError with a reason naming the claimed server (and, for a key that
    belongs to another server of the table, that server too).
    """
    if cert_der is None:
        raise PeerCertificateError(f"server {claimed}: no peer certificate")
    try:
        cert = x509.load_der_x509_certificate(cert_der)
        public = cert.public_key()
    except ValueError as exc:
        raise PeerCertificateError(f"server {claimed}: unreadable certificate ({exc})") from None
    if not isinstance(public, Ed25519PublicKey):
        raise PeerCertificateError(f"server {claimed}: certificate key is not Ed25519")
    expected = keys.get(claimed)
    if expected is None:
        raise PeerCertificateError(f"server {claimed} has no key in period {period}'s table")
    if not issued_by(cert, expected):
        owners = [i for i, k in keys.items() if issued_by(cert, k)]
        whose = f"it is server {owners[0]}'s" if owners else "no key of the table issued it"
        raise PeerCertificateError(
            f"server {claimed}: certificate is not issued by its period {period} key ({whose})"
        )
    cert_period = certificate_period(cert)
    if cert_period != period:
        raise PeerCertificateError(
            f"server {claimed}: certificate is for period {cert_period}, not period {period}"
        )


def channel_sign(ident: ChannelIdentity, payload: bytes) -> bytes:
    """Sign ``payload`` with the channel key of ``ident`` (what its certificate vouches for)."""
    key = serialization.load_pem_private_key(ident.key_pem, None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("a channel key is Ed25519")
    return key.sign(payload)


def channel_certificate_der(ident: ChannelIdentity) -> bytes:
    return x509.load_pem_x509_certificate(ident.cert_pem).public_bytes(serialization.Encoding.DER)


def check_channel_signature(
    cert_der: bytes, server: int, period: int, keys: Mapping[int, bytes], payload: bytes, sig: bytes
) -> None:
    """Check that ``sig`` on ``payload`` is by ``server``'s channel key of ``period``: its
    certificate issued by that server's key in ``keys`` (period ``period``'s KeyTable).
    Raises PeerCertificateError naming what is wrong."""
    check_peer(cert_der, server, period, keys)
    public = x509.load_der_x509_certificate(cert_der).public_key()
    assert isinstance(public, Ed25519PublicKey)  # check_peer refused any other
    try:
        public.verify(sig, payload)
    except InvalidSignature:
        raise PeerCertificateError(f"server {server}: signature by its channel key does not verify") from None


def issued_by(cert: x509.Certificate, verify_key: bytes) -> bool:
    """Whether ``cert`` is signed by the Ed25519 key ``verify_key`` (its period key)."""
    if len(verify_key) != 32:
        return False
    try:
        _public_key(verify_key).verify(cert.signature, cert.tbs_certificate_bytes)
    except InvalidSignature:
        return False
    return True

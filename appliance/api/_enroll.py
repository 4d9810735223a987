"""Enrollment over HTTP for applications' period certificates (issue 13 §1, "HTTP endpoint").

Why not renewal by the previous period's key
--------------------------------------------
A period certificate is worth one period because nobody can get the next one with what a
thief copies from the tunnel host once. If the endpoint renewed a certificate on proof of the
previous period's key, a thief who copied one period's key would renew it, and then the next,
for ever, after leaving the host: the one-period bound would be gone. So the endpoint does not
offer it.

The enrollment credential
-------------------------
Instead, as certificate-based registration (paper §5.1, :mod:`appliance.api._certreg`) does
for distributed applications, the tunnel host holds an **enrollment key** (Ed25519 or P-256;
it can live in a TPM or HSM, or stay offline: the agent can have an external command sign)
and a certificate for it, the **enrollment credential**, from a CA the operator names for the
application: ``[ca.apps.NAME] enroll_ca``. The credential carries exactly one subjectAltName
URI ``urn:pst:enroll:NAME``; it is not a CA; it is valid now. To get a certificate the host

1. fetches a fresh challenge from a server (``GET /ca/enroll/challenge``: good once, at that
   server, for a minute);
2. POSTs ``/ca/enroll`` a JSON object: the application, the challenge, the credential (PEM),
   optionally a CSR (without one, the server makes the key, and only over TLS or loopback) and
   the names, and its enrollment key's signature over :func:`enroll_payload`: the server,
   the challenge, the application, the SHA-256 of the credential, of the CSR and the names.

The server checks the credential against the application's CA, the signature (proof of
possession, bound to this server's one-time challenge and to this CSR and these names), then
the names and the CSR exactly as the local API's ``certificate`` operation does
(:func:`appliance.api._certs.choose_names`, :func:`~appliance.api._certs.csr_public_key`), and
has the network sign; every signer checks the leaf against ``[ca.apps.NAME]`` before it
contributes, as for the local API. The certificate is recorded in the secure log before it is
released (the requester named there by the credential's serial and subject).

What a thief of the enrollment key can do: get certificates for the application's names, as
the application's local user can, for as long as it holds the key (a key in a TPM or HSM:
only while it controls the host) and the credential is valid. What it cannot: get names
outside the application's profile, or a certificate for another application, or keep
renewing after the key is taken back (a TPM key cannot be copied; the credential expires or
the operator replaces the CA file). A thief of a *period* key alone gets nothing more.

This module is pure (no trio, no sockets): the request decoder (fuzzed), the credential check
and the challenges. :mod:`appliance.web._enroll` serves it.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import json
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from appliance.api._certreg import CertificateRefused, ClientCA
from appliance.api._certs import MAX_CSR, MAX_NAMES

DOMAIN: Final = "pst/enroll/v1"
URI_PREFIX: Final = "urn:pst:enroll:"
#: Largest POST body read (a credential and a CSR of 16 KiB each, base64 and JSON around them).
MAX_BODY: Final = 64 * 1024
MAX_CREDENTIAL: Final = 16 * 1024
MAX_SIGNATURE: Final = 512
CHALLENGE_SIZE: Final = 32
CHALLENGE_LIFETIME: Final = 60.0
#: Challenges outstanding at one server, and per source address.
MAX_CHALLENGES: Final = 4096
MAX_CHALLENGES_PER_SOURCE: Final = 16
_FIELDS: Final = frozenset({"app", "challenge", "credential", "csr", "names", "signature"})
_REQUIRED: Final = frozenset({"app", "challenge", "credential", "signature"})


class EnrollError(ValueError):
    """A bad enrollment request; ``status`` (400, 403, 404, 413, 415, 429, 503) and ``code`` are
    the HTTP answer's, the message is safe to show the client."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def bad(message: str) -> EnrollError:
    return EnrollError(400, "bad-request", message)


def refused(message: str) -> EnrollError:
    return EnrollError(403, "forbidden", message)


def enroll_uri(app: str) -> str:
    """The subjectAltName URI an enrollment credential for ``app`` carries."""
    return URI_PREFIX + app


def enroll_payload(
    server: int,
    challenge: bytes,
    app: str,
    credential_sha256: bytes,
    csr_sha256: bytes | None,
    names: Sequence[str] | None,
) -> bytes:
    """What the enrollment key signs: lines of ``key=value`` (ASCII, each ending in a newline),
    easy to make with printf and sign with openssl (docs/ca.md). ``csr`` is ``-`` when the
    server is to make the key, ``names`` is ``-`` for the profile's default names, else the
    names joined by commas, as sent."""
    lines = [
        DOMAIN,
        f"server={server}",
        f"challenge={challenge.hex()}",
        f"app={app}",
        f"credential={credential_sha256.hex()}",
        f"csr={csr_sha256.hex() if csr_sha256 is not None else '-'}",
        f"names={','.join(names) if names is not None else '-'}",
    ]
    return "".join(line + "\n" for line in lines).encode("ascii")


@dataclass(frozen=True)
class EnrollRequest:
    """A decoded ``POST /ca/enroll`` body (not checked against anything yet)."""

    app: str
    challenge: bytes
    credential: bytes
    signature: bytes
    csr: bytes | None = None
    names: tuple[str, ...] | None = None

    def payload(self, server: int) -> bytes:
        """What the enrollment key must have signed for this request at ``server``."""
        csr = hashlib.sha256(self.csr).digest() if self.csr is not None else None
        return enroll_payload(
            server, self.challenge, self.app, hashlib.sha256(self.credential).digest(), csr, self.names
        )


def _b64(value: Any, field: str, limit: int) -> bytes:
    if not isinstance(value, str):
        raise bad(f"field {field!r} must be a base64 string")
    if len(value) > (limit + 2) // 3 * 4:
        raise EnrollError(413, "too-large", f"field {field!r} is longer than {limit} bytes")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise bad(f"field {field!r} is not valid base64") from None


def _text(value: Any, field: str, limit: int) -> bytes:
    """A PEM field (text): its bytes, at most ``limit``."""
    if not isinstance(value, str):
        raise bad(f"field {field!r} must be a PEM string")
    if len(value) > limit:
        raise EnrollError(413, "too-large", f"field {field!r} is longer than {limit} bytes")
    if not value.isascii():
        raise bad(f"field {field!r} must be ASCII (PEM)")
    return value.encode("ascii")


def decode_request(body: bytes) -> EnrollRequest:
    """The ``POST /ca/enroll`` JSON body, strictly: an object of the known fields only, each of
    its type and size; :class:`EnrollError` (400 or 413) naming the field otherwise."""
    if len(body) > MAX_BODY:
        raise EnrollError(413, "too-large", f"request body larger than {MAX_BODY} bytes")
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise bad("the body is not a JSON object (UTF-8)") from None
    if not isinstance(obj, dict):
        raise bad("the body must be a JSON object")
    unknown = sorted(set(obj) - _FIELDS)
    if unknown:
        raise bad(f"unknown field {unknown[0][:40]!r} (known: {', '.join(sorted(_FIELDS))})")
    missing = sorted(_REQUIRED - set(obj))
    if missing:
        raise bad(f"missing field {missing[0]!r}")
    app = obj["app"]
    if not isinstance(app, str) or not 0 < len(app) <= 64 or not app.isascii() or not app.isprintable():
        raise bad("field 'app' must be an application's name (1 to 64 printable ASCII characters)")
    challenge = _b64(obj["challenge"], "challenge", CHALLENGE_SIZE)
    if len(challenge) != CHALLENGE_SIZE:
        raise bad(f"field 'challenge' must be {CHALLENGE_SIZE} bytes (from GET /ca/enroll/challenge)")
    credential = _text(obj["credential"], "credential", MAX_CREDENTIAL)
    signature = _b64(obj["signature"], "signature", MAX_SIGNATURE)
    if not signature:
        raise bad("field 'signature' is empty")
    csr = None
    if obj.get("csr") is not None:
        csr = _text(obj["csr"], "csr", MAX_CSR)
    names: tuple[str, ...] | None = None
    if obj.get("names") is not None:
        raw = obj["names"]
        if (
            not isinstance(raw, list)
            or not 0 < len(raw) <= MAX_NAMES
            or not all(
                isinstance(n, str) and 0 < len(n) <= 253 and n.isascii() and n.isprintable() and "," not in n
                for n in raw
            )
        ):
            raise bad(f"field 'names' must be a list of 1 to {MAX_NAMES} names (DNS names or IP addresses)")
        names = tuple(raw)
    return EnrollRequest(app, challenge, credential, signature, csr, names)


@dataclass(frozen=True)
class Enrollee:
    """A checked enrollment credential: its application, key, serial, subject and SHA-256."""

    app: str
    public_key: ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey
    serial: int
    subject: str
    digest: bytes

    def describe(self) -> str:
        """How the secure log's record names the requester."""
        return f"enroll credential {self.serial:x} ({self.subject[:80]}) app {self.app}"


class EnrollCA:
    """The operator's CA of one application's enrollment credentials (``[ca.apps.NAME] enroll_ca``)."""

    def __init__(self, app: str, cas: ClientCA) -> None:
        self.app = app
        self.cas = cas

    @classmethod
    def load(cls, app: str, path: Path) -> EnrollCA:
        """The CA certificates in the PEM file at ``path``; ValueError naming the file."""
        return cls(app, ClientCA.load(path))

    def check(self, data: bytes, *, now: datetime.datetime) -> Enrollee:
        """The credential ``data`` (one PEM certificate) as it must be at ``now``; 403 otherwise."""
        try:
            certs = x509.load_pem_x509_certificates(data)
        except ValueError as exc:
            raise refused(f"the credential is not a PEM certificate ({str(exc)[:100]})") from None
        if len(certs) != 1:
            raise refused("send exactly one certificate as the credential (the host's own)")
        cert = certs[0]
        if not any(ClientCA._issued(ca, cert) for ca in self.cas.cas):
            raise refused(f"the credential was not issued by the enrollment CA of application {self.app!r}")
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise refused(
                f"the credential is not valid now (valid {cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} "
                f"to {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ})"
            )
        try:
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
            is_ca = constraints.ca
        except x509.ExtensionNotFound:
            is_ca = False
        except ValueError as exc:  # a malformed extension
            raise refused(f"the credential's extensions cannot be read ({str(exc)[:100]})") from None
        if is_ca:
            raise refused("a CA certificate is not an enrollment credential")
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            values = san.get_values_for_type(x509.UniformResourceIdentifier)
            uris = [u for u in values if u.startswith(URI_PREFIX)]
        except x509.ExtensionNotFound:
            uris = []
        except ValueError as exc:
            raise refused(f"the credential's extensions cannot be read ({str(exc)[:100]})") from None
        if uris != [enroll_uri(self.app)]:
            raise refused(
                f"the credential must carry exactly one URI {URI_PREFIX}<app>, "
                f"here {enroll_uri(self.app)!r}; it has {[u[:80] for u in uris]}"
            )
        key = cert.public_key()
        if not isinstance(key, ed25519.Ed25519PublicKey) and not (
            isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)
        ):
            raise refused("the enrollment key must be Ed25519 or P-256")
        digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()
        try:
            subject = cert.subject.rfc4514_string()
        except ValueError:
            subject = "?"
        return Enrollee(self.app, key, cert.serial_number, subject, digest)


def verify_signature(enrollee: Enrollee, payload: bytes, signature: bytes) -> bool:
    """Did the enrollment key sign ``payload`` (Ed25519, or ECDSA P-256 with SHA-256, DER)?"""
    try:
        if isinstance(enrollee.public_key, ed25519.Ed25519PublicKey):
            enrollee.public_key.verify(signature, payload)
        else:
            enrollee.public_key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


class Challenges:
    """One-time challenges of one server: each good once, for :data:`CHALLENGE_LIFETIME`
    seconds; at most :data:`MAX_CHALLENGES_PER_SOURCE` per source address and
    :data:`MAX_CHALLENGES` in all (the oldest go first)."""

    def __init__(
        self, clock: Callable[[], float], rand: Callable[[int], bytes] = secrets.token_bytes
    ) -> None:
        self.clock = clock
        self.rand = rand
        #: challenge -> (expiry, source), oldest first.
        self._pending: dict[bytes, tuple[float, str]] = {}
        self._by_source: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def _drop(self, challenge: bytes) -> tuple[float, str] | None:
        found = self._pending.pop(challenge, None)
        if found is not None:
            left = self._by_source[found[1]] - 1
            if left:
                self._by_source[found[1]] = left
            else:
                del self._by_source[found[1]]
        return found

    def _expire(self, now: float) -> None:
        for challenge, (expires, _) in list(self._pending.items()):
            if expires >= now:
                break  # oldest first: the rest expire later
            self._drop(challenge)

    def issue(self, source: str) -> tuple[bytes, float]:
        """A fresh challenge for ``source`` and when it expires (clock seconds)."""
        now = self.clock()
        self._expire(now)
        if self._by_source.get(source, 0) >= MAX_CHALLENGES_PER_SOURCE:
            for challenge, (_, owner) in list(self._pending.items()):
                if owner == source:
                    self._drop(challenge)
                    break
        while len(self._pending) >= MAX_CHALLENGES:
            self._drop(next(iter(self._pending)))
        challenge = self.rand(CHALLENGE_SIZE)
        self._pending[challenge] = (now + CHALLENGE_LIFETIME, source)
        self._by_source[source] = self._by_source.get(source, 0) + 1
        return challenge, now + CHALLENGE_LIFETIME

    def take(self, challenge: bytes) -> bool:
        """Use ``challenge``: True once if this server gave it and it has not expired."""
        found = self._drop(challenge)
        return found is not None and found[0] >= self.clock()


__all__ = [
    "DOMAIN",
    "MAX_BODY",
    "URI_PREFIX",
    "CertificateRefused",
    "Challenges",
    "EnrollCA",
    "EnrollError",
    "EnrollRequest",
    "Enrollee",
    "decode_request",
    "enroll_payload",
    "enroll_uri",
    "verify_signature",
]

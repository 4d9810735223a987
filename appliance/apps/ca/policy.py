"""What ``sign/ca`` signs: the certificate policy every signer checks before its share.

The network's ``ca`` key signs nothing but TBSCertificates this module accepts
(:class:`CertificateCheck`, the signing service's :class:`~appliance.protocols.signing.PayloadCheck`
for the ``ca`` key, claiming every message). Each signer decodes the message itself
(pyasn1 + pyasn1-modules' RFC 5280 types, strict DER: the bytes must re-encode identically)
and signs only

* the group root's exact TBSCertificate, rebuilt from public data (:func:`~.x509.root_tbs`); or
* a leaf: version 3, signature algorithm Ed25519, issuer the root's subject, no unique ids;
  basicConstraints present, critical, CA false; only the extensions named here (basic
  constraints, key usage, extended key usage, subject alternative name, subject and authority
  key identifiers), each once; an authority key identifier, if any, that is the root's; a
  subject public key that is P-256 or Ed25519; validity no longer than a period plus the grace,
  starting no later than this server's clock (plus :data:`CLOCK_SKEW`) and no earlier than the
  previous period's start, and not already over; and names and usages that one
  :class:`Profile` of the configured policy allows (every subjectAltName entry a DNS name or IP
  address the profile lists; the subject empty or one common name that is one of them; key
  usage critical, a non-empty subset of the profile's; extended key usage a non-empty subset of
  the profile's, critical when the profile says so).

Anything else is refused, and the refusal raises a ``certificate-outside-policy`` alert naming
the server that asked.

Profiles: ``server-tls`` (the servers' own TLS names: the hosts of C's peers plus the config's
``[ca] tls_names``; EKU serverAuth/clientAuth), ``tsa`` (the config's ``[ca] tsa_names``; EKU
timeStamping, critical; digitalSignature/nonRepudiation), and one ``app:NAME`` per application
of ``[ca.apps.NAME]`` (:func:`app_profile`; EKU serverAuth/clientAuth). An application's leaf
says whose it is in its own content: one subjectAltName URI ``urn:pst:app:NAME``
(:data:`APP_URI_PREFIX`). A leaf with that URI is checked against that application's profile
only, a leaf without one against the servers' profiles only, so each signer checks, from the
TBS alone, that the names are allowed *for that application*.

Wildcards: an application's profile may list ``*.zone`` (the whole leftmost label, and ``zone``
at least two labels: never ``*.org``). It allows the leaf names ``LABEL.zone`` for any one DNS
label (letters, digits, hyphens; not ``*``) and the wildcard ``*.zone`` itself, and nothing
deeper: ``a.b.zone`` is refused. That is the set of host names a TLS client matches against
``*.zone`` (RFC 6125 §6.4.3: the wildcard stands for one label), so the profile never grants
more than the operator wrote. Partial-label wildcards (``w*.zone``) are never issued.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509 as cx509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import load_der_public_key
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.codec.der import encoder as der_encoder
from pyasn1.error import PyAsn1Error
from pyasn1.type import univ
from pyasn1_modules import rfc5280

from appliance.apps.ca.x509 import root_subject, root_tbs
from appliance.protocols._core import AlertKind
from appliance.protocols.state import Constants

__all__ = [
    "APP_URI_PREFIX",
    "CLOCK_SKEW",
    "CaPolicy",
    "CertificateCheck",
    "IssuedCheck",
    "Leaf",
    "PolicyError",
    "Profile",
    "app_profile",
    "app_uri",
    "check_app_name",
    "check_pattern",
    "decode_tbs",
    "name_allowed",
    "server_tls_profile",
    "tsa_profile",
]

#: How far a signer's clock may be from the requester's (seconds) for a leaf's validity.
CLOCK_SKEW = 30.0
#: Largest TBSCertificate a signer decodes.
MAX_TBS = 16 * 1024

ED25519_OID = univ.ObjectIdentifier("1.3.101.112")
SERVER_AUTH = "1.3.6.1.5.5.7.3.1"
CLIENT_AUTH = "1.3.6.1.5.5.7.3.2"
TIME_STAMPING = "1.3.6.1.5.5.7.3.8"
_KNOWN_EXTENSIONS = {
    str(rfc5280.id_ce_basicConstraints): "basicConstraints",
    str(rfc5280.id_ce_keyUsage): "keyUsage",
    str(rfc5280.id_ce_extKeyUsage): "extKeyUsage",
    str(rfc5280.id_ce_subjectAltName): "subjectAltName",
    str(rfc5280.id_ce_subjectKeyIdentifier): "subjectKeyIdentifier",
    str(rfc5280.id_ce_authorityKeyIdentifier): "authorityKeyIdentifier",
}
_KEY_USAGE_BITS = list(rfc5280.KeyUsage.namedValues)
#: The subjectAltName URI that names the application a leaf is for.
APP_URI_PREFIX = "urn:pst:app:"
#: Application names, as the local API registers them (appliance.api._core).
_APP_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}")
_LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


class PolicyError(ValueError):
    """The TBSCertificate is malformed or outside the policy; the message says which rule."""


@dataclass(frozen=True)
class Profile:
    """A kind of leaf the network issues: the names it may carry and what it may be used for."""

    name: str
    names: frozenset[str]
    eku: frozenset[str]
    eku_critical: bool = False
    key_usage: frozenset[str] = frozenset({"digitalSignature"})
    #: The application whose leaves this profile allows (their URI names it); None: the servers'.
    app: str | None = None


def check_app_name(app: str) -> str:
    """``app`` if it is an application name the API registers; else :class:`PolicyError`."""
    if not isinstance(app, str) or _APP_NAME_RE.fullmatch(app) is None:
        raise PolicyError(f"{app!r} is not an application name (1 to 128 of [A-Za-z0-9._:@+-])")
    return app


def app_uri(app: str) -> str:
    """The subjectAltName URI of application ``app``'s leaves."""
    return APP_URI_PREFIX + check_app_name(app)


def check_pattern(pattern: str) -> str:
    """A name of an application's profile, lower-cased: an IP address, a DNS name of LDH labels,
    or ``*.zone`` (see the module doc); else :class:`PolicyError` saying why."""
    text = pattern.lower()
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    labels = text.split(".")
    if labels[0] == "*":
        if len(labels) < 3:
            raise PolicyError(f"{pattern!r}: a wildcard needs at least two labels after it (not *.org)")
        labels = labels[1:]
    if len(text) > 253 or not all(_LABEL_RE.fullmatch(label) for label in labels):
        raise PolicyError(
            f"{pattern!r}: not a DNS name of letters, digits and hyphens (a wildcard only as '*.' first)"
        )
    return text


def name_allowed(name: str, patterns: frozenset[str]) -> bool:
    """Is ``name`` (a leaf's, lower-case) one of ``patterns``, or one label under a ``*.zone``?"""
    if name in patterns:
        return True
    label, dot, zone = name.partition(".")
    return bool(dot) and _LABEL_RE.fullmatch(label) is not None and f"*.{zone}" in patterns


def app_profile(app: str, names: Sequence[str]) -> Profile:
    """Application ``app``'s leaves (``[ca.apps.APP] names``): TLS server and client."""
    return Profile(
        f"app:{check_app_name(app)}",
        frozenset(check_pattern(n) for n in names),
        frozenset({SERVER_AUTH, CLIENT_AUTH}),
        app=app,
    )


def server_tls_profile(constants: Constants, extra: Sequence[str] = ()) -> Profile:
    """The servers' own TLS names: the hosts of C's peers and the configured extra names."""
    hosts = {address.rsplit(":", 1)[0].strip("[]") for address in constants.peers.values()}
    return Profile("server-tls", frozenset(hosts | set(extra)), frozenset({SERVER_AUTH, CLIENT_AUTH}))


def tsa_profile(names: Sequence[str]) -> Profile:
    """The timestamping authority (issue 12): EKU timeStamping, critical (RFC 3161 §2.3)."""
    return Profile(
        "tsa",
        frozenset(names),
        frozenset({TIME_STAMPING}),
        eku_critical=True,
        key_usage=frozenset({"digitalSignature", "nonRepudiation"}),
    )


@dataclass(frozen=True)
class CaPolicy:
    """The policy a signer checks leaves against (from its config; the same on every server)."""

    grace: float
    profiles: tuple[Profile, ...] = ()

    def profile(self, name: str) -> Profile:
        for p in self.profiles:
            if p.name == name:
                return p
        raise PolicyError(f"no certificate profile {name!r} in this server's policy")


@dataclass(frozen=True)
class Leaf:
    """What a signer reads of a leaf's TBSCertificate (after the structural checks)."""

    not_before: float
    not_after: float
    names: tuple[str, ...]
    subject_der: bytes
    issuer_der: bytes
    key_usage: frozenset[str]
    key_usage_critical: bool
    eku: frozenset[str] | None
    eku_critical: bool
    ca: bool
    path_length: int | None
    extensions: dict[str, bool] = field(default_factory=dict)
    authority_key_id: bytes | None = None
    public_key: Any = None
    #: The application of the subjectAltName URI, if any.
    app: str | None = None


def _time(value: Any, what: str) -> float:
    choice = value.getName()
    if choice not in ("utcTime", "generalTime"):
        raise PolicyError(f"{what}: not a time")
    try:
        return float(value.getComponent().asDateTime.timestamp())
    except (ValueError, PyAsn1Error, TypeError) as exc:
        raise PolicyError(f"{what}: unreadable time: {exc}") from None


def _decode_ext(value: bytes, spec: Any, what: str) -> Any:
    try:
        decoded, rest = der_decoder.decode(value, asn1Spec=spec)
    except PyAsn1Error as exc:
        raise PolicyError(f"{what}: not DER: {type(exc).__name__}") from None
    if rest or der_encoder.encode(decoded) != value:
        raise PolicyError(f"{what}: not canonical DER")
    return decoded


def _names(san: Any) -> tuple[tuple[str, ...], str | None]:
    out: list[str] = []
    app: str | None = None
    for general in san:
        kind = general.getName()
        if kind == "dNSName":
            text = str(general.getComponent())
            if not text or any(not ch.isprintable() or ch.isspace() for ch in text):
                raise PolicyError("subjectAltName: a DNS name with spaces or control characters")
            out.append(text.lower())
        elif kind == "iPAddress":
            raw = bytes(general.getComponent())
            if len(raw) not in (4, 16):
                raise PolicyError("subjectAltName: an IP address of neither 4 nor 16 octets")
            out.append(str(ipaddress.ip_address(raw)))
        elif kind == "uniformResourceIdentifier":
            uri = str(general.getComponent())
            if app is not None:
                raise PolicyError("subjectAltName: more than one URI (one application per leaf)")
            if not uri.startswith(APP_URI_PREFIX):
                raise PolicyError(f"subjectAltName: a URI that does not start with {APP_URI_PREFIX}")
            app = check_app_name(uri[len(APP_URI_PREFIX) :])
        else:
            raise PolicyError(f"subjectAltName: a {kind} entry (only DNS names, IP addresses, one app URI)")
    if not out:
        raise PolicyError("subjectAltName: no names")
    return tuple(out), app


def decode_tbs(message: bytes) -> Leaf:
    """The parts of a TBSCertificate the policy reads; :class:`PolicyError` for anything malformed.

    Strict: the whole message is one TBSCertificate in DER (re-encoding gives the same bytes)."""
    if len(message) > MAX_TBS:
        raise PolicyError(f"a TBSCertificate of {len(message)} bytes (more than {MAX_TBS})")
    try:
        tbs, rest = der_decoder.decode(message, asn1Spec=rfc5280.TBSCertificate())
    except PyAsn1Error as exc:
        raise PolicyError(f"not a DER TBSCertificate ({type(exc).__name__})") from None
    if rest:
        raise PolicyError("trailing bytes after the TBSCertificate")
    try:
        canonical = der_encoder.encode(tbs) == message
    except PyAsn1Error:
        canonical = False
    if not canonical:
        raise PolicyError("the TBSCertificate is not in canonical DER")
    if int(tbs["version"]) != 2:
        raise PolicyError("not a version 3 certificate")
    if tbs["signature"]["algorithm"] != ED25519_OID or tbs["signature"]["parameters"].isValue:
        raise PolicyError("the signature algorithm is not Ed25519 (the ca key)")
    if tbs["issuerUniqueID"].isValue or tbs["subjectUniqueID"].isValue:
        raise PolicyError("unique identifiers are not issued")
    serial = int(tbs["serialNumber"])
    if serial <= 0 or serial.bit_length() > 159:
        raise PolicyError("the serial number is not a positive integer of at most 20 octets")
    not_before = _time(tbs["validity"]["notBefore"], "notBefore")
    not_after = _time(tbs["validity"]["notAfter"], "notAfter")
    try:
        public_key = load_der_public_key(der_encoder.encode(tbs["subjectPublicKeyInfo"]))
    except (ValueError, PyAsn1Error, TypeError, UnsupportedAlgorithm) as exc:
        raise PolicyError(f"subject public key: unreadable ({exc})") from None
    if not (
        isinstance(public_key, ed25519.Ed25519PublicKey)
        or (isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(public_key.curve, ec.SECP256R1))
    ):
        raise PolicyError("subject public key: only P-256 and Ed25519 keys are certified")
    extensions: dict[str, bool] = {}
    values: dict[str, bytes] = {}
    if not tbs["extensions"].isValue:
        raise PolicyError("no extensions (basicConstraints is required)")
    for ext in tbs["extensions"]:
        oid = str(ext["extnID"])
        name = _KNOWN_EXTENSIONS.get(oid)
        if name is None:
            raise PolicyError(f"extension {oid} is not one the policy allows")
        if name in extensions:
            raise PolicyError(f"extension {name} appears twice")
        extensions[name] = bool(ext["critical"])
        values[name] = bytes(ext["extnValue"])
    if "basicConstraints" not in values:
        raise PolicyError("no basicConstraints")
    bc = _decode_ext(values["basicConstraints"], rfc5280.BasicConstraints(), "basicConstraints")
    ca = bool(bc["cA"])
    path_length = int(bc["pathLenConstraint"]) if bc["pathLenConstraint"].isValue else None
    key_usage: frozenset[str] = frozenset()
    if "keyUsage" in values:
        ku = _decode_ext(values["keyUsage"], rfc5280.KeyUsage(), "keyUsage")
        bits = tuple(ku)
        key_usage = frozenset(
            _KEY_USAGE_BITS[i] if i < len(_KEY_USAGE_BITS) else f"bit{i}" for i, b in enumerate(bits) if b
        )
    eku: frozenset[str] | None = None
    if "extKeyUsage" in values:
        seq = _decode_ext(values["extKeyUsage"], rfc5280.ExtKeyUsageSyntax(), "extKeyUsage")
        eku = frozenset(str(oid) for oid in seq)
    names: tuple[str, ...] = ()
    app: str | None = None
    if "subjectAltName" in values:
        names, app = _names(_decode_ext(values["subjectAltName"], rfc5280.SubjectAltName(), "subjectAltName"))
    aki: bytes | None = None
    if "authorityKeyIdentifier" in values:
        ak = _decode_ext(values["authorityKeyIdentifier"], rfc5280.AuthorityKeyIdentifier(), "authorityKey")
        if ak["authorityCertIssuer"].isValue or ak["authorityCertSerialNumber"].isValue:
            raise PolicyError("authorityKeyIdentifier: only a key identifier is allowed")
        if not ak["keyIdentifier"].isValue:
            raise PolicyError("authorityKeyIdentifier: no key identifier")
        aki = bytes(ak["keyIdentifier"])
    if "subjectKeyIdentifier" in values:
        _decode_ext(values["subjectKeyIdentifier"], rfc5280.SubjectKeyIdentifier(), "subjectKeyIdentifier")
    return Leaf(
        not_before=not_before,
        not_after=not_after,
        names=names,
        subject_der=der_encoder.encode(tbs["subject"]),
        issuer_der=der_encoder.encode(tbs["issuer"]),
        key_usage=key_usage,
        key_usage_critical=extensions.get("keyUsage", False),
        eku=eku,
        eku_critical=extensions.get("extKeyUsage", False),
        ca=ca,
        path_length=path_length,
        extensions=extensions,
        authority_key_id=aki,
        public_key=public_key,
        app=app,
    )


def _subject_ok(subject_der: bytes, names: Sequence[str]) -> bool:
    empty = cx509.Name([]).public_bytes()
    if subject_der == empty:
        return True
    for name in names:
        cn = cx509.Name([cx509.NameAttribute(cx509.oid.NameOID.COMMON_NAME, name)])
        if subject_der == cn.public_bytes():
            return True
    return False


def _fits(leaf: Leaf, profile: Profile) -> str | None:
    """None if ``leaf`` fits ``profile``; else the first rule it breaks."""
    if profile.app is not None:  # wildcards only in applications' profiles (see the module doc)
        outside = [n for n in leaf.names if not name_allowed(n, profile.names)]
    else:
        outside = [n for n in leaf.names if n not in profile.names]
    if outside:
        return f"names {outside} are not allowed by profile {profile.name!r}"
    if not leaf.key_usage or not leaf.key_usage <= profile.key_usage or not leaf.key_usage_critical:
        return (
            f"keyUsage {sorted(leaf.key_usage)} (critical={leaf.key_usage_critical}) is not a critical "
            f"subset of {sorted(profile.key_usage)} (profile {profile.name!r})"
        )
    if leaf.eku is None or not leaf.eku or not leaf.eku <= profile.eku:
        got = sorted(leaf.eku or ())
        return f"extKeyUsage {got} is not a subset of {sorted(profile.eku)} ({profile.name!r})"
    if profile.eku_critical and not leaf.eku_critical:
        return f"extKeyUsage must be critical in profile {profile.name!r}"
    return None


class CertificateCheck:
    """The ``sign/ca`` payload check: the group root's exact TBS, or a leaf the policy allows.

    ``clock`` is this server's own clock (the leaf's validity must agree with it and with the
    period of C); ``public`` returns the ``ca`` public key once this server knows it.
    """

    name = "certificate"
    alert = AlertKind.CERTIFICATE_OUTSIDE_POLICY

    def __init__(
        self,
        constants: Constants,
        public: Callable[[], bytes | None],
        policy: CaPolicy,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.constants = constants
        self.public = public
        self.policy = policy
        self.clock = clock

    def claims(self, message: bytes) -> bool:
        return True  # the ca key signs certificates and nothing else: every message is checked

    def check(self, message: bytes) -> str | None:
        public = self.public()
        if public is None:
            return "this server does not know the ca public key"
        if message == root_tbs(public, self.constants):
            return None
        try:
            leaf = decode_tbs(message)
            self.check_leaf(leaf, public)
        except PolicyError as exc:
            return str(exc)
        return None

    def check_leaf(self, leaf: Leaf, public: bytes) -> None:
        """Raise :class:`PolicyError` unless ``leaf`` is one this server signs now."""
        _check_issuer(leaf, public, self.constants)
        now = self.clock()
        c = self.constants
        _check_span(leaf, c.period_length + self.policy.grace)
        if leaf.not_before > now + CLOCK_SKEW:
            raise PolicyError(f"valid from {leaf.not_before:.0f}, later than this server's clock ({now:.0f})")
        earliest = c.period_start(max(0, c.period_at(now) - 1)) - CLOCK_SKEW
        if leaf.not_before < earliest:
            raise PolicyError(f"valid from {leaf.not_before:.0f}, before the previous period started")
        if leaf.not_after < now - CLOCK_SKEW:
            raise PolicyError("already expired by this server's clock")
        _check_names(leaf)
        reasons = []
        # An application's leaf fits its application's profile only; a server's leaf the servers'.
        for profile in (p for p in self.policy.profiles if p.app == leaf.app):
            why = _fits(leaf, profile)
            if why is None:
                return
            reasons.append(why)
        if leaf.app is not None and not reasons:
            raise PolicyError(f"no profile for application {leaf.app!r} ([ca.apps] of this server)")
        raise PolicyError("no profile allows it: " + ("; ".join(reasons) or "the policy has no profiles"))


def _check_issuer(leaf: Leaf, public: bytes, constants: Constants) -> None:
    """A leaf of the group root (``public``: the ``ca`` key): not a CA, issuer and authority key
    identifier the root's."""
    if leaf.ca or leaf.path_length is not None:
        raise PolicyError("a CA certificate (only the group root is a CA)")
    if not leaf.extensions.get("basicConstraints"):
        raise PolicyError("basicConstraints must be critical")
    if leaf.issuer_der != root_subject(constants).public_bytes():
        raise PolicyError("the issuer is not the group root")
    root_ski = cx509.SubjectKeyIdentifier.from_public_key(
        ed25519.Ed25519PublicKey.from_public_bytes(public)
    ).digest
    if leaf.authority_key_id is not None and leaf.authority_key_id != root_ski:
        raise PolicyError("the authority key identifier is not the group root's")


def _check_span(leaf: Leaf, period_and_grace: float) -> None:
    longest = period_and_grace + 2.0  # whole seconds at both ends
    if leaf.not_after <= leaf.not_before:
        raise PolicyError("the validity is empty")
    if leaf.not_after - leaf.not_before > longest:
        raise PolicyError(
            f"valid for {leaf.not_after - leaf.not_before:.0f} s, longer than a period plus the grace "
            f"({longest:.0f} s)"
        )


def _check_names(leaf: Leaf) -> None:
    if not leaf.names:
        raise PolicyError("no subjectAltName")
    if not _subject_ok(leaf.subject_der, leaf.names):
        raise PolicyError("the subject is neither empty nor one common name from the subjectAltName")


class IssuedCheck:
    """Is a certificate (DER) one the group issued under ``profile``, chaining to the group root?

    What a signer can know of a certificate it did not sign itself, from the network's public
    state alone: the group root is a function of the ``ca`` public key and C (:func:`~.x509.root_tbs`),
    so a leaf chains to it when its issuer is the root's subject, its authority key identifier
    (if any) the root's, and its signature verifies with the ``ca`` key; and the network's ``ca``
    key signs only leaves t+1 servers' :class:`CertificateCheck` accepted. The leaf must also be
    one such a check accepts under ``profile`` (structure, names and usages, validity no longer
    than a period plus the grace). Its validity against a time is the caller's (a token's
    genTime). ``public`` returns the ``ca`` public key once this server knows it.
    """

    def __init__(
        self, constants: Constants, public: Callable[[], bytes | None], profile: Profile, grace: float
    ) -> None:
        self.constants = constants
        self.public = public
        self.profile = profile
        self.grace = grace

    def __call__(self, certificate: bytes) -> Leaf:
        """The leaf of ``certificate``; :class:`PolicyError` saying why it is not the group's."""
        public = self.public()
        if public is None:
            raise PolicyError("this server does not know the group's ca key yet")
        if len(certificate) > MAX_TBS + 256:
            raise PolicyError(f"a certificate of {len(certificate)} bytes (more than {MAX_TBS + 256})")
        try:
            cert = cx509.load_der_x509_certificate(certificate)
            tbs, signature = cert.tbs_certificate_bytes, cert.signature
            algorithm = cert.signature_algorithm_oid
        except ValueError as exc:
            raise PolicyError(f"not a DER certificate: {exc}") from None
        if algorithm != cx509.oid.SignatureAlgorithmOID.ED25519:
            raise PolicyError("not signed with Ed25519 (the group root's key is the network's ca key)")
        leaf = decode_tbs(tbs)  # (its signature algorithm is Ed25519, the ca key's)
        try:
            ed25519.Ed25519PublicKey.from_public_bytes(public).verify(signature, tbs)
        except InvalidSignature:
            raise PolicyError("not signed by the group root's key (the network's ca key)") from None
        _check_issuer(leaf, public, self.constants)
        _check_span(leaf, self.constants.period_length + self.grace)
        _check_names(leaf)
        if leaf.app != self.profile.app:
            raise PolicyError(f"a leaf of application {leaf.app!r}, not of profile {self.profile.name!r}")
        why = _fits(leaf, self.profile)
        if why is not None:
            raise PolicyError(why)
        return leaf

"""RFC 3161 (with RFC 5816's ESSCertIDv2): the timestamping codec, no I/O and no keys.

* :func:`decode_request` turns the bytes of a ``TimeStampReq`` into a :class:`TimeStampRequest`,
  or raises :class:`RequestError` carrying the RFC's ``PKIFailureInfo`` bit and a clear text. The
  size is checked before anything is decoded.
* :func:`encode_tst_info` builds the ``TSTInfo`` (version 1, policy, imprint copied, serial,
  ``genTime`` with sub-second precision, accuracy, nonce); :func:`decode_tst_info` reads one back
  (a co-signer reads a proposed ``TSTInfo`` this way).
* :class:`SigningChain` holds the TSA certificate and its chain and pre-encodes what every token
  repeats (the signer identifier and the ESS ``signingCertificateV2`` attribute).
  :func:`signed_attributes` gives the exact bytes the signer signs, :func:`build_token` wraps a
  ``TSTInfo`` and a signature into the CMS ``SignedData`` token, :func:`sign_token` does both with a
  callable ``sign(data) -> DER ECDSA signature`` (any signer: a local key, a threshold network).
* :func:`granted_response` and :func:`rejection_response` build the ``TimeStampResp``;
  :func:`decode_response` reads one (tests, clients).

The encoding uses pyasn1 and pyasn1-modules (``rfc3161``, ``rfc5652``, ``rfc5035``, ``rfc5280``).
"""

from __future__ import annotations

import datetime as dt
import enum
import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from pyasn1.codec.ber import encoder as ber_encoder
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.codec.der import encoder as der_encoder
from pyasn1.error import PyAsn1Error
from pyasn1.type import univ, useful
from pyasn1_modules import rfc3161, rfc5035, rfc5280, rfc5652

# rfc3161-client's request parser (rust-asn1): not in its documented API, so the version is
# pinned and tests/test_tsa.py fails if it changes (see _common_request).
from rfc3161_client._rust import parse_timestamp_request

#: Largest request decoded. A ``TimeStampReq`` with a SHA-512 imprint, a policy OID and a 160-bit
#: nonce is about 120 bytes; anything near this cap is not a request.
MAX_REQUEST: Final = 4096

#: Largest serial number RFC 3161 lets clients expect (section 2.4.2: "up to 160 bits").
MAX_SERIAL_BITS: Final = 160

#: The resolution of ``genTime`` (see :func:`format_gen_time`).
GEN_TIME_PRECISION: Final = dt.timedelta(milliseconds=1)

#: pyasn1's DER encoder deletes *every* zero of a GeneralizedTime fraction, not only trailing
#: ones (``.001Z`` becomes ``.1Z``: pyasn1/pyasn1 pull request 115, open): ours encodes the
#: string as given, which :func:`format_gen_time` makes canonical (X.690 11.7).
_TIME_AS_IS = ber_encoder.OctetStringEncoder()
_encode = der_encoder.Encoder(
    {**der_encoder.TAG_MAP, useful.GeneralizedTime.tagSet: _TIME_AS_IS},
    {**der_encoder.TYPE_MAP, useful.GeneralizedTime.typeId: _TIME_AS_IS},
)

ID_CT_TSTINFO: Final = "1.2.840.113549.1.9.16.1.4"
ID_SIGNED_DATA: Final = "1.2.840.113549.1.7.2"
ECDSA_WITH_SHA256: Final = "1.2.840.10045.4.3.2"
SHA256_OID: Final = "2.16.840.1.101.3.4.2.1"


@dataclass(frozen=True)
class HashAlgorithm:
    name: str
    oid: str
    size: int


#: The imprint hash algorithms accepted, by OID (SHA-1 and MD5 are refused with ``badAlg``).
HASHES: Final = {
    h.oid: h
    for h in (
        HashAlgorithm("sha256", SHA256_OID, 32),
        HashAlgorithm("sha384", "2.16.840.1.101.3.4.2.2", 48),
        HashAlgorithm("sha512", "2.16.840.1.101.3.4.2.3", 64),
    )
}
HASHES_BY_NAME: Final = {h.name: h for h in HASHES.values()}


class FailureInfo(enum.IntEnum):
    """RFC 3161 ``PKIFailureInfo``: the value is the bit number."""

    BAD_ALG = 0
    BAD_REQUEST = 2
    BAD_DATA_FORMAT = 5
    TIME_NOT_AVAILABLE = 14
    UNACCEPTED_POLICY = 15
    UNACCEPTED_EXTENSION = 16
    ADD_INFO_NOT_AVAILABLE = 17
    SYSTEM_FAILURE = 25

    @property
    def asn1_name(self) -> str:
        """The RFC's name of the bit (``badAlg``, ``unacceptedPolicy``, ...)."""
        head, *rest = self.name.lower().split("_")
        return head + "".join(word.capitalize() for word in rest)


class Status(enum.IntEnum):
    """RFC 3161 ``PKIStatus``."""

    GRANTED = 0
    GRANTED_WITH_MODS = 1
    REJECTION = 2
    WAITING = 3
    REVOCATION_WARNING = 4
    REVOCATION_NOTIFICATION = 5


class TsaError(Exception):
    """Base class of the timestamping errors."""


class RequestError(TsaError, ValueError):
    """A request the authority does not grant: ``failure`` is the RFC's failure bit to send back,
    the message says what was wrong (it is sent as the ``statusString``)."""

    def __init__(self, failure: FailureInfo, text: str) -> None:
        super().__init__(text)
        self.failure = failure
        self.text = text


class TokenDecodeError(TsaError, ValueError):
    """A ``TSTInfo``, token or response that does not decode; the message says what was wrong."""


class ChainError(TsaError, ValueError):
    """A TSA certificate chain that cannot sign tokens (key type, EKU); the message says why."""


@dataclass(frozen=True)
class TimeStampRequest:
    """A decoded ``TimeStampReq``."""

    hash_algorithm: HashAlgorithm
    digest: bytes
    policy: str | None
    nonce: int | None
    cert_req: bool


@dataclass(frozen=True)
class Accuracy:
    """``Accuracy``: how far ``genTime`` may be from the true time; all zero means "not stated"."""

    seconds: int = 0
    millis: int = 0
    micros: int = 0

    def __post_init__(self) -> None:
        if self.seconds < 0 or not (0 <= self.millis <= 999) or not (0 <= self.micros <= 999):
            raise ValueError(f"accuracy out of range: {self}")

    @property
    def total(self) -> dt.timedelta:
        return dt.timedelta(seconds=self.seconds, milliseconds=self.millis, microseconds=self.micros)

    @classmethod
    def from_timedelta(cls, value: dt.timedelta) -> Accuracy:
        micros = round(value.total_seconds() * 1_000_000)
        if micros < 0:
            raise ValueError("accuracy must not be negative")
        seconds, rest = divmod(micros, 1_000_000)
        return cls(seconds, rest // 1000, rest % 1000)


@dataclass(frozen=True)
class TSTInfo:
    """The fields of a ``TSTInfo`` the authority sets (``ordering`` false, no ``tsa``, no extensions)."""

    policy: str
    hash_algorithm: HashAlgorithm
    digest: bytes
    serial: int
    gen_time: dt.datetime
    accuracy: Accuracy | None
    nonce: int | None


# --- the request -------------------------------------------------------------------------------


def decode_request(data: bytes, *, max_size: int = MAX_REQUEST) -> TimeStampRequest:
    """Decode a DER ``TimeStampReq``; raise :class:`RequestError` (and nothing else) if it is bad.

    Policy is *not* judged here (the authority knows its policy); extensions are refused.
    """
    if len(data) > max_size:
        raise RequestError(
            FailureInfo.BAD_REQUEST, f"request of {len(data)} bytes is larger than the {max_size}-byte limit"
        )
    if not data:
        raise RequestError(FailureInfo.BAD_DATA_FORMAT, "empty request")
    common = _common_request(data)
    if common is not None:
        return common
    return reference_decode_request(data)


def reference_decode_request(data: bytes) -> TimeStampRequest:
    """:func:`decode_request` by pyasn1 alone, without the size checks (the tests hold both
    equal; every request :func:`_common_request` does not take goes here)."""
    try:
        req, rest = der_decoder.decode(bytes(data), asn1Spec=rfc3161.TimeStampReq())
    except (PyAsn1Error, ValueError, TypeError, IndexError, KeyError, RecursionError) as exc:
        raise RequestError(
            FailureInfo.BAD_DATA_FORMAT, f"request is not a DER TimeStampReq ({type(exc).__name__})"
        ) from None
    if rest:
        raise RequestError(FailureInfo.BAD_DATA_FORMAT, f"{len(rest)} bytes after the TimeStampReq")
    try:
        return _read_request(req)
    except RequestError:
        raise
    except (PyAsn1Error, ValueError, TypeError) as exc:
        raise RequestError(
            FailureInfo.BAD_DATA_FORMAT, f"request is not a valid TimeStampReq ({type(exc).__name__})"
        ) from None


def _common_request(data: bytes) -> TimeStampRequest | None:
    """The common request (what ``openssl ts -query`` and most clients send: version 1, one of
    :data:`HASHES` with or without NULL parameters, a nonce or none, ``certReq`` or not; no
    policy, no extension) read by rfc3161-client's parser (rust-asn1, DER only) in microseconds,
    where pyasn1 takes about 0.1 ms. Its answer is used only if :func:`request_der` of the fields
    it read is byte for byte ``data``: then ``data`` is the one DER encoding of that request,
    which pyasn1 reads the same way (a test holds both equal). Anything else (a parse error, a
    policy, an extension, any other byte) returns None: :func:`decode_request` then decodes with
    pyasn1, which gives the exact reason of a rejection."""
    try:
        parsed = parse_timestamp_request(data)
        if parsed.version != 1 or parsed.policy is not None:
            return None
        imprint = parsed.message_imprint
        algorithm = HASHES.get(imprint.hash_algorithm.dotted_string)
        digest, nonce, cert_req = imprint.message, parsed.nonce, parsed.cert_req
    except (ValueError, TypeError):
        return None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:  # a panic in Rust (pyo3's PanicException is no Exception): pyasn1 decides
        return None
    if algorithm is None or len(digest) != algorithm.size:
        return None
    for null in (True, False):
        if data == request_der(algorithm, digest, nonce=nonce, cert_req=cert_req, null=null):
            return TimeStampRequest(algorithm, digest, None, nonce, cert_req)
    return None


def request_der(
    algorithm: HashAlgorithm, digest: bytes, *, nonce: int | None, cert_req: bool, null: bool
) -> bytes:
    """The DER ``TimeStampReq`` of version 1 with this imprint (``null``: the algorithm's
    parameters are NULL, else absent), nonce and ``certReq``, no policy and no extension."""
    body = _VERSION_1 + _imprint_der(algorithm, digest, null=null)
    if nonce is not None:
        body += integer_der(nonce)
    if cert_req:
        body += _TRUE
    return _tlv(0x30, body)


def integer_der(value: int) -> bytes:
    """The DER ``INTEGER`` of ``value`` (two's complement, fewest octets)."""
    size = (value if value >= 0 else ~value).bit_length() // 8 + 1
    return _tlv(0x02, value.to_bytes(size, "big", signed=True))


def _imprint_der(algorithm: HashAlgorithm, digest: bytes, *, null: bool) -> bytes:
    identifier = _ALGORITHM_NULL[algorithm.oid] if null else _ALGORITHM[algorithm.oid]
    return _tlv(0x30, identifier + _tlv(0x04, digest))


def _read_request(req: rfc3161.TimeStampReq) -> TimeStampRequest:
    if int(req["version"]) != 1:
        raise RequestError(FailureInfo.BAD_DATA_FORMAT, f"request version {int(req['version'])} (only 1)")
    hash_algorithm, digest = _read_imprint(req["messageImprint"])
    if req["extensions"].isValue:
        raise RequestError(FailureInfo.UNACCEPTED_EXTENSION, "request extensions are not supported")
    policy = str(req["reqPolicy"]) if req["reqPolicy"].isValue else None
    nonce = int(req["nonce"]) if req["nonce"].isValue else None
    return TimeStampRequest(hash_algorithm, digest, policy, nonce, bool(req["certReq"]))


def _read_imprint(imprint: rfc3161.MessageImprint) -> tuple[HashAlgorithm, bytes]:
    algorithm = imprint["hashAlgorithm"]
    oid = str(algorithm["algorithm"])
    known = HASHES.get(oid)
    if known is None:
        raise RequestError(
            FailureInfo.BAD_ALG,
            f"hash algorithm {oid} not accepted (accepted: {', '.join(HASHES_BY_NAME)})",
        )
    parameters = algorithm["parameters"]
    if parameters.isValue and bytes(parameters) != b"\x05\x00":
        raise RequestError(FailureInfo.BAD_ALG, f"{known.name} with parameters other than NULL")
    digest = bytes(imprint["hashedMessage"])
    if len(digest) != known.size:
        raise RequestError(
            FailureInfo.BAD_DATA_FORMAT,
            f"{known.name} imprint of {len(digest)} bytes (a {known.name} digest has {known.size})",
        )
    return known, digest


def encode_request(
    hash_name: str,
    digest: bytes,
    *,
    policy: str | None = None,
    nonce: int | None = None,
    cert_req: bool = False,
) -> bytes:
    """Encode a ``TimeStampReq`` (for tests and the benchmark; clients use their own tools)."""
    req = rfc3161.TimeStampReq()
    req["version"] = 1
    req["messageImprint"] = _imprint(HASHES_BY_NAME[hash_name], digest)
    if policy is not None:
        req["reqPolicy"] = univ.ObjectIdentifier(policy)
    if nonce is not None:
        req["nonce"] = nonce
    if cert_req:
        req["certReq"] = True
    return bytes(der_encoder.encode(req))


def _imprint(algorithm: HashAlgorithm, digest: bytes) -> rfc3161.MessageImprint:
    imprint = rfc3161.MessageImprint()
    imprint["hashAlgorithm"]["algorithm"] = univ.ObjectIdentifier(algorithm.oid)
    imprint["hashedMessage"] = digest
    return imprint


# --- TSTInfo -----------------------------------------------------------------------------------


def format_gen_time(when: dt.datetime) -> str:
    """``GeneralizedTime`` as RFC 3161 wants it: UTC, ``Z``, fraction without trailing zeros.

    Millisecond precision (truncated): far below any accuracy a network of servers can state.
    """
    if when.tzinfo is None:
        raise ValueError("genTime must be timezone-aware")
    utc = when.astimezone(dt.UTC)
    text = utc.strftime("%Y%m%d%H%M%S")
    millis = utc.microsecond // 1000
    if millis:
        text += "." + f"{millis:03d}".rstrip("0")
    return text + "Z"


def truncate_gen_time(when: dt.datetime) -> dt.datetime:
    """``when`` in UTC cut to the precision :func:`format_gen_time` keeps."""
    utc = when.astimezone(dt.UTC)
    return utc.replace(microsecond=utc.microsecond // 1000 * 1000)


def parse_gen_time(text: str) -> dt.datetime:
    """The inverse of :func:`format_gen_time`; raise :class:`TokenDecodeError` on any other form."""
    if not (text.endswith("Z") and text.isascii()):
        raise TokenDecodeError(f"genTime {text[:40]!r} does not end in Z")
    body = text[:-1]
    whole, _, fraction = body.partition(".")
    if len(whole) != 14 or not whole.isdigit():
        raise TokenDecodeError(f"genTime {text[:40]!r} is not YYYYMMDDHHMMSS[.f]Z")
    if "." in body and (not fraction.isdigit() or len(fraction) > 3 or fraction.endswith("0")):
        raise TokenDecodeError(f"genTime {text[:40]!r}: fraction must be 1-3 digits without trailing zeros")
    try:
        base = dt.datetime.strptime(whole, "%Y%m%d%H%M%S").replace(tzinfo=dt.UTC)
    except ValueError:
        raise TokenDecodeError(f"genTime {text[:40]!r} is not a valid date") from None
    return base.replace(microsecond=int(fraction.ljust(6, "0")) if fraction else 0)


def encode_tst_info(info: TSTInfo) -> bytes:
    """DER ``TSTInfo``; raises ``ValueError`` on a serial outside 1..2**160-1.

    Assembled from parts that pyasn1 encoded once (the policy, the accuracy, the algorithm)
    around the per-token fields: :func:`reference_encode_tst_info` encodes the whole with
    pyasn1 from the schema, 0.1 ms a token, and the tests hold both equal."""
    _check_serial(info.serial)
    accuracy = info.accuracy
    body = (
        _VERSION_1
        + _policy_der(info.policy)
        + _imprint_der(info.hash_algorithm, info.digest, null=False)
        + integer_der(info.serial)
        + _tlv(0x18, format_gen_time(info.gen_time).encode("ascii"))
        + (_accuracy_der(accuracy) if accuracy is not None and accuracy != Accuracy() else b"")
        + (integer_der(info.nonce) if info.nonce is not None else b"")
    )
    return _tlv(0x30, body)


def _check_serial(serial: int) -> None:
    if not (0 < serial < 1 << MAX_SERIAL_BITS):
        raise ValueError(f"serial number must be positive and at most {MAX_SERIAL_BITS} bits")


@functools.lru_cache(maxsize=64)
def _policy_der(policy: str) -> bytes:
    return bytes(der_encoder.encode(univ.ObjectIdentifier(policy)))


@functools.lru_cache(maxsize=64)
def _accuracy_der(accuracy: Accuracy) -> bytes:
    tst = rfc3161.TSTInfo()
    _set_accuracy(tst, accuracy)
    return bytes(der_encoder.encode(tst["accuracy"]))


def _set_accuracy(tst: rfc3161.TSTInfo, accuracy: Accuracy) -> None:
    acc = tst["accuracy"]
    if accuracy.seconds:
        acc["seconds"] = accuracy.seconds
    if accuracy.millis:
        acc["millis"] = accuracy.millis
    if accuracy.micros:
        acc["micros"] = accuracy.micros


def reference_encode_tst_info(info: TSTInfo) -> bytes:
    """:func:`encode_tst_info` encoded by pyasn1 from the schema (the tests hold both equal)."""
    _check_serial(info.serial)
    tst = rfc3161.TSTInfo()
    tst["version"] = 1
    tst["policy"] = univ.ObjectIdentifier(info.policy)
    tst["messageImprint"] = _imprint(info.hash_algorithm, info.digest)
    tst["serialNumber"] = info.serial
    tst["genTime"] = useful.GeneralizedTime(format_gen_time(info.gen_time))
    accuracy = info.accuracy
    if accuracy is not None and accuracy != Accuracy():
        _set_accuracy(tst, accuracy)
    if info.nonce is not None:
        tst["nonce"] = info.nonce
    return bytes(_encode(tst))


def decode_tst_info(data: bytes) -> TSTInfo:
    """Decode a DER ``TSTInfo``; raise :class:`TokenDecodeError` (and nothing else) if it is bad,
    uses ``ordering``, ``tsa`` or extensions, or its imprint is not one of :data:`HASHES`."""
    try:
        tst, rest = der_decoder.decode(bytes(data), asn1Spec=rfc3161.TSTInfo())
        if rest:
            raise TokenDecodeError(f"{len(rest)} bytes after the TSTInfo")
        if int(tst["version"]) != 1:
            raise TokenDecodeError(f"TSTInfo version {int(tst['version'])} (only 1)")
        if bool(tst["ordering"]) or tst["tsa"].isValue or tst["extensions"].isValue:
            raise TokenDecodeError("TSTInfo with ordering, tsa or extensions (never proposed here)")
        try:
            algorithm, digest = _read_imprint(tst["messageImprint"])
        except RequestError as exc:
            raise TokenDecodeError(f"TSTInfo imprint: {exc.text}") from None
        accuracy = None
        # Not tst["accuracy"]: that would instantiate an empty Accuracy (all its fields optional).
        acc = tst.getComponentByName("accuracy", instantiate=False)
        if acc is not univ.noValue and acc.isValue:
            accuracy = Accuracy(
                int(acc["seconds"]) if acc["seconds"].isValue else 0,
                int(acc["millis"]) if acc["millis"].isValue else 0,
                int(acc["micros"]) if acc["micros"].isValue else 0,
            )
        return TSTInfo(
            policy=str(tst["policy"]),
            hash_algorithm=algorithm,
            digest=digest,
            serial=int(tst["serialNumber"]),
            gen_time=parse_gen_time(str(tst["genTime"])),
            accuracy=accuracy,
            nonce=int(tst["nonce"]) if tst["nonce"].isValue else None,
        )
    except TokenDecodeError:
        raise
    except (PyAsn1Error, ValueError, TypeError, IndexError, KeyError, RecursionError) as exc:
        raise TokenDecodeError(f"not a DER TSTInfo ({type(exc).__name__})") from None


# --- the CMS SignedData token ------------------------------------------------------------------

#: ``sign(data)``: sign ``data`` (the DER signed attributes) with ECDSA P-256 / SHA-256, hashing it
#: itself, and return the DER ``ECDSA-Sig-Value`` (what ``cryptography``'s ``key.sign`` returns).
Signer = Callable[[bytes], bytes]


class SigningChain:
    """The TSA certificate (DER) and the certificates above it up to, not including, the root.

    Checked once: the TSA key is ECDSA P-256 and the certificate has the extended key usage
    ``id-kp-timeStamping`` marked critical and nothing else (RFC 3161 section 2.3).
    """

    def __init__(self, tsa_certificate: bytes, intermediates: tuple[bytes, ...] = ()) -> None:
        try:
            cert = x509.load_der_x509_certificate(tsa_certificate)
        except ValueError as exc:
            raise ChainError(f"TSA certificate does not decode: {exc}") from None
        key = cert.public_key()
        if not (isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)):
            raise ChainError("TSA certificate key is not ECDSA P-256 (the only signer supported)")
        try:
            eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
        except x509.ExtensionNotFound:
            raise ChainError(
                "TSA certificate has no extended key usage (needs timeStamping, critical)"
            ) from None
        if not eku.critical or list(eku.value) != [ExtendedKeyUsageOID.TIME_STAMPING]:
            raise ChainError("TSA certificate's extended key usage must be exactly timeStamping, critical")
        self.certificate = cert
        self.public_key: ec.EllipticCurvePublicKey = key
        self.tsa_certificate = bytes(tsa_certificate)
        self.intermediates = tuple(bytes(c) for c in intermediates)
        parsed, _ = der_decoder.decode(self.tsa_certificate, asn1Spec=rfc5280.Certificate())
        self._parsed_certs = [parsed] + [
            der_decoder.decode(c, asn1Spec=rfc5280.Certificate())[0] for c in self.intermediates
        ]
        tbs = parsed["tbsCertificate"]
        self._issuer_and_serial = rfc5652.IssuerAndSerialNumber()
        self._issuer_and_serial["issuer"] = tbs["issuer"]
        self._issuer_and_serial["serialNumber"] = tbs["serialNumber"]
        self._ess_attribute = self._signing_certificate_v2(tbs)
        self._template = _Template(self)

    def _signing_certificate_v2(self, tbs: rfc5280.TBSCertificate) -> bytes:
        """The DER of the ``signingCertificateV2`` attribute value (RFC 5035, SHA-256 default)."""
        cert_id = rfc5035.ESSCertIDv2()
        cert_id["certHash"] = hashlib.sha256(self.tsa_certificate).digest()
        issuer_name = rfc5280.GeneralName()
        issuer_name["directoryName"]["rdnSequence"] = tbs["issuer"]["rdnSequence"]
        cert_id["issuerSerial"]["issuer"].append(issuer_name)
        cert_id["issuerSerial"]["serialNumber"] = tbs["serialNumber"]
        value = rfc5035.SigningCertificateV2()
        value["certs"].append(cert_id)
        return bytes(der_encoder.encode(value))


def _attribute(oid: univ.ObjectIdentifier | str, value_der: bytes) -> rfc5652.Attribute:
    attr = rfc5652.Attribute()
    attr["attrType"] = univ.ObjectIdentifier(str(oid))
    attr["attrValues"].append(univ.Any(value_der))
    return attr


def _signed_attributes(tst_info_der: bytes, chain: SigningChain) -> list[rfc5652.Attribute]:
    content_type = der_encoder.encode(univ.ObjectIdentifier(ID_CT_TSTINFO))
    message_digest = der_encoder.encode(univ.OctetString(hashlib.sha256(tst_info_der).digest()))
    return [
        _attribute(rfc5652.id_contentType, content_type),
        _attribute(rfc5652.id_messageDigest, message_digest),
        _attribute(rfc5035.id_aa_signingCertificateV2, chain._ess_attribute),
    ]


def signed_attributes(tst_info_der: bytes, chain: SigningChain) -> bytes:
    """The bytes a signer signs for this ``TSTInfo``: the DER ``SET OF Attribute`` (contentType,
    messageDigest, signingCertificateV2). Deterministic, so a co-signer can recompute them."""
    return chain._template.signed_attributes(tst_info_der)


def reference_signed_attributes(tst_info_der: bytes, chain: SigningChain) -> bytes:
    """:func:`signed_attributes` encoded by pyasn1 from the schema (the tests hold both equal)."""
    attrs = rfc5652.SignedAttributes()
    for attr in _signed_attributes(tst_info_der, chain):
        attrs.append(attr)
    return bytes(der_encoder.encode(attrs))


def _algorithm(oid: str, *, null: bool) -> rfc5280.AlgorithmIdentifier:
    alg = rfc5280.AlgorithmIdentifier()
    alg["algorithm"] = univ.ObjectIdentifier(oid)
    if null:
        alg["parameters"] = univ.Any(b"\x05\x00")
    return alg


def build_token(tst_info_der: bytes, chain: SigningChain, signature: bytes, *, include_certs: bool) -> bytes:
    """The DER ``TimeStampToken`` (``ContentInfo`` of a ``SignedData``) carrying ``tst_info_der``
    and ``signature`` over :func:`signed_attributes`; certificates embedded if ``include_certs``."""
    return chain._template.token(tst_info_der, signature, include_certs=include_certs)


def reference_build_token(
    tst_info_der: bytes, chain: SigningChain, signature: bytes, *, include_certs: bool
) -> bytes:
    """:func:`build_token` encoded by pyasn1 from the schema (the tests hold both equal)."""
    signed = rfc5652.SignedData()
    signed["version"] = 3
    signed["digestAlgorithms"].append(_algorithm(SHA256_OID, null=False))
    signed["encapContentInfo"]["eContentType"] = univ.ObjectIdentifier(ID_CT_TSTINFO)
    signed["encapContentInfo"]["eContent"] = tst_info_der
    if include_certs:
        certs = signed["certificates"]
        for parsed in chain._parsed_certs:
            choice = rfc5652.CertificateChoices()
            choice["certificate"] = parsed
            certs.append(choice)
    info = rfc5652.SignerInfo()
    info["version"] = 1
    info["sid"]["issuerAndSerialNumber"] = chain._issuer_and_serial
    info["digestAlgorithm"] = _algorithm(SHA256_OID, null=False)
    for attr in _signed_attributes(tst_info_der, chain):
        info["signedAttrs"].append(attr)
    info["signatureAlgorithm"] = _algorithm(ECDSA_WITH_SHA256, null=False)
    info["signature"] = signature
    signed["signerInfos"].append(info)
    content = rfc5652.ContentInfo()
    content["contentType"] = univ.ObjectIdentifier(ID_SIGNED_DATA)
    content["content"] = der_encoder.encode(signed)
    return bytes(der_encoder.encode(content))


def _tlv(tag: int, content: bytes) -> bytes:
    """One DER tag-length-value (definite length, minimal length octets)."""
    size = len(content)
    if size < 0x80:
        return bytes((tag, size)) + content
    octets = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(octets))) + octets + content


_VERSION_1: Final = b"\x02\x01\x01"
_TRUE: Final = b"\x01\x01\xff"
#: AlgorithmIdentifier of each imprint hash, without parameters and with NULL ones.
_ALGORITHM: Final = {oid: bytes(der_encoder.encode(_algorithm(oid, null=False))) for oid in HASHES}
_ALGORITHM_NULL: Final = {oid: bytes(der_encoder.encode(_algorithm(oid, null=True))) for oid in HASHES}


class _Template:
    """The token of a chain with its constant parts encoded once by pyasn1 (certificates, signer
    identifier, algorithms, two of the three signed attributes): a token is then these bytes
    around the ``TSTInfo``, its digest and the signature. pyasn1 re-encoding the certificates
    and attributes for every token made that 0.55 ms of a 1.25 ms token; the tests check that
    both give the same bytes (:func:`reference_build_token`, :func:`reference_signed_attributes`)."""

    def __init__(self, chain: SigningChain) -> None:
        encode = der_encoder.encode
        content_type = encode(univ.ObjectIdentifier(ID_CT_TSTINFO))
        self.content_type_attr = bytes(encode(_attribute(rfc5652.id_contentType, content_type)))
        self.ess_attr = bytes(encode(_attribute(rfc5035.id_aa_signingCertificateV2, chain._ess_attribute)))
        digest_attr = bytes(encode(_attribute(rfc5652.id_messageDigest, encode(univ.OctetString(bytes(32))))))
        self.digest_attr_prefix = digest_attr[:-32]  # the digest is the attribute's last 32 bytes
        # SET OF: DER orders the elements by their encodings
        certs = sorted(bytes(encode(c)) for c in chain._parsed_certs)
        self.certificates = _tlv(0xA0, b"".join(certs))
        self.signed_data_head = bytes(encode(univ.Integer(3))) + _tlv(
            0x31, bytes(encode(_algorithm(SHA256_OID, null=False)))
        )
        self.econtent_type = content_type
        self.signer_head = (
            bytes(encode(univ.Integer(1)))
            + bytes(encode(chain._issuer_and_serial))
            + bytes(encode(_algorithm(SHA256_OID, null=False)))
        )
        self.signature_algorithm = bytes(encode(_algorithm(ECDSA_WITH_SHA256, null=False)))
        self.content_type_signed_data = bytes(encode(univ.ObjectIdentifier(ID_SIGNED_DATA)))

    def attributes(self, tst_info_der: bytes) -> bytes:
        digest_attr = self.digest_attr_prefix + hashlib.sha256(tst_info_der).digest()
        return b"".join(sorted((self.content_type_attr, digest_attr, self.ess_attr)))

    def signed_attributes(self, tst_info_der: bytes) -> bytes:
        return _tlv(0x31, self.attributes(tst_info_der))

    def token(self, tst_info_der: bytes, signature: bytes, *, include_certs: bool) -> bytes:
        signer_info = _tlv(
            0x30,
            self.signer_head
            + _tlv(0xA0, self.attributes(tst_info_der))  # [0] IMPLICIT SET OF Attribute
            + self.signature_algorithm
            + _tlv(0x04, signature),
        )
        encap = _tlv(0x30, self.econtent_type + _tlv(0xA0, _tlv(0x04, tst_info_der)))
        signed_data = _tlv(
            0x30,
            self.signed_data_head
            + encap
            + (self.certificates if include_certs else b"")
            + _tlv(0x31, signer_info),
        )
        return _tlv(0x30, self.content_type_signed_data + _tlv(0xA0, signed_data))


def sign_token(tst_info_der: bytes, chain: SigningChain, sign: Signer, *, include_certs: bool) -> bytes:
    """Sign ``tst_info_der`` with ``sign`` and return the token (see :func:`build_token`)."""
    return build_token(
        tst_info_der, chain, sign(signed_attributes(tst_info_der, chain)), include_certs=include_certs
    )


# --- the response ------------------------------------------------------------------------------


def granted_response(token: bytes) -> bytes:
    """A ``TimeStampResp`` with status granted and ``token`` (a DER ``ContentInfo``)."""
    return _tlv(0x30, _GRANTED_STATUS + token)


#: ``PKIStatusInfo { status granted }``
_GRANTED_STATUS: Final = b"\x30\x03\x02\x01\x00"


def reference_granted_response(token: bytes) -> bytes:
    """:func:`granted_response` encoded by pyasn1 from the schema (the tests hold both equal)."""
    resp = rfc3161.TimeStampResp()
    resp["status"]["status"] = int(Status.GRANTED)
    token_value, _ = der_decoder.decode(token, asn1Spec=rfc3161.TimeStampToken())
    resp["timeStampToken"] = token_value
    return bytes(der_encoder.encode(resp))


def rejection_response(failure: FailureInfo, text: str) -> bytes:
    """A ``TimeStampResp`` with status rejection, ``text`` as the status string and ``failure``."""
    resp = rfc3161.TimeStampResp()
    status = resp["status"]
    status["status"] = int(Status.REJECTION)
    status["statusString"].append(text)
    bits = [0] * (int(failure) + 1)
    bits[int(failure)] = 1
    status["failInfo"] = rfc3161.PKIFailureInfo(tuple(bits))
    return bytes(der_encoder.encode(resp))


@dataclass(frozen=True)
class TimeStampResponse:
    """A decoded ``TimeStampResp``: the token's raw DER and its ``TSTInfo`` when granted."""

    status: Status
    text: str | None
    failures: frozenset[FailureInfo]
    token: bytes | None
    tst_info: bytes | None


def decode_response(data: bytes) -> TimeStampResponse:
    """Decode a ``TimeStampResp`` (the signature is not checked: use ``openssl ts -verify``)."""
    try:
        resp, rest = der_decoder.decode(bytes(data), asn1Spec=rfc3161.TimeStampResp())
        if rest:
            raise TokenDecodeError(f"{len(rest)} bytes after the TimeStampResp")
        status_info = resp["status"]
        status = Status(int(status_info["status"]))
        text = (
            "\n".join(str(s) for s in status_info["statusString"])
            if status_info["statusString"].isValue
            else None
        )
        failures: set[FailureInfo] = set()
        if status_info["failInfo"].isValue:
            for bit, value in enumerate(status_info["failInfo"]):
                if value:
                    failures.add(FailureInfo(bit))
        token = tst = None
        if resp["timeStampToken"].isValue:
            token_value = resp["timeStampToken"]
            token = bytes(der_encoder.encode(token_value))
            if str(token_value["contentType"]) != ID_SIGNED_DATA:
                raise TokenDecodeError("token is not a SignedData")
            signed, _ = der_decoder.decode(bytes(token_value["content"]), asn1Spec=rfc5652.SignedData())
            encap = signed["encapContentInfo"]
            if str(encap["eContentType"]) != ID_CT_TSTINFO:
                raise TokenDecodeError("token content is not a TSTInfo")
            tst = bytes(encap["eContent"])
        return TimeStampResponse(status, text, frozenset(failures), token, tst)
    except TokenDecodeError:
        raise
    except (PyAsn1Error, ValueError, TypeError, IndexError, KeyError, RecursionError) as exc:
        raise TokenDecodeError(f"not a DER TimeStampResp ({type(exc).__name__}: {exc})") from None

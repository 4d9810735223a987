"""FROST(Ed25519, SHA-512): two-round threshold Schnorr signatures per RFC 9591.

Theory of operation
-------------------
The group signing key ``s`` is Shamir-shared among servers 1..n (our DKG hands
each server its share ``s_i = f(i)`` and everyone the group public key
``PK = s*B`` and the verification shares ``PK_i = s_i*B``). Any ``min_signers``
(= t+1 in the repo's convention, t = tolerated corruptions) servers sign:

* **Round one** (RFC 9591 §5.1, :func:`commit`): each signer draws a hiding and a
  binding nonce with ``nonce_generate`` (§4.1: ``H3(random_32_bytes ||
  SerializeScalar(s_i))``, hedging against a weak RNG) and publishes the
  commitments ``D_i = d_i*B`` and ``E_i = e_i*B``. Commitments may be
  precomputed in batches (:class:`NoncePool`); each nonce pair is usable once.
* **Round two** (§5.2, :func:`sign`): given the message and the commitment list
  (sorted by identifier, encoded as in §4.3), every signer derives the binding
  factors ``rho_i = H1(PK || H4(msg) || H5(commitment_list) || i)`` (§4.4), the
  group commitment ``R = sum(D_i + rho_i*E_i)`` (§4.5), the challenge
  ``c = H2(R || PK || msg)`` (§4.6, plain SHA-512 as in RFC 8032) and its
  Lagrange coefficient ``lambda_i`` (§4.2), and returns the share
  ``z_i = d_i + e_i*rho_i + lambda_i*s_i*c``. The nonces are wiped.
* **Aggregation** (§5.3, :func:`aggregate`): ``z = sum(z_i)``; ``(R, z)``
  encoded as ``R || z`` (32 + 32 bytes, little-endian z) is a standard RFC 8032
  Ed25519 signature under ``PK``.
* **Identifiable abort** (§5.4, :func:`verify_signature_share`,
  :func:`aggregate_and_identify`): a share is correct iff
  ``z_i*B == D_i + rho_i*E_i + (c*lambda_i)*PK_i``; a wrong one raises
  :class:`~appliance.crypto.errors.CheatingError` naming the signer.

Ciphersuite (§6.1): contextString ``"FROST-ED25519-SHA512-v1"``; H1, H3 are
SHA-512 over contextString || "rho"/"nonce" || m read little-endian mod L; H2 is
SHA-512(m) mod L without a prefix (RFC 8032 compatibility); H4, H5 are SHA-512
over contextString || "msg"/"com" || m. Test vectors: RFC 9591 Appendix E.1; the
trusted dealer of Appendix C is only used by the tests.

Everything here is a pure function of its arguments: randomness is passed in as
bytes (callers use ``os.urandom``), nothing does I/O. Elements are 32-byte
canonical encodings (see :mod:`appliance.crypto.groups.ed25519`); every element
that crosses a trust boundary is validated once, when the object holding it is
constructed (prime-order subgroup, not the identity), and never decoded again.
Scalars are Python ints mod L. Python cannot really erase an int from memory:
"wiping" a nonce drops our references to it, which is the best we can do.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NoReturn

import gmpy2
from nacl import bindings as _sodium
from nacl import exceptions as _nacl_exc

from appliance.crypto.errors import CheatingError, CryptoError, DecodeError, ParameterError
from appliance.crypto.groups.ed25519 import ED25519, L

__all__ = [
    "COMMITMENT_SIZE",
    "CONTEXT_STRING",
    "NONCE_RANDOMNESS_SIZE",
    "SIGNATURE_SHARE_SIZE",
    "SIGNATURE_SIZE",
    "KeyPackage",
    "NoncePool",
    "NonceReuseError",
    "PublicKeyPackage",
    "SignatureShare",
    "SigningCommitment",
    "SigningNonces",
    "aggregate",
    "aggregate_and_identify",
    "commit",
    "compute_binding_factors",
    "compute_challenge",
    "compute_group_commitment",
    "decode_group_commitment_list",
    "decode_signature",
    "derive_interpolating_value",
    "encode_group_commitment_list",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "nonce_generate",
    "sign",
    "verify_signature",
    "verify_signature_share",
    "verify_signature_shares",
]

G = ED25519
CONTEXT_STRING = b"FROST-ED25519-SHA512-v1"
#: Fresh randomness per nonce (RFC 9591 §4.1); a commitment needs two of these.
NONCE_RANDOMNESS_SIZE = 32
SCALAR_SIZE = 32
ELEMENT_SIZE = 32
#: SerializeScalar(identifier) || SerializeElement(D) || SerializeElement(E).
COMMITMENT_SIZE = SCALAR_SIZE + 2 * ELEMENT_SIZE
#: SerializeScalar(identifier) || SerializeScalar(z_i).
SIGNATURE_SHARE_SIZE = 2 * SCALAR_SIZE
#: SerializeElement(R) || SerializeScalar(z): an RFC 8032 Ed25519 signature.
SIGNATURE_SIZE = ELEMENT_SIZE + SCALAR_SIZE

_IDENTITY = G.identity()


class NonceReuseError(CryptoError):
    """A nonce pair was asked for a second time: refused, as reuse leaks the key share."""


# ---------------------------------------------------------------------------
# Ciphersuite hashes (RFC 9591 §6.1)


def _reduce(digest: bytes) -> int:
    return int.from_bytes(digest, "little") % L


def h1(m: bytes) -> int:
    """H1: binding factor hash, SHA-512(contextString || "rho" || m) mod L."""
    return _reduce(hashlib.sha512(CONTEXT_STRING + b"rho" + m).digest())


def h2(m: bytes) -> int:
    """H2: challenge hash, SHA-512(m) mod L (no domain separation, for RFC 8032)."""
    return _reduce(hashlib.sha512(m).digest())


def h3(m: bytes) -> int:
    """H3: nonce hash, SHA-512(contextString || "nonce" || m) mod L."""
    return _reduce(hashlib.sha512(CONTEXT_STRING + b"nonce" + m).digest())


def h4(m: bytes) -> bytes:
    """H4: message hash, SHA-512(contextString || "msg" || m)."""
    return hashlib.sha512(CONTEXT_STRING + b"msg" + m).digest()


def h5(m: bytes) -> bytes:
    """H5: commitment list hash, SHA-512(contextString || "com" || m)."""
    return hashlib.sha512(CONTEXT_STRING + b"com" + m).digest()


# ---------------------------------------------------------------------------
# Small helpers


def _scalar_bytes(k: int) -> bytes:
    return k.to_bytes(SCALAR_SIZE, "little")


def _check_identifier(identifier: int, what: str) -> None:
    if not isinstance(identifier, int) or isinstance(identifier, bool):
        raise ParameterError(f"{what}: identifier must be an int")
    if not 0 < identifier < L:
        raise ParameterError(f"{what}: identifier {identifier} is not a nonzero scalar")


def _check_scalar(value: int, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ParameterError(f"{what} must be an int")
    if not 0 <= value < L:
        raise ParameterError(f"{what} is not reduced modulo the group order")


def _check_element(data: bytes, what: str) -> bytes:
    try:
        return G.decode(data)
    except DecodeError as exc:
        raise DecodeError(f"{what}: {exc}") from None


def _decode_scalar(data: bytes, what: str) -> int:
    try:
        return G.decode_scalar(data)
    except DecodeError as exc:
        raise DecodeError(f"{what}: {exc}") from None


def _decode_identifier(data: bytes, what: str) -> int:
    identifier = _decode_scalar(data, f"{what} identifier")
    if identifier == 0:
        raise DecodeError(f"{what} identifier: zero is not a valid identifier")
    return identifier


def _as_bytes(data: object, what: str) -> bytes:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError(f"{what}: expected bytes, got {type(data).__name__}")
    return bytes(data)


def _add(a: bytes, b: bytes) -> bytes:
    return G.add(a, b)


def _mul(k: int, a: bytes) -> bytes:
    return G.mul(k, a)


# ---------------------------------------------------------------------------
# Keys (from the DKG, or the RFC's trusted dealer in tests)


@dataclass(frozen=True)
class KeyPackage:
    """What signer ``identifier`` holds: its secret share s_i, PK and min_signers (= t+1).

    ``secret_share`` never appears in ``repr``.
    """

    identifier: int
    secret_share: int = field(repr=False)
    group_public_key: bytes
    min_signers: int

    def __post_init__(self) -> None:
        _check_identifier(self.identifier, "key package")
        _check_scalar(self.secret_share, "key package: secret share")
        object.__setattr__(
            self, "group_public_key", _check_element(self.group_public_key, "key package: group public key")
        )
        if not isinstance(self.min_signers, int) or self.min_signers < 1:
            raise ParameterError("key package: min_signers must be a positive int")

    def verification_share(self) -> bytes:
        """PK_i = s_i * B, this signer's public verification share."""
        return G.mul_base(self.secret_share)


@dataclass(frozen=True)
class PublicKeyPackage:
    """The group info every coordinator holds: PK, {i: PK_i} and min_signers (= t+1)."""

    group_public_key: bytes
    verification_shares: Mapping[int, bytes]
    min_signers: int

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "group_public_key",
            _check_element(self.group_public_key, "public key package: group public key"),
        )
        shares: dict[int, bytes] = {}
        for i, pk_i in self.verification_shares.items():
            _check_identifier(i, "public key package")
            shares[i] = _check_element(pk_i, f"public key package: verification share of {i}")
        object.__setattr__(self, "verification_shares", shares)
        if not isinstance(self.min_signers, int) or not 1 <= self.min_signers <= max(len(shares), 1):
            raise ParameterError("public key package: need 1 <= min_signers <= number of signers")

    def __hash__(self) -> int:
        return hash(
            (self.group_public_key, tuple(sorted(self.verification_shares.items())), self.min_signers)
        )


# ---------------------------------------------------------------------------
# Round one: nonces and commitments (RFC 9591 §4.1, §5.1)


def nonce_generate(secret: int, random_bytes: bytes) -> int:
    """RFC 9591 §4.1: H3(random_bytes || SerializeScalar(secret)); ``random_bytes`` is 32 fresh bytes."""
    if len(random_bytes) != NONCE_RANDOMNESS_SIZE:
        raise ParameterError(
            f"nonce_generate: need {NONCE_RANDOMNESS_SIZE} random bytes, got {len(random_bytes)}"
        )
    return h3(bytes(random_bytes) + _scalar_bytes(secret % L))


@dataclass(frozen=True)
class SigningCommitment:
    """Round-one output of signer ``identifier``: hiding D_i and binding E_i nonce commitments.

    Construction validates both elements (prime-order subgroup, not the identity),
    so a commitment object is always safe to use. Wire format (96 bytes):
    ``SerializeScalar(identifier) || D_i || E_i``, as one entry of RFC 9591 §4.3.
    """

    identifier: int
    hiding: bytes
    binding: bytes

    def __post_init__(self) -> None:
        _check_identifier(self.identifier, "signing commitment")
        object.__setattr__(
            self, "hiding", _check_element(self.hiding, "signing commitment: hiding commitment")
        )
        object.__setattr__(
            self, "binding", _check_element(self.binding, "signing commitment: binding commitment")
        )

    @classmethod
    def _ours(cls, identifier: int, hiding: bytes, binding: bytes) -> SigningCommitment:
        """A commitment we just computed as nonce * G: valid by construction, not re-checked."""
        obj = object.__new__(cls)
        object.__setattr__(obj, "identifier", identifier)
        object.__setattr__(obj, "hiding", hiding)
        object.__setattr__(obj, "binding", binding)
        return obj

    def to_bytes(self) -> bytes:
        return _scalar_bytes(self.identifier) + self.hiding + self.binding

    @staticmethod
    def identifier_of(data: bytes) -> int:
        """The signer named by a commitment's wire form, with its length checked but not its
        elements: for a stock of commitments that :meth:`from_bytes` checks when one is used."""
        data = _as_bytes(data, "signing commitment")
        if len(data) != COMMITMENT_SIZE:
            raise DecodeError(f"signing commitment: expected {COMMITMENT_SIZE} bytes, got {len(data)}")
        return _decode_identifier(data[:SCALAR_SIZE], "signing commitment")

    @classmethod
    def from_bytes(cls, data: bytes) -> SigningCommitment:
        data = _as_bytes(data, "signing commitment")
        if len(data) != COMMITMENT_SIZE:
            raise DecodeError(f"signing commitment: expected {COMMITMENT_SIZE} bytes, got {len(data)}")
        identifier = _decode_identifier(data[:SCALAR_SIZE], "signing commitment")
        return cls(
            identifier, data[SCALAR_SIZE : SCALAR_SIZE + ELEMENT_SIZE], data[SCALAR_SIZE + ELEMENT_SIZE :]
        )


class SigningNonces:
    """A signer's secret nonce pair (d_i, e_i) with its public commitment; usable exactly once.

    :func:`sign` consumes it: the scalars are dropped and any later use raises
    :class:`NonceReuseError`. The scalars never appear in ``repr``; copying and
    pickling are refused so that a pair cannot be duplicated by accident.
    """

    __slots__ = ("_binding", "_hiding", "_used", "commitment")

    def __init__(self, hiding_nonce: int, binding_nonce: int, commitment: SigningCommitment) -> None:
        _check_scalar(hiding_nonce, "hiding nonce")
        _check_scalar(binding_nonce, "binding nonce")
        self._hiding = hiding_nonce
        self._binding = binding_nonce
        self._used = False
        self.commitment = commitment

    @property
    def identifier(self) -> int:
        return self.commitment.identifier

    @property
    def used(self) -> bool:
        return self._used

    def _consume(self) -> tuple[int, int]:
        """Hand the nonces out once, then wipe them."""
        if self._used:
            raise NonceReuseError(f"signer {self.identifier}: signing nonces already used")
        nonces = (self._hiding, self._binding)
        self.wipe()
        return nonces

    def wipe(self) -> None:
        """Forget the nonces without signing (e.g. the signing session was aborted)."""
        self._hiding = 0
        self._binding = 0
        self._used = True

    def __repr__(self) -> str:
        state = "used" if self._used else "fresh"
        return f"SigningNonces(identifier={self.identifier}, {state}, commitment={self.commitment!r})"

    def __copy__(self) -> NoReturn:
        raise TypeError("SigningNonces cannot be copied: a nonce pair is usable once")

    def __deepcopy__(self, memo: object) -> NoReturn:
        raise TypeError("SigningNonces cannot be copied: a nonce pair is usable once")

    def __reduce__(self) -> NoReturn:
        raise TypeError("SigningNonces cannot be pickled: a nonce pair is usable once")


def commit(key: KeyPackage, randomness: bytes) -> SigningNonces:
    """RFC 9591 §5.1 commit(): ``randomness`` is 64 fresh bytes (hiding || binding nonce randomness).

    Returns the secret nonces; publish ``nonces.commitment``.
    """
    if len(randomness) != 2 * NONCE_RANDOMNESS_SIZE:
        raise ParameterError(f"commit: need {2 * NONCE_RANDOMNESS_SIZE} random bytes, got {len(randomness)}")
    hiding = nonce_generate(key.secret_share, randomness[:NONCE_RANDOMNESS_SIZE])
    binding = nonce_generate(key.secret_share, randomness[NONCE_RANDOMNESS_SIZE:])
    commitment = SigningCommitment._ours(key.identifier, G.mul_base(hiding), G.mul_base(binding))
    return SigningNonces(hiding, binding, commitment)


class NoncePool:
    """A batch of preprocessed nonce pairs of one signer, each handed out at most once.

    Publish :meth:`commitments` ahead of time; when a signing request names one of
    them, :meth:`take` removes and returns the matching nonces (a second take of
    the same commitment raises :class:`NonceReuseError`).
    """

    __slots__ = ("_nonces", "identifier")

    def __init__(self, identifier: int, nonces: Iterable[SigningNonces] = ()) -> None:
        _check_identifier(identifier, "nonce pool")
        self.identifier = identifier
        self._nonces: dict[SigningCommitment, SigningNonces] = {}
        for n in nonces:
            self.add(n)

    @classmethod
    def generate(cls, key: KeyPackage, randomness: bytes) -> NoncePool:
        """len(randomness) // 64 fresh nonce pairs; ``randomness`` is a multiple of 64 random bytes."""
        step = 2 * NONCE_RANDOMNESS_SIZE
        if not randomness or len(randomness) % step:
            raise ParameterError(f"nonce pool: randomness must be a non-empty multiple of {step} bytes")
        return cls(
            key.identifier, (commit(key, randomness[i : i + step]) for i in range(0, len(randomness), step))
        )

    def add(self, nonces: SigningNonces) -> None:
        if nonces.identifier != self.identifier:
            raise ParameterError(f"nonce pool of {self.identifier}: nonces belong to {nonces.identifier}")
        if nonces.used:
            raise NonceReuseError(f"nonce pool of {self.identifier}: nonces already used")
        if nonces.commitment in self._nonces:
            raise NonceReuseError(f"nonce pool of {self.identifier}: duplicate commitment")
        self._nonces[nonces.commitment] = nonces

    def commitments(self) -> list[SigningCommitment]:
        """The still unused commitments, oldest first."""
        return list(self._nonces)

    def take(self, commitment: SigningCommitment) -> SigningNonces:
        """Remove and return the nonces committed to by ``commitment``."""
        try:
            return self._nonces.pop(commitment)
        except KeyError:
            raise NonceReuseError(
                f"nonce pool of {self.identifier}: commitment unknown or already used"
            ) from None

    def pop(self) -> SigningNonces:
        """Remove and return the oldest unused nonces."""
        if not self._nonces:
            raise NonceReuseError(f"nonce pool of {self.identifier}: empty")
        return self._nonces.pop(next(iter(self._nonces)))

    def wipe(self) -> None:
        for n in self._nonces.values():
            n.wipe()
        self._nonces.clear()

    def __len__(self) -> int:
        return len(self._nonces)

    def __iter__(self) -> Iterator[SigningCommitment]:
        return iter(list(self._nonces))

    def __repr__(self) -> str:
        return f"NoncePool(identifier={self.identifier}, unused={len(self._nonces)})"


# ---------------------------------------------------------------------------
# Helper functions (RFC 9591 §4.2-§4.6)


def derive_interpolating_value(identifiers: Sequence[int], identifier: int) -> int:
    """RFC 9591 §4.2: lambda_i = prod x_j / prod (x_j - x_i) over the other x_j, mod L."""
    if identifier not in identifiers:
        raise ParameterError(f"interpolating value: {identifier} is not in the participant list")
    if len(set(identifiers)) != len(identifiers):
        raise ParameterError("interpolating value: duplicate identifiers")
    num, den = 1, 1
    for x_j in identifiers:
        if x_j == identifier:
            continue
        num = num * x_j % L
        den = den * (x_j - identifier) % L
    return num * int(gmpy2.invert(den, L)) % L


def _sorted_commitments(commitment_list: Iterable[SigningCommitment]) -> tuple[SigningCommitment, ...]:
    """The commitment list in ascending identifier order (RFC 9591 §4.3); duplicates refused."""
    given = tuple(commitment_list)
    if not given:
        raise ParameterError("empty commitment list")
    for c in given:
        if not isinstance(c, SigningCommitment):
            raise ParameterError("commitment list: entries must be SigningCommitment")
    commitments = tuple(sorted(given, key=lambda c: c.identifier))
    for a, b in itertools.pairwise(commitments):
        if a.identifier == b.identifier:
            raise ParameterError(f"commitment list: identifier {a.identifier} appears twice")
    return commitments


def encode_group_commitment_list(commitment_list: Iterable[SigningCommitment]) -> bytes:
    """RFC 9591 §4.3 encode_group_commitment_list (sorted by identifier first)."""
    return b"".join(c.to_bytes() for c in _sorted_commitments(commitment_list))


def decode_group_commitment_list(data: bytes) -> list[SigningCommitment]:
    """Inverse of :func:`encode_group_commitment_list`: strictly ascending identifiers required."""
    data = _as_bytes(data, "commitment list")
    if not data or len(data) % COMMITMENT_SIZE:
        raise DecodeError(
            f"commitment list: length {len(data)} is not a positive multiple of {COMMITMENT_SIZE}"
        )
    out: list[SigningCommitment] = []
    for k in range(0, len(data), COMMITMENT_SIZE):
        try:
            c = SigningCommitment.from_bytes(data[k : k + COMMITMENT_SIZE])
        except DecodeError as exc:
            raise DecodeError(f"commitment list entry {k // COMMITMENT_SIZE}: {exc}") from None
        if out and c.identifier <= out[-1].identifier:
            raise DecodeError("commitment list: identifiers not in strictly ascending order")
        out.append(c)
    return out


def _binding_factors(
    group_public_key: bytes, commitments: Sequence[SigningCommitment], msg: bytes
) -> dict[int, int]:
    prefix = group_public_key + h4(msg) + h5(b"".join(c.to_bytes() for c in commitments))
    return {c.identifier: h1(prefix + _scalar_bytes(c.identifier)) for c in commitments}


def compute_binding_factors(
    group_public_key: bytes, commitment_list: Iterable[SigningCommitment], msg: bytes
) -> dict[int, int]:
    """RFC 9591 §4.4: {i: H1(PK || H4(msg) || H5(encoded list) || SerializeScalar(i))}."""
    return _binding_factors(group_public_key, _sorted_commitments(commitment_list), msg)


def _commitment_shares(
    commitments: Sequence[SigningCommitment], binding_factors: Mapping[int, int]
) -> dict[int, bytes]:
    """{i: D_i + rho_i * E_i}: the per-signer terms of the group commitment."""
    shares = {}
    for c in commitments:
        rho = binding_factors[c.identifier]
        shares[c.identifier] = _add(c.hiding, _mul(rho, c.binding))
    return shares


def _sum(elements: Iterable[bytes]) -> bytes:
    acc = _IDENTITY
    for e in elements:
        acc = _add(acc, e)
    return acc


def compute_group_commitment(
    commitment_list: Iterable[SigningCommitment], binding_factors: Mapping[int, int]
) -> bytes:
    """RFC 9591 §4.5: R = sum(D_i + rho_i * E_i); the identity is refused (SerializeElement fails)."""
    commitments = _sorted_commitments(commitment_list)
    for c in commitments:
        if c.identifier not in binding_factors:
            raise ParameterError(f"group commitment: no binding factor for {c.identifier}")
    r = _sum(_commitment_shares(commitments, binding_factors).values())
    if r == _IDENTITY:
        raise ParameterError("group commitment is the identity element")
    return r


def compute_challenge(group_commitment: bytes, group_public_key: bytes, msg: bytes) -> int:
    """RFC 9591 §4.6: c = H2(SerializeElement(R) || SerializeElement(PK) || msg)."""
    return h2(group_commitment + group_public_key + msg)


@dataclass(frozen=True)
class _Session:
    """Everything a signing session derives from (PK, commitment list, msg), computed once."""

    commitments: tuple[SigningCommitment, ...]
    binding_factors: dict[int, int]
    commitment_shares: dict[int, bytes]
    group_commitment: bytes
    challenge: int

    @property
    def identifiers(self) -> list[int]:
        return [c.identifier for c in self.commitments]


def _session(group_public_key: bytes, commitment_list: Iterable[SigningCommitment], msg: bytes) -> _Session:
    commitments = _sorted_commitments(commitment_list)
    rho = _binding_factors(group_public_key, commitments, msg)
    shares = _commitment_shares(commitments, rho)
    r = _sum(shares.values())
    if r == _IDENTITY:
        raise ParameterError("group commitment is the identity element")
    return _Session(commitments, rho, shares, r, compute_challenge(r, group_public_key, msg))


# ---------------------------------------------------------------------------
# Round two: signature shares (RFC 9591 §5.2)


@dataclass(frozen=True)
class SignatureShare:
    """z_i of signer ``identifier``; wire format ``SerializeScalar(i) || SerializeScalar(z_i)``.

    The identifier inside is a claim: the coordinator must check it against the
    authenticated sender before blaming anybody.
    """

    identifier: int
    share: int

    def __post_init__(self) -> None:
        _check_identifier(self.identifier, "signature share")
        _check_scalar(self.share, "signature share")

    def to_bytes(self) -> bytes:
        return _scalar_bytes(self.identifier) + _scalar_bytes(self.share)

    @classmethod
    def from_bytes(cls, data: bytes) -> SignatureShare:
        data = _as_bytes(data, "signature share")
        if len(data) != SIGNATURE_SHARE_SIZE:
            raise DecodeError(f"signature share: expected {SIGNATURE_SHARE_SIZE} bytes, got {len(data)}")
        identifier = _decode_identifier(data[:SCALAR_SIZE], "signature share")
        return cls(identifier, _decode_scalar(data[SCALAR_SIZE:], "signature share value"))


def _check_min_signers(commitments: Sequence[SigningCommitment], min_signers: int) -> None:
    if len(commitments) < min_signers:
        raise ParameterError(f"{len(commitments)} signers, but at least {min_signers} are needed")


def sign(
    key: KeyPackage, nonces: SigningNonces, msg: bytes, commitment_list: Iterable[SigningCommitment]
) -> SignatureShare:
    """RFC 9591 §5.2 sign(): this signer's share z_i; ``nonces`` are consumed (wiped) on success.

    Checks first (without consuming the nonces) that the list holds at least
    ``min_signers`` distinct signers and contains exactly this signer's own
    commitment from round one.
    """
    commitments = _sorted_commitments(commitment_list)
    _check_min_signers(commitments, key.min_signers)
    if nonces.identifier != key.identifier:
        raise ParameterError(f"signer {key.identifier}: nonces belong to signer {nonces.identifier}")
    own = next((c for c in commitments if c.identifier == key.identifier), None)
    if own is None:
        raise ParameterError(f"signer {key.identifier} is not in the commitment list")
    if own != nonces.commitment:
        raise ParameterError(f"signer {key.identifier}: the commitment list does not hold our commitment")
    if nonces.used:
        raise NonceReuseError(f"signer {key.identifier}: signing nonces already used")
    session = _session(key.group_public_key, commitments, msg)
    lam = derive_interpolating_value(session.identifiers, key.identifier)
    hiding, binding = nonces._consume()
    rho = session.binding_factors[key.identifier]
    z = (hiding + binding * rho + lam * key.secret_share % L * session.challenge) % L
    return SignatureShare(key.identifier, z)


# ---------------------------------------------------------------------------
# Aggregation and identifiable abort (RFC 9591 §5.3, §5.4)


def _shares_by_id(session: _Session, sig_shares: Iterable[SignatureShare]) -> dict[int, SignatureShare]:
    by_id: dict[int, SignatureShare] = {}
    for s in sig_shares:
        if s.identifier in by_id:
            raise ParameterError(f"two signature shares from {s.identifier}")
        by_id[s.identifier] = s
    expected = set(session.identifiers)
    if set(by_id) != expected:
        missing = sorted(expected - set(by_id))
        extra = sorted(set(by_id) - expected)
        raise ParameterError(
            f"signature shares do not match the signers (missing {missing}, unexpected {extra})"
        )
    return by_id


def _encode_signature(r: bytes, z: int) -> bytes:
    return r + _scalar_bytes(z)


def aggregate(
    commitment_list: Iterable[SigningCommitment],
    msg: bytes,
    group_public_key: bytes,
    sig_shares: Iterable[SignatureShare],
) -> bytes:
    """RFC 9591 §5.3 aggregate(): the 64-byte Ed25519 signature R || z (not verified here).

    Exactly one share per signer in the commitment list is required.
    """
    group_public_key = _check_element(group_public_key, "aggregate: group public key")
    session = _session(group_public_key, commitment_list, msg)
    by_id = _shares_by_id(session, sig_shares)
    z = sum(s.share for s in by_id.values()) % L
    return _encode_signature(session.group_commitment, z)


def _share_is_valid(session: _Session, share: SignatureShare, public_key_i: bytes) -> bool:
    lam = derive_interpolating_value(session.identifiers, share.identifier)
    lhs = G.mul_base(share.share)
    rhs = _add(session.commitment_shares[share.identifier], _mul(session.challenge * lam % L, public_key_i))
    return lhs == rhs


def verify_signature_share(
    share: SignatureShare,
    public_key_i: bytes,
    commitment_list: Iterable[SigningCommitment],
    group_public_key: bytes,
    msg: bytes,
) -> None:
    """RFC 9591 §5.3 verify_signature_share(); raises CheatingError(party=share.identifier) if wrong.

    ``public_key_i`` is the signer's verification share PK_i; its commitment comes
    from the list. To check many shares of one session, :func:`verify_signature_shares`
    shares the session computation.
    """
    public_key_i = _check_element(public_key_i, f"verification share of {share.identifier}")
    group_public_key = _check_element(group_public_key, "group public key")
    session = _session(group_public_key, commitment_list, msg)
    if share.identifier not in session.binding_factors:
        raise ParameterError(f"signature share from {share.identifier}, who is not in the commitment list")
    if not _share_is_valid(session, share, public_key_i):
        raise CheatingError(share.identifier, "invalid FROST signature share")


def _culprits(session: _Session, public: PublicKeyPackage, by_id: Mapping[int, SignatureShare]) -> list[int]:
    return [
        i
        for i in session.identifiers
        if not _share_is_valid(session, by_id[i], public.verification_shares[i])
    ]


def _raise_culprits(culprits: Sequence[int]) -> None:
    if culprits:
        others = f" (also invalid: {list(culprits[1:])})" if len(culprits) > 1 else ""
        raise CheatingError(culprits[0], f"invalid FROST signature share{others}")


def _session_for(
    public: PublicKeyPackage, commitment_list: Iterable[SigningCommitment], msg: bytes
) -> _Session:
    session = _session(public.group_public_key, commitment_list, msg)
    _check_min_signers(session.commitments, public.min_signers)
    unknown = [i for i in session.identifiers if i not in public.verification_shares]
    if unknown:
        raise ParameterError(f"signers {unknown} have no verification share")
    return session


def verify_signature_shares(
    public: PublicKeyPackage,
    commitment_list: Iterable[SigningCommitment],
    msg: bytes,
    sig_shares: Iterable[SignatureShare],
) -> None:
    """Check every share (sharing one session computation); CheatingError names the lowest bad signer."""
    session = _session_for(public, commitment_list, msg)
    _raise_culprits(_culprits(session, public, _shares_by_id(session, sig_shares)))


def aggregate_and_identify(
    public: PublicKeyPackage,
    commitment_list: Iterable[SigningCommitment],
    msg: bytes,
    sig_shares: Iterable[SignatureShare],
) -> bytes:
    """Aggregate, verify the signature, and on failure find the cheater (RFC 9591 §5.3-§5.4).

    Returns the verified 64-byte signature, or raises CheatingError naming the
    lowest identifier whose share is invalid (others are listed in the reason).
    """
    session = _session_for(public, commitment_list, msg)
    by_id = _shares_by_id(session, sig_shares)
    z = sum(s.share for s in by_id.values()) % L
    signature = _encode_signature(session.group_commitment, z)
    if verify_signature(public.group_public_key, msg, signature):
        return signature
    _raise_culprits(_culprits(session, public, by_id))
    # Every share checks out yet the signature does not: inconsistent group info.
    raise ParameterError(
        "aggregate signature invalid although every share verifies: inconsistent key package"
    )


# ---------------------------------------------------------------------------
# Final signatures (RFC 8032 §5.1.6 encoding, §5.1.7 verification)


def decode_signature(data: bytes) -> tuple[bytes, int]:
    """(R, z) from a 64-byte FROST signature; R must be a subgroup element other than the identity."""
    data = _as_bytes(data, "signature")
    if len(data) != SIGNATURE_SIZE:
        raise DecodeError(f"signature: expected {SIGNATURE_SIZE} bytes, got {len(data)}")
    r = _check_element(data[:ELEMENT_SIZE], "signature R")
    z = _decode_scalar(data[ELEMENT_SIZE:], "signature z")
    return r, z


def verify_signature(group_public_key: bytes, msg: bytes, signature: bytes) -> bool:
    """Ed25519 verification (RFC 8032 §5.1.7) of ``signature`` under ``group_public_key``.

    Uses libsodium, which also refuses non-canonical z and small-order R or
    public keys; for the prime-order-subgroup R and PK that FROST produces this is
    equivalent to the cofactored check [8][z]B = [8]R + [8][c]PK of RFC 9591 §6.1.
    """
    if len(signature) != SIGNATURE_SIZE or len(group_public_key) != ELEMENT_SIZE:
        return False
    try:
        _sodium.crypto_sign_open(bytes(signature) + bytes(msg), bytes(group_public_key))
    except (_nacl_exc.BadSignatureError, _nacl_exc.ValueError, _nacl_exc.TypeError):
        return False
    return True

"""The order-q subgroup of Z_p^* for FIPS 186-4 DSA domain parameters, on gmpy2.

Written additively like every :class:`~appliance.crypto.groups._base.Group`:
``add`` is multiplication modulo p, ``neg`` is the inverse modulo p and
``mul(k, a)`` is ``a^k mod p``. Elements are ``gmpy2.mpz`` values in [1, p);
scalars are ints modulo q.

Domain parameters are generated and validated as FIPS 186-4 specifies:
probable primes p, q from a seed with SHA-256 (Appendix A.1.1.2, validated by
A.1.1.3) and a verifiable canonical generator g with an index (A.2.3, validated
by A.2.4). :data:`DSA2048` uses one (L, N) = (2048, 256) parameter set generated
once with these routines and stored, with its seed, counter and index, in
:mod:`appliance.crypto.groups._dsa_params`.

Elements encode as fixed-length big-endian integers (``element_size`` = byte
length of p). ``decode`` accepts only canonical encodings of subgroup elements
other than the identity: 1 < x < p and x^q = 1 (mod p).

gmpy2 arithmetic is not constant-time (GMP's powmod and Python-level windows
branch and index tables on secret exponent bits); this is a documented
limitation of the appliance's software DSS backend.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import gmpy2
from cryptography.hazmat.primitives.asymmetric import dsa as _crypto_dsa
from gmpy2 import mpz

from appliance.crypto.errors import DecodeError, ParameterError
from appliance.crypto.groups import _dsa_params as _dp
from appliance.crypto.groups._base import Group

#: The (L, N) pairs FIPS 186-4 §4.2 allows.
APPROVED_SIZES: frozenset[tuple[int, int]] = frozenset({(1024, 160), (2048, 224), (2048, 256), (3072, 256)})

#: Miller-Rabin rounds for (p, q) per FIPS 186-4 Table C.1 (M-R tests only, no Lucas test).
_MR_ROUNDS: dict[tuple[int, int], tuple[int, int]] = {
    (1024, 160): (40, 40),
    (2048, 224): (56, 56),
    (2048, 256): (56, 64),
    (3072, 256): (64, 64),
}

_OUTLEN = 256  # SHA-256
_GGEN = b"ggen"  # 0x6767656E, FIPS 186-4 A.2.3 step 7

#: Element type: gmpy2 has no type stubs, so an mpz is ``Any`` to mypy.
DSAElement = Any


def _hash(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _is_probable_prime(x: int, rounds: int) -> bool:
    return bool(gmpy2.is_prime(mpz(x), rounds))


@dataclass(frozen=True)
class DSADomainParameters:
    """p, q, g and the FIPS 186-4 generation record (seed, counter, index) that lets anyone verify them."""

    p: int
    q: int
    g: int
    domain_parameter_seed: bytes | None = None
    counter: int | None = None
    index: int | None = None

    @property
    def L(self) -> int:
        return self.p.bit_length()

    @property
    def N(self) -> int:
        return self.q.bit_length()


# FIPS 186-4 Appendix A.1.1.2 / A.1.1.3 -----------------------------------------


def _q_from_seed(seed: bytes, n_bits: int) -> mpz:
    """Steps 6-7 of A.1.1.2: q = 2^(N-1) + U + 1 - (U mod 2), U = Hash(seed) mod 2^(N-1)."""
    u = int.from_bytes(_hash(seed), "big") % (1 << (n_bits - 1))
    return mpz((1 << (n_bits - 1)) + u + 1 - (u % 2))


def _p_candidate(seed_int: int, seedlen: int, offset: int, q: int, l_bits: int) -> mpz:
    """Steps 11.1-11.5 of A.1.1.2 for one value of offset."""
    n = -(-l_bits // _OUTLEN) - 1
    b = l_bits - 1 - n * _OUTLEN
    mask = (1 << seedlen) - 1
    nbytes = seedlen // 8
    w = 0
    for j in range(n + 1):
        v = int.from_bytes(_hash(((seed_int + offset + j) & mask).to_bytes(nbytes, "big")), "big")
        if j == n:
            v %= 1 << b
        w += v << (j * _OUTLEN)
    x = w + (1 << (l_bits - 1))
    c = x % (2 * q)
    return mpz(x - (c - 1))


def _check_sizes(l_bits: int, n_bits: int) -> None:
    if (l_bits, n_bits) not in APPROVED_SIZES:
        raise ParameterError(f"DSA: (L, N) = ({l_bits}, {n_bits}) is not a FIPS 186-4 size")


def generate_pq(
    l_bits: int = 2048,
    n_bits: int = 256,
    seedlen: int | None = None,
    rand: Callable[[int], bytes] = os.urandom,
) -> tuple[int, int, bytes, int]:
    """FIPS 186-4 A.1.1.2 with SHA-256: returns (p, q, domain_parameter_seed, counter).

    ``seedlen`` (bits, a multiple of 8, at least N) defaults to N. ``rand(nbytes)``
    supplies each fresh seed (step 5); pass a deterministic source to make the
    generation reproducible.
    """
    _check_sizes(l_bits, n_bits)
    seedlen = n_bits if seedlen is None else seedlen
    if seedlen < n_bits or seedlen % 8:
        raise ParameterError(f"DSA: seedlen {seedlen} must be a multiple of 8 and at least N = {n_bits}")
    p_rounds, q_rounds = _MR_ROUNDS[(l_bits, n_bits)]
    n = -(-l_bits // _OUTLEN) - 1
    while True:
        seed = rand(seedlen // 8)  # step 5
        if len(seed) != seedlen // 8:
            raise ValueError("DSA: rand returned the wrong number of bytes")
        q = _q_from_seed(seed, n_bits)
        if not _is_probable_prime(q, q_rounds):  # steps 8-9
            continue
        seed_int = int.from_bytes(seed, "big")
        offset = 1
        for counter in range(4 * l_bits):  # step 11
            p = _p_candidate(seed_int, seedlen, offset, q, l_bits)
            if p >= 1 << (l_bits - 1) and _is_probable_prime(p, p_rounds):
                return int(p), int(q), seed, counter
            offset += n + 1


def validate_pq(p: int, q: int, domain_parameter_seed: bytes, counter: int) -> None:
    """FIPS 186-4 A.1.1.3 (SHA-256): regenerate p and q from the seed; raise ParameterError if invalid."""
    l_bits, n_bits = p.bit_length(), q.bit_length()
    _check_sizes(l_bits, n_bits)  # steps 1-2
    if not 0 <= counter <= 4 * l_bits - 1:  # step 3
        raise ParameterError(f"DSA: counter {counter} out of range")
    seedlen = 8 * len(domain_parameter_seed)  # step 4
    if seedlen < n_bits:  # step 5
        raise ParameterError("DSA: domain_parameter_seed shorter than N")
    p_rounds, q_rounds = _MR_ROUNDS[(l_bits, n_bits)]
    computed_q = _q_from_seed(domain_parameter_seed, n_bits)  # steps 6-7
    if computed_q != q or not _is_probable_prime(computed_q, q_rounds):  # step 8
        raise ParameterError("DSA: q does not match the seed or is not prime")
    n = -(-l_bits // _OUTLEN) - 1  # step 9
    seed_int = int.from_bytes(domain_parameter_seed, "big")
    offset = 1  # step 10
    found: int | None = None
    computed_p = mpz(0)
    for i in range(counter + 1):  # step 11
        computed_p = _p_candidate(seed_int, seedlen, offset, q, l_bits)
        if computed_p >= 1 << (l_bits - 1) and _is_probable_prime(computed_p, p_rounds):
            found = i
            break
        offset += n + 1
    if found != counter or computed_p != p:  # step 12
        raise ParameterError("DSA: p does not match the seed and counter")


# FIPS 186-4 Appendix A.2.3 / A.2.4 ---------------------------------------------


def _canonical_g(p: int, q: int, domain_parameter_seed: bytes, index: int) -> int:
    if not 0 <= index <= 255:  # step 1
        raise ParameterError(f"DSA: index {index} is not an 8-bit value")
    e = mpz((p - 1) // q)  # step 3
    mp = mpz(p)
    for count in range(1, 1 << 16):  # steps 4-6 (count is a 16-bit counter; 0 means exhausted)
        u = domain_parameter_seed + _GGEN + bytes([index]) + count.to_bytes(2, "big")  # step 7
        w = mpz(int.from_bytes(_hash(u), "big"))  # step 8
        g = gmpy2.powmod(w, e, mp)  # step 9
        if g >= 2:  # step 10
            return int(g)
    raise ParameterError("DSA: canonical generator search exhausted count")  # pragma: no cover


def generate_g(p: int, q: int, domain_parameter_seed: bytes, index: int = 1) -> int:
    """FIPS 186-4 A.2.3: the verifiable canonical generator g for (p, q, seed, index)."""
    return _canonical_g(p, q, domain_parameter_seed, index)


def validate_g(p: int, q: int, g: int, domain_parameter_seed: bytes, index: int) -> None:
    """FIPS 186-4 A.2.4: raise ParameterError unless g is the canonical generator for the index."""
    if not 0 <= index <= 255:  # step 1
        raise ParameterError(f"DSA: index {index} is not an 8-bit value")
    if not 2 <= g <= p - 1:  # step 2
        raise ParameterError("DSA: g out of range")
    if gmpy2.powmod(g, q, p) != 1:  # step 3
        raise ParameterError("DSA: g does not have order q")
    if _canonical_g(p, q, domain_parameter_seed, index) != g:  # steps 4-13
        raise ParameterError("DSA: g is not the canonical generator for this seed and index")


def generate_domain_parameters(
    l_bits: int = 2048,
    n_bits: int = 256,
    index: int = 1,
    rand: Callable[[int], bytes] = os.urandom,
) -> DSADomainParameters:
    """p, q by A.1.1.2 and g by A.2.3, with the record needed to validate them."""
    p, q, seed, counter = generate_pq(l_bits, n_bits, rand=rand)
    g = generate_g(p, q, seed, index)
    return DSADomainParameters(p, q, g, seed, counter, index)


def check_domain_parameters(params: DSADomainParameters) -> None:
    """The cheap structural checks: FIPS sizes, q | p-1, 1 < g < p and g^q = 1 (no primality tests)."""
    p, q, g = params.p, params.q, params.g
    _check_sizes(p.bit_length(), q.bit_length())
    if (p - 1) % q:
        raise ParameterError("DSA: q does not divide p - 1")
    if not 1 < g < p:
        raise ParameterError("DSA: g out of range")
    if gmpy2.powmod(g, q, p) != 1:
        raise ParameterError("DSA: g does not have order q")


def validate_domain_parameters(params: DSADomainParameters) -> None:
    """Full validation: structural checks, primality (Table C.1 rounds), A.1.1.3 and A.2.4.

    Raises ParameterError. Without a generation record (seed, counter, index) only
    the structural and primality checks can be made, and that is an error too:
    such parameters cannot be shown to be free of a trapdoor.
    """
    check_domain_parameters(params)
    p_rounds, q_rounds = _MR_ROUNDS[(params.L, params.N)]
    if not _is_probable_prime(params.q, q_rounds):
        raise ParameterError("DSA: q is not prime")
    if not _is_probable_prime(params.p, p_rounds):
        raise ParameterError("DSA: p is not prime")
    seed, counter, index = params.domain_parameter_seed, params.counter, params.index
    if seed is None or counter is None or index is None:
        raise ParameterError("DSA: no generation record (seed, counter, index) to validate against")
    validate_pq(params.p, params.q, seed, counter)
    validate_g(params.p, params.q, params.g, seed, index)


# The group ------------------------------------------------------------------------

_BASE_WINDOW = 6  # fixed-base table: ceil(N/6) windows x 63 powers of g
_MULTI_WINDOW = 4  # simultaneous multi-exponentiation: 4-bit fixed windows


def digest_to_int(digest: bytes, n_bits: int) -> int:
    """The leftmost min(N, outlen) bits of a digest as an integer (FIPS 186-4 §6.4, SEC1 4.1.3 step 5)."""
    z = int.from_bytes(digest, "big")
    outlen = 8 * len(digest)
    if outlen > n_bits:
        z >>= outlen - n_bits
    return z


class DSAGroup(Group[DSAElement]):
    """The order-q subgroup of Z_p^* generated by g."""

    def __init__(self, params: DSADomainParameters, name: str | None = None) -> None:
        check_domain_parameters(params)
        self.params = params
        self.p = mpz(params.p)
        self.q = mpz(params.q)
        self.g = mpz(params.g)
        self.order = params.q
        self.name = name or f"dsa-{params.L}-{params.N}"
        self.element_size = (params.L + 7) // 8
        self.scalar_size = (params.N + 7) // 8
        self._one = mpz(1)
        self._base_table: list[list[mpz]] | None = None

    def generator(self) -> DSAElement:
        return self.g

    def identity(self) -> DSAElement:
        return self._one

    def add(self, a: DSAElement, b: DSAElement) -> DSAElement:
        return a * b % self.p

    def neg(self, a: DSAElement) -> DSAElement:
        return gmpy2.invert(a, self.p)

    def mul(self, k: int, a: DSAElement) -> DSAElement:
        k %= self.order
        if a == self.g:
            return self.mul_base(k)
        return gmpy2.powmod(a, k, self.p)

    def _table(self) -> list[list[mpz]]:
        if self._base_table is None:
            p, w = self.p, _BASE_WINDOW
            table: list[list[mpz]] = []
            base = self.g
            for _ in range(-(-self.params.N // w)):
                row = [self._one, base]
                for _ in range((1 << w) - 2):
                    row.append(row[-1] * base % p)
                table.append(row)
                base = row[-1] * base % p
            self._base_table = table
        return self._base_table

    def mul_base(self, k: int) -> DSAElement:
        """g^k from a table of g^(d * 2^(6i)): one multiplication per 6-bit window."""
        k = int(k % self.order)
        p, w, mask = self.p, _BASE_WINDOW, (1 << _BASE_WINDOW) - 1
        acc = self._one
        for row in self._table():
            if not k:
                break
            d = k & mask
            if d:
                acc = acc * row[d] % p
            k >>= w
        return acc

    def multi_mul(self, scalars: Sequence[int], elements: Sequence[DSAElement]) -> DSAElement:
        """prod P_i^(k_i): powers of g from the fixed-base table, the rest by simultaneous
        4-bit fixed-window exponentiation (one shared chain of squarings)."""
        if len(scalars) != len(elements):
            raise ValueError("multi_mul: scalars and elements differ in length")
        base_k = 0
        ks: list[int] = []
        es: list[DSAElement] = []
        for k, e in zip(scalars, elements, strict=True):
            if e == self.g:
                base_k += k
            elif e != 1:
                ks.append(k)
                es.append(e)
        acc = self.mul_base(base_k)
        if len(ks) == 1:
            return self.add(acc, gmpy2.powmod(es[0], ks[0] % self.order, self.p))
        if ks:
            acc = self.add(acc, self._simultaneous(ks, es))
        return acc

    def _simultaneous(self, scalars: Sequence[int], elements: Sequence[DSAElement]) -> DSAElement:
        p, w = self.p, _MULTI_WINDOW
        mask = (1 << w) - 1
        ks = [int(k % self.order) for k in scalars]
        tables: list[list[mpz]] = []
        for e in elements:
            row = [self._one, mpz(e)]
            for _ in range((1 << w) - 2):
                row.append(row[-1] * e % p)
            tables.append(row)
        top = max((k.bit_length() for k in ks), default=0)
        acc = self._one
        for shift in range(((top + w - 1) // w - 1) * w, -1, -w):
            if acc != 1:
                for _ in range(w):
                    acc = acc * acc % p
            for k, row in zip(ks, tables, strict=True):
                d = (k >> shift) & mask
                if d:
                    acc = acc * row[d] % p
        return acc

    def encode(self, a: DSAElement) -> bytes:
        return int(a).to_bytes(self.element_size, "big")

    def decode(self, data: bytes) -> DSAElement:
        if not isinstance(data, (bytes, bytearray)):
            raise DecodeError(f"{self.name} element: expected bytes")
        if len(data) != self.element_size:
            raise DecodeError(f"{self.name} element: expected {self.element_size} bytes, got {len(data)}")
        x = mpz(int.from_bytes(data, "big"))
        if x == 1:
            raise DecodeError(f"{self.name} element: the identity")
        if x <= 1 or x >= self.p:
            raise DecodeError(f"{self.name} element: not in [2, p - 1]")
        if gmpy2.powmod(x, self.q, self.p) != 1:
            raise DecodeError(f"{self.name} element: not in the order-q subgroup")
        return x

    def hash_to_element(self, dst: bytes, msg: bytes) -> DSAElement:
        """W^((p-1)/q) mod p for W hashed from (p, q, dst, msg, count), in the manner of FIPS 186-4 A.2.3.

        W is L bits of SHA-256 output (counter mode) so that it covers Z_p; count is
        incremented until the result is not 1. Anyone can recompute the derivation,
        and nobody knows its discrete log to the base g.
        """
        h = hashlib.sha256()
        for part in (b"pst/dsa/hash_to_element", self.encode(self.p), self.encode(self.q), dst, msg):
            h.update(len(part).to_bytes(8, "big"))
            h.update(part)
        prefix = h.digest()
        e = (self.p - 1) // self.q
        blocks = -(-self.params.L // _OUTLEN)
        for count in range(1, 1 << 16):
            wide = b"".join(
                _hash(prefix + _GGEN + count.to_bytes(2, "big") + j.to_bytes(2, "big")) for j in range(blocks)
            )
            w = mpz(int.from_bytes(wide, "big") >> (blocks * _OUTLEN - self.params.L)) % self.p
            h_elem = gmpy2.powmod(w, e, self.p)
            if h_elem >= 2:
                return h_elem
        raise ValueError("hash_to_element: count exhausted")  # pragma: no cover

    def dss_conversion(self, a: DSAElement) -> int:
        """r = (R mod p) mod q."""
        return int(a) % self.order

    def digest_to_scalar(self, digest: bytes) -> int:
        """z from H(m): the leftmost min(N, outlen) bits of the digest (FIPS 186-4 §4.6), reduced mod q."""
        return digest_to_int(digest, self.params.N) % self.order

    def is_identity(self, a: DSAElement) -> bool:
        return bool(a == 1)

    # Interop -------------------------------------------------------------------

    def parameter_numbers(self) -> _crypto_dsa.DSAParameterNumbers:
        return _crypto_dsa.DSAParameterNumbers(self.params.p, self.params.q, self.params.g)

    def public_key(self, y: DSAElement) -> _crypto_dsa.DSAPublicKey:
        """A ``cryptography`` DSA public key for y = g^x, to verify signatures with OpenSSL."""
        return _crypto_dsa.DSAPublicNumbers(int(y), self.parameter_numbers()).public_key()


#: FIPS 186-4 (2048, 256) group of :mod:`appliance.crypto.groups._dsa_params`.
DSA2048 = DSAGroup(
    DSADomainParameters(_dp.P, _dp.Q, _dp.G, _dp.DOMAIN_PARAMETER_SEED, _dp.COUNTER, _dp.INDEX),
    name="dsa2048",
)

"""NIST P-256 (secp256r1, SEC2 §2.4.2) on gmpy2 arithmetic.

Why our own arithmetic: ``cryptography`` (OpenSSL) signs and verifies ECDSA but
exposes no point addition or scalar multiplication of arbitrary points, and the
threshold protocols (Feldman/Pedersen commitments, DKG, refresh, threshold DSS)
need exactly those. So points are added here, on gmpy2 ``mpz`` integers, with
Jacobian coordinates internally (a = -3 doubling, mixed Jacobian-affine
addition), width-5 wNAF for variable-base multiplication, interleaved wNAF for
:meth:`P256Group.multi_mul` and signed fixed-window tables (10-bit) for the
generator and for other fixed bases that :meth:`P256Group.precompute` names.
Signatures produced with these operations are verified with ``cryptography``/OpenSSL
in the tests.

This arithmetic is NOT constant-time: it branches and indexes tables on secret
scalar digits, and GMP itself is variable-time. That is a documented limitation
of the appliance's software P-256 backend (timing side channels are out of
scope for it).

Elements are affine :class:`P256Point` values; the identity (point at infinity)
is ``P256Point(0, 0)``, which is not on the curve since b != 0. Encoding is SEC1
compressed form (33 bytes, 0x02/0x03 || x), the one canonical form: ``decode``
rejects the uncompressed and hybrid forms, x >= p, x with no point on the curve
and the identity. The identity encodes (for internal use only) as 33 zero bytes
so that encodings keep a fixed length. P-256 has cofactor 1, so every point on
the curve is in the prime-order group. A second form, SEC1 uncompressed
(:meth:`P256Group.encode_wide`), is used where many points are decoded (the threshold DSS
dealings): it costs twice the bytes and no square root, and ``decode_wide`` accepts it
alone, with the same checks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import gmpy2
from cryptography.hazmat.primitives.asymmetric import ec as _crypto_ec
from gmpy2 import mpz

from appliance.crypto.errors import DecodeError
from appliance.crypto.groups._base import Group

P = mpz(2**256 - 2**224 + 2**192 + 2**96 - 1)
N = mpz(0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551)
B = mpz(0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B)
GX = mpz(0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296)
GY = mpz(0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5)
_SQRT_EXP = (P + 1) // 4  # p = 3 mod 4

_WNAF = 5  # variable base: odd multiples P, 3P, ..., 15P
_BASE_W = 10  # G and heavily used bases: signed 10-bit windows, 512 multiples per window
_FIXED_W = 8  # other fixed bases: signed 8-bit windows, 128 multiples per window
_MAX_FIXED = 16


class P256Point(NamedTuple):
    """An affine point; ``P256Point(0, 0)`` is the point at infinity."""

    x: Any
    y: Any


INFINITY = P256Point(mpz(0), mpz(0))
G = P256Point(GX, GY)

_Jac = tuple[Any, Any, Any]  # (X, Y, Z) with x = X/Z^2, y = Y/Z^3; Z = 0 is infinity
_JINF: _Jac = (mpz(1), mpz(1), mpz(0))


def _on_curve(x: Any, y: Any) -> bool:
    return bool((y * y - (x * x * x - 3 * x + B)) % P == 0)


def _jdouble(X1: Any, Y1: Any, Z1: Any, times: int = 1) -> _Jac:
    """``times`` successive doublings, dbl-2001-b (a = -3); infinity (Z = 0) stays infinity."""
    if not Z1 or not Y1:
        return _JINF
    p = P
    x, y, z = X1, Y1, Z1
    for _ in range(times):
        delta = z * z  # reduced below, inside alpha
        gamma = y * y % p
        beta = x * gamma  # reduced below, inside x and y
        alpha = 3 * (x - delta) * (x + delta) % p
        x = (alpha * alpha - 8 * beta) % p
        z = 2 * y * z % p
        y = (alpha * (4 * beta - x) - 8 * gamma * gamma) % p
    return x, y, z


def _jadd_affine(X1: Any, Y1: Any, Z1: Any, x2: Any, y2: Any) -> _Jac:
    """(X1:Y1:Z1) + (x2, y2) with (x2, y2) affine and not infinity."""
    if not Z1:
        return x2, y2, mpz(1)
    p = P
    z1z1 = Z1 * Z1 % p
    h = (x2 * z1z1 - X1) % p
    r = (y2 * Z1 * z1z1 - Y1) % p
    if not h:
        if not r:
            return _jdouble(X1, Y1, Z1)
        return _JINF
    hh = h * h % p
    hhh = h * hh % p
    v = X1 * hh % p
    X3 = (r * r - hhh - 2 * v) % p
    Y3 = (r * (v - X3) - Y1 * hhh) % p
    Z3 = Z1 * h % p
    return X3, Y3, Z3


def _to_affine(j: _Jac) -> P256Point:
    X, Y, Z = j
    if not Z:
        return INFINITY
    zi = gmpy2.invert(Z, P)
    zi2 = zi * zi % P
    return P256Point(X * zi2 % P, Y * zi2 * zi % P)


def _batch_to_affine(points: Sequence[_Jac]) -> list[P256Point]:
    """Montgomery's trick: one inversion for all (no point may be infinity)."""
    prefix = [mpz(1)]
    for _, _, z in points:
        prefix.append(prefix[-1] * z % P)
    inv = gmpy2.invert(prefix[-1], P)
    out: list[P256Point] = [INFINITY] * len(points)
    for i in range(len(points) - 1, -1, -1):
        X, Y, Z = points[i]
        zi = inv * prefix[i] % P
        inv = inv * Z % P
        zi2 = zi * zi % P
        out[i] = P256Point(X * zi2 % P, Y * zi2 * zi % P)
    return out


def _wnaf(k: int, w: int) -> list[int]:
    """Width-w NAF digits, least significant first."""
    digits: list[int] = []
    half, full = 1 << (w - 1), 1 << w
    while k:
        if k & 1:
            d = k & (full - 1)
            if d >= half:
                d -= full
            k -= d
        else:
            d = 0
        digits.append(d)
        k >>= 1
    return digits


def _odd_multiples(a: P256Point, count: int) -> list[P256Point]:
    """[a, 3a, 5a, ..., (2 count - 1) a] in affine form."""
    two = _to_affine(_jdouble(a.x, a.y, mpz(1)))
    jac: list[_Jac] = [(a.x, a.y, mpz(1))]
    for _ in range(count - 1):
        jac.append(_jadd_affine(*jac[-1], two.x, two.y))
    if any(not z for _, _, z in jac):  # pragma: no cover - impossible in a group of prime order > 15
        raise ArithmeticError("P-256: small multiple hit infinity")
    return _batch_to_affine(jac)


def _odd_multiples_many(points: Sequence[P256Point], count: int) -> list[list[P256Point]]:
    """:func:`_odd_multiples` of every point, with two field inversions in all (Montgomery)."""
    twos = _batch_to_affine([_jdouble(a.x, a.y, mpz(1)) for a in points])
    jac: list[_Jac] = []
    for a, two in zip(points, twos, strict=True):
        run: _Jac = (a.x, a.y, mpz(1))
        jac.append(run)
        for _ in range(count - 1):
            run = _jadd_affine(*run, two.x, two.y)
            jac.append(run)
    if any(not z for _, _, z in jac):  # pragma: no cover - impossible in a group of prime order > 15
        raise ArithmeticError("P-256: small multiple hit infinity")
    flat = _batch_to_affine(jac)
    return [flat[i : i + count] for i in range(0, len(flat), count)]


def _fixed_table(base: P256Point, w: int) -> list[list[P256Point]]:
    """Row i holds j * 2^(wi) * base for j = 1..2^(w-1) (w = 8: about 4,200 affine points)."""
    rows: list[list[P256Point]] = []
    half = 1 << (w - 1)
    for _ in range(-(-257 // w)):
        jac: list[_Jac] = [(base.x, base.y, mpz(1))]
        for _ in range(half - 1):
            jac.append(_jadd_affine(*jac[-1], base.x, base.y))
        row = _batch_to_affine(jac)
        rows.append(row)
        # next base = 2^w * base = 2 * (2^(w-1) * base)
        last = row[-1]
        base = _to_affine(_jdouble(last.x, last.y, mpz(1)))
    return rows


def _fixed_mul(table: list[list[P256Point]], k: int, acc: _Jac) -> _Jac:
    """acc + k * base (0 < k < N) from ``base``'s table: signed w-bit windows, additions only."""
    half = len(table[0])
    w = half.bit_length()
    full, mask = 1 << w, (1 << w) - 1
    p = P
    X, Y, Z = acc
    for row in table:
        if not k:
            break
        d = k & mask
        k >>= w
        if d > half:
            d -= full
            k += 1
        if d > 0:
            t = row[d - 1]
            X, Y, Z = _jadd_affine(X, Y, Z, t.x, t.y)
        elif d < 0:
            t = row[-d - 1]
            X, Y, Z = _jadd_affine(X, Y, Z, t.x, p - t.y)
    return X, Y, Z


def digest_to_int(digest: bytes, n_bits: int) -> int:
    """The leftmost min(N, outlen) bits of a digest as an integer (SEC1 4.1.3 step 5, FIPS 186-4 §6.4)."""
    z = int.from_bytes(digest, "big")
    outlen = 8 * len(digest)
    if outlen > n_bits:
        z >>= outlen - n_bits
    return z


class P256Group(Group[P256Point]):
    name = "p256"
    order = int(N)
    element_size = 33
    scalar_size = 32

    def __init__(self) -> None:
        self._base_table: list[list[P256Point]] | None = None
        #: Fixed-base tables of other points that protocols multiply often (the Pedersen H).
        self._fixed: dict[P256Point, list[list[P256Point]]] = {}

    def precompute(self, a: P256Point, *, heavy: bool = False) -> None:
        """Build a fixed-base table for ``a`` (as for G): later ``mul``/``multi_mul`` by ``a`` use it.

        For public points multiplied very often (a server's verification share in the
        period's DSS proofs): 8-bit windows, about 4,200 affine points and some 20 ms to
        build; ``heavy`` (the Pedersen generator H): 10-bit windows like G, about 13,000
        points. The ``_MAX_FIXED`` most recently precomputed points keep theirs (call it
        again to keep a table).
        """
        if a in (INFINITY, G):
            return
        table = self._fixed.pop(a, None)
        if table is None:
            table = _fixed_table(a, _BASE_W if heavy else _FIXED_W)
            while len(self._fixed) >= _MAX_FIXED:
                del self._fixed[next(iter(self._fixed))]  # the least recently precomputed goes
        self._fixed[a] = table

    def generator(self) -> P256Point:
        return G

    def identity(self) -> P256Point:
        return INFINITY

    def is_identity(self, a: P256Point) -> bool:
        return a == INFINITY

    def add(self, a: P256Point, b: P256Point) -> P256Point:
        if a == INFINITY:
            return b
        if b == INFINITY:
            return a
        x1, y1 = a
        x2, y2 = b
        if x1 == x2:
            if (y1 + y2) % P == 0:
                return INFINITY
            lam = 3 * (x1 * x1 - 1) * gmpy2.invert(2 * y1, P) % P
        else:
            lam = (y2 - y1) * gmpy2.invert(x2 - x1, P) % P
        x3 = (lam * lam - x1 - x2) % P
        return P256Point(x3, (lam * (x1 - x3) - y1) % P)

    def neg(self, a: P256Point) -> P256Point:
        if a == INFINITY:
            return a
        return P256Point(a.x, (P - a.y) % P)

    def mul(self, k: int, a: P256Point) -> P256Point:
        k = int(k % N)
        if k == 0 or a == INFINITY:
            return INFINITY
        if a == G:
            return self.mul_base(k)
        fixed = self._fixed.get(a)
        if fixed is not None:
            return _to_affine(_fixed_mul(fixed, k, _JINF))
        table = _odd_multiples(a, 1 << (_WNAF - 2))
        neg_table = [P256Point(t.x, P - t.y) for t in table]
        X, Y, Z = _JINF
        pending = 0  # doublings owed; done in one call per run of zero digits
        for d in reversed(_wnaf(k, _WNAF)):
            pending += 1
            if d:
                X, Y, Z = _jdouble(X, Y, Z, pending)
                pending = 0
                t = table[d >> 1] if d > 0 else neg_table[(-d) >> 1]
                X, Y, Z = _jadd_affine(X, Y, Z, t.x, t.y)
        return _to_affine(_jdouble(X, Y, Z, pending))

    def _table(self) -> list[list[P256Point]]:
        """Row i holds j * 2^(10i) * G for j = 1..512 (built on first use)."""
        if self._base_table is None:
            self._base_table = _fixed_table(G, _BASE_W)
        return self._base_table

    def mul_base(self, k: int) -> P256Point:
        k = int(k % N)
        if k == 0:
            return INFINITY
        return _to_affine(_fixed_mul(self._table(), k, _JINF))

    def multi_mul(self, scalars: Sequence[int], elements: Sequence[P256Point]) -> P256Point:
        """sum k_i P_i: multiples of G from the fixed-base table, the rest by interleaved
        width-5 wNAF (one shared chain of doublings)."""
        if len(scalars) != len(elements):
            raise ValueError("multi_mul: scalars and elements differ in length")
        fixed: dict[P256Point, int] = {}
        terms: list[tuple[int, P256Point]] = []
        for k, e in zip(scalars, elements, strict=True):
            if e == G or e in self._fixed:
                fixed[e] = fixed.get(e, 0) + k
            elif e != INFINITY and k % N:
                terms.append((int(k % N), e))
        acc = self._interleaved(terms) if terms else _JINF
        for e, k in fixed.items():
            k = int(k % N)
            if k:
                acc = _fixed_mul(self._table() if e == G else self._fixed[e], k, acc)
        return _to_affine(acc)

    def _interleaved(self, terms: Sequence[tuple[int, P256Point]]) -> _Jac:
        nafs: list[list[int]] = []
        tables: list[tuple[list[P256Point], list[P256Point]]] = []
        count = 1 << (_WNAF - 2)
        for k, _e in terms:
            nafs.append(_wnaf(k, _WNAF))
        for odd in _odd_multiples_many([e for _, e in terms], count):
            tables.append((odd, [P256Point(q.x, P - q.y) for q in odd]))
        length = max(len(d) for d in nafs)
        for naf in nafs:
            naf.extend([0] * (length - len(naf)))
        X, Y, Z = _JINF
        pending = 0
        for i in range(length - 1, -1, -1):
            pending += 1
            for naf, (pos, neg) in zip(nafs, tables, strict=True):
                d = naf[i]
                if d:
                    if pending:
                        X, Y, Z = _jdouble(X, Y, Z, pending)
                        pending = 0
                    t = pos[d >> 1] if d > 0 else neg[(-d) >> 1]
                    X, Y, Z = _jadd_affine(X, Y, Z, t.x, t.y)
        return _jdouble(X, Y, Z, pending)

    def small_multi_mul_many(
        self, jobs: Sequence[tuple[Sequence[int], Sequence[P256Point]]]
    ) -> list[P256Point]:
        """Each job by binary double-and-add over one shared chain (no tables: the scalars are
        small), all results made affine with one field inversion."""
        out: list[_Jac] = []
        for scalars, points in jobs:
            if len(scalars) != len(points):
                raise ValueError("small_multi_mul_many: scalars and elements differ in length")
            terms = [(int(k), e) for k, e in zip(scalars, points, strict=True) if k and e != INFINITY]
            if any(k < 0 for k, _ in terms):
                raise ValueError("small_multi_mul_many: negative scalar")
            acc: _Jac = _JINF
            top = max((k.bit_length() for k, _ in terms), default=0)
            for bit in range(top - 1, -1, -1):
                acc = _jdouble(*acc)
                for k, e in terms:
                    if k >> bit & 1:
                        acc = _jadd_affine(*acc, e.x, e.y)
            out.append(acc)
        live = [i for i, j in enumerate(out) if j[2]]
        affine = _batch_to_affine([out[i] for i in live]) if live else []
        result = [INFINITY] * len(out)
        for i, a in zip(live, affine, strict=True):
            result[i] = a
        return result

    def encode(self, a: P256Point) -> bytes:
        if a == INFINITY:
            return bytes(33)
        return bytes([2 | (int(a.y) & 1)]) + int(a.x).to_bytes(32, "big")

    def encode_uncompressed(self, a: P256Point) -> bytes:
        """SEC1 uncompressed form (0x04 || x || y), for interop only; ``decode`` rejects it."""
        if a == INFINITY:
            raise ValueError("p256: the identity has no uncompressed encoding")
        return b"\x04" + int(a.x).to_bytes(32, "big") + int(a.y).to_bytes(32, "big")

    def encode_wide(self, a: P256Point) -> bytes:
        """The wide form is SEC1 uncompressed (65 bytes): decoding needs no square root."""
        return self.encode_uncompressed(a)

    def decode_wide(self, data: bytes) -> P256Point:
        """SEC1 uncompressed only (0x04 || x || y), x and y < p, on the curve, not the identity."""
        if not isinstance(data, (bytes, bytearray)):
            raise DecodeError("p256 element (wide): expected bytes")
        if len(data) != 65 or data[0] != 4:
            raise DecodeError("p256 element (wide): expected 65 bytes, SEC1 uncompressed (0x04 || x || y)")
        x = mpz(int.from_bytes(data[1:33], "big"))
        y = mpz(int.from_bytes(data[33:], "big"))
        if x >= P or y >= P:
            raise DecodeError("p256 element (wide): coordinate >= p (non-canonical)")
        if not _on_curve(x, y):
            raise DecodeError("p256 element (wide): not a point of the curve")
        return P256Point(x, y)

    def _lift_x(self, x: Any, odd: int) -> P256Point | None:
        rhs = (x * x * x - 3 * x + B) % P
        y = gmpy2.powmod(rhs, _SQRT_EXP, P)
        if y * y % P != rhs:
            return None
        if (y & 1) != odd:
            if not y:
                return None
            y = P - y
        return P256Point(x, y)

    def decode(self, data: bytes) -> P256Point:
        if not isinstance(data, (bytes, bytearray)):
            raise DecodeError("p256 element: expected bytes")
        if len(data) != 33:
            raise DecodeError(f"p256 element: expected 33 bytes (SEC1 compressed), got {len(data)}")
        prefix = data[0]
        if prefix == 0 and not any(data[1:]):
            raise DecodeError("p256 element: the identity")
        if prefix not in (2, 3):
            raise DecodeError(f"p256 element: prefix {prefix:#04x} is not a compressed point")
        x = mpz(int.from_bytes(data[1:], "big"))
        if x >= P:
            raise DecodeError("p256 element: x >= p (non-canonical)")
        point = self._lift_x(x, prefix & 1)
        if point is None:
            raise DecodeError("p256 element: x is not the abscissa of a curve point")
        return point

    def hash_to_element(self, dst: bytes, msg: bytes) -> P256Point:
        """Try-and-increment: x = SHA-256(len(dst) || dst || msg || ctr) until x lifts; even y.

        Variable-time, which is harmless here: the inputs are public.
        """
        prefix = len(dst).to_bytes(8, "big") + dst + msg
        for ctr in range(1 << 32):
            x = mpz(int.from_bytes(hashlib.sha256(prefix + ctr.to_bytes(4, "big")).digest(), "big"))
            if x >= P:
                continue
            point = self._lift_x(x, 0)
            if point is not None:
                return point
        raise ValueError("hash_to_element: counter exhausted")  # pragma: no cover

    def dss_conversion(self, a: P256Point) -> int:
        """r = x(R) mod n."""
        if a == INFINITY:
            raise ValueError("p256: dss_conversion of the identity")
        return int(a.x) % self.order

    def digest_to_scalar(self, digest: bytes) -> int:
        """e from H(m): the leftmost min(256, outlen) bits (SEC1 4.1.3 step 5), reduced mod n."""
        return digest_to_int(digest, 256) % self.order

    def is_on_curve(self, a: P256Point) -> bool:
        return a != INFINITY and 0 <= a.x < P and 0 <= a.y < P and _on_curve(a.x, a.y)

    # Interop -------------------------------------------------------------------

    def public_key(self, a: P256Point) -> _crypto_ec.EllipticCurvePublicKey:
        """A ``cryptography`` P-256 public key for the point, to verify ECDSA signatures with OpenSSL."""
        return _crypto_ec.EllipticCurvePublicKey.from_encoded_point(
            _crypto_ec.SECP256R1(), self.encode_uncompressed(a)
        )


P256 = P256Group()

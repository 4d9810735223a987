"""Shamir secret sharing over Z_q: polynomials, shares and Lagrange interpolation.

Server ids are 1..n (the evaluation points); the secret is f(0). With a degree-t
polynomial any t+1 shares determine the secret and any t reveal nothing about it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from appliance.crypto.errors import NotEnoughSharesError, ParameterError


def check_parameters(n: int, t: int, *, min_n: Callable[[int], int] | None = None) -> None:
    """Validate n and t: 1 <= t < n (and n >= min_n(t) when given)."""
    if not isinstance(n, int) or not isinstance(t, int):
        raise ParameterError("n and t must be integers")
    if t < 1 or n <= t:
        raise ParameterError(f"need 1 <= t < n, got n={n}, t={t}")
    if min_n is not None and n < min_n(t):
        raise ParameterError(f"n={n} is too small for t={t}: need n >= {min_n(t)}")


def check_ids(ids: Iterable[int], n: int) -> list[int]:
    """Sorted distinct server ids, each in 1..n."""
    given = list(ids)
    out = sorted(set(given))
    if len(out) != len(given):
        raise ParameterError("duplicate server ids")
    for i in out:
        if not 1 <= i <= n:
            raise ParameterError(f"server id {i} outside 1..{n}")
    return out


def random_polynomial(secret: int, degree: int, q: int, rand: Callable[[], int]) -> list[int]:
    """Coefficients [secret, a_1, ..., a_degree]; ``rand()`` returns a uniform scalar mod q."""
    return [secret % q] + [rand() % q for _ in range(degree)]


def evaluate(coefficients: Sequence[int], x: int, q: int) -> int:
    """f(x) mod q by Horner's rule."""
    acc = 0
    for c in reversed(coefficients):
        acc = (acc * x + c) % q
    return acc


def lagrange_coefficient(i: int, ids: Iterable[int], q: int, x: int = 0) -> int:
    """lambda_i(x) for the set ``ids``: sum_i lambda_i(x) f(i) = f(x)."""
    num, den = 1, 1
    for j in ids:
        if j == i:
            continue
        num = num * (x - j) % q
        den = den * (i - j) % q
    if den == 0:
        raise ParameterError("duplicate ids in Lagrange interpolation")
    return num * pow(den, -1, q) % q


def lagrange_coefficients(ids: Sequence[int], q: int, x: int = 0) -> dict[int, int]:
    if len(set(ids)) != len(ids):
        raise ParameterError("duplicate ids in Lagrange interpolation")
    return {i: lagrange_coefficient(i, ids, q, x) for i in ids}


def interpolate(shares: Mapping[int, int], q: int, x: int = 0, *, threshold: int | None = None) -> int:
    """f(x) from points {i: f(i)}; with ``threshold`` t, demand at least t+1 points."""
    if threshold is not None and len(shares) < threshold + 1:
        raise NotEnoughSharesError(f"need {threshold + 1} shares, got {len(shares)}")
    ids = sorted(shares)
    lam = lagrange_coefficients(ids, q, x)
    return sum(lam[i] * shares[i] for i in ids) % q


def split(secret: int, n: int, t: int, q: int, rand: Callable[[], int]) -> dict[int, int]:
    """Shares {i: f(i)} for i in 1..n of a random degree-t polynomial with f(0) = secret."""
    check_parameters(n, t)
    f = random_polynomial(secret, t, q, rand)
    return {i: evaluate(f, i, q) for i in range(1, n + 1)}

"""The prime-order group interface used by VSS, DKG, FROST, DSS and refresh.

Written additively: ``add`` is the group operation, ``mul(k, P)`` is k-fold
addition (an exponentiation in a multiplicative group). ``decode`` accepts only
canonical encodings of elements of the prime-order subgroup other than the
identity, and raises :class:`~appliance.crypto.errors.DecodeError` otherwise.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Iterable, Sequence
from typing import Generic, TypeVar

from appliance.crypto.errors import DecodeError

E = TypeVar("E")


class Group(abc.ABC, Generic[E]):
    """A cyclic group of prime order ``order`` with a fixed generator."""

    #: Short name used in encodings and domain separation, e.g. ``"ed25519"``.
    name: str
    #: The prime order q of the group; scalars live in Z_q.
    order: int
    #: Length in bytes of an encoded element.
    element_size: int
    #: Length in bytes of an encoded scalar.
    scalar_size: int

    @abc.abstractmethod
    def generator(self) -> E: ...

    @abc.abstractmethod
    def identity(self) -> E: ...

    @abc.abstractmethod
    def add(self, a: E, b: E) -> E: ...

    @abc.abstractmethod
    def neg(self, a: E) -> E: ...

    @abc.abstractmethod
    def mul(self, k: int, a: E) -> E:
        """k * a; k is reduced modulo ``order``."""

    @abc.abstractmethod
    def mul_base(self, k: int) -> E:
        """k * generator."""

    @abc.abstractmethod
    def encode(self, a: E) -> bytes:
        """Canonical encoding of an element (the identity included)."""

    @abc.abstractmethod
    def decode(self, data: bytes) -> E:
        """Inverse of :meth:`encode` for non-identity subgroup elements."""

    @abc.abstractmethod
    def hash_to_element(self, dst: bytes, msg: bytes) -> E:
        """A subgroup element (not the identity) derived from ``msg`` whose discrete log nobody knows.

        Used for the second Pedersen generator h. ``dst`` is a domain separation tag.
        """

    def dss_conversion(self, a: E) -> int:
        """The DSS conversion function r = F(R) mod q: (R mod p) mod q for DSA, x(R) mod n for ECDSA."""
        raise NotImplementedError(f"{self.name} is not a DSS group")

    # Generic helpers -----------------------------------------------------

    def hash_to_scalar(self, dst: bytes, *parts: bytes) -> int:
        """A uniform scalar from SHA-512 over length-prefixed parts (Fiat-Shamir challenges).

        Each part is prefixed with its 8-byte length so that no two part lists collide.
        """
        h = hashlib.sha512()
        for item in (dst, *parts):
            h.update(len(item).to_bytes(8, "big"))
            h.update(item)
        wide = h.digest() + hashlib.sha512(b"wide" + h.digest()).digest()
        return int.from_bytes(wide, "big") % self.order

    def sub(self, a: E, b: E) -> E:
        return self.add(a, self.neg(b))

    def sum(self, elements: Iterable[E]) -> E:
        acc = self.identity()
        for e in elements:
            acc = self.add(acc, e)
        return acc

    def encode_wide(self, a: E) -> bytes:
        """A second canonical form for bulk public data that must decode fast (the default: the
        ordinary encoding). :meth:`decode_wide` accepts only this form."""
        return self.encode(a)

    def decode_wide(self, data: bytes) -> E:
        """Inverse of :meth:`encode_wide`, with the checks of :meth:`decode`."""
        return self.decode(data)

    def precompute(self, a: E, *, heavy: bool = False) -> None:
        """Hint: ``a`` is a public element multiplied very often (e.g. the Pedersen H).

        Instances may build a fixed-base table for it (``heavy``: a larger one, for a point
        used as often as the generator); the default does nothing.
        """

    def decode_mul(self, data: bytes, k: int) -> tuple[E, E]:
        """(:meth:`decode` of ``data``, k times it), with decode's checks and DecodeError.

        Instances whose multiplication checks its point anyway (libsodium's) may fuse the two,
        so that a point used once is checked once."""
        a = self.decode(data)
        return a, self.mul(k, a)

    def multi_mul(self, scalars: Sequence[int], elements: Sequence[E]) -> E:
        """sum(k_i * P_i); instances may override with a faster multi-exponentiation."""
        if len(scalars) != len(elements):
            raise ValueError("multi_mul: scalars and elements differ in length")
        return self.sum(self.mul(k, p) for k, p in zip(scalars, elements, strict=True))

    def small_multi_mul_many(self, jobs: Sequence[tuple[Sequence[int], Sequence[E]]]) -> list[E]:
        """[sum_i k_i P_i for each job], for small non-negative scalars (e.g. powers of a server id:
        evaluating commitments). Instances may share work between the jobs."""
        return [self.multi_mul(ks, ps) for ks, ps in jobs]

    def encode_scalar(self, k: int) -> bytes:
        """Big-endian fixed-length encoding (instances may override, e.g. Ed25519 is little-endian)."""
        return (k % self.order).to_bytes(self.scalar_size, "big")

    def decode_scalar(self, data: bytes) -> int:
        """Inverse of :meth:`encode_scalar`; rejects wrong length and values >= order."""
        if len(data) != self.scalar_size:
            raise DecodeError(f"{self.name} scalar: expected {self.scalar_size} bytes, got {len(data)}")
        k = self._scalar_from_bytes(data)
        if k >= self.order:
            raise DecodeError(f"{self.name} scalar: not reduced modulo the group order")
        return k

    def _scalar_from_bytes(self, data: bytes) -> int:
        return int.from_bytes(data, "big")

    def random_scalar(self, rand: bytes) -> int:
        """Map ``scalar_size + 16`` or more uniform bytes to a near-uniform nonzero scalar.

        Randomness is an argument so that protocols stay deterministic under test;
        callers pass ``os.urandom(group.random_bytes)``.
        """
        if len(rand) < self.random_bytes:
            raise ValueError(f"{self.name}: need {self.random_bytes} random bytes, got {len(rand)}")
        return int.from_bytes(rand, "big") % (self.order - 1) + 1

    @property
    def random_bytes(self) -> int:
        return self.scalar_size + 16

    def is_identity(self, a: E) -> bool:
        return self.encode(a) == self.encode(self.identity())

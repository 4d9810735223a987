"""Secret scalars in wipeable buffers, and the randomness sources protocols take as arguments.

Python cannot promise that a secret leaves no copy behind: ints are immutable, every
arithmetic step makes a new one, and the garbage collector frees without zeroing.
What we can do, we do: a secret at rest is held in a ``bytearray`` that :meth:`wipe`
overwrites, it never shows in ``repr`` or ``str``, and long-lived secrets live in a
small key-holder process that is restarted every period (see docs/security.md).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Final

ScalarSource = Callable[[], int]
"""A source of uniform scalars modulo the group order (randomness is always an argument)."""


class SecretScalar:
    """A secret scalar modulo q stored in a wipeable buffer; prints as ``SecretScalar(<hidden>)``."""

    __slots__ = ("_buf", "_q", "_wiped")

    def __init__(self, value: int, q: int) -> None:
        size = (q.bit_length() + 7) // 8
        self._buf = bytearray((value % q).to_bytes(size, "big"))
        self._q = q
        self._wiped = False

    @property
    def value(self) -> int:
        if self._wiped:
            raise ValueError("secret scalar was wiped")
        return int.from_bytes(self._buf, "big")

    @property
    def wiped(self) -> bool:
        return self._wiped

    def wipe(self) -> None:
        """Overwrite the buffer with zeros; the value is gone afterwards."""
        for i in range(len(self._buf)):
            self._buf[i] = 0
        self._wiped = True

    def __repr__(self) -> str:
        return "SecretScalar(<hidden>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SecretScalar):
            return NotImplemented
        return self._q == other._q and self.value == other.value

    def __hash__(self) -> int:  # secrets are not dictionary keys
        raise TypeError("SecretScalar is unhashable")

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("SecretScalar cannot be pickled; encode it explicitly into sealed storage")


def system_scalar_source(q: int) -> ScalarSource:
    """Uniform nonzero scalars mod q from the operating system's CSPRNG."""
    size = (q.bit_length() + 7) // 8 + 16

    def draw() -> int:
        return int.from_bytes(os.urandom(size), "big") % (q - 1) + 1

    return draw


class DeterministicSource:
    """A seeded stream of scalars for tests and the deterministic simulation only.

    SHAKE-256 of (seed, counter); never used for real keys.
    """

    def __init__(self, seed: bytes | int, q: int) -> None:
        self._seed: Final = seed if isinstance(seed, bytes) else seed.to_bytes(16, "big", signed=True)
        self._q = q
        self._counter = 0
        self._size = (q.bit_length() + 7) // 8 + 16

    def __call__(self) -> int:
        self._counter += 1
        block = hashlib.shake_256(
            b"pst/deterministic-source" + self._seed + self._counter.to_bytes(8, "big")
        ).digest(self._size)
        return int.from_bytes(block, "big") % (self._q - 1) + 1

    def bytes(self, n: int) -> bytes:
        self._counter += 1
        return hashlib.shake_256(
            b"pst/deterministic-bytes" + self._seed + self._counter.to_bytes(8, "big")
        ).digest(n)

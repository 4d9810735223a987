"""Exceptions of the crypto core.

Every decoder raises :class:`DecodeError` (and nothing else) on bad input, with a
message that names what was wrong. Protocol checks that catch a misbehaving party
raise :class:`CheatingError`, which names the party so that the caller can alert.
"""

from __future__ import annotations


class CryptoError(Exception):
    """Base class of the crypto core's errors."""


class DecodeError(CryptoError, ValueError):
    """Bytes that do not decode to a valid object: says what was wrong."""


class ParameterError(CryptoError, ValueError):
    """Invalid domain parameters or protocol parameters (n, t, ids)."""


class CheatingError(CryptoError):
    """A party sent something provably wrong; ``party`` names it."""

    def __init__(self, party: int, reason: str) -> None:
        super().__init__(f"party {party}: {reason}")
        self.party = party
        self.reason = reason


class NotEnoughSharesError(CryptoError):
    """Fewer valid contributions than the threshold requires."""

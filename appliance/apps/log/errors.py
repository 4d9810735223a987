"""Exceptions of the log.

Each says what was wrong and, where it matters, whose fault it is: bytes from outside (a note,
a path, a tile fetched from a peer) that do not decode raise :class:`LogDecodeError`; a proof
that does not hold raises :class:`ProofError`; our own disk disagreeing with itself raises
:class:`CorruptStoreError`; a caller handing us an entry the format cannot carry raises
:class:`EntryTooLargeError`; a signer whose signature does not verify raises :class:`SignerError`.
"""

from __future__ import annotations

from appliance.crypto.errors import DecodeError


class LogError(Exception):
    """Base class of the log's errors."""


class LogDecodeError(LogError, DecodeError):
    """Input that is not in the format it claims (note, checkpoint, tile path, tile, bundle)."""


class NoteVerificationError(LogDecodeError):
    """A well-formed note that no trusted key verifies, or with a bad signature by a trusted key."""


class ProofError(LogError):
    """An inclusion or consistency proof that does not hold; the message says which check failed."""


class CorruptStoreError(LogError):
    """The stored log disagrees with itself: a tile, bundle or state record is missing or wrong."""


class TreeSizeError(CorruptStoreError):
    """The tree holds another number of entries than the replica's record of what it applied
    (and no crash explains it): the tree's directory was damaged or rolled back."""


class SignerError(LogError):
    """A signer returned a signature that does not verify under its own public key (our fault)."""


class EntryTooLargeError(LogError, ValueError):
    """An entry longer than an entry bundle can carry (65,535 bytes)."""

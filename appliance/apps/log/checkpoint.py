"""C2SP signed notes and tlog checkpoints: format, sign with any Ed25519 signer, parse and verify.

Theory of operation
-------------------
A checkpoint (c2sp.org/tlog-checkpoint) is the note text ``<origin>\\n<size>\\n<base64 root>\\n``
followed by optional extension lines. A signed note (c2sp.org/signed-note) is that text, a
blank line, and one or more lines ``— <key name> <base64(key ID || signature)>``, where the
key ID of an Ed25519 key is the first four bytes of ``SHA-256(name || 0x0A || 0x01 || public
key)`` and the signature is RFC 8032 Ed25519 over the text, final newline included. Verifiers
know keys as ``<name>+<8 hex key ID>+<base64(0x01 || public key)>``.

Signing takes a ``sign(message) -> signature`` callable rather than a key, so the same code
signs with a plain Ed25519 key in tests and with the servers' FROST group key in the appliance:
a FROST(Ed25519) signature is an RFC 8032 signature. Each signature is verified against the
signer's public key before it is written into a note, so a faulty signer (or a threshold
signature gone wrong) never produces a note that verifiers would reject.

Parsing is strict and total: any bytes either open to a :class:`Note` or raise
:class:`~appliance.apps.log.errors.LogDecodeError` saying what is wrong (its subclass
:class:`~appliance.apps.log.errors.NoteVerificationError` when the note is well formed but
no trusted key vouches for it). The rules are those of the specs and of Go's
``golang.org/x/mod/sumdb/note``, which checks our notes in the tests: UTF-8, no control
character but newline, split at the last blank line, signatures from unknown keys ignored,
a bad signature by a known key rejects the whole note, at most 100 signatures. Stricter than
Go: base64 must be canonical, and a checkpoint's size must fit in 63 bits.

Key names and origins: non-empty, no Unicode space (Python's ``str.isspace``), no ``+``, no
control character. The log's key name is its origin.

This module is pure: no I/O, no clock, no randomness.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from appliance.apps.log.errors import LogDecodeError, NoteVerificationError, SignerError
from appliance.apps.log.merkle import HASH_SIZE

__all__ = [
    "ALG_ED25519",
    "MAX_NOTE_SIZE",
    "MAX_SIGNATURES",
    "Checkpoint",
    "Note",
    "Signature",
    "Signer",
    "SignerError",
    "Verifier",
    "key_id",
    "open_checkpoint",
    "open_note",
    "parse_note",
    "sign_checkpoint",
    "sign_note",
]

ALG_ED25519 = 0x01
ED25519_PUBLIC_KEY_SIZE = 32
ED25519_SIGNATURE_SIZE = 64
#: Go's note.Open stops at 100 signatures; the spec asks for at least 16.
MAX_SIGNATURES = 100
#: Far above any checkpoint (a few hundred bytes with 100 signatures is ~10 kB).
MAX_NOTE_SIZE = 64 * 1024
#: The largest tree size we read: Go's tlog counts in int64.
MAX_TREE_SIZE = (1 << 63) - 1

SIGNATURE_PREFIX = "\u2014 "  # em dash, space
_SIZE = re.compile(r"0|[1-9][0-9]*")


def _has_control(text: str) -> bool:
    return any(ord(c) < 0x20 and c != "\n" for c in text)


def _check_name(name: object, what: str) -> str:
    if not isinstance(name, str) or not name:
        raise LogDecodeError(f"{what} is empty")
    if "+" in name:
        raise LogDecodeError(f"{what} {name!r} contains '+'")
    if any(c.isspace() or ord(c) < 0x20 for c in name):
        raise LogDecodeError(f"{what} {name!r} contains a space or a control character")
    return name


def _b64decode(text: str, what: str) -> bytes:
    """Standard base64 with padding, canonical (one encoding per byte string)."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        raise LogDecodeError(f"{what} is not valid base64") from None
    if base64.b64encode(raw).decode("ascii") != text:
        raise LogDecodeError(f"{what} is not canonical base64")
    return raw


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def key_id(name: str, public_key: bytes, alg: int = ALG_ED25519) -> int:
    """The recommended key ID: SHA-256(name || 0x0A || alg || public key)[:4], big-endian."""
    digest = hashlib.sha256(name.encode("utf-8") + b"\n" + bytes([alg]) + public_key).digest()
    return int.from_bytes(digest[:4], "big")


# --- Keys --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verifier:
    """An Ed25519 note-verifier key: a name and a public key."""

    name: str
    public_key: bytes

    def __post_init__(self) -> None:
        _check_name(self.name, "the key name")
        if not isinstance(self.public_key, bytes) or len(self.public_key) != ED25519_PUBLIC_KEY_SIZE:
            raise LogDecodeError(f"an Ed25519 public key is {ED25519_PUBLIC_KEY_SIZE} bytes")

    @property
    def key_id(self) -> int:
        return key_id(self.name, self.public_key)

    def encode(self) -> str:
        """The verifier key string ``<name>+<hex key ID>+<base64(0x01 || public key)>``."""
        return f"{self.name}+{self.key_id:08x}+{_b64(bytes([ALG_ED25519]) + self.public_key)}"

    @classmethod
    def parse(cls, vkey: str) -> Verifier:
        """Read a verifier key string; raises LogDecodeError naming the bad part."""
        if not isinstance(vkey, str):
            raise LogDecodeError("a verifier key is a string")
        # The name has no '+'; the base64 key may have some.
        name, _, rest = vkey.partition("+")
        hex_id, plus, key64 = rest.partition("+")
        if not plus:
            raise LogDecodeError("a verifier key is <name>+<key ID>+<base64 key>")
        _check_name(name, "the verifier key's name")
        if not re.fullmatch(r"[0-9a-f]{8}", hex_id):
            raise LogDecodeError(f"the verifier key's ID {hex_id!r} is not 8 lowercase hex digits")
        key = _b64decode(key64, "the verifier key's key")
        if not key or key[0] != ALG_ED25519:
            raise LogDecodeError("the verifier key is not an Ed25519 key (type 0x01)")
        if len(key) != 1 + ED25519_PUBLIC_KEY_SIZE:
            raise LogDecodeError(f"the verifier key's Ed25519 key is not {ED25519_PUBLIC_KEY_SIZE} bytes")
        verifier = cls(name, key[1:])
        if verifier.key_id != int(hex_id, 16):
            raise LogDecodeError(f"the verifier key's ID {hex_id} does not match its name and key")
        return verifier

    def verifies(self, message: bytes, signature: bytes) -> bool:
        if len(signature) != ED25519_SIGNATURE_SIZE:
            return False
        try:
            VerifyKey(self.public_key).verify(message, signature)
        except BadSignatureError:
            return False
        return True


@dataclass(frozen=True)
class Signer:
    """A note signer: a key name, the Ed25519 public key, and any function that signs with it."""

    name: str
    public_key: bytes
    sign: Callable[[bytes], bytes]

    @property
    def verifier(self) -> Verifier:
        return Verifier(self.name, self.public_key)


# --- Notes -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Signature:
    """One signature line: key name, key ID and the signature bytes (without the ID)."""

    name: str
    key_id: int
    signature: bytes

    def line(self) -> str:
        return f"{SIGNATURE_PREFIX}{self.name} {_b64(self.key_id.to_bytes(4, 'big') + self.signature)}\n"


@dataclass(frozen=True)
class Note:
    """A note whose text at least one trusted key signed; ``unverified`` are by unknown keys."""

    text: str
    signatures: tuple[Signature, ...]
    unverified: tuple[Signature, ...] = ()


def _check_text(text: object) -> str:
    if not isinstance(text, str):
        raise LogDecodeError("a note text is a string")
    if not text.endswith("\n"):
        raise LogDecodeError("a note text must end with a newline")
    if _has_control(text):
        raise LogDecodeError("a note text must not contain control characters other than newline")
    return text


def sign_note(text: str, signers: Sequence[Signer], existing: Sequence[Signature] = ()) -> bytes:
    """The signed note: ``text``, a blank line, the ``existing`` then the new signature lines.

    Each new signature is checked against its signer's public key first (:class:`SignerError`).
    """
    _check_text(text)
    if not signers and not existing:
        raise ValueError("a signed note needs at least one signature")
    message = text.encode("utf-8")
    lines = [s.line() for s in existing]
    for signer in signers:
        verifier = signer.verifier
        signature = bytes(signer.sign(message))
        if not verifier.verifies(message, signature):
            raise SignerError(f"the signer for {signer.name!r} returned a signature that does not verify")
        lines.append(Signature(signer.name, verifier.key_id, signature).line())
    return (text + "\n" + "".join(lines)).encode("utf-8")


def parse_note(data: bytes) -> tuple[str, list[Signature]]:
    """Split a signed note into its text and signature lines, checking the syntax only."""
    if not isinstance(data, bytes | bytearray):
        raise LogDecodeError("a note is bytes")
    if len(data) > MAX_NOTE_SIZE:
        raise LogDecodeError(f"the note is longer than {MAX_NOTE_SIZE} bytes")
    try:
        whole = bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LogDecodeError(f"the note is not valid UTF-8 (byte {exc.start})") from None
    if _has_control(whole):
        raise LogDecodeError("the note contains a control character other than newline")
    split = whole.rfind("\n\n")
    if split < 0:
        raise LogDecodeError("the note has no blank line before its signatures")
    text, block = whole[: split + 1], whole[split + 2 :]
    if not block:
        raise LogDecodeError("the note has no signature lines")
    if not block.endswith("\n"):
        raise LogDecodeError("the note's last signature line does not end with a newline")
    lines = block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise LogDecodeError(f"the note has more than {MAX_SIGNATURES} signatures")
    signatures = []
    for number, line in enumerate(lines, start=1):
        if not line.startswith(SIGNATURE_PREFIX):
            raise LogDecodeError(f"signature line {number} does not start with an em dash and a space")
        name, space, encoded = line[len(SIGNATURE_PREFIX) :].partition(" ")
        if not space:
            raise LogDecodeError(f"signature line {number} has no space between key name and signature")
        _check_name(name, f"the key name of signature line {number}")
        raw = _b64decode(encoded, f"the signature of line {number}")
        if len(raw) < 5:
            raise LogDecodeError(f"the signature of line {number} is shorter than a key ID and one byte")
        signatures.append(Signature(name, int.from_bytes(raw[:4], "big"), raw[4:]))
    return text, signatures


def open_note(data: bytes, verifiers: Iterable[Verifier]) -> Note:
    """Parse a signed note and verify it against trusted ``verifiers``.

    Signatures by unknown keys (name or ID unknown) are kept as unverified; a bad signature by
    a known key, or no signature by any, raises :class:`NoteVerificationError`.
    """
    known: dict[tuple[str, int], Verifier] = {}
    for v in verifiers:
        other = known.setdefault((v.name, v.key_id), v)
        if other.public_key != v.public_key:
            raise ValueError(f"two trusted keys named {v.name!r} share the key ID {v.key_id:08x}")
    text, signatures = parse_note(data)
    message = text.encode("utf-8")
    verified: list[Signature] = []
    unverified: list[Signature] = []
    for sig in signatures:
        verifier = known.get((sig.name, sig.key_id))
        if verifier is None:
            if sig not in unverified:
                unverified.append(sig)
            continue
        if any((s.name, s.key_id) == (sig.name, sig.key_id) for s in verified):
            continue
        if not verifier.verifies(message, sig.signature):
            raise NoteVerificationError(f"the signature by {sig.name} ({sig.key_id:08x}) does not verify")
        verified.append(sig)
    if not verified:
        names = sorted({s.name for s in unverified})
        raise NoteVerificationError(f"no signature by a trusted key (the note is signed by {names})")
    return Note(text, tuple(verified), tuple(unverified))


# --- Checkpoints -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """A tlog checkpoint body: the log's origin, tree size and root hash, and extension lines."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.origin, str) or not self.origin:
            raise LogDecodeError("the checkpoint origin is empty")
        if "\n" in self.origin or _has_control(self.origin):
            raise LogDecodeError("the checkpoint origin contains a control character")
        if (
            isinstance(self.size, bool)
            or not isinstance(self.size, int)
            or not 0 <= self.size <= MAX_TREE_SIZE
        ):
            raise LogDecodeError(f"the checkpoint tree size {self.size!r} is not an integer in [0, 2**63)")
        if not isinstance(self.root, bytes) or len(self.root) != HASH_SIZE:
            raise LogDecodeError(f"the checkpoint root hash is not {HASH_SIZE} bytes")
        for i, line in enumerate(self.extensions, start=1):
            if not isinstance(line, str) or not line or "\n" in line or _has_control(line):
                raise LogDecodeError(
                    f"checkpoint extension line {i} is empty or contains a control character"
                )

    def text(self) -> str:
        """The note text, final newline included."""
        return "".join(
            f"{line}\n" for line in (self.origin, str(self.size), _b64(self.root), *self.extensions)
        )

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        """Read a checkpoint body strictly; raises LogDecodeError naming the bad line."""
        if not isinstance(text, str):
            raise LogDecodeError("a checkpoint is a string")
        if not text.endswith("\n"):
            raise LogDecodeError("the checkpoint does not end with a newline")
        lines = text[:-1].split("\n")
        if len(lines) < 3:
            raise LogDecodeError("a checkpoint has at least three lines: origin, tree size, root hash")
        origin, size, root, *extensions = lines
        if not _SIZE.fullmatch(size):
            raise LogDecodeError(
                f"the checkpoint tree size {size[:30]!r} is not a decimal without leading zeros"
            )
        if len(size) > 19 or int(size) > MAX_TREE_SIZE:
            raise LogDecodeError("the checkpoint tree size is 2**63 or more")
        root_hash = _b64decode(root, "the checkpoint root hash")
        return cls(origin, int(size), root_hash, tuple(extensions))


def sign_checkpoint(checkpoint: Checkpoint, signers: Sequence[Signer]) -> bytes:
    """The checkpoint as a signed note (the log's key name should be its origin)."""
    return sign_note(checkpoint.text(), signers)


def open_checkpoint(data: bytes, origin: str, verifiers: Iterable[Verifier]) -> Checkpoint:
    """Verify a signed checkpoint of the log ``origin``; raises LogDecodeError (or a subclass)."""
    note = open_note(data, verifiers)
    checkpoint = Checkpoint.parse(note.text)
    if checkpoint.origin != origin:
        raise LogDecodeError(f"the checkpoint is for the log {checkpoint.origin!r}, not {origin!r}")
    return checkpoint

"""The checkpoint guard: this server contributes its share to a checkpoint only if its own log backs it.

Theory of operation
-------------------
A checkpoint of the log is signed with a threshold key: t+1 servers each contribute a
FROST signature share (:mod:`appliance.protocols.signing`). The signature means something
only because every one of them first runs this guard on the checkpoint body, against its
own :class:`~appliance.apps.log.tiles.TileLog`, and refuses unless

(a) the body is a well-formed checkpoint (origin, size, root; no extension lines, which
    this log does not sign) of *this* log's origin;
(b) the size is at least that of the last checkpoint this server signed (no truncation);
    a smaller tree that is a prefix of the local log, asked for less than
    :data:`STALE_GRACE` seconds after that signature, is refused *without* an alert: two
    coordinators at once (a takeover racing a slow coordinator) ask for it honestly, and
    a requester gains nothing from a refusal. Older, or not a prefix, it is an alert;
(c) the local log holds at least that many entries, and its root at that size is the
    body's root (the server holds the entries and computed the same tree: no fork);
(d) the local log still extends the last checkpoint this server signed: a consistency
    proof from that checkpoint to the new one, made from the local tiles, verifies.

So a valid checkpoint says that t+1 servers, hence at least one honest one, hold these
entries and saw the log only grow. Before accepting, the guard writes the checkpoint it
accepts to ``state/signed`` in the log's storage (atomically, and synced): the share leaves
the server only after that record is durable, so a server restarted after signing still
refuses a fork or a truncation of what it signed before. The wall-clock time of that signature
goes to ``state/signed-at``, so that the grace of (b) holds across a restart too (it decides
only whether a refusal is alerted). An unreadable record stops the
guard from opening (:class:`~appliance.apps.log.errors.CorruptStoreError`) rather than
letting it forget.

The guard is the log's :class:`~appliance.protocols.signing.PayloadCheck`. Which messages
it *claims* is decided from their content: everything, for the log's own key (that key
signs checkpoints and nothing else), or, when the log borrows the group key, every UTF-8
text whose second line is a signed or unsigned decimal (a superset of what the C2SP and Go
checkpoint parsers read as a checkpoint), so that no checkpoint reaches the group key
unchecked whatever it is called.

Layering: the guard imports :class:`~appliance.protocols._core.AlertKind` from the
protocols layer below it; the signing service knows only the ``PayloadCheck`` protocol and
never imports an application. The log's storage does the I/O (the signing service calls
the guard synchronously; it never awaits).
"""

from __future__ import annotations

import base64
import math
import re
import time
from collections.abc import Callable
from typing import Final, Protocol

from appliance.apps.log.checkpoint import Checkpoint, Signer, sign_note
from appliance.apps.log.errors import CorruptStoreError, LogDecodeError, ProofError
from appliance.apps.log.merkle import verify_consistency
from appliance.apps.log.tiles import STATE_PATH, Storage, TileLog
from appliance.protocols._core import AlertKind
from appliance.protocols.signing import NotYet

__all__ = ["SIGNED_PATH", "CheckpointGuard", "LogState", "SharedTileLog", "checkpoint_note"]

#: The last checkpoint body this server signed, in the log's storage.
SIGNED_PATH = "state/signed"
#: When the checkpoint in SIGNED_PATH was signed (Unix time in ms, decimal): read after a restart
#: only to decide whether a stale request is alerted, never whether to sign.
SIGNED_AT_PATH = "state/signed-at"
#: Seconds after signing a checkpoint during which a request for a prefix of it is taken for a
#: slow coordinator's (refused quietly) rather than a truncation (refused with an alert).
STALE_GRACE: Final = 30.0
#: Second line of anything a checkpoint parser might read as a tree size (Go's ParseInt takes a sign).
_LOOKS_LIKE_SIZE = re.compile(rb"[^\n]*\n[+-]?[0-9]+\n[^\n]*\n", re.DOTALL)


class LogState(Protocol):
    """What the guard reads of the local log (a :class:`TileLog` is one)."""

    @property
    def origin(self) -> str: ...

    @property
    def size(self) -> int: ...

    def root_at(self, size: int) -> bytes: ...

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]: ...


class SharedTileLog:
    """Another process's :class:`TileLog`, read afresh whenever its state record changes.

    The key-holder's guard checks the log that the network-facing process appends to:
    each question first rereads the store's state record (replaced atomically, after the
    tiles it covers), and reopens the log if the record changed.
    """

    def __init__(self, storage: Storage, origin: str) -> None:
        self.storage = storage
        self.origin = origin
        self._record: bytes | None = None
        self._log: TileLog | None = None

    def _current(self) -> TileLog:
        record = self.storage.read(STATE_PATH)
        if self._log is None or record != self._record:
            self._log = TileLog.open(self.storage, self.origin)
            self._record = record
        return self._log

    @property
    def size(self) -> int:
        return self._current().size

    def root_at(self, size: int) -> bytes:
        return self._current().root_at(size)

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        return self._current().consistency_proof(old_size, new_size)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class CheckpointGuard:
    """Checks a checkpoint body against the local log and records the last one signed."""

    alert = AlertKind.CHECKPOINT_REFUSED

    def __init__(
        self,
        log: LogState,
        storage: Storage,
        *,
        claim_all: bool = False,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.log = log
        self.storage = storage
        self._clock = clock
        self._wall = wall
        #: Claim every message (the log's own key signs nothing else).
        self.claim_all = claim_all
        #: The last checkpoint this server signed (None: it never signed one).
        self.last: Checkpoint | None = self._load()
        self._signed_at = self._load_signed_at()  # when self.last was signed, on our clock

    def _load_signed_at(self) -> float:
        """When the last checkpoint was signed, on ``clock``, from the wall-clock time recorded
        with it (-inf if none is recorded or it is unreadable: a stale request is then alerted).
        A wall clock that stepped only moves the grace, which decides alerts, never signatures."""
        data = self.storage.read(SIGNED_AT_PATH) if self.last is not None else None
        try:
            ms = int(data.decode("ascii")) if data is not None else None
        except (UnicodeDecodeError, ValueError):
            ms = None
        if ms is None:
            return -math.inf
        return self._clock() - max(0.0, self._wall() - ms / 1000)

    def _note_signed(self) -> None:
        self._signed_at = self._clock()
        self.storage.write(SIGNED_AT_PATH, str(round(self._wall() * 1000)).encode("ascii"))
        self.storage.sync()

    @classmethod
    def open(
        cls,
        log: TileLog,
        *,
        claim_all: bool = False,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> CheckpointGuard:
        """The guard of ``log``, its record kept in the log's own storage."""
        return cls(log, log.storage, claim_all=claim_all, clock=clock, wall=wall)

    @property
    def name(self) -> str:
        return f"checkpoint of {self.log.origin}"

    def _load(self) -> Checkpoint | None:
        data = self.storage.read(SIGNED_PATH)
        if data is None:
            return None
        try:
            last = Checkpoint.parse(data.decode("utf-8"))
        except (UnicodeDecodeError, LogDecodeError) as exc:
            raise CorruptStoreError(
                f"{SIGNED_PATH} (the last checkpoint this server signed) is unreadable: {exc}; "
                "restore it from a signed checkpoint of this log before signing again"
            ) from None
        if last.origin != self.log.origin:
            raise CorruptStoreError(
                f"{SIGNED_PATH} is a checkpoint of {last.origin!r}, not {self.log.origin!r}"
            )
        return last

    def claims(self, message: bytes) -> bool:
        """Is ``message`` possibly a checkpoint (then only :meth:`check` decides whether we sign it)?"""
        if self.claim_all:
            return True
        if _LOOKS_LIKE_SIZE.match(message) is None:
            return False
        try:
            message.decode("utf-8")
        except UnicodeDecodeError:
            return False  # no note verifier reads it: not a checkpoint to anyone
        return True

    def check(self, message: bytes) -> str | None:
        """None if this server may sign ``message`` (recorded first); else why it refuses."""
        try:
            text = message.decode("utf-8")
            body = Checkpoint.parse(text)
        except UnicodeDecodeError:
            return "malformed checkpoint: not UTF-8 text"
        except LogDecodeError as exc:
            return f"malformed checkpoint: {exc}"
        origin = self.log.origin
        if body.origin != origin:
            return (
                f"unknown origin: the checkpoint is for the log {body.origin!r}, "
                f"this server's log is {origin!r}"
            )
        if body.extensions:
            return "the checkpoint has extension lines; this log signs only origin, size and root"
        if body.text() != text:
            return "malformed checkpoint: not in canonical form"
        last = self.last
        if last is not None and body.size < last.size:
            age = self._clock() - self._signed_at
            if age < STALE_GRACE and body.size <= self.log.size and self.log.root_at(body.size) == body.root:
                return NotYet(
                    f"stale: size {body.size} is a prefix of the checkpoint of size {last.size} "
                    f"this server signed {age:.1f} s ago (another coordinator was quicker)"
                )
            return (
                f"truncation: size {body.size} is smaller than {last.size}, the size of the last "
                "checkpoint this server signed"
            )
        held = self.log.size
        if body.size > held:
            # Refused without an alert: it is also what a signer that has not applied the last
            # slot yet sees, and a checkpoint nobody can back gains a requester nothing.
            return NotYet(
                f"this server holds {held} entries, fewer than the {body.size} the checkpoint claims"
            )
        ours = self.log.root_at(body.size)
        if ours != body.root:
            return f"fork: this server's root at size {body.size} is {_b64(ours)}, not {_b64(body.root)}"
        if last is not None:
            try:
                proof = self.log.consistency_proof(last.size, body.size)
                verify_consistency(last.size, body.size, last.root, body.root, proof)
            except (ProofError, ValueError) as exc:
                return (
                    f"fork: the tree of size {body.size} does not extend the checkpoint of size "
                    f"{last.size} this server signed ({exc}); its local log changed since"
                )
            if body == last:
                self._note_signed()
                return None  # signed before: nothing new to record
        self.storage.write(SIGNED_PATH, body.text().encode("utf-8"))
        self.storage.sync()
        self.last = body
        self._note_signed()
        return None


def checkpoint_note(body: Checkpoint, public_key: bytes, signature: bytes) -> bytes:
    """The signed note of ``body`` with a signature made elsewhere (the threshold key).

    The key name is the origin; the signature is checked against ``public_key`` first
    (:class:`~appliance.apps.log.errors.SignerError` if it does not verify).
    """
    return sign_note(body.text(), [Signer(body.origin, public_key, lambda _message: signature)])

"""Shared vocabulary of the sans-IO protocols: outgoing messages, alerts, keys, errors.

Errors say whose fault they are (as in h11): :class:`LocalProtocolError` means we
misused a protocol object; :class:`RemoteProtocolError` means a peer sent something
wrong, and names the peer so that the caller can log it and raise an alert.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

#: Recipient value meaning "every other server".
EVERYONE = 0


class LocalProtocolError(Exception):
    """A protocol object was driven wrongly by its owner (a bug on our side)."""


class RemoteProtocolError(Exception):
    """A peer sent a message that cannot be accepted; ``peer`` names it."""

    def __init__(self, peer: int, reason: str) -> None:
        super().__init__(f"server {peer}: {reason}")
        self.peer = peer
        self.reason = reason


@dataclass(frozen=True)
class Outgoing:
    """A message to send: ``to`` is a server id, or EVERYONE for all other servers."""

    to: int
    data: bytes


class AlertKind(enum.Enum):
    EQUIVOCATION = "equivocation"
    BAD_SHARE = "bad-share"
    BAD_SIGNATURE_SHARE = "bad-signature-share"
    CONFLICTING_ANNOUNCEMENTS = "conflicting-key-announcements"
    OWN_KEY_MISSING = "own-key-missing-from-keytable"
    RECOVERY_FAILED = "recovery-failed"
    BAD_MESSAGE = "bad-message"
    INVALID_M = "invalid-invariant-information"
    FALSE_COMPLAINT = "false-complaint"
    SILENT = "silent-server"
    CODE_MISMATCH = "code-mismatch"  # boot check: the code differs from the manifest in C
    CONSTANTS_MISMATCH = "constants-mismatch"  # boot check: the config's C is not the certified C
    KEYHOLDER_STALLED = "keyholder-stalled"  # the key-holder did not answer the network process
    #: A configured server is not in the KeyTable of a refresh that completed without it (it was
    #: down, unreachable, or lost its data): raised by each server that completed that refresh.
    MISSED_REFRESH = "server-missed-refresh"
    #: This server's private state could not be read (mode, owner, a directory in its place,
    #: garbage): it starts recovering and gets its shares back from the others next refresh.
    PRIVATE_STATE_UNREADABLE = "private-state-unreadable"
    #: A server asked us to sign a log checkpoint our own log does not back (a fork, a smaller
    #: tree than we signed, entries we do not hold, another origin, a malformed body).
    CHECKPOINT_REFUSED = "checkpoint-refused"
    #: This server's own copy of the log does not give the root of a checkpoint the network
    #: signed: its tiles or entries were changed on disk (found by its audit, or by a checkpoint).
    LOG_STORE_DAMAGED = "log-store-damaged"
    #: A server asked us to sign, with the network's certificate authority key ``ca``, a
    #: certificate outside the policy (a name not allowed, a CA, a validity longer than a period
    #: plus the grace, an unknown extension, a malformed TBSCertificate): appliance.apps.ca.
    CERTIFICATE_OUTSIDE_POLICY = "certificate-outside-policy"
    #: A server asked us to sign, with the timestamping authority's threshold key, a token whose
    #: genTime is farther from our clock than the stated accuracy: appliance.apps.tsa.threshold.
    TIMESTAMP_TIME_OFF = "timestamp-time-off"
    #: ... or a token outside our [tsa] policy (another policy OID or accuracy, a serial not in
    #: its range, a hash we do not accept, a certificate not for the TSA key, not a token at all).
    TIMESTAMP_OUTSIDE_POLICY = "timestamp-outside-policy"
    #: A server asked us for decryption shares of a stored secret that the store's rules do not
    #: let its client read (another application, not the owner, a StoreUntil before its date):
    #: appliance.apps.store. The alert names the server that asked and its client.
    STORE_READ_REFUSED = "store-read-refused"
    #: A local client (or a distributed application's quorum) asked this server for a write the
    #: store's rules do not allow it (another application's data, a quorum's type by one client,
    #: a certificate that does not verify): refused before it is ordered. Names the requester.
    STORE_WRITE_REFUSED = "store-write-refused"
    #: t+1 servers signed a store digest, at a period mark, other than this server's copy gives:
    #: this copy is damaged (changed on disk, or rebuilt wrongly); it stops serving the store.
    #: About another server: it signed a digest other than the one t+1 servers (and this one)
    #: signed (appliance.apps.store.attest).
    STORE_COPY_DAMAGED = "store-copy-damaged"
    #: A server asked us to sign with an application's DSS key for a client that does not own
    #: it (another application, another client), or with a key of another group:
    #: appliance.apps.dsskeys. The alert names the server that asked and the client it named.
    APP_KEY_REFUSED = "app-key-refused"


@dataclass(frozen=True)
class Alert:
    """A detected attack: its kind, the server it is about, the period, a human-readable cause.

    Alerts never carry secrets: ``detail`` is built from public data only.
    """

    kind: AlertKind
    server: int
    period: int
    detail: str
    evidence: tuple[bytes, ...] = field(default=(), repr=False)

    def __str__(self) -> str:
        return f"ALERT {self.kind.value}: server {self.server}, period {self.period}: {self.detail}"


Verify = Callable[[int, bytes, bytes], bool]
"""verify(server, payload, signature) with that server's key for the current phase."""


class Signer:
    """Signs payloads with one Ed25519 period key (later held by the key-holder process)."""

    def __init__(self, key: SigningKey) -> None:
        self._key = key
        self.public = bytes(key.verify_key)

    def sign(self, payload: bytes) -> bytes:
        return bytes(self._key.sign(payload).signature)

    def __repr__(self) -> str:
        return f"Signer(public={self.public.hex()[:16]}..)"


#: Signatures that verified, by (key, signature, SHA-256 of the payload): every copy of a
#: relayed or broadcast message is checked again by its recipients' handlers, and in the
#: simulation every server runs in one process. Bounded; only successes are kept.
_VERIFIED: dict[tuple[bytes, bytes, bytes], None] = {}
_VERIFIED_MAX = 4096


def ed25519_verify(public_key: bytes, payload: bytes, signature: bytes) -> bool:
    """Ed25519 verification that returns False on any malformed input."""
    if len(public_key) != 32 or len(signature) != 64:
        return False
    key = (bytes(public_key), bytes(signature), hashlib.sha256(payload).digest())
    if key in _VERIFIED:
        return True
    try:
        VerifyKey(public_key).verify(payload, signature)
    except (BadSignatureError, ValueError, TypeError):
        return False
    if len(_VERIFIED) >= _VERIFIED_MAX:
        _VERIFIED.clear()  # crude but thread-safe; a miss only costs a verification
    _VERIFIED[key] = None
    return True


def key_table_verifier(keys: dict[int, bytes]) -> Verify:
    """A Verify over a map server -> Ed25519 public key (servers without a key fail)."""

    def verify(server: int, payload: bytes, signature: bytes) -> bool:
        key = keys.get(server)
        return key is not None and ed25519_verify(key, payload, signature)

    return verify

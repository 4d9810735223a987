"""The secure append-only log (issue 11): a transparency log in the C2SP formats.

The foundations, all pure and sans-IO (no trio, no network):

* :mod:`appliance.apps.log.merkle`: RFC 9162 Merkle tree hashing, roots from stored subtree
  hashes, inclusion and consistency proofs (generate and verify).
* :mod:`appliance.apps.log.tiles`: the c2sp.org/tlog-tiles layout (tile and entry-bundle paths,
  the tiles of a tree) and :class:`TileLog`, a crash-safe store appended in durable batches
  behind a small :class:`Storage` interface (:class:`PosixStorage`, :class:`MemoryStorage`).
* :mod:`appliance.apps.log.checkpoint`: c2sp.org/tlog-checkpoint bodies and c2sp.org/signed-note
  notes, signed with any ``sign(bytes) -> bytes`` (a plain Ed25519 key or the FROST group key)
  and parsed strictly.
* :mod:`appliance.apps.log.guard`: the checkpoint guard every signer runs against its own log
  before it contributes its share of the log key's signature (the signing service's payload
  check for checkpoints), and the signed note of a threshold signature.
* :mod:`appliance.apps.log.errors`: what goes wrong, and whose fault it is.

Syslog ingest, the sans-IO parts also pure:

* :mod:`appliance.apps.log.syslog`: RFC 5424 and RFC 3164 parsing, and the log entry (the
  raw bytes, receive time, transport, peer and parse result, in canonical CBOR) that any
  received bytes become.
* :mod:`appliance.apps.log.framing`: RFC 6587 deframing of a TCP stream (octet counting or
  LF, per frame) and UDP datagrams.
* :mod:`appliance.apps.log.relp`: a RELP server session as a state machine that answers a
  message only once the caller says it is durable.

and the trio glue, imported on its own (it is the only module here that does I/O):
:mod:`appliance.apps.log.ingest`, the UDP, TCP/TLS and RELP servers, the batcher and the
``Sink`` they append to.

The read side, also imported on its own:

* :mod:`appliance.apps.log.reader`: :class:`LogReader`, what the latest signed checkpoint (the
  file ``checkpoint`` beside the tiles) covers: tiles and bundles to serve, proofs checked
  against it, entries and a bounded search (served over HTTP by ``appliance.web._log``).
* :mod:`appliance.apps.log.verify`: ``pst log verify``, inclusion, consistency and a full audit
  of a log (over HTTP with httpx, or a directory) against its signed checkpoint.
* :mod:`appliance.apps.log.repair`: repairing a server's damaged copy (what the audit found)
  from its own entries and its peers' bundles, checked against the signed root (sans-IO; the
  glue is :mod:`appliance.apps.log.node`).

Formats and status: docs/log.md. Wiring the ingest, the checkpoints and the read side into
``pst serve`` and replication between the servers are not built yet.
"""

from appliance.apps.log.checkpoint import (
    Checkpoint,
    Note,
    Signature,
    Signer,
    Verifier,
    open_checkpoint,
    open_note,
    sign_checkpoint,
    sign_note,
)
from appliance.apps.log.errors import (
    CorruptStoreError,
    EntryTooLargeError,
    LogDecodeError,
    LogError,
    NoteVerificationError,
    ProofError,
    SignerError,
)
from appliance.apps.log.framing import Frame, StreamDeframer, datagram_frame
from appliance.apps.log.guard import CheckpointGuard, checkpoint_note
from appliance.apps.log.merkle import (
    EMPTY_ROOT,
    Frontier,
    MemoryTree,
    NodeReader,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    root_hash,
    verify_consistency,
    verify_inclusion,
)
from appliance.apps.log.relp import RelpServer
from appliance.apps.log.syslog import (
    MAX_MESSAGE_SIZE,
    Entry,
    SDElement,
    SyslogMessage,
    SyslogParseError,
    parse_message,
    receive,
)
from appliance.apps.log.tiles import (
    MAX_ENTRY_SIZE,
    Bundle,
    MemoryStorage,
    PosixStorage,
    Storage,
    Tile,
    TileLog,
    TileReader,
    parse_path,
)

__all__ = [
    "EMPTY_ROOT",
    "MAX_ENTRY_SIZE",
    "MAX_MESSAGE_SIZE",
    "Bundle",
    "Checkpoint",
    "CheckpointGuard",
    "CorruptStoreError",
    "Entry",
    "EntryTooLargeError",
    "Frame",
    "Frontier",
    "LogDecodeError",
    "LogError",
    "MemoryStorage",
    "MemoryTree",
    "NodeReader",
    "Note",
    "NoteVerificationError",
    "PosixStorage",
    "ProofError",
    "RelpServer",
    "SDElement",
    "Signature",
    "Signer",
    "SignerError",
    "Storage",
    "StreamDeframer",
    "SyslogMessage",
    "SyslogParseError",
    "Tile",
    "TileLog",
    "TileReader",
    "Verifier",
    "checkpoint_note",
    "consistency_proof",
    "datagram_frame",
    "inclusion_proof",
    "leaf_hash",
    "open_checkpoint",
    "open_note",
    "parse_message",
    "parse_path",
    "receive",
    "root_hash",
    "sign_checkpoint",
    "sign_note",
    "verify_consistency",
    "verify_inclusion",
]

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
* :mod:`appliance.apps.log.errors`: what goes wrong, and whose fault it is.

Formats and status: docs/log.md. Ingest (syslog, RELP), replication between the servers,
threshold-signed checkpoints and the HTTP read side are not built yet.
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
    "Bundle",
    "Checkpoint",
    "CorruptStoreError",
    "EntryTooLargeError",
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
    "Signature",
    "Signer",
    "SignerError",
    "Storage",
    "Tile",
    "TileLog",
    "TileReader",
    "Verifier",
    "consistency_proof",
    "inclusion_proof",
    "leaf_hash",
    "open_checkpoint",
    "open_note",
    "parse_path",
    "root_hash",
    "sign_checkpoint",
    "sign_note",
    "verify_consistency",
    "verify_inclusion",
]

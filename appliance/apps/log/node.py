"""The replicated log inside ``pst serve``: the trio glue around :class:`~.replication.Replica`.

Theory of operation
-------------------
:class:`LogNode` runs in the network-facing process (it holds no share: its vote keys are
its own, see below). It shares the servers' TLS channels with the key-holder's protocols: a
frame whose first byte is :data:`LOG_FRAME` (0x00, which no CBOR map starts with) is the
log's, everything else goes to the key-holder as before (:func:`is_log_frame`).

* **Ingest.** It is the :class:`~appliance.apps.log.ingest.Sink` of the syslog servers and the
  API: :meth:`LogNode.append` cuts the entries into batches, hands each to the replica (durable
  in ``replica/pending`` when that returns) and returns once every batch is in the log, i.e.
  decided by the servers' agreement (held durably by a quorum) and applied here.
* **Vote keys.** For each period in which this server has a channel identity (an operational
  server), the replica makes a vote key and :class:`LogNode` announces it: the key, signed
  with the period's channel key, with the channel certificate (issued by the server's period
  key in the KeyTable). The others check the announcement against that KeyTable
  (:func:`appliance.net.check_channel_signature`) before the key may count in a quorum, and
  keep it (``replica/known/<period>``) so that a restart does not forget it. Announcements
  of our keys (the committee's period and later ones, and the last one before it) are repeated
  every ``resend`` seconds (whoever connected late, or is a period behind, hears them).
* **Threads.** The replica writes with fsync; each call into it runs in a worker thread, one
  at a time (a :class:`trio.Lock`), so the trio loop never waits for the disk.

* **Checkpoints** (:meth:`LogNode.checkpoints`). One server at a time asks for a checkpoint
  of its tree every ``interval`` (0.8) seconds while the tree grows: the coordinator of
  period p is server ``p mod n + 1``; when no new checkpoint has come for ``takeover``
  seconds while the tree grew, the next server takes over, and so on. The signing itself
  is the key-holder's (the log's FROST key; every signer's guard checks the checkpoint
  against its own tree first). The coordinator writes the signed note to the log's
  ``checkpoint`` file, the read side's source, and sends it to the others, who write it
  too once it verifies with the log's key and their own tree has that root. Two
  coordinators at once (a takeover racing a slow one) ask for two checkpoints; a signer
  refuses the smaller one, a prefix of what it just signed, without an alert
  (:data:`~appliance.apps.log.guard.STALE_GRACE`).

* **Audit and repair** (:meth:`LogNode.audits`). Every ``interval`` seconds (``[log]
  audit_interval``; and soon after :meth:`LogNode.request_audit`) the node re-hashes its copy up
  to the latest signed checkpoint. If it does not give the signed root, a ``log-store-damaged``
  alert names what differs and :mod:`appliance.apps.log.repair` repairs it: tiles are recomputed
  from the entries, wrong bundles are fetched from the peers (``repair-req``/``repair`` frames,
  one peer at a time, accepted only if they give the signed root; a peer that sent bad data is
  named at WARNING). The files are rewritten under the node's lock, each atomically, and the copy
  is audited again; the alert stays (the tampering happened).

Peer faults (:attr:`Replica.rejected`) are logged at most once a minute per peer with the
count; alerts (:attr:`Replica.alerts`) go to ``on_alert``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from appliance.apps.log.checkpoint import Checkpoint, Verifier, open_checkpoint
from appliance.apps.log.errors import CorruptStoreError, LogDecodeError, LogError, TreeSizeError
from appliance.apps.log.index import audit_index, drop_index_from
from appliance.apps.log.reader import CHECKPOINT_PATH, LogReader
from appliance.apps.log.repair import REPAIR_TIMEOUT, Repair, answer_request, audit_copy
from appliance.apps.log.replication import MAX_BATCH_BYTES, MAX_BATCH_ENTRIES, Replica
from appliance.apps.log.tiles import STATE_PATH, Bundle, PosixStorage, Storage, TileLog, parse_path
from appliance.crypto import encoding
from appliance.crypto.errors import DecodeError
from appliance.host.files import sync_dir
from appliance.net import (
    EVERYONE,
    ChannelIdentity,
    PeerCertificateError,
    channel_certificate_der,
    channel_sign,
    check_channel_signature,
)
from appliance.protocols._core import Alert, AlertKind

if TYPE_CHECKING:
    from appliance.apps.log.verify import AuditReport

__all__ = ["LOG_FRAME", "LogNode", "batch_frame", "is_log_frame", "open_node", "set_aside"]

log = logging.getLogger("pst.log")

#: First byte of a frame carrying log replication.
LOG_FRAME = b"\x00"
#: The largest log frame we decode (a batch of 1 MiB of entries fits, with its framing).
MAX_LOG_FRAME = 2 * MAX_BATCH_BYTES + 65536
#: Peers' messages waiting for the replica; a peer's reader waits while this many are queued
#: (backpressure on the channel, as when each message took the lock).
MAX_INBOX = 256
#: Seconds between two answers to one peer's repair requests (each reads up to 4,096 entries).
REPAIR_ANSWER_INTERVAL = 0.05
#: In the replica's own storage (not the log's directory): a copy of the signed checkpoint this
#: server last published, so that a ``checkpoint`` file rolled back while it was down is named.
KEPT_CHECKPOINT_PATH = "replica/checkpoint"


def is_log_frame(data: bytes) -> bool:
    return data[:1] == LOG_FRAME


#: The canonical CBOR of ``{"b": <bytes>, "log": "batch"}`` around the bytes: map(2), "b", then
#: the byte string, then "log": "batch" (the canonical order: shorter keys first).
_BATCH_HEAD = b"\xa2\x61b"
_BATCH_TAIL = b"\x63log\x65batch"


def batch_frame(data: bytes) -> bytes | None:
    """The batch bytes of a frame (tag byte first) that is exactly the canonical CBOR of
    ``{"log": "batch", "b": <bytes>}``, else None. Peers send a batch in every such frame, up
    to 1 MiB: read this way, without the generic decoder's decode and re-encode of the whole
    frame (the batch inside is checked in full by :meth:`Batch.from_bytes`). Any other frame,
    or a non-canonical one, gives None and goes through :func:`encoding.decode` as before."""
    if data[1:4] != _BATCH_HEAD or len(data) < 5:
        return None
    info = data[4]
    if 0x40 <= info <= 0x57:
        length, start = info - 0x40, 5
    elif 0x58 <= info <= 0x5A:
        size = 1 << (info - 0x58)  # 1, 2 or 4 bytes of length
        start = 5 + size
        length = int.from_bytes(data[5:start], "big")
        if len(data) < start or length < (24 if size == 1 else 1 << (4 * size)):
            return None  # truncated, or not the shortest form of the length (not canonical)
    else:
        return None
    end = start + length
    if len(data) != end + len(_BATCH_TAIL) or data[end:] != _BATCH_TAIL:
        return None
    return data[start:end]


def _announcement_payload(server: int, period: int, key: bytes, name: str = "log") -> bytes:
    return encoding.signing_payload(
        f"{name}/vote-key", 1, f"pst/{name}", period, {"server": server, "key": key}
    )


#: Where a damaged log's files are kept (for forensics) inside its directory, by UTC time.
DAMAGED_PREFIX = "damaged-"


def set_aside(directory: Path, when: float | None = None) -> Path:
    """Keep a damaged log for forensics, out of the way: everything in ``directory`` is moved
    (renamed, nothing copied or deleted) into ``directory/damaged-<UTC time>/`` (earlier ones
    stay where they are), so that a new log can start in the same directory, whose owner and
    mode (``[privsep]``) stay as they were. A file in the directory's place is renamed to
    ``<directory>.damaged-<UTC time>`` beside it. Returns where the damaged log went."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if when is None else when))
    if directory.exists() and not directory.is_dir():
        target = directory.with_name(f"{directory.name}.{DAMAGED_PREFIX}{stamp}")
        k = 1
        while target.exists():
            k += 1
            target = directory.with_name(f"{directory.name}.{DAMAGED_PREFIX}{stamp}-{k}")
        os.rename(directory, target)
        sync_dir(directory.parent)
        return target
    target = directory / f"{DAMAGED_PREFIX}{stamp}"
    k = 1
    while target.exists():
        k += 1
        target = directory / f"{DAMAGED_PREFIX}{stamp}-{k}"
    target.mkdir(mode=0o750)
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith(DAMAGED_PREFIX):
            continue
        os.rename(entry, target / entry.name)
    sync_dir(target)
    sync_dir(directory)
    return target


def open_node(
    directory: Path,
    origin: str,
    make: Callable[[TileLog, str | None], LogNode],
    *,
    when: Callable[[], float] = time.time,
) -> LogNode:
    """This server's replicated log in ``directory``: ``make(tree, None)`` with the tree opened
    there. If the tree cannot be opened (:class:`CorruptStoreError`: a tile or bundle missing,
    short or wrong, a state record that is not one, a directory replaced by a file), or holds
    another number of entries than the replica applied (:class:`TreeSizeError`: say its state
    record was rolled back), the damaged files are kept (:func:`set_aside`) and
    ``make(new_tree, reason)`` rebuilds an empty tree from the peers (``LogNode``'s
    ``rebuild``). What else fails (the replica's own records, a directory that cannot be read
    or written) raises, as before: the log is then unavailable, saying why."""

    def damaged(what: str) -> LogNode:
        moved = set_aside(directory, when())
        reason = (
            f"the log in {directory} could not be opened ({what}): its files were moved to {moved} "
            "and this server's copy is rebuilt from its peers"
        )
        return make(TileLog.open(PosixStorage(directory), origin), reason)

    if directory.exists() and not directory.is_dir():
        return damaged(f"{directory} is not a directory")
    try:
        tree = TileLog.open(PosixStorage(directory), origin)
    except CorruptStoreError as exc:
        return damaged(str(exc))
    try:
        return make(tree, None)
    except TreeSizeError as exc:
        return damaged(str(exc))


class LogNode:
    """This server's copy of the log, replicated with the others (see the module docstring)."""

    def __init__(
        self,
        *,
        server_id: int,
        n: int,
        t: int,
        log: TileLog,
        storage: Storage,
        send: Callable[[int, bytes], None],
        on_alert: Callable[[Alert], None] = lambda alert: None,
        base_timeout: float = 0.5,
        resend: float = 2.0,
        takeover: float = 5.0,
        repair_timeout: float = REPAIR_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
        frame_tag: bytes = LOG_FRAME,
        name: str = "log",
        rebuild: str | None = None,
    ) -> None:
        """``rebuild``: why ``log`` is a new, empty tree in place of a damaged one
        (:func:`open_node`): the replica applies every slot again from the peers before this
        server votes or takes entries again (:attr:`Replica.rebuilding`), and a
        ``log-store-damaged`` alert says why."""
        #: The first byte of our frames, and the name in our vote-key announcements: another
        #: replicated sequence (the store's, appliance.apps.store.node) has its own of both.
        self.frame_tag, self.name = frame_tag, name
        self.server_id, self.n = server_id, n
        self.tree = log
        self.storage = storage
        self._send = send
        self._on_alert = on_alert
        self._clock = clock
        self.resend = resend
        self.replica = Replica(
            me=server_id,
            n=n,
            t=t,
            log=log,
            storage=storage,
            now=clock(),
            base_timeout=base_timeout,
            resend=resend,
            rebuild=rebuild is not None,
        )
        self._lock = trio.Lock()
        self._poke = trio.Event()
        self._repair_answered: dict[int, float] = {}  # peer -> when we last answered its repair-req
        self._inbox: list[tuple[int, Any]] = []  # (sender, decoded message) for the replica
        self._drained = trio.Event()
        self._acked: dict[int, trio.Event] = {}
        self._first: dict[int, int | None] = {}  # seq -> index of its first entry, once logged
        self._tables: dict[int, dict[int, bytes]] = {}  # period -> the KeyTable's period keys
        self._mine: dict[int, dict[str, Any]] = {}  # period -> our announcement
        self._early: list[tuple[int, dict[str, Any]]] = []  # announcements of a period we lack
        self._complaints: dict[int, tuple[float, int]] = {}
        self._last_announce = -math.inf
        #: Entries appended through this node, for the status page.
        self.appended = 0
        #: Seconds without a new checkpoint after which the next server coordinates them.
        self.takeover = takeover
        #: The size of the last checkpoint this server asked for and got signed (coordinating),
        #: and of the last one it published (its own or a peer's).
        self.checkpointed = 0
        self.checkpointed_size = 0
        self._verifier: Verifier | None = None
        self._seen_checkpoint = clock()
        self._waiting_checkpoint: tuple[bytes, Checkpoint] | None = None
        self._published_at: float | None = None
        #: The signed note this server last wrote to its ``checkpoint`` file (or found there,
        #: verified, at its start): what the audit expects to find in the file.
        self._note: bytes | None = None
        #: Slots beyond ours that a peer said it was at (``at``), with when we first heard of
        #: each (our clock): the replication lag in seconds (:meth:`lag_seconds`).
        self._ahead: dict[int, float] = {}
        #: Why this server's copy of the log is damaged (None: its last audit passed).
        self.damaged: str | None = None
        #: Repairs of this server's copy that passed their audit; seconds a peer has to answer.
        self.repairs = 0
        self.repair_timeout = repair_timeout
        self._repairing: Repair | None = None
        self._audit_lock = trio.Lock()
        self._repair_inbox: list[tuple[int, Any]] = []
        self._repair_wake = trio.Event()
        self._audit_now = trio.Event()
        #: Set (and replaced) each time the tree grew: what follows the log waits on it.
        self.grown = trio.Event()
        #: Set once the replica has applied again what a damaged tree lost (set at once if
        #: nothing was lost); then, until a signed checkpoint matched the rebuilt tree, the
        #: size it was rebuilt to (None: nothing to check).
        self.rebuilt = trio.Event()
        self._unchecked: int | None = None
        if self.replica.rebuilding:
            detail = rebuild or "this server's copy of the log was being rebuilt from its peers"
            self._damaged(f"{detail} (up to slot {self.replica.floor})")
        else:
            self.rebuilt.set()
            if rebuild is not None:  # nothing applied yet: it catches up as any server behind
                self._damaged(rebuild)
        self._load_known()
        logger = logging.getLogger("pst.log")  # (``log`` is the tree here)
        try:  # what a batch lost in a crash left beyond the durable size (we are the writer)
            dropped = log.drop_leftovers()
        except OSError as exc:
            logger.warning("log: the partial files of a lost batch were not deleted: %s", exc)
        else:
            if dropped:
                logger.info(
                    "log: deleted %d file(s) a batch lost in a crash left beyond size %d (not damage)",
                    len(dropped),
                    log.size,
                )

    # --- Keys --------------------------------------------------------------------------------

    def _load_known(self) -> None:
        for path in self.storage.list("replica/known"):
            raw = self.storage.read(path)
            name = path.rsplit("/", 1)[1]
            try:
                keys = encoding.decode(raw or b"", what=path)
                if not name.isdigit() or not isinstance(keys, dict):
                    raise DecodeError("not a map of vote keys")
                self.replica.set_period(int(name), {int(k): bytes(v) for k, v in keys.items()})
            except (DecodeError, TypeError, ValueError) as exc:
                log.warning("log: %s ignored: %s (the keys are learned again from the peers)", path, exc)

    def _remember(self, period: int, server: int, key: bytes) -> None:
        path = f"replica/known/{period}"
        raw = self.storage.read(path)
        known = encoding.decode(raw) if raw else {}
        if isinstance(known, dict) and known.get(server) == key:
            return
        known = dict(known) if isinstance(known, dict) else {}
        known[server] = key
        self.storage.write(path, encoding.encode(known))
        self.storage.sync()

    async def identity(
        self, period: int | None, keys: Mapping[int, bytes], ident: ChannelIdentity | None
    ) -> None:
        """The key-holder handed over a period's identity (``ident`` None: recovering)."""
        if period is None:
            return
        self._tables[period] = dict(keys)
        async with self._lock:
            if ident is not None and period not in self._mine and period >= self.replica.slot_period:
                key = await trio.to_thread.run_sync(self.replica.vote_key, period)
                payload = _announcement_payload(self.server_id, period, key, self.name)
                self._mine[period] = {
                    "log": "vote-key",
                    "server": self.server_id,
                    "period": period,
                    "key": key,
                    "cert": channel_certificate_der(ident),
                    "sig": channel_sign(ident, payload),
                }
                self._broadcast(self._mine[period])
            self.replica.set_period(period)
            for path in self.storage.list("replica/known"):  # periods the committee has left
                name = path.rsplit("/", 1)[1]
                if name.isdigit() and int(name) < self.replica.slot_period:
                    self.storage.delete(path)
            for old in set(self._mine) - set(self._announced()):
                del self._mine[old]
            early, self._early = self._early, []
        for sender, obj in early:
            # Held until we had its KeyTable: one that does not verify with it (its author is not
            # in it, e.g. a recovering server left out of the refresh) is the sender's problem,
            # said like any bad frame, never this server's end.
            try:
                await self._on_announcement(sender, obj)
            except DecodeError as exc:
                self._complain(sender, str(exc))
        self._poke.set()

    def _announced(self) -> list[int]:
        """The periods whose vote key we announce: the committee's and later ones, and the last
        one before it. A server behind by a period (its key-holder handed that period over late,
        or our announcement was lost) can still learn our key, check that period's decisions and
        catch up with ``sync``, rather than from the state t+1 servers report."""
        current = self.replica.slot_period
        periods = sorted(self._mine)
        return [p for p in periods if p < current][-1:] + [p for p in periods if p >= current]

    async def _on_announcement(self, sender: int, obj: dict[str, Any]) -> None:
        f = encoding.expect_map(
            obj,
            {"log": str, "server": int, "period": int, "key": bytes, "cert": bytes, "sig": bytes},
            "vote-key announcement",
        )
        server, period = f["server"], f["period"]
        if server == self.server_id or not 1 <= server <= self.n or len(f["key"]) != 32:
            raise DecodeError(f"vote key of server {server}")
        if period < self.replica.slot_period:
            return  # our committee is past it (a peer behind is told the keys it needs)
        table = self._tables.get(period)
        if table is None:
            if period > max(self._tables, default=-1) and len(self._early) < 4 * self.n:
                self._early.append((sender, obj))  # checked once we have that KeyTable
            return
        try:
            check_channel_signature(
                f["cert"],
                server,
                period,
                table,
                _announcement_payload(server, period, f["key"], self.name),
                f["sig"],
            )
        except PeerCertificateError as exc:
            raise DecodeError(f"vote key announcement: {exc}") from None
        async with self._lock:
            self.replica.add_vote_key(period, server, f["key"])
            await trio.to_thread.run_sync(self._remember, period, server, f["key"])

    # --- Frames ------------------------------------------------------------------------------

    async def frame(self, sender: int, data: bytes) -> None:
        """A log frame from ``sender`` (``is_log_frame(data)``)."""
        try:
            raw = batch_frame(data) if len(data) <= MAX_LOG_FRAME + 1 else None
            if raw is not None:
                obj: Any = {"log": "batch", "b": raw}
            else:
                obj = encoding.decode(data[1:], max_size=MAX_LOG_FRAME, what="log frame")
            if isinstance(obj, dict) and obj.get("log") == "vote-key":
                await self._on_announcement(sender, obj)
                return
            if isinstance(obj, dict) and obj.get("log") == "checkpoint":
                await self._on_checkpoint(sender, obj.get("note"))
                return
            if isinstance(obj, dict) and obj.get("log") == "checkpoint-req":
                # A peer whose checkpoint file is damaged: our latest note (it checks it).
                if self._note is not None:
                    self._emit(sender, {"log": "checkpoint", "note": self._note})
                return
            if isinstance(obj, dict) and obj.get("log") == "repair-req":
                # At most one answer per peer every REPAIR_ANSWER_INTERVAL: a repair asks one
                # request at a time, and a peer that asks faster waits (its reader is held).
                due = self._repair_answered.get(sender, -math.inf) + REPAIR_ANSWER_INTERVAL
                await trio.sleep(max(0.0, due - trio.current_time()))
                self._repair_answered[sender] = trio.current_time()
                async with self._lock:
                    answer = await trio.to_thread.run_sync(answer_request, self.tree, obj)
                self._emit(sender, answer)
                return
            if isinstance(obj, dict) and obj.get("log") == "repair":
                repair = self._repairing
                if repair is not None and sender == repair.peer and len(self._repair_inbox) < 8:
                    self._repair_inbox.append((sender, obj))
                    self._repair_wake.set()
                return
        except DecodeError as exc:
            self._complain(sender, str(exc))
            return
        if isinstance(obj, dict) and obj.get("log") == "at":
            self._heard_at(obj.get("slot"))
        while len(self._inbox) >= MAX_INBOX:
            await self._drained.wait()
        self._inbox.append((sender, obj))
        self._poke.set()

    def _broadcast(self, obj: dict[str, Any]) -> None:
        self._emit(EVERYONE, obj)

    def _emit(self, to: int, obj: dict[str, Any]) -> None:
        data = self.frame_tag + encoding.encode(obj)
        targets = [i for i in range(1, self.n + 1) if i != self.server_id] if to == EVERYONE else [to]
        for peer in targets:
            self._send(peer, data)

    def _complain(self, peer: int, detail: str) -> None:
        now = self._clock()
        last, count = self._complaints.get(peer, (-math.inf, 0))
        if now - last >= 60.0:
            more = f" (and {count} more in the last minute)" if count else ""
            log.warning("log: server %d sent a bad message: %s%s", peer, detail, more)
            self._complaints[peer] = (now, 0)
        else:
            self._complaints[peer] = (last, count + 1)

    # --- Running -----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Drive the replica until cancelled."""
        task_status.started()
        while True:
            now = self._clock()
            self._poke = trio.Event()  # a poke from here on wakes the next round
            async with self._lock:
                # What the peers sent since the last round, then the timers: one trip to a
                # worker thread for all of it (a trip per message cost more than the messages).
                inbox, self._inbox = self._inbox, []
                self._drained.set()
                self._drained = trio.Event()
                size = self.tree.size
                out = await trio.to_thread.run_sync(self._step, inbox, now)
                if self.tree.size != size:  # entries applied (decided slots, or a catch-up)
                    self.grown.set()
                    self.grown = trio.Event()
                if not self.rebuilt.is_set() and not self.replica.rebuilding:
                    await self._finish_rebuild()
                acked, self.replica.acknowledged = self.replica.acknowledged, []
                alerts, self.replica.alerts = self.replica.alerts, []
                rejected, self.replica.rejected = self.replica.rejected, []
                wake = self.replica.next_wakeup(now)
            for to, obj in out:
                self._emit(to, obj)
            for seq, first in acked:
                event = self._acked.pop(seq, None)
                if event is not None:
                    self._first[seq] = first
                    event.set()
            for alert in alerts:
                log.warning("%s", alert)
                self._on_alert(alert)
            for exc in rejected:
                self._complain(exc.peer, exc.reason)
            if now - self._last_announce >= self.resend:
                self._last_announce = now
                for period in self._announced():
                    self._broadcast(self._mine[period])
            # ``wake`` is on our clock, not trio's (whose origin is arbitrary): wait for the
            # difference. (Waiting until ``wake`` on trio's clock made this loop spin.)
            with trio.move_on_after(max(0.0, min(wake, now + self.resend) - self._clock())):
                await self._poke.wait()

    async def _finish_rebuild(self) -> None:
        """The replica applied again every slot the damaged tree held: take entries again, and
        check the rebuilt tree against signed checkpoints: the one this server last published
        (its own copy, if the log's key is known yet) and the network's latest (asked of the
        peers; :meth:`_publish` writes one only if our tree has its root); then audit it."""
        size = self.tree.size
        log.warning(
            "log: this server's copy of the log was rebuilt from its peers: %d entries, slot %d",
            size,
            self.replica.slot,
        )
        self.rebuilt.set()
        if not size:
            self.damaged = None  # nothing to check (an empty log has no checkpoint)
            return
        self._unchecked = size
        self.damaged = (
            f"this server's copy of the log was rebuilt from its peers (size {size}); "
            "no signed checkpoint has been checked against it yet"
        )
        await trio.to_thread.run_sync(self._check_rebuilt)
        self._broadcast({"log": "checkpoint-req"})
        self.request_audit()

    def _check_rebuilt(self) -> None:
        """The rebuilt tree against the checkpoint this server last published (its own copy;
        nothing if it has none, or does not know the log's key yet): written as its checkpoint
        if the tree has its root, else ``log-store-damaged``."""
        kept = self._kept()
        if kept is None:
            return
        body, size = kept[1], self.tree.size
        if body.size > size or self.tree.root_at(body.size) != body.root:
            self._damaged(
                f"this server's rebuilt copy of the log (size {size}) does not have the root of "
                f"the checkpoint of size {body.size} it last published ({KEPT_CHECKPOINT_PATH})"
            )
        else:
            self._publish(*kept)

    def _step(self, inbox: list[tuple[int, Any]], now: float) -> list[tuple[int, dict[str, Any]]]:
        for sender, obj in inbox:
            self.replica.receive(sender, obj, now)
        return self.replica.tick(now)

    async def append(self, entries: Sequence[bytes]) -> Sequence[int]:
        """Entries into the log: returns their indices once they are decided and applied here (a
        quorum of the servers holds them durably); raises LogError if an entry cannot go into
        any batch, or if they were logged while this server was far behind (their indices are
        then not known here). While a damaged copy is rebuilt, waits for the rebuild."""
        await self.rebuilt.wait()
        chunks: list[list[bytes]] = []
        size = 0
        for entry in entries:
            if not chunks or len(chunks[-1]) >= MAX_BATCH_ENTRIES or size + len(entry) > MAX_BATCH_BYTES:
                chunks.append([])
                size = 0
            chunks[-1].append(bytes(entry))
            size += len(entry)
        events: list[tuple[int, int, trio.Event]] = []
        for chunk in chunks:
            while True:
                async with self._lock:
                    try:
                        seq = await trio.to_thread.run_sync(self.replica.submit, chunk)
                    except ValueError as exc:
                        raise LogError(f"entries not logged: {exc}") from None
                    if seq is not None:
                        event = self._acked[seq] = trio.Event()
                        break
                await trio.sleep(0.05)  # too many of our batches wait already: slow down
            events.append((seq, len(chunk), event))
            self._poke.set()
        indices: list[int] = []
        for seq, count, event in events:
            await event.wait()
            first = self._first.pop(seq)
            if first is None:
                raise LogError(
                    "the entries were logged while this server caught up; their indices are unknown"
                )
            indices.extend(range(first, first + count))
        self.appended += len(entries)
        return indices

    @property
    def size(self) -> int:
        return self.tree.size

    def _heard_at(self, slot: Any) -> None:
        """A peer is at ``slot`` (it applied every slot before it)."""
        if len(self._ahead) >= 64:  # forget the slots we have applied since
            self._ahead = {s: t for s, t in self._ahead.items() if s > self.replica.slot}
        if (
            isinstance(slot, int)
            and not isinstance(slot, bool)
            and slot > self.replica.slot
            and slot not in self._ahead
            and len(self._ahead) < 4096
        ):
            self._ahead[slot] = self._clock()

    def lag_seconds(self) -> float:
        """Seconds this server's copy is behind the newest copy: since we first heard that a
        peer had applied the slot we are at (a peer at a later slot; peers say where they
        are every ``resend`` seconds, so this may be that much short), 0 if no peer is
        known to be ahead. Measured on our clock only (no clocks compared). A peer that
        lies about its slot can make it grow, not hide a real lag."""
        slot = self.replica.slot
        for old in [s for s in self._ahead if s <= slot]:
            del self._ahead[old]
        if not self._ahead:
            return 0.0
        return max(0.0, self._clock() - min(self._ahead.values()))

    def replication(self) -> dict[str, int | float | str | None]:
        """Figures for the status: the next slot, its committee's period, the last checkpoint
        this server published, the catch-ups done and our batches waiting to be ordered."""
        r = self.replica
        return {
            "slot": r.slot,
            "committee_period": r.slot_period,
            "checkpoint_size": self.checkpointed_size,
            "caught_up": r.caught_up,
            "waiting_batches": len(self._acked),
            "checkpoint_age": 0
            if self._published_at is None
            else max(0, round(self._clock() - self._published_at)),
            "damaged": self.damaged,
            "repairs": self.repairs,
            "lag_seconds": round(self.lag_seconds(), 1),
        }

    # --- Checkpoints -------------------------------------------------------------------------

    def _published(self) -> Checkpoint | None:
        """The checkpoint in our log's ``checkpoint`` file (None: none yet, or unreadable)."""
        if self._verifier is None:
            return None
        note = self.tree.storage.read(CHECKPOINT_PATH)
        if note is None:
            return None
        try:
            return open_checkpoint(note, self.tree.origin, [self._verifier])
        except LogDecodeError:
            return None

    def _kept(self) -> tuple[bytes, Checkpoint] | None:
        """Our own copy of the signed checkpoint we last published (None: none, or it does not
        verify)."""
        note = self.storage.read(KEPT_CHECKPOINT_PATH)
        if note is None or self._verifier is None:
            return None
        try:
            return note, open_checkpoint(note, self.tree.origin, [self._verifier])
        except LogDecodeError:
            return None

    def _check_rollback(self) -> None:
        """At the start (the log's key known): the ``checkpoint`` file against our own copy of
        the last one we published. A file that is older (a valid signed checkpoint, but not
        the newest we published: rolled back while the server was down), or missing, raises
        ``log-store-damaged`` and the newer note is written back, if our tree has its root (if
        not, the tree was changed too: the audit repairs it, then the file). What the file
        holds is what the audit expects from then on."""
        if not self.rebuilt.is_set():
            return  # a new tree: checked against our copy once it is rebuilt (_finish_rebuild)
        if self._unchecked is not None:  # rebuilt before the log's key was known
            self._check_rebuilt()
            return
        found = self._published()
        note = self.tree.storage.read(CHECKPOINT_PATH)
        kept = self._kept()
        if kept is None or (found is not None and kept[1].size <= found.size):
            if found is not None:
                self._note = note
            return
        was = "is missing" if note is None else "does not verify with the log's key"
        if found is not None:
            was = f"holds the signed checkpoint of size {found.size}: rolled back"
        detail = (
            f"this server's {CHECKPOINT_PATH} file {was}, but the last one this server published "
            f"is of size {kept[1].size} ({KEPT_CHECKPOINT_PATH} in its replica's state)"
        )
        body = kept[1]
        if body.size <= self.tree.size and self.tree.root_at(body.size) == body.root:
            self._note = kept[0]
            self.tree.storage.write(CHECKPOINT_PATH, kept[0])
            self.tree.storage.sync()
            self._damaged(detail + ": written back")
            self.damaged = None  # repaired (the alert stays: the rollback happened)
            self.repairs += 1
        else:
            self._damaged(detail + ", and this server's tree does not have its root: audited")
            self.request_audit()
            if found is not None:
                self._note = note

    def _publish(self, note: bytes, body: Checkpoint) -> bool:
        """Write ``note`` as our latest checkpoint if it is newer and our tree has its root."""
        current = self._published()
        if current is not None and body.size <= current.size:
            return False
        if body.size > self.tree.size or self.tree.root_at(body.size) != body.root:
            return False
        self._note = bytes(note)  # (first: a failed write leaves the audit to put it there)
        self.tree.storage.write(CHECKPOINT_PATH, note)
        self.tree.storage.sync()
        self.storage.write(KEPT_CHECKPOINT_PATH, note)  # (after: at worst older than the file)
        self.storage.sync()
        self.checkpointed_size = body.size
        self._published_at = self._clock()
        if self._unchecked is not None:
            log.warning(
                "log: this server's rebuilt copy of the log (%d entries) gives the root of the "
                "signed checkpoint of size %d",
                self._unchecked,
                body.size,
            )
            self._unchecked = None
        # The partial tiles the signed tree's full ones supersede (durable: they were synced
        # before the tree was appended): a failed deletion only leaves them for the next pass.
        try:
            self.tree.prune(body.size)
        except OSError as exc:
            log.warning("log: pruning partial tiles failed (the next checkpoint retries): %s", exc)
        return True

    async def _on_checkpoint(self, sender: int, note: Any) -> None:
        if self._verifier is None:
            return
        if not isinstance(note, bytes):
            raise DecodeError("checkpoint: a signed note")
        try:
            body = open_checkpoint(note, self.tree.origin, [self._verifier])
        except LogDecodeError as exc:
            raise DecodeError(f"checkpoint: {exc}") from None
        self._seen_checkpoint = self._clock()
        async with self._lock:
            if body.size > self.tree.size:
                self._waiting_checkpoint = (note, body)  # written once we have applied that far
                return
            if body.root != await trio.to_thread.run_sync(self.tree.root_at, body.size):
                self._damaged(
                    f"a checkpoint the network signed (size {body.size}, sent by server {sender}) "
                    "does not match this server's tree: its copy of the log differs from the others'"
                )
                self.request_audit()  # and repair it
                return
            await trio.to_thread.run_sync(self._publish, note, body)

    def _damaged(self, detail: str) -> None:
        self.damaged = detail
        alert = Alert(AlertKind.LOG_STORE_DAMAGED, self.server_id, self.replica.period, detail)
        log.error("%s", alert)
        self._on_alert(alert)

    async def _audit_report(self) -> AuditReport | str | None:
        """Re-hash this server's copy of the log up to its latest checkpoint (every entry, every
        tile, in a worker thread, without holding up appends: the files it reads are written once,
        partial tiles under new names): what it found, or why it could not run (a string), or
        None if there is nothing to audit."""
        from appliance.apps.log.verify import DirSource, LogVerifier, VerificationFailed

        verifier = self._verifier
        if verifier is None:
            return None
        directory = getattr(self.tree.storage, "root", None)
        if directory is None or self.tree.storage.read(CHECKPOINT_PATH) is None:
            return None  # not a directory store (tests in memory), or nothing signed yet
        checker = LogVerifier(DirSource(directory), verifier)
        async with self._lock:
            tip = self.tree.checkpoint()  # our tree beyond the checkpoint: its root is ours

        def run() -> AuditReport | str | None:
            try:
                latest = checker.latest()
                if not latest.size:
                    return None
                return audit_copy(checker, self.tree.storage, latest, tip)
            except VerificationFailed as exc:
                return str(exc)
            except LogError as exc:
                return f"the audit could not read the log: {exc}"

        return await trio.to_thread.run_sync(run)

    async def audit(self) -> bool:
        """Audit this server's copy of the log (see :meth:`_audit_report`). If it does not give
        the signed root: a ``log-store-damaged`` alert naming what differs, then a repair
        (:meth:`repair`). True if the copy passed its audit (after a repair if one was needed).
        One audit at a time (the periodic one and an operator's, ``pst log audit``)."""
        async with self._audit_lock:
            return await self._audit()

    def _check_records(self) -> tuple[list[str], bool]:
        """``state/tree`` and ``checkpoint`` against what this server holds in memory (under the
        lock, in a worker thread): each one that differs is named and rewritten from memory.
        A checkpoint file that does not verify while we have no note in memory (a restart
        found it so) is left, and the peers are asked for theirs (True): the first one that
        verifies and that our tree has replaces it (:meth:`_on_checkpoint`)."""
        storage, found, ask = self.tree.storage, list[str](), False
        want = self.tree.checkpoint().text().encode("utf-8")
        have = storage.read(STATE_PATH)
        if have != want and (have is not None or self.tree.size):  # an empty log has none yet
            how = "is missing" if have is None else "differs from this server's tree"
            found.append(f"{STATE_PATH} {how} (size {self.tree.size}): rewritten from the tree in memory")
            storage.write(STATE_PATH, want)
        if self._verifier is not None:
            note = storage.read(CHECKPOINT_PATH)
            if self._note is not None and note != self._note:
                how = (
                    "is missing"
                    if note is None
                    else "differs from the signed checkpoint this server published"
                )
                size = open_checkpoint(self._note, self.tree.origin, [self._verifier]).size
                found.append(f"{CHECKPOINT_PATH} {how} (size {size}): rewritten from memory")
                storage.write(CHECKPOINT_PATH, self._note)
            elif self._note is None and note is not None and self._published() is None:
                found.append(
                    f"{CHECKPOINT_PATH} does not verify with the log's key, and this server has no "
                    "checkpoint of its own in memory: asked the peers for theirs"
                )
                ask = True
        if found:
            storage.sync()
        return found, ask

    async def _audit(self) -> bool:
        if self._unchecked is not None:  # a rebuilt copy: first a signed checkpoint it matches
            self._broadcast({"log": "checkpoint-req"})
            with trio.move_on_after(self.repair_timeout):
                while self._unchecked is not None:  # cleared by _publish
                    await trio.sleep(0.05)
            if self._unchecked is not None:
                log.error("log: %s", self.damaged)
                return False
        elif not self.rebuilt.is_set():
            return False  # still rebuilding (``damaged`` says so)
        async with self._lock:
            records, ask = await trio.to_thread.run_sync(self._check_records)
        if records:
            self._damaged("this server's copy of the log is damaged: " + "; ".join(records))
        if ask:
            self._broadcast({"log": "checkpoint-req"})
            with trio.move_on_after(self.repair_timeout):
                while self._note is None:  # written by _on_checkpoint once one verifies
                    await trio.sleep(0.05)
            if self._note is None:
                self.damaged = (
                    f"this server's {CHECKPOINT_PATH} file does not verify and no peer sent one that "
                    "verifies and that this server's tree has"
                )
                log.error("log: %s", self.damaged)
                return False
        if records:
            self.repairs += 1
            log.warning("log: repaired this server's copy of the log: %s", "; ".join(records))
        found = await self._audit_report()
        if found is None:
            self.damaged = None
            return True
        if not isinstance(found, str) and found.ok:
            return await self._audit_index(found.signed_size)
        if isinstance(found, str):
            self._damaged(f"this server's copy of the log is damaged: {found}")
            return False
        self._damaged(f"this server's copy of the log is damaged: {found.message()}")
        return await self.repair(found)

    async def _audit_index(self, size: int) -> bool:
        """The search index against the bundles of the signed tree of ``size`` entries, which
        the audit has just checked (:func:`~appliance.apps.log.index.audit_index`). A difference
        raises ``log-store-damaged`` naming it; the index is dropped from the first wrong record
        and rebuilt from the authenticated bundles at once, then checked again."""
        storage, origin, verifier = self.tree.storage, self.tree.origin, self._verifier
        lines, drop = await trio.to_thread.run_sync(audit_index, storage, origin, size)
        if drop is None or verifier is None:
            self.damaged = None
            return True
        self._damaged(
            "this server's search index differs from its entry bundles: "
            + "; ".join(lines)
            + f" (dropped from bundle {drop} and rebuilt from the bundles)"
        )

        def rebuild() -> list[str]:
            drop_index_from(storage, drop)
            LogReader(storage, origin, [verifier]).update_index(max_bundles=1 << 40)
            return audit_index(storage, origin, size)[0]

        left = await trio.to_thread.run_sync(rebuild)
        if left:
            self.damaged = "this server's search index still differs after a rebuild: " + "; ".join(left)
            log.error("log: %s", self.damaged)
            return False
        self.damaged = None
        self.repairs += 1
        log.warning("log: rebuilt this server's search index from bundle %d", drop)
        return True

    async def repair(self, report: AuditReport) -> bool:
        """Repair what ``report`` found (:mod:`appliance.apps.log.repair`): tiles from our entries,
        bundles from the peers; rewrite the files under the lock, audit again. True if the copy
        now passes its audit (``damaged`` cleared); else ``damaged`` says why not."""
        repair = Repair(
            me=self.server_id,
            n=self.n,
            storage=self.tree.storage,
            origin=self.tree.origin,
            report=report,
            timeout=self.repair_timeout,
        )
        self._repairing, self._repair_inbox = repair, []
        try:
            await trio.to_thread.run_sync(repair.start, self._clock())
            while True:
                out, repair.out = repair.out, []
                for to, obj in out:
                    self._emit(to, obj)
                if repair.done:
                    break
                self._repair_wake = trio.Event()
                with trio.move_on_after(min(1.0, self.repair_timeout)):
                    await self._repair_wake.wait()
                inbox, self._repair_inbox = self._repair_inbox, []
                for sender, obj in inbox:
                    await trio.to_thread.run_sync(repair.receive, sender, obj, self._clock())
                repair.tick(self._clock())
        finally:
            self._repairing = None
        for peer, why in repair.bad_peers:
            log.warning("log: server %d sent bad data to repair this server's copy of the log: %s", peer, why)
        if repair.files is None:
            self.damaged = f"this server's copy of the log is damaged and was not repaired: {repair.failure}"
            log.error("log: %s", self.damaged)
            return False
        async with self._lock:
            await trio.to_thread.run_sync(self.tree.rewrite, repair.files)
        rewritten = [b.index for b in map(parse_path, repair.files) if isinstance(b, Bundle)]
        if rewritten:
            # The search index was made from the bundles as they were: forget it from there on.
            await trio.to_thread.run_sync(drop_index_from, self.tree.storage, min(rewritten))
        after = await self._audit_report()
        if after is None or (not isinstance(after, str) and after.ok):
            self.damaged = None
            self.repairs += 1
            log.warning("log: repaired this server's copy of the log: %s", repair.summary())
            return True
        why = after if isinstance(after, str) else after.message()
        self.damaged = f"this server's copy of the log is still damaged after a repair: {why}"
        log.error("log: %s", self.damaged)
        return False

    def request_audit(self) -> None:
        """Audit (and repair) soon, without waiting for the interval."""
        self._audit_now.set()

    async def audits(self, *, first: float = 30.0, interval: float = 600.0) -> None:
        """:meth:`audit` after ``first`` seconds, then every ``interval``, or sooner after
        :meth:`request_audit` but at most once a minute (until cancelled)."""
        with trio.move_on_after(first):
            await self._audit_now.wait()
        while True:
            self._audit_now = trio.Event()
            started = trio.current_time()
            await self.audit()
            with trio.move_on_at(started + interval):
                await self._audit_now.wait()
            await trio.sleep_until(started + min(interval, 60.0))

    def coordinator(self, period: int, stale: float) -> int:
        """Who asks for checkpoints in ``period`` after ``stale`` seconds without a new one."""
        return (period + int(stale // self.takeover)) % self.n + 1

    async def checkpoints(
        self,
        sign: Callable[[str], Awaitable[bytes]],
        public_key: bytes,
        *,
        interval: float = 0.8,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Publish checkpoints (see the module docstring) until cancelled; ``sign(text)`` returns
        the signed note of a checkpoint body, from the key-holder. ``interval`` is below a second
        so that, with the signing's jitter, a new checkpoint comes at least every second while
        the tree grows (issue 11; at exactly 1 s the p99 of the interval was 1.02-1.04 s)."""
        self._verifier = Verifier(self.tree.origin, public_key)
        async with self._lock:  # (a few small reads, once: in the loop, as it alerts)
            self._check_rollback()
        task_status.started()
        asked = False
        next_at = trio.current_time()
        while True:
            # A checkpoint every ``interval`` while the tree grows, the signing time included.
            next_at = max(next_at + interval, trio.current_time() + interval / 10)
            await trio.sleep_until(next_at)
            if not asked and self.replica.peers_heard():
                # Once the peers are heard: their latest checkpoints, so that one newer than our
                # file is written now, not when the log next grows.
                asked = True
                self._broadcast({"log": "checkpoint-req"})
            waiting = self._waiting_checkpoint
            if waiting is not None and waiting[1].size <= self.tree.size:
                self._waiting_checkpoint = None
                async with self._lock:
                    await trio.to_thread.run_sync(self._publish, *waiting)
            async with self._lock:
                current = await trio.to_thread.run_sync(self._published)
                size = self.tree.size
                if size == 0 or self.replica.rebuilding or (current is not None and current.size >= size):
                    self._seen_checkpoint = self._clock()
                    continue
                body = Checkpoint(
                    self.tree.origin, size, await trio.to_thread.run_sync(self.tree.root_at, size)
                )
            stale = self._clock() - self._seen_checkpoint
            if self.coordinator(self.replica.period, stale) != self.server_id:
                continue
            try:
                note = await sign(body.text())
            except Exception as exc:  # refused (a signer not there yet) or timed out: next time
                log.info("log: checkpoint of size %d not signed: %s", size, exc)
                continue
            async with self._lock:
                written = await trio.to_thread.run_sync(self._publish, note, body)
            if written:
                self._seen_checkpoint = self._clock()
                self.checkpointed = body.size
                self._broadcast({"log": "checkpoint", "note": note})

    async def read_entries(self, start: int, end: int) -> list[bytes]:
        async with self._lock:
            return await trio.to_thread.run_sync(self.tree.read_entries, start, end)

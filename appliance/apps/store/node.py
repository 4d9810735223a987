"""The store inside ``pst serve``: the trio glue around :class:`~.service.StoreService`.

Theory of operation
-------------------
:class:`StoreNode` runs in the network-facing process, which holds no share: decryption
shares come from the key-holder (``store_share`` over the key-holder link), and leave it
sealed to the reader's key.

* **Ordering.** The writes are the entries of a second replicated sequence: a
  :class:`~appliance.apps.log.node.LogNode` (the log's replica: slot-by-slot agreement, vote keys
  certified by the period's channel keys, catch-up from the peers) on its own
  :class:`~appliance.apps.log.tiles.TileLog` under ``<state>/serve/store/ops``, its frames tagged
  :data:`STORE_FRAME` and its vote-key announcements signed under the name ``store``.
  :meth:`StoreNode.write_many` (and :meth:`StoreNode.write`, one) checks the writes, queues
  their operations, and returns their outcomes once this server has applied them.
* **Batching** (group commit). A task takes everything queued (whole calls, up to
  :data:`MAX_WRITE_BATCH` operations) and hands it to the sequence as one batch; up to
  :data:`IN_FLIGHT` batches are being agreed at once, and what arrives meanwhile waits for the
  next one. A slot of the agreement names up to 64 batches, so many writes share one agreed
  slot, one sync per server, and one round of messages. The operations of one call stay in one
  batch, in their order (so a call's writes are applied in the order given).
* **Applying.** A task follows the sequence: every new entry goes through
  :meth:`StoreService.apply` in order, and the callers waiting on them learn their outcomes.
  The sequence is the journal (durable before an entry is applied); a snapshot of the state is
  written now and then (:mod:`.persist`: every ``SNAPSHOT_EVERY`` operations or
  ``SNAPSHOT_INTERVAL`` seconds) to ``<state>/serve/store/state``, and a restart applies the
  sequence's entries after it again.
* **Reads of secrets** (:meth:`StoreNode.read_secret`): asks and answers are frames tagged
  :data:`READ_FRAME`, taken only from authenticated period channels (``pst serve`` checks).
  Each server answers from its own state and clock (:meth:`StoreService.authorize`) and its
  key-holder's share; a policy refusal is an alert on the refusing server naming the server
  that asked and its client.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import trio

from appliance.apps.dsskeys.model import KEY_REGISTRY, Registry, key_name
from appliance.apps.log.errors import LogError
from appliance.apps.log.node import LogNode
from appliance.apps.log.tiles import PosixStorage, TileLog
from appliance.apps.store import model, persist
from appliance.apps.store.attest import Attestation, Attested, Verifier, attestation_payload
from appliance.apps.store.client import StoreKey, combine_answers
from appliance.apps.store.model import Client, DataType, ReadRequest, Record, Refused, WriteRequest
from appliance.apps.store.service import (
    ALERT_CODES,
    MAX_QUORUM_AGE,
    RID_SIZE,
    ContributeAsk,
    Contributed,
    FixedClock,
    Marked,
    Operation,
    PeriodMark,
    ReadAnswer,
    ReadAsk,
    Release,
    StoreService,
    decode_entry,
    decode_read_message,
)
from appliance.crypto.errors import DecodeError
from appliance.crypto.groups import Group
from appliance.host.files import atomic_write, make_dirs
from appliance.protocols._core import Alert, AlertKind

__all__ = ["READ_FRAME", "STORE_FRAME", "StoreNode", "is_store_frame"]

log = logging.getLogger("pst.store")

#: First byte of a frame of the store's replicated sequence (the log's is 0x00, links' 0x01).
STORE_FRAME = b"\x02"
#: First byte of a frame of the read protocol.
READ_FRAME = b"\x03"
ORIGIN = "pst-store"
#: The sequence's resend interval (the log's is 2 s): a restarted or wiped server starts
#: catching up after three of them without progress.
SEQUENCE_RESEND = 1.0
#: Seconds after a StoreUntil date before server i tries its release: (i-1) times this; and
#: seconds between two tries of one item.
RELEASE_STAGGER = 2.0
RELEASE_RETRY = 5.0
#: Seconds after this server's key-holder entered a period before server i puts the period's
#: mark in the store's sequence: (i-1) times this (one server usually does it for all); and
#: seconds between two tries while the sequence is behind.
MARK_STAGGER = 2.0
MARK_RETRY = 10.0
#: Refusals at apply that are alerts: a rule broken (a forged or too old certificate, another
#: application's data) or a malformed operation, which an honest origin never orders.
APPLY_ALERT_CODES = frozenset({model.NOT_PERMITTED, model.BAD_REQUEST})
#: Seconds a server waits to have applied what the asking server had, before it answers.
CATCH_UP_WAIT = 3.0
#: Seconds the asking server waits for answers.
READ_TIMEOUT = 8.0
#: Seconds after which the servers that have not answered are asked again.
RESEND = 1.0
#: Asks waiting for an answer at this server (more are dropped: the asker times out).
MAX_ASKS = 64
#: Operations in one batch of the sequence (whole calls: one call's may make it larger), and
#: batches of ours being agreed at once.
MAX_WRITE_BATCH = 2048
IN_FLIGHT = 4
#: Operations applied between two checkpoints of the trio loop (applying is CPU-bound).
APPLY_CHUNK = 32
#: Seconds a caller waits for a restarted server's replay of its journal before it is told
#: "not ready yet" (retryable: the answer carries READY_RETRY).
READY_WAIT = 5.0
READY_RETRY = 1.0
#: Seconds between two computations of the status's digest while the state changes.
DIGEST_EVERY = 1.0

KeyCall = Callable[[], Awaitable[Mapping[str, Any]]]
ShareCall = Callable[[list[list[bytes]], bytes], Awaitable[Mapping[str, Any]]]


def is_store_frame(data: bytes) -> bool:
    return data[:1] in (STORE_FRAME, READ_FRAME)


class StoreUnavailable(Exception):
    """The store cannot serve now (no store key yet, a timeout); the message says why.
    ``retry_after`` (seconds): when asking again may work (the API passes it on)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _Queued:
    """The operations of one call, waiting to be ordered: their indices once they are."""

    def __init__(self, entries: list[bytes]) -> None:
        self.entries = entries
        self.done = trio.Event()
        self.indices: list[int] = []
        self.error: Exception | None = None


class StoreNode:
    """This server's copy of the store, replicated with the others (see the module docstring)."""

    def __init__(
        self,
        *,
        server_id: int,
        n: int,
        t: int,
        directory: Path,
        send: Callable[[int, bytes], None],
        store_key: KeyCall,
        store_share: ShareCall,
        on_alert: Callable[[Alert], None] = lambda alert: None,
        base_timeout: float = 0.5,
        clock: Callable[[], float] = time.time,
        snapshots: persist.SnapshotPolicy | None = None,
    ) -> None:
        self.server_id, self.n, self.t = server_id, n, t
        self.directory = directory
        make_dirs(directory, 0o700)
        make_dirs(directory / "ops", 0o700)
        make_dirs(directory / "replica", 0o700)
        self._send = send
        self._store_key = store_key
        self._store_share = store_share
        self._on_alert = on_alert
        self._clock = clock
        self.sequence = LogNode(
            server_id=server_id,
            n=n,
            t=t,
            log=TileLog.open(PosixStorage(directory / "ops"), ORIGIN),
            storage=PosixStorage(directory / "replica"),
            send=send,
            on_alert=on_alert,
            base_timeout=base_timeout,
            resend=SEQUENCE_RESEND,
            frame_tag=STORE_FRAME,
            name="store",
        )
        self.service: StoreService[Any] | None = None
        self.key: StoreKey | None = None
        self._release_tried: dict[tuple[str, str], float] = {}
        self.group: Group[Any] | None = None
        self._applied = trio.Event()  # set (and replaced) each time operations were applied
        self._registry_written: bytes | None = None
        self._ready = trio.Event()
        #: Operations in the journal at start: applied before the store serves (what this
        #: server had acknowledged before it stopped, and maybe more).
        self._replay = 0
        self._answers: dict[bytes, dict[int, ReadAnswer]] = {}
        self._answered: dict[bytes, trio.Event] = {}
        self._asks_send, self._asks_receive = trio.open_memory_channel[tuple[int, ReadAsk | ContributeAsk]](
            MAX_ASKS
        )
        #: This period's channel identity (it signs our contributions to random joint secrets).
        self._ident: Any = None
        self._contributions: dict[bytes, dict[int, Contributed]] = {}
        self._alerted: dict[bytes, None] = {}  # rids of the last reads we raised an alert for
        #: Refusals this server answered (for the status page and tests), and agreed operations
        #: that broke a rule, refused when applied.
        self.refused = 0
        self.refused_writes = 0
        self._damage_alerted = False
        #: Operations applied that changed a record (the snapshots' interval counts only them).
        self._changes = 0
        self._nursery: trio.Nursery | None = None
        self._queue: list[_Queued] = []
        self._queued = trio.Event()
        self.snapshots = snapshots if snapshots is not None else persist.SnapshotPolicy()
        #: Batches of writes this server handed to the sequence, and the operations in them.
        self.batches = 0
        self.batched = 0
        self._digest: tuple[int, str | None] = (-1, None)
        self._digest_time = -math.inf

    @property
    def state_path(self) -> Path:
        return self.directory / "state"

    # --- Running -----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.sequence.run)
            task_status.started()
            await self._open()
            nursery.start_soon(self._answer_asks)
            nursery.start_soon(self._answer_asks)
            nursery.start_soon(self._releases)
            nursery.start_soon(self._batches)
            nursery.start_soon(self._snapshots)
            nursery.start_soon(self._marks)
            await self._follow()

    async def _open(self) -> None:
        """Wait for the key-holder's store key, then load (or start) the state."""
        while True:
            try:
                key = await self._store_key()
                break
            except Exception as exc:  # the key-holder is not there yet, or has no state yet
                log.debug("store: no store key yet: %s", exc)
                await trio.sleep(1.0)
        self.key = StoreKey.from_result(key)
        group = self.key.group
        # The state is derived from the sequence (the journal): the snapshot, then the entries
        # after it (applied by _follow). A snapshot that is unreadable, or ahead of the
        # operations we hold (they were lost; the replica fetches them again), is dropped.
        self.service = await trio.to_thread.run_sync(
            persist.load, self.state_path, group, self.key.public_key, self.t, self.sequence.size
        )
        self.snapshots.taken(self.service.applied, self._clock())
        vcert = key.get("vcert")
        if isinstance(vcert, bytes) and len(vcert) == 32:
            self.service.authority = model.Authority(vcert, self.n)
            mark = self.service.verifier.mark_table
            if mark is not None and not (mark.signature and mark.verify(vcert)):
                log.error("store: the snapshot's period mark is not signed by the group key: dropped")
                self.service.verifier = Verifier(self.t)
        else:
            log.error("store: the key-holder gave no group public key: quorum requests are refused")
        self.group = group
        log.info(
            "store: %d items, %d operations applied from the snapshot, %d in the sequence",
            len(self.service.state.records),
            self.service.applied,
            self.sequence.size,
        )

    async def _follow(self) -> None:
        """Apply the sequence's new entries in order; the callers waiting learn their outcomes."""
        service = self.service
        assert service is not None
        replay = self._replay = self.sequence.size  # the journal at start: applied before serving
        while True:
            if service.applied >= replay and not self._ready.is_set():
                self._ready.set()
                log.info(
                    "store: %d items, %d operations applied", len(service.state.records), service.applied
                )
            size = self.sequence.size
            if size > service.applied:
                end = min(size, service.applied + 1024)
                entries = await self.sequence.read_entries(service.applied, end)
                keys_changed = self._registry_written is None
                for k, entry in enumerate(entries):
                    outcome = service.apply(service.applied, entry)
                    if isinstance(outcome, Refused):
                        log.info("store: operation %d refused: %s", service.applied - 1, outcome.reason)
                        if outcome.code in APPLY_ALERT_CODES and service.applied > replay:
                            self._refused_at_apply(service.applied - 1, entry, outcome)
                    elif isinstance(outcome, Marked) and service.applied > replay:
                        self._attest(service.applied, service.verifier.mark_digest, outcome.period)
                    elif isinstance(outcome, Attested):
                        self._attested(service, again=service.applied <= replay)
                    elif isinstance(outcome, Record) and key_name(outcome.data_id) is not None:
                        keys_changed = True
                    if isinstance(outcome, Record):
                        self._changes += 1
                    if k % APPLY_CHUNK == APPLY_CHUNK - 1:
                        keys_changed = await self._wake(service, keys_changed)
                        await trio.sleep(0)  # the loop serves others while a long round applies
                await self._wake(service, keys_changed)
                continue
            with trio.move_on_after(1.0):  # the event is the wake-up; the timeout a safety net
                await self.sequence.grown.wait()

    def _attest(self, count: int, digest: bytes, period: int) -> None:
        """Put our signed store digest after the period mark (count ``count``) into the
        sequence (:mod:`.attest`), signed with our channel key of the mark's period; not if we
        are in another period now (our signature would not be of the mark's period)."""
        from appliance.net._tls import channel_certificate_der, channel_sign

        ident, nursery = self._ident, self._nursery
        if ident is None or nursery is None or ident.period != period:
            log.info("store: no signed digest at the mark of period %d (not in that period here)", period)
            return
        payload = attestation_payload(count, digest, period, self.server_id)
        entry = Attestation(
            count,
            digest,
            period,
            self.server_id,
            channel_certificate_der(ident),
            channel_sign(ident, payload),
        ).encode()

        async def send() -> None:
            try:
                with trio.move_on_after(60.0):
                    await self.sequence.append([entry])
            except LogError as exc:
                log.info("store: signed digest at %d not ordered here: %s", count, exc)

        nursery.start_soon(send)

    def _attested(self, service: StoreService[Any], *, again: bool) -> None:
        """An attestation applied: our copy damaged (t+1 others signed another digest: an
        alert, and the store stops serving; also found while a restarted server applies its
        journal ``again``: its snapshot was changed), or a server that signed another digest
        than the verified one (named; not again for what a restart re-applies)."""
        verifier = service.verifier
        if verifier.damaged is not None and not self._damage_alerted:
            self._damage_alerted = True
            self._alert(AlertKind.STORE_COPY_DAMAGED, self.server_id, verifier.damaged, logging.ERROR)
        while verifier.dissenters:
            server, count = verifier.dissenters.pop(0)
            if again:
                continue
            detail = (
                f"server {server} signed a store digest after {count} operations other than the one "
                f"{self.t + 1} or more servers, this one included, signed"
            )
            self._alert(AlertKind.STORE_COPY_DAMAGED, server, detail)

    def _alert(self, kind: AlertKind, server: int, detail: str, level: int = logging.WARNING) -> None:
        """Raise an alert about ``server`` (logged, and to the host's alert file)."""
        alert = Alert(kind, server, self.sequence.replica.period, detail)
        log.log(level, "%s", alert)
        self._on_alert(alert)

    def _refused_at_apply(self, index: int, entry: bytes, refused: Refused) -> None:
        """An agreed operation broke a rule (an honest origin checks a write before it orders
        it, so a faulty origin's, e.g. a forged or too old certificate): refused alike at every
        server, each raising ``store-write-refused`` naming the writer and the reason (not for
        what a restarted server applies again: it was alerted the first time)."""
        try:
            op = decode_entry(entry)
        except DecodeError:
            what = "bytes that are no operation"
        else:
            if isinstance(op, Operation):
                what = (
                    f"{_requester(op.client, op.quorum)}'s write of {op.request.app}/{op.request.data_id} "
                    f"({op.request.dtype.value})"
                )
            elif isinstance(op, Release):
                what = f"a release of {op.app}/{op.data_id}"
            elif isinstance(op, Attestation):
                what = f"server {op.server}'s signed store digest"
            else:
                what = "a period mark"
        self.refused_writes += 1
        detail = (
            f"operation {index} of the store's sequence, {what}, refused when applied "
            f"({refused.code}): {refused.reason} (every server refuses it alike; the operation "
            "does not name the server that ordered it)"
        )
        self._alert(AlertKind.STORE_WRITE_REFUSED, self.server_id, detail)

    async def _wake(self, service: StoreService[Any], keys_changed: bool) -> bool:
        """Tell the callers waiting what was applied (the key registry written first when an
        application's DSS key changed: an answered generate_dss_key is in the file)."""
        if keys_changed:
            await self._write_key_registry(service)
        event, self._applied = self._applied, trio.Event()
        event.set()
        return False

    async def _snapshots(self) -> None:
        """Write a snapshot of the state when the policy says so (see :mod:`.persist`); not
        for the interval when only period marks and signed digests came since the last one
        (an idle store would write its whole state every period: the journal replays those
        few entries cheaply)."""
        changes_at_snapshot = -1
        while True:
            await trio.sleep(1.0)
            service = self.service
            if service is None or not self.snapshots.due(service.applied, self._clock()):
                continue
            behind = service.applied - self.snapshots.applied
            if self._changes == changes_at_snapshot and behind < self.snapshots.every:
                continue
            changes_at_snapshot = self._changes
            snapshot = persist.Snapshot.of(service)
            await trio.to_thread.run_sync(persist.write, self.state_path, snapshot)
            self.snapshots.taken(snapshot.applied, self._clock())
            log.debug("store: snapshot of %d operations written", snapshot.applied)

    async def _marks(self) -> None:
        """Put the period mark of each period this server's key-holder enters into the store's
        sequence (:class:`~.service.PeriodMark`: the period's KeyTable the group key signed),
        once the sequence is behind it: what a quorum's certificate's age is measured against
        at apply (service.MAX_QUORUM_AGE). Timing here is only about who tries first; every
        server checks the mark's signature alike."""
        seen: dict[int, float] = {}
        last_try = -math.inf
        while True:
            await trio.sleep(2.0)
            service = self.service
            if service is None or service.authority is None or not self._ready.is_set():
                continue
            try:
                raw = (await self._store_key()).get("table")
            except Exception:  # the key-holder is being replaced (a refresh): next time
                continue
            if not isinstance(raw, bytes):
                continue
            table = model.signed_table(raw, service.authority.vcert)
            if table is None or table.period <= service.period:
                continue
            now = trio.current_time()
            first = seen.setdefault(table.period, now)
            for old in [p for p in seen if p < table.period]:
                del seen[old]
            if now - first < (self.server_id - 1) * MARK_STAGGER or now - last_try < MARK_RETRY:
                continue
            last_try = now
            try:
                with trio.move_on_after(60.0):
                    await self.sequence.append([PeriodMark(raw).encode()])
            except LogError as exc:  # ordered while we caught up, or the sequence is busy
                log.info("store: period mark %d not ordered here: %s", table.period, exc)

    async def _batches(self) -> None:
        """Hand the queued writes to the sequence, a batch at a time (module docstring)."""
        slots = trio.Semaphore(IN_FLIGHT)
        async with trio.open_nursery() as nursery:
            while True:
                while not self._queue:
                    await self._queued.wait()
                    self._queued = trio.Event()
                await slots.acquire()
                take, count = 0, 0
                while take < len(self._queue) and (
                    take == 0 or count + len(self._queue[take].entries) <= MAX_WRITE_BATCH
                ):
                    count += len(self._queue[take].entries)
                    take += 1
                calls, self._queue = self._queue[:take], self._queue[take:]
                nursery.start_soon(self._order, calls, slots)

    async def _order(self, calls: list[_Queued], slots: trio.Semaphore) -> None:
        try:
            entries = [e for call in calls for e in call.entries]
            self.batches += 1
            self.batched += len(entries)
            try:
                indices = await self._append(entries)
            except Exception as exc:  # not ordered (LogError): every caller hears it
                for call in calls:
                    call.error = exc
                    call.done.set()
                return
            at = 0
            for call in calls:
                call.indices = indices[at : at + len(call.entries)]
                at += len(call.entries)
                call.done.set()
        finally:
            slots.release()

    @property
    def key_registry_path(self) -> Path:
        """The application DSS keys this store holds, for the key-holder's check (apps/dsskeys)."""
        return self.directory / KEY_REGISTRY

    async def _write_key_registry(self, service: StoreService[Any]) -> None:
        data = Registry.from_records(service.state.records.values()).encode()
        if data != self._registry_written:
            await trio.to_thread.run_sync(atomic_write, self.key_registry_path, data)
            self._registry_written = data

    async def ready(self) -> StoreService[Any]:
        """The service, once this server has applied its whole journal as it was at start (so
        it never answers from a state older than one it acknowledged before it stopped).
        StoreUnavailable after READY_WAIT seconds otherwise: not open yet, or "not ready yet"
        with how far the replay is (retryable)."""
        with trio.move_on_after(READY_WAIT):
            await self._ready.wait()
        service = self.service
        if service is None:
            raise StoreUnavailable(
                "the store is not open yet (no store key from the key-holder)", READY_RETRY
            )
        if service.verifier.damaged is not None:
            raise StoreUnavailable(f"{service.verifier.damaged}; it must be rebuilt (docs/store.md)")
        if not self._ready.is_set():
            raise StoreUnavailable(
                f"not ready yet: this server is applying its journal again after a restart "
                f"({service.applied} of {self._replay} operations); try again",
                READY_RETRY,
            )
        return service

    async def _until_applied(self, count: int, timeout: float) -> bool:
        service = self.service
        assert service is not None
        with trio.move_on_after(timeout):
            while service.applied < count:
                await self._applied.wait()
        return service.applied >= count

    # --- Writes --------------------------------------------------------------------------------

    def _oldest_period(self) -> int:
        """A quorum's certificate this server takes in a read, or admits in a write, is of the
        previous period or later, and not one the apply would find too old already (the
        store sequence's period less MAX_QUORUM_AGE: a server behind admits nothing the
        network refuses; docs/store.md)."""
        sequence = self.service.period - MAX_QUORUM_AGE if self.service is not None else 0
        return max(0, self.sequence.replica.period - 1, sequence)

    async def write(
        self, request: WriteRequest, client: Client, quorum: model.Quorum | None = None
    ) -> Record:
        """Order ``request`` through the network and apply it: the record, or Refused."""
        (outcome,) = await self.write_many([request], client, quorum)
        if isinstance(outcome, Refused):
            raise outcome
        return outcome

    async def write_many(
        self, requests: Sequence[WriteRequest], client: Client, quorum: model.Quorum | None = None
    ) -> list[Record | Refused]:
        """Order ``requests`` through the network, in this order, and apply them: each one's
        record, or its refusal. A request this server would refuse now is refused here and not
        sent (a rule broken: an alert naming the requester); the others are applied in the
        agreed order (a request may still be refused there, e.g. the second of two writes of
        one write-once id)."""
        service = await self.ready()
        at = self._clock()
        view = FixedClock(at, service.authority, self._oldest_period())
        requester: model.Requester = quorum if quorum is not None else client
        outcomes: list[Record | Refused | None] = []
        entries: list[bytes] = []
        where: list[int] = []
        for request in requests:
            try:
                service.state.check_write(request, requester, view)  # refused here: not sent
            except Refused as exc:
                if exc.code == model.NOT_PERMITTED:
                    detail = (
                        f"{_requester(client, quorum)} asked to write {request.app}/{request.data_id} "
                        f"({request.dtype.value}): refused: {exc.reason}"
                    )
                    self._alert(AlertKind.STORE_WRITE_REFUSED, self.server_id, detail)
                outcomes.append(exc)
                continue
            where.append(len(outcomes))
            outcomes.append(None)
            entries.append(Operation(request, client, round(at * 1000), quorum).encode())
        if entries:
            call = _Queued(entries)
            self._queue.append(call)
            self._queued.set()
            await call.done.wait()
            if call.error is not None:
                raise StoreUnavailable(f"the writes were not ordered: {call.error}")
            if not await self._until_applied(call.indices[-1] + 1, 30.0):
                raise StoreUnavailable("the writes were ordered but not applied here in time")
            for slot, index in zip(where, call.indices, strict=True):
                outcome = service.outcomes.get(index)
                if not isinstance(outcome, (Record, Refused)):
                    raise StoreUnavailable("a write's outcome is no longer known here")
                outcomes[slot] = outcome
        return [o for o in outcomes if o is not None]

    async def _append(self, entries: list[bytes]) -> list[int]:
        """Put ``entries`` in the sequence: their indices once they are there."""
        start = self.sequence.size
        try:
            return list(await self.sequence.append(entries))
        except LogError:
            # Ordered while this server caught up from behind (the replica took the state t+1
            # servers reported, and the entries up to it): the sequence does not say where. Each
            # is after ``start``: the first entry with its bytes (an operation names its client
            # and the origin's clock in ms).
            end = self.sequence.size
            wanted = {e: None for e in entries}
            found: dict[bytes, int] = {}
            for at in range(start, end, 256):
                for k, e in enumerate(await self.sequence.read_entries(at, min(end, at + 256))):
                    if e in wanted and e not in found:
                        found[e] = at + k
            if len(found) < len(wanted):
                raise
            return [found[e] for e in entries]

    # --- Reads ---------------------------------------------------------------------------------

    async def read_public(self, app: str, data_id: str, client: Client) -> Record:
        service = await self.ready()
        return service.state.read_public(app, data_id, client, FixedClock(self._clock()))

    async def read_secret(
        self, request: ReadRequest, client: Client, quorum: model.Quorum | None = None
    ) -> tuple[Record, dict[int, ReadAnswer]]:
        """This server's record and every server's answer (sealed shares or a refusal)."""
        service = await self.ready()
        record = service.state.get(request.app, request.data_id)
        if not record.dtype.secret:
            raise Refused(model.BAD_REQUEST, f"{request.app}/{request.data_id} is public: read its value")
        rid = os.urandom(RID_SIZE)
        ask = ReadAsk(rid, request, client, service.applied, quorum)
        answers: dict[int, ReadAnswer] = {}
        done = trio.Event()
        self._answers[rid], self._answered[rid] = answers, done
        try:
            data = READ_FRAME + ask.encode()
            for peer in range(1, self.n + 1):
                if peer != self.server_id:
                    self._send(peer, data)
            self._record(rid, self.server_id, await self._answer(self.server_id, ask))
            deadline = trio.current_time() + READ_TIMEOUT
            while not self._enough(answers) and trio.current_time() < deadline:
                # Asked again every RESEND seconds: a frame sent while a peer's channel was
                # being re-keyed for a new period is lost (answers are idempotent per rid).
                with trio.move_on_at(min(deadline, trio.current_time() + RESEND)) as waited:
                    await done.wait()
                    done = self._answered[rid] = trio.Event()
                if waited.cancelled_caught:
                    for peer in range(1, self.n + 1):
                        if peer != self.server_id and peer not in answers:
                            self._send(peer, data)
        finally:
            del self._answers[rid], self._answered[rid]
        return record, dict(answers)

    def _enough(self, answers: Mapping[int, ReadAnswer]) -> bool:
        shares = sum(1 for a in answers.values() if a.shares is not None)
        return len(answers) >= self.n or shares >= 2 * self.t + 1

    def _record(self, rid: bytes, sender: int, answer: ReadAnswer) -> None:
        answers = self._answers.get(rid)
        if answers is None or sender in answers:
            return
        answers[sender] = answer
        self._answered[rid].set()

    async def frame(self, sender: int, data: bytes) -> None:
        """A store frame from an authenticated peer (``is_store_frame(data)``)."""
        if data[:1] == STORE_FRAME:
            await self.sequence.frame(sender, data)
            return
        try:
            message = decode_read_message(data[1:], self.t)
        except DecodeError as exc:
            log.warning("store: server %d sent a bad read message: %s", sender, exc)
            return
        if isinstance(message, ReadAnswer):
            self._record(message.rid, sender, message)
            return
        if isinstance(message, Contributed):
            got = self._contributions.get(message.rid)
            if got is not None and sender not in got:
                got[sender] = message
                self._answered[message.rid].set()
            return
        try:
            self._asks_send.send_nowait((sender, message))
        except trio.WouldBlock:
            log.warning("store: too many reads waiting; server %d's ask dropped", sender)

    async def _answer_asks(self) -> None:
        async for sender, ask in self._asks_receive:
            if isinstance(ask, ContributeAsk):
                self._send(sender, READ_FRAME + (await self._contribute(ask)).encode())
                continue
            answer = await self._answer(sender, ask)
            self._send(sender, READ_FRAME + answer.encode())

    # --- Random joint secrets: the servers' contributions -----------------------------------------

    async def identity(self, period: int | None, keys: Mapping[int, bytes], ident: Any) -> None:
        """The period's identity from the key-holder (``pst serve``): the sequence's vote keys,
        and the channel key our contributions are signed with."""
        if ident is not None:
            self._ident = ident
        await self.sequence.identity(period, keys, ident)

    async def _contribute(self, ask: ContributeAsk) -> Contributed:
        """Our contribution: 32 random bytes of our own, sealed under the store key with the
        item's label for our part, signed by our channel key of this period."""
        from appliance.crypto.secret import system_scalar_source
        from appliance.net._tls import channel_certificate_der, channel_sign

        ident, service = self._ident, self.service
        if ident is None or service is None:
            return Contributed(ask.rid, code="unavailable", reason="no channel key or store here now")
        if (ask.app, ask.data_id) in service.state.records:
            return Contributed(ask.rid, code=model.EXISTS, reason=f"{ask.app}/{ask.data_id} exists")
        group = service.group

        def make() -> tuple[bytes, bytes]:
            return model.contribute(
                group,
                service.state.public_key,
                ask.app,
                ask.data_id,
                ask.version,
                self.server_id,
                os.urandom(32),
                ident.period,
                channel_certificate_der(ident),
                lambda payload: channel_sign(ident, payload),
                system_scalar_source(group.order),
            )

        sealed, proof = await trio.to_thread.run_sync(make)
        return Contributed(ask.rid, sealed, proof)

    async def contributions(self, app: str, data_id: str, version: int = 1) -> WriteRequest:
        """A random joint secret's write request: the sealed contributions (with their proofs)
        of every server that answered within the read timeout with a proof of our period (at
        least t+1, ours included); Refused or StoreUntil otherwise."""
        await self.ready()
        rid = os.urandom(RID_SIZE)
        ask = ContributeAsk(rid, app, data_id, version)
        got: dict[int, Contributed] = {}
        self._contributions[rid], self._answered[rid] = got, trio.Event()
        try:
            data = READ_FRAME + ask.encode()
            for peer in range(1, self.n + 1):
                if peer != self.server_id:
                    self._send(peer, data)
            got[self.server_id] = await self._contribute(ask)
            deadline = trio.current_time() + READ_TIMEOUT
            while len(got) < self.n and trio.current_time() < deadline:
                with trio.move_on_at(min(deadline, trio.current_time() + RESEND)) as waited:
                    await self._answered[rid].wait()
                    self._answered[rid] = trio.Event()
                if waited.cancelled_caught:
                    if sum(1 for c in got.values() if c.sealed) >= self.t + 1:
                        break  # enough, and the others are slow
                    for peer in range(1, self.n + 1):
                        if peer != self.server_id and peer not in got:
                            self._send(peer, data)
        finally:
            del self._contributions[rid], self._answered[rid]
        mine = got[self.server_id]
        if not mine.sealed:
            raise Refused(mine.code, f"no contribution here: {mine.reason}")
        period = model.Contribution.decode(mine.proof).period
        sealed, proofs = {}, {}
        for server, c in sorted(got.items()):
            try:
                if c.sealed and model.Contribution.decode(c.proof).period == period:
                    sealed[server], proofs[server] = c.sealed, c.proof
            except DecodeError as exc:  # a faulty peer's; every server would refuse it anyway
                log.warning("store: server %d's contribution: %s", server, exc)
        if len(sealed) < self.t + 1:
            refusals = "; ".join(f"server {i}: {c.reason}" for i, c in sorted(got.items()) if not c.sealed)
            raise StoreUnavailable(
                f"{len(sealed)} servers contributed, a random joint secret needs {self.t + 1}"
                + (f" ({refusals})" if refusals else "")
            )
        return WriteRequest(app, data_id, DataType.JOINT_SECRET, version, sealed=sealed, proofs=proofs)

    async def store_contribute(self, app: str, data_id: str) -> bytes:
        """The API's backend: the encoded write request of a random joint secret (not ordered:
        a quorum of the application's clients approves it first)."""
        return (await self.contributions(app, data_id)).encode()

    async def _answer(self, sender: int, ask: ReadAsk) -> ReadAnswer:
        """Our answer to ``ask`` from server ``sender``: sealed shares, or the refusal (an alert
        when it broke a rule)."""
        if self.service is None:
            return ReadAnswer(ask.rid, code="unavailable", reason="the store is not open")
        service = self.service
        await self._until_applied(ask.after, CATCH_UP_WAIT)
        try:
            parts = service.authorize(ask.request, ask.requester, self._clock, self._oldest_period())
        except Refused as exc:
            self.refused += 1
            if exc.code in ALERT_CODES and ask.rid not in self._alerted:
                self._alerted[ask.rid] = None  # one alert per read, however often it is asked
                while len(self._alerted) > MAX_ASKS:
                    del self._alerted[next(iter(self._alerted))]
                detail = (
                    f"server {sender} asked for shares of {ask.request.app}/{ask.request.data_id} for "
                    f"{_requester(ask.client, ask.quorum)}: refused ({exc.code}): {exc.reason}"
                )
                self._alert(AlertKind.STORE_READ_REFUSED, sender, detail)
            return ReadAnswer(ask.rid, code=exc.code, reason=exc.reason[:1000])
        try:
            got = await self._share(parts, ask.request.reader)
            shares = got["shares"]
            if not isinstance(shares, list) or len(shares) != len(parts):
                raise ValueError("the key-holder returned no shares")
            return ReadAnswer(
                ask.rid,
                int(got["period"]),
                tuple(bytes(c) for c in got["commitment"]),
                {part: bytes(s) for (part, _k, _l), s in zip(parts, shares, strict=True)},
            )
        except Exception as exc:  # the key-holder refused (recovering) or timed out
            return ReadAnswer(
                ask.rid,
                code="unavailable",
                reason=f"no decryption share: {exc}"[:1000],
            )

    async def _share(self, parts: list[tuple[int, bytes, bytes]], reader: bytes) -> Mapping[str, Any]:
        """The key-holder's sealed shares; tried again twice, half a second apart: right after a
        refresh the retiring key-holder has wiped its shares and the next one is starting."""
        for attempt in range(3):
            try:
                return await self._store_share([[kem, lbl] for _part, kem, lbl in parts], reader)
            except Exception:
                if attempt == 2:
                    raise
                await trio.sleep(0.5)
        raise AssertionError("unreachable")

    # --- StoreUntil's release at the date ----------------------------------------------------------

    async def _releases(self) -> None:
        """Release every StoreUntil item whose date this server's clock has passed: server i
        tries (i-1)*RELEASE_STAGGER seconds after the date (one server usually does it for all),
        again every RELEASE_RETRY seconds while the item is not released."""
        while True:
            await trio.sleep(1.0)
            service, key = self.service, self.key
            if service is None or key is None:
                continue
            now = self._clock()
            for record in service.due_releases(now - (self.server_id - 1) * RELEASE_STAGGER):
                where = (record.app, record.data_id)
                if now - self._release_tried.get(where, -RELEASE_RETRY) < RELEASE_RETRY:
                    continue
                self._release_tried[where] = now
                try:
                    await self._release(key, record)
                except Exception as exc:  # not enough shares yet, the sequence busy: next time
                    log.info("store: %s/%s not released yet: %s", record.app, record.data_id, exc)

    async def _release(self, key: StoreKey, record: Record) -> None:
        import nacl.public

        reader = nacl.public.PrivateKey.generate()
        request = ReadRequest(record.app, record.data_id, record.version, bytes(reader.public_key))
        current, answers = await self.read_secret(request, Client(record.app, b""))
        _sealed, data_key = combine_answers(key, current, answers_to_obj(answers), reader)
        release = Release(record.app, record.data_id, record.version, data_key, round(self._clock() * 1000))
        (index,) = await self.sequence.append([release.encode()])
        if await self._until_applied(index + 1, 30.0):
            outcome = self.service.outcomes.get(index) if self.service is not None else None
            if isinstance(outcome, Record):
                log.info("store: released %s/%s (StoreUntil, its date passed)", record.app, record.data_id)

    # --- The local API's backend (appliance.api.StoreBackend) ---------------------------------

    async def store_key(self) -> Mapping[str, Any]:
        await self.ready()
        key = dict(await self._store_key())
        key.pop("table", None)  # the period mark's, not the clients'
        return key

    async def store_write(
        self, request: bytes, app: str, unique_id: bytes, quorum: bytes | None = None
    ) -> Mapping[str, Any]:
        try:
            write = WriteRequest.decode(request)
            q = model.Quorum.decode(quorum) if quorum is not None else None
        except DecodeError as exc:
            raise Refused(model.BAD_REQUEST, str(exc)) from None
        record = await self.write(write, Client(app, unique_id), q)
        return {"data_id": record.data_id, "type": record.dtype.value, "version": record.version}

    async def store_write_many(
        self, requests: list[bytes], app: str, unique_id: bytes
    ) -> list[Mapping[str, Any]]:
        decoded: list[WriteRequest] = []
        results: list[Mapping[str, Any] | None] = []
        for raw in requests:
            try:
                decoded.append(WriteRequest.decode(raw))
                results.append(None)
            except DecodeError as exc:
                results.append({"code": model.BAD_REQUEST, "message": str(exc)[:1000]})
        outcomes = iter(await self.write_many(decoded, Client(app, unique_id)))
        out: list[Mapping[str, Any]] = []
        for result in results:
            if result is not None:
                out.append(result)
                continue
            outcome = next(outcomes)
            if isinstance(outcome, Refused):
                out.append({"code": outcome.code, "message": str(outcome)[:1000]})
            else:
                out.append(
                    {"data_id": outcome.data_id, "type": outcome.dtype.value, "version": outcome.version}
                )
        return out

    async def store_retrieve(
        self, app: str, unique_id: bytes, data_id: str, reader: bytes | None, quorum: bytes | None = None
    ) -> Mapping[str, Any]:
        service = await self.ready()
        client = Client(app, unique_id)
        try:
            q = model.Quorum.decode(quorum) if quorum is not None else None
        except DecodeError as exc:
            raise Refused(model.BAD_REQUEST, str(exc)) from None
        record = service.state.get(app, data_id)
        if record.dtype == DataType.STORE_UNTIL and record.value:  # released at its date
            return {"record": record.to_obj()}
        if not record.dtype.secret:
            record = await self.read_public(app, data_id, client)
            return {"record": record.to_obj()}
        if reader is None:  # the record only (its ciphertexts): what it is, which version
            return {"record": record.to_obj()}
        read = ReadRequest(app, data_id, record.version, reader)
        record, answers = await self.read_secret(read, client, q)
        return {"record": record.to_obj(), "answers": answers_to_obj(answers)}

    def status(self) -> dict[str, Any]:
        service = self.service
        if service is not None and service.applied != self._digest[0]:
            # Peers' status pages poll this every second or so: while writes stream in, the
            # digest is computed at most every DIGEST_EVERY seconds (``digest_applied`` says
            # which count it is of); once nothing changes it is the current state's.
            now = time.monotonic()
            if now - self._digest_time >= DIGEST_EVERY or self._digest[1] is None:
                self._digest, self._digest_time = (service.applied, service.digest().hex()), now
        return {
            "items": 0 if service is None else len(service.state.records),
            "applied": 0 if service is None else service.applied,
            "digest": self._digest[1],
            "digest_applied": self._digest[0] if self._digest[1] is not None else None,
            "refused_reads": self.refused,
            "refused_writes": self.refused_writes,
            "period": 0 if service is None else service.period,
            # the latest count at which t+1 servers signed our digest, and whether our copy is damaged
            "verified": 0 if service is None else service.verifier.verified,
            "damaged": service is not None and service.verifier.damaged is not None,
            "batches": self.batches,
            "batched": self.batched,
            "snapshot": self.snapshots.applied,
        }


def _requester(client: Client, quorum: model.Quorum | None) -> str:
    """Who asked, for an alert: the client (application, unique id in hex), or the quorum."""
    if quorum is None:
        return f"client {client.app}/{client.unique_id.hex()}"
    return f"a quorum of {quorum.app} (period {quorum.period}, {len(quorum.votes)} votes)"


def answers_to_obj(answers: Mapping[int, ReadAnswer]) -> dict[int, dict[str, Any]]:
    """The answers as the API returns them (each server's shares, or its refusal)."""
    out: dict[int, dict[str, Any]] = {}
    for server, a in sorted(answers.items()):
        if a.shares is not None:
            out[server] = {"period": a.period, "commitment": list(a.commitment), "shares": dict(a.shares)}
        else:
            out[server] = {"code": a.code, "reason": a.reason}
    return out

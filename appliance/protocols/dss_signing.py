"""Threshold DSS (P-256 ECDSA, DSA 2048/256) on request, from presignatures made ahead (sans-IO).

Theory of operation
-------------------
Every DSS secret ``<id>`` of C (``Constants.secrets``, group ``p256`` or ``dsa2048``) gets the
service ``sign/<id>``, one per period like the FROST services of
:mod:`~appliance.protocols.signing`. Its crypto is :mod:`appliance.crypto.dss` (GJKR presign,
one-round online signing with identifiable abort); this module carries it over the network.

Presign sessions (in the background). Each server *coordinates* the presignatures it will
use itself, so two coordinators never consume one presignature. When its stock falls below
``LOW_WATER`` the coordinator c opens a session of ``BATCH`` presignatures, naming the
participants: itself and every server it does not currently avoid (at least 2t+1).

1. ``open`` (c -> participants). Every participant deals: a public ``deal`` (the
   :class:`~appliance.crypto.dss.NonceDealing` s, one per presignature, to every participant)
   and private ``shares`` (to each participant its shares, each a
   :class:`~appliance.crypto.vss.ShareMessage`, all of them under one signature with the
   dealer's period key, so that a bad one convicts the dealer before anyone; a complaint
   carries the session's shares). The channels are the encrypted period links.
2. ``report`` (participant -> c): the digest of every dealing whose shares all check, and a
   complaint (the dealer's signed message) for every share that does not.
3. ``qual`` (c -> active): c judges the complaints (anyone can: dealer or accuser is guilty),
   and fixes the active set A (at least 2t+1) and QUAL1 (at least t+1 dealers every member of
   A holds with the same digest), with the digests and the reports that carried complaints.
   Each member checks the decision against its own dealings (a dealer convicted by a forwarded
   complaint, a digest it does not hold: it drops out) and ``echo`` es its digest to A; it
   goes on only when every member of A echoed the same decision (a coordinator cannot give
   members different QUAL1 sets; a mismatch is an equivocation alert naming c).
4. ``opening`` (member -> A): z_i alone. With every member's z_i in (at least 3t+1) and all on
   one degree-2t polynomial, each member computes R with no proof made or checked (the honest
   2t+1 fix the polynomial). Otherwise (an inconsistency, or a member late by ROUND_WAIT/2) a
   member asks all for their proofs (``needproofs``; each answers once with ``oproofs``, its
   openings with proofs), interpolates R from 2t+1 valid ones, and a bad proof, or a proof of
   another z_i than the one opened, names its sender.
5. ``wdeal``/``wshares`` (member -> A): the Pedersen dealing of kappa_i x_i with its proof,
   and signed private shares; ``wreport`` to c as in 2. The proofs are not checked here: the
   presignature keeps the reduction set's dealings, and if a signature made from it fails to
   verify while every signature share is right, the coordinator checks them then
   (:func:`~appliance.crypto.dss.blame_w_dealings`), names the dealer (alert, avoided) and
   drops the stock it spoiled. A bad w only makes the signature wrong; the shares it makes
   the honest servers release are the right ones shifted by what the cheater knows, so it
   learns nothing it would not learn from the right signature.

Share checks (steps 1 and 5) are batched: a dealer's shares of a whole session in one random
linear combination (weights from ``secrets``, drawn after the shares arrived), and in the
nonce round the sums over all dealers at once, each dealer alone only when that fails (see
:meth:`DSSSigningService._check_shares`). A dealer's signature on a recipient's shares of
the session is checked only when we complain (the evidence); it signs none for itself.
6. ``final`` (c -> holders): the holders H (at least t+1 members holding the same digests of
   at least 2t+1 valid w dealings) and the reduction set S (the 2t+1 smallest of them); each
   holder checks it as in 3 and stores its presignatures (reserved for c).

A session that stalls (a silent participant) is abandoned after ``SESSION_TIMEOUT``; those
that did not answer the current step are avoided for a while and a new session starts.

Online signing. To sign m, c takes the oldest presignature P of its stock.

1. ``lock`` (c -> holders of P): each holder binds P to SHA-256(m) the first time and answers
   a signed ``locked``; asked to bind P to another message it answers ``conflict`` and raises
   an equivocation alert naming c.
2. ``request`` (c -> t holders that locked): the message with q = ceil((|H|+t+1)/2) signed
   locks. Two such quorums share t+1 holders, one of them honest, who bound P to one message
   only: so no P is ever used on two messages, which would give whoever holds the two shares
   kappa and kappa x, hence the key (each share s_j = kappa_j h + r (kappa x)_j is one linear
   equation; two messages give two). A signer checks the locks, runs the PayloadCheck (refuse
   and alert naming c otherwise; a key with ``only_checked`` signs nothing unclaimed), uses P
   once (it is wiped) and sends its ``share``.
3. c combines t+1 shares (optimistically; a bad share names its signer, who is avoided) and
   the attempt is retried with another presignature and signer set.

Batching. The online messages (``lock``, ``locked``, ``request``, ``share``, the answers
``refuse``/``missing``/``conflict``, ``discard``) that one drain has for one peer go out as one
``batch`` envelope: each message in it is sealed on its own as before (a ``locked`` is forwarded
as evidence) and the receiver opens and handles each as if it came alone, so several tokens of
one coordinator travel in one lock round and one signing round (one frame per peer and round
through the key-holder link and the channel), every payload still checked by every signer
against its own state, a refusal (and its alert) for that payload only. A malformed item is
recorded against the peer and the rest go on. Nothing waits to fill a batch: it holds what one
step of the loop produced. Only ``discard`` (a holder may forget a presignature that was used
or given up) waits up to ``DISCARD_DELAY`` for a batch to ride in; a holder keeping it a little
longer changes nothing (it is bound to its message or never signs).

Payload checks as in :mod:`~appliance.protocols.signing`, with its two optional hooks: the
check learns which server asked (``check_from``: a timestamp's serial must be that server's),
and what is signed may be a form the check computes from the payload (``signed_bytes``: a
TSTInfo is checked, its CMS signed attributes signed); the coordinator combines the shares over
that same form. The lock binds the payload itself. A third hook picks the key: ``key_tweak(message,
group, public_key) -> d`` signs under the secret's key plus d (an application's key,
:mod:`appliance.crypto.appkeys`; every signer computes d itself from the payload).

When the stock runs dry a request waits (presigning goes on in the background) until
``REQUEST_TIMEOUT`` after it was made, then fails with a clear error saying so. A request that
waited is checked again by its coordinator before anything is sent: what it accepted then may be
stale now (a timestamp's genTime), and it then fails here instead of being refused, with an
alert on us, by the others. Holders keep
at most ``MAX_HELD`` presignatures per coordinator. Presignatures belong to one period's
share: the node replaces the service at every refresh and :meth:`DSSSigningService.wipe`
erases them all (the crypto also refuses a presignature of another key sharing).
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from appliance.crypto import appkeys, dss, encoding
from appliance.crypto.errors import CheatingError, CryptoError, DecodeError, NotEnoughSharesError
from appliance.crypto.groups import Group
from appliance.crypto.keyshare import KeyShare
from appliance.crypto.vss import Complaint, ShareMessage
from appliance.protocols._core import Alert, AlertKind, Outgoing, RemoteProtocolError, Signer, ed25519_verify
from appliance.protocols.services import open_envelope, seal
from appliance.protocols.signing import (
    MAX_MESSAGE,
    MAX_REASON,
    PayloadCheck,
    PayloadGate,
    Refusal,
    SigningRefused,
    is_protocol_payload,
    own_check_code,
    refusal_code,
    run_check,
    signed_form,
)
from appliance.protocols.state import KeyTable

E = TypeVar("E")

#: Presignatures per session, and the stock below which a coordinator opens a session. Large
#: sessions amortize their messages, and one session per MIN_OPEN_INTERVAL caps a coordinator
#: at 2 * BATCH presignatures a second (docs/performance.md).
BATCH = 16
LOW_WATER = 16
#: Presignatures a holder keeps for one coordinator (it joins no session of c beyond that).
MAX_HELD = 32
MAX_BATCH = 16
#: A participant reports (and the coordinator decides) this long after a step began, with
#: whatever arrived, unless everything arrived earlier.
ROUND_WAIT = 1.0
SESSION_TIMEOUT = 10.0
#: A session whose dealing step has not heard 2t+1 reports by then is given up at once (its
#: open was lost, e.g. sent before the channels were up): a new one starts without the silent.
DEAL_TIMEOUT = 3.0
REQUEST_TIMEOUT = 5.0
ATTEMPT_TIMEOUT = 2.0
MAX_ATTEMPTS = 4
AVOID = 10.0
#: Largest embedded object (a dealing, a forwarded report) accepted before decoding it.
MAX_ITEM = 64 * 1024
#: A participant joins at most one session of a coordinator in this time: a Byzantine
#: coordinator that aborts its sessions cannot keep the others dealing flat out.
MIN_OPEN_INTERVAL = 0.5
#: Messages kept per sender for a session we have not joined yet.
MAX_EARLY = 16
#: The online signing's messages to one peer from one drain go out bundled in one ``batch``
#: envelope (one frame through the links instead of one per message), each still sealed on its
#: own (a lock is evidence that a signer checks) and handled as if it came alone.
BATCHED = frozenset({"lock", "locked", "conflict", "missing", "refuse", "request", "share", "discard"})
#: At most this many messages, and this many bytes, in one batch (the rest go in another).
MAX_BATCH_ITEMS = 64
MAX_BATCH_BYTES = 256 * 1024
#: A discard (a presignature the holder may forget) waits this long for other messages to that
#: holder, to ride in their batch instead of a frame of its own.
DISCARD_DELAY = 0.5
#: Forwarded locks whose signature we checked, kept so that a batch of requests carrying the
#: same locks checks each once (a lock is a few hundred bytes).
OPENED_CACHE = 256
MAX_CACHED_LOCK = 2048


def lock_quorum(holders: int, t: int) -> int:
    """Locks needed before a share is released: two quorums share t+1 holders (one honest)."""
    return (holders + t + 2) // 2


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _int_list(obj: Any, what: str, sender: int, n: int) -> list[int]:
    if not isinstance(obj, list) or len(obj) > n or not all(type(x) is int and 1 <= x <= n for x in obj):
        raise RemoteProtocolError(sender, f"{what}: expected a list of server ids")
    if len(set(obj)) != len(obj):
        raise RemoteProtocolError(sender, f"{what}: repeated server id")
    return sorted(obj)


def _bytes_list(obj: Any, what: str, sender: int, count: int, cap: int = MAX_ITEM) -> list[bytes]:
    if not isinstance(obj, list) or len(obj) != count:
        raise RemoteProtocolError(sender, f"{what}: expected {count} items")
    if not all(isinstance(x, bytes) and len(x) <= cap for x in obj):
        raise RemoteProtocolError(sender, f"{what}: items must be bytes of at most {cap}")
    return list(obj)


def _digest_map(obj: Any, what: str, sender: int, n: int) -> dict[int, bytes]:
    if not isinstance(obj, dict) or len(obj) > n:
        raise RemoteProtocolError(sender, f"{what}: expected a map of server id to digest")
    for k, v in obj.items():
        if type(k) is not int or not 1 <= k <= n or not isinstance(v, bytes) or len(v) != 32:
            raise RemoteProtocolError(sender, f"{what}: malformed digest entry")
    return dict(obj)


SHARE_BATCH_DST = "pst/dss/share-batch/v1"


def _check_complaint(item: Any, accuser: int) -> None:
    """[dealer, index, the session's values, dealer's signature]: the shape, before anything is
    judged (the dealer signs each recipient's shares of a session at once: the evidence for one
    bad share is all of them)."""
    if not (
        isinstance(item, list)
        and len(item) == 4
        and type(item[0]) is int
        and type(item[1]) is int
        and isinstance(item[2], list)
        and len(item[2]) <= MAX_BATCH
        and all(isinstance(vs, list) and len(vs) <= 5 and all(type(v) is int for v in vs) for vs in item[2])
        and isinstance(item[3], bytes)
        and len(item[3]) <= 128
    ):
        raise RemoteProtocolError(accuser, "malformed complaint")


@dataclass
class _Stock(Generic[E]):
    """A presignature c may use: its public part and who holds it."""

    public: dss.PresignPublic[E]
    holders: tuple[int, ...]


@dataclass
class _Held(Generic[E]):
    """A presignature this server holds for coordinator c, and the message digest it is bound to."""

    presig: dss.Presignature[E]
    holders: frozenset[int]
    lock: bytes | None = None


@dataclass
class _Round(Generic[E]):
    """One dealing round (nonce or w) of a session, as a participant sees it."""

    deals: dict[int, tuple[bytes, list[Any]]] = field(default_factory=dict)
    shares: dict[int, list[tuple[tuple[int, ...], bytes]]] = field(default_factory=dict)
    verified: dict[int, bytes] = field(default_factory=dict)
    complaints: list[list[Any]] = field(default_factory=list)
    started: float = 0.0
    reported: bool = False
    #: Nonce round: dealers whose dealing and shares are in, checked all together once every
    #: participant's are (_check_arrived); and the set that one sum check accepted.
    arrived: dict[int, bytes] = field(default_factory=dict)
    summed: frozenset[int] = frozenset()


@dataclass
class _Session(Generic[E]):
    """Coordinator c's session ``s`` at one participant."""

    c: int
    s: int
    parts: tuple[int, ...]
    count: int
    sids: list[bytes]
    r1: _Round[E] = field(default_factory=_Round)
    r3: _Round[E] = field(default_factory=_Round)
    stage: str = "deal"  # deal -> echo -> open -> w -> done
    active: tuple[int, ...] = ()
    decision: bytes = b""
    echoes: dict[int, bytes] = field(default_factory=dict)
    publics: list[dss.NoncePublic[E]] = field(default_factory=list)
    states: list[dss.NonceState] = field(default_factory=list)
    #: Each member's z_i per presignature as opened (fast path: no proofs), and the openings
    #: with proofs that members send when asked (robust path).
    openings: dict[int, list[int]] = field(default_factory=dict)
    proofs: dict[int, list[dss.ProductOpening]] = field(default_factory=dict)
    proofs_sent: bool = False
    proofs_asked: bool = False
    proofs_wanted: bool = False
    #: The proof senders of our last robust attempt (tried again only when more arrive).
    proofs_tried: frozenset[int] = frozenset()
    nonces: list[dss.Nonce[E]] = field(default_factory=list)
    bad: set[int] = field(default_factory=set)
    w_pending: dict[str, dict[int, Any]] = field(default_factory=dict)
    #: When the openings step began (the fast path waits a little for every member's openings).
    open_started: float = 0.0

    def wipe(self) -> None:
        for st in self.states:
            st.wipe()
        self.states = []
        self.r1.shares.clear()
        self.r3.shares.clear()


@dataclass
class _Coordinating:
    """The coordinator's own view of its session in flight."""

    s: int
    parts: tuple[int, ...]
    started: float
    stage: str = "deal"  # deal -> w -> done
    step_started: float = 0.0
    reports: dict[int, tuple[dict[str, Any], bytes]] = field(default_factory=dict)
    wreports: dict[int, tuple[dict[str, Any], bytes]] = field(default_factory=dict)
    active: tuple[int, ...] = ()


@dataclass
class _Request(Generic[E]):
    rid: int
    message: bytes
    started: float
    attempt: int = 0
    stock: _Stock[E] | None = None
    locks: dict[int, bytes] = field(default_factory=dict)
    signers: tuple[int, ...] = ()
    shares: dict[int, dss.SignatureShare] = field(default_factory=dict)
    deadline: float = 0.0
    refused: dict[int, str] = field(default_factory=dict)
    own_shares: int = 0
    #: What is signed: the message, or the form its check makes of it (``signed_bytes``).
    to_sign: bytes = b""
    #: The public tweak of the key it is signed with (0: the secret's own key; crypto/appkeys.py).
    tweak: int = 0
    #: It waited for a presignature: our check runs again before anything is sent.
    waited: bool = False


class DSSSigningService(PayloadGate, Generic[E]):
    """Server ``me``'s service ``sign/<id>`` for one DSS secret and one period."""

    def __init__(
        self,
        *,
        me: int,
        t: int,
        table: KeyTable,
        group: Group[E],
        key: KeyShare[E],
        signer: Signer,
        rand: Callable[[int], bytes],
        service: str,
        checks: Sequence[PayloadCheck] = (),
        only_checked: bool = False,
        coordinate: bool = True,
    ) -> None:
        #: Keep a stock of our own (False: only take part in others' sessions and sign for them).
        self.coordinate = coordinate
        self.me, self.t, self.period, self.n = me, t, table.period, key.n
        self.table, self.group, self.key, self.signer, self.rand = table, group, key, signer, rand
        self.service = service
        self.checks: list[PayloadCheck] = list(checks)
        self.only_checked = only_checked
        self.share_context = f"pst/{service}/presign"
        self.ids = tuple(sorted(table.entries))
        self.peers = [i for i in self.ids if i != me]
        dss.check_dss_parameters(self.n, t)
        # Coordinator side.
        self._session_no = 0
        self._coord: _Coordinating | None = None
        self._stock: deque[_Stock[E]] = deque()
        #: Sessions whose presignatures wait for a lock quorum of holders to confirm they hold them.
        self._ready: dict[int, tuple[list[_Stock[E]], set[int], float]] = {}
        self._avoid: dict[int, float] = {}
        self._requests: dict[int, _Request[E]] = {}
        self._next_rid = 1
        # Participant side.
        self._sessions: dict[int, _Session[E]] = {}
        self._held: dict[int, dict[bytes, _Held[E]]] = {}
        self._early: dict[int, deque[tuple[str, dict[str, Any], bytes]]] = {}
        self._last_session: dict[int, int] = {}
        self._last_open: dict[int, float] = {}
        # Results and reports.
        self.done: dict[int, dss.DSSSignature] = {}
        self.failed: dict[int, str] = {}
        self.alerts: list[Alert] = []
        self.rejected: list[RemoteProtocolError] = []
        self.made = 0  # presignatures this coordinator completed
        self.sessions_failed = 0
        #: What happened to our own sessions (for the operator's log; bounded).
        self.notes: deque[str] = deque(maxlen=64)
        self._out: list[Outgoing] = []
        #: Sealed online messages per peer, bundled at the next drain (BATCHED).
        self._batch: dict[int, list[bytes]] = {}
        #: Discards per holder waiting to ride in a batch: (since when, sealed messages).
        self._deferred: dict[int, tuple[float, list[bytes]]] = {}
        self._now = 0.0
        self._opened: dict[bytes, tuple[int, str, Any]] = {}
        self._local: deque[tuple[str, dict[str, Any], bytes]] = deque()
        #: Our own dealings by their encoding, until we receive them ourselves.
        self._own_decoded: dict[bytes, Any] = {}

    # Plumbing ------------------------------------------------------------------------------

    @property
    def public_key(self) -> E:
        return self.key.public_key

    @property
    def stock(self) -> int:
        """Presignatures this server can use as coordinator now."""
        return len(self._stock)

    @property
    def pending(self) -> bool:
        wants = self.coordinate and len(self._stock) < LOW_WATER
        return bool(self._requests) or self._coord is not None or wants or bool(self._deferred)

    def _send(self, to: int, kind: str, body: Any) -> None:
        self._send_all((to,), kind, body)

    def _send_all(self, to: Iterable[int], kind: str, body: Any) -> None:
        data = seal(self.service, kind, self.period, self.me, body, self.signer)
        for i in to:
            if i == self.me:
                self._local.append((kind, body, data))
            elif kind == "discard":
                _since, waiting = self._deferred.setdefault(i, (self._now, []))
                waiting.append(data)
            elif kind in BATCHED:
                self._batch.setdefault(i, []).append(data)
            else:
                self._flush(i)  # what was sent before it goes before it
                self._out.append(Outgoing(i, data))

    def _flush(self, to: int) -> None:
        """Our batched messages to ``to`` go out now (with the discards waiting for it)."""
        items = self._batch.pop(to, [])
        if items or to in self._deferred:
            items += self._deferred.pop(to, (0.0, []))[1]
        while items:
            size, k = 0, 0
            while (
                k < len(items) and k < MAX_BATCH_ITEMS and (k == 0 or size + len(items[k]) <= MAX_BATCH_BYTES)
            ):
                size += len(items[k])
                k += 1
            chunk, items = items[:k], items[k:]
            if len(chunk) == 1:
                self._out.append(Outgoing(to, chunk[0]))
            else:
                batch = seal(self.service, "batch", self.period, self.me, {"items": chunk}, self.signer)
                self._out.append(Outgoing(to, batch))

    def drain(self) -> list[Outgoing]:
        """What to send now: each peer's online messages in one batch; discards that waited
        DISCARD_DELAY for a batch to ride in go alone."""
        for to in list(self._batch):
            self._flush(to)
        for to, (since, _waiting) in list(self._deferred.items()):
            if self._now - since >= DISCARD_DELAY:
                self._flush(to)
        out, self._out = self._out, []
        return out

    def _scalar(self) -> int:
        q = self.group.order
        return int.from_bytes(self.rand((q.bit_length() + 7) // 8 + 16), "big") % q

    def _verify(self, party: int, payload: bytes, sig: bytes) -> bool:
        entry = self.table.entries.get(party)
        return entry is not None and ed25519_verify(entry.verify_key, payload, sig)

    def _alert(self, kind: AlertKind, server: int, detail: str) -> None:
        self.alerts.append(Alert(kind, server, self.period, f"{self.service}: {detail}"))

    def _open_forwarded(self, raw: Any, what: str, sender: int) -> tuple[int, str, Any]:
        """A signed envelope another server made, forwarded by ``sender``: (author, kind, body)."""
        if not isinstance(raw, bytes) or len(raw) > MAX_ITEM:
            raise RemoteProtocolError(sender, f"{what}: forwarded envelope missing or too large")
        opened = self._opened.get(raw)
        if opened is not None:  # these very bytes were checked (the table is the period's)
            return opened
        obj = encoding.decode(raw, max_size=MAX_ITEM, what=what)
        author = obj.get("from") if isinstance(obj, dict) else None
        if type(author) is not int or author not in self.table.entries:
            raise RemoteProtocolError(sender, f"{what}: forwarded envelope from an unknown server")
        try:
            kind, body = open_envelope(self.service, obj, author, self.table)
        except RemoteProtocolError as exc:
            raise RemoteProtocolError(sender, f"{what}: forwarded envelope: {exc.reason}") from None
        if kind == "locked" and len(raw) <= MAX_CACHED_LOCK:
            if len(self._opened) >= OPENED_CACHE:
                del self._opened[next(iter(self._opened))]
            self._opened[raw] = (author, kind, body)
        return author, kind, body

    # Receiving -----------------------------------------------------------------------------

    def receive(self, sender: int, obj: dict[str, Any], now: float) -> None:
        """Take a decoded envelope; a peer's bad input is recorded in ``rejected``, never raised."""
        self._now = max(self._now, now)
        try:
            kind, body = open_envelope(self.service, obj, sender, self.table)
            if kind == "batch":
                self._on_batch(sender, body, now)
            else:
                self._dispatch(sender, kind, body, encoding.encode(obj), now)
        except RemoteProtocolError as exc:
            self.rejected.append(exc)
        except DecodeError as exc:
            self.rejected.append(RemoteProtocolError(sender, f"{self.service}: {exc}"))
        self._pump(now)

    def _on_batch(self, sender: int, body: Any, now: float) -> None:
        """A peer's bundle of online messages: each is opened and handled as if it came alone
        (a bad one is recorded, the others go on)."""
        f = encoding.expect_map(body, {"items": list}, "dss message batch")
        items = f["items"]
        if len(items) > MAX_BATCH_ITEMS:
            raise RemoteProtocolError(sender, f"dss message batch: more than {MAX_BATCH_ITEMS} messages")
        for raw in items:
            try:
                if not isinstance(raw, bytes) or len(raw) > MAX_BATCH_BYTES:
                    raise RemoteProtocolError(sender, "dss message batch: an item is not a message")
                obj = encoding.decode(raw, max_size=MAX_BATCH_BYTES, what="dss batched message")
                kind, inner = open_envelope(self.service, obj, sender, self.table)
                if kind not in BATCHED:
                    raise RemoteProtocolError(sender, f"dss message batch: {kind!r} is never batched")
                self._dispatch(sender, kind, inner, raw, now)
            except RemoteProtocolError as exc:
                self.rejected.append(exc)
            except DecodeError as exc:
                self.rejected.append(RemoteProtocolError(sender, f"{self.service}: {exc}"))

    def _guarded(self, author: int, kind: str, msg: dict[str, Any], raw: bytes, now: float) -> None:
        """A held message of ``author`` taken up later: its faults are its author's."""
        try:
            self._session_step(author, kind, msg, raw, now)
        except RemoteProtocolError as exc:
            self.rejected.append(exc)
        except DecodeError as exc:
            self.rejected.append(RemoteProtocolError(author, f"{self.service}: {exc}"))

    def _pump(self, now: float) -> None:
        """Our own messages to ourselves (we are a participant of our sessions, a holder, a signer)."""
        while self._local:
            kind, body, raw = self._local.popleft()
            try:
                self._dispatch(self.me, kind, body, raw, now)
            except (RemoteProtocolError, DecodeError) as exc:
                # Our own message refused by ourselves: a bug, but it must not stop the others.
                self.rejected.append(RemoteProtocolError(self.me, f"own message: {exc}"))

    _SESSION_KINDS = frozenset(
        {
            "deal",
            "shares",
            "echo",
            "opening",
            "oproofs",
            "needproofs",
            "wdeal",
            "wshares",
            "qual",
            "final",
            "abort",
        }
    )

    def _dispatch(self, sender: int, kind: str, body: Any, raw: bytes, now: float) -> None:
        if kind == "open":
            self._on_open(sender, body, now)
        elif kind in self._SESSION_KINDS:
            self._on_session_msg(sender, kind, body, raw, now)
        elif kind in ("report", "wreport"):
            self._on_report(sender, kind, body, raw)
        elif kind == "lock":
            self._on_lock(sender, body)
        elif kind == "locked":
            self._on_locked(sender, body, raw, now)
        elif kind in ("conflict", "missing", "refuse"):
            self._on_answer(sender, kind, body, now)
        elif kind == "request":
            self._on_request(sender, body)
        elif kind == "share":
            self._on_share(sender, body, now)
        elif kind == "discard":
            self._on_discard(sender, body)
        elif kind == "held":
            self._on_held(sender, body)
        else:
            raise RemoteProtocolError(sender, f"unknown {self.service} message kind {kind!r}")

    # Coordinating presign sessions ----------------------------------------------------------

    def _usable(self, now: float) -> list[int]:
        return [i for i in self.ids if i == self.me or self._avoid.get(i, 0.0) <= now]

    def _maybe_start_session(self, now: float) -> None:
        for s, (stocks, _acks, since) in list(self._ready.items()):
            if now - since > 3 * ROUND_WAIT:  # too few holders confirmed: those presignatures go
                for stock in stocks:
                    self._discard(stock)
                del self._ready[s]
                self.sessions_failed += 1
        if not self.coordinate or self._coord is not None or len(self._stock) >= LOW_WATER or self._ready:
            return
        if len(self._held.get(self.me, {})) >= MAX_HELD:
            return
        if now - self._last_open.get(self.me, -MIN_OPEN_INTERVAL) < MIN_OPEN_INTERVAL:
            return  # (the others would not join sooner)
        parts = self._usable(now)
        if len(parts) < 2 * self.t + 1:
            # Everyone we avoid gets another chance rather than waiting out the avoidance.
            self._avoid.clear()
            parts = list(self.ids)
        self._session_no += 1
        self._coord = _Coordinating(self._session_no, tuple(parts), now, step_started=now)
        self._send_all(parts, "open", {"s": self._session_no, "parts": list(parts), "count": BATCH})

    def _sids(self, c: int, s: int, count: int) -> list[bytes]:
        base = f"{self.service}/{self.period}/{c}/{s}/".encode()
        return [base + str(k).encode() for k in range(count)]

    def _on_report(self, sender: int, kind: str, body: Any, raw: bytes) -> None:
        f = encoding.expect_map(body, {"s": int, "have": dict, "complaints": list}, "presign report")
        co = self._coord
        if co is None or f["s"] != co.s or sender not in co.parts:
            return  # late, or for a session we gave up
        if kind != ("report" if co.stage == "deal" else "wreport"):
            return
        box = co.reports if kind == "report" else co.wreports
        _digest_map(f["have"], "presign report", sender, self.n)
        if len(f["complaints"]) > self.n * MAX_BATCH:
            raise RemoteProtocolError(sender, "presign report: too many complaints")
        for item in f["complaints"]:
            _check_complaint(item, sender)
        box.setdefault(sender, (f, raw))

    def _coordinator_tick(self, now: float) -> None:
        co = self._coord
        if co is None:
            return
        if now - co.started > SESSION_TIMEOUT:
            self._give_up(co, now, "timed out")
            return
        if co.stage == "deal" and now - co.started > DEAL_TIMEOUT and len(co.reports) < 2 * self.t + 1:
            self._give_up(co, now, f"heard {len(co.reports)} reports, need {2 * self.t + 1}")
            return
        me_session = self._sessions.get(self.me)
        if co.stage == "deal":
            members = co.parts
            if len(co.reports) == len(members) or (
                now - co.step_started >= ROUND_WAIT * 1.5 and len(co.reports) >= 2 * self.t + 1
            ):
                self._decide_qual(co, now)
        elif co.stage == "w":
            if me_session is None or me_session.s != co.s:
                self._give_up(co, now, "our own participation ended")
                return
            members = co.active
            if len(co.wreports) == len(members) or (
                now - co.step_started >= ROUND_WAIT * 1.5 and len(co.wreports) >= self.t + 1
            ):
                self._decide_final(co, now)

    def _give_up(self, co: _Coordinating, now: float, why: str) -> None:
        """Abandon our session; avoid for a while those that did not answer its current step."""
        answered: Iterable[int] = co.reports
        members = co.parts if co.stage == "deal" else co.active
        own = self._sessions.get(self.me)
        if co.stage == "w" and own is not None and own.s == co.s:
            # Whom were we (a member too) waiting for: an echo, an opening, or a w dealing?
            if own.stage == "echo":
                answered = own.echoes
            elif own.stage == "open":
                answered = own.openings
            else:
                answered = [j for j in own.r3.deals if j in own.r3.shares]
        for i in members:
            if i != self.me and i not in answered:
                self._avoid[i] = now + AVOID
        self._send_all(co.parts, "abort", {"s": co.s})
        self._coord = None
        self.sessions_failed += 1
        self.notes.append(f"{self.service}: presign session {co.s} given up at {now:.3f}: {why}")

    def _judge_reports(
        self, reports: dict[int, tuple[dict[str, Any], bytes]], sess: _Session[E], w: bool
    ) -> tuple[dict[int, str], list[bytes]]:
        """Judge every complaint of ``reports`` (ours included): {guilty: reason}, the reports to forward."""
        guilty: dict[int, str] = {}
        forward: list[bytes] = []
        rnd = sess.r3 if w else sess.r1
        for accuser, (f, raw) in sorted(reports.items()):
            if not f["complaints"]:
                continue
            forward.append(raw)
            for verdict in self._judge(accuser, f["complaints"], rnd, sess, w):
                guilty.setdefault(verdict.guilty, verdict.reason)
        return guilty, forward

    def _judge(
        self, accuser: int, complaints: list[Any], rnd: _Round[E], sess: _Session[E], w: bool
    ) -> list[Any]:
        verdicts = []
        for item in complaints:
            _check_complaint(item, accuser)
            d, k, all_values, sig = item
            held = rnd.deals.get(d)
            if held is None or not 0 <= k < sess.count or len(all_values) != sess.count:
                continue  # a dealing we do not hold: we cannot judge it, it is not in our sets
            dealing = held[1][k]
            sid = sess.sids[k]
            sessions = self._share_sessions(sess, held[1], w)
            payloads = self._share_payloads(sessions, d, accuser, all_values)
            signed = self._batch_payload(payloads)

            def verify(
                party: int,
                payload: bytes,
                signature: bytes,
                expected: bytes = payloads[k],
                signed: bytes = signed,
            ) -> bool:
                # the dealer's one signature over the recipient's shares of the whole session
                return payload == expected and self._verify(party, signed, signature)

            msg = ShareMessage(sessions[k], d, accuser, tuple(all_values[k]))
            judge = dss.judge_w_complaint if w else dss.judge_nonce_complaint
            verdicts.append(
                judge(
                    self.group,
                    sid,
                    dealing,
                    Complaint(accuser, msg, sig),
                    verify,
                    signing_context=self.share_context,
                    period=self.period,
                )
            )
        return verdicts

    def _share_sessions(self, sess: _Session[E], deals: Sequence[Any], w: bool) -> list[bytes]:
        if w:
            return [dss.w_session(self.group, sid, dl) for sid, dl in zip(sess.sids, deals, strict=True)]
        return [dss.nonce_session(self.group, sid, dl) for sid, dl in zip(sess.sids, deals, strict=True)]

    def _share_payloads(
        self, sessions: Sequence[bytes], d: int, j: int, values: Sequence[Sequence[int]]
    ) -> list[bytes]:
        return [
            ShareMessage(session, d, j, tuple(v)).payload(self.share_context, self.period)
            for session, v in zip(sessions, values, strict=True)
        ]

    @staticmethod
    def _batch_payload(payloads: Sequence[bytes]) -> bytes:
        """What a dealer signs for one recipient and session: all its share messages at once."""
        return encoding.encode([SHARE_BATCH_DST, list(payloads)])

    def _choose(
        self,
        members: Iterable[int],
        have: dict[int, dict[int, bytes]],
        candidates: dict[int, bytes],
        need_q: int,
        need_a: int,
    ) -> tuple[list[int], list[int]] | None:
        """The largest agreeing sets found greedily: members A and dealers Q every member holds alike."""
        a = sorted(members)
        while len(a) >= need_a and self.me in a:
            q = [d for d in sorted(candidates) if all(have[j].get(d) == candidates[d] for j in a)]
            if len(q) >= need_q:
                return a, q
            others = [j for j in a if j != self.me]
            if not others:
                return None
            worst = min(others, key=lambda j: (sum(have[j].get(d) == candidates[d] for d in candidates), -j))
            a.remove(worst)
        return None

    def _decide_qual(self, co: _Coordinating, now: float) -> None:
        sess = self._sessions.get(self.me)
        if sess is None or sess.s != co.s or self.me not in co.reports:
            if now - co.step_started >= ROUND_WAIT * 3:
                self._give_up(co, now, "we could not take part ourselves")
            return
        guilty, forward = self._judge_reports(co.reports, sess, w=False)
        self._name_guilty(guilty, now)
        members = [j for j in co.reports if j not in guilty]
        have = {j: _digest_map(co.reports[j][0]["have"], "report", j, self.n) for j in members}
        candidates = {d: held[0] for d, held in sess.r1.deals.items() if d not in guilty}
        chosen = self._choose(members, have, candidates, self.t + 1, 2 * self.t + 1)
        if chosen is None:
            self._give_up(co, now, "found no 2t+1 servers agreeing on t+1 dealings")
            return
        active, qual = chosen
        co.stage, co.active, co.step_started = "w", tuple(active), now
        body = {
            "s": co.s,
            "active": active,
            "digests": {d: candidates[d] for d in qual},
            "reports": forward,
        }
        self._send_all(active, "qual", body)

    def _decide_final(self, co: _Coordinating, now: float) -> None:
        sess = self._sessions[self.me]
        if self.me not in co.wreports:
            if now - co.step_started >= ROUND_WAIT * 3:
                self._give_up(co, now, "we could not deal w ourselves")
            return
        guilty, forward = self._judge_reports(co.wreports, sess, w=True)
        self._name_guilty(guilty, now)
        members = [j for j in co.wreports if j not in guilty and j not in sess.bad]
        have = {j: _digest_map(co.wreports[j][0]["have"], "wreport", j, self.n) for j in members}
        candidates = {d: held[0] for d, held in sess.r3.deals.items() if d not in guilty}
        chosen = self._choose(members, have, candidates, 2 * self.t + 1, self.t + 1)
        if chosen is None:
            self._give_up(co, now, "found no t+1 holders agreeing on 2t+1 w dealings")
            return
        holders, qual = chosen
        reduction = qual[: 2 * self.t + 1]
        co.stage = "done"
        body = {
            "s": co.s,
            "holders": holders,
            "digests": {d: candidates[d] for d in reduction},
            "reports": forward,
        }
        self._send_all(holders, "final", body)
        self._coord = None

    def _name_guilty(self, guilty: dict[int, str], now: float) -> None:
        for who, reason in sorted(guilty.items()):
            kind = (
                AlertKind.FALSE_COMPLAINT
                if reason.startswith(("false complaint", "complaint"))
                else (AlertKind.BAD_SHARE)
            )
            self._alert(kind, who, f"presign: {reason}")
            self._avoid[who] = now + AVOID * 6

    # Taking part in sessions ---------------------------------------------------------------

    # The three crypto steps whose output another server judges (tests make them cheat).

    def _nonce_dealing(
        self, sid: bytes
    ) -> tuple[dss.NonceDealing[E], dict[int, tuple[int, int, int, int, int]]]:
        return dss.deal_nonce(self.group, sid, self.me, self.n, self.t, self._scalar)

    def _w_dealing(self, sess: _Session[E], k: int) -> tuple[dss.WDealing[E], dict[int, tuple[int, int]]]:
        return dss.deal_w(self.group, sess.publics[k], sess.nonces[k], sess.states[k], self.key, self._scalar)

    def _opening_z(self, sess: _Session[E], k: int) -> int:
        return dss.product_value(self.group, sess.states[k])

    def _opening(self, sess: _Session[E], k: int) -> dss.ProductOpening:
        return dss.open_product(self.group, sess.publics[k], sess.states[k], self._scalar)

    def _signature_share(
        self, presig: dss.Presignature[E], message: bytes, tweak: int = 0
    ) -> dss.SignatureShare:
        if tweak:
            return appkeys.sign_share(self.group, presig, message, self.key.public, tweak)
        return dss.sign_share(self.group, presig, message, self.key.public)

    def key_tweak(self, message: bytes) -> int:
        """The public tweak of the key ``message`` is signed with: 0 (this secret's own key) unless
        the check that claims it names a per-application key (its ``key_tweak`` hook, given the
        group and this secret's public key: crypto/appkeys.py). Raises ValueError if it cannot."""
        make = getattr(self.check_for(message), "key_tweak", None)
        if make is None:
            return 0
        try:
            d = make(message, self.group, self.key.public_key)
        except Exception as exc:
            raise ValueError(f"cannot name the key: {type(exc).__name__}: {exc}") from None
        if type(d) is not int or not 0 <= d < self.group.order:
            raise ValueError("the check's key tweak is not a scalar")
        return d

    def _on_open(self, sender: int, body: Any, now: float) -> None:
        f = encoding.expect_map(body, {"s": int, "parts": list, "count": int}, "presign open")
        parts = _int_list(f["parts"], "presign open", sender, self.n)
        count = f["count"]
        if not 1 <= count <= MAX_BATCH or self.me not in parts or sender not in parts:
            raise RemoteProtocolError(sender, "presign open: bad batch size or participants")
        if len(parts) < 2 * self.t + 1:
            raise RemoteProtocolError(sender, "presign open: fewer than 2t+1 participants")
        if f["s"] <= self._last_session.get(sender, 0):
            return  # replayed or late
        # (half the coordinator's own spacing: two opens may reach us with different delays)
        last = self._last_open.get(sender, -MIN_OPEN_INTERVAL)
        if sender != self.me and now - last < MIN_OPEN_INTERVAL / 2:
            raise RemoteProtocolError(
                sender, f"opened presign sessions faster than one per {MIN_OPEN_INTERVAL} s"
            )
        self._last_session[sender] = f["s"]
        self._last_open[sender] = now
        if len(self._held.get(sender, {})) >= MAX_HELD:
            return  # we hold plenty for it already: we sit this one out
        old = self._sessions.get(sender)
        if old is not None:
            old.wipe()
        sess: _Session[E] = _Session(sender, f["s"], tuple(parts), count, self._sids(sender, f["s"], count))
        sess.r1.started = now
        self._sessions[sender] = sess
        self._deal_nonce(sess)
        for author in list(self._early):
            queue = self._early[author]
            keep: deque[tuple[str, dict[str, Any], bytes]] = deque(maxlen=MAX_EARLY)
            for kind, msg, msg_raw in queue:
                if msg.get("c") == sender and msg.get("s") == sess.s:
                    self._guarded(author, kind, msg, msg_raw, now)
                else:
                    keep.append((kind, msg, msg_raw))
            self._early[author] = keep

    def _deal_nonce(self, sess: _Session[E]) -> None:
        dealings = []
        shares: dict[int, list[Any]] = {j: [] for j in sess.parts}
        sessions = []
        for sid in sess.sids:
            dealing, values = self._nonce_dealing(sid)
            encoded = dealing.encode(self.group)
            dealings.append(encoded)
            if len(self._own_decoded) > 4 * MAX_BATCH:
                self._own_decoded.clear()
            self._own_decoded[encoded] = dealing
            sessions.append(dss.nonce_session(self.group, sid, dealing))
            for j in sess.parts:
                shares[j].append(list(values[j]))
        self._send_all(sess.parts, "deal", {"c": sess.c, "s": sess.s, "dealings": dealings})
        for j in sess.parts:
            body = {
                "c": sess.c,
                "s": sess.s,
                "shares": shares[j],
                "sig": self._sign_shares(sessions, j, shares[j]),
            }
            self._send(j, "shares", body)

    def _sign_shares(self, sessions: Sequence[bytes], j: int, values: Sequence[Sequence[int]]) -> bytes:
        """The dealer's one signature on j's shares of the session (complaint evidence); none on
        our own."""
        if j == self.me:
            return b""
        return self.signer.sign(self._batch_payload(self._share_payloads(sessions, self.me, j, values)))

    def _on_session_msg(self, sender: int, kind: str, body: Any, raw: bytes, now: float) -> None:
        if kind in ("qual", "final", "abort"):
            # From the coordinator itself: the session is the sender's own.
            if not isinstance(body, dict) or type(body.get("s")) is not int:
                raise RemoteProtocolError(sender, f"presign {kind}: expected a map naming the session")
            msg = dict(body)
            msg["c"] = sender
        else:
            if not isinstance(body, dict) or type(body.get("c")) is not int or type(body.get("s")) is not int:
                raise RemoteProtocolError(sender, f"presign {kind}: expected a map naming the session")
            msg = body
        c, s = msg["c"], msg["s"]
        sess = self._sessions.get(c)
        if sess is None or sess.s < s:
            if kind in ("qual", "final", "abort"):
                return
            queue = self._early.setdefault(sender, deque(maxlen=MAX_EARLY))
            queue.append((kind, msg, raw))
            return
        if sess.s != s:
            return  # an older session
        self._session_step(sender, kind, msg, raw, now)

    def _session_step(self, sender: int, kind: str, msg: dict[str, Any], raw: bytes, now: float) -> None:
        sess = self._sessions[msg["c"]]
        if kind == "abort":
            sess.wipe()
            del self._sessions[sess.c]
            return
        if sender not in sess.parts:
            raise RemoteProtocolError(sender, f"presign {kind}: not a participant of this session")
        if kind == "deal":
            self._on_deal(sess, sender, msg, raw, w=False)
        elif kind == "shares":
            self._on_shares(sess, sender, msg, w=False)
        elif kind == "qual":
            self._on_qual(sess, msg, raw, now)
        elif kind == "echo":
            self._on_echo(sess, sender, msg, now)
        elif kind == "opening":
            self._on_opening(sess, sender, msg, now)
        elif kind == "oproofs":
            self._on_oproofs(sess, sender, msg, now)
        elif kind == "needproofs":
            sess.proofs_wanted = True
            self._send_proofs(sess)
        elif kind in ("wdeal", "wshares"):
            if sess.stage != "w":
                if sess.stage in ("deal", "echo", "open"):
                    sess.w_pending.setdefault(kind, {}).setdefault(sender, (msg, raw))
                return
            if kind == "wdeal":
                self._on_deal(sess, sender, msg, raw, w=True)
            else:
                self._on_shares(sess, sender, msg, w=True)
        elif kind == "final":
            self._on_final(sess, msg, now)
        else:
            raise RemoteProtocolError(sender, f"unknown presign message {kind!r}")

    def _decode_deal(self, sess: _Session[E], sender: int, data: bytes, k: int, w: bool) -> Any:
        if sender == self.me:
            own = self._own_decoded.pop(data, None)
            if own is not None:
                return own  # our own dealing, sent to ourselves: no need to decode it again
        if w:
            wd = dss.WDealing.decode(self.group, data, self.n, self.t)
            if wd.dealer != sender:
                raise RemoteProtocolError(sender, "w dealing under another dealer's id")
            if wd.commitment.degree != self.t:
                raise RemoteProtocolError(sender, "w dealing of the wrong degree")
            # Its linking proof is not checked here (the fast path): the presignature keeps the
            # dealing, and a signature that fails to verify has the proofs checked then
            # (dss.blame_w_dealings), which names a dealer that cheated.
            return wd
        nd = dss.NonceDealing.decode(self.group, data, self.n, self.t)
        if nd.dealer != sender:
            raise RemoteProtocolError(sender, "nonce dealing under another dealer's id")
        try:
            dss.check_nonce_dealing(self.group, nd, self.n, self.t)
        except CheatingError as exc:
            raise RemoteProtocolError(sender, f"nonce dealing: {exc.reason}") from None
        return nd

    def _on_deal(self, sess: _Session[E], sender: int, msg: dict[str, Any], raw: bytes, w: bool) -> None:
        rnd = sess.r3 if w else sess.r1
        if sender in rnd.deals or rnd.reported:
            return
        if w and (sender not in sess.active or sender in sess.bad):
            return
        items = _bytes_list(msg.get("dealings"), "presign dealing", sender, sess.count)
        deals = [self._decode_deal(sess, sender, data, k, w) for k, data in enumerate(items)]
        digest = _digest(b"".join(_digest(x) for x in items))
        rnd.deals[sender] = (digest, deals)
        self._check_shares(sess, sender, w)

    def _on_shares(self, sess: _Session[E], sender: int, msg: dict[str, Any], w: bool) -> None:
        rnd = sess.r3 if w else sess.r1
        if sender in rnd.shares or rnd.reported:
            return
        items = msg.get("shares")
        width = 2 if w else 5
        if not isinstance(items, list) or len(items) != sess.count:
            raise RemoteProtocolError(sender, "presign shares: wrong count")
        sig = msg.get("sig")
        if not isinstance(sig, bytes) or len(sig) > 128:
            raise RemoteProtocolError(sender, "presign shares: malformed signature")
        parsed: list[tuple[tuple[int, ...], bytes]] = []
        for item in items:
            if not (isinstance(item, list) and len(item) == width and all(type(v) is int for v in item)):
                raise RemoteProtocolError(sender, "presign shares: malformed share")
            parsed.append((tuple(item), sig))  # (one signature for the session's shares)
        rnd.shares[sender] = parsed
        self._check_shares(sess, sender, w)

    def _check_shares(self, sess: _Session[E], d: int, w: bool) -> None:
        """Dealer d's shares for us in this round, once its dealing and its shares are both in.

        Fast path: all of a dealer's shares of the session are checked in one batch (one
        random linear combination, one multi-scalar multiplication), and a dealer's
        signatures are checked only on the share we complain about (the complaint's
        evidence); a good share needs none. Our own dealing is not checked: we made it.
        In the nonce round the dealers wait for each other: one check of the sums over all
        of them (:meth:`_check_arrived`) and, only if it fails, one check per dealer.
        """
        rnd = sess.r3 if w else sess.r1
        if d not in rnd.deals or d not in rnd.shares or d in rnd.verified or d in rnd.arrived:
            return
        digest = rnd.deals[d][0]
        if d == self.me:
            rnd.verified[d] = digest
            return
        if not w:
            rnd.arrived[d] = digest
            self._check_arrived(sess, final=False)
            return
        self._check_dealer(sess, d, w)

    def _check_arrived(self, sess: _Session[E], *, final: bool) -> None:
        """The nonce round's arrived dealers: all at once when every participant's are in (or
        ``final``: the round's wait is over), by the sums of our shares; each alone if that fails."""
        rnd = sess.r1
        if not rnd.arrived:
            return
        settled = set(rnd.arrived) | set(rnd.verified) | {c[0] for c in rnd.complaints}
        if not final and not all(j in settled for j in sess.parts):
            return
        pending, rnd.arrived = rnd.arrived, {}
        if len(pending) > 1:
            dealers = sorted(pending)
            ok = dss.batch_check_nonce_share_sums(
                self.group,
                {d: rnd.deals[d][1] for d in dealers},
                self.me,
                {d: [v for v, _sig in rnd.shares[d]] for d in dealers},
            )
            if ok:
                rnd.verified.update(pending)
                rnd.summed = frozenset(dealers)
                return
        for d in sorted(pending):
            self._check_dealer(sess, d, False)

    def _check_dealer(self, sess: _Session[E], d: int, w: bool) -> None:
        """Dealer d's shares of the session for us, in one batch; a complaint if one is bad."""
        rnd = sess.r3 if w else sess.r1
        digest, deals = rnd.deals[d]
        values = [v for v, _sig in rnd.shares[d]]
        if w:
            bad = dss.batch_check_w_shares(self.group, deals, self.me, values)
        else:
            bad = dss.batch_check_nonce_shares(self.group, deals, self.me, values)
        if not bad:
            rnd.verified[d] = digest
            return
        k = bad[0]
        sig = rnd.shares[d][k][1]
        payloads = self._share_payloads(self._share_sessions(sess, deals, w), d, self.me, values)
        if not self._verify(d, self._batch_payload(payloads), sig):
            # unsigned: no evidence to complain with; the dealer stays out of our set
            self.rejected.append(RemoteProtocolError(d, "presign share not signed by its dealer"))
            return
        rnd.complaints.append([d, k, [list(v) for v in values], sig])
        self._alert(AlertKind.BAD_SHARE, d, f"presign: its share for us fails its commitments ({k})")

    def _participant_tick(self, now: float) -> None:
        for sess in list(self._sessions.values()):
            if sess.stage != "done" and now - sess.r1.started > 2 * SESSION_TIMEOUT:
                self._drop(sess)  # its coordinator went silent: its secrets go
                continue
            if sess.stage == "open" and now - sess.open_started >= ROUND_WAIT / 2:
                self._try_nonce(sess, now, waited=True)
            for rnd, kind, members, live in (
                (sess.r1, "report", sess.parts, sess.stage == "deal"),
                (sess.r3, "wreport", [j for j in sess.active if j not in sess.bad], sess.stage == "w"),
            ):
                if not live or rnd.reported:
                    continue
                if kind == "report" and now - rnd.started >= ROUND_WAIT:
                    self._check_arrived(sess, final=True)
                complete = all(j in rnd.verified or any(c[0] == j for c in rnd.complaints) for j in members)
                if complete or now - rnd.started >= ROUND_WAIT:
                    rnd.reported = True
                    body = {"s": sess.s, "have": dict(rnd.verified), "complaints": rnd.complaints}
                    self._send(sess.c, kind, body)

    def _check_decision(
        self, sess: _Session[E], msg: dict[str, Any], members_key: str, w: bool
    ) -> tuple[list[int], dict[int, bytes]] | None:
        """The members and digests of a coordinator's decision, if we can go on with it."""
        c = sess.c
        members = _int_list(msg.get(members_key), f"presign {members_key}", c, self.n)
        digests = _digest_map(msg.get("digests"), "presign decision", c, self.n)
        reports = msg.get("reports")
        if not isinstance(reports, list) or len(reports) > self.n:
            raise RemoteProtocolError(c, "presign decision: malformed reports")
        need_q = 2 * self.t + 1 if w else self.t + 1
        if len(digests) < need_q or (w and len(digests) != need_q):
            raise RemoteProtocolError(c, "presign decision: wrong number of dealers")
        if self.me not in members:
            return None
        rnd = sess.r3 if w else sess.r1
        for d, digest in digests.items():
            if rnd.verified.get(d) != digest:
                return None  # we do not hold that dealing (or hold another one): we drop out
        for raw in reports:
            author, kind, body = self._open_forwarded(raw, "presign decision", c)
            if (
                kind != ("wreport" if w else "report")
                or not isinstance(body, dict)
                or body.get("s") != sess.s
            ):
                raise RemoteProtocolError(c, "presign decision: forwarded report of another session")
            complaints = body.get("complaints")
            if not isinstance(complaints, list) or len(complaints) > self.n * MAX_BATCH:
                raise RemoteProtocolError(c, "presign decision: malformed forwarded complaints")
            for verdict in self._judge(author, complaints, rnd, sess, w):
                if verdict.guilty in digests or verdict.guilty in members:
                    self._alert(
                        AlertKind.BAD_MESSAGE,
                        c,
                        f"presign decision keeps server {verdict.guilty}, convicted: {verdict.reason}",
                    )
                    return None
        return members, digests

    def _on_qual(self, sess: _Session[E], msg: dict[str, Any], raw: bytes, now: float) -> None:
        if sess.stage != "deal":
            return
        decided = self._check_decision(sess, msg, "active", w=False)
        if decided is None:
            self._drop(sess)
            return
        active, digests = decided
        if len(active) < 2 * self.t + 1:
            raise RemoteProtocolError(sess.c, "presign decision: fewer than 2t+1 active servers")
        sess.active = tuple(active)
        sess.decision = _digest(encoding.encode({"active": active, "digests": digests}))
        qual = sorted(digests)
        if not self._qual_sums_hold(sess, qual):
            self._drop(sess)
            return
        for k, sid in enumerate(sess.sids):
            dealings = {d: sess.r1.deals[d][1][k] for d in qual}
            public = dss.nonce_public(self.group, sid, self.n, self.t, qual, dealings)
            shares = {d: sess.r1.shares[d][k][0] for d in qual}
            sess.publics.append(public)
            # (every share was checked on arrival against the dealing whose digest the decision names)
            sess.states.append(dss.nonce_finish(self.group, public, self.me, dealings, shares, checked=True))
        sess.r1.shares.clear()
        sess.stage = "echo"
        self._send_all(sess.active, "echo", {"c": sess.c, "s": sess.s, "digest": sess.decision})
        self._try_open(sess, now)

    def _qual_sums_hold(self, sess: _Session[E], qual: list[int]) -> bool:
        """Our shares summed over QUAL1 are right. They are when QUAL1 keeps every dealer one
        sum check accepted together (or drops them all); else that subset is checked again,
        and, if it fails, each dealer alone: two dealers whose errors cancelled, one of them
        now left out. Too late to complain: we name the culprit and leave the session."""
        rnd = sess.r1
        kept = [d for d in qual if d in rnd.summed]
        if not kept or len(kept) == len(rnd.summed):
            return True
        dealings = {d: rnd.deals[d][1] for d in kept}
        values = {d: [v for v, _sig in rnd.shares[d]] for d in kept}
        if len(kept) > 1 and dss.batch_check_nonce_share_sums(self.group, dealings, self.me, values):
            return True
        ok = True
        for d in kept:
            bad = dss.batch_check_nonce_shares(self.group, dealings[d], self.me, values[d])
            if bad:
                ok = False
                self._alert(
                    AlertKind.BAD_SHARE, d, f"presign: its share for us fails its commitments ({bad[0]})"
                )
        return ok

    def _on_echo(self, sess: _Session[E], sender: int, msg: dict[str, Any], now: float) -> None:
        digest = msg.get("digest")
        if not isinstance(digest, bytes) or len(digest) != 32:
            raise RemoteProtocolError(sender, "presign echo: malformed digest")
        sess.echoes.setdefault(sender, digest)
        self._try_open(sess, now)

    def _try_open(self, sess: _Session[E], now: float) -> None:
        if sess.stage != "echo" or not all(j in sess.echoes for j in sess.active):
            return
        differ = sorted(j for j in sess.active if sess.echoes[j] != sess.decision)
        if differ:
            self._alert(
                AlertKind.EQUIVOCATION,
                sess.c,
                f"presign session {sess.s}: servers {differ} got another decision than ours",
            )
            self._drop(sess)
            return
        sess.stage = "open"
        sess.open_started = now
        values = [self.group.encode_scalar(self._opening_z(sess, k)) for k in range(sess.count)]
        self._send_all(sess.active, "opening", {"c": sess.c, "s": sess.s, "openings": values})
        if sess.proofs_wanted:
            self._send_proofs(sess)

    def _on_opening(self, sess: _Session[E], sender: int, msg: dict[str, Any], now: float) -> None:
        if sender in sess.openings or sess.stage in ("w", "done"):
            return
        if sess.active and sender not in sess.active:
            return
        items = _bytes_list(msg.get("openings"), "presign opening", sender, sess.count)
        sess.openings[sender] = [self.group.decode_scalar(x) for x in items]
        self._try_nonce(sess, now)

    def _send_proofs(self, sess: _Session[E]) -> None:
        """Our openings with their proofs, once, to the members (the robust path needs them)."""
        if sess.proofs_sent or len(sess.states) != sess.count or self.me not in sess.active:
            return
        if sess.stage not in ("open", "w"):
            return  # not before every member echoed the same decision (sent when we open)
        sess.proofs_sent = True
        openings = [self._opening(sess, k).encode(self.group) for k in range(sess.count)]
        self._send_all(sess.active, "oproofs", {"c": sess.c, "s": sess.s, "openings": openings})

    def _on_oproofs(self, sess: _Session[E], sender: int, msg: dict[str, Any], now: float) -> None:
        if sender in sess.proofs or (sess.active and sender not in sess.active):
            return
        items = _bytes_list(msg.get("openings"), "presign opening proofs", sender, sess.count)
        openings = [dss.ProductOpening.decode(self.group, x, self.n) for x in items]
        if any(o.party != sender for o in openings):
            raise RemoteProtocolError(sender, "product opening under another server's id")
        sess.proofs[sender] = openings
        self._try_nonce(sess, now)

    def _try_nonce(self, sess: _Session[E], now: float, *, waited: bool = False) -> None:
        """R for every presignature of the session, once the openings are in.

        Fast path: members open z_i without proofs; with every member's z_i in (at least
        3t+1) and all consistent with one degree-2t polynomial, R follows with no proof
        made or checked (:func:`~appliance.crypto.dss.optimistic_nonce`). Otherwise (an
        inconsistency, or ``waited``: a member's openings are late) we ask every member
        for its openings with proofs (``needproofs``, answered once with ``oproofs``), check
        2t+1 of them as before, and a bad proof, or a proof for another z_i than the one
        opened, names its sender.
        """
        if sess.stage != "open":
            return
        members = [j for j in sess.active if j not in sess.bad]
        candidates = [j for j in sorted(sess.openings) if j in members]
        everyone = all(j in sess.openings for j in members)
        if not everyone and not waited:
            return  # the fast path needs them all: wait a little (see _participant_tick)
        nonces: list[dss.Nonce[E]] = []
        if everyone:
            for k in range(sess.count):
                values = {j: sess.openings[j][k] for j in candidates}
                try:
                    fast = dss.optimistic_nonce(self.group, sess.publics[k], values)
                except dss.DSSRetryError:
                    self._drop(sess)
                    return
                if fast is None:
                    nonces = []
                    break
                nonces.append(fast)
        if not nonces:
            if not sess.proofs_asked:
                sess.proofs_asked = True
                self._send_all(
                    [j for j in sess.active if j != self.me], "needproofs", {"c": sess.c, "s": sess.s}
                )
                self._send_proofs(sess)
            for j in [j for j in sess.proofs if j in members]:
                announced = sess.openings.get(j)
                if announced is not None and [o.z for o in sess.proofs[j]] != announced:
                    sess.bad.add(j)
                    self._alert(
                        AlertKind.BAD_SHARE, j, "presign: product opening proved another z_i than opened"
                    )
            if self._robust_nonces(sess, nonces):
                return
        sess.nonces = nonces
        sess.stage = "w"
        sess.r3.started = now
        self._deal_w(sess)
        for kind in ("wdeal", "wshares"):
            for author, (msg, raw) in sorted(sess.w_pending.get(kind, {}).items()):
                self._guarded(author, kind, msg, raw, now)
        sess.w_pending.clear()

    def _robust_nonces(self, sess: _Session[E], nonces: list[dss.Nonce[E]]) -> bool:
        """R from openings with checked proofs into ``nonces``; True while more are needed
        (or the session was dropped)."""
        candidates = [j for j in sorted(sess.proofs) if j in sess.active and j not in sess.bad]
        if len(candidates) < 2 * self.t + 1 or frozenset(candidates) == sess.proofs_tried:
            return True
        sess.proofs_tried = frozenset(candidates)
        for k in range(sess.count):
            batch = {j: sess.proofs[j][k] for j in candidates}
            try:
                nonce, bad = dss.open_nonce(self.group, sess.publics[k], batch)
            except NotEnoughSharesError:
                nonce, bad = None, {}
                for j in candidates:
                    try:
                        dss.check_product_opening(self.group, sess.publics[k], batch[j])
                    except CheatingError as exc:
                        bad[j] = exc.reason
            except dss.DSSRetryError:
                self._drop(sess)
                return True
            for j, reason in bad.items():
                if j not in sess.bad:
                    sess.bad.add(j)
                    self._alert(AlertKind.BAD_SHARE, j, f"presign: product opening: {reason}")
            if nonce is None:
                nonces.clear()
                return True  # wait for more openings with proofs
            nonces.append(nonce)
        return False

    def _deal_w(self, sess: _Session[E]) -> None:
        targets = [j for j in sess.active if j not in sess.bad]
        dealings = []
        shares: dict[int, list[Any]] = {j: [] for j in targets}
        sessions = []
        for k, sid in enumerate(sess.sids):
            wd, values = self._w_dealing(sess, k)
            encoded = wd.encode(self.group)
            dealings.append(encoded)
            self._own_decoded[encoded] = wd
            sessions.append(dss.w_session(self.group, sid, wd))
            for j in targets:
                shares[j].append(list(values[j]))
        self._send_all(targets, "wdeal", {"c": sess.c, "s": sess.s, "dealings": dealings})
        for j in targets:
            body = {
                "c": sess.c,
                "s": sess.s,
                "shares": shares[j],
                "sig": self._sign_shares(sessions, j, shares[j]),
            }
            self._send(j, "wshares", body)

    def _on_final(self, sess: _Session[E], msg: dict[str, Any], now: float) -> None:
        if sess.stage != "w":
            return
        decided = self._check_decision(sess, msg, "holders", w=True)
        if decided is None:
            self._drop(sess)
            return
        holders, digests = decided
        reduction = sorted(digests)
        held = self._held.setdefault(sess.c, {})
        for k, sid in enumerate(sess.sids):
            dealings = {d: sess.r3.deals[d][1][k] for d in reduction}
            shares = {d: sess.r3.shares[d][k][0] for d in reduction}
            presig = dss.finish_presign(
                self.group,
                sess.publics[k],
                sess.nonces[k],
                sess.states[k],
                self.key.public,
                reduction,
                dealings,
                shares,
                checked=True,  # on arrival, as in _on_qual
            )
            held[sid] = _Held(presig, frozenset(holders))
            if sess.c == self.me:
                self._ready.setdefault(sess.s, ([], set(), now))[0].append(
                    _Stock(presig.public, tuple(holders))
                )
        sess.states = []
        sess.stage = "done"
        sess.wipe()
        self._send(sess.c, "held", {"s": sess.s})

    def _on_held(self, sender: int, body: Any) -> None:
        """A holder stored its presignatures: usable once a lock quorum of holders has them."""
        f = encoding.expect_map(body, {"s": int}, "presignatures held")
        ready = self._ready.get(f["s"])
        if ready is None or not ready[0] or sender not in ready[0][0].holders:
            return
        stocks, acks, _since = ready
        acks.add(sender)
        if self.me in acks and len(acks) >= lock_quorum(len(stocks[0].holders), self.t):
            self._stock.extend(stocks)
            self.made += len(stocks)
            del self._ready[f["s"]]

    def _drop(self, sess: _Session[E]) -> None:
        sess.wipe()
        sess.stage = "done"

    # Coordinating signatures -----------------------------------------------------------------

    def request(self, message: bytes, now: float) -> int:
        """Start signing ``message``; the result appears in ``done`` or ``failed`` under the returned id."""
        if len(message) > MAX_MESSAGE:
            raise SigningRefused(f"message of {len(message)} bytes is larger than {MAX_MESSAGE}")
        if not self.coordinate:
            raise SigningRefused(f"{self.service}: this server keeps no presignatures of its own")
        if is_protocol_payload(message):
            raise SigningRefused("refusing to sign a protocol payload on request")
        self._now = max(self._now, now)
        check = self._own_check(message)
        try:
            to_sign = signed_form(check, message)
            tweak = self.key_tweak(message)
        except ValueError as exc:
            raise SigningRefused(f"{self.service}: {exc}") from None
        rid = self._next_rid
        self._next_rid += 1
        self._requests[rid] = _Request(rid, message, now, to_sign=to_sign, tweak=tweak)
        self._attempt(self._requests[rid], now)
        self._pump(now)
        return rid

    def _attempt(self, req: _Request[E], now: float) -> None:
        self._release(req)
        req.attempt += 1
        if req.attempt > MAX_ATTEMPTS:
            self._fail(req, "no set of t+1 signers answered correctly")
            return
        if req.refused and len([i for i in self.peers if i not in req.refused]) < self.t:
            reasons = "; ".join(f"server {i}: {why}" for i, why in sorted(req.refused.items()))
            self._fail(req, f"refused by its signers' checks ({reasons})")
            return
        stock = self._take_stock(req, now)
        if stock is None:
            if now - req.started < REQUEST_TIMEOUT:
                req.attempt -= 1
                req.waited = True
                req.deadline = now + 0.02  # wait for a presignature (retried on tick)
                return
            self._fail(
                req,
                f"no presignature in stock: none was made in {REQUEST_TIMEOUT:.0f} s "
                f"(presigning needs 2t+1 = {2 * self.t + 1} servers answering; "
                f"{self.sessions_failed} sessions failed this period)",
            )
            return
        check = self.check_for(req.message)
        if check is not None and (req.own_shares or req.waited):
            # A retry, or a message that waited for a presignature: what we accepted then may be
            # stale now (a timestamp's genTime); refuse it ourselves rather than have the others
            # refuse it and alert on us.
            req.waited = False
            reason = run_check(check, req.message, self.me)
            if reason is not None:
                self._stock.appendleft(stock)  # unused: it stays ours
                why = f"this server now refuses the {check.name}: {reason}"
                self._fail(req, Refusal(why, own_check_code(reason)))
                return
        req.stock, req.locks, req.shares, req.signers = stock, {}, {}, ()
        req.deadline = now + ATTEMPT_TIMEOUT
        body = {
            "rid": req.rid,
            "attempt": req.attempt,
            "sid": stock.public.sid,
            "digest": _digest(req.message),
        }
        self._send_all(stock.holders, "lock", body)

    def _take_stock(self, req: _Request[E], now: float) -> _Stock[E] | None:
        for stock in list(self._stock):
            if self.me not in stock.holders or len(stock.holders) < self.t + 1:
                self._stock.remove(stock)  # cannot be used by us at all
                self._discard(stock)
                continue
            others = [i for i in stock.holders if i != self.me and self._avoid.get(i, 0.0) <= now]
            if len([i for i in others if i not in req.refused]) >= self.t:
                self._stock.remove(stock)
                return stock
        return None  # (presignatures whose holders we avoid for now stay for later)

    def _purge_stock(self, dealers: set[int]) -> None:
        """Drop from our stock the presignatures into which ``dealers`` dealt a bad w (their
        proofs are checked now), so that a request does not try them one after another."""
        if not dealers:
            return
        for stock in list(self._stock):
            if not any(d.dealer in dealers for d in stock.public.w_dealings):
                continue
            if dss.blame_w_dealings(self.group, stock.public, self.key.public):
                self._stock.remove(stock)
                self._discard(stock)

    def _discard(self, stock: _Stock[E]) -> None:
        self._send_all(stock.holders, "discard", {"sid": stock.public.sid})

    def _release(self, req: _Request[E]) -> None:
        """An attempt is over: the holders that did not sign with its presignature discard it."""
        if req.stock is not None:
            self._discard(req.stock)
            req.stock = None

    def _fail(self, req: _Request[E], why: str) -> None:
        """``failed`` gets ``why`` after the service's name, with its code if it is a Refusal."""
        self._release(req)
        code = refusal_code(why)
        text = f"{self.service}: {why}"
        self.failed[req.rid] = text if code is None else Refusal(text, code)
        self._requests.pop(req.rid, None)

    def _on_locked(self, sender: int, body: Any, raw: bytes, now: float) -> None:
        f = encoding.expect_map(
            body, {"rid": int, "attempt": int, "c": int, "sid": bytes, "digest": bytes}, "presignature lock"
        )
        req = self._requests.get(f["rid"])
        if req is None or req.stock is None or f["attempt"] != req.attempt or f["c"] != self.me:
            return
        if (
            f["sid"] != req.stock.public.sid
            or f["digest"] != _digest(req.message)
            or sender not in req.stock.holders
        ):
            raise RemoteProtocolError(sender, "presignature lock for another presignature or message")
        req.locks.setdefault(sender, raw)
        self._maybe_ask(req, now)

    def _maybe_ask(self, req: _Request[E], now: float) -> None:
        stock = req.stock
        if stock is None or req.signers:
            return
        if len(req.locks) < lock_quorum(len(stock.holders), self.t) or self.me not in req.locks:
            return
        others = [
            i for i in req.locks if i != self.me and self._avoid.get(i, 0.0) <= now and i not in req.refused
        ]
        if len(others) < self.t:
            return
        chosen = sorted(others)[: self.t]
        req.signers = tuple(sorted([self.me, *chosen]))
        body = {
            "rid": req.rid,
            "attempt": req.attempt,
            "sid": stock.public.sid,
            "message": req.message,
            "locks": [req.locks[i] for i in sorted(req.locks)],
        }
        self._send_all(req.signers, "request", body)
        req.deadline = now + ATTEMPT_TIMEOUT

    def _on_answer(self, sender: int, kind: str, body: Any, now: float) -> None:
        """``refuse``, ``missing`` or ``conflict`` from a holder of the presignature in use."""
        fields: dict[str, type] = {"rid": int, "attempt": int}
        if kind == "refuse":
            fields["reason"] = str
        f = encoding.expect_map(body, fields, f"presignature {kind}")
        req = self._requests.get(f["rid"])
        if req is None or f["attempt"] != req.attempt or req.stock is None or sender not in req.stock.holders:
            return
        if kind == "refuse":
            if sender in req.refused:
                return
            if self.check_for(req.message) is None and not self.only_checked:
                raise RemoteProtocolError(sender, "refused to sign a message no application check covers")
            req.refused[sender] = f["reason"][:MAX_REASON]
            if sender == self.me:
                self._fail(req, f"this server refuses it: {req.refused[sender]}")
                return
            req.attempt -= 1  # an answer, not a failed attempt
        elif kind == "missing":
            if sender != self.me and sender not in req.signers:
                return  # one holder fewer to lock; the others may suffice
            self._avoid[sender] = now + AVOID
        # conflict: the presignature is bound to another message; never use it again.
        self._attempt(req, now)

    def _on_share(self, sender: int, body: Any, now: float) -> None:
        f = encoding.expect_map(body, {"rid": int, "attempt": int, "share": bytes}, "dss signature share")
        req = self._requests.get(f["rid"])
        if req is None or req.stock is None or f["attempt"] != req.attempt or sender not in req.signers:
            return
        if len(f["share"]) > 4096:
            raise RemoteProtocolError(sender, "dss signature share too large")
        share = dss.SignatureShare.decode(self.group, f["share"], self.n)
        if share.signer != sender:
            raise RemoteProtocolError(sender, "dss signature share under another signer's id")
        if sender == self.me:
            req.own_shares += 1
        req.shares.setdefault(sender, share)
        if len(req.shares) == len(req.signers):
            self._complete(req, now)

    def _complete(self, req: _Request[E], now: float) -> None:
        assert req.stock is not None
        public = req.stock.public
        try:
            if req.tweak:
                sig = appkeys.combine(self.group, public, req.to_sign, list(req.shares.values()), req.tweak)
            else:
                sig = dss.combine(self.group, public, req.to_sign, list(req.shares.values()))
        except (NotEnoughSharesError, dss.DSSRetryError, CryptoError):
            sig = None
        bad: dict[int, str] = {}
        if sig is None or sig.cheaters:
            for j, share in req.shares.items():
                try:
                    if req.tweak:
                        appkeys.verify_signature_share(self.group, public, req.to_sign, share, req.tweak)
                    else:
                        dss.verify_signature_share(self.group, public, req.to_sign, share)
                except CheatingError as exc:
                    bad[j] = exc.reason
        for j, reason in sorted(bad.items()):
            self._avoid[j] = now + AVOID * 6
            self._alert(AlertKind.BAD_SIGNATURE_SHARE, j, reason)
        if sig is None and not bad:
            # Every share is right, yet the signature fails: the presignature itself is bad.
            # Presigning skipped the w dealings' proofs (the fast path); check them now.
            guilty = dss.blame_w_dealings(self.group, public, self.key.public)
            for j, reason in sorted(guilty.items()):
                self._avoid[j] = now + AVOID * 6
                self._alert(AlertKind.BAD_SHARE, j, f"presign: {reason}")
            self._purge_stock(set(guilty))
        if sig is None:
            self._attempt(req, now)
            return
        self._release(req)  # used: the holders that did not sign discard it
        self.done[req.rid] = sig
        self._requests.pop(req.rid, None)

    # Holding and signing for others -------------------------------------------------------------

    def _on_lock(self, sender: int, body: Any) -> None:
        f = encoding.expect_map(
            body, {"rid": int, "attempt": int, "sid": bytes, "digest": bytes}, "presignature lock request"
        )
        answer = {"rid": f["rid"], "attempt": f["attempt"]}
        held = self._held.get(sender, {}).get(f["sid"])
        if held is None:
            self._send(sender, "missing", answer)
            return
        if len(f["digest"]) != 32:
            raise RemoteProtocolError(sender, "presignature lock: malformed digest")
        if held.lock is None:
            held.lock = f["digest"]
        elif held.lock != f["digest"]:
            self._alert(
                AlertKind.EQUIVOCATION,
                sender,
                f"asked to bind presignature {f['sid'][:80]!r} to a second message",
            )
            self._send(sender, "conflict", answer)
            return
        self._send(sender, "locked", {**answer, "c": sender, "sid": f["sid"], "digest": f["digest"]})

    def _on_request(self, sender: int, body: Any) -> None:
        f = encoding.expect_map(
            body,
            {"rid": int, "attempt": int, "sid": bytes, "message": bytes, "locks": list},
            "dss signing request",
        )
        answer = {"rid": f["rid"], "attempt": f["attempt"]}
        message: bytes = f["message"]
        if len(message) > MAX_MESSAGE:
            raise RemoteProtocolError(sender, "asked us to sign an oversized message")
        held = self._held.get(sender, {}).get(f["sid"])
        if held is None:
            self._send(sender, "missing", answer)
            return
        digest = _digest(message)
        if held.lock is not None and held.lock != digest:
            self._alert(
                AlertKind.EQUIVOCATION, sender, "asked to sign with a presignature bound to another message"
            )
            self._send(sender, "conflict", answer)
            return
        locks = f["locks"]
        if len(locks) > len(held.holders):
            raise RemoteProtocolError(sender, "dss signing request: too many locks")
        lockers: set[int] = set()
        for raw_lock in locks:
            author, kind, lock = self._open_forwarded(raw_lock, "dss signing request", sender)
            ok = (
                kind == "locked"
                and isinstance(lock, dict)
                and lock.get("c") == sender
                and lock.get("sid") == f["sid"]
                and lock.get("digest") == digest
                and author in held.holders
            )
            if not ok:
                raise RemoteProtocolError(
                    sender, "dss signing request: a lock for another presignature or message"
                )
            lockers.add(author)
        if len(lockers) < lock_quorum(len(held.holders), self.t):
            raise RemoteProtocolError(
                sender, "dss signing request: too few holders bound the presignature to it"
            )
        held.lock = digest
        if is_protocol_payload(message):
            self._send(
                sender, "refuse", {**answer, "reason": "a protocol payload is never signed on request"}
            )
            return
        # The coordinator's own share: its check ran when the request was made (and again on
        # every retry), as for FROST; a check that records what it signed must not run twice.
        refusal = None if sender == self.me else self._refusal(sender, message)
        to_sign, tweak = message, 0
        if refusal is None:
            try:
                to_sign = signed_form(self.check_for(message), message)
                tweak = self.key_tweak(message)
            except ValueError as exc:
                refusal = str(exc)[:MAX_REASON]
        if refusal is not None:
            self._held[sender].pop(f["sid"]).presig.wipe()
            self._send(sender, "refuse", {**answer, "reason": refusal})
            return
        self._held[sender].pop(f["sid"])
        try:
            if tweak:
                share = self._signature_share(held.presig, to_sign, tweak)
            else:
                share = self._signature_share(held.presig, to_sign)
        except dss.StalePresignatureError as exc:
            raise RemoteProtocolError(sender, str(exc)) from None
        self._send(sender, "share", {**answer, "share": share.encode(self.group)})

    def _on_discard(self, sender: int, body: Any) -> None:
        f = encoding.expect_map(body, {"sid": bytes}, "presignature discard")
        held = self._held.get(sender, {}).pop(f["sid"], None)
        if held is not None:
            held.presig.wipe()

    # Driving ----------------------------------------------------------------------------------------

    def tick(self, now: float) -> list[Outgoing]:
        self._now = max(self._now, now)
        self._maybe_start_session(now)
        self._pump(now)
        self._participant_tick(now)
        self._pump(now)
        self._coordinator_tick(now)
        self._pump(now)
        for req in list(self._requests.values()):
            if now >= req.deadline:
                if req.stock is not None:
                    waited_for = req.signers or tuple(i for i in req.stock.holders if i not in req.locks)
                    for i in waited_for:
                        if i not in req.shares and i != self.me:
                            self._avoid[i] = now + AVOID
                self._attempt(req, now)
        self._pump(now)
        # Finished sessions are forgotten (their secrets are already wiped).
        for c in [c for c, s in self._sessions.items() if s.stage == "done"]:
            del self._sessions[c]
        return self.drain()

    def wipe(self) -> None:
        """The period is over: every presignature and session secret goes."""
        for held in self._held.values():
            for h in held.values():
                h.presig.wipe()
        self._held.clear()
        for sess in self._sessions.values():
            sess.wipe()
        self._sessions.clear()
        self._stock.clear()
        self._batch.clear()
        self._deferred.clear()
        self._opened.clear()
        self.key.wipe()

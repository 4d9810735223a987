"""One period's refresh, as server ``me`` sees it: PushM (Table 2) then Table 1.

Theory of operation
-------------------
The period's protocol runs on a fixed schedule of rounds of length ``delta`` from the
period start T (every server knows T from the clock and C). Each phase below names
the paper's step it implements; the phase table is :class:`Schedule`.

=========  ===========================================================================
PUSHM      Table 2. Check [Scert(M), M] with Vstart from ROM. Operational servers send
           M and the signed KeyTable of the previous period to everyone; a server whose
           M is missing or corrupt waits for a verifiable copy (or raises an alert).
ANNOUNCE   Table 1 steps 1-3. Fresh (S_i, V_i) and (E_i, D_i); K_i = (V_i, S_i(E_i))
           broadcast with the previous period key S_i(t-1) when the server has one, in
           the clear (self-signed) otherwise. The announcement also carries the digests
           of the sharings the server holds (the *agreement on the data to refresh or
           recover*) and its FROST nonce commitments for the signing attempts. The
           broadcast (:mod:`~appliance.protocols.broadcast`) gives every honest server
           the same announcements; the judgment rules (i)-(iii) then pick the KeyTable.
SIGN       Table 1 steps 4-5. The KeyTable is jointly signed with Scert (FROST). Attempt a
           is led by the a-th operational server, which names t+1 signers; signers answer
           with signature shares sent to everyone, so anyone can aggregate; a bad share
           names its signer. 2t+1 attempts suffice against t faulty servers. Whoever
           holds a valid signature forwards it. Each server checks its own K_i is in the
           signed KeyTable (alert if not). From here on, messages are signed with the
           new period keys.
DEAL       Table 1 "refresh long-lived data", step 2. Every operational server broadcasts
           a sharing of zero for each long-lived secret (HJKY refresh) and, for each
           recovering server r, a blinding polynomial vanishing at r (HJKY recovery);
           it sends the sub-shares privately, each signed (complaint evidence).
COMPLAIN   Bad sub-shares are answered with their signed evidence, missing ones named.
REVEAL     Dealers answer "missing" complaints by revealing the sub-share.
CONTRIB    From the qualified dealers, every operational server computes its new
           shares and sends each recovering server its blinded value; a recovering
           server rebuilds its share of each secret and refreshes it.
CONFIRM    Every server that holds new shares sends everyone the digest of its new public
           sharings, signed with its new period key. A server keeps its new shares only if
           at least n-t servers (itself included) report the same digest; otherwise it
           keeps the previous period's shares (not used for signing this period) and the
           next refresh brings it to the sharing that t+1 servers agree on. This is a
           safety net for a broken synchrony assumption (messages later than a round): it
           stops honest servers from erasing their old shares for diverging new ones,
           which would lose the group key.
=========  ===========================================================================

The outcome (:class:`Outcome`) is the server's new public and private data, its status
(operational or recovering) and the alerts it raised. Nothing in this module reads a
clock, a socket or a random source: ``now`` and ``rand`` are arguments.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from nacl.exceptions import CryptoError as CryptoLibError
from nacl.public import Box, PrivateKey, PublicKey
from nacl.signing import SigningKey

from appliance.crypto import encoding, frost, pss
from appliance.crypto.errors import CheatingError, CryptoError, DecodeError
from appliance.crypto.groups import ED25519, Group
from appliance.crypto.keyshare import KeyShare, PublicSharing
from appliance.crypto.secret import SecretScalar
from appliance.crypto.vss import Complaint, ShareMessage, judge_complaint, sum_commitments
from appliance.protocols._core import (
    EVERYONE,
    Alert,
    AlertKind,
    LocalProtocolError,
    Outgoing,
    RemoteProtocolError,
    Signer,
    ed25519_verify,
)
from appliance.protocols.broadcast import AUTH, CLEAR, Item, SyncBroadcast, item_statement
from appliance.protocols.state import (
    SCERT,
    Constants,
    InvariantInfo,
    KeyEntry,
    KeyTable,
    encryption_key_payload,
    sharing_digest,
    sharing_from_obj,
    sharing_to_obj,
)

RandomBytes = Callable[[int], bytes]
#: Phases whose body is sealed to the recipient's period encryption key.
SEALED = frozenset({"shares", "contrib"})
CONTEXT = "pst/refresh"
MAX_MESSAGE = 4 * 1024 * 1024


class Status(enum.Enum):
    OPERATIONAL = "operational"
    RECOVERING = "recovering"


@dataclass
class PublicData:
    """What a server stores in public: M, the signed KeyTable, the current sharings."""

    m: InvariantInfo | None = None
    key_table: KeyTable | None = None
    sharings: dict[str, PublicSharing[Any]] = field(default_factory=dict)


@dataclass(repr=False)
class PrivateData:
    """What a server stores in private: this period's key seeds and its shares."""

    period: int
    signing_seed: bytes
    encryption_seed: bytes
    shares: dict[str, SecretScalar] = field(default_factory=dict)
    #: The shares are the previous period's, kept because the refresh was not confirmed by
    #: n-t servers (CONFIRM): valid for the next refresh, not used to sign in this period.
    carried: bool = False

    def wipe(self) -> None:
        for s in self.shares.values():
            s.wipe()

    def __repr__(self) -> str:
        return f"PrivateData(period={self.period}, secrets={sorted(self.shares)}, <hidden>)"


@dataclass
class Outcome:
    status: Status
    public: PublicData
    private: PrivateData | None
    alerts: list[Alert]
    failure: str | None = None


@dataclass(frozen=True)
class Schedule:
    """The period's phases, in rounds of ``delta`` from ``start`` (see the module's table)."""

    start: float
    delta: float
    t: int
    attempts: int = field(init=False)
    announce: int = field(init=False)
    sign: int = field(init=False)
    forward: int = field(init=False)
    deal: int = field(init=False)
    complain: int = field(init=False)
    reveal: int = field(init=False)
    contrib: int = field(init=False)
    confirm: int = field(init=False)
    end: int = field(init=False)

    def __post_init__(self) -> None:
        t = self.t
        put = object.__setattr__
        put(self, "attempts", 2 * t + 1)
        put(self, "announce", 1)
        put(self, "sign", 1 + t + 2)
        put(self, "forward", self.sign + 2 * self.attempts)
        put(self, "deal", self.forward + 1)
        put(self, "complain", self.deal + t + 1)
        put(self, "reveal", self.complain + t + 1)
        put(self, "contrib", self.reveal + t + 1)
        put(self, "confirm", self.contrib + 1)
        put(self, "end", self.confirm + 1)

    def at(self, rounds: int) -> float:
        return self.start + rounds * self.delta

    @property
    def duration(self) -> float:
        return self.end * self.delta


def _session(period: int, phase: str) -> bytes:
    return encoding.encode(["pst/refresh", period, phase])


def _share_session(kind: str, sid: str, lost: int) -> bytes:
    return encoding.encode([kind, sid, lost])


class PeriodRefresh:
    """The refresh of period ``period`` for server ``me`` (sans-IO)."""

    def __init__(
        self,
        *,
        me: int,
        period: int,
        vstart: bytes,
        public: PublicData,
        private: PrivateData | None,
        rand: RandomBytes,
        start: float | None = None,
    ) -> None:
        self.me = me
        self._start_override = start
        self.period = period
        self.vstart = vstart
        self.rand = rand
        self.alerts: list[Alert] = []
        self.rejected: list[RemoteProtocolError] = []
        self.outcome: Outcome | None = None
        self._out: list[Outgoing] = []
        self._buffer: list[tuple[int, bytes, float]] = []
        self._done_phases: set[str] = set()
        # Table 2: check what we hold.
        self.m: InvariantInfo | None = None
        self.old_table: KeyTable | None = None
        self.old_sharings: dict[str, PublicSharing[Any]] = {}
        self.keys: dict[str, KeyShare[Any]] = {}
        self.old_signer: Signer | None = None
        self.status = Status.RECOVERING
        self._old_public = public
        self._old_private = private
        self._check_local(public, private)
        self._own_push: dict[str, bytes] | None = None
        if self.m is not None and self.old_table is not None:
            self._own_push = {"M": self.m.encode(), "keytable": self.old_table.encode()}
        # Fresh period keys (Table 1 steps 1-2), generated now so they exist even if we recover.
        self.signing_seed = rand(32)
        self.encryption_seed = rand(32)
        self.signer = Signer(SigningKey(self.signing_seed))
        self.encryption_public = bytes(PrivateKey(self.encryption_seed).public_key)
        self.schedule: Schedule | None = None
        if self.m is not None:
            self._set_schedule(self.m.constants)
        # Later phases.
        self.announce: SyncBroadcast | None = None
        self.my_entry = KeyEntry(
            self.signer.public,
            self.encryption_public,
            self.signer.sign(encryption_key_payload(me, period, self.encryption_public)),
        )
        self.entries: dict[int, KeyEntry] = {}
        self.operational: list[int] = []
        self.recovering: list[int] = []
        self.table: KeyTable | None = None
        self.frost_commitments: dict[int, list[bytes]] = {}
        self._nonces: list[frost.SigningNonces] = []
        self._failed_signers: set[int] = set()
        self._requests: dict[int, tuple[int, ...]] = {}
        self._sig_shares: dict[tuple[int, tuple[int, ...]], dict[int, frost.SignatureShare]] = {}
        self._signed_attempts: set[int] = set()
        self._forwarded = False
        self._sign_closed = False
        self._package: frost.KeyPackage | None = None
        self.deal_bc: SyncBroadcast | None = None
        self.complain_bc: SyncBroadcast | None = None
        self.reveal_bc: SyncBroadcast | None = None
        self._subshares: dict[tuple[str, str, int, int], tuple[int, bytes]] = {}
        self._my_subshares: dict[int, list[list[Any]]] = {}
        self._contribs: dict[str, dict[int, tuple[int, Any]]] = {}
        self._confirms: dict[int, bytes] = {}
        self._alone = False
        self._dealings: dict[int, dict[str, Any]] = {}
        self._qual: list[int] = []
        self._new_keys: dict[str, KeyShare[Any]] = {}
        self._sent_subshares: dict[tuple[str, str, int, int], int] = {}
        self._reveals: dict[tuple[str, str, int, int, int], int] = {}

    # Table 2: what do we hold? ------------------------------------------------------------

    def _check_local(self, public: PublicData, private: PrivateData | None) -> None:
        """Table 2 (i)-(ii) on our own copy of M; the rest is decided once pushes are in."""
        m = public.m
        if m is not None:
            problem = m.check(self.me, self.vstart)
            if problem is not None:
                self._alert(AlertKind.INVALID_M, self.me, f"own copy of M rejected: {problem}")
                m = None
        if m is None:
            return
        self.m = m
        table = public.key_table
        if table is not None and table.period < self.period and table.verify(m.vcert):
            self.old_table = table
        self.status = Status.OPERATIONAL  # provisional: M is valid; see _decide_status

    def _decide_status(self) -> None:
        """Operational iff we hold the newest certified KeyTable, its key for us, and valid shares.

        The newest KeyTable is the one with the highest period among ours and those pushed
        by peers (all certified with Scert): a server that missed a refresh holds an older
        one, so its period key and shares are stale and it must recover.
        """
        self.status = Status.RECOVERING
        self.keys = {}
        self.old_signer = None
        public, private = self._old_public, self._old_private
        table = self.old_table
        if self.m is None or table is None or public.key_table is None:
            return
        if public.key_table.payload() != table.payload() or private is None or private.period != table.period:
            return
        c = self.m.constants
        key = SigningKey(private.signing_seed)
        entry = table.entries.get(self.me)
        if entry is None or bytes(key.verify_key) != entry.verify_key:
            return
        keys: dict[str, KeyShare[Any]] = {}
        for sid in c.secrets:
            sharing = public.sharings.get(sid)
            share = private.shares.get(sid)
            if sharing is None or share is None or share.wiped:
                return
            k = KeyShare(self.me, SecretScalar(share.value, c.group(sid).order), sharing)
            if sharing.n != c.n or sharing.t != c.t or not k.check(c.group(sid)):
                return
            keys[sid] = k
        self.keys = keys
        self.old_signer = Signer(key)
        self.old_sharings = dict(public.sharings)
        self.status = Status.OPERATIONAL

    def _set_schedule(self, c: Constants) -> None:
        start = self._start_override if self._start_override is not None else c.period_start(self.period)
        self.schedule = Schedule(start, c.delta, c.t)

    @property
    def constants(self) -> Constants:
        if self.m is None:
            raise LocalProtocolError("constants not known yet")
        return self.m.constants

    def _alert(self, kind: AlertKind, server: int, detail: str, evidence: tuple[bytes, ...] = ()) -> None:
        alert = Alert(kind, server, self.period, detail, evidence)
        if all((a.kind, a.server, a.detail) != (kind, server, detail) for a in self.alerts):
            self.alerts.append(alert)

    # Envelopes -------------------------------------------------------------------------

    def _envelope(self, phase: str, body: Any, signer: Signer | None) -> bytes:
        payload = encoding.signing_payload(phase, 1, CONTEXT, self.period, {"from": self.me, "body": body})
        sig = signer.sign(payload) if signer is not None else b""
        return encoding.encode(
            {"phase": phase, "period": self.period, "from": self.me, "body": body, "sig": sig}
        )

    def _bundle(self, phase: str, data: bytes) -> bytes:
        return encoding.encode(
            {"phase": phase, "period": self.period, "from": self.me, "body": data, "sig": b""}
        )

    def _open(self, sender: int, data: bytes) -> tuple[str, Any, bytes]:
        try:
            obj = encoding.decode(data, max_size=MAX_MESSAGE, what="refresh message")
            f = encoding.expect_map(
                obj,
                {"phase": str, "period": int, "from": int, "body": object, "sig": bytes},
                "refresh message",
            )
        except DecodeError as exc:
            raise RemoteProtocolError(sender, str(exc)) from None
        if f["from"] != sender:
            raise RemoteProtocolError(sender, f"message claims to come from server {f['from']}")
        if f["period"] != self.period:
            raise RemoteProtocolError(
                sender, f"message for period {f['period']}, now {self.period} (replayed?)"
            )
        return f["phase"], f["body"], f["sig"]

    def _check_sig(self, sender: int, phase: str, body: Any, sig: bytes) -> None:
        entry = self.entries.get(sender)
        payload = encoding.signing_payload(phase, 1, CONTEXT, self.period, {"from": sender, "body": body})
        if entry is None or not ed25519_verify(entry.verify_key, payload, sig):
            raise RemoteProtocolError(sender, f"{phase} message not signed with the sender's period key")

    # Driving ----------------------------------------------------------------------------

    def receive(self, sender: int, data: bytes, now: float) -> None:
        """Take a message from ``sender``; bad input is recorded in ``rejected`` and never raised."""
        try:
            self._receive(sender, data, now)
        except RemoteProtocolError as exc:
            self.rejected.append(exc)
        except (DecodeError, CryptoError, KeyError, TypeError, ValueError, IndexError) as exc:
            # A signed message whose body is malformed: the sender's fault, never our crash.
            self.rejected.append(
                RemoteProtocolError(sender, f"malformed message: {type(exc).__name__}: {exc}")
            )

    def _receive(self, sender: int, data: bytes, now: float) -> None:
        if self.outcome is not None:
            return
        phase, body, sig = self._open(sender, data)
        if phase == "pushm":
            self._on_pushm(sender, body)
            return
        if self.schedule is None:
            self._hold(sender, data, now)
            return
        if phase == "announce":
            if self.announce is None:
                self._hold(sender, data, now)
                return
            self._bundle_into(self.announce, sender, body, now)
        elif phase in ("deal", "complain", "reveal"):
            bc = {"deal": self.deal_bc, "complain": self.complain_bc, "reveal": self.reveal_bc}[phase]
            if bc is None:
                self._hold(sender, data, now)
                return
            self._bundle_into(bc, sender, body, now)
        elif phase in ("sign-request", "sign-share", "keytable-sig", "shares", "contrib", "confirm"):
            if not self.entries:
                self._hold(sender, data, now)
                return
            self._check_sig(sender, phase, body, sig)
            if phase in SEALED:
                body = self._unseal(sender, phase, body)
            handler = {
                "sign-request": self._on_sign_request,
                "sign-share": self._on_sign_share,
                "keytable-sig": self._on_keytable_sig,
                "shares": self._on_shares,
                "contrib": self._on_contrib,
                "confirm": self._on_confirm,
            }[phase]
            handler(sender, body)
        else:
            raise RemoteProtocolError(sender, f"unknown refresh phase {phase!r}")

    def _hold(self, sender: int, data: bytes, now: float) -> None:
        """Keep a message that arrived before its phase could take it (bounded: no memory DoS)."""
        if len(self._buffer) >= 64 * self._max_peers:
            raise RemoteProtocolError(sender, "too many early messages; dropped")
        self._buffer.append((sender, data, now))

    @property
    def _max_peers(self) -> int:
        return self.m.constants.n if self.m is not None else 64

    def _seal(self, to: int, body: Any) -> bytes:
        """Encrypt a private message to the recipient's new period key E_j (Table 1 step 2).

        Sub-shares travel sealed to E_j of the signed KeyTable, so that whoever holds a
        channel key of the previous period learns nothing from them. libsodium's crypto_box
        with an ephemeral key drawn from ``rand`` (a sealed box whose randomness we pass in,
        so that simulations replay byte for byte): ephemeral public key || nonce || box.
        """
        ephemeral = PrivateKey(self.rand(32))
        box = Box(ephemeral, PublicKey(self.entries[to].encryption_key))
        return bytes(ephemeral.public_key) + bytes(
            box.encrypt(encoding.encode(body), self.rand(Box.NONCE_SIZE))
        )

    def _unseal(self, sender: int, phase: str, body: Any) -> Any:
        if not isinstance(body, bytes):
            raise RemoteProtocolError(sender, f"{phase}: expected a sealed body")
        try:
            box = Box(PrivateKey(self.encryption_seed), PublicKey(body[:32]))
            plain = box.decrypt(body[32:])
        except (CryptoLibError, ValueError, TypeError):
            raise RemoteProtocolError(sender, f"{phase}: not sealed to our period key") from None
        try:
            return encoding.decode(plain, max_size=MAX_MESSAGE, what=phase)
        except DecodeError as exc:
            raise RemoteProtocolError(sender, str(exc)) from None

    def _bundle_into(self, bc: SyncBroadcast, sender: int, body: Any, now: float) -> None:
        if not isinstance(body, bytes):
            raise RemoteProtocolError(sender, "broadcast body must be bytes")
        bc.receive(sender, body, now)

    def tick(self, now: float) -> list[Outgoing]:
        if self.outcome is None:
            self._advance(now)
        out, self._out = self._out, []
        return out

    def next_wakeup(self, now: float) -> float | None:
        """When this engine next needs a tick without any message arriving: the next round boundary."""
        s = self.schedule
        if s is None or self.outcome is not None:
            return None
        k = max(0, int((now - s.start) // s.delta) + 1)
        return s.start + k * s.delta + 1e-6

    def _send(self, to: int, data: bytes) -> None:
        self._out.append(Outgoing(to, data))

    def _once(self, name: str) -> bool:
        if name in self._done_phases:
            return False
        self._done_phases.add(name)
        return True

    def _advance(self, now: float) -> None:
        s = self.schedule
        if s is None:
            return
        if now >= s.start and self._once("pushm") and self.m is not None and self.old_table is not None:
            self._send_pushm()
        if now >= s.at(s.announce) and self._once("announce"):
            if self.m is None:
                self._finish(now, "recovery failed: no verifiable copy of [Scert(M), M] arrived", alert=True)
                return
            self._decide_status()
            self._start_announce()
        self._replay(now)
        if now >= s.at(s.sign) and self._once("judge") and not self._judge_announcements():
            if self._alone:
                self._finish(now, "refresh aborted: no other server took part", alert=False)
            else:
                self._finish(now, "refresh aborted: no KeyTable could be agreed", alert=True)
            return
        if self.table is not None:
            self._signing(now)
        if now >= s.at(s.deal) and self._once("deal"):
            if self.table is None or not self.table.signature:
                self._finish(now, "refresh aborted: the KeyTable was not signed with Scert", alert=True)
                return
            if self.my_entry != self.table.entries.get(self.me):
                self._alert(
                    AlertKind.OWN_KEY_MISSING,
                    self.me,
                    "own key announcement is missing from the signed KeyTable",
                )
                self._finish(now, "own key missing from the KeyTable", alert=False)
                return
            self._start_deal()
        if now >= s.at(s.complain) and self._once("complain"):
            self._start_complain()
        if now >= s.at(s.reveal) and self._once("reveal"):
            self._start_reveal()
        if now >= s.at(s.contrib) and self._once("contrib"):
            self._compute_and_contribute()
        if now >= s.at(s.confirm) and self._once("confirm"):
            self._confirm()
        if now >= s.at(s.end) and self._once("end"):
            self._complete(now)
        self._flush_broadcasts(now)

    def _flush_broadcasts(self, now: float) -> None:
        for bc, name in (
            (self.announce, "announce"),
            (self.deal_bc, "deal"),
            (self.complain_bc, "complain"),
            (self.reveal_bc, "reveal"),
        ):
            if bc is not None:
                for o in bc.tick(now):
                    self._send(o.to, self._bundle(name, o.data))

    def _replay(self, now: float) -> None:
        if not self._buffer:
            return
        pending, self._buffer = self._buffer, []
        for sender, data, at in pending:
            self.receive(sender, data, at if at >= (self.schedule.start if self.schedule else 0) else now)

    # PushM (Table 2) ------------------------------------------------------------------------

    def _send_pushm(self) -> None:
        assert self.m is not None and self.old_table is not None
        if self._own_push is None:
            self._own_push = {"M": self.m.encode(), "keytable": self.old_table.encode()}
        self._send(EVERYONE, self._envelope("pushm", self._own_push, None))

    def _on_pushm(self, sender: int, body: Any) -> None:
        if isinstance(body, dict) and self._own_push is not None and body == self._own_push:
            return  # the very M and KeyTable we hold: nothing to learn
        try:
            f = encoding.expect_map(body, {"M": bytes, "keytable": bytes}, "PushM")
            m = InvariantInfo.decode(f["M"])
            table = KeyTable.decode(f["keytable"])
        except DecodeError as exc:
            raise RemoteProtocolError(sender, f"PushM: {exc}") from None
        if self.m is None or self.m.check(self.me, self.vstart) is not None:
            problem = m.check(self.me, self.vstart)
            if problem is not None:
                raise RemoteProtocolError(sender, f"PushM: M not verifiable with our Vstart: {problem}")
            self.m = m
            self._set_schedule(m.constants)
        newest = self.old_table.period if self.old_table is not None else -1
        if newest < table.period < self.period and table.verify(self.m.vcert):
            self.old_table = table

    # Announce (Table 1 steps 1-3) ----------------------------------------------------------------

    def _start_announce(self) -> None:
        assert self.schedule is not None
        c = self.constants
        old = self.old_table
        old_keys = {i: e.verify_key for i, e in old.entries.items()} if old is not None else {}
        session = _session(self.period, "announce")

        def classify(item: Item) -> str | None:
            statement = item_statement(session, self.period, item.author, item.payload)
            key = old_keys.get(item.author)
            if key is not None and ed25519_verify(key, statement, item.signature):
                return AUTH
            try:
                entry = self._decode_announcement(item.payload)[0]
            except DecodeError:
                return None
            return CLEAR if ed25519_verify(entry.verify_key, statement, item.signature) else None

        def relay_verify(server: int, payload: bytes, sig: bytes) -> bool:
            key = old_keys.get(server)
            return key is not None and ed25519_verify(key, payload, sig)

        self.announce = SyncBroadcast(
            n=c.n,
            t=c.t,
            me=self.me,
            period=self.period,
            session=session,
            start=self.schedule.at(self.schedule.announce),
            delta=self.schedule.delta,
            signer=self.old_signer,
            relay_verify=relay_verify,
            classify=classify,
            allow_clear=True,
        )
        sharings = (
            {sid: sharing_digest(c.group(sid), self.old_sharings[sid]) for sid in sorted(c.secrets)}
            if self.status == Status.OPERATIONAL
            else {}
        )
        commitments: list[bytes] = []
        if self.status == Status.OPERATIONAL:
            package = self._frost_package()
            for _ in range(self.schedule.attempts):
                nonces = frost.commit(package, self.rand(64))
                self._nonces.append(nonces)
                commitments.append(nonces.commitment.to_bytes())
        payload = encoding.encode({"K": self.my_entry.to_obj(), "sharings": sharings, "frost": commitments})
        author_signer = self.old_signer if self.old_signer is not None else self.signer
        self.announce.broadcast(self.announce.make_item(payload, author_signer))

    def _frost_package(self) -> frost.KeyPackage:
        if self._package is None:
            key = self.keys[SCERT]
            self._package = frost.KeyPackage(self.me, key.share.value, key.public_key, self.constants.t + 1)
        return self._package

    def _decode_announcement(self, payload: bytes) -> tuple[KeyEntry, dict[str, bytes], list[bytes]]:
        obj = encoding.expect_map(
            encoding.decode(payload, what="key announcement"),
            {"K": dict, "sharings": dict, "frost": list},
            "key announcement",
        )
        entry = KeyEntry.from_obj(obj["K"], "key announcement")
        sharings = {}
        for k, v in obj["sharings"].items():
            if not isinstance(k, str) or not isinstance(v, bytes):
                raise DecodeError("key announcement: sharings must map secret ids to digests")
            sharings[k] = v
        if not all(isinstance(x, bytes) for x in obj["frost"]):
            raise DecodeError("key announcement: FROST commitments must be bytes")
        return entry, sharings, list(obj["frost"])

    def _judge_announcements(self) -> bool:
        """The judgment rules (i)-(iii), then the agreed KeyTable (unsigned yet)."""
        assert self.announce is not None and self.schedule is not None
        c = self.constants
        self.alerts.extend(a for a in self.announce.alerts if a.kind != AlertKind.EQUIVOCATION)
        self.rejected.extend(self.announce.rejected)
        accepted: dict[int, tuple[KeyEntry, dict[str, bytes], list[bytes], bool]] = {}
        for author, classes in self.announce.result().items():
            auth, clear = classes.get(AUTH, []), classes.get(CLEAR, [])
            if len(auth) >= 2:
                self._alert(
                    AlertKind.CONFLICTING_ANNOUNCEMENTS,
                    author,
                    "two different authenticated key announcements (rule i: both discarded; stolen key?)",
                    evidence=tuple(x for it in auth[:2] for x in (it.payload, it.signature)),
                )
                continue
            chosen, authenticated = (auth[0], True) if auth else (None, False)
            if chosen is None:
                if len(clear) >= 2:
                    self._alert(
                        AlertKind.CONFLICTING_ANNOUNCEMENTS,
                        author,
                        "several different unauthenticated key announcements (rule iii: all discarded)",
                    )
                    continue
                if not clear:
                    continue
                chosen = clear[0]
            elif clear:
                self._alert(
                    AlertKind.CONFLICTING_ANNOUNCEMENTS,
                    author,
                    "an unauthenticated announcement besides the authenticated one (rule ii: kept that one)",
                )
            try:
                entry, sharings, commitments = self._decode_announcement(chosen.payload)
            except DecodeError as exc:
                self._alert(AlertKind.BAD_MESSAGE, author, f"undecodable key announcement: {exc}")
                continue
            if not ed25519_verify(
                entry.verify_key,
                encryption_key_payload(author, self.period, entry.encryption_key),
                entry.signature,
            ):
                self._alert(
                    AlertKind.BAD_MESSAGE, author, "key announcement: E_i not signed with the new S_i"
                )
                continue
            accepted[author] = (entry, sharings, commitments, authenticated)
        if set(accepted) <= {self.me}:
            # Nobody else took part (we started just before the period, or we are cut off):
            # no disagreement to report; the others see us silent and we retry next period.
            self._alone = True
            return False
        votes: dict[str, dict[bytes, int]] = {sid: {} for sid in c.secrets}
        for _entry, sharings, _commitments, authenticated in accepted.values():
            if authenticated:
                for sid in c.secrets:
                    digest = sharings.get(sid)
                    if digest is not None:
                        votes[sid][digest] = votes[sid].get(digest, 0) + 1
        agreed: dict[str, bytes] = {}
        for sid, counts in votes.items():
            best = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
            if not best or best[0][1] < c.t + 1:
                self._alert(
                    AlertKind.RECOVERY_FAILED, self.me, f"no t+1 servers agree on the sharing of {sid!r}"
                )
                return False
            agreed[sid] = best[0][0]
        operational: list[int] = []
        for author, (_entry, sharings, commitments, authenticated) in sorted(accepted.items()):
            ok = authenticated and all(sharings.get(sid) == agreed[sid] for sid in c.secrets)
            if ok:
                # Decoded (and their points validated) lazily, when an attempt uses them.
                sized = len(commitments) == self.schedule.attempts and all(
                    len(x) == frost.COMMITMENT_SIZE for x in commitments
                )
                if not sized:
                    self._alert(
                        AlertKind.BAD_MESSAGE, author, "key announcement: bad FROST nonce commitments"
                    )
                    ok = False
                else:
                    self.frost_commitments[author] = commitments
            if ok:
                operational.append(author)
        self.entries = {a: v[0] for a, v in accepted.items()}
        self.operational = operational
        self.recovering = sorted(set(accepted) - set(operational))
        if len(operational) < c.t + 1:
            self._alert(
                AlertKind.RECOVERY_FAILED, self.me, f"only {len(operational)} operational servers, need t+1"
            )
            return False
        self.table = KeyTable(self.period, dict(self.entries), agreed, frozenset(self.recovering))
        if self.me in self.operational and self.status != Status.OPERATIONAL:  # pragma: no cover - defensive
            raise LocalProtocolError("judged operational without holding shares")
        if self.me not in self.operational:
            self.status = Status.RECOVERING
        return True

    # Sign the KeyTable (Table 1 steps 4-5) -----------------------------------------------------

    def _leader(self, attempt: int) -> int:
        return self.operational[attempt % len(self.operational)]

    def _signing(self, now: float) -> None:
        s = self.schedule
        assert s is not None and self.table is not None
        have = bool(self.table.signature)
        if now >= s.at(s.forward) and (have or self._sign_closed):
            if have and not self._forwarded:
                self._forwarded = True
                self._send(
                    EVERYONE, self._envelope("keytable-sig", {"sig": self.table.signature}, self.signer)
                )
            return
        if now >= s.at(s.forward):
            self._sign_closed = True
        if have and not self._forwarded:
            self._forwarded = True
            self._send(EVERYONE, self._envelope("keytable-sig", {"sig": self.table.signature}, self.signer))
        for a in range(s.attempts):
            request_at, share_at, done_at = (
                s.at(s.sign + 2 * a),
                s.at(s.sign + 2 * a + 1),
                s.at(s.sign + 2 * a + 2),
            )
            if now >= request_at and self._once(f"request-{a}") and not have and self._leader(a) == self.me:
                signers = self._choose_signers()
                if len(signers) < self.constants.t + 1:
                    continue
                self._requests[a] = signers
                self._send(
                    EVERYONE,
                    self._envelope("sign-request", {"attempt": a, "signers": list(signers)}, self.signer),
                )
            if now >= share_at and self._once(f"share-{a}") and not have:
                self._sign_share(a)
            if now >= done_at and self._once(f"aggregate-{a}") and not self.table.signature:
                self._aggregate(a)

    def _choose_signers(self) -> tuple[int, ...]:
        t = self.constants.t
        candidates = [i for i in self.operational if i not in self._failed_signers]
        if self.me in candidates:
            candidates.remove(self.me)
            candidates.insert(0, self.me)
        return tuple(sorted(candidates[: t + 1]))

    def _on_sign_request(self, sender: int, body: Any) -> None:
        f = encoding.expect_map(body, {"attempt": int, "signers": list}, "sign request")
        a, signers = f["attempt"], tuple(f["signers"])
        s = self.schedule
        assert s is not None
        if not 0 <= a < s.attempts or sender != self._leader(a):
            raise RemoteProtocolError(
                sender, f"sign request for attempt {a} from a server that does not lead it"
            )
        ok = (
            len(signers) == self.constants.t + 1
            and len(set(signers)) == len(signers)
            and all(isinstance(i, int) and i in self.frost_commitments for i in signers)
        )
        if not ok:
            raise RemoteProtocolError(sender, f"sign request for attempt {a} names an invalid signer set")
        self._requests.setdefault(a, tuple(sorted(signers)))

    def _commitment_list(self, a: int, signers: tuple[int, ...]) -> list[frost.SigningCommitment]:
        """The agreed commitments of ``signers`` for attempt a; a bad one names its signer."""
        out = []
        for i in signers:
            try:
                c = frost.SigningCommitment.from_bytes(self.frost_commitments[i][a])
            except DecodeError as exc:
                raise CheatingError(i, f"announced a bad FROST commitment: {exc}") from None
            if c.identifier != i:
                raise CheatingError(i, "announced a FROST commitment under another id")
            out.append(c)
        return out

    def _sign_share(self, a: int) -> None:
        signers = self._requests.get(a)
        if signers is None or self.me not in signers or a in self._signed_attempts or not self._nonces:
            return
        assert self.table is not None
        self._signed_attempts.add(a)
        try:
            share = frost.sign(
                self._frost_package(),
                self._nonces[a],
                self.table.payload(),
                self._commitment_list(a, signers),
            )
        except CryptoError as exc:
            self.rejected.append(RemoteProtocolError(self._leader(a), f"cannot sign attempt {a}: {exc}"))
            return
        body = {"attempt": a, "signers": list(signers), "share": share.to_bytes()}
        self._record_share(self.me, body)
        self._send(EVERYONE, self._envelope("sign-share", body, self.signer))

    def _on_sign_share(self, sender: int, body: Any) -> None:
        self._record_share(sender, body)

    def _record_share(self, sender: int, body: Any) -> None:
        f = encoding.expect_map(body, {"attempt": int, "signers": list, "share": bytes}, "signature share")
        a, signers = f["attempt"], tuple(f["signers"])
        if sender not in signers or not all(
            isinstance(i, int) and i in self.frost_commitments for i in signers
        ):
            raise RemoteProtocolError(sender, "signature share for a signer set it is not in")
        try:
            share = frost.SignatureShare.from_bytes(f["share"])
        except DecodeError as exc:
            raise RemoteProtocolError(sender, f"signature share: {exc}") from None
        if share.identifier != sender:
            raise RemoteProtocolError(sender, "signature share carries another signer's id")
        self._sig_shares.setdefault((a, signers), {}).setdefault(sender, share)

    def _aggregate(self, a: int) -> None:
        assert self.table is not None
        scert = self.old_sharings.get(SCERT)
        for (attempt, signers), shares in sorted(self._sig_shares.items()):
            if attempt != a:
                continue
            missing = [i for i in signers if i not in shares]
            if missing:
                self._failed_signers.update(missing)
                continue
            if scert is None:
                continue
            public = frost.PublicKeyPackage(
                scert.public_key,
                {i: scert.verification_share(ED25519, i) for i in signers},
                self.constants.t + 1,
            )
            try:
                sig = frost.aggregate_and_identify(
                    public, self._commitment_list(a, signers), self.table.payload(), list(shares.values())
                )
            except CheatingError as exc:
                self._failed_signers.add(exc.party)
                self._alert(
                    AlertKind.BAD_SIGNATURE_SHARE,
                    exc.party,
                    f"bad FROST share for the KeyTable: {exc.reason}",
                )
                continue
            except CryptoError as exc:
                self.rejected.append(RemoteProtocolError(signers[0], f"could not aggregate: {exc}"))
                continue
            self.table = self.table.signed(sig)
            return

    def _on_keytable_sig(self, sender: int, body: Any) -> None:
        if self.table is None or self.table.signature or self.m is None:
            return
        f = encoding.expect_map(body, {"sig": bytes}, "KeyTable signature")
        candidate = self.table.signed(f["sig"])
        if not candidate.verify(self.m.vcert):
            raise RemoteProtocolError(sender, "forwarded KeyTable signature does not verify with Vcert")
        self.table = candidate

    # Deal, complain, reveal (refresh long-lived data) --------------------------------------------

    def _new_bc(self, phase: str, start_round: int) -> SyncBroadcast:
        assert self.schedule is not None
        c = self.constants
        session = _session(self.period, phase)
        keys = {i: e.verify_key for i, e in self.entries.items()}

        def classify(item: Item) -> str | None:
            key = keys.get(item.author)
            statement = item_statement(session, self.period, item.author, item.payload)
            return AUTH if key is not None and ed25519_verify(key, statement, item.signature) else None

        def verify(server: int, payload: bytes, sig: bytes) -> bool:
            key = keys.get(server)
            return key is not None and ed25519_verify(key, payload, sig)

        return SyncBroadcast(
            n=c.n,
            t=c.t,
            me=self.me,
            period=self.period,
            session=session,
            start=self.schedule.at(start_round),
            delta=self.schedule.delta,
            signer=self.signer,
            relay_verify=verify,
            classify=classify,
        )

    def _start_deal(self) -> None:
        assert self.schedule is not None
        c = self.constants
        self.deal_bc = self._new_bc("deal", self.schedule.deal)
        if self.me not in self.operational:
            return
        helpers = [i for i in self.operational]
        body: dict[str, Any] = {"refresh": {}, "recover": {}}
        private: dict[int, list[list[Any]]] = {j: [] for j in self.entries if j != self.me}
        for sid in sorted(c.secrets):
            group = c.group(sid)
            rand = self._scalars(group)
            dealing, subshares = pss.refresh_deal(group, self.me, c.n, c.t, rand)
            body["refresh"][sid] = dealing.to_obj(group)["points"]
            for j in self.entries:
                self._deliver_sub(private, "refresh", sid, 0, j, subshares[j])
            body["recover"][sid] = {}
            for r in self.recovering:
                rdealing, rsub = pss.recovery_deal(group, self.me, r, helpers, c.t, rand)
                body["recover"][sid][r] = rdealing.to_obj(group)["points"]
                for j in helpers:
                    self._deliver_sub(private, "recover", sid, r, j, rsub[j])
        self.deal_bc.broadcast(self.deal_bc.make_item(encoding.encode(body), self.signer))
        for j, items in private.items():
            if j in self.entries:
                self._send(j, self._envelope("shares", self._seal(j, items), self.signer))

    def _deliver_sub(
        self, private: dict[int, list[list[Any]]], kind: str, sid: str, r: int, j: int, value: int
    ) -> None:
        msg = ShareMessage(_share_session(kind, sid, r), self.me, j, (value,))
        sig = self.signer.sign(msg.payload(CONTEXT, self.period))
        self._sent_subshares[(kind, sid, r, j)] = value
        if j == self.me:
            self._subshares[(kind, sid, r, self.me)] = (value, sig)
        else:
            private[j].append([kind, sid, r, value, sig])

    def _scalars(self, group: Group[Any]) -> Callable[[], int]:
        size = (group.order.bit_length() + 7) // 8 + 16

        def draw() -> int:
            return int.from_bytes(self.rand(size), "big") % (group.order - 1) + 1

        return draw

    def _on_shares(self, sender: int, body: Any) -> None:
        if not isinstance(body, list) or len(body) > 4 * len(self.constants.secrets) * (self.constants.n + 1):
            raise RemoteProtocolError(sender, "sub-share message: expected a bounded list")
        for item in body:
            if not (isinstance(item, list) and len(item) == 5):
                raise RemoteProtocolError(sender, "sub-share message: malformed entry")
            kind, sid, r, value, sig = item
            if (
                kind not in ("refresh", "recover")
                or sid not in self.constants.secrets
                or not isinstance(r, int)
            ):
                raise RemoteProtocolError(sender, "sub-share message: unknown secret or kind")
            if not isinstance(value, int) or not isinstance(sig, bytes):
                raise RemoteProtocolError(sender, "sub-share message: bad value or signature type")
            # The envelope is signed; each sub-share's own signature is evidence for a complaint
            # and is checked only when we need it (see _start_complain).
            self._subshares.setdefault((kind, sid, r, sender), (value, sig))

    def _parse_dealings(self) -> None:
        """The agreed deal items, decoded; a malformed one disqualifies its dealer."""
        assert self.deal_bc is not None
        c = self.constants
        self.rejected.extend(self.deal_bc.rejected)
        self.alerts.extend(self.deal_bc.alerts)
        for d, item in sorted(self.deal_bc.single_values().items()):
            if d not in self.operational:
                continue
            try:
                obj = encoding.expect_map(
                    encoding.decode(item.payload, what="dealing"),
                    {"refresh": dict, "recover": dict},
                    "dealing",
                )
                parsed: dict[str, Any] = {"refresh": {}, "recover": {}}
                for sid in c.secrets:
                    group = c.group(sid)
                    zd = pss.ZeroDealing.decode(
                        group, encoding.encode({"dealer": d, "points": obj["refresh"][sid]}), c.n, c.t
                    )
                    parsed["refresh"][sid] = zd
                    parsed["recover"][sid] = {}
                    for r in self.recovering:
                        rd_obj = {"dealer": d, "lost": r, "points": obj["recover"][sid][r]}
                        parsed["recover"][sid][r] = pss.RecoveryDealing.decode(
                            group, encoding.encode(rd_obj), c.n, c.t
                        )
            except (DecodeError, KeyError, TypeError) as exc:
                self._alert(AlertKind.BAD_MESSAGE, d, f"malformed refresh dealing: {exc}")
                continue
            self._dealings[d] = parsed

    def _expected(self, d: int) -> list[tuple[str, str, int]]:
        """The sub-shares dealer d owes us."""
        out = [("refresh", sid, 0) for sid in sorted(self.constants.secrets)]
        if self.me in self.operational:
            out += [("recover", sid, r) for sid in sorted(self.constants.secrets) for r in self.recovering]
        return out

    def _check_sub(
        self, d: int, kind: str, sid: str, r: int, value: int, recipient: int | None = None
    ) -> bool:
        group = self.constants.group(sid)
        dealing = (
            self._dealings[d]["refresh"][sid] if kind == "refresh" else self._dealings[d]["recover"][sid][r]
        )
        ok: bool = dealing.check_subshare(group, self.me if recipient is None else recipient, value)
        return ok

    def _start_complain(self) -> None:
        assert self.schedule is not None
        self._parse_dealings()
        self.complain_bc = self._new_bc("complain", self.schedule.complain)
        bad: list[list[Any]] = []
        missing: list[list[Any]] = []
        # Per kind of sub-share, check the sum over all dealers once; only on failure check each.
        groups: dict[tuple[str, str, int], dict[int, tuple[int, bytes]]] = {}
        for d in sorted(self._dealings):
            for kind, sid, r in self._expected(d):
                got = self._subshares.get((kind, sid, r, d))
                if got is None:
                    missing.append([kind, sid, r, d])
                else:
                    groups.setdefault((kind, sid, r), {})[d] = got
        for (kind, sid, r), received in sorted(groups.items()):
            if self._batch_ok(kind, sid, r, received):
                continue
            for d, (value, sig) in sorted(received.items()):
                if self._check_sub(d, kind, sid, r, value):
                    continue
                msg = ShareMessage(_share_session(kind, sid, r), d, self.me, (value,))
                if ed25519_verify(self.entries[d].verify_key, msg.payload(CONTEXT, self.period), sig):
                    bad.append([kind, sid, r, d, value, sig])
                else:  # no usable evidence: the dealer must reveal the sub-share in public
                    missing.append([kind, sid, r, d])
        body = encoding.encode({"bad": bad, "missing": missing})
        self.complain_bc.broadcast(self.complain_bc.make_item(body, self.signer))

    def _batch_ok(self, kind: str, sid: str, r: int, received: Mapping[int, tuple[int, bytes]]) -> bool:
        group = self.constants.group(sid)
        q = group.order
        if not all(0 <= v < q for v, _sig in received.values()):
            return False
        total = sum(v for v, _sig in received.values()) % q
        if kind == "refresh":
            full = [self._dealings[d]["refresh"][sid].full_commitment(group) for d in sorted(received)]
            expected = sum_commitments(group, full).evaluate(group, self.me)
        else:
            expected = pss.blinding_commitment(
                group, {d: self._dealings[d]["recover"][sid][r] for d in received}, self.me
            )
        ok: bool = group.mul_base(total) == expected
        return ok

    def _complaints(self) -> tuple[list[tuple[int, list[Any]]], list[tuple[int, list[Any]]]]:
        assert self.complain_bc is not None
        bad: list[tuple[int, list[Any]]] = []
        missing: list[tuple[int, list[Any]]] = []
        for accuser, item in sorted(self.complain_bc.single_values().items()):
            try:
                obj = encoding.expect_map(
                    encoding.decode(item.payload, what="complaints"),
                    {"bad": list, "missing": list},
                    "complaints",
                )
            except DecodeError as exc:
                self._alert(AlertKind.BAD_MESSAGE, accuser, f"malformed complaints: {exc}")
                continue
            bad += [(accuser, x) for x in obj["bad"] if isinstance(x, list) and len(x) == 6]
            missing += [(accuser, x) for x in obj["missing"] if isinstance(x, list) and len(x) == 4]
        return bad, missing

    def _start_reveal(self) -> None:
        assert self.schedule is not None
        self.reveal_bc = self._new_bc("reveal", self.schedule.reveal)
        if self.me not in self._dealings:
            return
        _bad, missing = self._complaints()
        reveals = []
        for accuser, (kind, sid, r, d) in missing:
            if d == self.me and accuser in self._my_private_recipients(kind):
                value = self._my_subshare(kind, sid, r, accuser)
                if value is not None:
                    reveals.append([kind, sid, r, accuser, value])
        self.reveal_bc.broadcast(self.reveal_bc.make_item(encoding.encode({"reveal": reveals}), self.signer))

    def _my_private_recipients(self, kind: str) -> set[int]:
        return set(self.entries) if kind == "refresh" else set(self.operational)

    def _my_subshare(self, kind: str, sid: str, r: int, j: int) -> int | None:
        return self._sent_subshares.get((kind, sid, r, j))

    # Qualification and contributions --------------------------------------------------------------

    def _qualify(self) -> list[int]:
        """QUAL from agreed data only: well-formed dealings, no upheld complaint, every gap revealed."""
        assert self.reveal_bc is not None
        c = self.constants
        cheaters: dict[int, str] = {}
        bad, missing = self._complaints()
        keys = {i: e.verify_key for i, e in self.entries.items()}

        def verify(server: int, payload: bytes, sig: bytes) -> bool:
            key = keys.get(server)
            return key is not None and ed25519_verify(key, payload, sig)

        for accuser, (kind, sid, r, d, value, sig) in bad:
            if d not in self._dealings or sid not in c.secrets or kind not in ("refresh", "recover"):
                cheaters.setdefault(accuser, "complaint about a dealing that does not exist")
                continue
            group = c.group(sid)
            try:
                dealing = (
                    self._dealings[d]["refresh"][sid]
                    if kind == "refresh"
                    else self._dealings[d]["recover"][sid][r]
                )
            except KeyError:
                cheaters.setdefault(accuser, "complaint about a dealing that does not exist")
                continue
            commitment = dealing.full_commitment(group) if kind == "refresh" else None
            msg = ShareMessage(
                _share_session(kind, sid, r), d, accuser, (value,) if isinstance(value, int) else ()
            )
            if kind == "refresh" and commitment is not None and isinstance(sig, bytes):
                verdict = judge_complaint(
                    group,
                    commitment,
                    Complaint(accuser, msg, sig),
                    verify,
                    context=CONTEXT,
                    period=self.period,
                )
                guilty, reason = verdict.guilty, verdict.reason
            else:
                signed = isinstance(sig, bytes) and verify(d, msg.payload(CONTEXT, self.period), sig)
                good = isinstance(value, int) and dealing.check_subshare(group, accuser, value)
                guilty, reason = (
                    (d, "signed a bad recovery sub-share")
                    if signed and not good
                    else (accuser, "false complaint about a recovery sub-share")
                )
            cheaters.setdefault(guilty, reason)
        reveals: dict[tuple[str, str, int, int, int], int] = {}
        for d, item in self.reveal_bc.single_values().items():
            try:
                obj = encoding.expect_map(
                    encoding.decode(item.payload, what="reveals"), {"reveal": list}, "reveals"
                )
            except DecodeError:
                continue
            for x in obj["reveal"]:
                if isinstance(x, list) and len(x) == 5 and isinstance(x[4], int):
                    reveals.setdefault((x[0], x[1], x[2], x[3], d), x[4])
        self._reveals = reveals
        for accuser, (kind, sid, r, d) in missing:
            if d not in self._dealings or d in cheaters:
                continue
            value = reveals.get((kind, sid, r, accuser, d))
            if value is None:
                cheaters.setdefault(d, f"did not reveal the sub-share of server {accuser} after a complaint")
                continue
            try:
                ok = self._check_sub(d, kind, sid, r, value, recipient=accuser)
            except (KeyError, TypeError):
                ok = False
            if not ok:
                cheaters.setdefault(d, f"revealed a bad sub-share for server {accuser}")
        for guilty, reason in sorted(cheaters.items()):
            kind = AlertKind.FALSE_COMPLAINT if "false complaint" in reason else AlertKind.BAD_SHARE
            self._alert(kind, guilty, reason)
        for d in self.operational:
            if d not in self._dealings and d not in cheaters:
                self._alert(AlertKind.SILENT, d, "operational server dealt nothing in the refresh")
        qual = [d for d in sorted(self._dealings) if d not in cheaters]
        return qual

    def _value(self, kind: str, sid: str, r: int, d: int) -> int | None:
        revealed = self._reveals.get((kind, sid, r, self.me, d))
        if revealed is not None:
            return revealed
        got = self._subshares.get((kind, sid, r, d))
        return got[0] if got is not None else None

    def _compute_and_contribute(self) -> None:
        c = self.constants
        self._qual = self._qualify()
        if len(self._qual) < c.t + 1:
            self._alert(
                AlertKind.RECOVERY_FAILED, self.me, f"only {len(self._qual)} qualified dealers, need t+1"
            )
            return
        for sid in sorted(c.secrets):
            group = c.group(sid)
            zero = {d: self._dealings[d]["refresh"][sid] for d in self._qual}
            if self.me in self.operational:
                subs = {d: self._value("refresh", sid, 0, d) for d in self._qual}
                if any(v is None for v in subs.values()):
                    self._alert(AlertKind.RECOVERY_FAILED, self.me, f"missing refresh sub-shares for {sid!r}")
                    continue
                try:
                    self._new_keys[sid] = pss.refresh_share(
                        group, self.keys[sid], zero, {d: v for d, v in subs.items() if v is not None}
                    )
                except CryptoError as exc:
                    self._alert(AlertKind.RECOVERY_FAILED, self.me, f"refresh of {sid!r} failed: {exc}")
                    continue
                for r in self.recovering:
                    dealings = {d: self._dealings[d]["recover"][sid][r] for d in self._qual}
                    rsubs = {d: self._value("recover", sid, r, d) for d in self._qual}
                    if any(v is None for v in rsubs.values()):
                        continue
                    try:
                        y = pss.recovery_contribution(
                            group, self.keys[sid], dealings, {d: v for d, v in rsubs.items() if v is not None}
                        )
                    except CryptoError:
                        continue
                    body = {"sid": sid, "y": y, "sharing": sharing_to_obj(group, self.old_sharings[sid])}
                    self._send(r, self._envelope("contrib", self._seal(r, body), self.signer))

    def _on_contrib(self, sender: int, body: Any) -> None:
        if self.me not in self.recovering or sender not in self.operational:
            raise RemoteProtocolError(sender, "unexpected recovery contribution")
        f = encoding.expect_map(body, {"sid": str, "y": int, "sharing": dict}, "recovery contribution")
        if f["sid"] not in self.constants.secrets:
            raise RemoteProtocolError(sender, "recovery contribution for an unknown secret")
        self._contribs.setdefault(f["sid"], {}).setdefault(sender, (f["y"], f["sharing"]))

    def _recover(self) -> None:
        """A recovering server rebuilds each share from the helpers' blinded values, then refreshes it."""
        c = self.constants
        assert self.table is not None
        for sid in sorted(c.secrets):
            group = c.group(sid)
            received = self._contribs.get(sid, {})
            old: PublicSharing[Any] | None = None
            for _helper, (_y, obj) in sorted(received.items()):
                try:
                    candidate = sharing_from_obj(group, obj)
                except DecodeError:
                    continue
                if sharing_digest(group, candidate) == self.table.sharings.get(sid):
                    old = candidate
                    break
            if old is None:
                self._alert(
                    AlertKind.RECOVERY_FAILED, self.me, f"no helper sent the certified sharing of {sid!r}"
                )
                continue
            dealings = {d: self._dealings[d]["recover"][sid][self.me] for d in self._qual}
            try:
                result = pss.recover_share(
                    group, old, self.me, dealings, {h: y for h, (y, _o) in received.items()}
                )
            except (CryptoError, KeyError) as exc:
                self._alert(AlertKind.RECOVERY_FAILED, self.me, f"recovery of {sid!r} failed: {exc}")
                continue
            for helper, reason in result.cheaters.items():
                self._alert(AlertKind.BAD_SHARE, helper, reason)
            zero = {d: self._dealings[d]["refresh"][sid] for d in self._qual}
            subs = {d: self._value("refresh", sid, 0, d) for d in self._qual}
            try:
                self._new_keys[sid] = pss.refresh_share(
                    group, result.key, zero, {d: v for d, v in subs.items() if v is not None}
                )
            except CryptoError as exc:
                self._alert(AlertKind.RECOVERY_FAILED, self.me, f"refresh of recovered {sid!r} failed: {exc}")

    def _new_digest(self) -> bytes:
        c = self.constants
        return encoding.encode(
            {sid: sharing_digest(c.group(sid), self._new_keys[sid].public) for sid in sorted(c.secrets)}
        )

    def _confirm(self) -> None:
        """CONFIRM: tell everyone which new sharings we computed (see the module's table)."""
        c = self.constants
        if self.me in self.recovering and len(self._qual) >= c.t + 1:
            self._recover()
        if set(self._new_keys) != set(c.secrets) or self.table is None:
            return
        digest = self._new_digest()
        self._confirms[self.me] = digest
        for j in sorted(self.table.entries):
            if j != self.me:
                self._send(j, self._envelope("confirm", {"digest": digest}, self.signer))

    def _on_confirm(self, sender: int, body: Any) -> None:
        f = encoding.expect_map(body, {"digest": bytes}, "confirmation")
        if len(f["digest"]) > 4096:
            raise RemoteProtocolError(sender, "confirmation: oversized digest")
        previous = self._confirms.setdefault(sender, f["digest"])
        if previous != f["digest"]:
            raise RemoteProtocolError(sender, "two different confirmations in one refresh")

    def _complete(self, now: float) -> None:
        c = self.constants
        complete = set(self._new_keys) == set(c.secrets)
        if not complete:
            self._finish(
                now, "refresh incomplete: this server keeps no shares for the new period", alert=False
            )
            return
        mine = self._confirms.get(self.me)
        agreeing = sorted(i for i, d in self._confirms.items() if d == mine)
        if len(agreeing) >= c.n - c.t:
            self._finish(now, None)
            return
        self._alert(
            AlertKind.RECOVERY_FAILED,
            self.me,
            f"new shares confirmed by {len(agreeing)} servers {agreeing}, need n-t = {c.n - c.t}: "
            "keeping the previous period's shares",
        )
        for k in self._new_keys.values():
            k.wipe()
        self._finish(now, "refresh not confirmed by n-t servers")

    def _finish(self, now: float, failure: str | None, *, alert: bool = False) -> None:
        """Record the outcome. A refresh that never produced a signed KeyTable changes nothing:
        the server keeps its old data (no data lost) and tries again next period."""
        if failure is not None and alert:
            self._alert(AlertKind.RECOVERY_FAILED, self.me, failure)
        for nonce in self._nonces:
            nonce.wipe()
        table = self.table if self.table is not None and self.table.signature else None
        if table is None:
            public = self._old_public
            if self.m is not None and (public.m is None or public.m.check(self.me, self.vstart) is not None):
                public = PublicData(self.m, self.old_table, dict(self.old_sharings))
            old_private = self._old_private
            carried = old_private is not None and old_private.carried
            status = Status.RECOVERING if carried else self.status  # carried shares do not sign
            self.outcome = Outcome(status, public, old_private, list(self.alerts), failure)
            return
        if failure is None:
            public = PublicData(self.m, table, {sid: k.public for sid, k in self._new_keys.items()})
            private = PrivateData(
                self.period,
                self.signing_seed,
                self.encryption_seed,
                {sid: k.share for sid, k in self._new_keys.items()},
            )
            for k in self.keys.values():
                k.wipe()
            self.outcome = Outcome(Status.OPERATIONAL, public, private, list(self.alerts), None)
            return
        # Certified new period keys but no confirmed new shares. A server erases its shares
        # only for confirmed new ones: it keeps the previous period's (if it had them), marked
        # carried (not used to sign this period), and the next refresh brings it to the sharing
        # t+1 servers agree on. Erasing them here could leave fewer than t+1 shares of any
        # one sharing in the whole network when many servers fail at once: the key lost.
        # Only the agreed sharing is worth keeping: a server judged recovering held another one.
        old = {sid: k.share for sid, k in self.keys.items()} if self.me in self.operational else {}
        public = PublicData(self.m, table, dict(self.old_sharings) if old else {})
        private = PrivateData(self.period, self.signing_seed, self.encryption_seed, old, carried=bool(old))
        if old:
            failure += "; the previous period's shares are kept"
        self.outcome = Outcome(Status.RECOVERING, public, private, list(self.alerts), failure)


def scalar_source(rand: RandomBytes, group: Group[Any]) -> Callable[[], int]:
    size = (group.order.bit_length() + 7) // 8 + 16
    return lambda: int.from_bytes(rand(size), "big") % (group.order - 1) + 1


def initial_public(
    m: InvariantInfo, table: KeyTable, sharings: Mapping[str, PublicSharing[Any]]
) -> PublicData:
    return PublicData(m, table, dict(sharings))

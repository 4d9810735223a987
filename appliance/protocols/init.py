"""Initialization (Table 3), as server ``me`` sees it: keys, Scert, M, [Scert(M), M], KeyTable(0).

Theory of operation
-------------------
The protocol runs once, at setup, on a fixed schedule of rounds of length ``C.delta``
from a start time every server is given (the operator starts all servers with the
same one). Each phase names the paper's step it implements; the phase table is
:class:`InitSchedule` (t is C.t, A = 2t+1 signing attempts).

=========  =======  ======================================================================
phase      rounds   Table 3 step
=========  =======  ======================================================================
KEYS       0        "Communication is secure, inactive adversary. Broadcast keys": fresh
                    (S_i(0), V_i(0)) and (E_i(0), D_i(0)); K_i = (V_i(0), E_i(0),
                    S_i(0)(E_i(0))) is sent in the clear to every server, with V_start_i
                    (so that everyone can later check M_i). A plain all-to-all send, as
                    the paper allows: nothing else authenticates a server yet.
DEAL       1..t+1   "Generate (Scert, Vcert)": every server broadcasts
                    (:class:`~appliance.protocols.broadcast.SyncBroadcast`, authenticated
                    with the V_j(0) it received) its :class:`~appliance.crypto.dkg.Dealing`
                    for each long-lived secret of C, together with its *view*: the K_j
                    and V_start_j it received from every j. Shares go point-to-point,
                    each in a :class:`~appliance.crypto.vss.ShareMessage` signed with
                    S_i(0) (complaint evidence), the whole message encrypted to E_j(0)
                    (NaCl Box with D_i(0)) and signed. The agreed views fix the keys:
                    K_j is the value that at least n-t servers report (two values
                    cannot both have n-t reports when n >= 2t+1, and an honest j's key
                    is reported by every honest server). No such value: init fails.
COMPLAIN   t+1      Bad shares are answered with their signed evidence, missing (or
                    unprovable) ones named (broadcast, authenticated with agreed keys).
REVEAL     t+1      A dealer answers every "missing" complaint by revealing that share.
M          t+1      :func:`~appliance.crypto.dkg.qualify` and :func:`~appliance.crypto.dkg.finish`
                    from the agreed data give QUAL (at least t+1 dealers or init
                    fails), Vcert and this server's share. "Sign M_i = S_start(Vcert,
                    C); erase S_start (VERY IMPORTANT)": done here, then M_i is
                    broadcast with 2A FROST nonce commitments (one per attempt and
                    message).
SIGN       2A       "Engage in a generation of a distributed signature": every M_j is
                    checked with the agreed V_start_j (M needs all n), M = (Vcert, C,
                    M_1..M_n) and KeyTable(0) = (K_1..K_n, digests of the sharings) are
                    signed with Scert (FROST), as in refresh: attempt a is led by the
                    a-th server in the pool, which names t+1 signers; signature shares
                    go to everyone, so anyone aggregates; a bad share names its signer
                    (identifiable abort) and it is left out of later attempts.
FORWARD    1        Whoever holds both signatures sends them to everyone.
END                 The outcome: the same :class:`~appliance.protocols.refresh.PublicData`
                    and :class:`~appliance.protocols.refresh.PrivateData` that refresh
                    takes for period 0, or a failure that says why (and no keys).
=========  =======  ======================================================================

Replay: every message names the init session (a digest of C and the start time), every
signature is made with a key that was generated for this session, broadcast items are
bound to the session and phase, and DKG proofs of possession to the session and secret.

Erasing S_start: the protocol holds the start key only until it has signed M_i (phase
M); then it drops every reference and, if the caller passed the seed as a ``bytearray``,
overwrites it with zeros. The caller must also overwrite the file the seed came from:
Python cannot promise that no copy of an immutable ``bytes`` survives in memory. An init
that fails before phase M drops the key without overwriting the caller's buffer (init
may be run again with the same S_start, whose V_start is in ROM); after phase M the key
is gone and a new init needs a new start key pair.

Nothing in this module reads a clock, a socket or a random source: ``now`` and ``rand``
are arguments.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from nacl.exceptions import CryptoError as NaclCryptoError
from nacl.public import Box, PrivateKey, PublicKey
from nacl.signing import SigningKey

from appliance.crypto import annkey, dkg, encoding, frost
from appliance.crypto.errors import CheatingError, CryptoError, DecodeError
from appliance.crypto.groups import ED25519
from appliance.crypto.keyshare import KeyShare
from appliance.crypto.vss import Complaint, ShareMessage
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
from appliance.protocols.broadcast import AUTH, Item, SyncBroadcast, item_statement
from appliance.protocols.refresh import PrivateData, PublicData, scalar_source
from appliance.protocols.state import (
    SCERT,
    Constants,
    InvariantInfo,
    KeyEntry,
    KeyTable,
    encryption_key_payload,
    m_i_payload,
    sharing_digest,
)

RandomBytes = Callable[[int], bytes]
CONTEXT = "pst/init"
#: Everything at initialization belongs to period 0.
PERIOD = 0
MAX_MESSAGE = 4 * 1024 * 1024
BROADCAST_PHASES = ("deal", "complain", "reveal", "M")
SIGNED_PHASES = ("share", "sign-request", "sign-share", "sigs")


@dataclass(frozen=True)
class InitSchedule:
    """The phases of Table 3 in rounds of ``delta`` from ``start`` (see the module's table)."""

    start: float
    delta: float
    t: int
    attempts: int = field(init=False)
    keys: int = field(init=False)
    deal: int = field(init=False)
    complain: int = field(init=False)
    reveal: int = field(init=False)
    m: int = field(init=False)
    sign: int = field(init=False)
    forward: int = field(init=False)
    end: int = field(init=False)

    def __post_init__(self) -> None:
        t = self.t
        put = object.__setattr__
        put(self, "attempts", 2 * t + 1)
        put(self, "keys", 0)
        put(self, "deal", 1)
        put(self, "complain", self.deal + t + 1)
        put(self, "reveal", self.complain + t + 1)
        put(self, "m", self.reveal + t + 1)
        put(self, "sign", self.m + t + 1)
        put(self, "forward", self.sign + 2 * self.attempts)
        put(self, "end", self.forward + 1)

    def at(self, rounds: int) -> float:
        return self.start + rounds * self.delta

    @property
    def duration(self) -> float:
        return self.end * self.delta


@dataclass
class InitOutcome:
    """Server ``me``'s result: its period-0 data, or why the initialization failed."""

    public: PublicData | None
    private: PrivateData | None
    alerts: list[Alert]
    failure: str | None = None
    qual: dict[str, frozenset[int]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.failure is None and self.public is not None and self.private is not None


class _Abort(Exception):
    """Internal: the initialization cannot complete; the message says why."""


def session_id(constants: Constants, start: float) -> bytes:
    """The init session: C and the start time (a second init of the same C starts later)."""
    return hashlib.sha256(
        encoding.encode(["pst/init/session", constants.to_obj(), round(start * 1000)])
    ).digest()


class InitProtocol:
    """Table 3 for server ``me`` (sans-IO): drive it with :meth:`receive` and :meth:`tick`.

    ``sstart`` is the 32-byte Ed25519 seed of S_start (V_start is in the server's ROM).
    Pass it as a ``bytearray`` to have it overwritten once M_i is signed.
    """

    def __init__(
        self,
        *,
        me: int,
        constants: Constants,
        sstart: bytes | bytearray,
        start: float,
        rand: RandomBytes,
        ann_public: bytes | None = None,
    ) -> None:
        if me not in constants.ids:
            raise LocalProtocolError(f"server {me} is not one of 1..{constants.n}")
        if len(sstart) != 32:
            raise LocalProtocolError("the start key seed must be 32 bytes")
        self.me = me
        self.constants = constants
        self.rand = rand
        #: The public key of our announcement key (the ROM's TPM, issue 8), put into M with M_i.
        if ann_public is not None:
            annkey.load_public(ann_public, "this server's announcement key")
        self.ann_public = ann_public
        self.schedule = InitSchedule(start, constants.delta, constants.t)
        self.session = session_id(constants, start)
        self.alerts: list[Alert] = []
        self.rejected: list[RemoteProtocolError] = []
        self.outcome: InitOutcome | None = None
        self._out: list[Outgoing] = []
        self._buffer: list[tuple[int, bytes, float]] = []
        self._done_phases: set[str] = set()
        # S_start: held until M_i is signed (phase M), then erased.
        self._sstart: SigningKey | None = SigningKey(bytes(sstart))
        self._sstart_buffer: bytearray | None = sstart if isinstance(sstart, bytearray) else None
        self.vstart = bytes(self._sstart.verify_key)
        self.sstart_erased = False
        # KEYS: (S_i(0), V_i(0)) and (E_i(0), D_i(0)).
        self.signing_seed = rand(32)
        self.encryption_seed = rand(32)
        self.signer = Signer(SigningKey(self.signing_seed))
        self._box_key = PrivateKey(self.encryption_seed)
        encryption_public = bytes(self._box_key.public_key)
        self.my_entry = KeyEntry(
            self.signer.public,
            encryption_public,
            self.signer.sign(encryption_key_payload(me, PERIOD, encryption_public)),
        )
        self._received_keys: dict[int, tuple[KeyEntry, bytes]] = {me: (self.my_entry, self.vstart)}
        self.entries: dict[int, KeyEntry] = {}
        self.vstarts: dict[int, bytes] = {}
        self._keys_agreed = False
        # DKG.
        self.deal_bc: SyncBroadcast | None = None
        self.complain_bc: SyncBroadcast | None = None
        self.reveal_bc: SyncBroadcast | None = None
        self.m_bc: SyncBroadcast | None = None
        self._my_shares: dict[str, dict[int, int]] = {}
        self._shares: dict[tuple[str, int], tuple[int, bytes]] = {}
        self.dealings: dict[str, dict[int, dkg.Dealing[Any]]] = {}
        self._dealt: set[int] = set()
        self._complaints: dict[str, list[Complaint]] = {}
        self._missing: dict[str, list[dkg.MissingShare]] = {}
        self.qualification: dict[str, dkg.Qualification] = {}
        self.keys: dict[str, KeyShare[Any]] = {}
        self.vcert: bytes | None = None
        # M and signing.
        self.m_info: InvariantInfo | None = None
        self.table: KeyTable | None = None
        self.frost_commitments: dict[int, list[bytes]] = {}
        self.pool: list[int] = []
        self._package: frost.KeyPackage | None = None
        self._nonces: list[frost.SigningNonces] = []
        self._failed_signers: set[int] = set()
        self._requests: dict[int, tuple[int, ...]] = {}
        self._sig_shares: dict[
            tuple[int, tuple[int, ...]], dict[int, tuple[frost.SignatureShare, frost.SignatureShare]]
        ] = {}
        self._signed_attempts: set[int] = set()
        self._forwarded = False

    # Small helpers ----------------------------------------------------------------------

    @property
    def c(self) -> Constants:
        return self.constants

    def _alert(self, kind: AlertKind, server: int, detail: str, evidence: tuple[bytes, ...] = ()) -> None:
        if all((a.kind, a.server, a.detail) != (kind, server, detail) for a in self.alerts):
            self.alerts.append(Alert(kind, server, PERIOD, detail, evidence))

    def _once(self, name: str) -> bool:
        if name in self._done_phases:
            return False
        self._done_phases.add(name)
        return True

    def _send(self, to: int, data: bytes) -> None:
        self._out.append(Outgoing(to, data))

    def _bc_session(self, phase: str) -> bytes:
        return encoding.encode(["pst/init", self.session, phase])

    def _share_session(self, sid: str) -> bytes:
        return encoding.encode(["pst/init/share", self.session, sid])

    def _dkg_context(self, sid: str) -> bytes:
        return encoding.encode(["pst/init/dkg", self.session, sid])

    def _key_of(self, server: int) -> KeyEntry | None:
        if self._keys_agreed:
            return self.entries.get(server)
        got = self._received_keys.get(server)
        return got[0] if got is not None else None

    # Envelopes ----------------------------------------------------------------------------

    def _envelope(self, phase: str, body: Any) -> bytes:
        payload = encoding.signing_payload(
            phase, 1, CONTEXT, PERIOD, {"session": self.session, "from": self.me, "body": body}
        )
        return encoding.encode(
            {
                "phase": phase,
                "period": PERIOD,
                "session": self.session,
                "from": self.me,
                "body": body,
                "sig": self.signer.sign(payload),
            }
        )

    def _bundle(self, phase: str, data: bytes) -> bytes:
        return encoding.encode(
            {
                "phase": phase,
                "period": PERIOD,
                "session": self.session,
                "from": self.me,
                "body": data,
                "sig": b"",
            }
        )

    def _open(self, sender: int, data: bytes) -> tuple[str, Any, bytes]:
        try:
            obj = encoding.decode(data, max_size=MAX_MESSAGE, what="init message")
            f = encoding.expect_map(
                obj,
                {"phase": str, "period": int, "session": bytes, "from": int, "body": object, "sig": bytes},
                "init message",
            )
        except DecodeError as exc:
            raise RemoteProtocolError(sender, str(exc)) from None
        if f["from"] != sender:
            raise RemoteProtocolError(sender, f"message claims to come from server {f['from']}")
        if f["period"] != PERIOD or f["session"] != self.session:
            raise RemoteProtocolError(sender, "message of another init session (replayed?)")
        return f["phase"], f["body"], f["sig"]

    def _check_sig(self, sender: int, key: bytes, phase: str, body: Any, sig: bytes) -> None:
        payload = encoding.signing_payload(
            phase, 1, CONTEXT, PERIOD, {"session": self.session, "from": sender, "body": body}
        )
        if not ed25519_verify(key, payload, sig):
            raise RemoteProtocolError(sender, f"{phase} message not signed with the sender's key S_i(0)")

    # Driving --------------------------------------------------------------------------------

    def receive(self, sender: int, data: bytes, now: float) -> None:
        """Take a message from ``sender``; bad input is recorded in ``rejected`` and never raised."""
        try:
            self._receive(sender, data, now)
        except RemoteProtocolError as exc:
            self.rejected.append(exc)
        except CryptoError as exc:  # a signed body of the wrong shape (DecodeError) and the like
            self.rejected.append(RemoteProtocolError(sender, str(exc)))

    def _receive(self, sender: int, data: bytes, now: float) -> None:
        if self.outcome is not None:
            return
        if sender not in self.c.ids or sender == self.me:
            raise RemoteProtocolError(sender, "message from a server outside the network")
        phase, body, sig = self._open(sender, data)
        if phase == "keys":
            self._on_keys(sender, body, sig, now)
        elif phase in BROADCAST_PHASES:
            bc = {
                "deal": self.deal_bc,
                "complain": self.complain_bc,
                "reveal": self.reveal_bc,
                "M": self.m_bc,
            }[phase]
            if not isinstance(body, bytes):
                raise RemoteProtocolError(sender, "broadcast body must be bytes")
            if bc is None:
                self._hold(sender, data, now)
                return
            bc.receive(sender, body, now)
        elif phase in SIGNED_PHASES:
            waiting = self.deal_bc is None if phase == "share" else not self.pool
            if waiting:
                self._hold(sender, data, now)
                return
            entry = self._key_of(sender)
            if entry is None:
                raise RemoteProtocolError(sender, f"{phase} message from a server whose keys we do not have")
            self._check_sig(sender, entry.verify_key, phase, body, sig)
            handler = {
                "share": self._on_share,
                "sign-request": self._on_sign_request,
                "sign-share": self._on_sign_share,
                "sigs": self._on_sigs,
            }[phase]
            handler(sender, body)
        else:
            raise RemoteProtocolError(sender, f"unknown init phase {phase!r}")

    def _hold(self, sender: int, data: bytes, now: float) -> None:
        """Keep a message that arrived before its phase could take it (bounded: no memory DoS)."""
        if len(self._buffer) >= 64 * self.c.n:
            raise RemoteProtocolError(sender, "too many early messages; dropped")
        self._buffer.append((sender, data, now))

    def _replay(self, now: float) -> None:
        if not self._buffer:
            return
        pending, self._buffer = self._buffer, []
        for sender, data, _at in pending:
            self.receive(sender, data, now)

    def tick(self, now: float) -> list[Outgoing]:
        if self.outcome is None:
            self._advance(now)
        out, self._out = self._out, []
        return out

    def next_wakeup(self, now: float) -> float | None:
        """When this engine next needs a tick without any message arriving: the next round boundary."""
        if self.outcome is not None:
            return None
        s = self.schedule
        k = max(0, int((now - s.start) // s.delta) + 1)
        return s.start + k * s.delta + 1e-6

    def _advance(self, now: float) -> None:
        s = self.schedule
        if now < s.start:
            return
        try:
            if self._once("keys"):
                self._send_keys()
            if now >= s.at(s.deal) and self._once("deal"):
                self._start_deal()
            if now >= s.at(s.complain) and self._once("complain"):
                self._start_complain()
            if now >= s.at(s.reveal) and self._once("reveal"):
                self._start_reveal()
            if now >= s.at(s.m) and self._once("M"):
                self._compute_keys()
                self._start_m()
            if now >= s.at(s.sign) and self._once("sign"):
                self._start_sign()
            self._replay(now)
            if self.pool:
                self._signing(now)
            if now >= s.at(s.end) and self._once("end"):
                self._complete()
                return
        except _Abort as exc:
            self._fail(str(exc))
            return
        self._flush_broadcasts(now)

    def _flush_broadcasts(self, now: float) -> None:
        for bc, name in (
            (self.deal_bc, "deal"),
            (self.complain_bc, "complain"),
            (self.reveal_bc, "reveal"),
            (self.m_bc, "M"),
        ):
            if bc is not None:
                for o in bc.tick(now):
                    self._send(o.to, self._bundle(name, o.data))

    def _new_bc(self, phase: str, start_round: int, keys: Mapping[int, bytes]) -> SyncBroadcast:
        session = self._bc_session(phase)
        keys = dict(keys)

        def classify(item: Item) -> str | None:
            key = keys.get(item.author)
            statement = item_statement(session, PERIOD, item.author, item.payload)
            return AUTH if key is not None and ed25519_verify(key, statement, item.signature) else None

        def verify(server: int, payload: bytes, sig: bytes) -> bool:
            key = keys.get(server)
            return key is not None and ed25519_verify(key, payload, sig)

        return SyncBroadcast(
            n=self.c.n,
            t=self.c.t,
            me=self.me,
            period=PERIOD,
            session=session,
            start=self.schedule.at(start_round),
            delta=self.schedule.delta,
            signer=self.signer,
            relay_verify=verify,
            classify=classify,
        )

    def _agreed_keys(self) -> dict[int, bytes]:
        return {i: e.verify_key for i, e in self.entries.items()}

    def _take_results(self, bc: SyncBroadcast) -> dict[int, Item]:
        self.rejected.extend(bc.rejected)
        for a in bc.alerts:
            self._alert(a.kind, a.server, a.detail, a.evidence)
        return bc.single_values()

    # KEYS ----------------------------------------------------------------------------------

    def _send_keys(self) -> None:
        body = {"K": self.my_entry.to_obj(), "vstart": self.vstart}
        self._send(EVERYONE, self._envelope("keys", body))

    def _on_keys(self, sender: int, body: Any, sig: bytes, now: float) -> None:
        if now >= self.schedule.at(self.schedule.deal):
            raise RemoteProtocolError(sender, "key announcement after the KEYS round")
        try:
            f = encoding.expect_map(body, {"K": dict, "vstart": bytes}, "key announcement")
            entry = KeyEntry.from_obj(f["K"], "key announcement")
        except DecodeError as exc:
            raise RemoteProtocolError(sender, str(exc)) from None
        if len(f["vstart"]) != 32:
            raise RemoteProtocolError(sender, "key announcement: V_start must be 32 bytes")
        if not ed25519_verify(
            entry.verify_key, encryption_key_payload(sender, PERIOD, entry.encryption_key), entry.signature
        ):
            raise RemoteProtocolError(sender, "key announcement: E_i(0) not signed with S_i(0)")
        self._check_sig(sender, entry.verify_key, "keys", body, sig)
        known = self._received_keys.get(sender)
        if known is not None:
            if known != (entry, f["vstart"]):
                raise RemoteProtocolError(sender, "a second, different key announcement (kept the first)")
            return
        self._received_keys[sender] = (entry, f["vstart"])

    # DEAL ------------------------------------------------------------------------------------

    def _start_deal(self) -> None:
        c = self.c
        view = dict(self._received_keys)
        self.deal_bc = self._new_bc(
            "deal", self.schedule.deal, {i: e.verify_key for i, (e, _v) in view.items()}
        )
        dealings: dict[str, Any] = {}
        private: dict[int, list[list[Any]]] = {j: [] for j in view if j != self.me}
        for sid in sorted(c.secrets):
            group = c.group(sid)
            dealing, shares = dkg.deal(
                group, self._dkg_context(sid), self.me, c.n, c.t, scalar_source(self.rand, group)
            )
            dealings[sid] = dealing.to_obj(group)
            self._my_shares[sid] = shares
            for j in c.ids:
                value = self._share_for(sid, j, shares[j])
                msg = ShareMessage(self._share_session(sid), self.me, j, (value,))
                sig = self.signer.sign(msg.payload(CONTEXT, PERIOD))
                if j == self.me:
                    self._shares[(sid, j)] = (value, sig)
                elif j in private:
                    private[j].append([sid, value, sig])
        view_obj = {j: {"K": e.to_obj(), "vstart": v} for j, (e, v) in sorted(view.items())}
        payload = encoding.encode({"dealings": dealings, "view": view_obj})
        self.deal_bc.broadcast(self.deal_bc.make_item(payload, self.signer))
        for j, items in sorted(private.items()):
            box = Box(self._box_key, PublicKey(view[j][0].encryption_key))
            sealed = bytes(box.encrypt(encoding.encode(items), self.rand(Box.NONCE_SIZE)))
            self._send(j, self._envelope("share", {"box": sealed}))

    def _share_for(self, sid: str, recipient: int, value: int) -> int:
        """The share actually sent to ``recipient`` (a hook for tests of cheating dealers)."""
        return value

    def _on_share(self, sender: int, body: Any) -> None:
        if self.complain_bc is not None:
            raise RemoteProtocolError(sender, "shares after the DEAL phase")
        got = self._received_keys.get(sender)
        if got is None:
            raise RemoteProtocolError(sender, "shares from a server whose keys we do not have")
        try:
            f = encoding.expect_map(body, {"box": bytes}, "shares")
            plain = Box(self._box_key, PublicKey(got[0].encryption_key)).decrypt(f["box"])
            items = encoding.decode(plain, what="shares")
        except (DecodeError, NaclCryptoError, ValueError, TypeError) as exc:
            raise RemoteProtocolError(sender, f"undecryptable or malformed shares: {exc}") from None
        if not isinstance(items, list) or len(items) > len(self.c.secrets):
            raise RemoteProtocolError(sender, "shares: expected one entry per secret")
        for item in items:
            ok = (
                isinstance(item, list)
                and len(item) == 3
                and item[0] in self.c.secrets
                and type(item[1]) is int
                and isinstance(item[2], bytes)
                and len(item[2]) == 64
            )
            if not ok:
                raise RemoteProtocolError(sender, "shares: malformed entry")
            self._shares.setdefault((item[0], sender), (item[1], item[2]))

    # COMPLAIN --------------------------------------------------------------------------------

    def _start_complain(self) -> None:
        assert self.deal_bc is not None
        items = self._take_results(self.deal_bc)
        views: dict[int, dict[int, tuple[KeyEntry, bytes]]] = {}
        parsed: dict[int, dict[str, Any]] = {}
        for author, item in sorted(items.items()):
            try:
                obj = encoding.expect_map(
                    encoding.decode(item.payload, what="dealing"), {"dealings": dict, "view": dict}, "dealing"
                )
                view: dict[int, tuple[KeyEntry, bytes]] = {}
                for j, v in obj["view"].items():
                    vf = encoding.expect_map(v, {"K": dict, "vstart": bytes}, "view")
                    if type(j) is not int or len(vf["vstart"]) != 32:
                        raise DecodeError("view: bad server id or V_start")
                    view[j] = (KeyEntry.from_obj(vf["K"], "view"), vf["vstart"])
            except DecodeError as exc:
                self._alert(AlertKind.BAD_MESSAGE, author, f"malformed dealing: {exc}")
                continue
            views[author] = view
            parsed[author] = obj["dealings"]
        self._dealt = set(items)
        self._agree_keys(views)
        self._parse_dealings(parsed)
        self._send_complaints()

    def _agree_keys(self, views: Mapping[int, Mapping[int, tuple[KeyEntry, bytes]]]) -> None:
        """K_j and V_start_j: the value at least n-t servers report; none for some j: init fails."""
        c = self.c
        entries: dict[int, KeyEntry] = {}
        vstarts: dict[int, bytes] = {}
        undecided: list[int] = []
        for j in c.ids:
            reports: dict[tuple[KeyEntry, bytes], list[int]] = {}
            for reporter, view in views.items():
                if j in view:
                    reports.setdefault(view[j], []).append(reporter)
            best = sorted(reports.items(), key=lambda kv: -len(kv[1]))
            if not best or len(best[0][1]) < c.n - c.t:
                undecided.append(j)
                if len(reports) > 1:
                    self._alert(
                        AlertKind.CONFLICTING_ANNOUNCEMENTS,
                        j,
                        "servers received different key announcements from this server",
                    )
                continue
            (entry, vstart), _who = best[0]
            others = sorted(r for _value, who in best[1:] for r in who)
            if others:
                self._alert(
                    AlertKind.CONFLICTING_ANNOUNCEMENTS,
                    j,
                    f"servers {others} report a key announcement that n-t others did not receive",
                )
            entries[j] = entry
            vstarts[j] = vstart
        if undecided:
            raise _Abort(f"init aborted: no n-t servers agree on the initial keys of servers {undecided}")
        if entries[self.me] != self.my_entry or vstarts[self.me] != self.vstart:
            raise _Abort("init aborted: the agreed key announcement of this server is not its own")
        self.entries, self.vstarts, self._keys_agreed = entries, vstarts, True

    def _parse_dealings(self, parsed: Mapping[int, Mapping[Any, Any]]) -> None:
        c = self.c
        self.dealings = {sid: {} for sid in c.secrets}
        for author, objs in sorted(parsed.items()):
            try:
                if set(objs) != set(c.secrets):
                    raise DecodeError("dealing: not one dealing per secret of C")
                one = {
                    sid: dkg.Dealing.decode(c.group(sid), encoding.encode(objs[sid]), c.n, c.t)
                    for sid in c.secrets
                }
            except DecodeError as exc:
                self._alert(AlertKind.BAD_MESSAGE, author, f"malformed dealing: {exc}")
                continue
            for sid, dealing in one.items():
                self.dealings[sid][author] = dealing

    def _send_complaints(self) -> None:
        c = self.c
        self.complain_bc = self._new_bc("complain", self.schedule.complain, self._agreed_keys())
        bad: list[list[Any]] = []
        missing: list[list[Any]] = []
        for sid in sorted(c.secrets):
            group = c.group(sid)
            dealings = self.dealings[sid]
            received: dict[int, int] = {}
            for d in sorted(dealings):
                got = self._shares.get((sid, d))
                if got is None:
                    missing.append([sid, d])
                else:
                    received[d] = got[0]
            for d in dkg.bad_dealers(group, {d: dealings[d] for d in received}, self.me, received):
                value, sig = self._shares[(sid, d)]
                msg = ShareMessage(self._share_session(sid), d, self.me, (value,))
                if ed25519_verify(self.entries[d].verify_key, msg.payload(CONTEXT, PERIOD), sig):
                    bad.append([sid, d, value, sig])
                else:  # no usable evidence: the dealer must reveal the share in public
                    missing.append([sid, d])
        body = encoding.encode({"bad": bad, "missing": missing})
        self.complain_bc.broadcast(self.complain_bc.make_item(body, self.signer))

    # REVEAL ----------------------------------------------------------------------------------

    def _start_reveal(self) -> None:
        assert self.complain_bc is not None
        c = self.c
        self._complaints = {sid: [] for sid in c.secrets}
        self._missing = {sid: [] for sid in c.secrets}
        for accuser, item in sorted(self._take_results(self.complain_bc).items()):
            try:
                obj = encoding.expect_map(
                    encoding.decode(item.payload, what="complaints"),
                    {"bad": list, "missing": list},
                    "complaints",
                )
            except DecodeError as exc:
                self._alert(AlertKind.BAD_MESSAGE, accuser, f"malformed complaints: {exc}")
                continue
            for x in obj["bad"]:
                ok = (
                    isinstance(x, list)
                    and len(x) == 4
                    and x[0] in c.secrets
                    and type(x[1]) is int
                    and x[1] != accuser
                    and type(x[2]) is int
                    and isinstance(x[3], bytes)
                )
                if not ok:
                    self._alert(AlertKind.BAD_MESSAGE, accuser, "malformed bad-share complaint")
                    continue
                msg = ShareMessage(self._share_session(x[0]), x[1], accuser, (x[2],))
                self._complaints[x[0]].append(Complaint(accuser, msg, x[3]))
            for x in obj["missing"]:
                ok = isinstance(x, list) and len(x) == 2 and x[0] in c.secrets and type(x[1]) is int
                if not ok or x[1] == accuser:
                    self._alert(AlertKind.BAD_MESSAGE, accuser, "malformed missing-share complaint")
                    continue
                self._missing[x[0]].append(dkg.MissingShare(accuser, x[1]))
        self.reveal_bc = self._new_bc("reveal", self.schedule.reveal, self._agreed_keys())
        reveals = [
            [sid, m.accuser, self._my_shares[sid][m.accuser]]
            for sid in sorted(c.secrets)
            for m in self._missing[sid]
            if m.dealer == self.me and m.accuser in c.ids
        ]
        self.reveal_bc.broadcast(self.reveal_bc.make_item(encoding.encode({"reveal": reveals}), self.signer))

    # M: qualify, finish, sign M_i, erase S_start ------------------------------------------------

    def _compute_keys(self) -> None:
        assert self.reveal_bc is not None
        c = self.c
        reveals: dict[str, list[dkg.Reveal]] = {sid: [] for sid in c.secrets}
        for dealer, item in sorted(self._take_results(self.reveal_bc).items()):
            try:
                obj = encoding.expect_map(
                    encoding.decode(item.payload, what="reveals"), {"reveal": list}, "reveals"
                )
            except DecodeError as exc:
                self._alert(AlertKind.BAD_MESSAGE, dealer, f"malformed reveals: {exc}")
                continue
            for x in obj["reveal"]:
                if (
                    isinstance(x, list)
                    and len(x) == 3
                    and x[0] in c.secrets
                    and type(x[1]) is int
                    and type(x[2]) is int
                ):
                    reveals[x[0]].append(dkg.Reveal(dealer, x[1], x[2]))
        keys = self._agreed_keys()

        def verify(server: int, payload: bytes, sig: bytes) -> bool:
            key = keys.get(server)
            return key is not None and ed25519_verify(key, payload, sig)

        cheaters: dict[int, str] = {}
        for sid in sorted(c.secrets):
            group = c.group(sid)
            try:
                q = dkg.qualify(
                    group,
                    self._dkg_context(sid),
                    c.n,
                    c.t,
                    self.dealings[sid],
                    self._complaints[sid],
                    self._missing[sid],
                    reveals[sid],
                    verify,
                    signing_context=CONTEXT,
                    period=PERIOD,
                )
            except CryptoError as exc:
                raise _Abort(f"init aborted: the DKG of {sid!r} failed: {exc}") from None
            self.qualification[sid] = q
            for guilty, reason in q.cheaters.items():
                cheaters.setdefault(guilty, reason)
        for guilty, reason in sorted(cheaters.items()):
            false = reason.startswith(("complaint", "false complaint"))
            self._alert(AlertKind.FALSE_COMPLAINT if false else AlertKind.BAD_SHARE, guilty, reason)
        for j in c.ids:
            if j not in self._dealt:
                self._alert(AlertKind.SILENT, j, "dealt nothing in the DKG")
        for sid in sorted(c.secrets):
            group = c.group(sid)
            q = self.qualification[sid]
            shares = {d: self._shares[(sid, d)][0] for d in q.qual if (sid, d) in self._shares}
            try:
                self.keys[sid] = dkg.finish(group, c.n, c.t, self.me, q, self.dealings[sid], shares)
            except CryptoError as exc:
                raise _Abort(f"init aborted: no share of {sid!r} for this server: {exc}") from None
        self._my_shares = {}
        vcert = self.keys[SCERT].public_key
        assert isinstance(vcert, bytes)
        self.vcert = vcert

    def _sign_m_i(self) -> bytes:
        """M_i = S_start(Vcert, C), then erase S_start (Table 3: VERY IMPORTANT)."""
        assert self.vcert is not None
        key = self._sstart
        if key is None:
            raise _Abort("init aborted: S_start is no longer available")
        m_i = bytes(key.sign(m_i_payload(self.vcert, self.c, self.me, self.ann_public)).signature)
        del key
        self._erase_sstart(overwrite=True)
        return m_i

    def _erase_sstart(self, *, overwrite: bool) -> None:
        self._sstart = None
        buffer, self._sstart_buffer = self._sstart_buffer, None
        if buffer is not None and overwrite:
            buffer[:] = bytes(len(buffer))
        self.sstart_erased = self.sstart_erased or overwrite

    def _start_m(self) -> None:
        m_i = self._sign_m_i()
        key = self.keys[SCERT]
        self._package = frost.KeyPackage(self.me, key.share.value, self.vcert or b"", self.c.t + 1)
        self._nonces = [frost.commit(self._package, self.rand(64)) for _ in range(2 * self.schedule.attempts)]
        commitments = [nonce.commitment.to_bytes() for nonce in self._nonces]
        self.m_bc = self._new_bc("M", self.schedule.m, self._agreed_keys())
        body: dict[str, Any] = {"Mi": m_i, "frost": commitments}
        if self.ann_public is not None:
            body["A"] = self.ann_public
        payload = encoding.encode(body)
        self.m_bc.broadcast(self.m_bc.make_item(payload, self.signer))

    # SIGN: [Scert(M), M] and KeyTable(0) ----------------------------------------------------------

    def _start_sign(self) -> None:
        assert self.m_bc is not None and self.vcert is not None
        c = self.c
        items = self._take_results(self.m_bc)
        m: dict[int, bytes] = {}
        ann_keys: dict[int, bytes] = {}
        problems: list[str] = []
        for j in c.ids:
            item = items.get(j)
            if item is None:
                self._alert(AlertKind.SILENT, j, "no M_i from this server")
                problems.append(f"no M_{j}")
                continue
            try:
                decoded = encoding.decode(item.payload, what="M_i")
                fields: dict[str, type] = {"Mi": bytes, "frost": list}
                if isinstance(decoded, dict) and "A" in decoded:
                    fields["A"] = bytes
                obj = encoding.expect_map(decoded, fields, "M_i")
                ann = obj.get("A")
                if ann is not None:
                    annkey.load_public(ann, f"announcement key of server {j}")
            except DecodeError as exc:
                self._alert(AlertKind.BAD_MESSAGE, j, f"malformed M_i: {exc}")
                problems.append(f"malformed M_{j}")
                continue
            if not ed25519_verify(self.vstarts[j], m_i_payload(self.vcert, c, j, ann), obj["Mi"]):
                self._alert(AlertKind.INVALID_M, j, "M_i does not verify with the server's V_start")
                problems.append(f"invalid M_{j}")
                continue
            m[j] = obj["Mi"]
            if ann is not None:
                ann_keys[j] = ann
            commitments = obj["frost"]
            if len(commitments) == 2 * self.schedule.attempts and all(
                isinstance(x, bytes) and len(x) == frost.COMMITMENT_SIZE for x in commitments
            ):
                self.frost_commitments[j] = list(commitments)
            else:
                self._alert(AlertKind.BAD_MESSAGE, j, "bad FROST nonce commitments")
        if problems:
            raise _Abort(f"init aborted: M needs every server's M_i ({', '.join(problems)})")
        self.m_info = InvariantInfo(self.vcert, c, m, b"", ann_keys)
        digests = {sid: sharing_digest(c.group(sid), self.keys[sid].public) for sid in sorted(c.secrets)}
        self.table = KeyTable(PERIOD, dict(self.entries), digests, frozenset())
        dkg_cheaters = {i for q in self.qualification.values() for i in q.cheaters}
        self.pool = sorted(self.frost_commitments, key=lambda i: (i in dkg_cheaters, i))
        if len(self.pool) < c.t + 1:
            raise _Abort(f"init aborted: only {len(self.pool)} servers can sign with Scert, need t+1")

    def _messages(self) -> tuple[bytes, bytes]:
        assert self.m_info is not None and self.table is not None
        return self.m_info.payload(), self.table.payload()

    @property
    def _signed(self) -> bool:
        return (
            self.m_info is not None
            and bool(self.m_info.scert_signature)
            and self.table is not None
            and bool(self.table.signature)
        )

    def _leader(self, attempt: int) -> int:
        return self.pool[attempt % len(self.pool)]

    def _signing(self, now: float) -> None:
        s = self.schedule
        if self._signed:
            if not self._forwarded:
                self._forwarded = True
                assert self.m_info is not None and self.table is not None
                body = {"M": self.m_info.scert_signature, "keytable": self.table.signature}
                self._send(EVERYONE, self._envelope("sigs", body))
            return
        if now >= s.at(s.forward):
            return
        for a in range(s.attempts):
            request_at, share_at, done_at = (
                s.at(s.sign + 2 * a),
                s.at(s.sign + 2 * a + 1),
                s.at(s.sign + 2 * a + 2),
            )
            if now >= request_at and self._once(f"request-{a}") and self._leader(a) == self.me:
                signers = self._choose_signers()
                if len(signers) == self.c.t + 1:
                    self._requests[a] = signers
                    self._send(
                        EVERYONE, self._envelope("sign-request", {"attempt": a, "signers": list(signers)})
                    )
            if now >= share_at and self._once(f"share-{a}"):
                self._sign_share(a)
            if now >= done_at and self._once(f"aggregate-{a}") and not self._signed:
                self._aggregate(a)

    def _choose_signers(self) -> tuple[int, ...]:
        candidates = [i for i in self.pool if i not in self._failed_signers]
        if self.me in candidates:
            candidates.remove(self.me)
            candidates.insert(0, self.me)
        return tuple(sorted(candidates[: self.c.t + 1]))

    def _on_sign_request(self, sender: int, body: Any) -> None:
        f = encoding.expect_map(body, {"attempt": int, "signers": list}, "sign request")
        a, signers = f["attempt"], tuple(f["signers"])
        if not 0 <= a < self.schedule.attempts or sender != self._leader(a):
            raise RemoteProtocolError(
                sender, f"sign request for attempt {a} from a server that does not lead it"
            )
        ok = (
            len(signers) == self.c.t + 1
            and all(type(i) is int and i in self.frost_commitments for i in signers)
            and len(set(signers)) == len(signers)  # ints only by now: hashable
        )
        if not ok:
            raise RemoteProtocolError(sender, f"sign request for attempt {a} names an invalid signer set")
        known = self._requests.setdefault(a, tuple(sorted(signers)))
        if known != tuple(sorted(signers)):
            self._alert(
                AlertKind.EQUIVOCATION, sender, f"two different signer sets requested for attempt {a}"
            )

    def _commitment_list(self, index: int, signers: tuple[int, ...]) -> list[frost.SigningCommitment]:
        """The agreed commitments number ``index`` of ``signers``; a bad one names its signer."""
        out = []
        for i in signers:
            try:
                c = frost.SigningCommitment.from_bytes(self.frost_commitments[i][index])
            except DecodeError as exc:
                raise CheatingError(i, f"announced a bad FROST commitment: {exc}") from None
            if c.identifier != i:
                raise CheatingError(i, "announced a FROST commitment under another id")
            out.append(c)
        return out

    def _make_shares(
        self, a: int, signers: tuple[int, ...]
    ) -> tuple[frost.SignatureShare, frost.SignatureShare]:
        """This server's FROST shares of attempt a: on M, then on KeyTable(0)."""
        assert self._package is not None
        m_payload, kt_payload = self._messages()
        share_m = frost.sign(
            self._package, self._nonces[2 * a], m_payload, self._commitment_list(2 * a, signers)
        )
        share_k = frost.sign(
            self._package, self._nonces[2 * a + 1], kt_payload, self._commitment_list(2 * a + 1, signers)
        )
        return share_m, share_k

    def _sign_share(self, a: int) -> None:
        signers = self._requests.get(a)
        if signers is None or self.me not in signers or a in self._signed_attempts or self._signed:
            return
        self._signed_attempts.add(a)
        try:
            share_m, share_k = self._make_shares(a, signers)
        except CheatingError as exc:
            self._alert(AlertKind.BAD_MESSAGE, exc.party, exc.reason)
            self._failed_signers.add(exc.party)
            return
        except CryptoError as exc:
            self.rejected.append(RemoteProtocolError(self._leader(a), f"cannot sign attempt {a}: {exc}"))
            return
        body = {
            "attempt": a,
            "signers": list(signers),
            "M": share_m.to_bytes(),
            "keytable": share_k.to_bytes(),
        }
        self._record_share(self.me, body)
        self._send(EVERYONE, self._envelope("sign-share", body))

    def _on_sign_share(self, sender: int, body: Any) -> None:
        self._record_share(sender, body)

    def _record_share(self, sender: int, body: Any) -> None:
        f = encoding.expect_map(
            body, {"attempt": int, "signers": list, "M": bytes, "keytable": bytes}, "signature share"
        )
        a, signers = f["attempt"], tuple(f["signers"])
        if not 0 <= a < self.schedule.attempts:
            raise RemoteProtocolError(sender, f"signature share for attempt {a}, which does not exist")
        if sender not in signers or not all(type(i) is int and i in self.frost_commitments for i in signers):
            raise RemoteProtocolError(sender, "signature share for a signer set it is not in")
        if len(signers) != self.c.t + 1 or list(signers) != sorted(set(signers)):
            raise RemoteProtocolError(sender, "signature share for a malformed signer set")
        if self._requests.get(a) != signers:
            # Only the set the attempt's leader named counts: nobody else can disown honest signers.
            raise RemoteProtocolError(
                sender, f"signature share for a signer set attempt {a}'s leader did not name"
            )
        try:
            share_m = frost.SignatureShare.from_bytes(f["M"])
            share_k = frost.SignatureShare.from_bytes(f["keytable"])
        except DecodeError as exc:
            raise RemoteProtocolError(sender, f"signature share: {exc}") from None
        if share_m.identifier != sender or share_k.identifier != sender:
            raise RemoteProtocolError(sender, "signature share carries another signer's id")
        self._sig_shares.setdefault((a, signers), {}).setdefault(sender, (share_m, share_k))

    def _aggregate(self, a: int) -> None:
        assert self.m_info is not None and self.table is not None and self.vcert is not None
        sharing = self.keys[SCERT].public
        m_payload, kt_payload = self._messages()
        for (attempt, signers), shares in sorted(self._sig_shares.items()):
            if attempt != a or self._requests.get(a) != signers:
                continue
            missing = [i for i in signers if i not in shares]
            if missing:
                self._failed_signers.update(missing)
                continue
            public = frost.PublicKeyPackage(
                self.vcert, {i: sharing.verification_share(ED25519, i) for i in signers}, self.c.t + 1
            )
            try:
                sig_m = frost.aggregate_and_identify(
                    public, self._commitment_list(2 * a, signers), m_payload, [s[0] for s in shares.values()]
                )
                sig_k = frost.aggregate_and_identify(
                    public,
                    self._commitment_list(2 * a + 1, signers),
                    kt_payload,
                    [s[1] for s in shares.values()],
                )
            except CheatingError as exc:
                self._failed_signers.add(exc.party)
                self._alert(
                    AlertKind.BAD_SIGNATURE_SHARE, exc.party, f"bad FROST share at init: {exc.reason}"
                )
                continue
            except CryptoError as exc:
                self.rejected.append(RemoteProtocolError(signers[0], f"could not aggregate: {exc}"))
                continue
            self._set_signatures(sig_m, sig_k)
            return

    def _set_signatures(self, sig_m: bytes, sig_k: bytes) -> None:
        assert self.m_info is not None and self.table is not None
        m = self.m_info
        self.m_info = m.signed(sig_m)
        self.table = self.table.signed(sig_k)

    def _on_sigs(self, sender: int, body: Any) -> None:
        if self._signed:
            return
        assert self.m_info is not None and self.table is not None and self.vcert is not None
        f = encoding.expect_map(body, {"M": bytes, "keytable": bytes}, "signatures")
        m = self.m_info
        good_m = ed25519_verify(self.vcert, m.payload(), f["M"])
        good_k = self.table.signed(f["keytable"]).verify(self.vcert)
        if not (good_m and good_k):
            raise RemoteProtocolError(sender, "forwarded signatures do not verify with Vcert")
        self._set_signatures(f["M"], f["keytable"])

    # END ----------------------------------------------------------------------------------------

    def _complete(self) -> None:
        if not self._signed:
            raise _Abort(
                "init aborted: M and KeyTable(0) were not signed with Scert in "
                f"{self.schedule.attempts} attempts"
            )
        assert self.m_info is not None and self.table is not None
        problem = self.m_info.check(self.me, self.vstart)
        if problem is not None:  # pragma: no cover - defensive: every part was checked above
            raise _Abort(f"init aborted: the signed M does not check: {problem}")
        for nonce in self._nonces:
            nonce.wipe()
        public = PublicData(self.m_info, self.table, {sid: k.public for sid, k in self.keys.items()})
        private = PrivateData(
            PERIOD, self.signing_seed, self.encryption_seed, {sid: k.share for sid, k in self.keys.items()}
        )
        qual = {sid: q.qual for sid, q in self.qualification.items()}
        self.outcome = InitOutcome(public, private, list(self.alerts), None, qual)

    def _fail(self, failure: str) -> None:
        """No partial keys survive a failed init: shares wiped, nonces wiped, S_start dropped."""
        self._alert(AlertKind.RECOVERY_FAILED, self.me, failure)
        for k in self.keys.values():
            k.wipe()
        for nonce in self._nonces:
            nonce.wipe()
        self.keys = {}
        self._my_shares = {}
        self._shares = {}
        self._package = None
        self._erase_sstart(overwrite=False)
        qual = {sid: q.qual for sid, q in self.qualification.items()}
        self.outcome = InitOutcome(None, None, list(self.alerts), failure, qual)
        self._out = []

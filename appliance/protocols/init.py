"""Initialization (Table 3), as server ``me`` sees it: keys, Scert, M, [Scert(M), M], KeyTable(0).

Theory of operation
-------------------
Initialization runs on the refresh's machinery (:class:`~appliance.protocols.refresh.DealingStage`:
the agreement engine, self-contained dealings, complaints anyone can judge, agreement on the
set of dealings, FROST signing with a leader-fixed signer set). No step waits for a fixed
round: each proceeds as soon as it has the messages it needs, from a start time every server
is given (the operator starts all servers with the same one). Each step names the paper's:

=========  =========================================================================================
KEYS       "Communication is secure, inactive adversary. Broadcast keys": fresh (S_i(0), V_i(0)) and
           (E_i(0), D_i(0)); K_i = (V_i(0), E_i(0), S_i(0)(E_i(0))) with V_start_i (and the public
           announcement key of a server whose ROM is a TPM), self-signed with S_i(0) and sent in the
           clear to everyone, again every timeout until the KeyTable is decided. The paper's
           assumption is kept: nobody tampers with this step (nothing authenticates a server yet).
KEYTABLE   Agreement 1 among the holders of these keys, once a server holds all n of them: the
           leader proposes every K_j; a member votes only if each one is the one it received (a
           different one is named: conflicting announcements) and its own is its own.
DEAL       "Generate (Scert, Vcert)": every member deals, for each long-lived secret of C, a random
           degree-t sharing (Feldman commitments with a proof of possession of the constant term,
           bound to the session) with every sub-share encrypted to its recipient's E_j(0): one signed,
           self-contained dealing, forwarded once by every receiver.
COMPLAIN   A member whose sub-shares do not decrypt or fail the commitments publishes a complaint
           anyone can judge (a Chaum-Pedersen reveal of its key for that one ciphertext).
DEALINGS   Agreement 2: the set S of at least t+1 dealings; a member votes only if it holds every
           dealing in S and its sub-shares in all of them verify. DECISION: the share is the sum of
           the sub-shares, the sharing the sum of the commitments, Vcert its constant term.
M          "Sign M_i = S_start(Vcert, C); erase S_start (VERY IMPORTANT)": done at the decision,
           then M_i is sent to everyone (again to whoever still lacks it).
SIGN       KeyTable(0) = (K_1..K_n, digests of the sharings) and, once every M_j is held and checks
           with V_start_j (M needs all n), M = (Vcert, C, M_1..M_n) are signed with Scert (FROST,
           two signings side by side: the leader's signed request fixes the signer set).
END        The outcome: the same :class:`~appliance.protocols.refresh.PublicData` and
           :class:`~appliance.protocols.refresh.PrivateData` that refresh takes for period 0, or a
           failure that says why (and no keys) once ``deadline`` passes.
=========  =========================================================================================

Messages are decoded once at the boundary (:func:`decode_message`: the per-peer byte budget and
size cap first, then the envelope, then the body's shape per phase) into the frozen, typed
messages of :mod:`appliance.protocols.messages`, shared with the refresh; a handler checks the
meaning (signatures, membership, commitments). ``receive`` records a peer's fault (DecodeError,
BadSignature, RemoteProtocolError) and lets anything else, our own bug, propagate.

Replay: every message names the init session (a digest of C and the start time), every key is
generated for this session, and the KeyTable value (which every dealing and vote is bound to)
names the session too.

Erasing S_start: the protocol holds the start key only until it has signed M_i (at the decision
of the dealings); then it drops every reference and, if the caller passed the seed as a
``bytearray``, overwrites it with zeros. An init that fails before that drops the key without
overwriting the caller's buffer (init may be run again with the same S_start); after it, a new
init needs a new start key pair.

Nothing in this module reads a clock, a socket or a random source: ``now`` and ``rand`` are
arguments.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from nacl.signing import SigningKey

from appliance.crypto import annkey, dkg, encoding, vdec
from appliance.crypto.errors import CheatingError, DecodeError
from appliance.crypto.groups import ED25519
from appliance.crypto.keyshare import KeyShare, PublicSharing
from appliance.crypto.secret import SecretScalar
from appliance.crypto.shamir import interpolate
from appliance.crypto.vss import sum_commitments
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
from appliance.protocols._signed import BadSignature, decode_signed, sign
from appliance.protocols.agreement import (
    ACCEPT,
    Committee,
    Decision,
    Engine,
    Instance,
    SafetyRules,
    Verdict,
    digest,
    reject,
)
from appliance.protocols.messages import (
    Agree,
    Checked,
    KeysRelay,
    Message,
    Need,
    Repair,
    RepairRequest,
    Signed,
    Sigs,
    Want,
)
from appliance.protocols.messages import parse as parse_message
from appliance.protocols.refresh import (
    MAX_MESSAGE,
    PEER_BUDGET,
    Ann,
    DealingStage,
    KeyTableCandidate,
    MemoryDurable,
    PrivateData,
    PublicData,
    Status,
    Transcript,
    _DurableSafety,
    _FrostState,
    open_dealing,
    scalar_source,
    subshare_ok,
)
from appliance.protocols.refresh import Dealing as Dealing
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
PHASES = frozenset(
    {
        "keys",
        "keys-relay",
        "agree/keytable",
        "deal",
        "checked",
        "want",
        "agree/dealings",
        "repair-req",
        "repair",
        "mi",
        "need",
        "sigs",
        "nonce",
        "signreq",
        "sigshare",
        "m-nonce",
        "m-signreq",
        "m-sigshare",
    }
)


def default_deadline(constants: Constants) -> float:
    """How long after the start an init waits before it gives up (no keys are kept then)."""
    return max(30.0, 200 * constants.delta)


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


def session_id(constants: Constants, start: float) -> bytes:
    """The init session: C and the start time (a second init of the same C starts later)."""
    return hashlib.sha256(
        encoding.encode(["pst/init/session", constants.to_obj(), round(start * 1000)])
    ).digest()


def encode_message(session: bytes, phase: str, body: Any) -> bytes:
    return encoding.encode({"session": session, "phase": phase, "body": body})


def decode_message(data: bytes, session: bytes, n: int) -> Message:
    """An init message from untrusted bytes (DecodeError): size first, then the envelope and its
    session, then the body's shape for its phase (``n`` bounds its lists)."""
    if len(data) > MAX_MESSAGE:
        raise DecodeError(f"init message of {len(data)} bytes exceeds the limit of {MAX_MESSAGE}")
    f = encoding.expect_map(
        encoding.decode(data, max_size=MAX_MESSAGE, what="init message"),
        {"session": bytes, "phase": str, "body": object},
        "init message",
    )
    if f["session"] != session:
        raise DecodeError("message of another init session (replayed?)")
    if f["phase"] not in PHASES:
        raise DecodeError(f"unknown init phase {f['phase']!r}")
    return parse_message(f["phase"], f["body"], n)


@dataclass(frozen=True)
class KeysAnnouncement:
    """K_j, V_start_j (and j's announcement key) as j sent them, self-signed with S_j(0)."""

    server: int
    entry: KeyEntry
    vstart: bytes
    ann_key: bytes | None
    raw: bytes


def parse_keys(raw: Any, session: bytes, c: Constants) -> KeysAnnouncement:
    s = decode_signed(raw, "keys", PERIOD, max_size=4096)
    fields: dict[str, type] = {"session": bytes, "server": int, "K": dict, "vstart": bytes}
    if isinstance(s.body, dict) and "A" in s.body:
        fields["A"] = bytes
    f = encoding.expect_map(s.body, fields, "key announcement")
    if f["session"] != session:
        raise DecodeError("key announcement of another init session")
    j = f["server"]
    if j not in c.ids:
        raise DecodeError(f"key announcement for server {j}, not one of 1..{c.n}")
    entry = KeyEntry.from_obj(f["K"], "key announcement")
    if len(f["vstart"]) != 32:
        raise DecodeError("key announcement: V_start must be 32 bytes")
    vdec.decode_public_key(entry.encryption_key)
    if not ed25519_verify(
        entry.verify_key, encryption_key_payload(j, PERIOD, entry.encryption_key), entry.signature
    ):
        raise BadSignature("key announcement: E_i(0) not signed with S_i(0)")
    if not s.verify(entry.verify_key):
        raise BadSignature("key announcement not signed with its own S_i(0)")
    ann = f.get("A")
    if ann is not None:
        annkey.load_public(ann, f"announcement key of server {j}")
    return KeysAnnouncement(j, entry, f["vstart"], ann, raw)


def judge_initial_table(
    value: bytes, session: bytes, c: Constants
) -> tuple[KeyTableCandidate, dict[int, KeysAnnouncement]]:
    """A proposed KeyTable(0) from the value alone: one valid self-signed K_j for every server."""
    f = encoding.expect_map(
        encoding.decode(value, what="KeyTable(0) proposal"),
        {"session": bytes, "entries": dict},
        "KeyTable(0) proposal",
    )
    if f["session"] != session:
        raise DecodeError("KeyTable(0) proposal of another init session")
    if set(f["entries"]) != set(c.ids):
        raise DecodeError("KeyTable(0) proposal: one key announcement per server of C")
    keys: dict[int, KeysAnnouncement] = {}
    for j, raw in f["entries"].items():
        k = parse_keys(raw, session, c)
        if k.server != j:
            raise DecodeError(f"entry {j} holds server {k.server}'s keys")
        keys[j] = k
    anns = {j: Ann(j, k.entry, {}, True, k.raw) for j, k in keys.items()}
    table = KeyTable(PERIOD, {j: k.entry for j, k in keys.items()}, {}, frozenset())
    return KeyTableCandidate(value, table, anns, tuple(sorted(c.ids)), ()), keys


class InitProtocol(DealingStage):
    """Table 3 for server ``me`` (sans-IO): drive it with :meth:`receive` and :meth:`tick`.

    ``sstart`` is the 32-byte Ed25519 seed of S_start (V_start is in the server's ROM).
    Pass it as a ``bytearray`` to have it overwritten once M_i is signed.
    """

    context = CONTEXT

    def __init__(
        self,
        *,
        me: int,
        constants: Constants,
        sstart: bytes | bytearray,
        start: float,
        rand: RandomBytes,
        ann_public: bytes | None = None,
        deadline: float | None = None,
    ) -> None:
        if me not in constants.ids:
            raise LocalProtocolError(f"server {me} is not one of 1..{constants.n}")
        if len(sstart) != 32:
            raise LocalProtocolError("the start key seed must be 32 bytes")
        self.me = me
        self.period = PERIOD
        self.constants = constants
        self.rand = rand
        self.start = start
        self.deadline = start + default_deadline(constants) if deadline is None else deadline
        if ann_public is not None:
            annkey.load_public(ann_public, "this server's announcement key")
        #: The public key of our announcement key (the ROM's TPM, issue 8), agreed with K_i.
        self.ann_public = ann_public
        self.session = session_id(constants, start)
        self.durable = MemoryDurable()
        self.status = Status.OPERATIONAL
        self.alerts = []
        self.rejected = []
        self.outcome: InitOutcome | None = None
        self._out = []
        self._held = {}
        self._spent: dict[int, int] = {}
        self._now = start
        # S_start: held until M_i is signed (the decision), then erased.
        self._sstart: SigningKey | None = SigningKey(bytes(sstart))
        self._sstart_buffer: bytearray | None = sstart if isinstance(sstart, bytearray) else None
        self.vstart = bytes(self._sstart.verify_key)
        self.sstart_erased = False
        # KEYS: (S_i(0), V_i(0)) and (E_i(0), D_i(0)).
        self.signing_seed = rand(32)
        self.encryption_seed = rand(32)
        self.signer = Signer(SigningKey(self.signing_seed))
        self.encryption_public = vdec.public_from_seed(self.encryption_seed)
        self.my_entry = KeyEntry(
            self.signer.public,
            self.encryption_public,
            self.signer.sign(encryption_key_payload(me, PERIOD, self.encryption_public)),
        )
        body: dict[str, Any] = {
            "session": self.session,
            "server": me,
            "K": self.my_entry.to_obj(),
            "vstart": self.vstart,
        }
        if ann_public is not None:
            body["A"] = ann_public
        self.my_ann = sign("keys", PERIOD, body, self.signer)
        self.received: dict[int, KeysAnnouncement] = {me: parse_keys(self.my_ann, self.session, constants)}
        self._keys_sent = -1e9
        self._relayed: dict[int, float] = {}
        self._relays: dict[tuple[int, bytes], set[int]] = {}
        self.conflicts: set[int] = set()
        # Agreement and dealings (DealingStage).
        self.kt_engine: Engine | None = None
        self.kt = None
        self.keys_agreed: dict[int, KeysAnnouncement] = {}
        self.s_engine = None
        self.decided = False
        self.dealings = {}
        self._other_dealings = {}
        self._raw_dealings = {}
        self.my_subshares = {}
        self.convicted = {}
        self._complaints = {}
        self._checked = {}
        self._s_ready_since = None
        self._want_sent = -1e9
        # After the decision.
        self.qual: frozenset[int] = frozenset()
        self.new_keys: dict[str, KeyShare[Any]] = {}
        self.new_sharings: dict[str, PublicSharing[Any]] = {}
        self.vcert: bytes | None = None
        self.table: KeyTable | None = None
        self.m_i: dict[int, bytes] = {}
        self._my_mi = b""
        self.m_info: InvariantInfo | None = None
        self.kt_signature = b""
        self.m_signature = b""
        self._kt_frost = _FrostState(self._kt_payload, self._on_kt_signature, lambda: bool(self.kt_signature))
        self._m_frost = _FrostState(
            self._m_payload, self._on_m_signature, lambda: bool(self.m_signature), prefix="m-"
        )
        self._need_sent = -1e9
        self._answered: dict[int, float] = {}
        self._partial: dict[str, int] = {}
        self._repair: dict[int, dict[str, dict[int, int]]] = {}
        self._repair_request: list[bytes] = []
        self._repair_sent = -1e9

    # Small helpers ----------------------------------------------------------------------------

    @property
    def c(self) -> Constants:
        return self.constants

    @property
    def keys(self) -> dict[str, KeyShare[Any]]:
        """This server's shares once decided (empty before, and after a failure)."""
        return self.new_keys

    def _send(self, to: int, phase: str, body: Any) -> None:
        self._out.append(Outgoing(to, encode_message(self.session, phase, body)))

    def _deal_context(self, dealer: int) -> bytes:
        assert self.kt is not None
        return encoding.encode(["pst/init/deal", self.session, dealer, digest(self.kt.value)])

    def _dkg_context(self, sid: str) -> bytes:
        return encoding.encode(["pst/init/dkg", self.session, sid])

    # Driving ----------------------------------------------------------------------------------

    def receive(self, sender: int, data: bytes, now: float) -> None:
        """Take a message from ``sender``; a peer's bad input is recorded in ``rejected``.

        Each peer has a byte budget for the whole initialization (as for a period's refresh):
        beyond it, its messages are dropped before they are decoded, with one record saying so.
        """
        self._now = now
        try:
            if sender not in self.c.ids or sender == self.me:
                raise RemoteProtocolError(sender, "message from a server outside the network")
            spent = self._spent.get(sender, 0) + len(data)
            self._spent[sender] = spent
            if spent > PEER_BUDGET:
                if spent - len(data) <= PEER_BUDGET:
                    raise RemoteProtocolError(sender, "sent more than its byte budget; ignored")
                return
            msg = decode_message(data, self.session, self.c.n)
        except DecodeError as exc:
            self.rejected.append(RemoteProtocolError(sender, str(exc)))
            return
        except RemoteProtocolError as exc:
            self.rejected.append(exc)
            return
        self._inject(sender, msg, now)

    def _inject(self, sender: int, msg: Message, now: float) -> None:
        try:
            self._dispatch(sender, msg, now)
        except (DecodeError, BadSignature) as exc:
            self.rejected.append(RemoteProtocolError(sender, f"{msg.phase}: {exc}"))
        except RemoteProtocolError as exc:
            self.rejected.append(exc)

    def tick(self, now: float) -> list[Outgoing]:
        self._now = now
        if now >= self.start:
            self._advance(now)
        out, self._out = self._out, []
        return out

    def next_wakeup(self, now: float) -> float | None:
        if now < self.start:
            return self.start
        times = [e.next_wakeup(now) for e in (self.kt_engine, self.s_engine) if e is not None]
        if self.outcome is None:
            times.append(now + self.timeout / 4)
            times.append(self.deadline)
        return min((t for t in times if t is not None), default=None)

    def _dispatch(self, sender: int, msg: Message, now: float) -> None:
        if self.outcome is not None:
            self._answer_late(sender, msg, now)
            return
        phase = msg.phase
        if phase not in PHASES:
            raise RemoteProtocolError(sender, f"{phase}: not a phase of the initialization")
        if isinstance(msg, Signed) and phase == "keys":
            self._on_keys(sender, msg.data, now)
        elif isinstance(msg, KeysRelay):
            self._on_keys_relay(sender, msg, now)
        elif isinstance(msg, Agree) and phase == "agree/keytable":
            if self.kt_engine is None:
                self._hold(sender, msg)
                return
            self.kt_engine.deliver(sender, msg.msg, now)
            self._collect(self.kt_engine)
        elif self.kt is None:
            self._hold(sender, msg)
        elif isinstance(msg, Signed) and phase == "deal":
            self._on_deal(sender, msg, now)
        elif isinstance(msg, Checked):
            self._on_checked(sender, msg, now)
        elif isinstance(msg, Want):
            self._on_want(sender, msg, now)
        elif isinstance(msg, Agree):
            self._on_agree_s(sender, msg, now)
        elif isinstance(msg, RepairRequest):
            self._on_repair_request(sender, msg, now)
        elif isinstance(msg, Repair):
            self._on_repair(sender, msg, now)
        elif not self.new_keys:  # undecided, or repairing our share
            self._hold(sender, msg)
        elif isinstance(msg, Signed) and phase == "mi":
            self._on_mi(sender, msg.data, now)
        elif isinstance(msg, Need):
            self._on_need(sender, msg, now)
        elif isinstance(msg, Sigs):
            self._on_sigs(sender, msg)
        elif isinstance(msg, Signed) and phase.startswith("m-"):
            if self.m_info is None:
                self._hold(sender, msg)
                return
            self._frost_message(self._m_frost, sender, phase[2:], msg.data, now)
        elif isinstance(msg, Signed):
            self._frost_message(self._kt_frost, sender, phase, msg.data, now)
        else:  # pragma: no cover - PHASES and messages.parse agree
            raise RemoteProtocolError(sender, f"{phase}: unexpected message")

    def _frost_message(
        self, frost_state: _FrostState, sender: int, phase: str, raw: bytes, now: float
    ) -> None:
        if phase == "nonce":
            frost_state.on_nonce(self, sender, raw)
        elif phase == "signreq":
            frost_state.on_request(self, sender, raw, now)
        else:
            frost_state.on_share(self, sender, raw)
        self._maybe_complete()

    def _advance(self, now: float) -> None:
        if self.outcome is not None:
            return
        if now >= self.deadline:
            self._fail(self._why_not_done())
            return
        if self.kt is None and now - self._keys_sent >= self.timeout:
            # Until the KeyTable is decided our keys go out again now and then: a server that
            # started late, or whose connection came up late, gets them.
            self._keys_sent = now
            self._send(EVERYONE, "keys", self.my_ann)
        for engine, name in ((self.kt_engine, "agree/keytable"), (self.s_engine, "agree/dealings")):
            if engine is not None:
                for to, obj in engine.tick(now):
                    self._send(to, name, obj)
                self._collect(engine)
        if self.kt is not None and not self.decided:
            self._want_missing(now)
        if self._repair and now - self._repair_sent >= self.timeout:
            self._repair_sent = now
            self._send(EVERYONE, "repair-req", self._repair_request)
        if self.decided and self.new_keys:
            if not self.kt_signature:
                self._kt_frost.step(self, now)
            if self.m_info is not None and not self.m_signature:
                self._m_frost.step(self, now)
            if now - self._need_sent >= self.timeout:
                self._need_sent = now
                missing = sorted(set(self.c.ids) - set(self.m_i))
                self._send(EVERYONE, "need", {"mi": missing, "sigs": True})
            self._maybe_complete()

    def _why_not_done(self) -> str:
        if self.kt is None:
            lacking = sorted(set(self.c.ids) - set(self.received))
            if lacking:
                return f"init aborted: no keys from servers {lacking} (the initial keys of servers {lacking})"
            return "init aborted: the KeyTable(0) was not decided in time"
        if not self.decided:
            return "init aborted: the set of dealings was not decided in time"
        lacking = sorted(set(self.c.ids) - set(self.m_i))
        if lacking:
            return f"init aborted: M needs every server's M_i (none from {lacking})"
        return "init aborted: M and KeyTable(0) were not signed with Scert in time"

    # KEYS and agreement 1 ---------------------------------------------------------------------

    def _on_keys(self, sender: int, body: Any, now: float) -> None:
        k = parse_keys(body, self.session, self.c)
        if k.server != sender:
            raise RemoteProtocolError(
                sender, f"key announcement of server {k.server} on server {sender}'s link"
            )
        known = self.received.get(sender)
        if known is not None:
            if known.raw == k.raw:
                self._relay_keys(sender, now)  # it still announces: it may lack some keys
            else:
                self.conflicts.add(sender)
                self._alert(
                    AlertKind.CONFLICTING_ANNOUNCEMENTS,
                    sender,
                    "two different key announcements (kept the first)",
                    (known.raw, k.raw),
                )
            return
        self._take_keys(k, now)

    def _take_keys(self, k: KeysAnnouncement, now: float) -> None:
        self.received[k.server] = k
        if len(self.received) == self.c.n and self.kt_engine is None:
            self._open_kt_engine(now)

    def _relay_keys(self, to: int, now: float) -> None:
        """Every key announcement we hold, to a server that still sends its own (so it lacks some:
        a partition cut it off while everyone announced). At most once per timeout per server."""
        if len(self.received) < self.c.n or now - self._relayed.get(to, -1e9) < self.timeout:
            return
        self._relayed[to] = now
        self._send(to, "keys-relay", [k.raw for _j, k in sorted(self.received.items())])

    def _on_keys_relay(self, sender: int, msg: KeysRelay, now: float) -> None:
        """Announcements relayed by others: one counts once t+1 servers relayed the same (so at
        least one honest server received it from its author)."""
        for raw in msg.announcements:
            k = parse_keys(raw, self.session, self.c)
            if k.server in self.received:
                continue
            who = self._relays.setdefault((k.server, digest(k.raw)), set())
            if len(self._relays) > 4 * self.c.n * self.c.n:
                raise RemoteProtocolError(sender, "keys relay: too many different announcements")
            who.add(sender)
            if len(who) >= self.c.t + 1:
                self._take_keys(k, now)

    def _open_kt_engine(self, now: float) -> None:
        inst = Instance(CONTEXT, PERIOD, "keytable")
        keys = {j: k.entry.verify_key for j, k in self.received.items()}
        committee = Committee(self.c.n, self.c.t, keys)
        safety = SafetyRules(inst, self.signer, _DurableSafety(self.durable, PERIOD))
        self.kt_engine = Engine(
            me=self.me,
            inst=inst,
            committee=committee,
            safety=safety,
            app=_InitKeyTableApp(self),
            base_timeout=self.timeout,
            now=now,
            on_decide=self._kt_decided,
        )
        self._replay(now)

    def propose_keytable(self) -> bytes | None:
        if len(self.received) < self.c.n or self.conflicts:
            return None
        entries = {j: k.raw for j, k in sorted(self.received.items())}
        return encoding.encode({"session": self.session, "entries": entries})

    def validate_keytable(self, value: bytes) -> Verdict:
        try:
            _cand, keys = judge_initial_table(value, self.session, self.c)
        except (DecodeError, BadSignature) as exc:
            return reject(str(exc))
        if keys[self.me].raw != self.my_ann:
            self._alert(
                AlertKind.CONFLICTING_ANNOUNCEMENTS,
                self.me,
                "a KeyTable(0) proposal holds keys for us that we did not announce",
                (keys[self.me].raw,),
            )
            return reject("the proposal holds keys for us that we did not announce")
        for j, k in keys.items():
            mine = self.received.get(j)
            if mine is not None and mine.raw != k.raw:
                self._alert(
                    AlertKind.CONFLICTING_ANNOUNCEMENTS,
                    j,
                    "servers received different key announcements from this server",
                    (mine.raw, k.raw),
                )
                return reject(f"server {j}'s keys are not the ones we received")
        return ACCEPT

    def _kt_decided(self, decision: Decision) -> None:
        cand, keys = judge_initial_table(decision.value, self.session, self.c)
        self.kt = cand
        self.keys_agreed = keys
        self._kt_qc = decision.qc
        self._open_s_engine(self._now)
        self._deal()
        self._replay(self._now)

    # DEAL (the dealings stage is the refresh's) ---------------------------------------------------

    def _make_dealing(self) -> bytes:
        assert self.kt is not None
        c, kt = self.c, self.kt
        commit: dict[str, Any] = {}
        plain: dict[int, dict[str, Any]] = {k: {} for k in kt.table.entries}
        for sid in sorted(c.secrets):
            group = c.group(sid)
            dealing, shares = dkg.deal(
                group, self._dkg_context(sid), self.me, c.n, c.t, scalar_source(self.rand, group)
            )
            obj = dealing.to_obj(group)
            commit[sid] = {"commitment": obj["commitment"], "pop": obj["pop"]}
            for k in kt.table.entries:
                plain[k][sid] = {"z": self._share_for(sid, k, shares[k]), "g": {}}
        kt_digest = digest(kt.value)
        recipients = {k: e.encryption_key for k, e in kt.table.entries.items()}
        eph, cts = vdec.encrypt_to(
            recipients,
            {k: encoding.encode(p) for k, p in plain.items()},
            self._scalar(ED25519),
            self._deal_context(self.me),
        )
        body = {"dealer": self.me, "kt": kt_digest, "eph": eph, "commit": commit, "ct": cts}
        return sign("deal", PERIOD, body, self.signer)

    def _share_for(self, sid: str, recipient: int, value: int) -> int:
        """The sub-share actually dealt to ``recipient`` (a hook for tests of cheating dealers)."""
        return value

    def _parse_dealing(self, raw: Any) -> Dealing:
        """An init dealing from untrusted bytes, checked against the decided KeyTable(0)."""
        assert self.kt is not None
        c, kt = self.c, self.kt
        d, f = open_dealing(raw, PERIOD, kt, c, self._deal_context)
        full: dict[str, dkg.Dealing[Any]] = {}
        for sid, obj in f["commit"].items():
            group = c.group(sid)
            g = encoding.expect_map(obj, {"commitment": list, "pop": list}, "dealing commitments")
            one = dkg.Dealing.decode(group, encoding.encode({"dealer": d, **g}), c.n, c.t)
            try:
                dkg.check_dealing(group, self._dkg_context(sid), one, c.n, c.t)
            except CheatingError as exc:
                raise DecodeError(f"dealing of server {d}: {exc.reason}") from None
            full[sid] = one
        return Dealing(d, {}, {sid: {} for sid in c.secrets}, f["eph"], dict(f["ct"]), raw, full)

    def _decide(self, transcript: Transcript, dealings: Mapping[int, Dealing]) -> None:
        """The decision of S: the sharing of each secret and our share (repaired first if a
        decided dealing holds a bad sub-share for us); then M_i, and S_start goes."""
        c = self.c
        sharings: dict[str, PublicSharing[Any]] = {}
        for sid in c.secrets:
            group = c.group(sid)
            commitment = sum_commitments(group, [dealings[d].full[sid].commitment for d in sorted(dealings)])
            sharings[sid] = PublicSharing(c.n, c.t, commitment)
        self.decided = True
        self.qual = frozenset(dealings)
        self.new_sharings = sharings
        vcert = sharings[SCERT].public_key
        assert isinstance(vcert, bytes)
        self.vcert = vcert
        for j in c.ids:
            if j not in dealings and j not in self.convicted:
                self._alert(AlertKind.SILENT, j, "its dealing is not in the decided set")
        bad = sorted(d for d in dealings if d not in self.my_subshares)
        self._partial = {
            sid: sum(self.my_subshares[d][sid][0] for d in dealings if d in self.my_subshares)
            % c.group(sid).order
            for sid in c.secrets
        }
        self.my_subshares = {}
        if bad:
            complaints = [self._complaints.get((self.me, d)) for d in bad]
            if any(x is None for x in complaints):  # pragma: no cover - we check every dealing we get
                self._fail("init aborted: a decided dealing holds no usable sub-share for this server")
                return
            # Same-period repair: every other member's point on the convicted dealer's polynomial.
            self._repair = {d: {} for d in bad}
            self._repair_request = [x for x in complaints if x is not None]
            self._send(EVERYONE, "repair-req", self._repair_request)
            self._repair_sent = self._now
            return
        self._finish_shares()

    def _on_repair(self, sender: int, msg: Repair, now: float) -> None:
        """A member's points on a convicted dealer's polynomials, checked against its commitments."""
        if not self._repair:
            return
        d = msg.dealer
        if d not in self._repair or sender == d:
            return
        dealing = self.dealings[d]
        values = msg.values
        if set(values) != set(self.c.secrets):
            raise RemoteProtocolError(sender, "repair: one value per secret")
        for sid, v in values.items():
            if not subshare_ok(self.c.group(sid), dealing, sid, sender, v[0]):
                raise RemoteProtocolError(
                    sender, f"repair: its point of {sid!r} fails server {d}'s commitments"
                )
        for sid, v in values.items():
            self._repair[d].setdefault(sid, {})[sender] = v[0]
        done = all(
            len(self._repair[x].get(sid, {})) >= self.c.t + 1 for x in self._repair for sid in self.c.secrets
        )
        if done:
            for points in self._repair.values():
                for sid in self.c.secrets:
                    q = self.c.group(sid).order
                    pts = dict(sorted(points[sid].items())[: self.c.t + 1])
                    self._partial[sid] = (self._partial[sid] + interpolate(pts, q, x=self.me)) % q
            self._repair = {}
            self._finish_shares()

    def _finish_shares(self) -> None:
        c = self.c
        keys: dict[str, KeyShare[Any]] = {}
        for sid in c.secrets:
            group = c.group(sid)
            k = KeyShare(self.me, SecretScalar(self._partial[sid], group.order), self.new_sharings[sid])
            if not k.check(group):  # pragma: no cover - every sub-share and point was checked
                raise LocalProtocolError(f"our share of {sid!r} does not match its sharing")
            keys[sid] = k
        self._partial = {}
        self.new_keys = keys
        digests = {sid: sharing_digest(c.group(sid), self.new_sharings[sid]) for sid in sorted(c.secrets)}
        assert self.kt is not None
        self.table = KeyTable(PERIOD, dict(self.kt.table.entries), digests, frozenset())
        self._my_mi = self._sign_m_i()
        self.m_i[self.me] = self._my_mi
        self._send(EVERYONE, "mi", self._my_mi)
        self._kt_frost.start(self, self._now)
        self._maybe_m()
        self._replay(self._now)

    # M: M_i, S_start erased ---------------------------------------------------------------------

    def _sign_m_i(self) -> bytes:
        """M_i = S_start(Vcert, C), then erase S_start (Table 3: VERY IMPORTANT); sent signed."""
        assert self.vcert is not None
        key = self._sstart
        if key is None:  # pragma: no cover - signed once, at the decision
            raise LocalProtocolError("S_start is no longer available")
        m_i = bytes(key.sign(m_i_payload(self.vcert, self.c, self.me, self.ann_public)).signature)
        del key
        self._erase_sstart(overwrite=True)
        return sign("mi", PERIOD, {"server": self.me, "Mi": m_i}, self.signer)

    def _erase_sstart(self, *, overwrite: bool) -> None:
        self._sstart = None
        buffer, self._sstart_buffer = self._sstart_buffer, None
        if buffer is not None and overwrite:
            buffer[:] = bytes(len(buffer))
        self.sstart_erased = self.sstart_erased or overwrite

    def _on_mi(self, sender: int, body: Any, now: float) -> None:
        assert self.kt is not None and self.vcert is not None
        s = decode_signed(body, "mi", PERIOD, max_size=1024)
        f = encoding.expect_map(s.body, {"server": int, "Mi": bytes}, "M_i")
        j = f["server"]
        if j not in self.keys_agreed or not s.verify(self.keys_agreed[j].entry.verify_key):
            raise RemoteProtocolError(sender, f"M_i of server {j} not signed with its key S_i(0)")
        if j in self.m_i:
            return
        k = self.keys_agreed[j]
        if not ed25519_verify(k.vstart, m_i_payload(self.vcert, self.c, j, k.ann_key), f["Mi"]):
            self._alert(AlertKind.INVALID_M, j, "M_i does not verify with the server's V_start")
            return
        self.m_i[j] = body
        self._maybe_m()

    def _maybe_m(self) -> None:
        if self.m_info is not None or self.vcert is None or set(self.m_i) != set(self.c.ids):
            return
        m = {j: decode_signed(raw, "mi", PERIOD, max_size=1024).body["Mi"] for j, raw in self.m_i.items()}
        ann = {j: k.ann_key for j, k in self.keys_agreed.items() if k.ann_key is not None}
        self.m_info = InvariantInfo(self.vcert, self.c, m, b"", ann)
        self._m_frost.start(self, self._now)
        self._replay(self._now)

    def _on_need(self, sender: int, msg: Need, now: float) -> None:
        if now - self._answered.get(sender, -1e9) < self.timeout / 2:
            return
        self._answered[sender] = now
        for j in msg.mi:
            raw = self.m_i.get(j)
            if raw is not None:
                self._send(sender, "mi", raw)
        if msg.sigs and self.kt_signature and self.m_signature:
            self._send(sender, "sigs", {"M": self.m_signature, "keytable": self.kt_signature})
        self._kt_frost.republish(self, sender)
        if self.m_info is not None:
            self._m_frost.republish(self, sender)

    # SIGN ---------------------------------------------------------------------------------------

    def _kt_payload(self) -> bytes:
        assert self.table is not None
        return self.table.payload()

    def _m_payload(self) -> bytes:
        assert self.m_info is not None
        return self.m_info.payload()

    def _on_kt_signature(self, sig: bytes) -> None:
        self.kt_signature = sig
        self._maybe_complete()

    def _on_m_signature(self, sig: bytes) -> None:
        self.m_signature = sig
        self._maybe_complete()

    def _on_sigs(self, sender: int, msg: Sigs) -> None:
        if self.m_info is None or self.table is None or self.vcert is None:
            return
        good_m = ed25519_verify(self.vcert, self.m_info.payload(), msg.m)
        good_k = ed25519_verify(self.vcert, self.table.payload(), msg.keytable)
        if not (good_m and good_k):
            raise RemoteProtocolError(sender, "forwarded signatures do not verify with Vcert")
        self.m_signature = self.m_signature or msg.m
        self.kt_signature = self.kt_signature or msg.keytable
        self._maybe_complete()

    # END ----------------------------------------------------------------------------------------

    def _maybe_complete(self) -> None:
        if self.outcome is not None or not (self.kt_signature and self.m_signature):
            return
        assert self.m_info is not None and self.table is not None
        m = self.m_info.signed(self.m_signature)
        table = self.table.signed(self.kt_signature)
        problem = m.check(self.me, self.vstart)
        if problem is not None:  # pragma: no cover - every part was checked above
            self._fail(f"init aborted: the signed M does not check: {problem}")
            return
        self._send(EVERYONE, "sigs", {"M": self.m_signature, "keytable": self.kt_signature})
        public = PublicData(m, table, dict(self.new_sharings))
        private = PrivateData(
            PERIOD,
            self.signing_seed,
            self.encryption_seed,
            {sid: k.share for sid, k in self.new_keys.items()},
        )
        qual = {sid: self.qual for sid in self.c.secrets}
        self.outcome = InitOutcome(public, private, list(self.alerts), None, qual)

    def _answer_late(self, sender: int, msg: Message, now: float) -> None:
        """Done: a peer still at work gets the decisions, M_i and the signatures it lacks."""
        if self.outcome is None or not self.outcome.ok:
            return
        if msg.phase == "keys":
            self._relay_keys(sender, now)
        elif isinstance(msg, Agree) and msg.phase == "agree/keytable" and self.kt_engine is not None:
            self.kt_engine.deliver(sender, msg.msg, now)
            self._collect(self.kt_engine)
        elif isinstance(msg, Agree) and msg.phase == "agree/dealings" and self.s_engine is not None:
            self.s_engine.deliver(sender, msg.msg, now)
            self._collect(self.s_engine)
        elif isinstance(msg, Want):
            self._on_want(sender, msg, now)
        elif isinstance(msg, RepairRequest):
            self._on_repair_request(sender, msg, now)
        elif isinstance(msg, Need):
            self._on_need(sender, msg, now)
        for engine, name in ((self.kt_engine, "agree/keytable"), (self.s_engine, "agree/dealings")):
            if engine is not None:
                for to, obj in engine.tick(now):
                    self._send(to, name, obj)

    def _fail(self, failure: str) -> None:
        """No partial keys survive a failed init: shares wiped, S_start dropped."""
        self._alert(AlertKind.RECOVERY_FAILED, self.me, failure)
        for k in self.new_keys.values():
            k.wipe()
        self.new_keys = {}
        self.my_subshares = {}
        self._erase_sstart(overwrite=False)
        qual = {sid: self.qual for sid in self.c.secrets} if self.qual else {}
        self.outcome = InitOutcome(None, None, list(self.alerts), failure, qual)
        self._out = []


class _InitKeyTableApp:
    def __init__(self, r: InitProtocol) -> None:
        self.r = r

    def propose(self) -> bytes | None:
        return self.r.propose_keytable()

    def validate(self, value: bytes, view: int) -> Verdict:
        return self.r.validate_keytable(value)

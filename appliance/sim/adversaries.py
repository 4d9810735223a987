"""Byzantine servers for the simulation: they act on typed messages and sign with their own keys.

A wire fault (:data:`~appliance.sim._net.Fault`) sees each message a Byzantine server sends,
decodes the refresh envelope and the typed object inside, changes it, and re-signs it with
the keys that server really holds (read from its engine: a broken-into server has them).
Because they work on the protocol's messages, not on the engine's private methods, a
refactor of the engine keeps them. Two behaviours need the server's own state to lie
convincingly (a dealing with a bad ciphertext, a complaint with a valid reveal); they are
engine subclasses that override one public step each.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from appliance.crypto import encoding, frost, vdec
from appliance.crypto.groups import ED25519
from appliance.protocols._signed import decode_signed, sign
from appliance.protocols.agreement import decode, digest, encode
from appliance.protocols.agreement._messages import Proposal, Vote, proposal_statement, vote_statement
from appliance.protocols.messages import Signed
from appliance.protocols.refresh import Dealing, PeriodRefresh
from appliance.sim.cluster import SimServer

Wire = list[tuple[float, bytes]]
Fault = Callable[[int, int, bytes, float, random.Random], Wire]


def _open(data: bytes) -> tuple[int, str, Any] | None:
    try:
        obj = encoding.decode(data, what="message")
    except Exception:
        return None
    if not isinstance(obj, dict) or "phase" not in obj:
        return None
    return obj["period"], obj["phase"], obj["body"]


def _wrap(period: int, phase: str, body: Any) -> bytes:
    return encoding.encode({"period": period, "phase": phase, "body": body})


def bad_frost_shares(server: SimServer) -> Fault:
    """Every FROST signature share it sends is wrong (and properly signed)."""

    def fault(sender: int, to: int, data: bytes, now: float, rng: random.Random) -> Wire:
        opened = _open(data)
        engine = server.engine
        if opened is None or opened[1] != "sigshare" or engine is None:
            return [(0.0, data)]
        period, _phase, body = opened
        s = decode_signed(body, "sigshare", period, max_size=4096)
        share = frost.SignatureShare.from_bytes(s.body["share"])
        bad = frost.SignatureShare(share.identifier, (share.share + 1) % ED25519.order)
        raw = sign("sigshare", period, {"attempt": s.body["attempt"], "share": bad.to_bytes()}, engine.signer)
        return [(0.0, _wrap(period, "sigshare", raw))]

    return fault


def foreign_commitments(server: SimServer, other: int) -> Fault:
    """Finding 8: announces FROST nonce commitments that carry another server's id."""

    def fault(sender: int, to: int, data: bytes, now: float, rng: random.Random) -> Wire:
        opened = _open(data)
        engine = server.engine
        if opened is None or opened[1] != "nonce" or engine is None:
            return [(0.0, data)]
        period, _phase, body = opened
        s = decode_signed(body, "nonce", period, max_size=4096)
        c = frost.SigningCommitment.from_bytes(s.body["c"])
        forged = frost.SigningCommitment(other, c.hiding, c.binding)
        raw = sign("nonce", period, {**s.body, "c": forged.to_bytes()}, engine.signer)
        return [(0.0, _wrap(period, "nonce", raw))]

    return fault


def share_spammer(server: SimServer) -> Fault:
    """Finding 1: answers every request with shares for attempts whose signer set does not name it,
    and leads with two different requests for its attempts (equivocation)."""

    def fault(sender: int, to: int, data: bytes, now: float, rng: random.Random) -> Wire:
        opened = _open(data)
        engine = server.engine
        if opened is None or engine is None or opened[1] not in ("sigshare", "signreq"):
            return [(0.0, data)]
        period, phase, body = opened
        out: Wire = [(0.0, data)]
        if phase == "sigshare":
            s = decode_signed(body, "sigshare", period, max_size=4096)
            for a in range(4):
                raw = sign("sigshare", period, {"attempt": a, "share": s.body["share"]}, engine.signer)
                out.append((0.0, _wrap(period, "sigshare", raw)))
        else:
            s = decode_signed(body, "signreq", period, max_size=65536)
            signers = dict(s.body["signers"])
            if len(signers) > 1 and to % 2 == 0:
                # Another set for the same attempt, to half the servers: caught as equivocation.
                raw = sign("signreq", period, {"attempt": s.body["attempt"], "signers": {}}, engine.signer)
                out = [(0.0, _wrap(period, "signreq", raw))]
        return out

    return fault


def clear_forger(server: SimServer, victim: int, rng_seed: int) -> Fault:
    """Finding 2: relays a self-signed (clear) announcement it made up for an honest victim, and
    attests it, hoping to make the victim look like an equivocator or block its recovery."""
    from nacl.signing import SigningKey

    from appliance.protocols._core import Signer
    from appliance.protocols.state import KeyEntry, encryption_key_payload

    fake = Signer(SigningKey(random.Random(rng_seed).randbytes(32)))
    sent: set[int] = set()

    def fault(sender: int, to: int, data: bytes, now: float, rng: random.Random) -> Wire:
        opened = _open(data)
        engine = server.engine
        if opened is None or engine is None or opened[1] != "ann" or engine.decided:
            return [(0.0, data)]
        period = opened[0]
        e = vdec.public_key(12345 + victim)
        entry = KeyEntry(fake.public, e, fake.sign(encryption_key_payload(victim, period, e)))
        body = {"server": victim, "K": entry.to_obj(), "sharings": {}, "clear": True}
        forged = sign("announce", period, body, fake)
        out: Wire = [(0.0, data), (0.0, _wrap(period, "ann", forged))]
        old = getattr(engine, "old_signer", None)
        if old is not None and to not in sent:
            sent.add(to)
            att = sign("attest", period, {"server": victim, "ann": digest(forged)}, old)
            out.append((0.0, _wrap(period, "attest", {"ann": forged, "attest": att, "by": sender})))
        return out

    return fault


def equivocating_leader(server: SimServer) -> Fault:
    """An equivocating KeyTable leader: to half the servers it proposes the table without one
    entry (a valid alternative), and it votes for both values."""
    alt: dict[tuple[int, int], bytes] = {}

    def fault(sender: int, to: int, data: bytes, now: float, rng: random.Random) -> Wire:
        opened = _open(data)
        engine = server.engine
        if opened is None or engine is None or opened[1] != "agree/keytable" or to % 2 == 1:
            return [(0.0, data)]
        period, phase, body = opened
        signer = getattr(engine, "old_signer", None)
        if signer is None or engine.kt_engine is None:
            return [(0.0, data)]
        msg = decode(body)
        inst = engine.kt_engine.inst
        if isinstance(msg, Proposal) and msg.justify is None:
            obj = encoding.decode(msg.value)
            others = sorted(i for i in obj["entries"] if i != sender)
            if len(obj["entries"]) <= engine.c.t + 2 or not others:
                return [(0.0, data)]
            del obj["entries"][others[-1]]
            value = encoding.encode(obj)
            alt[(period, msg.view)] = value
            sig = signer.sign(proposal_statement(inst, msg.view, digest(value)))
            return [(0.0, _wrap(period, phase, encode(Proposal(msg.view, value, None, sig))))]
        if isinstance(msg, Vote) and (period, msg.view) in alt:
            d = digest(alt[(period, msg.view)])
            vote = Vote(msg.phase, msg.view, d, signer.sign(vote_statement(inst, msg.phase, msg.view, d)))
            return [(0.0, _wrap(period, phase, encode(vote)))]
        return [(0.0, data)]

    return fault


class BadDealingEngine(PeriodRefresh):
    """A dealer whose ciphertext for ``victim`` does not decrypt (its dealing is otherwise valid)."""

    victim = 0

    def _make_dealing(self) -> bytes:
        raw = super()._make_dealing()
        s = decode_signed(raw, "deal", self.period, max_size=1 << 20)
        body = dict(s.body)
        ct = dict(body["ct"])
        victim = self.victim if self.victim in ct else min(k for k in ct if k != self.me)
        ct[victim] = bytes([ct[victim][0] ^ 1]) + ct[victim][1:]
        body["ct"] = ct
        return sign("deal", self.period, body, self.signer)


class FalseComplaintEngine(PeriodRefresh):
    """Complains, with a valid reveal, about the first honest dealing it receives."""

    complained = False

    def _check_my_subshares(self, dealing: Dealing) -> None:
        super()._check_my_subshares(dealing)
        if self.complained or dealing.dealer == self.me or self.kt is None:
            return
        self.complained = True
        raw = self.complaint(dealing)
        self._send(0, "checked", {"dealing": dealing.digest, "complaint": raw})


class TwoDealingsEngine(PeriodRefresh):
    """Signs two different dealings: one for ``victim``, another for everyone else (whose forwards
    reach the victim late, so it may see the decided one second)."""

    victim = 0

    def _deal(self) -> None:
        first, second = self._make_dealing(), self._make_dealing()
        victim = (
            self.victim
            if self.victim in self.c.ids and self.victim != self.me
            else min(j for j in self.c.ids if j != self.me)
        )
        self._send(victim, "deal", first)
        for j in self.c.ids:
            if j not in (self.me, victim):
                self._send(j, "deal", second)
        self._on_deal(self.me, Signed("deal", second), self._now)


class HastyLeaderEngine(PeriodRefresh):
    """As the first leader of the KeyTable agreement it proposes at once, leaving ``victims`` out
    (honest servers whose announcements are a little late), then goes silent: no dealing, no
    vote on the dealings. With the victims out, the new KeyTable's operational members are
    exactly a quorum with the liar among them, so without its votes the dealings are never
    decided, unless honest voters wait for the announcements before they vote."""

    victims: tuple[int, ...] = ()

    def _kt_candidate_entries(self) -> dict[int, dict[str, Any]] | None:
        entries = super()._kt_candidate_entries()
        if entries is None:
            return None
        return {i: e for i, e in entries.items() if i not in self.victims}

    def propose_keytable(self) -> bytes | None:
        self._ready_since = -1e9  # no grace for stragglers
        return super().propose_keytable()


#: What a server that took part in the KeyTable agreement sends afterwards (to go silent then).
AFTER_KEYTABLE = frozenset(
    {"deal", "want", "checked", "agree/dealings", "undecided", "catchup", "signed-kt"}
    | {"nonce", "signreq", "sigshare", "kt-sig", "rpoint", "phase2"}
)


def silent_after_keytable(period: int) -> Fault:
    """Takes part until the KeyTable of ``period`` is agreed, then says nothing more in it."""

    def fault(sender: int, to: int, data: bytes, now: float, rng: random.Random) -> Wire:
        opened = _open(data)
        if opened is not None and opened[0] == period and opened[1] in AFTER_KEYTABLE:
            return []
        return [(0.0, data)]

    return fault


def slow_announcements(period: int, delay: float) -> Fault:
    """The server's announcements (its own and those it forwards) travel slowly in ``period``."""

    def fault(sender: int, to: int, data: bytes, now: float, rng: random.Random) -> Wire:
        opened = _open(data)
        late = opened is not None and opened[1] in ("ann", "attest") and opened[0] == period
        return [(delay if late else 0.0, data)]

    return fault


def slow_deal_forwards(period: int, delay: float) -> Fault:
    """The victim's forwarded dealings travel slowly in ``period``."""

    def fault(sender: int, to: int, data: bytes, now: float, rng: random.Random) -> Wire:
        opened = _open(data)
        late = opened is not None and opened[1] == "deal" and opened[0] == period
        return [(delay if late else 0.0, data)]

    return fault


def slow_checks(period: int, delay: float) -> Fault:
    """The victim's word on the dealings (its checks, its complaints) travels slowly in ``period``."""

    def fault(sender: int, to: int, data: bytes, now: float, rng: random.Random) -> Wire:
        opened = _open(data)
        late = opened is not None and opened[1] == "checked" and opened[0] == period
        return [(delay if late else 0.0, data)]

    return fault


def slow_pushm_to(victim: int, period: int, delay: float) -> Fault:
    """PushM to ``victim`` travels slowly in ``period`` (it lacks the sharing at the decision)."""

    def fault(sender: int, to: int, data: bytes, now: float, rng: random.Random) -> Wire:
        opened = _open(data)
        late = opened is not None and opened[1] == "pushm" and to == victim and opened[0] == period
        return [(delay if late else 0.0, data)]

    return fault

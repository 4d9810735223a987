"""Single-shot Byzantine agreement on one value: the engine (sans-IO).

Theory of operation
-------------------
One :class:`Engine` decides one value (a KeyTable, a set of dealings) among the members of
a :class:`~._messages.Committee` (the servers holding a period key). It is a two-phase
HotStuff/PBFT-style protocol with a rotating leader, timeout certificates and doubling
timeouts. Safety needs no clock: timing only decides *when* a view is abandoned.

=============  =============================================================================
view v         The leader L(v) proposes a value: in view 0 any value the application
               offers; later, the value of the highest prepare QC in the timeout
               certificate TC(v-1) it carries, or any value if that TC reports none.
PREPARE        A member votes (to everyone) for the proposal of its current view if the
               :class:`~._safety.SafetyRules` allow it and the application validates the
               value (it may answer WAIT: the vote is retried as data arrives). A value
               carried by a TC's QC needs no validation: q members validated it already.
COMMIT         q prepare votes on one digest form a prepare QC. A member that holds the
               value and has not timed out of v signs a commit vote; the QC becomes its
               *high QC*, reported in every later timeout.
DECIDE         q commit votes form a commit QC: the value is decided. The decider sends the
               QC and the value to everyone (and again to whoever later speaks to it), so
               that a server that missed messages decides too.
TIMEOUT        When the view's timer expires (base * 2**min(v, 5) after entering it), a
               member signs TIMEOUT(v, high QC) and never votes in v again. q timeouts of v
               form TC(v): enter v+1. t+1 timeouts of a view >= ours prove an honest
               server gave up on it: we join (view synchronization).
=============  =============================================================================

Why it is safe (docs/design.md has the proof sketch): two quorums share an honest server;
an honest server signs at most one prepare vote per view and, after committing in view v,
reports a high QC of view >= v in every later timeout; so every TC after a decision in v
carries a QC certifying the decided value, and every later proposal must carry that value.

Rules of this file (after h11): messages are decoded once, in :meth:`Engine.receive`,
into the frozen classes of :mod:`._messages`; a peer's fault is a
:class:`~appliance.protocols._core.RemoteProtocolError` recorded in ``rejected``; any other
exception is our own bug and propagates.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from appliance.crypto import encoding
from appliance.crypto.errors import DecodeError
from appliance.protocols._core import EVERYONE, Alert, AlertKind, RemoteProtocolError
from appliance.protocols.agreement._messages import (
    COMMIT,
    PREPARE,
    BadCertificate,
    Certs,
    Committee,
    Decide,
    Instance,
    Message,
    Proposal,
    QuorumCert,
    Timeout,
    TimeoutCert,
    UncheckableCertificate,
    Vote,
    decode,
    digest,
    encode,
    proposal_statement,
    timeout_statement,
    vote_statement,
)
from appliance.protocols.agreement._safety import NotSafe, SafetyRules

#: Votes and timeouts are kept for views in [view - WINDOW, view + WINDOW] only.
WINDOW = 64
MAX_BACKOFF = 5


def _tc_digest(tc: TimeoutCert) -> bytes:
    return digest(encoding.encode(tc.to_obj()))


#: Notes kept of certificates this server could not judge (one engine's, then dropped).
MAX_UNCHECKED = 64


class _Unchecked(Exception):
    """A certificate this server cannot judge (:class:`UncheckableCertificate`): drop the message."""


class Validity(enum.Enum):
    ACCEPT = "accept"
    WAIT = "wait"
    REJECT = "reject"


@dataclass(frozen=True)
class Verdict:
    validity: Validity
    reason: str = ""


ACCEPT = Verdict(Validity.ACCEPT)
WAIT = Verdict(Validity.WAIT)


def reject(reason: str) -> Verdict:
    return Verdict(Validity.REJECT, reason)


class Application(Protocol):
    """What is being agreed on: the engine never looks inside a value."""

    def propose(self) -> bytes | None:
        """The leader's candidate now, or None when it cannot propose yet."""

    def validate(self, value: bytes, view: int) -> Verdict:
        """ACCEPT, WAIT (missing data: ask again later) or reject(reason), for ``view``'s proposal."""


@dataclass(frozen=True)
class Decision:
    value: bytes
    qc: QuorumCert


Send = tuple[int, dict[str, Any]]


class Engine:
    """One agreement instance at server ``me`` (a passive observer when ``safety`` is None)."""

    def __init__(
        self,
        *,
        me: int,
        inst: Instance,
        committee: Committee,
        safety: SafetyRules | None,
        app: Application,
        base_timeout: float,
        now: float,
        on_decide: Callable[[Decision], None] | None = None,
    ) -> None:
        self.me = me
        self.inst = inst
        self.committee = committee
        self.safety = safety if me in committee.keys else None
        self.app = app
        self.base_timeout = base_timeout
        self.on_decide = on_decide
        self.decided: Decision | None = None
        self.alerts: list[Alert] = []
        self.rejected: list[RemoteProtocolError] = []
        #: Certificates this server could not judge for want of members' keys (nobody's fault).
        self.unchecked: list[str] = []
        self._out: list[Send] = []
        self._values: dict[bytes, bytes] = {}
        self._proposals: dict[int, Proposal] = {}
        self._votes: dict[tuple[int, int, bytes], dict[int, bytes]] = {}
        self._voted_by: dict[tuple[int, int, int], Vote] = {}
        self._timeouts: dict[int, dict[int, Timeout]] = {}
        self._qcs: dict[tuple[int, int], QuorumCert] = {}
        self._verified: set[tuple[str, int, int, bytes]] = set()
        self._tc: TimeoutCert | None = None
        self._decide_sent: dict[int, float] = {}
        self._help_sent: dict[int, float] = {}
        self._refused = -1
        self._timed_out = False
        self._deadline = now
        data = self.safety.data if self.safety is not None else None
        start = 0
        if data is not None:  # a restarted server resumes where its votes left it
            start = max(0, data.prepared_view, data.committed_view, data.timeout_view)
            if data.high_qc is not None and data.high_value is not None:
                self._values[data.high_qc.digest] = data.high_value
                self._qcs[(PREPARE, data.high_qc.view)] = data.high_qc
        self.view = -1
        self._enter(start, now)

    # Driving ------------------------------------------------------------------------------------

    def receive(self, sender: int, obj: Any, now: float) -> None:
        """Take a decoded-CBOR agreement message; a peer's fault is recorded, never raised."""
        try:
            msg = decode(obj)
        except DecodeError as exc:
            self.rejected.append(RemoteProtocolError(sender, f"{self.inst.name}: {exc}"))
            return
        self.deliver(sender, msg, now)

    def deliver(self, sender: int, msg: Message, now: float) -> None:
        """Take an agreement message already decoded (:func:`decode`) at the boundary."""
        try:
            if self.decided is not None:
                self._answer_late(sender, now)
                return
            if isinstance(msg, Proposal | Vote | Timeout) and msg.view < self.view:
                self._help_behind(sender, msg.view, now)
            if isinstance(msg, Proposal):
                self._on_proposal(sender, msg, now)
            elif isinstance(msg, Vote):
                self._on_vote(sender, msg, now)
            elif isinstance(msg, Timeout):
                self._on_timeout(sender, msg, now)
            elif isinstance(msg, Decide):
                self._on_decide(sender, msg)
            else:
                self._on_certs(sender, msg, now)
            if self.decided is None:
                self._step(now)
        except DecodeError as exc:
            self.rejected.append(RemoteProtocolError(sender, f"{self.inst.name}: {exc}"))
        except RemoteProtocolError as exc:
            self.rejected.append(exc)
        except _Unchecked:
            pass  # noted in self.unchecked; the message is dropped, its sender not accused

    def tick(self, now: float) -> list[Send]:
        if self.decided is None:
            self._step(now)
        out, self._out = self._out, []
        return out

    def proposals(self) -> list[bytes]:
        """The values proposed in this instance so far (an application may fetch their data)."""
        return [p.value for p in self._proposals.values()]

    def next_wakeup(self, now: float) -> float | None:
        if self.decided is not None or self.safety is None:
            return None  # an observer only reacts to messages
        return max(self._deadline, now + 1e-3)

    # Views --------------------------------------------------------------------------------------

    def _timeout_for(self, view: int) -> float:
        return self.base_timeout * float(1 << min(view, MAX_BACKOFF))

    def _enter(self, view: int, now: float) -> None:
        if view <= self.view:
            return
        self.view = view
        self._deadline = now + self._timeout_for(view)
        self._timed_out = False

    def _step(self, now: float) -> None:
        if self.safety is None:
            return
        if self.committee.leader(self.view) == self.me:
            self._maybe_propose(now)
        self._maybe_vote_prepare()
        self._maybe_vote_commit()
        if now >= self._deadline:
            self._time_out(now)

    def _time_out(self, now: float) -> None:
        assert self.safety is not None
        try:
            t = self.safety.timeout(self.view)
        except NotSafe:
            self._deadline = now + self._timeout_for(self.view)
            return
        self._timed_out = True
        # Re-sent at growing intervals while the view lasts: a lost timeout is not fatal.
        self._deadline = now + self._timeout_for(self.view)
        self._broadcast(t)
        self._record_timeout(self.me, t, now)

    # Leader -------------------------------------------------------------------------------------

    def _maybe_propose(self, now: float) -> None:
        assert self.safety is not None
        view = self.view
        if view in self._proposals or self._timed_out:
            return
        justify = self._tc if self._tc is not None and self._tc.view == view - 1 else None
        if view > 0 and justify is None:
            return
        if justify is not None and justify.high_qc is not None:
            value = self._values.get(justify.high_qc.digest)
        else:
            value = self.app.propose()
        if value is None:
            return
        try:
            p = self.safety.propose(view, value, justify)
        except NotSafe:
            return
        self._broadcast(p)
        self._on_proposal(self.me, p, now)

    # Handlers -----------------------------------------------------------------------------------

    def _on_proposal(self, sender: int, p: Proposal, now: float) -> None:
        leader = self.committee.leader(p.view)
        if sender != leader:
            raise RemoteProtocolError(
                sender, f"{self.inst.name}: proposal for view {p.view}, led by {leader}"
            )
        if sender != self.me and not self.committee.verify(
            sender, proposal_statement(self.inst, p.view, p.digest), p.sig
        ):
            raise RemoteProtocolError(sender, f"{self.inst.name}: proposal signature does not verify")
        seen = self._proposals.get(p.view)
        if seen is not None:
            if seen.digest != p.digest:
                self._alert(
                    AlertKind.EQUIVOCATION,
                    sender,
                    f"{self.inst.name}: two different proposals for view {p.view}",
                    (seen.digest, seen.sig, p.digest, p.sig),
                )
            return
        if p.view < self.view - WINDOW:
            return
        if p.view == 0 and p.justify is not None:
            raise RemoteProtocolError(sender, f"{self.inst.name}: a view-0 proposal carries no TC")
        if p.view > 0:
            tc = p.justify
            if tc is None or tc.view != p.view - 1:
                raise RemoteProtocolError(sender, f"{self.inst.name}: proposal for view {p.view} without TC")
            self._check_tc(sender, tc)
            if tc.high_qc is not None and tc.high_qc.digest != p.digest:
                raise RemoteProtocolError(
                    sender, f"{self.inst.name}: view {p.view} proposes a value other than the TC's QC"
                )
            self._adopt_tc(tc, now)
        self._proposals[p.view] = p
        self._values.setdefault(p.digest, p.value)
        if p.view > self.view:
            self._enter(p.view, now)

    def _maybe_vote_prepare(self) -> None:
        assert self.safety is not None
        p = self._proposals.get(self.view)
        if (
            p is None
            or self._timed_out
            or self.safety.data.prepared_view >= p.view
            or self._refused == p.view
        ):
            return
        carried = p.justify is not None and p.justify.high_qc is not None
        if not carried:
            verdict = self.app.validate(p.value, p.view)
            if verdict.validity is Validity.WAIT:
                return
            if verdict.validity is Validity.REJECT:
                leader = self.committee.leader(p.view)
                self.rejected.append(
                    RemoteProtocolError(
                        leader, f"{self.inst.name}: proposal of view {p.view}: {verdict.reason}"
                    )
                )
                self._refused = p.view  # never asked again: the timer moves us on
                return
        try:
            vote = self.safety.vote_prepare(p)
        except NotSafe:
            return
        self._broadcast(vote)
        self._record_vote(self.me, vote)

    def _maybe_vote_commit(self) -> None:
        assert self.safety is not None
        qc = self._qcs.get((PREPARE, self.view))
        if qc is None or self._timed_out or self.safety.data.committed_view >= qc.view:
            return
        value = self._values.get(qc.digest)
        if value is None:
            return
        try:
            vote = self.safety.vote_commit(qc, value)
        except NotSafe:
            return
        self._broadcast(vote)
        self._record_vote(self.me, vote)

    def _on_vote(self, sender: int, v: Vote, now: float) -> None:
        if sender not in self.committee.keys:
            raise RemoteProtocolError(sender, f"{self.inst.name}: vote from a non-member")
        if abs(v.view - self.view) > WINDOW:
            return
        if not self.committee.verify(sender, vote_statement(self.inst, v.phase, v.view, v.digest), v.sig):
            raise RemoteProtocolError(sender, f"{self.inst.name}: vote signature does not verify")
        self._record_vote(sender, v)
        qc = self._qcs.get((v.phase, v.view))
        if qc is not None:
            self._on_qc(qc, now)

    def _record_vote(self, sender: int, v: Vote) -> None:
        key = (sender, v.phase, v.view)
        seen = self._voted_by.get(key)
        if seen is not None:
            if seen.digest != v.digest:
                self._alert(
                    AlertKind.EQUIVOCATION,
                    sender,
                    f"{self.inst.name}: two different votes (phase {v.phase}) in view {v.view}",
                    (seen.digest, seen.sig, v.digest, v.sig),
                )
            return
        self._voted_by[key] = v
        sigs = self._votes.setdefault((v.phase, v.view, v.digest), {})
        sigs[sender] = v.sig
        if len(sigs) >= self.committee.quorum and (v.phase, v.view) not in self._qcs:
            qc = QuorumCert(v.phase, v.view, v.digest, dict(sigs))
            self._verified.add(("qc", v.phase, v.view, v.digest))
            self._qcs[(v.phase, v.view)] = qc

    def _note_unchecked(self, sender: int, exc: Exception) -> None:
        if len(self.unchecked) < MAX_UNCHECKED:
            self.unchecked.append(f"{self.inst.name}: from server {sender}: {exc}")

    def _check_qc(self, sender: int, qc: QuorumCert) -> None:
        key = ("qc", qc.phase, qc.view, qc.digest)
        if key in self._verified:
            return
        try:
            self.committee.verify_qc(self.inst, qc)
        except UncheckableCertificate as exc:
            self._note_unchecked(sender, exc)
            raise _Unchecked from None
        except BadCertificate as exc:
            raise RemoteProtocolError(sender, f"{self.inst.name}: {exc}") from None
        self._verified.add(key)

    def _check_tc(self, sender: int, tc: TimeoutCert) -> None:
        key = ("tc", 0, tc.view, _tc_digest(tc))  # the whole certificate: another TC of v is checked too
        if key in self._verified:
            return
        try:
            self.committee.verify_tc(self.inst, tc)
        except UncheckableCertificate as exc:
            self._note_unchecked(sender, exc)
            raise _Unchecked from None
        except BadCertificate as exc:
            raise RemoteProtocolError(sender, f"{self.inst.name}: {exc}") from None
        self._verified.add(key)
        if tc.high_qc is not None:
            self._verified.add(("qc", tc.high_qc.phase, tc.high_qc.view, tc.high_qc.digest))

    def _on_qc(self, qc: QuorumCert, now: float) -> None:
        self._qcs.setdefault((qc.phase, qc.view), qc)
        if qc.phase == COMMIT:
            value = self._values.get(qc.digest)
            if value is not None:
                self._decide(Decision(value, qc))
            return
        if qc.view > self.view:
            self._enter(qc.view, now)

    def _adopt_tc(self, tc: TimeoutCert, now: float) -> None:
        if self._tc is None or tc.view > self._tc.view:
            self._tc = tc
        self._enter(tc.view + 1, now)

    def _on_timeout(self, sender: int, t: Timeout, now: float) -> None:
        if sender not in self.committee.keys:
            raise RemoteProtocolError(sender, f"{self.inst.name}: timeout from a non-member")
        if abs(t.view - self.view) > WINDOW:
            return
        e = t.entry
        if not self.committee.verify(
            sender, timeout_statement(self.inst, t.view, e.qc_view, e.qc_digest), t.sig
        ):
            raise RemoteProtocolError(sender, f"{self.inst.name}: timeout signature does not verify")
        if t.high_qc is not None:
            if t.high_qc.phase != PREPARE:
                raise RemoteProtocolError(sender, f"{self.inst.name}: timeout reports a commit QC")
            self._check_qc(sender, t.high_qc)
            assert t.value is not None
            if digest(t.value) != t.high_qc.digest:
                raise RemoteProtocolError(sender, f"{self.inst.name}: timeout's value is not its QC's")
            self._values.setdefault(t.high_qc.digest, t.value)
            self._qcs.setdefault((PREPARE, t.high_qc.view), t.high_qc)
        self._record_timeout(sender, t, now)

    def _record_timeout(self, sender: int, t: Timeout, now: float) -> None:
        got = self._timeouts.setdefault(t.view, {})
        got.setdefault(sender, t)
        if t.view < self.view:
            return
        if len(got) >= self.committee.quorum:
            tc = self._make_tc(t.view, got)
            self._adopt_tc(tc, now)
            self._broadcast(Certs(None, tc))  # helps whoever missed some of the timeouts
        elif len(got) >= self.committee.t + 1 and self.safety is not None:
            # t+1 members gave up on view t.view: at least one honest did; join them.
            if t.view > self.view:
                self._enter(t.view, now)
            if t.view == self.view and not self._timed_out:
                self._time_out(now)

    def _make_tc(self, view: int, got: dict[int, Timeout]) -> TimeoutCert:
        high: QuorumCert | None = None
        for t in got.values():
            if t.high_qc is not None and (high is None or t.high_qc.view > high.view):
                high = t.high_qc
        tc = TimeoutCert(view, {i: t.entry for i, t in got.items()}, high)
        self._verified.add(("tc", 0, view, _tc_digest(tc)))
        return tc

    def _on_decide(self, sender: int, d: Decide) -> None:
        if d.qc.phase != COMMIT:
            raise RemoteProtocolError(sender, f"{self.inst.name}: decision without a commit QC")
        if digest(d.value) != d.qc.digest:
            raise RemoteProtocolError(sender, f"{self.inst.name}: decision value does not match its QC")
        self._check_qc(sender, d.qc)
        self._values.setdefault(d.qc.digest, d.value)
        self._decide(Decision(d.value, d.qc))

    def _on_certs(self, sender: int, c: Certs, now: float) -> None:
        if c.tc is not None:
            self._check_tc(sender, c.tc)
            if c.tc.view >= self.view:
                self._adopt_tc(c.tc, now)
        if c.qc is not None:
            self._check_qc(sender, c.qc)
            self._on_qc(c.qc, now)

    # Decision -----------------------------------------------------------------------------------

    def _decide(self, decision: Decision) -> None:
        if self.decided is not None:
            return
        self.decided = decision
        self._broadcast(Decide(decision.qc, decision.value))
        if self.on_decide is not None:
            self.on_decide(decision)

    def _answer_late(self, sender: int, now: float) -> None:
        """Whoever still speaks to us after the decision gets it (at most once per timeout)."""
        assert self.decided is not None
        last = self._decide_sent.get(sender)
        if last is not None and now - last < self.base_timeout:
            return
        self._decide_sent[sender] = now
        self._out.append((sender, encode(Decide(self.decided.qc, self.decided.value))))

    def _help_behind(self, sender: int, view: int, now: float) -> None:
        """A member that still speaks of an earlier view gets the certificates that moved us on
        (at most once per timeout): their one broadcast may have been lost, and the views it
        sends timeouts for cannot gather a quorum without those who already left them."""
        if sender == self.me or sender not in self.committee.keys:
            return
        last = self._help_sent.get(sender)
        if last is not None and now - last < self.base_timeout:
            return
        tc = self._tc if self._tc is not None and self._tc.view >= view else None
        later = [qc for (phase, v), qc in self._qcs.items() if phase == PREPARE and v > view]
        qc = max(later, key=lambda q: q.view, default=None)
        if tc is None and qc is None:
            return
        self._help_sent[sender] = now
        self._out.append((sender, encode(Certs(qc, tc))))

    # Output -------------------------------------------------------------------------------------

    def _broadcast(self, msg: Proposal | Vote | Timeout | Decide | Certs) -> None:
        self._out.append((EVERYONE, encode(msg)))

    def _alert(self, kind: AlertKind, server: int, detail: str, evidence: tuple[bytes, ...]) -> None:
        if all((a.kind, a.server) != (kind, server) for a in self.alerts):
            self.alerts.append(Alert(kind, server, self.inst.period, detail, evidence))

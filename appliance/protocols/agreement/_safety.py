"""SafetyRules: the voting rules and the period key, together, persisted before every signature.

Nothing else in the agreement can produce a vote or a timeout: the engine asks, the rules
check, the new :class:`SafetyData` is saved through the :class:`SafetyStore`, and only then
is the statement signed. A restarted server therefore never signs two different votes for
one (phase, view), nor votes in a view it has timed out of, so an honest server can never
be caught equivocating (the only way its signatures could become evidence against it).

The rules (each a named method; a refusal is :class:`NotSafe` with the numbers in it):

* ``propose``: one proposal per view, by the view's leader.
* ``vote_prepare``: view v > the last prepared view and > the last timed-out view, and the
  proposal is justified: v = 0 without a TC, or a TC of view v-1 whose highest QC (if any)
  certifies this very value.
* ``vote_commit``: on a prepare QC of view v > the last commit view and > the last
  timed-out view; the QC becomes the high QC (the lock the next timeouts report).
* ``timeout``: view v >= the last timed-out view; no vote of view v is signed afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

from appliance.protocols._core import LocalProtocolError, Signer
from appliance.protocols.agreement._messages import (
    COMMIT,
    PREPARE,
    Instance,
    Proposal,
    QuorumCert,
    Timeout,
    TimeoutCert,
    Vote,
    digest,
    proposal_statement,
    timeout_statement,
    vote_statement,
)


class NotSafe(Exception):
    """A vote the rules refuse (not a peer's fault, not a bug: the engine just does not vote)."""


@dataclass(frozen=True)
class SafetyData:
    proposed_view: int = -1
    prepared_view: int = -1
    committed_view: int = -1
    timeout_view: int = -1
    high_qc: QuorumCert | None = None
    high_value: bytes | None = None


def safety_to_bytes(data: SafetyData) -> bytes:
    from appliance.crypto import encoding

    qc = data.high_qc.to_obj() if data.high_qc is not None else None
    return encoding.encode(
        {
            "proposed": data.proposed_view,
            "prepared": data.prepared_view,
            "committed": data.committed_view,
            "timeout": data.timeout_view,
            "qc": qc,
            "value": data.high_value,
        }
    )


def safety_from_bytes(raw: bytes) -> SafetyData:
    """SafetyData from our own store (DecodeError if the file is corrupt)."""
    from appliance.crypto import encoding

    f = encoding.expect_map(
        encoding.decode(raw, what="safety data"),
        {
            "proposed": int,
            "prepared": int,
            "committed": int,
            "timeout": int,
            "qc": (dict, type(None)),
            "value": (bytes, type(None)),
        },
        "safety data",
    )
    qc = QuorumCert.from_obj(f["qc"]) if f["qc"] is not None else None
    return SafetyData(f["proposed"], f["prepared"], f["committed"], f["timeout"], qc, f["value"])


class SafetyStore(Protocol):
    """Durable storage of one instance's SafetyData: ``save`` returns only once it is durable."""

    def load(self, inst: Instance) -> SafetyData | None: ...

    def save(self, inst: Instance, data: SafetyData) -> None: ...


class MemoryStore:
    """A SafetyStore in memory (the simulation keeps it across a simulated crash and restart)."""

    def __init__(self) -> None:
        self.data: dict[Instance, SafetyData] = {}

    def load(self, inst: Instance) -> SafetyData | None:
        return self.data.get(inst)

    def save(self, inst: Instance, data: SafetyData) -> None:
        self.data[inst] = data


class SafetyRules:
    """The only signer of agreement messages for ``inst``."""

    def __init__(self, inst: Instance, signer: Signer, store: SafetyStore) -> None:
        self.inst = inst
        self._signer = signer
        self._store = store
        self.data = store.load(inst) or SafetyData()

    def _save(self, data: SafetyData) -> None:
        self._store.save(self.inst, data)
        self.data = data

    def propose(self, view: int, value: bytes, justify: TimeoutCert | None) -> Proposal:
        d = self.data
        if view <= d.proposed_view:
            raise NotSafe(f"already proposed in view {d.proposed_view}, asked for view {view}")
        self._check_justified(view, digest(value), justify)
        self._save(replace(d, proposed_view=view))
        return Proposal(
            view, value, justify, self._signer.sign(proposal_statement(self.inst, view, digest(value)))
        )

    def _check_justified(self, view: int, d: bytes, justify: TimeoutCert | None) -> None:
        if justify is None:
            if view != 0:
                raise NotSafe(f"a proposal for view {view} needs a timeout certificate of view {view - 1}")
            return
        if justify.view != view - 1:
            raise NotSafe(f"proposal for view {view} justified by a TC of view {justify.view}")
        if justify.high_qc is not None and justify.high_qc.digest != d:
            raise NotSafe(
                f"view {view}: the TC's highest QC (view {justify.high_qc.view}) certifies another value"
            )

    def vote_prepare(self, proposal: Proposal) -> Vote:
        """Sign a prepare vote; the caller has verified the proposal's signature and its TC."""
        d = self.data
        v = proposal.view
        if v <= d.prepared_view:
            raise NotSafe(f"already prepared in view {d.prepared_view}, proposal is for view {v}")
        if v <= d.timeout_view:
            raise NotSafe(f"timed out of view {d.timeout_view}, proposal is for view {v}")
        self._check_justified(v, proposal.digest, proposal.justify)
        self._save(replace(d, prepared_view=v))
        sig = self._signer.sign(vote_statement(self.inst, PREPARE, v, proposal.digest))
        return Vote(PREPARE, v, proposal.digest, sig)

    def vote_commit(self, qc: QuorumCert, value: bytes) -> Vote:
        """Sign a commit vote on a verified prepare QC whose value we hold."""
        if qc.phase != PREPARE:
            raise LocalProtocolError("commit votes are made on prepare QCs")
        d = self.data
        if qc.view <= d.committed_view:
            raise NotSafe(f"already committed in view {d.committed_view}, QC is of view {qc.view}")
        if qc.view <= d.timeout_view:
            raise NotSafe(f"timed out of view {d.timeout_view}, QC is of view {qc.view}")
        high = d.high_qc
        new = replace(d, committed_view=qc.view)
        if high is None or qc.view > high.view:
            new = replace(new, high_qc=qc, high_value=value)
        self._save(new)
        return Vote(
            COMMIT,
            qc.view,
            qc.digest,
            self._signer.sign(vote_statement(self.inst, COMMIT, qc.view, qc.digest)),
        )

    def timeout(self, view: int) -> Timeout:
        d = self.data
        if view < d.timeout_view:
            raise NotSafe(f"already timed out of view {d.timeout_view}, asked for view {view}")
        if view > d.timeout_view:
            self._save(replace(d, timeout_view=view))
        qc = self.data.high_qc
        sig = self._signer.sign(
            timeout_statement(self.inst, view, qc.view if qc else -1, qc.digest if qc else b"")
        )
        return Timeout(view, qc, self.data.high_value if qc else None, sig)

"""The agreement engine: one test per safety rule, decoders that only raise DecodeError, and
seeded simulations (asynchrony, late votes, Byzantine members, crashes) in which no two
honest servers ever decide differently and all decide once the network behaves."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from appliance.crypto.errors import DecodeError
from appliance.protocols._core import Signer
from appliance.protocols.agreement import (
    PREPARE,
    BadCertificate,
    Committee,
    Instance,
    MemoryStore,
    NotSafe,
    QuorumCert,
    SafetyRules,
    TimeoutCert,
    decode,
    digest,
    encode,
)
from appliance.protocols.agreement._messages import TimeoutEntry, timeout_statement, vote_statement
from appliance.sim import agreement as sim

#: Seeds per family, run in the background while the rest of the suite runs (tests/conftest.py).
SEEDS = int(os.environ.get("PST_SIM_SEEDS", "500"))
INST = Instance("pst/test", 3, "value")
KEYS = {i: Signer(SigningKey(bytes([i]) * 32)) for i in range(1, 5)}
COMMITTEE = Committee(4, 1, {i: s.public for i, s in KEYS.items()})


def rules(i: int = 1) -> SafetyRules:
    return SafetyRules(INST, KEYS[i], MemoryStore())


def qc(view: int, value: bytes, signers: tuple[int, ...] = (1, 2, 3)) -> QuorumCert:
    d = digest(value)
    return QuorumCert(
        PREPARE, view, d, {i: KEYS[i].sign(vote_statement(INST, PREPARE, view, d)) for i in signers}
    )


def tc(view: int, high: QuorumCert | None, signers: tuple[int, ...] = (1, 2, 3)) -> TimeoutCert:
    qv, qd = (high.view, high.digest) if high else (-1, b"")
    entries = {i: TimeoutEntry(qv, qd, KEYS[i].sign(timeout_statement(INST, view, qv, qd))) for i in signers}
    return TimeoutCert(view, entries, high)


# Quorums -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "t", "q"), [(4, 1, 3), (5, 1, 4), (7, 2, 5), (10, 3, 7), (16, 5, 11)])
def test_quorum_is_ceil_of_n_plus_t_plus_one_over_two(n: int, t: int, q: int) -> None:
    c = Committee(n, t, {i: b"k" * 32 for i in range(1, n + 1)})
    assert c.quorum == q
    assert 2 * q - n >= t + 1  # two quorums share an honest server


def test_committee_refuses_n_below_3t_plus_1() -> None:
    with pytest.raises(ValueError, match="3t\\+1"):
        Committee(5, 2, {})


# Safety rules --------------------------------------------------------------------------------


def test_one_proposal_per_view() -> None:
    r = rules()
    r.propose(0, b"a", None)
    with pytest.raises(NotSafe, match="already proposed"):
        r.propose(0, b"b", None)


def test_a_later_view_needs_a_timeout_certificate() -> None:
    with pytest.raises(NotSafe, match="needs a timeout certificate"):
        rules().propose(1, b"a", None)


def test_one_prepare_vote_per_view() -> None:
    leader = rules(1)
    r = rules(2)
    r.vote_prepare(leader.propose(0, b"a", None))
    other = rules(1)
    with pytest.raises(NotSafe, match="already prepared in view 0"):
        r.vote_prepare(other.propose(0, b"b", None))


def test_no_vote_in_a_view_after_timing_out_of_it() -> None:
    r = rules(2)
    r.timeout(0)
    with pytest.raises(NotSafe, match="timed out of view 0"):
        r.vote_prepare(rules(1).propose(0, b"a", None))
    with pytest.raises(NotSafe, match="timed out of view 0"):
        r.vote_commit(qc(0, b"a"), b"a")


def test_a_proposal_must_carry_the_value_of_the_tcs_highest_qc() -> None:
    locked = qc(0, b"a")
    cert = tc(0, locked)
    with pytest.raises(NotSafe, match="certifies another value"):
        rules(1).propose(1, b"b", cert)
    with pytest.raises(NotSafe, match="certifies another value"):
        from appliance.protocols.agreement._messages import Proposal

        rules(2).vote_prepare(Proposal(1, b"b", cert, b"\0" * 64))
    rules(2).vote_prepare(rules(1).propose(1, b"a", cert))


def test_a_tc_of_an_earlier_view_does_not_justify() -> None:
    with pytest.raises(NotSafe, match="justified by a TC of view 0"):
        rules(1).propose(2, b"a", tc(0, None))


def test_commit_vote_sets_the_lock_that_timeouts_report() -> None:
    r = rules(2)
    r.vote_commit(qc(0, b"a"), b"a")
    t = r.timeout(0)
    assert t.high_qc is not None and t.high_qc.digest == digest(b"a") and t.value == b"a"
    with pytest.raises(NotSafe, match="already committed in view 0"):
        r.vote_commit(qc(0, b"a"), b"a")


def test_safety_data_is_saved_before_the_vote_is_returned() -> None:
    store = MemoryStore()
    r = SafetyRules(INST, KEYS[2], store)
    r.vote_prepare(rules(1).propose(0, b"a", None))
    again = SafetyRules(INST, KEYS[2], store)  # a restart
    with pytest.raises(NotSafe, match="already prepared"):
        again.vote_prepare(rules(1).propose(0, b"b", None))


# Certificates -------------------------------------------------------------------------------


def test_qc_needs_a_quorum_of_valid_member_signatures() -> None:
    COMMITTEE.verify_qc(INST, qc(0, b"a"))
    with pytest.raises(BadCertificate, match="need 3"):
        COMMITTEE.verify_qc(INST, qc(0, b"a", (1, 2)))
    bad = qc(0, b"a")
    forged = QuorumCert(PREPARE, 0, bad.digest, {**bad.sigs, 3: bad.sigs[1]})
    with pytest.raises(BadCertificate, match="only 2 valid"):
        COMMITTEE.verify_qc(INST, forged)
    other = Instance("pst/test", 4, "value")  # another period
    with pytest.raises(BadCertificate):
        COMMITTEE.verify_qc(other, qc(0, b"a"))


def test_a_certificate_naming_members_whose_keys_we_lack_accuses_nobody() -> None:
    """A server that missed some members' keys cannot judge a certificate they signed: it says so
    (UncheckableCertificate, not the sender's fault) and drops the message; one whose checkable
    signatures are forged, or too few whatever the missing keys, is still the sender's fault."""
    from appliance.protocols.agreement import ACCEPT, Engine, UncheckableCertificate
    from appliance.protocols.agreement._messages import Certs

    partial = Committee(4, 1, {i: KEYS[i].public for i in (1, 2, 3)})  # server 4's key missed
    cert = qc(0, b"a", (1, 2, 4))
    with pytest.raises(UncheckableCertificate, match=r"lacks the keys of servers \[4\]"):
        partial.verify_qc(INST, cert)
    forged = QuorumCert(PREPARE, 0, cert.digest, {**cert.sigs, 2: cert.sigs[1]})
    with pytest.raises(BadCertificate, match="only 1 valid") as bad:
        partial.verify_qc(INST, forged)
    assert not isinstance(bad.value, UncheckableCertificate)
    with pytest.raises(BadCertificate, match="has 1 member signatures") as few:
        partial.verify_qc(INST, qc(0, b"a", (1, 4)))
    assert not isinstance(few.value, UncheckableCertificate)
    with pytest.raises(UncheckableCertificate):
        partial.verify_tc(INST, tc(0, None, (1, 3, 4)))

    class App:
        def propose(self) -> bytes | None:
            return None

        def validate(self, value: bytes, view: int) -> Any:
            return ACCEPT

    engine = Engine(me=3, inst=INST, committee=partial, safety=rules(3), app=App(), base_timeout=1.0, now=0.0)
    engine.receive(1, encode(Certs(None, tc(0, None, (1, 2, 4)))), 0.0)
    assert engine.rejected == [] and engine.view == 0
    assert len(engine.unchecked) == 1 and "from server 1" in engine.unchecked[0]
    engine.receive(2, encode(Certs(None, tc(0, None, (1, 2, 3)))), 0.1)  # one it can check
    assert engine.view == 1 and engine.rejected == []


def test_tc_must_carry_the_highest_reported_qc() -> None:
    COMMITTEE.verify_tc(INST, tc(1, qc(0, b"a")))
    hidden = tc(1, qc(0, b"a"))
    with pytest.raises(BadCertificate, match="highest reported QC"):
        COMMITTEE.verify_tc(INST, TimeoutCert(1, hidden.entries, None))


# Decoding -----------------------------------------------------------------------------------


def test_messages_round_trip() -> None:
    r = rules(1)
    p = r.propose(1, b"a", tc(0, qc(0, b"a")))
    assert decode(encode(p)) == p


plain = st.recursive(
    st.none() | st.booleans() | st.integers() | st.binary(max_size=80) | st.text(max_size=10),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=6),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(plain)
def test_decode_raises_only_decode_error(obj: object) -> None:
    with contextlib.suppress(DecodeError):
        decode(obj)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["propose", "vote", "timeout", "decide", "certs"]),
    st.dictionaries(st.text(max_size=6), plain),
)
def test_decode_of_near_messages_raises_only_decode_error(kind: str, fields: dict[str, object]) -> None:
    with contextlib.suppress(DecodeError):
        decode({"k": kind, **fields})


# Simulation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family",
    [pytest.param(f, marks=pytest.mark.seeds("agreement", f, SEEDS), id=f) for f in sorted(sim.FAMILIES)],
)
def test_agreement_family_over_many_seeds(family: str, seed_failures: list[str]) -> None:
    assert not seed_failures, f"{len(seed_failures)} of {SEEDS} seeds failed; first: " + "; ".join(
        seed_failures[:3]
    )


def test_an_honest_server_that_forgets_its_lock_breaks_agreement() -> None:
    """The late-votes family can fail: without the lock in timeouts, two values get decided."""
    import dataclasses

    from appliance.protocols.agreement import _safety

    original = _safety.SafetyRules.timeout

    def forgetful(self: _safety.SafetyRules, view: int):  # type: ignore[no-untyped-def]
        self.data = dataclasses.replace(self.data, high_qc=None, high_value=None)
        return original(self, view)

    _safety.SafetyRules.timeout = forgetful  # type: ignore[method-assign]
    try:
        failures = [r for s in range(60) if (r := sim.run_seed(("agree-late-votes", s)))]
    finally:
        _safety.SafetyRules.timeout = original  # type: ignore[method-assign]
    assert any("two different decisions" in f for f in failures)


def test_a_forged_tc_for_a_view_whose_real_tc_is_known_is_still_refused() -> None:
    """Review finding: TCs were remembered as verified by view alone, so a Byzantine leader could
    carry a forged TC(v) without the lock and have another value decided."""
    from appliance.protocols.agreement import Engine
    from appliance.protocols.agreement._messages import Certs, Proposal, TimeoutEntry, proposal_statement

    class App:
        def propose(self) -> bytes | None:
            return None

        def validate(self, value: bytes, view: int) -> Any:
            from appliance.protocols.agreement import ACCEPT

            return ACCEPT

    engine = Engine(
        me=3, inst=INST, committee=COMMITTEE, safety=rules(3), app=App(), base_timeout=1.0, now=0.0
    )
    locked = qc(0, b"a")
    engine.receive(1, encode(Certs(None, tc(0, locked))), 0.0)  # the real TC(0), carrying the lock
    assert engine.view == 1
    forged = TimeoutCert(0, {i: TimeoutEntry(-1, b"", b"\0" * 64) for i in (1, 2, 4)}, None)
    leader = COMMITTEE.leader(1)
    p = Proposal(1, b"b", forged, KEYS[leader].sign(proposal_statement(INST, 1, digest(b"b"))))
    engine.receive(leader, encode(p), 0.1)
    out = engine.tick(0.1)
    assert not any(m.get("k") == "vote" for _to, m in out)
    assert any("TC of view 0" in str(r) for r in engine.rejected)

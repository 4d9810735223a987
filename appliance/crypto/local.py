"""Run the crypto core's multi-party protocols among n parties in one process.

For the demo, the benchmarks and the tests: every party is honest unless a
``tamper`` hook changes what it sends. Real servers run the same functions through
the sans-IO protocols of :mod:`appliance.protocols`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey

from appliance.crypto import dkg, pss
from appliance.crypto.groups import ED25519, Group
from appliance.crypto.keyshare import KeyShare
from appliance.crypto.secret import ScalarSource
from appliance.crypto.vss import Complaint, ShareMessage

E = TypeVar("E")

SIGNING_CONTEXT = "pst/local"


class PeriodKeys:
    """Ed25519 period signing keys of parties 1..n (seeded for reproducibility)."""

    def __init__(self, n: int, seed: bytes) -> None:
        import hashlib

        self.keys = {
            i: SigningKey(hashlib.sha256(b"pst/local/period-key" + seed + i.to_bytes(4, "big")).digest())
            for i in range(1, n + 1)
        }

    def sign(self, party: int, payload: bytes) -> bytes:
        return bytes(self.keys[party].sign(payload).signature)

    def verify(self, party: int, payload: bytes, signature: bytes) -> bool:
        key = self.keys.get(party)
        if key is None:
            return False
        try:
            key.verify_key.verify(payload, signature)
        except BadSignatureError:
            return False
        return True


ShareTamper = Callable[[int, int, int], int]
"""tamper(dealer, recipient, share) -> share actually sent."""


@dataclass
class DkgResult(Generic[E]):
    keys: dict[int, KeyShare[E]]
    qualification: dkg.Qualification


def run_dkg(
    group: Group[E],
    n: int,
    t: int,
    rand: ScalarSource,
    *,
    context: bytes = b"pst/local/dkg",
    period: int = 0,
    period_keys: PeriodKeys | None = None,
    tamper: ShareTamper | None = None,
    silent: frozenset[int] = frozenset(),
) -> DkgResult[E]:
    """A full DKG among parties 1..n; ``tamper`` corrupts shares, ``silent`` parties deal nothing."""
    pk = period_keys or PeriodKeys(n, b"local")
    session = context
    dealings: dict[int, dkg.Dealing[E]] = {}
    inbox: dict[int, dict[int, tuple[int, bytes]]] = {j: {} for j in range(1, n + 1)}
    for d in range(1, n + 1):
        if d in silent:
            continue
        dealing, shares = dkg.deal(group, context, d, n, t, rand)
        dealings[d] = dealing
        for j, s in shares.items():
            sent = tamper(d, j, s) if tamper else s
            msg = ShareMessage(session, d, j, (sent,))
            inbox[j][d] = (sent, pk.sign(d, msg.payload(SIGNING_CONTEXT, period)))
    complaints: list[Complaint] = []
    for j in range(1, n + 1):
        if j in silent:
            continue
        received = {d: inbox[j][d][0] for d in dealings}
        for d in dkg.bad_dealers(group, dealings, j, received):
            share, sig = inbox[j][d]
            complaints.append(Complaint(j, ShareMessage(session, d, j, (share,)), sig))
    qualification = dkg.qualify(
        group,
        context,
        n,
        t,
        dealings,
        complaints,
        [],
        [],
        pk.verify,
        signing_context=SIGNING_CONTEXT,
        period=period,
    )
    keys = {}
    for j in range(1, n + 1):
        if j in silent or j in qualification.cheaters:
            continue
        shares_j = {d: inbox[j][d][0] for d in qualification.qual}
        keys[j] = dkg.finish(group, n, t, j, qualification, dealings, shares_j)
    return DkgResult(keys, qualification)


def run_refresh(
    group: Group[E], keys: Mapping[int, KeyShare[E]], rand: ScalarSource
) -> dict[int, KeyShare[E]]:
    """Refresh every share of ``keys`` (all parties honest); old shares are wiped."""
    any_key = next(iter(keys.values()))
    n, t = any_key.n, any_key.t
    dealings: dict[int, pss.ZeroDealing[E]] = {}
    subshares: dict[int, dict[int, int]] = {i: {} for i in keys}
    for d in sorted(keys):
        dealing, shares = pss.refresh_deal(group, d, n, t, rand)
        dealings[d] = dealing
        for i in keys:
            subshares[i][d] = shares[i]
    new = {i: pss.refresh_share(group, keys[i], dealings, subshares[i]) for i in sorted(keys)}
    for k in keys.values():
        k.wipe()
    return new


def run_recovery(
    group: Group[E], keys: Mapping[int, KeyShare[E]], lost: int, rand: ScalarSource
) -> pss.Recovered[E]:
    """Rebuild server ``lost``'s share from the others (``keys`` must not contain it)."""
    helpers = sorted(i for i in keys if i != lost)
    any_key = keys[helpers[0]]
    dealings: dict[int, pss.RecoveryDealing[E]] = {}
    subshares: dict[int, dict[int, int]] = {i: {} for i in helpers}
    for d in helpers:
        dealing, shares = pss.recovery_deal(group, d, lost, helpers, any_key.t, rand)
        dealings[d] = dealing
        for i in helpers:
            subshares[i][d] = shares[i]
    contributions = {i: pss.recovery_contribution(group, keys[i], dealings, subshares[i]) for i in helpers}
    return pss.recover_share(group, any_key.public, lost, dealings, contributions)


def frost_sign(
    keys: Mapping[int, KeyShare[bytes]],
    signers: list[int],
    message: bytes,
    random_bytes: Callable[[int], bytes],
) -> bytes:
    """A FROST(Ed25519) signature by ``signers`` with their DKG shares; cheaters raise CheatingError."""
    from appliance.crypto import frost

    any_key = keys[signers[0]]
    min_signers = any_key.t + 1
    packages = {i: frost.KeyPackage(i, keys[i].share.value, any_key.public_key, min_signers) for i in signers}
    public = frost.PublicKeyPackage(
        any_key.public_key,
        {i: any_key.public.verification_share(ED25519, i) for i in signers},
        min_signers,
    )
    nonces = {i: frost.commit(packages[i], random_bytes(64)) for i in signers}
    commitments = [nonces[i].commitment for i in signers]
    shares = [frost.sign(packages[i], nonces[i], message, commitments) for i in signers]
    return frost.aggregate_and_identify(public, commitments, message, shares)

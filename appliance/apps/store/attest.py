"""Signed digests of the store's state: each server's attestation at every period mark.

Theory of operation
-------------------
The store's state is a function of its agreed sequence (:mod:`.service`), and every server
that applied the same operations has the same digest (:meth:`.service.StoreService.digest`).
A server whose copy was changed on disk, or rebuilt wrongly after it was wiped, has another
one; comparing with what the others *report* (the status page) proves nothing. So the digest
is signed, in the sequence itself:

* At each **period mark** (:class:`.service.PeriodMark`, the period's KeyTable the group key
  signed), every server that applied it computes its digest after the mark (count ``k``:
  the operations applied then) and puts an :class:`Attestation` in the sequence: ``{k, digest,
  period, server}`` signed with its **channel key of that period** (the TLS key whose
  certificate its period key issued: ``appliance.net._tls``), with that certificate.
* Every server applying an attestation checks it against the mark's KeyTable (the group key
  signed it, so the period keys are the network's): a signature of another period, of a
  count that is not the latest mark's, or a second one of the same server is refused alike
  everywhere (``stale-version``, ``exists``, ``not-permitted``). Attestations change no
  record and are not in the digest.
* Each server compares a valid attestation with **its own** digest at ``k`` (kept from when
  it applied the mark; a snapshot does not keep it, a restart recomputes it if the snapshot
  is of count ``k``, else that mark verifies nothing there). t+1 signers that agree with
  it: its copy is **verified** at ``k`` (one of them is honest). t+1 signers of one *other*
  digest: its copy is **damaged** (an honest server has that other digest):
  :attr:`Verifier.damaged` says so, and the node stops serving and raises an alert. One
  signer that disagrees with a verified digest is named (it is faulty or its copy is damaged).

So a wiped server that rebuilds its store from the sequence (the replica's catch-up, then the
operations applied again) checks what it rebuilt at every mark it applies against the digest
t+1 servers signed when they applied it, and a restarted one checks its snapshot and journal
the same way at the next mark. t+1 signatures of individual channel keys stand for a
threshold signature of t+1 shares: the same trust (one honest signer), checked with the group
key only, and no signing protocol to run.
"""

from __future__ import annotations

import dataclasses
import hmac
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from appliance.apps.store.model import EXISTS, NOT_PERMITTED, STALE, Refused
from appliance.crypto import encoding
from appliance.crypto.errors import DecodeError
from appliance.protocols.state import KeyTable

DIGEST_DOMAIN: Final = "pst/store/digest/v1"
DIGEST_SIZE: Final = 32
MAX_CERT: Final = 4096


def attestation_payload(count: int, digest: bytes, period: int, server: int) -> bytes:
    """What a server signs: its store digest after ``count`` operations, at the mark of ``period``."""
    return encoding.encode(
        {"dom": DIGEST_DOMAIN, "count": count, "digest": digest, "period": period, "server": server}
    )


@dataclass(frozen=True)
class Attestation:
    """Server ``server``'s signed store digest after ``count`` operations (a period mark's)."""

    count: int
    digest: bytes
    period: int
    server: int
    cert: bytes
    sig: bytes

    def encode(self) -> bytes:
        return encoding.encode({"op": "attest", **dataclasses.asdict(self)})

    @classmethod
    def from_obj(cls, obj: Any) -> Attestation:
        what = "store digest attestation"
        f = encoding.expect_map(obj, {"op": str, **_FIELDS}, what)
        if f.pop("op") != "attest" or f["count"] < 1 or f["period"] < 0 or not 1 <= f["server"] <= 1024:
            raise DecodeError(f"{what}: bad kind, count, period or server")
        if len(f["digest"]) != DIGEST_SIZE or len(f["sig"]) != 64 or not 0 < len(f["cert"]) <= MAX_CERT:
            raise DecodeError(f"{what}: bad digest, signature or certificate")
        return cls(**f)


_FIELDS: Final[dict[str, type]] = {
    "count": int,
    "digest": bytes,
    "period": int,
    "server": int,
    "cert": bytes,
    "sig": bytes,
}


@dataclass(frozen=True)
class Attested:
    """The outcome of an attestation taken: whether it agrees with this server's own digest
    (None: this server does not know its digest at that count, restarted from a snapshot
    taken after the mark)."""

    server: int
    count: int
    agrees: bool | None


@dataclass
class Verifier:
    """What a server knows of the signed digests of its store (module docstring).

    ``mark``: the latest period mark's count (operations applied with it), KeyTable and this
    server's digest then (empty if not known); ``signers``: digest -> servers that signed it
    at that count."""

    t: int
    mark_count: int = 0
    mark_table: KeyTable | None = None
    mark_digest: bytes = b""
    signers: dict[bytes, set[int]] = field(default_factory=dict)
    #: The latest count at which t+1 signers agreed with our digest.
    verified: int = 0
    #: Why our copy is damaged (t+1 signers of another digest), or None.
    damaged: str | None = None
    #: Servers that signed a digest other than ours once ours was verified (faulty or damaged).
    dissenters: list[tuple[int, int]] = field(default_factory=list)

    def marked(self, count: int, table: KeyTable, digest: bytes) -> None:
        """A period mark was applied: operations ``count``, its ``table``, our ``digest`` then."""
        self.mark_count, self.mark_table, self.mark_digest = count, table, digest
        self.signers = {}

    def check(self, a: Attestation) -> None:
        """Refused alike at every server (it reads only the sequence), or nothing."""
        from appliance.net._tls import PeerCertificateError, check_channel_signature

        where = f"server {a.server}'s store digest after {a.count} operations"
        table = self.mark_table
        if table is None or a.count != self.mark_count:
            raise Refused(STALE, f"{where}: not the latest period mark's count ({self.mark_count})")
        if a.period != table.period:
            raise Refused(
                NOT_PERMITTED, f"{where}: signed in period {a.period}, the mark's is {table.period}"
            )
        if any(a.server in s for s in self.signers.values()):
            raise Refused(EXISTS, f"{where}: signed already")
        keys = {i: e.verify_key for i, e in table.entries.items()}
        payload = attestation_payload(a.count, a.digest, a.period, a.server)
        try:
            check_channel_signature(a.cert, a.server, a.period, keys, payload, a.sig)
        except (PeerCertificateError, ValueError) as exc:
            raise Refused(NOT_PERMITTED, f"{where}: {exc}") from None

    def take(self, a: Attestation) -> Attested:
        """Count a checked attestation (:meth:`check` passed) against our own digest."""
        signers = self.signers.setdefault(a.digest, set())
        signers.add(a.server)
        if not self.mark_digest:
            return Attested(a.server, a.count, None)
        agrees = hmac.compare_digest(a.digest, self.mark_digest)
        if agrees and len(signers) >= self.t + 1:
            self.verified = max(self.verified, a.count)
        elif not agrees:
            if len(signers) >= self.t + 1 and self.damaged is None:
                self.damaged = (
                    f"servers {', '.join(str(i) for i in sorted(signers))} signed another store digest after "
                    f"{a.count} operations ({a.digest.hex()[:16]}...) than this server's "
                    f"({self.mark_digest.hex()[:16]}...): this copy of the store is damaged"
                )
            if self.verified >= a.count:
                self.dissenters.append((a.server, a.count))
        return Attested(a.server, a.count, agrees)

    # Snapshot -------------------------------------------------------------------------------

    def to_obj(self) -> dict[str, Any] | None:
        """The mark and its signers, for a snapshot: not our digest then (a snapshot changed on
        disk could carry any; :meth:`restore` recomputes it when it can)."""
        if self.mark_table is None:
            return None
        signers = {d: sorted(servers) for d, servers in sorted(self.signers.items())}
        return {"count": self.mark_count, "table": self.mark_table.encode(), "signers": signers}

    def restore(self, obj: Any, what: str, applied: int, digest: Callable[[], bytes]) -> None:
        """The mark from a snapshot of ``applied`` operations: our digest at the mark is
        ``digest()`` (the state's) if the snapshot was taken right at it, else unknown (this
        mark verifies nothing here; the next one does)."""
        what = f"{what}: mark"
        f = encoding.expect_map(obj, {"count": int, "table": bytes, "signers": dict}, what)
        if not 1 <= f["count"] <= applied:
            raise DecodeError(f"{what}: bad count")
        signers: dict[bytes, set[int]] = {}
        for d, servers in f["signers"].items():
            if not isinstance(d, bytes) or len(d) != DIGEST_SIZE or not isinstance(servers, list):
                raise DecodeError(f"{what}: bad signers")
            if not all(isinstance(i, int) and not isinstance(i, bool) and 1 <= i <= 1024 for i in servers):
                raise DecodeError(f"{what}: bad signer")
            signers[d] = set(servers)
        self.marked(f["count"], KeyTable.decode(f["table"]), digest() if f["count"] == applied else b"")
        self.signers = signers

"""Requests of distributed applications: serviced only with a strict majority of the servers' clients.

Theory of operation
-------------------
Paper §5.1, password-based option. A distributed application named ``app`` runs one client
next to each PServer; every client registers at its own server with the same
``(app, password)`` and the server keeps only the *verifier* ``v`` (scrypt of the password,
salted with the name: :func:`appliance.api._distributed.password_verifier`). The node tells
this service which applications have a client here and their verifiers (``clients``, a
lookup that the node keeps current).
A request of the application is serviced only if a strict majority of the n servers'
clients initiated or approved it.

Naming. For a request to run protocol ``op`` on ``payload`` (``"sign"``: the group key signs
M once a majority agreed; ``"store"``: the data storage API's quorum requests, whose outcome is
the certificate itself, :func:`store_certificate`, carrying the period's signed KeyTable so that
any server checks it alike in any period: ``appliance.apps.store.model.check_quorum``):

* ``M`` = :func:`distributed_payload` ``(app, op, payload)`` (for ``sign``,
  :func:`distributed_sign_payload` ``(app, payload)``: what the group key signs);
  its domain ``pst/app-distributed/v1`` differs from centralized signing
  (``pst/app-signed/v1``) and from the protocols' own payloads (``pst/signed/v1``);
* ``ticket = HMAC-SHA256(v, {period, SHA-256(M)})``: the paper's "hash(pswd)" sent to all
  servers, but bound to this request and period, so it is worthless for any other request
  (it still lets its holder test password guesses offline, as the verifier does);
* ``rid = SHA-256(SHA-256(M) || ticket)``: the request's id. Clients with the same name,
  password and payload produce the same ``rid``: independent initiations merge, while a
  client with another password produces another ``rid`` and never adds to this one.

A *vote* of server j on ``rid`` is j's period-key signature over ``{from: j, rid}``
(bound to this service and the period): transferable evidence that j's client initiated or
approved the request. Messages (in :func:`~appliance.protocols.services.seal` envelopes
signed with the period keys of the KeyTable):

==========  =================================================  ===========================
kind        body                                               sent
==========  =================================================  ===========================
``ask``     app, op, payload, ticket, the origin's own vote     origin -> everyone
``vote``    rid, vote                                          approver -> everyone
``refuse``  rid, reason (password, no-client, denied, busy)    refuser -> the origin(s)
``cert``    SHA-256(M), ticket, votes {server: vote}           origin -> everyone
==========  =================================================  ===========================

At server j an ``ask`` is checked against j's own client: no client of ``app`` here, or a
ticket that is not ``HMAC(v_j, ...)`` (another password) is refused at once, with the
reason, so that the origin can tell its client *which* server refused and why. Otherwise
the request waits in :meth:`ApprovalService.pending` until j's client approves or denies
it (or it expires); if j's client itself requests the same thing, that counts as its
approval. The origin, once it holds votes of more than n/2 servers, sends the certificate
to everyone and reports the request in ``done`` (the node then has the group key sign
``M``); it reports ``failed`` with every server's reason as soon as a majority has become
impossible, or at its deadline.

The majority is enforced by the *signers*, not only by the origin: :meth:`ApprovalService.screen`
sits in front of the signing service and holds back any signing request whose message
contains the distributed domain until a certificate for exactly that message (> n/2 valid
votes) has arrived, for at most :data:`HOLD` seconds; then it refuses it and raises an
alert naming the coordinator. FROST needs t+1 signers and at most t servers are faulty,
so at least one honest signer checks every signature of a distributed application.

What it gives: no signature under ``M`` unless more than n/2 servers vouched for their
clients; with at most t < n/2 faulty servers at least one of those is honest, and its
client knew the password and asked or approved. Faulty servers can vouch for clients that
never asked, so the paper's "majority of clients" holds exactly only when no server is
faulty. Replays: an envelope of another period is rejected; a repeated ``ask``, ``vote``
or ``cert`` in the same period adds nothing (everything is keyed by ``rid`` and voter).
A server cannot forge another server's vote (period-key signature), and a certificate with
one bad vote is rejected whole, naming the server that relayed it. What it does not give:
the password is the weak point the paper names (whoever learns it can run a client at
every server at once), and whoever breaks into a server learns the verifier and can guess
the password offline, at scrypt's cost per guess.

This module is sans-IO; it never imports trio.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from appliance.crypto import encoding
from appliance.crypto.errors import DecodeError
from appliance.protocols._core import (
    EVERYONE,
    Alert,
    AlertKind,
    Outgoing,
    RemoteProtocolError,
    Signer,
    ed25519_verify,
)
from appliance.protocols.services import open_envelope, seal
from appliance.protocols.signing import SERVICE as SIGNING_SERVICE
from appliance.protocols.state import KeyTable

APPROVALS: Final = "approvals"
#: Domain of the group key's signatures for distributed applications.
DISTRIBUTED_DOMAIN: Final = "pst/app-distributed/v1"
_DOMAIN_BYTES: Final = DISTRIBUTED_DOMAIN.encode()
#: ``sign``: the group key signs M once a majority agreed; ``store``: the certificate itself is
#: the outcome (the data storage API's quorum requests, :mod:`appliance.apps.store.model`).
PROTOCOLS: Final = frozenset({"sign", "store"})
MAX_APP_LENGTH: Final = 128
MAX_PAYLOAD: Final = 64 * 1024
VERIFIER_SIZE: Final = 32
DIGEST_SIZE: Final = 32
VOTE_SIZE: Final = 64
#: How long a request waits at a server for its client's decision.
PENDING_TTL: Final = 60.0
#: Open requests one origin may have waiting at a server (more are refused as "busy").
MAX_ASKS_PER_SERVER: Final = 64
#: Request ids for which votes are kept (per voter) before an ask or certificate explains them.
MAX_STRAY_VOTES: Final = 256
#: How long a signing request for a distributed payload waits for its certificate.
HOLD: Final = 1.0
MAX_HELD: Final = 256

REASONS: Final[Mapping[str, str]] = {
    "password": "its client registered this application with another password",
    "no-client": "no client of this application is registered there",
    "denied": "its client denied the request",
    "busy": "too many requests are waiting there",
}


class ApprovalRefused(Exception):
    """A request did not reach a majority; the message names the servers and reasons (no secret)."""


class UnknownRequest(Exception):
    """A client named a request that is not waiting for it (unknown, expired, or decided)."""


def distributed_sign_payload(app: str, payload: bytes) -> bytes:
    """The bytes the group key signs for distributed application ``app`` over ``payload``.

    ``{"dom": "pst/app-distributed/v1", "app": app, "op": "sign", "sha512": SHA-512(payload)}``
    in canonical CBOR; a verifier rebuilds it and checks the Ed25519 signature with the
    group public key.
    """
    return distributed_payload(app, "sign", payload)


def distributed_payload(app: str, op: str, payload: bytes) -> bytes:
    """M for protocol ``op`` (see :data:`PROTOCOLS`): the request the clients approve; its
    SHA-256 is the certificate's ``digest``."""
    return encoding.encode(
        {"dom": DISTRIBUTED_DOMAIN, "app": app, "op": op, "sha512": hashlib.sha512(payload).digest()}
    )


def ticket(verifier: bytes, period: int, digest: bytes) -> bytes:
    """HMAC-SHA256 under the verifier of one request (``digest`` = SHA-256(M)) in one period."""
    data = encoding.encode({"dom": "pst/approvals/ticket/v1", "period": period, "digest": digest})
    return hmac.new(verifier, data, hashlib.sha256).digest()


def request_id(digest: bytes, ticket_: bytes) -> bytes:
    return hashlib.sha256(b"pst/approvals/rid/v1\x00" + digest + ticket_).digest()


def vote_payload(period: int, voter: int, rid: bytes) -> bytes:
    return encoding.signing_payload("approval-vote", 1, "pst/approvals", period, {"from": voter, "rid": rid})


def store_certificate(
    app: str, table: KeyTable, digest: bytes, ticket_: bytes, votes: Mapping[int, bytes]
) -> dict[str, Any]:
    """A ``store`` request's certificate, self-contained: the period's KeyTable signed by the
    group key travels with the votes, so any server checks it the same way in any period
    (``appliance.apps.store.model.Quorum``)."""
    return {
        "app": app,
        "period": table.period,
        "digest": digest,
        "ticket": ticket_,
        "votes": dict(votes),
        "table": table.encode(),
    }


@dataclass(frozen=True)
class PendingRequest:
    """A request of another server's client waiting for this server's client."""

    request_id: bytes
    app: str
    protocol: str
    payload: bytes
    servers: tuple[int, ...]
    expires: float


@dataclass
class _Ask:
    app: str
    op: str
    payload: bytes
    digest: bytes
    ticket: bytes
    expires: float
    origins: set[int] = field(default_factory=set)
    #: What this server did: "pending" (asking its client), "voted", or a refusal reason.
    state: str = "pending"


@dataclass
class _Request:
    rid: bytes
    message: bytes
    digest: bytes
    ticket: bytes
    deadline: float
    refusals: dict[int, str] = field(default_factory=dict)
    app: str = ""
    protocol: str = "sign"


@dataclass
class _Held:
    sender: int
    obj: dict[str, Any]
    digest: bytes
    until: float


class ApprovalService:
    """Server ``me``'s part of the majority rule for one period (see the module docstring)."""

    def __init__(
        self,
        *,
        me: int,
        n: int,
        table: KeyTable,
        signer: Signer,
        clients: Callable[[str], bytes | None],
        forward: Callable[[int, dict[str, Any], float], None],
    ) -> None:
        self.me, self.n, self.table, self.signer = me, n, table, signer
        self.period = table.period
        #: app -> verifier of this server's client (None: no client here), from the node.
        self.clients = clients
        #: Where signing-service envelopes go once screened (the signing service's ``receive``).
        self.forward = forward
        self._votes: dict[bytes, dict[int, bytes]] = {}
        #: Request ids each voter voted on before any ask or certificate explained them.
        self._stray: dict[int, set[bytes]] = {}
        self._asks: dict[bytes, _Ask] = {}
        self._requests: dict[int, _Request] = {}
        self._next = 1
        self._held: list[_Held] = []
        #: SHA-256 of every message a valid certificate allows the group key to sign.
        self.authorized: set[bytes] = set()
        self.done: dict[int, bytes] = {}
        #: For a ``store`` request in ``done``: its certificate (:func:`store_certificate`).
        self.certificates: dict[int, dict[str, Any]] = {}
        self.failed: dict[int, str] = {}
        self.alerts: list[Alert] = []
        self.rejected: list[RemoteProtocolError] = []
        self._out: list[Outgoing] = []

    @property
    def majority(self) -> int:
        return self.n // 2 + 1

    def _send(self, to: int, kind: str, body: Any) -> None:
        self._out.append(Outgoing(to, seal(APPROVALS, kind, self.period, self.me, body, self.signer)))

    def _vote(self, rid: bytes) -> bytes:
        votes = self._votes.setdefault(rid, {})
        if self.me not in votes:
            votes[self.me] = self.signer.sign(vote_payload(self.period, self.me, rid))
        return votes[self.me]

    def _valid_vote(self, voter: int, rid: bytes, sig: bytes) -> bool:
        entry = self.table.entries.get(voter)
        return entry is not None and ed25519_verify(
            entry.verify_key, vote_payload(self.period, voter, rid), sig
        )

    def _record_vote(self, voter: int, rid: bytes, sig: bytes) -> None:
        if rid not in self._asks:
            stray = self._stray.setdefault(voter, set())
            if rid not in stray and len(stray) >= MAX_STRAY_VOTES:
                raise RemoteProtocolError(voter, "too many votes on requests nobody asked for")
            stray.add(rid)
        self._votes.setdefault(rid, {}).setdefault(voter, sig)

    def _explained(self, rid: bytes) -> None:
        for stray in self._stray.values():
            stray.discard(rid)

    # The client's side ---------------------------------------------------------------------------

    def request(
        self, app: str, verifier: bytes, protocol: str, payload: bytes, now: float, timeout: float
    ) -> int:
        """Our client asks to run ``protocol`` on ``payload``; the outcome appears in ``done``/``failed``.

        ``done[id]`` is the message the group key may now sign (M); the certificate that
        lets the other servers sign it has been queued before.
        """
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol {protocol!r} is not one of {sorted(PROTOCOLS)}")
        if len(payload) > MAX_PAYLOAD:
            raise ValueError(f"payload of {len(payload)} bytes is larger than {MAX_PAYLOAD}")
        if len(verifier) != VERIFIER_SIZE:
            raise ValueError("verifier must be 32 bytes")
        message = distributed_payload(app, protocol, payload)
        digest = hashlib.sha256(message).digest()
        tk = ticket(verifier, self.period, digest)
        rid = request_id(digest, tk)
        ask = self._asks.get(rid)
        if ask is None:
            ask = self._asks[rid] = _Ask(app, protocol, payload, digest, tk, now + max(timeout, PENDING_TTL))
            self._explained(rid)
        ask.origins.add(self.me)
        ask.state = "voted"  # our client asking is our client approving
        vote = self._vote(rid)
        body = {"app": app, "op": protocol, "payload": payload, "ticket": tk, "vote": vote}
        self._send(EVERYONE, "ask", body)
        lid = self._next
        self._next += 1
        self._requests[lid] = _Request(rid, message, digest, tk, now + timeout, app=app, protocol=protocol)
        return lid

    def pending(self, app: str, verifier: bytes, now: float) -> list[PendingRequest]:
        """Requests of other servers' clients waiting for our client (registered as ``app``)."""
        out = []
        for rid, ask in self._asks.items():
            if ask.app != app or ask.state != "pending" or now >= ask.expires:
                continue
            if not hmac.compare_digest(ticket(verifier, self.period, ask.digest), ask.ticket):
                continue
            out.append(
                PendingRequest(rid, ask.app, ask.op, ask.payload, tuple(sorted(ask.origins)), ask.expires)
            )
        return sorted(out, key=lambda p: p.expires)

    def _waiting(self, app: str, verifier: bytes, rid: bytes, now: float) -> _Ask:
        ask = self._asks.get(rid)
        if ask is None or ask.app != app or now >= ask.expires:
            raise UnknownRequest("no request with this id is waiting for this application (expired?)")
        if ask.state != "pending":
            raise UnknownRequest("this request was already decided here")
        if not hmac.compare_digest(ticket(verifier, self.period, ask.digest), ask.ticket):
            raise UnknownRequest("this request was made with another password than this client's")
        return ask

    def approve(self, app: str, verifier: bytes, rid: bytes, now: float) -> None:
        """Our client approves request ``rid``: vote for it, and tell everyone."""
        ask = self._waiting(app, verifier, rid, now)
        ask.state = "voted"
        self._send(EVERYONE, "vote", {"rid": rid, "vote": self._vote(rid)})

    def deny(self, app: str, verifier: bytes, rid: bytes, now: float) -> None:
        """Our client denies request ``rid``: tell the servers that asked."""
        ask = self._waiting(app, verifier, rid, now)
        ask.state = "denied"
        for origin in sorted(ask.origins - {self.me}):
            self._send(origin, "refuse", {"rid": rid, "reason": "denied"})

    # Signing requests of other servers -------------------------------------------------------------

    def screen(self, sender: int, obj: dict[str, Any], now: float) -> None:
        """Pass a signing envelope on, unless it asks for a distributed signature without a certificate."""
        body = obj.get("body")
        message = body.get("message") if isinstance(body, dict) else None
        if obj.get("kind") == "request" and isinstance(message, bytes) and _DOMAIN_BYTES in message:
            digest = hashlib.sha256(message).digest()
            if digest not in self.authorized:
                if len(self._held) >= MAX_HELD:
                    self.rejected.append(RemoteProtocolError(sender, "too many held signing requests"))
                    return
                self._held.append(_Held(sender, obj, digest, now + HOLD))
                return
        self.forward(sender, obj, now)

    def _release(self, now: float) -> None:
        keep = []
        for held in self._held:
            if held.digest in self.authorized:
                self.forward(held.sender, held.obj, now)
            elif now >= held.until:
                self._refuse_signing(held)
            else:
                keep.append(held)
        self._held = keep

    def _refuse_signing(self, held: _Held) -> None:
        reason = "asked us to sign a distributed application's payload without a majority of approvals"
        try:
            open_envelope(SIGNING_SERVICE, held.obj, held.sender, self.table)
        except RemoteProtocolError as exc:
            self.rejected.append(exc)
            return
        self.alerts.append(Alert(AlertKind.BAD_MESSAGE, held.sender, self.period, reason))
        self.rejected.append(RemoteProtocolError(held.sender, reason))

    # Messages ------------------------------------------------------------------------------------------

    def receive(self, sender: int, obj: Any, now: float) -> None:
        """Take a decoded envelope; bad input is recorded in ``rejected`` (and ``alerts``), never raised."""
        try:
            kind, body = open_envelope(APPROVALS, obj, sender, self.table)
            if kind == "ask":
                self._on_ask(sender, body, now)
            elif kind == "vote":
                f = encoding.expect_map(body, {"rid": bytes, "vote": bytes}, "approval vote")
                if len(f["rid"]) != DIGEST_SIZE or not self._valid_vote(sender, f["rid"], f["vote"]):
                    raise RemoteProtocolError(sender, "vote that is not its own signature on a request id")
                self._record_vote(sender, f["rid"], f["vote"])
            elif kind == "refuse":
                f = encoding.expect_map(body, {"rid": bytes, "reason": str}, "approval refusal")
                if f["reason"] not in REASONS:
                    raise RemoteProtocolError(sender, f"refusal with unknown reason {f['reason'][:40]!r}")
                for req in self._requests.values():
                    if req.rid == f["rid"] and sender not in self._votes.get(req.rid, {}):
                        req.refusals[sender] = f["reason"]
            elif kind == "cert":
                self._on_cert(sender, body)
            else:
                raise RemoteProtocolError(sender, f"unknown approvals message kind {kind[:40]!r}")
        except RemoteProtocolError as exc:
            self.rejected.append(exc)
        except DecodeError as exc:
            self.rejected.append(RemoteProtocolError(sender, str(exc)))

    def _on_ask(self, sender: int, body: Any, now: float) -> None:
        f = encoding.expect_map(
            body,
            {"app": str, "op": str, "payload": bytes, "ticket": bytes, "vote": bytes},
            "approval request",
        )
        if not 0 < len(f["app"]) <= MAX_APP_LENGTH or f["op"] not in PROTOCOLS:
            raise RemoteProtocolError(sender, "approval request with a bad application name or protocol")
        if len(f["payload"]) > MAX_PAYLOAD or len(f["ticket"]) != DIGEST_SIZE:
            raise RemoteProtocolError(sender, "approval request with an oversized payload or a bad ticket")
        digest = hashlib.sha256(distributed_payload(f["app"], f["op"], f["payload"])).digest()
        rid = request_id(digest, f["ticket"])
        if not self._valid_vote(sender, rid, f["vote"]):
            raise RemoteProtocolError(sender, "approval request without its sender's own vote")
        ask = self._asks.get(rid)
        if ask is not None:  # known (a replay, or a second origin of the same request)
            self._record_vote(sender, rid, f["vote"])
            if sender not in ask.origins:
                ask.origins.add(sender)
                if ask.state in REASONS:
                    self._send(sender, "refuse", {"rid": rid, "reason": ask.state})
            return
        open_from_sender = sum(1 for a in self._asks.values() if sender in a.origins and now < a.expires)
        if open_from_sender >= MAX_ASKS_PER_SERVER:
            self._send(sender, "refuse", {"rid": rid, "reason": "busy"})
            return
        ask = _Ask(f["app"], f["op"], f["payload"], digest, f["ticket"], now + PENDING_TTL, {sender})
        verifier = self.clients(f["app"])
        if verifier is None:
            ask.state = "no-client"
        elif not hmac.compare_digest(ticket(verifier, self.period, digest), f["ticket"]):
            ask.state = "password"
        self._asks[rid] = ask
        self._explained(rid)
        self._record_vote(sender, rid, f["vote"])
        if ask.state in REASONS:
            self._send(sender, "refuse", {"rid": rid, "reason": ask.state})

    def _on_cert(self, sender: int, body: Any) -> None:
        f = encoding.expect_map(
            body, {"digest": bytes, "ticket": bytes, "votes": dict}, "approval certificate"
        )
        if len(f["digest"]) != DIGEST_SIZE or len(f["ticket"]) != DIGEST_SIZE:
            raise RemoteProtocolError(sender, "approval certificate with a bad digest or ticket")
        rid = request_id(f["digest"], f["ticket"])
        votes: dict[int, bytes] = {}
        for voter, sig in f["votes"].items():
            if isinstance(voter, bool) or not isinstance(voter, int) or not isinstance(sig, bytes):
                raise RemoteProtocolError(sender, "approval certificate: malformed vote list")
            if not self._valid_vote(voter, rid, sig):
                reason = f"approval certificate carries a vote of server {voter} that does not verify"
                self.alerts.append(Alert(AlertKind.BAD_MESSAGE, sender, self.period, reason))
                raise RemoteProtocolError(sender, reason)
            votes[voter] = sig
        if len(votes) < self.majority:
            raise RemoteProtocolError(
                sender, f"approval certificate with {len(votes)} votes, a majority is {self.majority}"
            )
        for voter, sig in votes.items():
            self._votes.setdefault(rid, {}).setdefault(voter, sig)
        self._explained(rid)
        self.authorized.add(f["digest"])

    # Driving -----------------------------------------------------------------------------------------

    @property
    def pending_work(self) -> bool:
        """True while a request of ours or a held signing request waits for something."""
        return bool(self._requests or self._held)

    def tick(self, now: float) -> list[Outgoing]:
        for lid, req in list(self._requests.items()):
            votes = self._votes.get(req.rid, {})
            if len(votes) >= self.majority:
                cert = {"digest": req.digest, "ticket": req.ticket, "votes": dict(votes)}
                self._send(EVERYONE, "cert", cert)
                self.authorized.add(req.digest)
                self.done[lid] = req.message
                if req.protocol == "store":
                    self.certificates[lid] = store_certificate(
                        req.app, self.table, req.digest, req.ticket, votes
                    )
                del self._requests[lid]
                continue
            refused = {i: r for i, r in req.refusals.items() if i not in votes}
            if self.n - len(refused) < self.majority:
                self.failed[lid] = self._explain(req, votes, refused, "a majority is out of reach")
                del self._requests[lid]
            elif now >= req.deadline:
                self.failed[lid] = self._explain(req, votes, refused, "no majority in time")
                del self._requests[lid]
        self._release(now)
        mine = {req.rid for req in self._requests.values()}
        for rid, ask in list(self._asks.items()):
            if now >= ask.expires + PENDING_TTL and rid not in mine:
                del self._asks[rid]
                self._votes.pop(rid, None)
        out, self._out = self._out, []
        return out

    def _explain(
        self, req: _Request, votes: Mapping[int, bytes], refused: Mapping[int, str], why: str
    ) -> str:
        parts = [f"{why}: {len(votes)} of {self.n} servers' clients approved, {self.majority} needed"]
        if votes:
            parts.append("approved by " + ", ".join(f"server {i}" for i in sorted(votes)))
        parts += [f"server {i}: {REASONS[r]}" for i, r in sorted(refused.items())]
        silent = [i for i in sorted(self.table.entries) if i not in votes and i not in refused]
        if silent:
            parts.append("no decision from " + ", ".join(f"server {i}" for i in silent))
        return "; ".join(parts)

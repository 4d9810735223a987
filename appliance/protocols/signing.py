"""Group-key signing on request: FROST with preprocessed nonces, one round trip (sans-IO).

Theory of operation
-------------------
Within a period every operational server can *coordinate* a signature. Nonces are
preprocessed: each server j sends every coordinator c a batch of FROST nonce
commitments reserved for c alone (so two coordinators can never consume the same
nonce of j), and keeps the secret nonces. To sign, coordinator c picks t+1 signers
(itself first, then the servers that answered it most recently), takes the next
unused commitment of each from the batches they gave it, and sends each signer one
request naming the commitment list and the message. A signer checks that the
commitment it is asked to use is one it reserved for c and has not used, uses it
once, and answers with its signature share. c aggregates and verifies the
signature (RFC 9591 identifiable abort: a bad share names its signer, who is then
avoided); a signer that does not answer in time is avoided too, and the request is
retried with another signer set. When a coordinator's stock of a signer's nonces
runs low it asks for a new batch.

What a signer signs: any message *except* one that decodes as a protocol payload of
this appliance (a canonical CBOR map carrying our signing domain): those are signed
only by the protocols themselves (KeyTable, M), never on request. Requests and shares
travel in envelopes signed with the period keys of the KeyTable.

Payload checks. A threshold signature means something only if each signer checked the
payload against its own state. An application registers a :class:`PayloadCheck` for the
payloads it owns (the log: its checkpoints). A payload is *claimed* by a check from its
content, never from a label the requester chooses, so a coordinator cannot slip a
checkpoint past the check by calling it something else. Before a server contributes a
share to a claimed payload, as coordinator or as signer, it runs the check; the check may
refuse with a reason, and must make durable whatever it needs to remember *before* it
accepts (the log's guard records the last checkpoint it signed). A signer that refuses
sends the coordinator a ``refuse`` (so that it reports the reason instead of waiting) and
raises the check's alert naming the coordinator. The coordinator then tries other
signers; when fewer than t are left the request fails with every signer's reason.

Several keys. The group key (``scert``) has the service ``sign``. Every other Ed25519
secret of C (a log's own key, e.g. ``log``) gets a service of its own, ``sign/<id>``, with
its own nonces; it signs *only* what one of its checks accepts (``only_checked``), so the
log's key can never be made to sign anything but a checkpoint its signers checked.

The service belongs to one period: at each refresh the node replaces it with a new one
holding the new share; requests in flight across the switch fail and are retried.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from appliance.crypto import encoding, frost
from appliance.crypto.errors import CheatingError, CryptoError, DecodeError
from appliance.crypto.groups import ED25519
from appliance.crypto.keyshare import KeyShare
from appliance.protocols._core import Alert, AlertKind, Outgoing, RemoteProtocolError, Signer
from appliance.protocols.services import open_envelope, seal
from appliance.protocols.state import SCERT, KeyTable

SERVICE = "sign"
BATCH = 128
#: The first batch each coordinator gets when the service opens (at every refresh, from every
#: server to every other: n(n-1) batches at once while the refresh may still be running
#: elsewhere); a coordinator that signs asks for full batches as its stock runs low.
FIRST_BATCH = 16
LOW_WATER = 48
REQUEST_TIMEOUT = 2.0
MAX_MESSAGE = 64 * 1024
MAX_ATTEMPTS = 4
#: Longest refusal reason a signer sends (and an alert quotes).
MAX_REASON = 400


def service_name(secret: str) -> str:
    """The signing service of a long-lived secret: ``sign`` for the group key, ``sign/<id>`` else."""
    return SERVICE if secret == SCERT else f"{SERVICE}/{secret}"


class SigningRefused(Exception):
    """The request cannot be signed (e.g. it is a protocol payload, or no signers are available).

    ``code`` says what kind of refusal it is when a caller may act on it (never match the text):
    :data:`OWN_CHECK` and its extensions (:func:`own_check_code`), or None."""

    def __init__(self, text: str = "", *, code: str | None = None) -> None:
        super().__init__(text)
        self.code = code


#: :class:`SigningRefused` ``code`` of a request this server's own payload check refused: when the
#: request was made, or when the check ran again before a retry or after the request waited
#: (for a presignature, for nonces). :func:`own_check_code` appends the check's own code.
OWN_CHECK = "own-check"


class Refusal(str):
    """A refusal's text with a code (``code``) naming its kind, for the caller to act on.

    A payload check may return one (or any ``str`` with a ``code`` attribute: a timestamp's
    ``TimeOff``); :func:`run_check` keeps the code when it shortens the text, and a service's
    ``failed`` entry may be one, whose code :class:`SigningRefused` then carries."""

    code: str

    def __new__(cls, text: str, code: str) -> Refusal:
        obj = super().__new__(cls, text)
        obj.code = code
        return obj


def refusal_code(reason: object) -> str | None:
    """The code a refusal carries (a :class:`Refusal`, a check's reason with ``code``), else None."""
    code = getattr(reason, "code", None)
    return code if isinstance(code, str) else None


def own_check_code(reason: str) -> str:
    """The code of our own check's refusal ``reason``: ``own-check``, or ``own-check/<its code>``
    when the check's reason carries one (``own-check/time-off``: a timestamp's genTime went stale)."""
    code = refusal_code(reason)
    return OWN_CHECK if code is None else f"{OWN_CHECK}/{code}"


def is_protocol_payload(message: bytes) -> bool:
    """True if ``message`` could be one of our own signed protocol objects."""
    try:
        obj = encoding.decode(message, what="message")
    except DecodeError:
        return False
    return isinstance(obj, dict) and obj.get("dom") == encoding.SIGNING_DOMAIN


class PayloadCheck(Protocol):
    """An application's rule for the payloads it owns: may this server contribute its share?

    ``claims`` decides from the message's content alone whether it is one of the
    application's payloads. ``check`` returns None to sign (having made durable whatever
    it must remember first) or the reason it refuses; it should not raise (an exception
    is treated as a refusal).
    """

    @property
    def name(self) -> str:
        """What the payloads are, for reasons and alerts (e.g. "checkpoint of log.example/pst")."""
        ...

    @property
    def alert(self) -> AlertKind:
        """The alert a refusal raises, naming the server that asked."""
        ...

    def claims(self, message: bytes) -> bool: ...

    def check(self, message: bytes) -> str | None: ...


# Two optional hooks a check may define (the DSS service uses them; the timestamping
# authority's check has both, appliance.apps.tsa.threshold):
#
# * ``check_from(message, server) -> str | None``: the check when it must know which server
#   asked (a timestamp's serial must be that server's); :func:`run_check` calls it instead of
#   ``check`` when it is given the server.
# * ``signed_bytes(message) -> bytes``: what is signed for a payload it accepted, computed by
#   each signer itself from the payload (a TSTInfo is checked, its CMS signed attributes are
#   signed); :func:`signed_form`.
# * ``key_tweak(message, group, public_key) -> int`` (DSS only): the payload is signed by an
#   application's key, the secret's key plus this public tweak (appliance.apps.dsskeys).


class NotYet(str):
    """A refusal that accuses nobody: this server is not there yet (e.g. it has not applied the
    entries a checkpoint covers); the coordinator may ask again later. No alert. It may carry a
    ``code`` like any refusal (a timestamp's genTime that may have arrived late: ``time-off``)."""

    code: str | None = None


def run_check(check: PayloadCheck, message: bytes, server: int | None = None) -> str | None:
    """``check.check(message)`` (``check.check_from(message, server)`` when the check has it and
    the asking ``server`` is given), with an exception turned into a refusal (never a share)."""
    try:
        check_from = getattr(check, "check_from", None)
        if server is not None and check_from is not None:
            reason = check_from(message, server)
        else:
            reason = check.check(message)
    except Exception as exc:  # a failed check must refuse, whatever went wrong
        return f"the check failed: {type(exc).__name__}: {exc}"[:MAX_REASON]
    if reason is None:
        return None
    code = refusal_code(reason)
    if isinstance(reason, NotYet):
        quiet = NotYet(reason[:MAX_REASON])
        quiet.code = code
        return quiet
    return reason[:MAX_REASON] if code is None else Refusal(reason[:MAX_REASON], code)


def signed_form(check: PayloadCheck | None, message: bytes) -> bytes:
    """What the signers sign for ``message``: ``check.signed_bytes(message)`` when the check
    that claims it defines it, else the message itself. Raises ValueError if it cannot be made."""
    make = getattr(check, "signed_bytes", None) if check is not None else None
    if make is None:
        return message
    try:
        data = make(message)
    except Exception as exc:
        raise ValueError(f"cannot form the signed bytes: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, bytes):
        raise ValueError("the check's signed form is not bytes")
    return data


@dataclass
class _Request:
    rid: int
    message: bytes
    started: float
    attempt: int = 0
    signers: tuple[int, ...] = ()
    commitments: dict[int, bytes] = field(default_factory=dict)
    shares: dict[int, frost.SignatureShare] = field(default_factory=dict)
    deadline: float = 0.0
    #: Signers that declined this message (an upgrade their operator did not approve).
    declined: set[int] = field(default_factory=set)
    #: Signers whose payload check refused this message, with their reasons.
    refused: dict[int, str] = field(default_factory=dict)
    #: Our own shares made so far: a retry checks the payload again (our state may have moved).
    own_shares: int = 0


class PayloadGate:
    """What a signing service (FROST here, DSS in :mod:`~appliance.protocols.dss_signing`) does
    with its applications' payload checks: find the check that claims a message, refuse our own
    request before it goes out, and judge a peer's request before we give a share, with an
    alert naming the peer when it asked for a payload we refuse."""

    me: int
    period: int
    service: str
    checks: list[PayloadCheck]
    only_checked: bool
    alerts: list[Alert]

    def check_for(self, message: bytes) -> PayloadCheck | None:
        """The check that claims ``message`` (None: no application owns it)."""
        for check in self.checks:
            try:
                if check.claims(message):
                    return check
            except Exception:  # a claim that cannot be decided is a claim: its check will refuse
                return check
        return None

    def _unclaimed(self) -> str:
        if not self.checks:
            return f"{self.service}: no application on this server signs with this key"
        names = ", ".join(sorted({c.name for c in self.checks}))
        return f"{self.service}: this key signs only what its checks accept ({names}); this is none of them"

    def _own_check(self, message: bytes) -> PayloadCheck | None:
        """Before our own request goes out (we contribute a share too): our own state must accept
        it; raises SigningRefused otherwise. Returns the check that claimed it."""
        check = self.check_for(message)
        if check is not None:
            reason = run_check(check, message, self.me)
            if reason is not None:
                raise SigningRefused(
                    f"this server refuses the {check.name}: {reason}", code=own_check_code(reason)
                )
        elif self.only_checked:
            raise SigningRefused(self._unclaimed())
        return check

    def _refusal(self, sender: int, message: bytes) -> str | None:
        """None to sign; else why not, with an alert naming ``sender`` when it asked for a bad payload."""
        check = self.check_for(message)
        if check is None:
            if not self.only_checked:
                return None
            unclaimed = self._unclaimed()
            if self.checks:  # with no application here there is nothing to hold against it
                detail = f"asked us to sign with {self.service} a message not ours to sign: {unclaimed}"
                self.alerts.append(Alert(AlertKind.BAD_MESSAGE, sender, self.period, detail))
            return unclaimed
        reason = run_check(check, message, sender)
        if reason is not None and not isinstance(reason, NotYet):
            detail = f"asked us to sign a {check.name} that we refuse: {reason}"
            self.alerts.append(Alert(check.alert, sender, self.period, detail))
        return reason


class SigningService(PayloadGate):
    """Server ``me``'s signing service for one period."""

    def __init__(
        self,
        *,
        me: int,
        t: int,
        table: KeyTable,
        key: KeyShare[bytes],
        signer: Signer,
        rand: Callable[[int], bytes],
        allow_protocol: Callable[[bytes], bool] = lambda _message: False,
        service: str = SERVICE,
        checks: Sequence[PayloadCheck] = (),
        only_checked: bool = False,
    ) -> None:
        self.me, self.t, self.period = me, t, table.period
        #: The envelope name of this service (one per key: ``sign``, ``sign/log``, ...).
        self.service = service
        #: Application checks; the first that claims a message decides whether we sign it.
        self.checks: list[PayloadCheck] = list(checks)
        #: Sign only what a check accepts (a key of an application, never the group key).
        self.only_checked = only_checked
        #: The one exception to "never sign a protocol payload on request": the node's policy
        #: (a code upgrade this server's operator approved, appliance.boot.upgrade).
        self.allow_protocol = allow_protocol
        self.table = table
        self.key = key
        self.signer = signer
        self.rand = rand
        self.peers = sorted(i for i in table.entries if i != me)
        self.package = frost.KeyPackage(me, key.share.value, key.public_key, t + 1)
        self.public = frost.PublicKeyPackage(
            key.public_key, {i: key.public.verification_share(ED25519, i) for i in table.entries}, t + 1
        )
        #: Our secret nonces, reserved per coordinator: coordinator -> commitment bytes -> nonces.
        self._reserved: dict[int, dict[bytes, frost.SigningNonces]] = {}
        #: Commitments other signers reserved for us: signer -> queue of commitment bytes.
        self._stock: dict[int, deque[bytes]] = {i: deque() for i in self.peers}
        self._asked_more: dict[int, float] = {}
        self._own: deque[frost.SigningNonces] = deque()
        self._requests: dict[int, _Request] = {}
        self._next_rid = 1
        self._avoid: dict[int, float] = {}
        self.done: dict[int, bytes] = {}
        self.failed: dict[int, str] = {}
        self.alerts: list[Alert] = []
        self.rejected: list[RemoteProtocolError] = []
        self._out: list[Outgoing] = []

    # Envelopes -------------------------------------------------------------------------

    def _send(self, to: int, kind: str, body: Any) -> None:
        self._out.append(Outgoing(to, seal(self.service, kind, self.period, self.me, body, self.signer)))

    def drain(self) -> list[Outgoing]:
        out, self._out = self._out, []
        return out

    # Preprocessing ---------------------------------------------------------------------------

    def start(self) -> None:
        """Give every coordinator a first (small) batch of our nonces."""
        for c in self.peers:
            self._give_batch(c, FIRST_BATCH)

    def _give_batch(self, coordinator: int, size: int | None = None) -> None:
        reserved = self._reserved.setdefault(coordinator, {})
        if len(reserved) > 8 * BATCH:
            return  # it still holds plenty: refuse to hoard secrets for it
        batch = []
        for _ in range(BATCH if size is None else min(size, BATCH)):
            nonces = frost.commit(self.package, self.rand(64))
            data = nonces.commitment.to_bytes()
            reserved[data] = nonces
            batch.append(data)
        self._send(coordinator, "nonces", batch)

    def _own_nonces(self) -> frost.SigningNonces:
        if not self._own:
            self._own.extend(frost.commit(self.package, self.rand(64)) for _ in range(BATCH))
        return self._own.popleft()

    # Coordinating -------------------------------------------------------------------------------

    def request(self, message: bytes, now: float) -> int:
        """Start signing ``message``; the result appears in ``done`` or ``failed`` under the returned id."""
        if len(message) > MAX_MESSAGE:
            raise SigningRefused(f"message of {len(message)} bytes is larger than {MAX_MESSAGE}")
        if is_protocol_payload(message) and not self.allow_protocol(message):
            raise SigningRefused("refusing to sign a protocol payload on request")
        self._own_check(message)
        rid = self._next_rid
        self._next_rid += 1
        self._requests[rid] = _Request(rid, message, now)
        self._attempt(self._requests[rid], now)
        return rid

    def _attempt(self, req: _Request, now: float) -> None:
        req.attempt += 1
        if req.attempt > MAX_ATTEMPTS:
            self._fail(req, "no set of t+1 signers answered correctly")
            return
        out = req.declined | set(req.refused)
        usable = [i for i in self.peers if self._stock[i] and self._avoid.get(i, 0.0) <= now and i not in out]
        usable.sort(key=lambda i: (-len(self._stock[i]), i))
        self._replenish(now)
        if len([i for i in self.peers if i not in out]) < self.t:
            if req.refused:
                reasons = "; ".join(f"server {i}: {why}" for i, why in sorted(req.refused.items()))
                self._fail(req, f"refused by its signers' checks ({reasons})")
            else:
                self._fail(
                    req, f"declined by servers {sorted(req.declined)}: their operators did not approve it"
                )
            return
        if len(usable) < self.t:
            if now - req.started < REQUEST_TIMEOUT:
                req.attempt -= 1  # not an attempt: wait for nonce batches (retried on tick)
                req.signers, req.deadline = (), now + 0.02
                return
            self._fail(req, f"only {len(usable)} other signers have nonces for us, need {self.t}")
            return
        check = self.check_for(req.message)
        if check is not None and req.own_shares:
            reason = run_check(check, req.message, self.me)
            if reason is not None:
                self._fail(
                    req,
                    Refusal(f"this server now refuses the {check.name}: {reason}", own_check_code(reason)),
                )
                return
        chosen = sorted(usable[: self.t])
        taken = self._take_commitments(chosen, now)
        if taken is None:  # a signer's stock held a bad commitment: it is avoided, choose again
            req.attempt -= 1
            self._attempt(req, now)
            return
        own = self._own_nonces()
        req.signers = tuple(sorted([self.me, *chosen]))
        req.commitments = {self.me: own.commitment.to_bytes(), **{i: c.to_bytes() for i, c in taken.items()}}
        taken[self.me] = own.commitment
        self._replenish(now)
        req.shares = {}
        req.deadline = now + REQUEST_TIMEOUT
        body = {
            "rid": req.rid,
            "attempt": req.attempt,
            "message": req.message,
            "commitments": {i: c for i, c in req.commitments.items()},
        }
        for i in chosen:
            self._send(i, "request", body)
        try:
            commitment_list = [taken[i] for i in req.signers]
            share = frost.sign(self.package, own, req.message, commitment_list)
        except CryptoError as exc:
            bad = getattr(exc, "party", None)
            if isinstance(bad, int):
                self._avoid[bad] = now + 60.0
            self._attempt(req, now)
            return
        req.shares[self.me] = share
        req.own_shares += 1

    def _take_commitments(self, chosen: list[int], now: float) -> dict[int, frost.SigningCommitment] | None:
        """The next commitment of each chosen signer's stock, checked now (their batches were
        only checked for their signer's id). A bad one: its signer is named, its stock dropped,
        it is avoided for a minute, and None is returned (nothing else was taken)."""
        taken: dict[int, frost.SigningCommitment] = {}
        for i in chosen:
            try:
                taken[i] = frost.SigningCommitment.from_bytes(self._stock[i][0])
            except CryptoError as exc:
                self._stock[i].clear()
                self._avoid[i] = now + 60.0
                self.rejected.append(RemoteProtocolError(i, f"nonce batch: {exc}"))
                return None
        for i in chosen:
            self._stock[i].popleft()
        return taken

    def _replenish(self, now: float) -> None:
        """Ask signers whose nonces for us run low for a new batch (at most every 0.2 s each)."""
        for i in self.peers:
            if len(self._stock[i]) < LOW_WATER and self._asked_more.get(i, -1.0) + 0.2 < now:
                self._asked_more[i] = now
                self._send(i, "more", {})

    def _fail(self, req: _Request, why: str) -> None:
        self.failed[req.rid] = why
        self._requests.pop(req.rid, None)

    def _on_share(self, sender: int, body: Any, now: float) -> None:
        f = encoding.expect_map(body, {"rid": int, "attempt": int, "share": bytes}, "signature share")
        req = self._requests.get(f["rid"])
        if req is None or req.attempt != f["attempt"] or sender not in req.signers:
            return  # late or for a finished request
        share = frost.SignatureShare.from_bytes(f["share"])
        if share.identifier != sender:
            raise RemoteProtocolError(sender, "signature share under another signer's id")
        req.shares[sender] = share
        if len(req.shares) == len(req.signers):
            self._complete(req, now)

    def _complete(self, req: _Request, now: float) -> None:
        commitment_list = [frost.SigningCommitment.from_bytes(req.commitments[i]) for i in req.signers]
        try:
            sig = frost.aggregate_and_identify(
                self.public, commitment_list, req.message, list(req.shares.values())
            )
        except CheatingError as exc:
            self._avoid[exc.party] = now + 60.0
            self.alerts.append(Alert(AlertKind.BAD_SIGNATURE_SHARE, exc.party, self.period, exc.reason))
            self._attempt(req, now)
            return
        self.done[req.rid] = sig
        self._requests.pop(req.rid, None)

    # Signing for others ------------------------------------------------------------------------

    def _on_request(self, sender: int, body: Any) -> None:
        f = encoding.expect_map(
            body, {"rid": int, "attempt": int, "message": bytes, "commitments": dict}, "signing request"
        )
        message: bytes = f["message"]
        if len(message) > MAX_MESSAGE:
            raise RemoteProtocolError(sender, "asked us to sign an oversized message")
        if is_protocol_payload(message) and not self.allow_protocol(message):
            # Not misbehaviour: the coordinator's operator approved an upgrade ours did not
            # (yet). Say so at once, so that it neither waits nor holds it against us.
            mine = raw.get(self.me) if isinstance(raw := f["commitments"], dict) else None
            declined = self._reserved.get(sender, {}).pop(mine, None) if isinstance(mine, bytes) else None
            if declined is not None:
                declined.wipe()
            self._send(sender, "decline", {"rid": f["rid"], "attempt": f["attempt"]})
            return
        raw = f["commitments"]
        if not all(isinstance(k, int) and isinstance(v, bytes) for k, v in raw.items()):
            raise RemoteProtocolError(sender, "signing request: malformed commitment list")
        if len(raw) != self.t + 1 or self.me not in raw or sender not in raw:
            raise RemoteProtocolError(sender, "signing request: wrong signer set")
        nonces = self._reserved.get(sender, {}).pop(raw[self.me], None)
        if nonces is None:
            # A commitment of an earlier key-holder of ours (it restarted), or a reuse: say so,
            # so that the coordinator drops what it holds from us and asks for a fresh batch.
            self._send(sender, "stale", {"rid": f["rid"], "attempt": f["attempt"]})
            raise RemoteProtocolError(
                sender, "signing request names a nonce we did not reserve for it (stale or reused)"
            )
        # Our own entry is the commitment we made (validated by construction); the others are
        # checked here. A bad one raises, naming the coordinator, before anything is signed.
        try:
            commitment_list = [
                nonces.commitment if i == self.me else frost.SigningCommitment.from_bytes(raw[i])
                for i in sorted(raw)
            ]
        except BaseException:
            nonces.wipe()
            raise
        # Last, the application's check: it may record what we sign, so it runs only once
        # nothing but the share itself is left to do.
        refusal = self._refusal(sender, message)
        if refusal is not None:
            nonces.wipe()
            self._send(sender, "refuse", {"rid": f["rid"], "attempt": f["attempt"], "reason": refusal})
            return
        share = frost.sign(self.package, nonces, message, commitment_list)
        self._send(sender, "share", {"rid": f["rid"], "attempt": f["attempt"], "share": share.to_bytes()})

    # Driving -----------------------------------------------------------------------------------------

    def receive(self, sender: int, obj: dict[str, Any], now: float) -> None:
        """Take a decoded service envelope; bad input is recorded in ``rejected``, never raised."""
        try:
            self._receive(sender, obj, now)
        except RemoteProtocolError as exc:
            self.rejected.append(exc)
        except (DecodeError, CryptoError, KeyError, TypeError, ValueError) as exc:
            self.rejected.append(RemoteProtocolError(sender, f"signing service: {type(exc).__name__}: {exc}"))

    def _receive(self, sender: int, obj: dict[str, Any], now: float) -> None:
        kind, body = open_envelope(self.service, obj, sender, self.table)
        if kind == "nonces":
            if not isinstance(body, list) or len(body) > BATCH or not all(isinstance(x, bytes) for x in body):
                raise RemoteProtocolError(sender, "nonce batch: expected a list of commitments")
            for data in body:  # its points are checked when it is used (_take_commitments)
                if frost.SigningCommitment.identifier_of(data) != sender:
                    raise RemoteProtocolError(sender, "nonce batch: commitment under another id")
                self._stock[sender].append(data)
        elif kind == "more":
            self._give_batch(sender)
        elif kind == "request":
            self._on_request(sender, body)
        elif kind == "share":
            self._on_share(sender, body, now)
        elif kind == "stale":
            f = encoding.expect_map(body, {"rid": int, "attempt": int}, "stale nonce")
            self._stock[sender].clear()  # the rest of that batch is stale too
            self._asked_more.pop(sender, None)
            self._replenish(now)
            req = self._requests.get(f["rid"])
            if req is not None and req.attempt == f["attempt"] and sender in req.signers:
                req.attempt -= 1  # our stock was stale, not the signer faulty
                self._attempt(req, now)
        elif kind == "decline":
            f = encoding.expect_map(body, {"rid": int, "attempt": int}, "decline")
            req = self._requests.get(f["rid"])
            if req is not None and 0 < f["attempt"] <= req.attempt and sender not in req.declined:
                if not is_protocol_payload(req.message):
                    raise RemoteProtocolError(sender, "declined to sign a client message")
                req.declined.add(sender)
                if req.attempt == f["attempt"] and sender in req.signers:
                    req.attempt -= 1  # a decline is an answer, not a failed attempt
                    self._attempt(req, now)
        elif kind == "refuse":
            f = encoding.expect_map(body, {"rid": int, "attempt": int, "reason": str}, "refusal")
            req = self._requests.get(f["rid"])
            if req is None or not 0 < f["attempt"] <= req.attempt or sender in req.refused:
                return
            if self.check_for(req.message) is None and not self.only_checked:
                raise RemoteProtocolError(sender, "refused to sign a message no application check covers")
            req.refused[sender] = f["reason"][:MAX_REASON]
            if req.attempt == f["attempt"] and sender in req.signers:
                req.attempt -= 1  # a refusal is an answer, not a failed attempt
                self._attempt(req, now)
        else:
            raise RemoteProtocolError(sender, f"unknown signing message kind {kind!r}")

    @property
    def pending(self) -> bool:
        return bool(self._requests)

    def tick(self, now: float) -> list[Outgoing]:
        for req in list(self._requests.values()):
            if now >= req.deadline:
                for i in req.signers:
                    if i not in req.shares:
                        self._avoid[i] = now + 10.0
                self._attempt(req, now)
        if self._requests:
            self._replenish(now)
        return self.drain()

    def wipe(self) -> None:
        for reserved in self._reserved.values():
            for nonces in reserved.values():
                nonces.wipe()
        for nonces in self._own:
            nonces.wipe()
        self.key.wipe()

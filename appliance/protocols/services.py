"""Envelopes of the per-period services (signing on request, GetTime), and GetTime itself.

A service message is a canonical CBOR map {svc, kind, period, from, body, sig} where sig
is the sender's period-key signature over the body bound to the service's context, the
kind and the period. :func:`seal` builds one; :func:`open_envelope` checks one against
the KeyTable and returns (kind, body) or raises RemoteProtocolError naming the sender.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from appliance.crypto import encoding, tvrf
from appliance.crypto.errors import DecodeError
from appliance.crypto.groups import ED25519
from appliance.protocols._core import EVERYONE, Outgoing, RemoteProtocolError, Signer, ed25519_verify
from appliance.protocols.state import KeyTable

ENVELOPE_FIELDS = {"svc": str, "kind": str, "period": int, "from": int, "body": object, "sig": bytes}


def seal(svc: str, kind: str, period: int, me: int, body: Any, signer: Signer) -> bytes:
    payload = encoding.signing_payload(kind, 1, f"pst/{svc}", period, {"from": me, "body": body})
    return encoding.encode(
        {"svc": svc, "kind": kind, "period": period, "from": me, "body": body, "sig": signer.sign(payload)}
    )


def open_envelope(svc: str, obj: Any, sender: int, table: KeyTable) -> tuple[str, Any]:
    f = encoding.expect_map(obj, ENVELOPE_FIELDS, f"{svc} message")
    if f["svc"] != svc or f["from"] != sender or f["period"] != table.period:
        raise RemoteProtocolError(sender, f"{svc} message for another service, sender or period")
    entry = table.entries.get(sender)
    payload = encoding.signing_payload(
        f["kind"], 1, f"pst/{svc}", table.period, {"from": sender, "body": f["body"]}
    )
    if entry is None or not ed25519_verify(entry.verify_key, payload, f["sig"]):
        raise RemoteProtocolError(sender, f"{svc} message not signed with the sender's period key")
    return f["kind"], f["body"]


TIME = "time"
TIME_WAIT = 0.5


@dataclass
class _TimeRequest:
    deadline: float
    readings: dict[int, float] = field(default_factory=dict)


class TimeService:
    """GetTime (paper §5.3): the vector of every server's clock, each answer signed by its server.

    A server that does not answer within half a second is reported as None: a client sees
    which clocks it could read, and how far apart they are, instead of one number to trust.
    """

    def __init__(self, *, me: int, table: KeyTable, signer: Signer) -> None:
        self.me, self.table, self.signer = me, table, signer
        self._requests: dict[int, _TimeRequest] = {}
        self._next = 1
        self.done: dict[int, dict[int, float | None]] = {}
        self.rejected: list[RemoteProtocolError] = []
        self._out: list[Outgoing] = []

    def request(self, now: float) -> int:
        rid = self._next
        self._next += 1
        self._requests[rid] = _TimeRequest(now + TIME_WAIT, {self.me: now})
        self._out.append(
            Outgoing(EVERYONE, seal(TIME, "ask", self.table.period, self.me, {"rid": rid}, self.signer))
        )
        return rid

    @property
    def pending(self) -> bool:
        return bool(self._requests)

    def receive(self, sender: int, obj: Any, now: float) -> None:
        try:
            kind, body = open_envelope(TIME, obj, sender, self.table)
            f = encoding.expect_map(body, {"rid": int} if kind == "ask" else {"rid": int, "us": int}, "time")
        except RemoteProtocolError as exc:
            self.rejected.append(exc)
            return
        except DecodeError as exc:
            self.rejected.append(RemoteProtocolError(sender, str(exc)))
            return
        if kind == "ask":
            answer = {"rid": f["rid"], "us": round(now * 1_000_000)}
            self._out.append(
                Outgoing(sender, seal(TIME, "tell", self.table.period, self.me, answer, self.signer))
            )
        elif kind == "tell":
            req = self._requests.get(f["rid"])
            if req is not None:
                req.readings.setdefault(sender, f["us"] / 1_000_000)
        else:
            self.rejected.append(RemoteProtocolError(sender, f"unknown time message kind {kind!r}"))

    def tick(self, now: float) -> list[Outgoing]:
        for rid, req in list(self._requests.items()):
            if now >= req.deadline or len(req.readings) == len(self.table.entries):
                self.done[rid] = {i: req.readings.get(i) for i in sorted(self.table.entries)}
                del self._requests[rid]
        out, self._out = self._out, []
        return out


RANDOM = "random"
RANDOM_WAIT = 2.0


@dataclass
class _RandomRequest:
    message: bytes
    deadline: float
    parts: dict[int, Any] = field(default_factory=dict)


class RandomService:
    """GetRandom: the threshold VRF of :mod:`appliance.crypto.tvrf` on the group key.

    The requesting server asks every other server for its partial evaluation of the
    input (which carries the client's nonce), and combines t+1 valid ones. A partial
    whose proof fails names its server; the output cannot be biased by anyone.
    """

    def __init__(self, *, me: int, t: int, table: KeyTable, signer: Signer, key: Any, rand: Any) -> None:
        self.group = ED25519
        self.me, self.t, self.table, self.signer, self.key, self.rand = me, t, table, signer, key, rand
        self.shares = {i: key.public.verification_share(ED25519, i) for i in table.entries}
        self._requests: dict[int, _RandomRequest] = {}
        self._next = 1
        self.done: dict[int, bytes] = {}
        self.failed: dict[int, str] = {}
        self.bad: dict[int, str] = {}
        self.rejected: list[RemoteProtocolError] = []
        self._out: list[Outgoing] = []

    def _partial(self, message: bytes) -> Any:
        size = (self.group.order.bit_length() + 7) // 8 + 16
        return tvrf.partial(
            self.group,
            self.me,
            self.key.share.value,
            message,
            lambda: int.from_bytes(self.rand(size), "big") % (self.group.order - 1) + 1,
        )

    def request(self, message: bytes, now: float) -> int:
        rid = self._next
        self._next += 1
        req = _RandomRequest(message, now + RANDOM_WAIT)
        req.parts[self.me] = self._partial(message)
        self._requests[rid] = req
        body = {"rid": rid, "input": message}
        self._out.append(
            Outgoing(EVERYONE, seal(RANDOM, "eval", self.table.period, self.me, body, self.signer))
        )
        return rid

    @property
    def pending(self) -> bool:
        return bool(self._requests)

    def receive(self, sender: int, obj: Any, now: float) -> None:
        try:
            kind, body = open_envelope(RANDOM, obj, sender, self.table)
            if kind == "eval":
                f = encoding.expect_map(body, {"rid": int, "input": bytes}, "random request")
                if len(f["input"]) > 1024:
                    raise RemoteProtocolError(sender, "random request input too long")
                part = self._partial(f["input"])
                answer = {"rid": f["rid"], "partial": part.to_bytes(self.group)}
                self._out.append(
                    Outgoing(sender, seal(RANDOM, "part", self.table.period, self.me, answer, self.signer))
                )
            elif kind == "part":
                f = encoding.expect_map(body, {"rid": int, "partial": bytes}, "random partial")
                req = self._requests.get(f["rid"])
                part = tvrf.Partial.from_bytes(self.group, f["partial"])
                if part.server != sender:
                    raise RemoteProtocolError(sender, "random partial under another server's id")
                if req is not None:
                    if not tvrf.verify_partial(self.group, self.shares[sender], req.message, part):
                        self.bad[sender] = "partial evaluation with a proof that does not verify"
                        raise RemoteProtocolError(sender, "random partial with a bad proof")
                    req.parts.setdefault(sender, part)
            else:
                raise RemoteProtocolError(sender, f"unknown random message kind {kind!r}")
        except RemoteProtocolError as exc:
            self.rejected.append(exc)
        except (DecodeError, KeyError, TypeError, ValueError) as exc:
            self.rejected.append(RemoteProtocolError(sender, f"random service: {type(exc).__name__}: {exc}"))

    def tick(self, now: float) -> list[Outgoing]:
        for rid, req in list(self._requests.items()):
            if len(req.parts) >= self.t + 1:
                parts = dict(sorted(req.parts.items())[: self.t + 1])
                self.done[rid] = tvrf.combine(self.group, self.t, req.message, parts, self.shares)
                del self._requests[rid]
            elif now >= req.deadline:
                self.failed[rid] = f"only {len(req.parts)} servers answered, need {self.t + 1}"
                del self._requests[rid]
        out, self._out = self._out, []
        return out

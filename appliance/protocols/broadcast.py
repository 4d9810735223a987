"""Synchronous broadcast with agreement and equivocation detection (Dolev-Strong, signed relays).

Theory of operation
-------------------
Every server broadcasts one *item* per broadcast phase: a payload signed by its
author. The phase runs ``rounds`` synchronous rounds of length ``delta`` from a start
time every server knows (periods come from the clock). In round 1 each server sends
its own item to everyone. A server *accepts* a value in round k if it carries enough
signatures: the author's (when the author's key is authenticated) plus distinct
relayers' signatures, at least k of them in round k. Each newly accepted value is
relayed once, at the start of the next round, with the relayer's signature added.

Why this is an agreement: a value accepted by an honest server in round k < rounds is
relayed and accepted by every honest server in round k+1; a value accepted in the
last round carries signatures of ``rounds`` distinct servers, one of them honest,
which accepted (and relayed) it earlier. So at the end every honest server holds the
same set of values per author. With signatures this holds for any number of corrupt
servers t < n, under the synchrony assumption that an honest server's message reaches
every honest server within ``delta`` (a server too slow for that counts among the t).
The network config enforces n >= 3t+1 (docs/design.md says why), more than this needs.

*Clear* items (the paper's key announcement by a recovering server, which has no
authenticated key yet) carry a signature that proves nothing, so they need one more
relay signature to be accepted and the phase runs one more round (``allow_clear``).

Equivocation: two different authenticated values from one author both reach every
honest server (at most two per author and class are kept and relayed), so every
honest server sees the conflict, keeps both signed values as transferable evidence
and raises an alert naming the author. What the phase *means* by several values
(discard, prefer the authenticated one: the paper's rules (i)-(iii)) is decided by
the protocol using it, from the agreed set, so every honest server decides the same.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from appliance.crypto import encoding
from appliance.crypto.errors import DecodeError
from appliance.protocols._core import (
    EVERYONE,
    Alert,
    AlertKind,
    LocalProtocolError,
    Outgoing,
    RemoteProtocolError,
    Signer,
    Verify,
)

AUTH = "auth"
CLEAR = "clear"
#: At most this many distinct values per author and class are kept: two prove a conflict.
MAX_VALUES = 2
MAX_PAYLOAD = 256 * 1024
RELAY_CONTEXT = "pst/broadcast/relay"


@dataclass(frozen=True, eq=True)
class Item:
    """A payload with its author's signature over :func:`item_statement`."""

    author: int
    payload: bytes
    signature: bytes

    @functools.cached_property
    def digest(self) -> bytes:
        return hashlib.sha512(self.payload + self.signature).digest()


Classify = Callable[[Item], str | None]
"""classify(item) -> AUTH, CLEAR, or None when the author signature is invalid."""


def item_statement(session: bytes, period: int, author: int, payload: bytes) -> bytes:
    """What an author signs for a broadcast item (bound to the phase's session and period)."""
    return encoding.signing_payload(
        "broadcast-item",
        1,
        "pst/broadcast/item",
        period,
        {"session": session, "author": author, "payload": payload},
    )


def relay_statement(session: bytes, period: int, item: Item) -> bytes:
    return encoding.signing_payload(
        "broadcast-relay",
        1,
        RELAY_CONTEXT,
        period,
        {"session": session, "author": item.author, "digest": item.digest},
    )


@dataclass
class _Value:
    item: Item
    cls: str
    relays: dict[int, bytes]
    accepted_round: int
    relayed: bool = False


class SyncBroadcast:
    """One broadcast phase among servers 1..n, seen from server ``me``."""

    def __init__(
        self,
        *,
        n: int,
        t: int,
        me: int,
        period: int,
        session: bytes,
        start: float,
        delta: float,
        signer: Signer | None,
        relay_verify: Verify,
        classify: Classify,
        allow_clear: bool = False,
        max_payload: int = MAX_PAYLOAD,
    ) -> None:
        if not 1 <= me <= n or t < 0 or delta <= 0:
            raise LocalProtocolError("bad broadcast parameters")
        self.n, self.t, self.me, self.period, self.session = n, t, me, period, session
        self.start, self.delta = start, delta
        self.rounds = t + 1 + (1 if allow_clear else 0)
        self.allow_clear = allow_clear
        self._signer = signer
        self._relay_verify = relay_verify
        self._classify = classify
        self._max_payload = max_payload
        self._values: dict[tuple[int, str], list[_Value]] = {}
        self._classified: dict[bytes, str | None] = {}
        self._statements: dict[bytes, bytes] = {}
        self._own: Item | None = None
        self._sent_own = False
        self._last_round_sent = 0
        self.alerts: list[Alert] = []
        self.rejected: list[RemoteProtocolError] = []

    # Timing ------------------------------------------------------------------

    @property
    def end(self) -> float:
        return self.start + self.rounds * self.delta

    def round_at(self, now: float) -> int:
        """Round number at ``now``: 0 before the start, rounds+1 after the end."""
        if now < self.start:
            return 0
        return min(int((now - self.start) // self.delta) + 1, self.rounds + 1)

    def done(self, now: float) -> bool:
        return now >= self.end

    # Input ---------------------------------------------------------------------

    def make_item(self, payload: bytes, signer: Signer) -> Item:
        """Sign ``payload`` as this server's item (with the key the phase authenticates)."""
        return Item(
            self.me, payload, signer.sign(item_statement(self.session, self.period, self.me, payload))
        )

    def broadcast(self, item: Item) -> None:
        if item.author != self.me:
            raise LocalProtocolError("a server broadcasts only its own item")
        if self._own is not None:
            raise LocalProtocolError("one item per server per broadcast phase")
        self._own = item
        cls = self._classify(item)
        if cls is None:
            raise LocalProtocolError("own item does not pass our own signature check")
        self._accept(item, cls, {}, 1)

    def receive(self, sender: int, data: bytes, now: float) -> None:
        """Take a bundle from ``sender``; bad input is recorded in ``rejected``, never raised."""
        try:
            self._receive(sender, data, now)
        except RemoteProtocolError as exc:
            self.rejected.append(exc)

    def _receive(self, sender: int, data: bytes, now: float) -> None:
        current = self.round_at(now)
        if current == 0 or current > self.rounds:
            raise RemoteProtocolError(sender, f"broadcast bundle outside its rounds (round {current})")
        try:
            chains = decode_bundle(data, self.session, self.period, self.n, self._max_payload)
        except DecodeError as exc:
            raise RemoteProtocolError(sender, f"malformed broadcast bundle: {exc}") from None
        for item, relays in chains:
            self._consider(sender, item, relays, current)

    def _consider(self, sender: int, item: Item, relays: dict[int, bytes], current: int) -> None:
        key = item.digest
        cls = self._classified.get(key, "")
        if cls == "":
            cls = self._classify(item)
            self._classified[key] = cls
        if cls is None:
            raise RemoteProtocolError(
                sender, f"item of server {item.author} with an invalid author signature"
            )
        if cls == CLEAR and not self.allow_clear:
            raise RemoteProtocolError(
                sender, f"unauthenticated item of server {item.author} in an authenticated phase"
            )
        values = self._values.get((item.author, cls), [])
        if any(v.item == item for v in values) or len(values) >= MAX_VALUES:
            return
        if cls == CLEAR and current == 1 and sender != item.author:
            raise RemoteProtocolError(
                sender, f"relayed an unauthenticated item of server {item.author} in round 1"
            )
        needed = current if cls == AUTH else current - 1
        base = 1 if cls == AUTH else 0
        statement = self._statement(item)
        good: dict[int, bytes] = {}
        # Verify relay signatures only until the chain is long enough: each check costs ~0.1 ms.
        for r, sig in sorted(relays.items()):
            if base + len(good) >= needed:
                break
            if r == item.author or not 1 <= r <= self.n:
                continue
            if not self._relay_verify(r, statement, sig):
                raise RemoteProtocolError(
                    sender, f"bad relay signature of server {r} on an item of {item.author}"
                )
            good[r] = sig
        if base + len(good) < needed:
            raise RemoteProtocolError(
                sender,
                f"item of server {item.author} with {base + len(good)} signatures in round {current}, "
                f"need {needed}",
            )
        self._accept(item, cls, good, current)

    def _statement(self, item: Item) -> bytes:
        key = item.digest
        statement = self._statements.get(key)
        if statement is None:
            statement = self._statements[key] = relay_statement(self.session, self.period, item)
        return statement

    def _accept(self, item: Item, cls: str, relays: dict[int, bytes], round_: int) -> None:
        values = self._values.setdefault((item.author, cls), [])
        values.append(_Value(item, cls, dict(relays), round_))
        if cls == AUTH and len(values) == 2:
            a, b = values[0].item, values[1].item
            self.alerts.append(
                Alert(
                    AlertKind.EQUIVOCATION,
                    item.author,
                    self.period,
                    "signed two different items in one broadcast phase",
                    evidence=(a.payload, a.signature, b.payload, b.signature),
                )
            )

    # Output --------------------------------------------------------------------

    def tick(self, now: float) -> list[Outgoing]:
        """Messages due by ``now``: our own item in round 1, then relays of newly accepted values."""
        out: list[Outgoing] = []
        current = self.round_at(now)
        if current >= 1 and not self._sent_own and self._own is not None:
            self._sent_own = True
            if current == 1:
                out.append(
                    Outgoing(EVERYONE, encode_bundle(self.session, self.period, self.me, [(self._own, {})]))
                )
        if current <= 1 or self._signer is None:
            return out
        chains: list[tuple[Item, dict[int, bytes]]] = []
        for values in self._values.values():
            for v in values:
                if v.relayed or v.accepted_round >= current or v.accepted_round >= self.rounds:
                    continue
                v.relayed = True
                if v.item.author == self.me or self.me in v.relays:
                    continue
                relays = dict(v.relays)
                relays[self.me] = self._signer.sign(self._statement(v.item))
                chains.append((v.item, relays))
        if chains and current <= self.rounds:
            out.append(Outgoing(EVERYONE, encode_bundle(self.session, self.period, self.me, chains)))
        return out

    def result(self) -> dict[int, dict[str, list[Item]]]:
        """Per author and class, the agreed distinct values (at most two)."""
        out: dict[int, dict[str, list[Item]]] = {}
        for (author, cls), values in sorted(self._values.items()):
            out.setdefault(author, {})[cls] = [v.item for v in values]
        return out

    def single_values(self) -> dict[int, Item]:
        """Authors with exactly one authenticated value (equivocators and silent servers left out)."""
        return {
            a: classes[AUTH][0] for a, classes in self.result().items() if len(classes.get(AUTH, [])) == 1
        }


# Wire format ---------------------------------------------------------------------


def encode_bundle(
    session: bytes, period: int, sender: int, chains: list[tuple[Item, dict[int, bytes]]]
) -> bytes:
    return encoding.encode(
        {
            "type": "bcast",
            "v": 1,
            "session": session,
            "period": period,
            "from": sender,
            "chains": [
                {
                    "author": item.author,
                    "payload": item.payload,
                    "sig": item.signature,
                    "relays": {r: s for r, s in relays.items()},
                }
                for item, relays in chains
            ],
        }
    )


def decode_bundle(
    data: bytes, session: bytes, period: int, n: int, max_payload: int = MAX_PAYLOAD
) -> list[tuple[Item, dict[int, bytes]]]:
    """Strictly decode a bundle for this phase; DecodeError names what is wrong."""
    obj = encoding.decode(data, max_size=4 * n * (max_payload + 128 * n) + 1024, what="broadcast bundle")
    fields = encoding.expect_map(
        obj,
        {"type": str, "v": int, "session": bytes, "period": int, "from": int, "chains": list},
        "broadcast bundle",
    )
    if fields["type"] != "bcast" or fields["v"] != 1:
        raise DecodeError("broadcast bundle: wrong type or version")
    if fields["period"] != period:
        raise DecodeError(f"broadcast bundle: period {fields['period']}, expected {period} (replayed?)")
    if fields["session"] != session:
        raise DecodeError("broadcast bundle: for another session (replayed or misrouted)")
    chains: list[Any] = fields["chains"]
    if len(chains) > 2 * MAX_VALUES * n:
        raise DecodeError(f"broadcast bundle: {len(chains)} chains, more than any phase can need")
    out = []
    for k, chain in enumerate(chains):
        c = encoding.expect_map(
            chain, {"author": int, "payload": bytes, "sig": bytes, "relays": dict}, f"broadcast chain {k}"
        )
        if not 1 <= c["author"] <= n:
            raise DecodeError(f"broadcast chain {k}: author {c['author']} outside 1..{n}")
        if len(c["payload"]) > max_payload:
            raise DecodeError(f"broadcast chain {k}: payload of {len(c['payload'])} bytes is too large")
        if len(c["sig"]) != 64:
            raise DecodeError(f"broadcast chain {k}: signature must be 64 bytes")
        relays: dict[int, bytes] = {}
        for r, s in c["relays"].items():
            if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= n:
                raise DecodeError(f"broadcast chain {k}: relayer id {r!r} invalid")
            if not isinstance(s, bytes) or len(s) != 64:
                raise DecodeError(f"broadcast chain {k}: relay signature of {r} must be 64 bytes")
            relays[r] = s
        out.append((Item(c["author"], c["payload"], c["sig"]), relays))
    return out

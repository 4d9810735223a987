"""A server's protocol core: one refresh per period, its data handed over between periods.

Sans-IO like the protocols it drives: ``tick(now)``, ``receive(sender, data, now)`` and
``next_wakeup(now)``. The simulator drives it in virtual time and keeps its data in
memory; the trio PServer drives it on the wall clock and persists each outcome through
``on_outcome`` before the next period starts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import cbor2
from nacl.signing import SigningKey

from appliance.crypto import encoding
from appliance.crypto.errors import DecodeError
from appliance.crypto.groups import ED25519
from appliance.crypto.keyshare import KeyShare
from appliance.crypto.secret import SecretScalar
from appliance.protocols._core import Outgoing, Signer
from appliance.protocols.approvals import APPROVALS, ApprovalService
from appliance.protocols.refresh import Outcome, PeriodRefresh, PrivateData, PublicData, Status
from appliance.protocols.services import RANDOM, TIME, RandomService, TimeService
from appliance.protocols.signing import SERVICE, SigningService
from appliance.protocols.state import SCERT, Constants


class ServerCore:
    """Runs PeriodRefresh for every period from ``first_period``; holds the current data."""

    def __init__(
        self,
        me: int,
        vstart: bytes,
        public: PublicData,
        private: PrivateData | None,
        clock: Constants,
        rand: Callable[[int], bytes],
        *,
        first_period: int = 1,
        on_outcome: Callable[[int, Outcome], None] | None = None,
        signing: bool = False,
    ) -> None:
        self.me = me
        self.vstart = vstart
        self.public: PublicData = public
        self.private: PrivateData | None = private
        self.on_outcome = on_outcome
        self.signing: SigningService | None = None
        self.time: TimeService | None = None
        self.random: RandomService | None = None
        self.approvals: ApprovalService | None = None
        #: Distributed applications with a client at this server: name -> password verifier.
        #: The node replaces or updates it (e.g. with a view of the API's registrations).
        self.distributed_clients: Mapping[str, bytes] = {}
        self.signing_enabled = signing
        #: Which protocol payloads our signing service may sign on request (the node sets it).
        self.allow_protocol: Callable[[bytes], bool] = lambda _message: False
        #: Periods whose refresh starts earlier than the clock says (``pst refresh --now``).
        self.overrides: dict[int, float] = {}

        self.clock = clock
        self.rand = rand
        self.engine: PeriodRefresh | None = None
        self.next_period = first_period
        self.outcomes: dict[int, Outcome] = {}
        self.rejected: list[str] = []
        self._early: list[tuple[int, bytes, float, int]] = []

    def request_refresh(self, period: int, start: float) -> None:
        """Run the refresh of ``period`` at ``start`` (earlier than its natural start)."""
        if period >= self.next_period and start < self.clock.period_start(period):
            self.overrides[period] = start

    def period_at(self, now: float) -> int:
        forced = [p for p, t in self.overrides.items() if t <= now]
        return max([self.clock.period_at(now), *forced])

    @property
    def status(self) -> Status:
        last = max(self.outcomes) if self.outcomes else None
        return self.outcomes[last].status if last is not None else Status.OPERATIONAL

    def _start(self, period: int, now: float) -> None:
        self.engine = PeriodRefresh(
            me=self.me,
            period=period,
            vstart=self.vstart,
            public=self.public,
            private=self.private,
            rand=self.rand,
            start=self.overrides.get(period),
        )
        self.next_period = period + 1
        early, self._early = self._early, []
        for sender, data, at, p in early:
            if p == period:
                self.engine.receive(sender, data, max(at, now))
            elif p > period:
                self._early.append((sender, data, at, p))

    def start_signing(self) -> None:
        """Open the signing service for the data we hold, if it is a valid operational state."""
        if self.signing is not None:
            self.signing.wipe()
            self.signing = None
        self.time = None
        self.random = None
        self.approvals = None
        public, private = self.public, self.private
        table = public.key_table
        sharing = public.sharings.get(SCERT)
        if table is None or private is None or sharing is None or private.period != table.period:
            return
        if private.carried:  # the last refresh was not confirmed: these shares wait for the next one
            return
        share = private.shares.get(SCERT)
        if share is None or share.wiped:
            return
        key = KeyShare(self.me, SecretScalar(share.value, ED25519.order), sharing)
        entry = table.entries.get(self.me)
        signer = Signer(SigningKey(private.signing_seed))
        if entry is None or entry.verify_key != signer.public or not key.check(ED25519):
            return
        self.time = TimeService(me=self.me, table=table, signer=signer)
        self.random = RandomService(
            me=self.me, t=self.clock.t, table=table, signer=signer, key=key, rand=self.rand
        )
        self.signing = SigningService(
            me=self.me,
            t=self.clock.t,
            table=table,
            key=key,
            signer=signer,
            rand=self.rand,
            allow_protocol=self.allow_protocol,
        )
        self.signing.start()
        self.approvals = ApprovalService(
            me=self.me,
            n=self.clock.n,
            table=table,
            signer=signer,
            clients=lambda app: self.distributed_clients.get(app),
            forward=self.signing.receive,
        )

    def tick(self, now: float) -> list[Outgoing]:
        out = self._tick_refresh(now)
        if self.signing is not None:
            out += self.signing.tick(now)
        if self.time is not None:
            out += self.time.tick(now)
        if self.random is not None:
            out += self.random.tick(now)
        if self.approvals is not None:
            out += self.approvals.tick(now)
        return out

    def _tick_refresh(self, now: float) -> list[Outgoing]:
        period = self.period_at(now)
        if period >= self.next_period and (self.engine is None or self.engine.outcome is not None):
            self._start(period, now)
        if self.engine is None:
            return []
        out = self.engine.tick(now)
        if self.engine.outcome is not None and self.engine.period not in self.outcomes:
            self._persist(self.engine.outcome)
        return out

    def next_wakeup(self, now: float) -> float | None:
        if self.signing is not None and self.signing.pending:
            return now + 0.01
        if self.time is not None and self.time.pending:
            return now + 0.05
        if self.random is not None and self.random.pending:
            return now + 0.01
        if self.approvals is not None and self.approvals.pending_work:
            return now + 0.05
        if self.engine is not None and self.engine.outcome is None:
            wake = self.engine.next_wakeup(now)
            if wake is not None:
                return wake
        upcoming = max(self.next_period, self.period_at(now) + 1)
        start = self.overrides.get(upcoming, self.clock.period_start(upcoming))
        return start + 1e-6

    def _persist(self, outcome: Outcome) -> None:
        assert self.engine is not None
        self.outcomes[self.engine.period] = outcome
        self.rejected += [str(r) for r in self.engine.rejected]
        for service in (self.signing, self.time, self.random, self.approvals):
            if service is not None:
                self.rejected += [str(r) for r in service.rejected]
                service.rejected.clear()
        old = self.private
        if self.on_outcome is not None:
            self.on_outcome(self.engine.period, outcome)  # persist before anything is wiped
        self.public, self.private = outcome.public, outcome.private
        if old is not None and old is not outcome.private:
            old.wipe()
        if outcome.status == Status.OPERATIONAL and self.signing_enabled:
            self.start_signing()
        elif self.signing is not None:
            self.signing.wipe()
            self.signing = None
            self.approvals = None

    def receive(self, sender: int, data: bytes, now: float) -> None:
        try:
            raw: Any = cbor2.loads(data)
        except Exception:
            raw = None
        if isinstance(raw, dict) and raw.get("svc") in (SERVICE, TIME, RANDOM, APPROVALS):
            obj = _strict(data)
            if isinstance(obj, dict):
                if obj["svc"] == SERVICE and self.approvals is not None:
                    self.approvals.screen(sender, obj, now)  # distributed payloads need a majority
                elif obj["svc"] == SERVICE and self.signing is not None:
                    self.signing.receive(sender, obj, now)
                elif obj["svc"] == APPROVALS and self.approvals is not None:
                    self.approvals.receive(sender, obj, now)
                elif obj["svc"] == TIME and self.time is not None:
                    self.time.receive(sender, obj, now)
                elif obj["svc"] == RANDOM and self.random is not None:
                    self.random.receive(sender, obj, now)
            return
        period = raw.get("period") if isinstance(raw, dict) else None
        period = period if isinstance(period, int) and not isinstance(period, bool) else None
        if period is None:
            self.rejected.append(f"server {sender}: undecodable message")
            return
        if self.engine is not None and self.engine.period == period and self.engine.outcome is None:
            self.engine.receive(sender, data, now)
        elif period >= self.next_period and period <= self.period_at(now) + 1:
            if len(self._early) < 10_000:
                self._early.append((sender, data, now, period))
            else:
                self.rejected.append(
                    f"server {sender}: too many early messages; dropped one for period {period}"
                )
        elif period < self.next_period:
            self.rejected.append(
                f"server {sender}: message for period {period}, whose refresh is over (replayed or late)"
            )
        else:
            self.rejected.append(f"server {sender}: message for period {period}, too far in the future")


def _strict(data: bytes) -> Any:
    """A message decoded strictly, or None (only routing looks at it before the protocols do)."""
    try:
        return encoding.decode(data, what="message")
    except DecodeError:
        return None

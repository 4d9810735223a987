"""A server's protocol core: one refresh per period, its data handed over between periods.

Sans-IO like the protocols it drives: ``tick(now)``, ``receive(sender, data, now)`` and
``next_wakeup(now)``. The simulator drives it in virtual time and keeps its data in
memory; the trio PServer drives it on the wall clock and persists each outcome through
``on_outcome`` before the next period starts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from nacl.signing import SigningKey

from appliance.crypto import encoding
from appliance.crypto.annkey import AnnouncementSigner
from appliance.crypto.errors import DecodeError
from appliance.crypto.groups import ED25519
from appliance.crypto.keyshare import KeyShare
from appliance.crypto.secret import SecretScalar
from appliance.protocols._core import Alert, Outgoing, Signer
from appliance.protocols.approvals import APPROVALS, ApprovalService
from appliance.protocols.dss_signing import DSSSigningService
from appliance.protocols.refresh import (
    MAX_MESSAGE,
    CodeCheck,
    CodeCheckRequest,
    Durable,
    MemoryDurable,
    Outcome,
    PeriodRefresh,
    PrivateData,
    PublicData,
    Status,
)
from appliance.protocols.services import RANDOM, TIME, RandomService, TimeService
from appliance.protocols.signing import SERVICE, PayloadCheck, SigningService, service_name
from appliance.protocols.state import APP_KEY_SECRETS, SCERT, Constants, KeyTable

#: Groups whose secrets sign with threshold DSS (protocols/dss_signing.py) rather than FROST.
DSS_GROUPS = frozenset({"p256", "dsa2048"})
#: Early messages kept per peer (for a period we have not started yet).
MAX_EARLY = 256
MAX_EARLY_BYTES = 4 * 1024 * 1024


class ServerCore:
    """Runs a PeriodRefresh for every period the clock starts; holds the current data.

    A period's data changes only when its refresh decides (see :mod:`~appliance.protocols.refresh`):
    the decided outcome is persisted through ``on_outcome``, then the engine is rebuilt from
    what was persisted (as a new key-holder child would) to sign the KeyTable and recover
    the recovering servers. A refresh that has not decided when the next period is due keeps
    running; one that decided but did not complete gives way to the next period.
    """

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
        durable: Durable | None = None,
        resume_in_place: bool = True,
        forget_at_retire: bool = False,
        code: CodeCheck | None = None,
        ann_key: AnnouncementSigner | None = None,
    ) -> None:
        self.code = code
        #: The announcement key (the ROM's TPM), if any: signs our clear announcements (issue 8).
        self.ann_key = ann_key
        self.me = me
        self.vstart = vstart
        self.public: PublicData = public
        self.private: PrivateData | None = private
        self.on_outcome = on_outcome
        self.durable: Durable = durable if durable is not None else MemoryDurable()
        #: After a decision, resume in this process (the simulation) or leave it to the next
        #: key-holder child, which starts from what was persisted (the node).
        self.resume_in_place = resume_in_place
        #: Model the node's key-holder child retiring at every outcome of a period it did not
        #: resume (a decision, a period given up or overtaken): the messages it held for later
        #: (early ones, the engine's held ones) die with it. The simulation sets this so that no
        #: protocol step relies on a message kept across that boundary.
        self.forget_at_retire = forget_at_retire
        self.signing: SigningService | None = None
        #: Signing services of the other Ed25519 secrets of C (e.g. a log's own key), by secret id.
        self.key_signing: dict[str, SigningService] = {}
        #: Threshold DSS services (P-256 ECDSA, DSA) of the DSS secrets of C, by secret id.
        self.dss_signing: dict[str, DSSSigningService[Any]] = {}
        #: Application payload checks per secret id (the node registers them, e.g. the log's
        #: checkpoint guard). A key other than scert signs only what its checks accept.
        self.payload_checks: dict[str, list[PayloadCheck]] = {}
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
        self.next_period = max(first_period, public.decided_period + 1)
        self.outcomes: dict[int, Outcome] = {}
        #: Every alert of every outcome persisted (an outcome holds its own engine's only).
        self.alert_log: list[Alert] = []
        self._persisted: tuple[int, int] = (-1, 0)
        self.rejected: list[str] = []
        self._early: dict[int, list[tuple[int, str, Any, int, float]]] = {}
        self._late_answered: dict[int, float] = {}
        #: (left, joined): undecided refreshes we left for a later one t+1 peers ran.
        self.moved_up: list[tuple[int, int]] = []
        self._late_out = []

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
            durable=self.durable,
            now=now,
            code=self.code,
            ann_key=self.ann_key,
        )
        self.next_period = period + 1
        for sender in sorted(self._early):
            keep = []
            for p, phase, body, size, at in self._early[sender]:
                if p == period:
                    self.engine.receive(sender, phase, body, size, max(at, now))
                elif p > period:
                    keep.append((p, phase, body, size, at))
            self._early[sender] = keep

    def start_signing(self) -> None:
        """Open the signing service for the data we hold, if it is a valid operational state."""
        self._stop_signing()
        self.time = None
        self.random = None
        self.approvals = None
        public, private = self.public, self.private
        table = public.key_table
        sharing = public.sharings.get(SCERT)
        if table is None or private is None or sharing is None or private.period != table.period:
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
            checks=self.payload_checks.get(SCERT, ()),
        )
        self.signing.start()
        for sid in sorted(self.clock.secrets):
            other = self._key_share(sid)
            if sid == SCERT or other is None:
                continue
            self.key_signing[sid] = SigningService(
                me=self.me,
                t=self.clock.t,
                table=table,
                key=other,
                signer=signer,
                rand=self.rand,
                service=service_name(sid),
                checks=self.payload_checks.get(sid, ()),
                only_checked=True,
            )
            self.key_signing[sid].start()
        for sid in sorted(self.clock.secrets):
            dss_key = self._dss_share(sid)
            if dss_key is None:
                continue
            self.dss_signing[sid] = DSSSigningService(
                me=self.me,
                t=self.clock.t,
                table=table,
                group=self.clock.group(sid),
                key=dss_key,
                signer=signer,
                rand=self.rand,
                service=service_name(sid),
                checks=self.payload_checks.get(sid, ()),
                # The application keys' secrets sign only what their check accepts.
                only_checked=sid in APP_KEY_SECRETS.values(),
            )
        self.approvals = ApprovalService(
            me=self.me,
            n=self.clock.n,
            table=table,
            signer=signer,
            clients=lambda app: self.distributed_clients.get(app),
            forward=self.signing.receive,
        )

    def _key_share(self, sid: str) -> KeyShare[bytes] | None:
        """Our valid share of Ed25519 secret ``sid`` for the current period, if we hold one."""
        if self.clock.secrets.get(sid) != "ed25519" or self.private is None:
            return None
        sharing, share = self.public.sharings.get(sid), self.private.shares.get(sid)
        if sharing is None or share is None or share.wiped:
            return None
        key = KeyShare(self.me, SecretScalar(share.value, ED25519.order), sharing)
        return key if key.check(ED25519) else None

    def _dss_share(self, sid: str) -> KeyShare[Any] | None:
        """Our valid share of DSS secret ``sid`` (P-256 or DSA) for the current period, if we hold one."""
        if self.clock.secrets.get(sid) not in DSS_GROUPS or self.private is None:
            return None
        sharing, share = self.public.sharings.get(sid), self.private.shares.get(sid)
        if sharing is None or share is None or share.wiped:
            return None
        group = self.clock.group(sid)
        key: KeyShare[Any] = KeyShare(self.me, SecretScalar(share.value, group.order), sharing)
        return key if key.check(group) else None

    def _stop_signing(self) -> None:
        # The period's presignatures go with its shares (they are tied to the old sharing).
        for service in (self.signing, *self.key_signing.values(), *self.dss_signing.values()):
            if service is not None:
                service.wipe()
        self.signing = None
        self.key_signing = {}
        self.dss_signing = {}

    def dss_service(self, secret: str) -> DSSSigningService[Any] | None:
        """The threshold DSS service of ``secret`` this period (None when we cannot sign with it now)."""
        return self.dss_signing.get(secret)

    def signing_service(self, secret: str = SCERT) -> SigningService | None:
        """The signing service of ``secret`` this period (None when we cannot sign with it now)."""
        return self.signing if secret == SCERT else self.key_signing.get(secret)

    def add_payload_check(self, secret: str, check: PayloadCheck) -> None:
        """Register an application's check on what ``secret`` signs (takes effect at once)."""
        self.payload_checks.setdefault(secret, []).append(check)
        service: SigningService | DSSSigningService[Any] | None = self.signing_service(secret)
        if service is None:
            service = self.dss_signing.get(secret)
        if service is not None and check not in service.checks:
            service.checks.append(check)

    _late_out: list[Outgoing]

    def tick(self, now: float) -> list[Outgoing]:
        out = self._tick_refresh(now)
        out += self._late_out
        self._late_out = []
        if self.signing is not None:
            out += self.signing.tick(now)
        for service in self.key_signing.values():
            out += service.tick(now)
        for dss_service in self.dss_signing.values():
            out += dss_service.tick(now)
        if self.time is not None:
            out += self.time.tick(now)
        if self.random is not None:
            out += self.random.tick(now)
        if self.approvals is not None:
            out += self.approvals.tick(now)
        return out

    def _tick_refresh(self, now: float) -> list[Outgoing]:
        self._persist_if_changed(now)
        engine = self.engine
        if engine is None or engine.complete:
            if not self.public.complete and self.private is not None:
                # A decided period whose KeyTable is not signed yet (we restarted after the decision).
                self._start(self.public.decided_period, now)
            else:
                period = self.period_at(now)
                if period >= self.next_period and period > self.public.decided_period:
                    self._start(period, now)
        elif engine.decided and self.period_at(now) > engine.period:
            engine.give_up(now)
        elif not engine.decided:
            ahead = self._period_ahead(engine.period)
            if ahead is not None:
                self._move_up(engine, ahead, now)
        engine = self.engine
        if engine is None:
            return []
        out = engine.tick(now)
        self._persist_if_changed(now)
        return out

    def take_code_request(self) -> CodeCheckRequest | None:
        """A recovering server's code check the owner must now run off its event loop (at most
        once per request), handing the result back with :meth:`code_checked`; the refresh goes
        on meanwhile but rebuilds no share before the result says the code is the code in force."""
        return self.engine.take_code_request() if self.engine is not None else None

    def code_checked(self, request: CodeCheckRequest, problem: str | None, now: float) -> None:
        """The result of a code check (None: the installed code is the code in force): an event
        for the engine that asked for it (an engine that has given way to another ignores it)."""
        engine = self.engine
        if engine is not None and engine.period == request.period:
            engine.code_checked(request, problem, now)
            self._persist_if_changed(now)

    def _period_ahead(self, period: int) -> int | None:
        """The latest period after ``period`` that at least t+1 peers already run, if any.

        t+1 senders of messages for a later period include an honest server that started it:
        the network has moved on (a server restarted after a refresh began starts the clock's
        period). Waiting on our undecided period then never ends: the peers hold our messages
        as early, and we hold theirs.
        """
        latest = sorted(
            (max(p for p, *_ in held) for held in self._early.values() if any(p > period for p, *_ in held)),
            reverse=True,
        )
        t = self.clock.t
        return latest[t] if len(latest) > t else None

    def _move_up(self, engine: PeriodRefresh, period: int, now: float) -> None:
        """Leave our undecided ``engine`` for ``period``, which t+1 peers run (see _period_ahead).

        As a server restarted in ``period`` would: the undecided refresh changed no share (a
        refresh's old shares go only at its decision), and if the network decided it after all,
        the later refresh finds the newer KeyTable and recovers us, as for a server that was
        down. Its pending records (period keys, announcement, votes) are erased: we will never
        speak in that period again.
        """
        self.durable.forget(engine.period)
        self.engine = None
        self.moved_up.append((engine.period, period))
        self._start(period, now)

    def _persist_if_changed(self, now: float) -> None:
        engine = self.engine
        if engine is None or engine.outcome is None:
            return
        if (engine.period, engine.outcome_version) == self._persisted:
            return
        self._persisted = (engine.period, engine.outcome_version)
        self._persist(engine.outcome)
        if self.forget_at_retire and not engine.resumed:
            self._early = {}
            engine.take_held()
        if not engine.complete:
            # Decided: old shares are gone with this engine; a fresh one signs and recovers,
            # built from what was persisted (exactly as a new key-holder child would).
            self.durable.forget(engine.period)
            self.engine = None
            if not self.resume_in_place:
                return
            self._start(engine.period, now)
            self._persisted = (engine.period, 0)
            assert self.engine is not None
            self.engine.give_held(engine.take_held(), now)

    def next_wakeup(self, now: float) -> float | None:
        if any(s.pending for s in (self.signing, *self.key_signing.values()) if s is not None):
            return now + 0.01
        if any(s.pending for s in self.dss_signing.values()):
            return now + 0.01
        if self.time is not None and self.time.pending:
            return now + 0.05
        if self.random is not None and self.random.pending:
            return now + 0.01
        if self.approvals is not None and self.approvals.pending_work:
            return now + 0.05
        if self.engine is not None and not self.engine.complete:
            wake = self.engine.next_wakeup(now)
            if wake is not None:
                # The next period's start counts too, an early one (pst refresh --now) included:
                # a recovering server's engine stays incomplete, and it must not start late.
                return min(wake, self._start_of(self.period_at(now) + 1))
        return self._start_of(max(self.next_period, self.period_at(now) + 1))

    def _start_of(self, period: int) -> float:
        """When we start ``period``'s refresh: its clock time, or the earlier one it was asked for."""
        return self.overrides.get(period, self.clock.period_start(period)) + 1e-6

    def _persist(self, outcome: Outcome) -> None:
        assert self.engine is not None
        period = self.engine.period
        self.outcomes[period] = outcome
        for a in outcome.alerts:
            if a not in self.alert_log:
                self.alert_log.append(a)
        self.rejected += [str(r) for r in self.engine.rejected]
        self.engine.rejected.clear()
        for service in (
            self.signing,
            *self.key_signing.values(),
            *self.dss_signing.values(),
            self.time,
            self.random,
            self.approvals,
        ):
            if service is not None:
                self.rejected += [str(r) for r in service.rejected]
                service.rejected.clear()
        old = self.private
        if self.on_outcome is not None:
            self.on_outcome(period, outcome)  # persist before anything is wiped
        self.public, self.private = outcome.public, outcome.private
        if old is not None and old is not outcome.private:
            old.wipe()
        if outcome.status == Status.OPERATIONAL and self.signing_enabled and self.public.complete:
            self.start_signing()
        elif self.signing is not None:
            self._stop_signing()
            self.approvals = None

    def receive(self, sender: int, data: bytes, now: float) -> None:
        """One message from a peer, decoded once (size-capped) and routed; bad input is recorded."""
        try:
            obj = encoding.decode(data, max_size=MAX_MESSAGE, what="message")
        except DecodeError as exc:
            self.rejected.append(f"server {sender}: {exc}")
            return
        if not isinstance(obj, dict):
            self.rejected.append(f"server {sender}: a message must be a map")
            return
        svc = obj.get("svc")
        if svc is not None:
            if svc == SERVICE and self.approvals is not None:
                self.approvals.screen(sender, obj, now)  # distributed payloads need a majority
            elif svc == SERVICE and self.signing is not None:
                self.signing.receive(sender, obj, now)
            elif isinstance(svc, str) and svc.startswith(SERVICE + "/"):
                keyed = self.key_signing.get(svc[len(SERVICE) + 1 :])
                dss_keyed = self.dss_signing.get(svc[len(SERVICE) + 1 :])
                if keyed is not None:
                    keyed.receive(sender, obj, now)
                elif dss_keyed is not None:
                    dss_keyed.receive(sender, obj, now)
            elif svc == APPROVALS and self.approvals is not None:
                self.approvals.receive(sender, obj, now)
            elif svc == TIME and self.time is not None:
                self.time.receive(sender, obj, now)
            elif svc == RANDOM and self.random is not None:
                self.random.receive(sender, obj, now)
            return
        period, phase, body = obj.get("period"), obj.get("phase"), obj.get("body")
        if type(period) is not int or not isinstance(phase, str) or set(obj) != {"period", "phase", "body"}:
            self.rejected.append(f"server {sender}: malformed refresh message")
            return
        engine = self.engine
        if engine is not None and engine.period == period:
            engine.receive(sender, phase, body, len(data), now)
            return
        if engine is not None and period > engine.period and phase == "pushm" and isinstance(body, dict):
            # A peer has moved on: its PushM carries the transcript of the period we are still in.
            transcript, table = body.get("transcript"), body.get("keytable")
            if isinstance(transcript, bytes) and not engine.decided:
                engine.receive(sender, "catchup", transcript, len(data), now)
            if isinstance(table, bytes) and not engine.decided and engine.overtaken(table):
                self._persist_if_changed(now)
            if isinstance(table, bytes) and engine.resumed and not engine.complete:
                try:
                    signed = KeyTable.decode(table)
                except DecodeError:
                    signed = None
                if signed is not None and signed.period == engine.period:
                    engine.receive(sender, "kt-sig", signed.signature, len(data), now)
                elif signed is not None and signed.period > engine.period and engine.superseded(table):
                    self._persist_if_changed(now)
        if period >= self.next_period and period <= self.period_at(now) + 1:
            held = self._early.setdefault(sender, [])
            if len(held) < MAX_EARLY and sum(x[3] for x in held) + len(data) <= MAX_EARLY_BYTES:
                held.append((period, phase, body, len(data), now))
            else:
                self.rejected.append(
                    f"server {sender}: too many early messages; dropped one for period {period}"
                )
        elif period <= self.public.decided_period:
            self._answer_late(sender, period, now)
        else:
            self.rejected.append(f"server {sender}: message for period {period}, too far in the future")

    def _answer_late(self, sender: int, period: int, now: float) -> None:
        """A peer still in a period we decided: send it the transcript (at most once a second)."""
        transcript = self.public.transcript
        if transcript is None or transcript.period != period:
            self.rejected.append(
                f"server {sender}: message for period {period}, whose refresh is over (replayed or late)"
            )
            return
        if now - self._late_answered.get(sender, -1e9) < 1.0:
            return
        self._late_answered[sender] = now
        self._late_out.append(
            Outgoing(
                sender, encoding.encode({"period": period, "phase": "catchup", "body": transcript.encode()})
            )
        )
        table = self.public.key_table
        if self.public.complete and table is not None and table.period == period:
            # The signed KeyTable too: a peer whose KeyTable is older than the transcript's
            # members cannot check the transcript, but it can check this with Vcert and recover.
            signed = {"period": period, "phase": "signed-kt", "body": table.encode()}
            self._late_out.append(Outgoing(sender, encoding.encode(signed)))

"""The PServer under trio: the protocol core on the wall clock, its data on disk.

Theory of operation
-------------------
One task drives :class:`~appliance.protocols.core.ServerCore`: it feeds it the
messages the transport delivers and ticks it at the wakeups it asks for (round
boundaries, period starts). Every outcome of a refresh is persisted (private data
first) before the core moves on; then the transport is re-keyed with the new
KeyTable and our new period key, and the previous period's keys are dropped. The
status file and the alert log are rewritten after each refresh so that ``pst status``
and ``pst alerts`` can read them without talking to the server.

All background work lives in a nursery that :meth:`run` owns; cancelling it stops the
server cleanly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import trio

from appliance.api._core import app_digest_payload
from appliance.apps.log.checkpoint import Checkpoint
from appliance.apps.log.guard import checkpoint_note
from appliance.boot.backends import announcement_key, open_rom
from appliance.boot.check import code_mismatches
from appliance.boot.rom import Rom
from appliance.boot.upgrade import ChainCheck, approved, is_upgrade_payload, read_approval
from appliance.crypto import dss, encoding
from appliance.host.config import NodeConfig
from appliance.host.files import atomic_write
from appliance.node.store import PendingRecords, StateDir
from appliance.protocols._core import Alert, AlertKind
from appliance.protocols.core import DSS_GROUPS, ServerCore
from appliance.protocols.dss_signing import DSSSigningService
from appliance.protocols.refresh import (
    CodeCheck,
    CodeCheckRequest,
    Outcome,
    PublicData,
    Status,
    current_table,
)
from appliance.protocols.services import RandomService, TimeService
from appliance.protocols.signing import PayloadCheck, SigningRefused, SigningService, refusal_code
from appliance.protocols.state import APP_KEY_SECRETS, SCERT

log = logging.getLogger("pst.server")

#: How many refresh records status.json keeps (``recent_refreshes``, oldest first).
RECENT_REFRESHES = 20


class Transport(Protocol):
    """What the PServer needs from the network layer."""

    def send(self, to: int, data: bytes) -> None: ...

    async def rekey(self, period: int, keys: Mapping[int, bytes], seed: bytes) -> None: ...


Deliver = Callable[[int, bytes], None]
TransportFactory = Callable[[NodeConfig, "PServer", trio.Nursery, Deliver], Awaitable[Transport]]


def period_keys(public: PublicData) -> dict[int, bytes]:
    """The period keys of the last decided KeyTable (signed or not yet): the channels' anchors."""
    table = current_table(public)
    return {i: e.verify_key for i, e in table.entries.items()} if table is not None else {}


class PServer:
    def __init__(
        self,
        config: NodeConfig,
        transport_factory: TransportFactory,
        *,
        clock: Callable[[], float] = time.time,
        rand: Callable[[int], bytes] = os.urandom,
        status_extra: Mapping[str, Any] | None = None,
        status_pid: int | None = None,
        warmup: float = 0.0,
        rom: Rom | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.rand = rand
        self.store = StateDir(config.state_dir)
        self._transport_factory = transport_factory
        self.transport: Transport | None = None
        self.core: ServerCore | None = None
        self.rom: Rom = rom if rom is not None else open_rom(config)
        self.last_refresh: dict[str, Any] = {}
        self.recent_refreshes: list[dict[str, Any]] = []
        self._refresh_started: dict[int, float] = {}
        self._pending_rekey: tuple[int, dict[int, bytes], bytes] | None = None
        self._channel_period = -1
        self._waiting: dict[
            tuple[int, int],
            tuple[trio.Event, SigningService | DSSSigningService[Any] | TimeService | RandomService],
        ] = {}
        self._poke: Callable[[], None] = lambda: None
        self._status_extra = dict(status_extra or {})
        self._status_pid = status_pid if status_pid is not None else os.getpid()
        #: A freshly started server skips a refresh that begins within ``warmup`` seconds:
        #: its connections are not up yet (the others treat it as recovering for that period).
        self.warmup = warmup
        #: The key-holder sets this: after a refresh outcome is persisted and the channels
        #: re-keyed, :meth:`run` returns and :attr:`retired` is set (the process then exits).
        self.retire_after_refresh = False
        self.retired = trio.Event()
        self._retire = False
        #: A refresh decided by the previous key-holder child and not yet complete (status.json).
        self._in_progress: dict[str, Any] = {}
        #: Applications' payload checks by secret id (:meth:`add_payload_check`).
        self._payload_checks: list[tuple[str, PayloadCheck]] = []
        #: Results of code checks run off the loop, for the core (:meth:`_check_code`).
        self._code_results: list[tuple[CodeCheckRequest, str | None]] = []
        self._code_lock = trio.Lock()

    # Startup ------------------------------------------------------------------------------

    def _load(self) -> ServerCore:
        vstart = self.rom.read_vstart()
        loaded = self.store.load(erase_crash_leftovers=True)  # we alone write private/ now
        for problem in loaded.problems:
            log.warning("state: %s (will be recovered from peers at the next refresh)", problem)
        if loaded.private_unusable is not None:
            table = loaded.public.key_table
            period = table.period if table is not None else self.config.constants.period_at(self.clock())
            self._private_unusable(loaded.private_unusable, period)
        c = self.config.constants
        # No round schedule to miss: a server (re)started during a period's refresh joins it
        # (its pending records make it say what it said before); see ServerCore for the rest.
        done = loaded.private.period if loaded.private is not None else -1
        first = max(done + 1, 1)
        core = ServerCore(
            self.config.server_id,
            vstart,
            loaded.public,
            loaded.private,
            c,
            self.rand,
            first_period=first,
            on_outcome=self._persist,
            signing=True,
            durable=PendingRecords(self.store),
            # The key-holder retires at a decision (the old shares die with it); the next child
            # signs the KeyTable and recovers the recovering servers from what was persisted.
            resume_in_place=not self.retire_after_refresh,
            code=ChainCheck(
                self.store.public_dir,
                lambda c: [str(m) for m in code_mismatches(c, self.config.state_dir)],
            ),
            # Where the ROM is a TPM, it signs our key announcements (issue 8); M says whether
            # the network knows the key (a network initialized without it keeps today's rule).
            ann_key=announcement_key(self.config),
        )
        for secret, check in self._payload_checks:
            core.add_payload_check(secret, check)
        public_dir = self.store.public_dir
        # A code upgrade our operator approved is the one protocol payload we sign on request.
        core.allow_protocol = lambda message: is_upgrade_payload(message) and approved(public_dir, message)
        return core

    def _private_unusable(self, problem: str, period: int) -> None:
        """Our private state exists but cannot be used: an alert, and the file out of the way."""
        try:
            moved = self.store.set_aside_private(self.clock())
            where = f"moved to {moved}: inspect it, then erase it (it may hold shares)"
        except OSError as exc:
            where = (
                f"could not be moved aside ({exc.strerror}): new shares cannot be saved until "
                "the state directory's owner and modes are fixed"
            )
        detail = (
            f"private state unusable: {problem}; {where}; this server starts recovering and the "
            "others restore its shares at the next refresh"
        )
        self._record_alerts(
            [Alert(AlertKind.PRIVATE_STATE_UNREADABLE, self.config.server_id, period, detail)]
        )

    def _persist(self, period: int, outcome: Outcome) -> None:
        core = self.core
        finishing = core is not None and core.engine is not None and core.engine.resumed
        if self.retire_after_refresh and not finishing:
            self._retire = True  # a decision, or a period given up: the old secrets die with us
        started = self._refresh_started.get(period, self.clock())
        if finishing and self._in_progress.get("period") == period:
            started = float(self._in_progress.get("started", started))  # the decision's child started it
        self.store.save(outcome.public, outcome.private, superseded=outcome.superseded)
        table = current_table(outcome.public)
        # Channels follow the certified KeyTable we now hold (after an aborted refresh, that is
        # still the old one, and the channels stay as they are).
        private = outcome.private
        if (
            private is not None
            and table is not None
            and private.period == table.period > self._channel_period
        ):
            self._channel_period = table.period
            self._pending_rekey = (table.period, period_keys(outcome.public), private.signing_seed)
        if finishing or outcome.public.complete:
            self.last_refresh = self._refresh_record(period, outcome, started)
            older = [r for r in self.recent_refreshes if r.get("period") != period]
            self.recent_refreshes = [*older, self.last_refresh][-RECENT_REFRESHES:]
            self._in_progress = {}
        else:
            self._in_progress = {"period": period, "started": started, "decided": self.clock()}
        self._record_alerts(outcome.alerts)
        self._write_status(outcome.public, outcome.status)
        log.info(
            "period %d: %s in %.3f s%s",
            period,
            "decided" if not outcome.public.complete else outcome.status.value,
            self.clock() - started,
            f" ({outcome.failure})" if outcome.failure else "",
        )
        if core is not None:
            for reason in core.rejected[:50]:
                log.warning("rejected a message: %s", reason)
            if len(core.rejected) > 50:
                log.warning("... and %d more rejected messages this period", len(core.rejected) - 50)
            core.rejected.clear()

    def _refresh_record(self, period: int, outcome: Outcome, started: float) -> dict[str, Any]:
        return {
            "period": period,
            "status": outcome.status.value,
            "finished": self.clock(),
            "duration_s": round(self.clock() - started, 3),
            "failure": outcome.failure,
        }

    def _record_alerts(self, alerts: list[Alert]) -> None:
        """Log each alert and append it to ``alerts.jsonl`` (what ``pst alerts`` shows)."""
        if not alerts:
            return
        with open(self.store.public_dir / "alerts.jsonl", "a", encoding="utf-8") as f:
            for alert in alerts:
                log.warning("%s", alert)
                line = {
                    "time": self.clock(),
                    "kind": alert.kind.value,
                    "server": alert.server,
                    "period": alert.period,
                    "detail": alert.detail,
                }
                f.write(json.dumps(line) + "\n")

    def _service_alerts(self, core: ServerCore) -> None:
        """Alerts the services raise between refreshes (a bad signature share, a forged vote)."""
        for service in (core.signing, *core.key_signing.values(), *core.dss_signing.values(), core.approvals):
            if service is not None and service.alerts:
                alerts, service.alerts = list(service.alerts), []
                self._record_alerts(alerts)

    def _previous_last_refresh(self) -> dict[str, Any]:
        """The last refresh as the previous key-holder of this server reported it."""
        try:
            previous = json.loads((self.store.public_dir / "status.json").read_text())
        except (OSError, ValueError):
            return {}
        last = previous.get("last_refresh") if isinstance(previous, dict) else None
        return last if isinstance(last, dict) else {}

    def _previous_recent_refreshes(self) -> list[dict[str, Any]]:
        """The last refreshes as the previous key-holder of this server reported them."""
        try:
            previous = json.loads((self.store.public_dir / "status.json").read_text())
        except (OSError, ValueError):
            return []
        recent = previous.get("recent_refreshes") if isinstance(previous, dict) else None
        if not isinstance(recent, list):
            return []
        return [r for r in recent if isinstance(r, dict)][-RECENT_REFRESHES:]

    def _previous_in_progress(self) -> dict[str, Any]:
        try:
            previous = json.loads((self.store.public_dir / "status.json").read_text())
        except (OSError, ValueError):
            return {}
        value = previous.get("refresh_in_progress") if isinstance(previous, dict) else None
        return value if isinstance(value, dict) else {}

    def _write_status(self, public: PublicData, status: Status) -> None:
        table = public.key_table
        sharing = public.sharings.get(SCERT)
        body = {
            "server": self.config.server_id,
            "period": table.period if table is not None else None,
            "status": status.value,
            "last_refresh": self.last_refresh,
            "refresh_in_progress": self._in_progress or None,
            "keytable_fingerprint": table.fingerprint() if table is not None else None,
            "keytable_members": sorted(table.entries) if table is not None else None,
            "recent_refreshes": self.recent_refreshes,
            "group_public_key": sharing.public_key.hex() if sharing is not None else None,
            "rom": self.rom.describe(),
            "pid": self._status_pid,
            **self._status_extra,
            "updated": self.clock(),
        }
        atomic_write(self.store.public_dir / "status.json", (json.dumps(body, indent=2) + "\n").encode())

    # Running ------------------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        core = self.core = self._load()
        self.last_refresh = self.last_refresh or self._previous_last_refresh()
        self.recent_refreshes = self.recent_refreshes or self._previous_recent_refreshes()
        self._in_progress = self._previous_in_progress()
        core.start_signing()
        if core.public.key_table is not None:
            self._channel_period = core.public.key_table.period
        send, receive = trio.open_memory_channel[tuple[int, bytes]](10_000)
        self._poke = lambda: deliver(0, b"")

        def deliver(sender: int, data: bytes) -> None:
            try:
                send.send_nowait((sender, data))
            except trio.WouldBlock:
                log.warning("inbox full: dropped a message from server %d", sender)

        # Operational = holds a valid share of the group key for the current KeyTable and can sign
        # with it now (start_signing checked all of that); missing or stale shares: recovering.
        # A child started between a decision and the KeyTable's signature holds the decided
        # period's new shares (the decision persisted them): still operational, not recovering,
        # for the fraction of a second until the signature completes the period.
        decided_with_shares = (
            not core.public.complete
            and core.private is not None
            and core.private.period == core.public.decided_period
            and bool(core.private.shares)
        )
        operational = core.signing is not None or decided_with_shares
        self._write_status(core.public, Status.OPERATIONAL if operational else Status.RECOVERING)
        async with trio.open_nursery() as nursery:
            self.transport = await self._transport_factory(self.config, self, nursery, deliver)
            task_status.started()
            log.info("server %d up; next refresh is period %d", self.config.server_id, core.next_period)
            while True:
                now = self.clock()
                self._note_start(core, now)
                results, self._code_results = self._code_results, []
                for request, problem in results:
                    core.code_checked(request, problem, now)
                for out in core.tick(now):
                    self.transport.send(out.to, out.data)
                asked = core.take_code_request()
                if asked is not None and core.code is not None:
                    nursery.start_soon(self._check_code, core.code, asked)
                self._settle_signatures()
                self._service_alerts(core)
                if self._pending_rekey is not None:
                    period, keys, seed = self._pending_rekey
                    self._pending_rekey = None
                    await self.transport.rekey(period, keys, seed)
                if self._retire:
                    self.retired.set()
                    return
                wake = core.next_wakeup(now)
                timeout = max(0.0, (wake if wake is not None else now + 1.0) - self.clock())
                with trio.move_on_after(timeout):
                    sender, data = await receive.receive()
                    if sender:
                        core.receive(sender, data, self.clock())
                    while True:  # take whatever else is already waiting
                        try:
                            sender, data = receive.receive_nowait()
                        except trio.WouldBlock:
                            break
                        if sender:
                            core.receive(sender, data, self.clock())

    async def _check_code(self, code: CodeCheck, request: CodeCheckRequest) -> None:
        """A recovering server's code check (it hashes the installed code: 0.2 s warm, many
        seconds cold), run in a worker thread so that this loop goes on serving messages, the
        network-facing process's pings and the API meanwhile; its result goes back to the core
        as an event. One at a time; abandoned (the thread ends with the process) if we stop."""
        async with self._code_lock:
            started = self.clock()
            try:
                problem = await trio.to_thread.run_sync(
                    code.check, request.m, list(request.chains), abandon_on_cancel=True
                )
            except Exception as exc:  # fail closed: no recovery without a check that ran
                problem = f"the code check could not run: {type(exc).__name__}: {exc}"
            log.info(
                "period %d: code check %s in %.2f s (off the loop)",
                request.period,
                "ok" if problem is None else "FAILED",
                self.clock() - started,
            )
        self._code_results.append((request, problem))
        self._poke()

    def request_refresh(self, period: int, start: float) -> bool:
        """Run the refresh of ``period`` at ``start`` (``pst refresh --now``); False if refused."""
        core = self.core
        if core is None or start > self.clock() + 300 or start < self.clock():
            return False
        core.request_refresh(period, start)
        self._poke()
        return period in core.overrides

    async def sign_app(self, app: str, sha512: bytes, *, timeout: float = 10.0) -> bytes:
        """A group-key signature for application ``app`` on the message whose SHA-512 digest is
        ``sha512``: the payload is built here, in the key-holder
        (:func:`~appliance.api.app_digest_payload`), from the name and the digest, so the
        network-facing process can ask for application signatures only, never for arbitrary
        bytes (a certificate, a protocol object of another system)."""
        if not isinstance(app, str) or not app:
            raise SigningRefused("an application signature needs the application's name")
        try:
            payload = app_digest_payload(app, sha512)
        except ValueError as exc:
            raise SigningRefused(str(exc)) from None
        return await self.sign_payload(payload, timeout=timeout)

    async def sign_payload(self, message: bytes, *, timeout: float = 10.0, secret: str = SCERT) -> bytes:
        """A group-key (Vcert) Ed25519 signature on ``message``, made with t other servers
        (for payloads this process builds itself: application and distributed payloads);
        with ``secret``, a signature by another Ed25519 secret of C (a log's own key), which
        signs only what its registered checks accept at every signer."""
        core = self.core
        service = core.signing_service(secret) if core is not None else None
        if service is None:
            raise SigningRefused(
                f"this server is not operational: it holds no share of the secret {secret!r} now"
            )
        rid = service.request(message, self.clock())
        await self._wait_for(service, rid, timeout)
        if rid in service.done:
            return service.done.pop(rid)
        why = service.failed.pop(rid, "the signing service was replaced by a refresh; retry")
        raise SigningRefused(str(why), code=refusal_code(why))

    async def sign_dss(self, secret: str, message: bytes, *, timeout: float = 10.0) -> bytes:
        """A threshold DSS signature (DER, P-256 ECDSA or DSA over SHA-256(message)) by the DSS
        secret ``secret`` of C, made with t other servers from a presignature of this server's
        stock (protocols/dss_signing.py); refused when the stock stays empty past its timeout.
        The application keys' secrets are refused: they sign only :meth:`sign_app_dss`."""
        if secret in APP_KEY_SECRETS.values():
            raise SigningRefused(
                f"{secret!r} is the application keys' secret: it signs only with an application's key"
            )
        return await self._sign_dss(secret, message, timeout=timeout)

    async def sign_app_dss(
        self, group: str, app: str, uid: bytes, key: str, message: bytes, *, timeout: float = 10.0
    ) -> bytes:
        """A signature by key ``key`` of application ``app`` for its client ``uid`` (the API
        authenticated it), with the application keys' secret of ``group``: every signer checks
        that the client owns the key first (appliance.apps.dsskeys)."""
        from appliance.apps.dsskeys.model import SignRequest

        secret = APP_KEY_SECRETS.get(group)
        if secret is None:
            raise SigningRefused(f"no application keys of group {group!r}")
        payload = SignRequest(app, uid, key, group, message).encode()
        return await self._sign_dss(secret, payload, timeout=timeout)

    def app_dss_public_key(self, group: str, app: str, key: str) -> bytes | None:
        """The PEM public key of key ``key`` of application ``app`` (None: no such base secret)."""
        from appliance.crypto import appkeys

        core = self.core
        secret = APP_KEY_SECRETS.get(group)
        if core is None or secret is None or core.clock.secrets.get(secret) != group:
            return None
        sharing = core.public.sharings.get(secret)
        if sharing is None:
            return None
        g = core.clock.group(secret)
        return dss.public_key_pem(g, appkeys.app_public_key(g, sharing.public_key, app, key))

    async def _sign_dss(self, secret: str, message: bytes, *, timeout: float) -> bytes:
        core = self.core
        if core is None or core.clock.secrets.get(secret) not in DSS_GROUPS:
            raise SigningRefused(f"the network has no DSS secret {secret!r} (add it to C's secrets at init)")
        service = core.dss_service(secret)
        if service is None:
            raise SigningRefused(
                f"this server is not operational: it holds no share of the secret {secret!r} now"
            )
        rid = service.request(message, self.clock())
        await self._wait_for(service, rid, timeout)
        if rid in service.done:
            return service.done.pop(rid).der
        why = service.failed.pop(rid, "the signing service was replaced by a refresh; retry")
        raise SigningRefused(str(why), code=refusal_code(why))

    def dss_public_key(self, secret: str) -> bytes | None:
        """The SubjectPublicKeyInfo PEM of DSS secret ``secret`` (None if C has no such secret)."""
        core = self.core
        if core is None or core.clock.secrets.get(secret) not in DSS_GROUPS:
            return None
        sharing = core.public.sharings.get(secret)
        return None if sharing is None else dss.public_key_pem(core.clock.group(secret), sharing.public_key)

    def add_payload_check(self, secret: str, check: PayloadCheck) -> None:
        """Have every share of ``secret`` this server contributes pass ``check`` first (an
        application's rule, e.g. the log's checkpoint guard); effective at once and every period."""
        self._payload_checks.append((secret, check))
        if self.core is not None:
            self.core.add_payload_check(secret, check)

    async def sign_checkpoint(self, body: Checkpoint, *, secret: str = "log", timeout: float = 10.0) -> bytes:
        """The C2SP signed note of the log checkpoint ``body``, signed with the FROST key ``secret``
        (the log's own): this server and t others each check it against their own log first."""
        core = self.core
        sharing = core.public.sharings.get(secret) if core is not None else None
        if sharing is None:
            raise SigningRefused(f"the network has no secret {secret!r} (add it to C's secrets at init)")
        signature = await self.sign_payload(body.text().encode(), timeout=timeout, secret=secret)
        return checkpoint_note(body, sharing.public_key, signature)

    async def sign_upgrade(self, *, timeout: float = 30.0) -> bytes:
        """The network's signature on the upgrade our operator approved: [Scert(U), U].

        Our signers and at least t others must have the same approval on file; a signer
        without it refuses its share, so the request fails unless t+1 operators agreed.
        """
        approval = read_approval(self.store.public_dir)
        if approval is None:
            raise SigningRefused("no upgrade is approved on this server (pst upgrade approve)")
        signature = await self.sign_payload(approval.payload(), timeout=timeout)
        return approval.signed(signature).encode()

    async def time_vector(self, *, timeout: float = 2.0) -> dict[int, float | None]:
        """GetTime: every server's clock as it answered (None for a server that did not)."""
        core = self.core
        if core is None or core.time is None:
            return {self.config.server_id: self.clock()}
        service = core.time
        rid = service.request(self.clock())
        await self._wait_for(service, rid, timeout)
        return service.done.pop(rid, {self.config.server_id: self.clock()})

    async def random(self, nonce: bytes, *, timeout: float = 5.0) -> tuple[bytes, bytes]:
        """GetRandom: 64 unbiasable bytes for the client's ``nonce``, and the input they answer."""
        core = self.core
        if core is None or core.random is None:
            raise SigningRefused("this server is not operational: it holds no share of the group key now")
        service = core.random
        message = encoding.encode({"dom": "pst/random/v1", "nonce": nonce})
        rid = service.request(message, self.clock())
        await self._wait_for(service, rid, timeout)
        if rid in service.done:
            return service.done.pop(rid), message
        raise SigningRefused(service.failed.pop(rid, "the random service was replaced by a refresh; retry"))

    async def _wait_for(
        self,
        service: SigningService | DSSSigningService[Any] | TimeService | RandomService,
        rid: int,
        timeout: float,
    ) -> None:
        """Wake the main loop (to send the request) and wait until the service settles ``rid``."""
        done = trio.Event()
        key = (id(service), rid)
        self._waiting[key] = (done, service)
        self._poke()
        try:
            with trio.fail_after(timeout):
                await done.wait()
        finally:
            self._waiting.pop(key, None)

    def _settle_signatures(self) -> None:
        core = self.core
        for (_sid, rid), (event, service) in self._waiting.items():
            current = core is not None and (
                service in (core.signing, core.time, core.random)
                or service in core.key_signing.values()
                or service in core.dss_signing.values()
            )
            failed = getattr(service, "failed", {})
            if rid in service.done or rid in failed or not current:
                event.set()

    def _note_start(self, core: ServerCore, now: float) -> None:
        engine = core.engine
        if engine is not None and engine.period not in self._refresh_started:
            self._refresh_started[engine.period] = now


def fingerprint(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]

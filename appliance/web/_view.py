"""What the HTTP service shows: this server's status, the peers' as they answered, and how they are judged.

Everything here is public data, read from three places and nowhere else:

* this server's ``status.json`` (written by its key-holder after every refresh and at every
  key-holder start: period, status, KeyTable fingerprint and members, recent refreshes) and
  ``alerts.jsonl`` (the alerts it raised), both in ``<state>/public/``;
* what the network-facing process knows itself (:class:`Sources`): its connections to the
  peers (the :class:`~appliance.net.PeerNetwork`), the local API's counters, the key-holder's pid;
* the peers' own ``/v1/status`` documents, fetched over HTTP(S) by :class:`PeerPoller`.

Only known fields of known types are copied from any of them (:func:`clean_status`), so a
field added to status.json later, or anything a peer puts in its answer, is not passed on
unless it is listed here.

States (:func:`judge`): ``operational`` and ``recovering`` are what the server's key-holder
last wrote, except that an operational server whose newest KeyTable is older than the previous
period is ``behind`` (a whole period passed with no refresh decided: it still signs with old
shares, and the network must be looked at); ``stale`` means that the server answers but its
status is older than :func:`stale_after` (two periods and half a minute: the key-holder
rewrites it at least once a period), or it has written none yet; ``stopped`` means that the
server did not answer its last poll (its process is stopped or unreachable from here: a peer
cannot tell which). A server whose key-holder is gone stops as a whole (``pst serve`` exits),
so it shows as stopped.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from appliance.protocols._core import AlertKind
from appliance.protocols.state import Constants

#: The states a server can be shown in.
STATES: Final = ("operational", "behind", "recovering", "stale", "stopped")
#: Refresh records kept by status.json and shown as the timeline.
MAX_TIMELINE: Final = 20
#: Alerts shown per server (the newest).
RECENT_ALERTS: Final = 10
#: A peer's answer larger than this is refused (a status document is a few KiB).
MAX_PEER_ANSWER: Final = 256 * 1024
ALERT_KINDS: Final = frozenset(k.value for k in AlertKind)
#: status.json is read again after this many seconds even if it looks unchanged.
REREAD_AFTER: Final = 60.0


def stale_after(constants: Constants) -> float:
    """A status older than this is stale: the key-holder rewrites it at least once a period."""
    return 2 * constants.period_length + 30.0


# -- Cleaning untrusted documents ------------------------------------------------------------------


def _int(value: Any) -> int | None:
    return (
        value if isinstance(value, int) and not isinstance(value, bool) and -(2**53) < value < 2**53 else None
    )


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _str(value: Any, limit: int = 200) -> str | None:
    return value[:limit] if isinstance(value, str) else None


def _hex(value: Any, limit: int = 128) -> str | None:
    if isinstance(value, str) and len(value) <= limit and all(c in "0123456789abcdef" for c in value):
        return value
    return None


def _refresh(value: Any) -> dict[str, Any] | None:
    if not isinstance(value, dict):
        return None
    period = _int(value.get("period"))
    if period is None:
        return None
    return {
        "period": period,
        "status": _str(value.get("status"), 40),
        "finished": _num(value.get("finished")),
        "duration_s": _num(value.get("duration_s")),
        "failure": _str(value.get("failure")),
    }


def clean_status(raw: Any) -> dict[str, Any]:
    """The fields of a status.json (ours or a peer's) that the service shows, type-checked."""
    if not isinstance(raw, dict):
        return {}
    members = raw.get("keytable_members")
    recent = raw.get("recent_refreshes")
    progress = raw.get("refresh_in_progress")
    return {
        "period": _int(raw.get("period")),
        "status": _str(raw.get("status"), 40),
        "updated": _num(raw.get("updated")),
        "keytable_fingerprint": _hex(raw.get("keytable_fingerprint")),
        "keytable_members": sorted({m for m in members if _int(m) is not None})[:64]
        if isinstance(members, list)
        else None,
        "group_public_key": _hex(raw.get("group_public_key"), 256),
        "last_refresh": _refresh(raw.get("last_refresh")),
        "recent_refreshes": [r for r in (_refresh(x) for x in recent[-MAX_TIMELINE:]) if r is not None]
        if isinstance(recent, list)
        else [],
        "refresh_in_progress": {
            "period": _int(progress.get("period")),
            "started": _num(progress.get("started")),
        }
        if isinstance(progress, dict)
        else None,
    }


def _clean_alert(raw: Any) -> dict[str, Any] | None:
    if not isinstance(raw, dict):
        return None
    kind = raw.get("kind")
    return {
        "time": _num(raw.get("time")),
        "kind": kind if kind in ALERT_KINDS else "other",
        "server": _int(raw.get("server")),
        "period": _int(raw.get("period")),
        "detail": _str(raw.get("detail"), 300),
    }


#: The ingest counters a log status carries (appliance.apps.log.ingest.IngestStats).
LOG_COUNTERS: Final = (
    "entries",
    "unparsed",
    "truncated",
    "framing_errors",
    "relp_errors",
    "udp_dropped",
    "connections",
    "refused_connections",
    "throttled",
)
LOG_TRANSPORTS: Final = ("udp", "tcp", "relp", "tls", "relp_tls")
#: The replication figures a log status carries (appliance.apps.log.node.LogNode.replication).
LOG_REPLICATION: Final = (
    "slot",
    "committee_period",
    "checkpoint_size",
    "checkpoint_age",
    "caught_up",
    "waiting_batches",
    "repairs",
)


def clean_store(raw: Any) -> dict[str, Any] | None:
    """The store's status (``StoreNode.status()``), type-checked; None if the network has none."""
    if not isinstance(raw, dict):
        return None
    return {
        "items": _int(raw.get("items")),
        "applied": _int(raw.get("applied")),
        "digest": _str(raw.get("digest"), 64),
        "digest_applied": _int(raw.get("digest_applied")),
        "refused_reads": _int(raw.get("refused_reads")),
        "refused_writes": _int(raw.get("refused_writes")),
        "period": _int(raw.get("period")),
        "verified": _int(raw.get("verified")),
        "damaged": raw.get("damaged") is True,
        "batches": _int(raw.get("batches")),
        "batched": _int(raw.get("batched")),
        "snapshot": _int(raw.get("snapshot")),
    }


def clean_log(raw: Any) -> dict[str, Any] | None:
    """A log status (``LogService.status()``, ours or a peer's), type-checked; None if none."""
    if not isinstance(raw, dict):
        return None
    ingest: dict[str, Any] = raw["ingest"] if isinstance(raw.get("ingest"), dict) else {}
    listening: dict[str, Any] = raw["listening"] if isinstance(raw.get("listening"), dict) else {}
    replication = raw.get("replication") if isinstance(raw.get("replication"), dict) else None
    return {
        "state": raw.get("state") if raw.get("state") in ("running", "stopping", "unavailable") else None,
        "error": _str(raw.get("error"), 300),
        "origin": _str(raw.get("origin"), 255),
        "verifier": _str(raw.get("verifier"), 400),
        "size": _int(raw.get("size")),
        "entries_per_second": _num(raw.get("entries_per_second")),
        "appended": _int(raw.get("appended")),
        "api_appended": _int(raw.get("api_appended")),
        "queued": _int(raw.get("queued")),
        "append_failures": _int(raw.get("append_failures")),
        "listening": {t: _str(listening[t], 60) for t in LOG_TRANSPORTS if isinstance(listening.get(t), str)},
        "ingest": {k: _int(ingest.get(k)) for k in LOG_COUNTERS},
        "replication": None
        if replication is None
        else {
            **{k: _int(replication.get(k)) for k in LOG_REPLICATION},
            "damaged": _str(replication.get("damaged"), 600),
            "lag_seconds": _num(replication.get("lag_seconds")),
        },
    }


def clean_peer_document(raw: Any) -> dict[str, Any]:
    """A peer's ``/v1/status`` answer, reduced to what this server shows of it."""
    if not isinstance(raw, dict):
        raise ValueError("not a JSON object")
    if raw.get("api") != API_NAME:
        raise ValueError(f"not a pst status document (api = {str(raw.get('api'))[:40]!r})")
    server = _int(raw.get("server"))
    now = _num(raw.get("now"))
    if server is None or now is None:
        raise ValueError("no server id or no clock reading")
    peers_raw = raw.get("peers")
    peers: dict[str, dict[str, Any]] | None = None
    if isinstance(peers_raw, dict):
        peers = {}
        for key, link in list(peers_raw.items())[:64]:
            if str(key).isdigit() and isinstance(link, dict):
                peers[str(int(key))] = {
                    "state": _str(link.get("state"), 20),
                    "authenticated": link.get("authenticated") is True,
                }
    alerts_raw = raw.get("alerts")
    alerts: dict[str, Any] = {"total": 0, "by_kind": {}, "recent": []}
    if isinstance(alerts_raw, dict):
        by_kind = alerts_raw.get("by_kind")
        recent = alerts_raw.get("recent")
        alerts = {
            "total": _int(alerts_raw.get("total")) or 0,
            "by_kind": {
                (k if k in ALERT_KINDS else "other"): _int(v) or 0
                for k, v in (by_kind.items() if isinstance(by_kind, dict) else [])
            },
            "recent": [a for a in (_clean_alert(x) for x in recent[-RECENT_ALERTS:]) if a is not None]
            if isinstance(recent, list)
            else [],
        }
    keyholder = raw.get("keyholder")
    return {
        "server": server,
        "now": now,
        "state": raw.get("state") if raw.get("state") in STATES else None,
        "reason": _str(raw.get("reason")),
        "status": clean_status(raw.get("status")),
        "peers": peers,
        "alerts": alerts,
        "keyholder": {"running": keyholder.get("running") is True} if isinstance(keyholder, dict) else None,
        "log": clean_log(raw.get("log")),
    }


API_NAME: Final = "pst/v1"


# -- What the network-facing process knows ------------------------------------------------------


@dataclass(frozen=True)
class PeerLink:
    """One peer as this server's PeerNetwork sees it (:class:`~appliance.net.PeerState` values)."""

    state: str  # "connecting", "up", "anonymous" or "down": our outgoing connection
    authenticated: bool  # every open connection with the peer, either way, is authenticated
    connections: tuple[dict[str, Any], ...] = ()  # direction, authenticated, period, tls


def _empty_counts() -> Mapping[tuple[str, str], int]:
    return {}


@dataclass
class Sources:
    """Where the HTTP service reads; the node fills it in, tests give fakes."""

    server_id: int
    constants: Constants
    status_file: Path
    alerts_file: Path
    #: pst serve's own alerts (``<state>/serve/alerts.jsonl``: the key-holder stalled).
    serve_alerts_file: Path | None = None
    #: The other servers' HTTP base URLs (``[http.peers]``), and this one's own.
    peer_urls: Mapping[int, str] = field(default_factory=dict)
    own_url: str = ""
    clock: Callable[[], float] = time.time
    #: Peer id -> link; None while the network is not started yet.
    peer_links: Callable[[], Mapping[int, PeerLink] | None] = lambda: None
    #: The refused connections the network recorded (PeerNetwork.rejections, newest last).
    rejections: Callable[[], Sequence[Any]] = lambda: ()
    api_counts: Callable[[], Mapping[tuple[str, str], int]] = _empty_counts
    signature_counts: Callable[[], Mapping[tuple[str, str], int]] = _empty_counts
    #: The key-holder child's pid (None between two children or before the first).
    keyholder_pid: Callable[[], int | None] = lambda: None
    #: The log's figures (``LogService.status()``); None when this server runs no log.
    log_status: Callable[[], Mapping[str, Any] | None] = lambda: None
    store_status: Callable[[], Mapping[str, Any] | None] = lambda: None


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- Files this server writes ---------------------------------------------------------------------


class AlertLog:
    """``alerts.jsonl`` read incrementally: counts by kind and the newest few alerts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.identity: tuple[int, int] | None = None
        self.by_kind: Counter[str] = Counter()
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_ALERTS)
        self._partial = b""

    def update(self) -> None:
        try:
            st = self.path.stat()
        except OSError:
            return
        identity = (st.st_dev, st.st_ino)
        if identity != self.identity or st.st_size < self.offset:  # replaced or truncated: start over
            self.identity, self.offset, self._partial = identity, 0, b""
            self.by_kind.clear()
            self.recent.clear()
        if st.st_size == self.offset:
            return
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read(4 * 1024 * 1024)
        except OSError:
            return
        self.offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            try:
                alert = _clean_alert(json.loads(line))
            except ValueError:
                continue
            if alert is not None:
                self.by_kind[alert["kind"]] += 1
                self.recent.append(alert)

    def summary(self) -> dict[str, Any]:
        return {
            "total": sum(self.by_kind.values()),
            "by_kind": dict(self.by_kind),
            "recent": list(self.recent),
        }


class AlertLogs:
    """The key-holder's and pst serve's alert files as one."""

    def __init__(self, logs: list[AlertLog]) -> None:
        self.logs = logs

    def update(self) -> None:
        for alert_log in self.logs:
            alert_log.update()

    def summary(self) -> dict[str, Any]:
        by_kind: Counter[str] = Counter()
        recent: list[dict[str, Any]] = []
        for alert_log in self.logs:
            by_kind.update(alert_log.by_kind)
            recent += alert_log.recent
        recent.sort(key=lambda a: a.get("time") or 0)
        return {"total": sum(by_kind.values()), "by_kind": dict(by_kind), "recent": recent[-RECENT_ALERTS:]}


def read_status(path: Path) -> tuple[dict[str, Any] | None, str]:
    """The cleaned status.json, or None and why."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, "no status.json yet: the key-holder has not started"
    except (OSError, ValueError) as exc:
        return None, f"status.json unreadable ({type(exc).__name__})"
    if not isinstance(raw, dict):
        return None, "status.json is not a JSON object"
    return clean_status(raw), ""


def judge(status: Mapping[str, Any] | None, why: str, now: float, constants: Constants) -> tuple[str, str]:
    """(state, reason) of a server that answers, from its status."""
    if status is None:
        return "stale", why or "no status"
    updated = status.get("updated")
    bound = stale_after(constants)
    if updated is None:
        return "stale", "its status carries no time"
    if now - updated > bound:
        return "stale", f"its status was last written {now - updated:.0f} s ago (more than {bound:.0f} s)"
    state = status.get("status")
    period = status.get("period")
    if state == "operational" and isinstance(period, int) and constants.periods_missed(period, now):
        missed = constants.periods_missed(period, now)
        return "behind", (
            f"its newest KeyTable is for period {period} but the clock is in period "
            f"{constants.period_at(now)}: {missed} refresh{'es' if missed > 1 else ''} not decided"
        )
    if state in ("operational", "recovering"):
        return str(state), f"as its key-holder wrote {max(0.0, now - updated):.0f} s ago"
    return "stale", f"unknown status {str(state)[:40]!r}"


def next_refresh(constants: Constants, now: float) -> dict[str, Any]:
    period = constants.period_at(now) + 1
    return {"period": period, "at": constants.period_start(period)}


# -- This server's own document -----------------------------------------------------------------


class LocalView:
    """This server's ``/v1/status``: read from its files and its network-facing process."""

    def __init__(self, sources: Sources) -> None:
        self.sources = sources
        self.alerts = AlertLogs(
            [AlertLog(sources.alerts_file)]
            + ([AlertLog(sources.serve_alerts_file)] if sources.serve_alerts_file is not None else [])
        )
        self.status: dict[str, Any] | None = None
        self.why = "not read yet"
        self.started = sources.clock()
        self.seen_refreshes: set[int] = set()
        self._seen: tuple[int, ...] | None = None
        self._read_at = -math.inf
        #: Called with each refresh record that finished after this process started.
        self.on_refresh: Callable[[dict[str, Any]], None] = lambda record: None

    def update(self, *, force: bool = True) -> None:
        """Re-read status.json and the new alerts; ``force=False``: status.json only if it
        changed (another file, size or times: the key-holder replaces it whole) or was last
        read :data:`REREAD_AFTER` seconds ago."""
        try:
            st = os.stat(self.sources.status_file)
            seen: tuple[int, ...] | None = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        except OSError:
            seen = None
        now = time.monotonic()
        if force or seen != self._seen or now - self._read_at >= REREAD_AFTER:
            self.status, self.why = read_status(self.sources.status_file)
            self._seen, self._read_at = seen, now
        self.alerts.update()
        for record in (self.status or {}).get("recent_refreshes", []):
            period = record["period"]
            if period in self.seen_refreshes:
                continue
            self.seen_refreshes.add(period)
            finished = record.get("finished")
            if finished is not None and finished >= self.started:
                self.on_refresh(record)

    def links(self) -> dict[str, dict[str, Any]] | None:
        links = self.sources.peer_links()
        if links is None:
            return None
        return {
            str(i): {
                "state": link.state,
                "authenticated": link.authenticated,
                "connections": list(link.connections),
            }
            for i, link in sorted(links.items())
        }

    def document(self) -> dict[str, Any]:
        s = self.sources
        now = s.clock()
        pid = s.keyholder_pid()
        running = pid_alive(pid)
        state, reason = judge(self.status, self.why, now, s.constants)
        return {
            "api": API_NAME,
            "server": s.server_id,
            "now": now,
            "state": state,
            "reason": reason,
            "status": self.status,
            "keyholder": {"pid": pid, "running": running},
            "peers": self.links(),
            "alerts": self.alerts.summary(),
            "log": clean_log(s.log_status()),
            "store": clean_store(s.store_status()),
            "clock": {"period": s.constants.period_at(now), "next_refresh": next_refresh(s.constants, now)},
            "constants": {
                "n": s.constants.n,
                "t": s.constants.t,
                "period_seconds": s.constants.period_length,
            },
            "sources": {
                "status": "status.json, written by this server's key-holder",
                "peers": "this server's connections (its PeerNetwork)",
                "alerts": "alerts.jsonl: the alerts this server raised",
                "log": "this server's log (pst serve's ingest and its local store); null without [log]",
                "store": "this server's copy of the data store (docs/store.md); null without a store key",
            },
        }

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Healthy = the key-holder's last status says operational and is fresh."""
        doc = self.document()
        healthy = doc["state"] == "operational"
        return healthy, {
            "server": doc["server"],
            "healthy": healthy,
            "state": doc["state"],
            "reason": doc["reason"],
            "period": (doc["status"] or {}).get("period"),
        }


# -- The peers, as they answer -------------------------------------------------------------------


@dataclass
class PeerRecord:
    """The last poll of one peer and the last answer it gave."""

    url: str
    attempted: float | None = None
    error: str | None = None
    document: dict[str, Any] | None = None
    answered: float | None = None
    rtt: float | None = None
    skew: float | None = None


#: Fetch one URL: (HTTP status, body bytes); raises OSError-like exceptions on failure.
Fetcher = Callable[[str], Awaitable[tuple[int, bytes]]]


class PeerPoller:
    """Fetches every peer's ``/v1/status``; a peer whose last poll failed is shown as stopped."""

    def __init__(self, sources: Sources, fetch: Fetcher) -> None:
        self.sources = sources
        self.fetch = fetch
        self.records = {
            i: PeerRecord(url) for i, url in sorted(sources.peer_urls.items()) if i != sources.server_id
        }

    async def poll(self, server: int) -> None:
        record = self.records[server]
        clock = self.sources.clock
        t0 = clock()
        record.attempted = t0
        try:
            code, body = await self.fetch(f"{record.url}/v1/status")
            t1 = clock()
            if code != 200:
                raise ValueError(f"HTTP status {code}")
            if len(body) > MAX_PEER_ANSWER:
                raise ValueError(f"answer of {len(body)} bytes")
            document = clean_peer_document(json.loads(body))
            if document["server"] != server:
                raise ValueError(f"it says it is server {document['server']}")
        except Exception as exc:  # any failure of a peer is shown, never raised
            record.error = _describe(exc)
            return
        record.error = None
        record.document = document
        record.answered = t1
        record.rtt = t1 - t0
        record.skew = document["now"] - (t0 + t1) / 2


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
    name = type(exc).__name__
    if isinstance(exc, json.JSONDecodeError):
        return "not JSON"
    return f"{name}: {text}" if text else name


def network_document(local: LocalView, poller: PeerPoller | None) -> dict[str, Any]:
    """The whole network as this server sees it: what the page shows."""
    s = local.sources
    own = local.document()
    now = own["now"]
    rows: list[dict[str, Any]] = []
    own_row = {
        "server": s.server_id,
        "self": True,
        "url": s.own_url,
        "state": own["state"],
        "reason": own["reason"],
        "source": "this server's own status.json and process",
        "answered": now,
        "rtt_s": 0.0,
        "skew_s": 0.0,
        "status": own["status"],
        "peers": own["peers"],
        "alerts": own["alerts"],
        "keyholder": own["keyholder"],
        "log": own["log"],
        "last_seen": None,
    }
    rows.append(own_row)
    for server in s.constants.ids:
        if server == s.server_id:
            continue
        record = poller.records.get(server) if poller is not None else None
        rows.append(_peer_row(server, record, now, s.constants))
    tables = [
        (r["status"]["period"], r["status"]["keytable_fingerprint"], r["status"]["keytable_members"])
        for r in rows
        if r["state"] != "stopped" and r.get("status") and r["status"].get("period") is not None
    ]
    keytable = None
    if tables:
        period, fingerprint, members = max(tables, key=lambda x: x[0])
        keytable = {"period": period, "fingerprint": fingerprint, "members": members}
    for row in rows:
        members = keytable["members"] if keytable else None
        row["member"] = None if members is None else row["server"] in members
    return {
        "api": API_NAME,
        "observer": s.server_id,
        "now": now,
        "constants": own["constants"],
        "clock": own["clock"],
        "keytable": keytable,
        "servers": rows,
        "applications": [],
        "sources": {
            "this server": "its status.json (written by its key-holder), its connections and alerts",
            "the others": f"their /v1/status, fetched by server {s.server_id} every few seconds while "
            "someone asks for this document or /metrics (and once before answering, after a quiet "
            "time); a server that did not answer the last fetch is shown as stopped",
            "skew": f"each server's clock minus server {s.server_id}'s, at the midpoint of the fetch "
            "(error at most half the round trip)",
            "KeyTable": "the newest one reported by a server that answers",
            "the log": "each server's own figures in its /v1/status (its copy of the replicated "
            "log; counters since its pst serve started)",
        },
    }


def _peer_row(server: int, record: PeerRecord | None, now: float, constants: Constants) -> dict[str, Any]:
    row: dict[str, Any] = {
        "server": server,
        "self": False,
        "url": record.url if record else None,
        "state": "stopped",
        "status": None,
        "peers": None,
        "alerts": None,
        "keyholder": None,
        "log": None,
        "answered": None,
        "rtt_s": None,
        "skew_s": None,
        "last_seen": None,
    }
    if record is None:
        row["reason"] = "no HTTP address configured for it ([http.peers])"
        row["source"] = "none"
        return row
    doc = record.document
    if doc is not None and record.answered is not None:
        row["last_seen"] = {"at": record.answered, "period": doc["status"].get("period")}
    if record.attempted is None:
        row["reason"] = "not asked yet"
        row["source"] = record.url
        return row
    if record.error is not None or doc is None or record.answered is None:
        row["reason"] = f"no answer from {record.url}: {record.error}"
        row["source"] = f"{record.url}/v1/status (no answer: shown as down)"
        return row
    peer_now = doc["now"] + (now - record.answered)  # the peer's clock now, as it would read it
    state, reason = judge(doc["status"], "", peer_now, constants)
    if doc["state"] == "stopped":
        state, reason = "stopped", doc["reason"] or "it says it is stopped"
    row.update(
        state=state,
        reason=reason,
        source=f"{record.url}/v1/status",
        status=doc["status"],
        peers=doc["peers"],
        alerts=doc["alerts"],
        keyholder=doc["keyholder"],
        log=doc["log"],
        answered=record.answered,
        rtt_s=record.rtt,
        skew_s=record.skew,
    )
    return row


def refused_since(rejections: Iterable[Any], last: Any) -> tuple[list[Any], Any]:
    """The rejections recorded after ``last`` (by identity; all of them if it is gone), and the newest."""
    items = list(rejections)
    new: list[Any] = []
    for item in reversed(items):
        if item is last:
            break
        new.append(item)
    new.reverse()
    return new, (items[-1] if items else last)

"""Prometheus metrics of one server (``/metrics``, text format 0.0.4).

Events this process sees happen are counted as they happen (refreshes finishing, HTTP
requests, refused peer connections); the rest is read at scrape time from what the process
holds (the local API's and the signing backend's counters, the peers' connections, the alert
log, status.json). Counters start at zero when ``pst serve`` starts, except
``pst_alerts_total``, which counts ``alerts.jsonl`` (kept in the state directory). Label
values come from fixed sets only (operations, error codes, alert kinds, route templates), so
no client can grow the label space. No metric carries a secret.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from appliance.web._view import STATES, LocalView, PeerPoller, Sources

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series: the process start time says as much

#: Refresh durations in seconds: a refresh takes about a second on loopback, several on a WAN.
REFRESH_BUCKETS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 300.0)


class _Snapshot(Collector):
    """Gauges and counters read from the server's state at every scrape."""

    def __init__(self, sources: Sources, local: LocalView, poller: PeerPoller | None) -> None:
        self.sources = sources
        self.local = local
        self.poller = poller

    def collect(self) -> Iterator[Metric]:
        s = self.sources
        now = s.clock()
        status = self.local.status or {}
        doc_state = self.local.document()["state"]

        period = GaugeMetricFamily("pst_period", "The period of the KeyTable this server holds (status.json)")
        if status.get("period") is not None:
            period.add_metric([], float(status["period"]))
        yield period
        clock = GaugeMetricFamily("pst_clock_period", "The period this server's clock is in")
        clock.add_metric([], float(s.constants.period_at(now)))
        yield clock
        upcoming = GaugeMetricFamily(
            "pst_next_refresh_timestamp_seconds", "When the next period's refresh starts (Unix time)"
        )
        upcoming.add_metric([], s.constants.period_start(s.constants.period_at(now) + 1))
        yield upcoming
        state = GaugeMetricFamily(
            "pst_state", "1 for this server's state, 0 for the others", labels=["state"]
        )
        for name in STATES:
            state.add_metric([name], 1.0 if name == doc_state else 0.0)
        yield state
        last = status.get("last_refresh") or {}
        finished = GaugeMetricFamily(
            "pst_last_refresh_timestamp_seconds", "When this server's last refresh finished (Unix time)"
        )
        if last.get("finished") is not None:
            finished.add_metric([], float(last["finished"]))
        yield finished

        links = s.peer_links() or {}
        peers = GaugeMetricFamily(
            "pst_peers_connected",
            "Peers with an open connection, by whether every connection with them is authenticated",
            labels=["authenticated"],
        )
        open_links = [link for link in links.values() if link.connections]
        peers.add_metric(["true"], float(sum(1 for link in open_links if link.authenticated)))
        peers.add_metric(["false"], float(sum(1 for link in open_links if not link.authenticated)))
        yield peers
        if self.poller is not None:
            answering = GaugeMetricFamily(
                "pst_peer_up",
                "1 if the peer answered this server's last poll of its /v1/status",
                labels=["server"],
            )
            skew = GaugeMetricFamily(
                "pst_peer_clock_skew_seconds",
                "The peer's clock minus this server's, at the midpoint of its last answered poll "
                "(uncertain by half the round trip; the timestamping authority's co-signers "
                "refuse a genTime off by more than the stated accuracy)",
                labels=["server"],
            )
            rtt = GaugeMetricFamily(
                "pst_peer_poll_rtt_seconds",
                "Round trip of the last answered poll of the peer",
                labels=["server"],
            )
            for server, record in sorted(self.poller.records.items()):
                ok = record.attempted is not None and record.error is None and record.document is not None
                answering.add_metric([str(server)], 1.0 if ok else 0.0)
                if record.skew is not None and record.rtt is not None:
                    skew.add_metric([str(server)], record.skew)
                    rtt.add_metric([str(server)], record.rtt)
            yield answering
            yield skew
            yield rtt

        alerts = CounterMetricFamily(
            "pst_alerts",
            "Alerts this server raised (alerts.jsonl, since its state began), by kind",
            labels=["kind"],
        )
        for kind, count in sorted(self.local.alerts.summary()["by_kind"].items()):
            alerts.add_metric([kind], float(count))
        yield alerts
        api = CounterMetricFamily(
            "pst_api_requests",
            "Local API (Unix socket) requests answered, by operation and result code (ok or the error)",
            labels=["op", "code"],
        )
        for (op, code), count in sorted(s.api_counts().items()):
            api.add_metric([op, code], float(count))
        yield api
        signatures = CounterMetricFamily(
            "pst_signatures",
            "Group-key signatures asked through this server's local API, by kind and outcome",
            labels=["kind", "outcome"],
        )
        for (kind, outcome), count in sorted(s.signature_counts().items()):
            signatures.add_metric([kind, outcome], float(count))
        yield signatures
        yield from _log_metrics(s.log_status())


#: The log's counters (LogService.status()["ingest"]): metric name, status key, help.
_LOG_COUNTERS = (
    (
        "pst_log_received",
        "entries",
        "Entries made from syslog messages received (every transport but the API)",
    ),
    ("pst_log_unparsed", "unparsed", "Syslog messages that are not syslog (stored flagged, with the reason)"),
    ("pst_log_truncated", "truncated", "Syslog messages over the size limit (stored cut, flagged truncated)"),
    ("pst_log_framing_errors", "framing_errors", "Malformed octet counts on TCP and TLS (read as LF-framed)"),
    ("pst_log_relp_errors", "relp_errors", "RELP sessions ended for a protocol error (answered 500)"),
    ("pst_log_udp_dropped", "udp_dropped", "UDP datagrams dropped over a source's rate limit"),
    ("pst_log_throttled", "throttled", "Times a stream was read more slowly for its rate limit"),
    ("pst_log_refused_connections", "refused_connections", "Syslog connections refused over the limit"),
)


#: The replication's gauges (LogService.status()["replication"]): metric name, key, help.
_LOG_REPLICATION_GAUGES = (
    ("pst_log_slot", "slot", "The next slot of the log's agreement on this server (slots decided so far)"),
    (
        "pst_log_store_repairs",
        "repairs",
        "Repairs of this server's copy of the log (from its audit) that passed the audit after them",
    ),
    ("pst_log_committee_period", "committee_period", "The period whose vote keys order the next slot"),
    (
        "pst_log_checkpoint_size",
        "checkpoint_size",
        "Size of the last signed checkpoint this server published",
    ),
    (
        "pst_log_checkpoint_age_seconds",
        "checkpoint_age",
        "Seconds since this server published a checkpoint (0 before the first)",
    ),
    ("pst_log_waiting_batches", "waiting_batches", "Batches of this server not yet ordered"),
    (
        "pst_log_replication_lag_seconds",
        "lag_seconds",
        "Seconds this server's copy of the log is behind the newest copy (since a peer was known to "
        "have applied the slot this server waits for; 0 if none is ahead)",
    ),
)


def _log_metrics(status: Mapping[str, Any] | None) -> Iterator[Metric]:
    """The log's figures, if this server runs a log (with its replication's, if replicated)."""
    if status is None:
        return
    running = GaugeMetricFamily("pst_log_up", "1 if this server's log is open and taking entries")
    running.add_metric([], 1.0 if status.get("state") == "running" else 0.0)
    yield running
    if status.get("state") == "unavailable":
        return
    size = GaugeMetricFamily("pst_log_size", "Entries in this server's log (its durable tree size)")
    size.add_metric([], float(status.get("size") or 0))
    yield size
    entries = CounterMetricFamily(
        "pst_log_entries", "Entries this server appended durably since it started (syslog and API)"
    )
    entries.add_metric([], float(status.get("appended") or 0))
    yield entries
    api = CounterMetricFamily("pst_log_api_entries", "Entries appended through the local API (log_append)")
    api.add_metric([], float(status.get("api_appended") or 0))
    yield api
    failures = CounterMetricFamily("pst_log_append_failures", "Batches the log failed to store")
    failures.add_metric([], float(status.get("append_failures") or 0))
    yield failures
    queued = GaugeMetricFamily("pst_log_queued", "Entries waiting for the next append")
    queued.add_metric([], float(status.get("queued") or 0))
    yield queued
    ingest = status.get("ingest") or {}
    connections = GaugeMetricFamily("pst_log_connections", "Syslog TCP, TLS and RELP connections open")
    connections.add_metric([], float(ingest.get("connections") or 0))
    yield connections
    for name, key, text in _LOG_COUNTERS:
        counter = CounterMetricFamily(name, text)
        counter.add_metric([], float(ingest.get(key) or 0))
        yield counter
    replication = status.get("replication")
    if not isinstance(replication, Mapping):
        return
    for name, key, text in _LOG_REPLICATION_GAUGES:
        gauge = GaugeMetricFamily(name, text)
        gauge.add_metric([], float(replication.get(key) or 0))
        yield gauge
    damaged = GaugeMetricFamily(
        "pst_log_store_damaged", "1 if this server's last audit found its copy of the log damaged"
    )
    damaged.add_metric([], 1.0 if replication.get("damaged") else 0.0)
    yield damaged


class Metrics:
    """The registry of one server's HTTP service."""

    def __init__(self, sources: Sources, local: LocalView, poller: PeerPoller | None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.refresh_duration = Histogram(
            "pst_refresh_duration_seconds",
            "Duration of this server's refreshes (start of the period's refresh to its outcome)",
            buckets=REFRESH_BUCKETS,
            registry=self.registry,
        )
        self.refreshes = Counter(
            "pst_refreshes",
            "Refreshes this server finished, by outcome (the status it came out with)",
            ["outcome"],
            registry=self.registry,
        )
        self.http_requests = Counter(
            "pst_http_requests",
            "HTTP requests answered, by route template and status code",
            ["route", "code"],
            registry=self.registry,
        )
        self.refused = Counter(
            "pst_refused_connections",
            "Peer connections refused after their TLS handshake began (PeerNetwork.rejections), by direction",
            ["direction"],
            registry=self.registry,
        )
        for direction in ("incoming", "outgoing"):
            self.refused.labels(direction)
        self.registry.register(_Snapshot(sources, local, poller))

    def observe_refresh(self, record: dict[str, Any]) -> None:
        outcome = record.get("status") if record.get("status") in ("operational", "recovering") else "other"
        self.refreshes.labels(outcome).inc()
        if record.get("duration_s") is not None and record["duration_s"] >= 0:
            self.refresh_duration.observe(record["duration_s"])

    def count_refused(self, rejections: Iterable[Any]) -> None:
        for rejection in rejections:
            direction = getattr(rejection, "direction", "")
            self.refused.labels(direction if direction in ("incoming", "outgoing") else "incoming").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

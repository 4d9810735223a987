"""The HTTP service (appliance.web) in process: documents, states, errors, fuzzing, metrics, config.

The application is driven through httpx's ASGI transport (no socket), with a fake clock, a
status.json and an alerts.jsonl written under tmp_path, and fake peers; two tests run the
real hypercorn on loopback (TLS, raw bytes). The browser test against a real cluster is
tests/test_web_browser.py.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import socket
import ssl
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from starlette.routing import Route
from tlsutil import self_signed

from appliance.api import ApiCore, BackendUnavailable, PeerCred, PServerBackend
from appliance.apps.log.reader import LogReader
from appliance.crypto import encoding
from appliance.host import config as node_config
from appliance.host.config import HttpConfig
from appliance.protocols.signing import SigningRefused
from appliance.protocols.state import ConfigError, Constants
from appliance.web import API_NAME, POLL_INTERVAL, PeerLink, Sources, WebService, openapi, stale_after
from appliance.web import _view as web_view
from appliance.web._serve import WATCH_WINDOW

NOW = 1_800_000_000.0
SECRET = "5ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7e7aaaa"
PASSWORD = "hunter2-password-never-shown"


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def constants(period: float = 30.0) -> Constants:
    return Constants(n=4, t=1, period_length=period, delta=0.1, genesis=NOW - 10 * period - 5)


def refresh(period: int, duration: float, status: str = "operational") -> dict[str, Any]:
    return {"period": period, "status": status, "finished": NOW - 5, "duration_s": duration, "failure": None}


def status_json(
    server: int, *, status: str = "operational", updated: float = NOW - 5, period: int = 10
) -> dict[str, Any]:
    return {
        "server": server,
        "period": period,
        "status": status,
        "last_refresh": refresh(period, 0.5),
        "recent_refreshes": [refresh(p, 0.2 + p / 100) for p in range(period - 3, period + 1)],
        "refresh_in_progress": None,
        "keytable_fingerprint": "ab336fd8605b49a0",
        "keytable_members": [1, 2, 3, 4],
        "group_public_key": "6d" * 32,
        "rom": "simulated:/somewhere/rom",
        "pid": 1234,
        # Things a status.json must never carry; if one ever did, the service must not pass it on.
        "share": SECRET,
        "password": PASSWORD,
        "updated": updated,
    }


class FakePeers:
    """Peers answering /v1/status as a real server would (or not at all)."""

    def __init__(self, clock: Clock, skew: Mapping[int, float] | None = None) -> None:
        self.clock = clock
        self.skew = dict(skew or {})
        self.down: set[int] = set()
        self.answers: dict[int, tuple[int, bytes]] = {}
        self.asked: list[str] = []

    def document(self, server: int) -> dict[str, Any]:
        return {
            "api": API_NAME,
            "server": server,
            "now": self.clock() + self.skew.get(server, 0.0),
            "state": "operational",
            "reason": "fine",
            "status": status_json(server, updated=self.clock() + self.skew.get(server, 0.0) - 3),
            "peers": {str(j): {"state": "up", "authenticated": True} for j in range(1, 5) if j != server},
            "alerts": {"total": 0, "by_kind": {}, "recent": []},
            "keyholder": {"pid": 99, "running": True},
        }

    async def fetch(self, url: str) -> tuple[int, bytes]:
        self.asked.append(url)
        server = int(url.split(":")[-1].split("/")[0]) - 7200
        if server in self.down:
            raise OSError("connection refused")
        if server in self.answers:
            return self.answers[server]
        return 200, json.dumps(self.document(server)).encode()


def make_service(
    tmp_path: Path,
    *,
    clock: Clock | None = None,
    status: dict[str, Any] | None = None,
    peers: FakePeers | None = None,
    alerts: list[dict[str, Any]] | None = None,
    http: HttpConfig | None = None,
    log_reader: LogReader | None = None,
    tsa: Route | None = None,
    enroll: Sequence[Route] = (),
) -> tuple[WebService, Clock, FakePeers]:
    clock = clock or Clock()
    peers = peers or FakePeers(clock, {2: 0.25, 3: -0.5})
    public = tmp_path / "public"
    public.mkdir(parents=True, exist_ok=True)
    (public / "status.json").write_text(json.dumps(status if status is not None else status_json(1)))
    lines = alerts if alerts is not None else []
    (public / "alerts.jsonl").write_text("".join(json.dumps(a) + "\n" for a in lines))
    api = ApiCore(_NoBackend())
    api.count("sign", "ok")
    api.count("register", "ok")
    api.count("bogus-op-name-chosen-by-a-client", "bad-request")
    sources = Sources(
        server_id=1,
        constants=constants(),
        status_file=public / "status.json",
        alerts_file=public / "alerts.jsonl",
        peer_urls={i: f"http://127.0.0.1:{7200 + i}" for i in range(1, 5)},
        own_url="http://127.0.0.1:7201",
        clock=clock,
        peer_links=lambda: {
            2: PeerLink("up", True, ({"direction": "outgoing", "authenticated": True, "period": 10},)),
            3: PeerLink(
                "anonymous", False, ({"direction": "outgoing", "authenticated": False, "period": 0},)
            ),
            4: PeerLink("down", False, ()),
        },
        api_counts=lambda: api.counts,
        signature_counts=lambda: {("app", "signed"): 3, ("app", "unavailable"): 1},
        keyholder_pid=lambda: None,
    )
    service = WebService(
        sources, http or HttpConfig(), fetch=peers.fetch, log_reader=log_reader, tsa=tsa, enroll=enroll
    )
    service.update_local()
    return service, clock, peers


class _NoBackend:
    async def sign(self, app: str, message: bytes) -> bytes:
        raise BackendUnavailable("no")

    async def get_time(self) -> Mapping[int, float | None]:
        return {}

    async def status(self) -> Mapping[str, Any]:
        return {}

    async def random(self, nonce: bytes) -> tuple[bytes, bytes]:
        raise BackendUnavailable("no")


def client(service: WebService, host: str = "127.0.0.1:7201") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=service.app.asgi, raise_app_exceptions=True)
    return httpx.AsyncClient(transport=transport, base_url=f"http://{host}")


def no_secret(text: str) -> None:
    assert SECRET not in text and PASSWORD not in text and "rom" not in json.loads(text).get("status", {})


# -- Documents and states -------------------------------------------------------------------------


async def test_status_document_has_what_the_page_needs_and_no_secret(tmp_path: Path) -> None:
    service, _, _ = make_service(tmp_path)
    async with client(service) as c:
        answer = await c.get("/v1/status")
    assert answer.status_code == 200
    doc = answer.json()
    assert doc["api"] == API_NAME and doc["server"] == 1 and doc["now"] == NOW
    assert doc["state"] == "operational"
    assert doc["status"]["period"] == 10 and doc["status"]["keytable_members"] == [1, 2, 3, 4]
    assert [r["period"] for r in doc["status"]["recent_refreshes"]] == [7, 8, 9, 10]
    assert doc["peers"]["2"] == {
        "state": "up",
        "authenticated": True,
        "connections": [{"direction": "outgoing", "authenticated": True, "period": 10}],
    }
    assert doc["peers"]["3"]["authenticated"] is False and doc["peers"]["4"]["state"] == "down"
    assert doc["clock"]["next_refresh"] == {"period": 11, "at": constants().period_start(11)}
    assert "share" not in doc["status"] and "password" not in doc["status"] and "rom" not in doc["status"]
    no_secret(answer.text)


async def test_network_shows_every_server_and_a_stopped_one_as_down(tmp_path: Path) -> None:
    service, clock, peers = make_service(tmp_path)
    await service.poll_peers()
    async with client(service) as c:
        net = (await c.get("/v1/network")).json()
    rows = {r["server"]: r for r in net["servers"]}
    assert sorted(rows) == [1, 2, 3, 4]
    assert {r["state"] for r in rows.values()} == {"operational"}
    assert rows[2]["skew_s"] == pytest.approx(0.25) and rows[3]["skew_s"] == pytest.approx(-0.5)
    assert all(r["member"] for r in rows.values())
    assert net["keytable"] == {"period": 10, "fingerprint": "ab336fd8605b49a0", "members": [1, 2, 3, 4]}
    assert rows[4]["source"] == "http://127.0.0.1:7204/v1/status"

    peers.down.add(4)  # server 4 stops: its last status must not be shown as current
    clock.now += 2
    await service.poll_peers()
    async with client(service) as c:
        answer = await c.get("/v1/network")
    rows = {r["server"]: r for r in answer.json()["servers"]}
    assert rows[4]["state"] == "stopped"
    assert rows[4]["status"] is None and rows[4]["peers"] is None
    assert "no answer from http://127.0.0.1:7204" in rows[4]["reason"]
    assert rows[4]["last_seen"] == {"at": NOW, "period": 10}
    assert rows[2]["state"] == "operational"
    no_secret(answer.text)

    peers.down.clear()  # it comes back
    await service.poll_peers()
    async with client(service) as c:
        rows = {r["server"]: r for r in (await c.get("/v1/network")).json()["servers"]}
    assert rows[4]["state"] == "operational"


async def test_a_server_out_of_the_keytable_is_shown_so(tmp_path: Path) -> None:
    status = status_json(1)
    status["keytable_members"] = [1, 2, 3]
    service, _, peers = make_service(tmp_path, status=status)
    peers.down.add(4)
    await service.poll_peers()
    async with client(service) as c:
        rows = {r["server"]: r for r in (await c.get("/v1/network")).json()["servers"]}
    # Server 2 and 3 report a table of the same period with all four; the newest wins, ties by order.
    assert rows[4]["state"] == "stopped"
    assert isinstance(rows[4]["member"], bool)


async def test_stale_and_recovering_states_and_health_codes(tmp_path: Path) -> None:
    service, clock, _ = make_service(tmp_path)
    async with client(service) as c:
        ok = await c.get("/v1/health")
    assert ok.status_code == 200 and ok.json()["healthy"] is True and ok.json()["state"] == "operational"

    clock.now += stale_after(constants()) + 1  # the key-holder stopped writing its status
    async with client(service) as c:
        stale = await c.get("/v1/health")
        doc = (await c.get("/v1/status")).json()
    assert stale.status_code == 503 and stale.json()["state"] == "stale"
    assert doc["state"] == "stale" and "last written" in doc["reason"]

    service2, _, _ = make_service(tmp_path / "b", status=status_json(1, status="recovering"))
    async with client(service2) as c:
        recovering = await c.get("/v1/health")
    assert recovering.status_code == 503 and recovering.json()["state"] == "recovering"

    (tmp_path / "b" / "public" / "status.json").unlink()
    service2.update_local()
    async with client(service2) as c:
        missing = await c.get("/v1/health")
    assert missing.status_code == 503 and missing.json()["state"] == "stale"
    assert "no status.json" in missing.json()["reason"]


async def test_an_operational_server_that_missed_a_whole_period_is_behind(tmp_path: Path) -> None:
    # The clock is in period 10. A KeyTable of period 9 is normal while period 10's refresh runs;
    # one of period 8 means period 9 ended with no refresh decided: old shares, still signing.
    service, _, _ = make_service(tmp_path / "a", status=status_json(1, period=9))
    async with client(service) as c:
        assert (await c.get("/v1/health")).json()["state"] == "operational"
    service, _, _ = make_service(tmp_path / "b", status=status_json(1, period=7))
    async with client(service) as c:
        health = await c.get("/v1/health")
        doc = (await c.get("/v1/status")).json()
    assert health.status_code == 503 and health.json()["state"] == "behind"
    assert doc["state"] == "behind"
    assert doc["reason"] == (
        "its newest KeyTable is for period 7 but the clock is in period 10: 2 refreshes not decided"
    )


async def test_hostile_peer_answers_are_shown_as_errors_or_cleaned(tmp_path: Path) -> None:
    service, _, peers = make_service(tmp_path)
    hostile = peers.document(3)
    hostile["status"]["share"] = SECRET
    hostile["extra"] = "<script>alert(1)</script>"
    hostile["alerts"] = {
        "total": 1,
        "by_kind": {"made-up-kind": 5},
        "recent": [{"time": 1, "kind": "bad-share", "server": 2, "period": 3, "detail": "<b>x</b>" * 100}],
    }
    peers.answers = {
        2: (200, b"<html>not json</html>"),
        3: (200, json.dumps(hostile).encode()),
        4: (200, json.dumps(peers.document(2)).encode()),  # says it is server 2
    }
    await service.poll_peers()
    async with client(service) as c:
        answer = await c.get("/v1/network")
    rows = {r["server"]: r for r in answer.json()["servers"]}
    assert rows[2]["state"] == "stopped" and "not JSON" in rows[2]["reason"]
    assert rows[4]["state"] == "stopped" and "it says it is server 2" in rows[4]["reason"]
    assert rows[3]["state"] == "operational"
    assert "extra" not in rows[3] and "share" not in rows[3]["status"]
    assert rows[3]["alerts"]["by_kind"] == {"other": 5}
    assert len(rows[3]["alerts"]["recent"][0]["detail"]) == 300
    assert SECRET not in answer.text

    peers.answers = {2: (200, b"{" + b" " * 300_000 + b"}"), 3: (503, b"{}"), 4: (200, b"[1, 2]")}
    await service.poll_peers()
    async with client(service) as c:
        rows = {r["server"]: r for r in (await c.get("/v1/network")).json()["servers"]}
    assert "answer of" in rows[2]["reason"] and "HTTP status 503" in rows[3]["reason"]
    assert "not a JSON object" in rows[4]["reason"]
    assert {rows[i]["state"] for i in (2, 3, 4)} == {"stopped"}


async def test_alerts_are_read_incrementally(tmp_path: Path) -> None:
    alert = {"time": NOW - 1, "kind": "silent-server", "server": 3, "period": 9, "detail": "sent nothing"}
    service, _, _ = make_service(tmp_path, alerts=[alert, {**alert, "kind": "bad-share"}])
    async with client(service) as c:
        first = (await c.get("/v1/alerts")).json()
    assert first["total"] == 2 and first["by_kind"] == {"silent-server": 1, "bad-share": 1}
    with open(tmp_path / "public" / "alerts.jsonl", "a") as f:
        f.write(json.dumps({**alert, "kind": "no-such-kind"}) + "\n")
        f.write("not json\n")
    service.update_local()
    async with client(service) as c:
        second = (await c.get("/v1/alerts")).json()
    assert second["total"] == 3 and second["by_kind"]["other"] == 1
    assert second["recent"][-1]["kind"] == "other"


async def test_page_script_and_style_are_served_with_a_strict_policy(tmp_path: Path) -> None:
    service, _, _ = make_service(tmp_path)
    async with client(service) as c:
        page = await c.get("/")
        script = await c.get("/static/page.js")
        style = await c.get("/static/page.css")
        head = await c.head("/v1/status")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/static/page.js" in page.text and '<table id="servers">' in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"
    assert script.headers["content-type"].startswith("text/javascript") and "/v1/network" in script.text
    assert "innerHTML" not in script.text  # data is only ever set with textContent
    assert style.status_code == 200
    assert head.status_code == 200 and head.content == b""


async def test_openapi_document_lists_exactly_the_json_routes(tmp_path: Path) -> None:
    service, _, _ = make_service(tmp_path)
    async with client(service) as c:
        doc = (await c.get("/v1/openapi.json")).json()
        assert doc == json.loads(json.dumps(openapi()))
        assert doc["openapi"].startswith("3.1")
        json_routes = {r for r in service.app.routes if r.startswith("/v1/")}
        assert set(doc["paths"]) == json_routes
        for path in doc["paths"]:
            answer = await c.get(path)
            assert str(answer.status_code) in doc["paths"][path]["get"]["responses"]


# -- Bad input ------------------------------------------------------------------------------------


def assert_json_error(answer: httpx.Response, status: int, code: str | None = None) -> None:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/json"
    error = answer.json()["error"]
    assert error["status"] == status and isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code


async def test_bad_input_gets_a_clear_json_error(tmp_path: Path) -> None:
    service, _, _ = make_service(tmp_path)
    async with client(service) as c:
        assert_json_error(await c.get("/nope"), 404, "not-found")
        assert_json_error(await c.get("/v1/status/"), 404)
        assert_json_error(await c.get("/v2/status"), 404)
        for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
            answer = await c.request(method, "/v1/status", content=b"x" * 1000)
            assert_json_error(answer, 405, "method-not-allowed")
            assert answer.headers["allow"] == "GET, HEAD"
        assert_json_error(await c.get("/v1/status?x=1"), 400, "bad-request")
        assert "unknown query parameter 'x'" in (await c.get("/v1/status?x=1")).json()["error"]["message"]
        for bad in (
            "limit=0",
            "limit=21",
            "limit=-1",
            "limit=abc",
            "limit=1&limit=2",
            "limit=%00",
            "limit=١",
        ):
            assert_json_error(await c.get(f"/v1/refreshes?{bad}"), 400, "bad-request")
        ok = await c.get("/v1/refreshes?limit=2")
        assert [r["period"] for r in ok.json()["refreshes"]] == [9, 10]
        assert_json_error(await c.get("/v1/status?" + "a" * 3000), 414, "uri-too-long")
        assert_json_error(await c.get("/v1/status", headers={"host": "evil.example"}), 421, "misdirected")
    async with client(service, host="localhost:7201") as c:
        assert (await c.get("/v1/status")).status_code == 200


async def test_a_handler_that_fails_answers_500_and_the_service_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    service, _, _ = make_service(tmp_path)

    def broken() -> dict[str, Any]:
        raise RuntimeError(f"bug holding {SECRET}")

    original = service.local.document
    service.local.document = broken  # type: ignore[method-assign]
    transport = httpx.ASGITransport(app=service.app.asgi, raise_app_exceptions=True)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
        answer = await c.get("/v1/status")
        assert_json_error(answer, 500, "internal")
        assert SECRET not in answer.text and SECRET not in caplog.text
        service.local.document = original  # type: ignore[method-assign]
        assert (await c.get("/v1/status")).status_code == 200


_PATH_CHARS = st.sampled_from(
    [*"abcdefghijklmnopqrstuvwxyz0123456789-._~/%!$&'()*+,;=:@", "%00", "%ff", "..", "//"]
)
_ROUTES = [
    "/",
    "/v1/status",
    "/v1/network",
    "/v1/refreshes",
    "/v1/alerts",
    "/v1/health",
    "/metrics",
    "/v1/openapi.json",
]
_TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=20)
_HEADER_VALUE = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200)
#: Headers a handler or a middleware might read, besides random names.
_HEADER_NAMES = st.sampled_from(
    [
        "accept",
        "accept-encoding",
        "authorization",
        "connection",
        "content-type",
        "cookie",
        "if-modified-since",
        "if-none-match",
        "origin",
        "range",
        "upgrade",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
    ]
)
_HOSTS = st.one_of(
    st.none(),
    st.sampled_from(["localhost:7201", "evil.example", "[::1]:7201", "127.0.0.1:99999", "127.0.0.1:", ""]),
    _HEADER_VALUE,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    path=st.one_of(
        st.sampled_from(_ROUTES), st.lists(_PATH_CHARS, max_size=30).map(lambda p: "/" + "".join(p))
    ),
    query=st.lists(st.tuples(st.one_of(_TOKEN, st.just("limit")), st.text(max_size=30)), max_size=4),
    raw_query=st.text(
        alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="#"), max_size=60
    ),
    headers=st.dictionaries(
        st.one_of(
            _TOKEN.filter(lambda h: h not in ("host", "content-length", "transfer-encoding")), _HEADER_NAMES
        ),
        _HEADER_VALUE,
        max_size=5,
    ),
    host=_HOSTS,
    method=st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "FOO"]),
    body=st.binary(max_size=2000),
    use_raw=st.booleans(),
)
def test_fuzz_every_answer_is_success_or_a_json_error(
    tmp_path: Path,
    path: str,
    query: list[tuple[str, str]],
    raw_query: str,
    headers: dict[str, str],
    host: str | None,
    method: str,
    body: bytes,
    use_raw: bool,
) -> None:
    """Random targets, methods, query strings, headers (Host too) and bodies: never a 500, and
    every answer but a success is a JSON error; the service answers the next request as before."""
    service, _, _ = _fuzz_service(tmp_path)
    if host is not None:
        headers = {**headers, "host": host}

    async def run() -> None:
        async with client(service) as c:
            q = raw_query.encode() if use_raw else str(httpx.QueryParams(query)).encode()
            # The target as raw bytes: httpx would read "//x:y" as an authority, not a path.
            target = path.encode() + (b"?" + q if q else b"")
            url = httpx.URL("http://127.0.0.1:7201").copy_with(raw_path=target)
            answer = await c.request(method, url, headers=headers, content=body or None)
            assert answer.status_code != 500, (method, target, headers)
            if answer.status_code in (200, 503) and method in ("GET", "HEAD"):
                assert answer.request.url.path in service.app.routes
            else:
                assert 400 <= answer.status_code < 600, (answer.status_code, path)
                if method != "HEAD":
                    error = answer.json()["error"]
                    assert error["status"] == answer.status_code and error["code"] and error["message"]
            assert (await c.get("/v1/health")).status_code == 200  # still serving

    trio.run(run)


_FUZZ: dict[str, tuple[WebService, Clock, FakePeers]] = {}


def _fuzz_service(tmp_path: Path) -> tuple[WebService, Clock, FakePeers]:
    """One service for all examples (hypothesis reuses the function-scoped tmp_path)."""
    key = str(tmp_path)
    if key not in _FUZZ:
        _FUZZ.clear()
        _FUZZ[key] = make_service(tmp_path)
    return _FUZZ[key]


# -- Metrics --------------------------------------------------------------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
_SAMPLE = re.compile(rf"^({_NAME})(\{{(?:{_LABEL}(?:,{_LABEL})*)?,?\}})? (\S+)( -?\d+)?$")
_VALUE = re.compile(r"^(?:[+-]?(?:\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)|[+-]?Inf|NaN)$")


def check_text_format(text: str) -> dict[str, str]:
    """The Prometheus text format 0.0.4 rules, line by line; returns each family's TYPE."""
    assert text.endswith("\n"), "the exposition must end with a line feed"
    types: dict[str, str] = {}
    helps: set[str] = set()
    seen_samples: set[str] = set()
    for line in text.splitlines():
        assert line, "no empty lines"
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert re.fullmatch(_NAME, name) and name not in helps, line
            helps.add(name)
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert re.fullmatch(_NAME, name) and name not in types, line
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            assert not any(s == name or s.startswith(name + "_") for s in seen_samples), "TYPE after samples"
            types[name] = kind
        elif line.startswith("#"):
            continue
        else:
            match = _SAMPLE.match(line)
            assert match, f"not a sample line: {line!r}"
            assert _VALUE.match(match.group(3)), line
            series = match.group(1) + (match.group(2) or "")
            assert series not in seen_samples, f"duplicate series {series}"
            seen_samples.add(series)
            family = next(
                (
                    n
                    for n in types
                    if match.group(1) in (n, f"{n}_total", f"{n}_bucket", f"{n}_sum", f"{n}_count")
                ),
                None,
            )
            assert family is not None, f"sample {match.group(1)} has no TYPE before it"
    return types


async def test_metrics_follow_the_text_format_and_count_what_happened(tmp_path: Path) -> None:
    alert = {"time": NOW - 1, "kind": "silent-server", "server": 3, "period": 9, "detail": "x"}
    clock = Clock(NOW - 100)  # the service starts before the refreshes of the status file finish
    service, _, peers = make_service(tmp_path, clock=clock, alerts=[alert])
    clock.now = NOW
    service.update_local()  # the four refreshes finished after the start: observed once each
    peers.down.add(4)
    peers.skew[2] = 0.25
    await service.poll_peers()

    class Rejection:
        def __init__(self, direction: str) -> None:
            self.direction = direction

    rejections = [Rejection("incoming"), Rejection("outgoing"), Rejection("incoming")]
    service.sources.rejections = lambda: rejections
    service.update_local()
    rejections.append(Rejection("incoming"))
    service.update_local()
    async with client(service) as c:
        await c.get("/nope")
        await c.get("/v1/status")
        answer = await c.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = answer.text
    types = check_text_format(text)
    assert types["pst_refresh_duration_seconds"] == "histogram"
    for counter in ("pst_refreshes", "pst_http_requests", "pst_refused_connections", "pst_alerts",
                    "pst_api_requests", "pst_signatures"):  # fmt: skip
        assert types[f"{counter}_total"] == "counter", counter
    for gauge in ("pst_period", "pst_clock_period", "pst_peers_connected", "pst_state", "pst_peer_up",
                  "pst_peer_clock_skew_seconds", "pst_peer_poll_rtt_seconds"):  # fmt: skip
        assert types[gauge] == "gauge", gauge

    families = {f.name: f for f in text_string_to_metric_families(text)}
    value = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert value[("pst_refresh_duration_seconds_count", ())] == 4
    assert value[("pst_refresh_duration_seconds_sum", ())] == pytest.approx(0.2 * 4 + (7 + 8 + 9 + 10) / 100)
    buckets = [
        (float(s.labels["le"]), s.value)
        for s in families["pst_refresh_duration_seconds"].samples
        if s.name.endswith("_bucket")
    ]
    assert buckets == sorted(buckets) and buckets[-1] == (math.inf, 4)
    assert all(a[1] <= b[1] for a, b in itertools.pairwise(buckets))
    assert value[("pst_refreshes_total", (("outcome", "operational"),))] == 4
    assert value[("pst_refused_connections_total", (("direction", "incoming"),))] == 3
    assert value[("pst_refused_connections_total", (("direction", "outgoing"),))] == 1
    assert value[("pst_alerts_total", (("kind", "silent-server"),))] == 1
    assert value[("pst_api_requests_total", (("code", "ok"), ("op", "sign")))] == 1
    assert value[("pst_api_requests_total", (("code", "bad-request"), ("op", "invalid")))] == 1
    assert value[("pst_signatures_total", (("kind", "app"), ("outcome", "signed")))] == 3
    assert value[("pst_http_requests_total", (("code", "404"), ("route", "other")))] == 1
    assert value[("pst_http_requests_total", (("code", "200"), ("route", "/v1/status")))] == 1
    assert value[("pst_period", ())] == 10
    assert value[("pst_clock_period", ())] == constants().period_at(NOW)
    assert value[("pst_state", (("state", "operational"),))] == 1
    assert value[("pst_peers_connected", (("authenticated", "true"),))] == 1
    assert value[("pst_peers_connected", (("authenticated", "false"),))] == 1
    assert value[("pst_peer_up", (("server", "4"),))] == 0 and value[("pst_peer_up", (("server", "2"),))] == 1
    assert value[("pst_peer_clock_skew_seconds", (("server", "2"),))] == pytest.approx(0.25)
    assert value[("pst_peer_clock_skew_seconds", (("server", "3"),))] == pytest.approx(-0.5)  # make_service
    assert ("pst_peer_clock_skew_seconds", (("server", "4"),)) not in value  # never answered
    assert value[("pst_peer_poll_rtt_seconds", (("server", "2"),))] >= 0
    assert "bogus-op-name" not in text and SECRET not in text and PASSWORD not in text


async def test_refreshes_finished_before_the_process_started_are_not_counted(tmp_path: Path) -> None:
    service, clock, _ = make_service(tmp_path)  # status.json's refreshes finished at NOW - 5 < start
    clock.now += 60
    service.update_local()
    text = service.metrics.render().decode()
    assert "pst_refresh_duration_seconds_count 0.0" in text
    assert "pst_refreshes_total" not in text.replace("# HELP pst_refreshes_total", "").replace(
        "# TYPE pst_refreshes_total", ""
    )


async def test_the_loop_reads_status_json_again_only_when_it_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    service, _, _ = make_service(tmp_path)
    reads: list[Path] = []
    real = web_view.read_status
    monkeypatch.setattr(web_view, "read_status", lambda path: reads.append(path) or real(path))
    for _ in range(5):
        service.update_local(force=False)
    assert reads == []
    path = tmp_path / "public" / "status.json"
    new = tmp_path / "public" / "status.json.new"
    new.write_text(json.dumps(status_json(1, status="recovering")))
    new.replace(path)  # as the key-holder writes it: a new file renamed over the old one
    service.update_local(force=False)
    service.update_local(force=False)
    assert reads == [path] and service.local.status is not None
    assert service.local.status["status"] == "recovering"
    path.unlink()
    service.update_local(force=False)
    assert len(reads) == 2 and service.local.status is None


# -- Polling only while someone looks -------------------------------------------------------------


async def test_peers_are_not_polled_while_nobody_looks(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    service, _, peers = make_service(tmp_path)
    async with trio.open_nursery() as nursery:
        service.start_loops(nursery)
        await trio.sleep(600)  # ten idle minutes (trio's clock, jumped)
        async with client(service) as c:
            for path in ("/v1/status", "/v1/health", "/v1/alerts", "/v1/refreshes", "/"):
                assert (await c.get(path)).status_code == 200  # what the peers' pollers ask, etc.
        await trio.sleep(600)
        nursery.cancel_scope.cancel()
    assert peers.asked == [] and service.rounds == 0


@pytest.mark.parametrize("path", ["/v1/network", "/metrics"])
async def test_a_request_of_the_network_or_the_metrics_starts_polling_until_nobody_looks(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, path: str
) -> None:
    service, _, peers = make_service(tmp_path)
    others = [f"http://127.0.0.1:{7200 + i}/v1/status" for i in (2, 3, 4)]
    async with trio.open_nursery() as nursery:
        service.start_loops(nursery)
        await trio.sleep(100)
        async with client(service) as c:
            answer = await c.get(path)
        # The first request after a quiet time is answered from a round of polls done for it.
        assert sorted(peers.asked) == others and service.rounds == 1
        if path == "/v1/network":
            rows = {r["server"]: r for r in answer.json()["servers"]}
            assert all(rows[i]["state"] == "operational" and rows[i]["answered"] for i in (2, 3, 4))
        else:
            assert 'pst_peer_up{server="2"} 1.0' in answer.text
        await trio.sleep(WATCH_WINDOW / 2)
        assert service.rounds > 1  # still watched: the loop polls
        async with client(service) as c:
            await c.get(path)  # answered from the loop's polls: no round of its own
        await trio.sleep(WATCH_WINDOW + 2 * POLL_INTERVAL)
        rounds = service.rounds
        await trio.sleep(600)
        assert service.rounds == rounds  # nobody looked for a while: polling stopped
        assert len(peers.asked) == 3 * rounds
        async with client(service) as c:
            await c.get(path)  # and starts again when someone does
        assert service.rounds == rounds + 1
        nursery.cancel_scope.cancel()


async def test_a_round_cut_short_does_not_count_as_fresh(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    service, _, peers = make_service(tmp_path)
    assert service.poller is not None

    async def slow(url: str) -> tuple[int, bytes]:
        await trio.sleep(1.0)
        return await peers.fetch(url)

    service.poller.fetch = slow
    with trio.move_on_after(0.5):  # the request that polled went away in the middle of its round
        await service.watched()
    assert service.rounds == 0 and peers.asked == []
    await service.watched()  # so the next one polls again rather than show the old answers
    assert service.rounds == 1 and len(peers.asked) == 3


def test_text_format_checker_rejects_what_prometheus_would() -> None:
    good = '# HELP a_total x\n# TYPE a counter\na_total{k="v"} 1.0\n'
    check_text_format(good)
    for bad in (
        '# TYPE a counter\na_total{k="v"} 1.0',  # no final line feed
        '# TYPE a counter\na_total{k="v} 1.0\n',  # unterminated label value
        '# TYPE a counter\na_total{k="v"} one\n',  # not a number
        "# TYPE a counter\na_total 1\na_total 2\n",  # duplicate series
        "b 1\n",  # no TYPE
        "# TYPE a counter\n\na_total 1\n",  # empty line
    ):
        with pytest.raises(AssertionError):
            check_text_format(bad)


# -- Counters kept by the API layer ---------------------------------------------------------------


async def test_api_core_counts_answers_by_operation_and_code() -> None:
    core = ApiCore(_NoBackend())
    peer = PeerCred(pid=1, uid=1000, gid=1000)
    await core.handle_frame(b"\xff\xff", peer)
    await core.handle_frame(encoding.encode({"v": 1, "id": 1, "op": "made-up"}), peer)
    await core.handle_frame(encoding.encode({"v": 1, "id": 2, "op": "get_time"}), peer)
    await core.handle_frame(
        encoding.encode({"v": 1, "id": 3, "op": "register", "name": "a", "unique_id": b"u"}), peer
    )
    assert core.counts == {
        ("invalid", "bad-request"): 2,
        ("get_time", "ok"): 1,
        ("register", "ok"): 1,
    }


async def test_backend_counts_signatures_by_kind_and_outcome() -> None:
    calls = 0

    async def sign_app(app: str, message: bytes) -> bytes:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise SigningRefused("not operational")
        return b"s" * 64

    backend = PServerBackend(sign_app, 1)
    await backend.sign("app", b"m")
    with pytest.raises(BackendUnavailable):
        await backend.sign("app", b"m")
    with pytest.raises(BackendUnavailable):
        await backend.sign_upgrade()  # no upgrade signer: not counted as a signature asked
    assert backend.signatures == {("app", "signed"): 1, ("app", "unavailable"): 1}


# -- Config ---------------------------------------------------------------------------------------


def write_config(tmp_path: Path, http: str) -> Path:
    peers = "\n".join(f'{i} = "127.0.0.1:{7100 + i}"' for i in range(1, 5))
    text = f"""
[server]
id = 1
listen = "127.0.0.1:7101"
state_dir = "{tmp_path / "state"}"
api_socket = "{tmp_path / "api.sock"}"
[rom]
backend = "simulated"
path = "{tmp_path / "rom"}"
[network]
n = 4
t = 1
period_seconds = 30
round_ms = 100
genesis = 0.0
[network.peers]
{peers}
{http}
"""
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_config_http_defaults_and_values(tmp_path: Path) -> None:
    default = node_config.load(write_config(tmp_path, "")).http
    assert (
        default == HttpConfig()
        and default.listen == ("127.0.0.1", 7180)
        and default.url == "http://127.0.0.1:7180"
    )
    cert, key = self_signed(tmp_path, stem="http")
    http = node_config.load(
        write_config(
            tmp_path,
            f"""[http]
listen = "0.0.0.0:8443"
cert = "{cert}"
key = "{key.name}"
hosts = ["PST1.example.org"]
[http.peers]
2 = "https://pst2.example.org:8443/"
3 = "http://127.0.0.1:7203"
4 = "https://[::1]:8443"
""",
        )
    ).http
    assert http.listen == ("0.0.0.0", 8443) and http.tls and http.key == tmp_path / "http.key"
    assert http.url == "https://127.0.0.1:8443" and http.hosts == ("pst1.example.org",)
    assert http.peers == {
        2: "https://pst2.example.org:8443",
        3: "http://127.0.0.1:7203",
        4: "https://[::1]:8443",
    }
    assert not node_config.load(
        write_config(tmp_path, '[http]\nenabled = false\nlisten = "0.0.0.0:80"')
    ).http.enabled


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ('[http]\nlisten = "0.0.0.0:7180"', "http.listen = '0.0.0.0:7180' is not a loopback address"),
        ('[http]\nlisten = "127.0.0.1"', 'http.listen must be "host:port"'),
        ('[http]\nlisten = "127.0.0.1:99999"', "http.listen has an invalid port"),
        ("[http]\nport = 1", "http.port is not a known key"),
        ("[http]\nenabled = 1", "http.enabled must be true or false"),
        ('[http]\ncert = "/nonexistent/c.pem"', "http.cert: no such file /nonexistent/c.pem"),
        ('[http]\nhosts = "a"', "http.hosts must be a list"),
        ('[http.peers]\n9 = "http://127.0.0.1:1"', "http.peers.9: keys must be server ids 1..4"),
        ('[http.peers]\n2 = "ftp://127.0.0.1:1"', "http.peers.2 must start with http:// or https://"),
        ('[http.peers]\n2 = "http://10.0.0.2:7180"', "a peer off this machine is reached over https://"),
        ('[http.peers]\n2 = "https://a.example:1/x"', "http.peers.2 must be scheme://host:port with no path"),
        ("[http]\npeers = 3", "[http.peers] must map server ids to URLs"),
    ],
)
def test_config_http_errors_name_the_file_and_the_key(tmp_path: Path, section: str, message: str) -> None:
    path = write_config(tmp_path, section)
    with pytest.raises(ConfigError) as info:
        node_config.load(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)


def test_config_http_tls_pairs_and_bad_files(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, stem="http")
    with pytest.raises(ConfigError, match=r"http\.cert and http\.key go together"):
        node_config.load(write_config(tmp_path, f'[http]\ncert = "{cert}"'))
    with pytest.raises(ConfigError, match=r"http\.client_ca needs TLS"):
        node_config.load(write_config(tmp_path, f'[http]\nclient_ca = "{cert}"'))
    (tmp_path / "junk.pem").write_text("not a certificate")
    config = node_config.load(
        write_config(tmp_path, f'[http]\ncert = "{tmp_path / "junk.pem"}"\nkey = "{key}"')
    )
    with pytest.raises(ConfigError, match=r"config.toml: http.cert / http.key: cannot load"):
        node_config.check_http_tls(config)
    config = node_config.load(
        write_config(tmp_path, f'[http]\ncert = "{cert}"\nkey = "{key}"\nca = "{tmp_path / "junk.pem"}"')
    )
    with pytest.raises(ConfigError, match=r"http\.ca: cannot load"):
        node_config.check_http_tls(config)
    node_config.check_http_tls(
        node_config.load(write_config(tmp_path, f'[http]\ncert = "{cert}"\nkey = "{key}"'))
    )


# -- The real server ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_hypercorn_on_trio_serves_over_tls_and_peers_fetch_with_the_ca(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, stem="http")
    port = free_port()
    http = HttpConfig(listen=("127.0.0.1", port), cert=cert, key=key)
    service, _, _ = make_service(tmp_path, http=http)
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(service.run)
        assert binds == [f"https://127.0.0.1:{port}"]
        context = ssl.create_default_context(cafile=str(cert))
        async with httpx.AsyncClient(verify=context) as c:
            answer = await c.get(f"https://127.0.0.1:{port}/v1/health")
            assert answer.status_code == 200 and answer.json()["server"] == 1
        async with httpx.AsyncClient() as plain:  # plain HTTP on the TLS port gets no answer
            with pytest.raises(httpx.TransportError):
                await plain.get(f"http://127.0.0.1:{port}/v1/health")
        # A peer of this one fetches it with http.ca = the certificate
        peer_http = HttpConfig(
            listen=("127.0.0.1", free_port()), ca=cert, peers={1: f"https://127.0.0.1:{port}"}
        )
        peer, _, _ = make_service(tmp_path / "peer", http=peer_http)
        code, body = await peer._fetch(f"https://127.0.0.1:{port}/v1/status")
        assert code == 200 and json.loads(body)["api"] == API_NAME
        nursery.cancel_scope.cancel()


async def test_raw_garbage_on_the_socket_does_not_stop_the_service(tmp_path: Path) -> None:
    port = free_port()
    service, _, _ = make_service(tmp_path, http=HttpConfig(listen=("127.0.0.1", port)))
    garbage = [
        b"\x00\x01\x02\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -5\r\n\r\n",
        b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + b"X: " + b"y" * 40_000 + b"\r\n\r\n",
        b"GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00" * 50,
        b"GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil\r\n\r\n",
    ]
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        for data in garbage:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            try:
                await stream.send_all(data)
                answer = b""
                with trio.move_on_after(5):
                    while chunk := await stream.receive_some(65536):
                        answer += chunk
                        if b"\r\n\r\n" in answer:
                            break
            except trio.BrokenResourceError:
                answer = b""
            finally:
                await stream.aclose()
            if answer and data.startswith(b"PRI"):  # HTTP/2 with prior knowledge: its SETTINGS frame
                assert answer[3] == 4, answer[:20]
            elif answer:  # the server may also just close: what it must not do is stop
                assert re.match(rb"HTTP/1\.1 4\d\d", answer), answer[:80]
        async with httpx.AsyncClient() as c:
            assert (await c.get(f"http://127.0.0.1:{port}/v1/health")).status_code == 200
        nursery.cancel_scope.cancel()


async def test_a_port_in_use_is_an_oserror_at_start(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        service, _, _ = make_service(tmp_path, http=HttpConfig(listen=("127.0.0.1", port)))
        async with trio.open_nursery() as nursery:
            with pytest.RaisesGroup(OSError, flatten_subgroups=True, allow_unwrapped=True):
                await nursery.start(service.run)

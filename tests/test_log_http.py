"""The log's read side over HTTP (appliance.web._log over appliance.apps.log.reader), on a real hypercorn.

A log of 1,999 real syslog entries, appended in batches that leave partial tiles of several
widths behind, signed with a plain Ed25519 key, in a directory served by the web service on
loopback. Every C2SP path gives the file's bytes with the spec's content type and cache
headers; anything else, and anything the signed checkpoint does not cover, is a 404; the JSON
proofs verify with the merkle module; bad parameters are 400s.
"""

from __future__ import annotations

import base64
import calendar
import datetime
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from logread import ORIGIN, T0, SignedLog, build, copy, serving, signer
from test_log_interop import logcheck  # noqa: F401 - the fixture: Go's checker, built once

from appliance.apps.log.checkpoint import sign_checkpoint
from appliance.apps.log.index import drop_index_from
from appliance.apps.log.merkle import leaf_hash, verify_consistency, verify_inclusion
from appliance.apps.log.reader import CHECKPOINT_PATH, MAX_SCAN
from appliance.apps.log.syslog import Entry
from appliance.apps.log.tiles import PosixStorage, Tile, TileLog, new_bundles, tiles_for_size
from appliance.web import openapi
from appliance.web._log import (
    IMMUTABLE,
    SHORT_LIVED,
    BadParameter,
    Int,
    Name,
    Time,
    accepts_gzip,
    parse_query,
)

# Sizes 1, 255, 256, 259, 559, 1559, 1999: partial level-0 tiles of widths 1, 255, 3, 47, 23, 207.
BATCHES = [1, 254, 1, 3, 300, 1000, 440]
SIZE = sum(BATCHES)


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> SignedLog:
    return build(tmp_path_factory.mktemp("log"), BATCHES)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


async def raw_get(url: str, target: str) -> tuple[int, bytes]:
    """GET with the request target exactly as given (httpx would normalise dots and escapes)."""
    host, port = url.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    try:
        await stream.send_all(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                answer += chunk
    finally:
        await stream.aclose()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_every_c2sp_path_serves_the_file_with_its_cache_headers(
    tmp_path: Path, signed: SignedLog
) -> None:
    async with serving(tmp_path, signed.reader()) as url, httpx.AsyncClient(base_url=url) as c:
        answer = await c.get("/log/checkpoint")
        assert answer.status_code == 200 and answer.content == signed.notes[-1]
        assert answer.headers["content-type"] == "text/plain; charset=utf-8"
        assert answer.headers["cache-control"] == "no-cache"
        resources = [*tiles_for_size(SIZE), *new_bundles(0, SIZE)]
        assert {r.path for r in resources} >= {"tile/0/007.p/207", "tile/1/000.p/7", "tile/entries/006"}
        for resource in resources:
            answer = await c.get(f"/log/{resource.path}")
            assert answer.status_code == 200, resource.path
            assert answer.content == (signed.directory / resource.path).read_bytes(), resource.path
            assert answer.headers["content-type"] == "application/octet-stream"
            full = resource.width == 256
            assert answer.headers["cache-control"] == (IMMUTABLE if full else SHORT_LIVED), resource.path
            # Bundles are compressed (httpx asks for gzip and decodes it), tiles (hashes) are not.
            gzipped = resource.path.startswith("tile/entries/")
            assert answer.headers.get("content-encoding") == ("gzip" if gzipped else None), resource.path
        answer = await c.get("/log/tile/entries/000", headers={"accept-encoding": "identity"})
        assert "content-encoding" not in answer.headers and answer.headers["vary"] == "accept-encoding"
        assert answer.content == (signed.directory / "tile/entries/000").read_bytes()
        # Partial tiles of earlier checkpoints' sizes are still served: each is a prefix of today's.
        for path, whole in [
            ("tile/0/000.p/1", "tile/0/000"),
            ("tile/0/000.p/255", "tile/0/000"),
            ("tile/0/001.p/3", "tile/0/001"),
            ("tile/0/006.p/23", "tile/0/006"),
            ("tile/entries/002.p/47", "tile/entries/002"),
            ("tile/1/000.p/2", "tile/1/000.p/7"),
        ]:
            answer = await c.get(f"/log/{path}")
            assert answer.status_code == 200, path
            assert (signed.directory / whole).read_bytes().startswith(answer.content)
            assert answer.headers["cache-control"] == SHORT_LIVED
        # HEAD answers too.
        assert (await c.head("/log/tile/0/000")).status_code == 200


async def test_etags_answer_304_and_every_read_is_open_to_web_pages(
    tmp_path: Path, signed: SignedLog
) -> None:
    async with serving(tmp_path, signed.reader()) as url, httpx.AsyncClient(base_url=url) as c:
        for path in ["/log/checkpoint", "/log/tile/0/000", "/log/tile/entries/000", "/log/tile/0/007.p/207"]:
            plain = {"accept-encoding": "identity"}
            first = await c.get(path, headers=plain)
            tag = first.headers["etag"]
            assert first.status_code == 200 and tag.startswith('"') and tag.endswith('"'), path
            assert first.headers["access-control-allow-origin"] == "*", path
            again = await c.get(path, headers={**plain, "if-none-match": f'"other", W/{tag}'})
            assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == tag, path
            changed = await c.get(path, headers={**plain, "if-none-match": '"other"'})
            assert changed.status_code == 200 and changed.content == first.content, path
        # The gzipped bundle is another representation: another tag, and the plain tag does not match it.
        bundle = "/log/tile/entries/000"
        plain_tag = (await c.get(bundle, headers={"accept-encoding": "identity"})).headers["etag"]
        gz = await c.get(bundle)
        assert gz.headers["content-encoding"] == "gzip" and gz.headers["etag"] != plain_tag
        assert (await c.get(bundle, headers={"if-none-match": plain_tag})).status_code == 200
        assert (await c.get(bundle, headers={"if-none-match": gz.headers["etag"]})).status_code == 304
        proof = await c.get("/log/v1/inclusion", params={"index": 3})
        assert proof.headers["access-control-allow-origin"] == "*"
        # Each tile route is its own label in /metrics, not "other".
        metrics = (await c.get("/metrics")).text
        assert 'pst_http_requests_total{code="304",route="/log/tile/{rest:path}"}' in metrics
        assert 'pst_http_requests_total{code="304",route="/log/checkpoint"}' in metrics


async def test_paths_that_are_not_one_spelling_of_a_covered_resource_are_404(
    tmp_path: Path, signed: SignedLog
) -> None:
    damaged = copy(signed, tmp_path / "log")
    # What a crashed batch could leave beyond the signed size, and a partial tile of a width no
    # batch ended at with the wrong hashes; beside it, a right one of such a width.
    (damaged.directory / "tile/0/008").write_bytes(b"\x00" * 8192)
    (damaged.directory / "tile/0/006.p/10").write_bytes(b"\x01" * 320)
    (damaged.directory / "tile/0/006.p/11").write_bytes((damaged.directory / "tile/0/006").read_bytes()[:352])
    (damaged.directory / "tile/0/007.p/250").write_bytes(b"\x00" * 250 * 32)
    async with serving(tmp_path, damaged.reader()) as url, httpx.AsyncClient(base_url=url) as c:
        for path in [
            "tile/0/007",  # full, beyond the signed size
            "tile/0/008",  # on disk, beyond the signed size
            "tile/0/007.p/208",  # wider than the signed size
            "tile/0/007.p/250",  # on disk, wider than the signed size
            "tile/0/006.p/10",  # on disk, not a prefix of the signed tile
            "tile/1/000",
            "tile/2/000.p/1",
            "tile/entries/007",
            "tile/entries/007.p/208",
            "tile/0/x000/001",  # not the one spelling of tile 1
            "tile/0/01",
            "tile/0/1",
            "tile/0/0001",
            "tile/00/000",
            "tile/0/000.p/0",
            "tile/0/000.p/256",
            "tile/0/000.p/01",
            "tile/64/000",
            "tile/-1/000",
            "tile/0",
            "tile/",
            "tile/entries",
            "tile/0/000/",
            "tile/0/000.p/",
            "tile/0/000.p/3/",
            "tile/data/000",
            "tile/0/x001/000",
        ]:
            answer = await c.get(f"/log/{path}")
            assert answer.status_code == 404, path
            assert answer.json()["error"]["code"] == "not-found"
            assert answer.headers["cache-control"] == "no-store"
        assert (await c.get("/log/tile/0/006.p/11")).status_code == 200
        for target in [
            "/log/tile/0/%30%30%30",
            "/log/tile/../state/tree",
            "/log/state/tree",
            "/log/tile/0/../../checkpoint",
        ]:
            status, _ = await raw_get(url, target)
            assert status == 404, target
        status, body = await raw_get(url, "/log/tile/0/000")
        assert status == 200 and body == (signed.directory / "tile/0/000").read_bytes()
        answer = await c.get("/log/tile/0/000?x=1")
        assert answer.status_code == 400 and "unknown query parameter" in answer.json()["error"]["message"]
        assert (await c.get("/log/checkpoint?size=3")).status_code == 400
        assert (await c.post("/log/checkpoint")).status_code == 405


async def test_what_is_served_follows_the_latest_signed_checkpoint(tmp_path: Path, signed: SignedLog) -> None:
    log = copy(signed, tmp_path / "log")
    async with serving(tmp_path, log.reader()) as url, httpx.AsyncClient(base_url=url) as c:
        log.publish(log.notes[-2])  # size 1,559: six full level-0 tiles and 6.p/23
        assert (await c.get("/log/checkpoint")).content == log.notes[-2]
        assert (await c.get("/log/tile/0/006")).status_code == 404
        assert (await c.get("/log/tile/0/006.p/23")).status_code == 200
        assert (await c.get("/log/tile/0/007.p/207")).status_code == 404
        assert (await c.get("/log/v1/inclusion", params={"index": 1600})).status_code == 404
        (log.directory / CHECKPOINT_PATH).unlink()
        for path in ["checkpoint", "tile/0/000", "v1/inclusion?index=0", "v1/entries?start=0"]:
            assert (await c.get(f"/log/{path}")).status_code == 404, path
        # A checkpoint the log's key did not sign (or of another origin) is not served: 503, logged.
        other = signer(seed=b"another key")
        log.publish(sign_checkpoint(log.log.checkpoint(), [other]))
        for path in ["checkpoint", "tile/0/000", "v1/inclusion?index=0"]:
            answer = await c.get(f"/log/{path}")
            assert answer.status_code == 503 and answer.json()["error"]["code"] == "log-unavailable", path


async def test_no_log_no_log_routes(tmp_path: Path) -> None:
    async with serving(tmp_path, None) as url, httpx.AsyncClient(base_url=url) as c:
        assert (await c.get("/log/checkpoint")).status_code == 404
        document = (await c.get("/v1/openapi.json")).json()
        assert not any(p.startswith("/log/") for p in document["paths"])


async def test_openapi_lists_the_log_routes(tmp_path: Path, signed: SignedLog) -> None:
    async with serving(tmp_path, signed.reader()) as url, httpx.AsyncClient(base_url=url) as c:
        document = (await c.get("/v1/openapi.json")).json()
    assert document == openapi(log=True)
    log_paths = {p for p in document["paths"] if p.startswith("/log/")}
    assert log_paths == {
        "/log/checkpoint",
        "/log/tile/{path}",
        "/log/v1/inclusion",
        "/log/v1/consistency",
        "/log/v1/entries",
        "/log/v1/search",
    }


# -- JSON ---------------------------------------------------------------------------------------------

SIZES = [1, 255, 256, 259, 559, 1559, SIZE]


async def test_inclusion_and_consistency_proofs_verify(tmp_path: Path, signed: SignedLog) -> None:
    sizes = SIZES
    async with serving(tmp_path, signed.reader()) as url, httpx.AsyncClient(base_url=url) as c:
        for size in sizes:
            for index in sorted({0, size // 2, size - 1}):
                answer = await c.get("/log/v1/inclusion", params={"index": index, "size": size})
                assert answer.status_code == 200
                body = answer.json()
                assert (body["index"], body["size"]) == (index, size)
                data = unb64(body["entry"]["data"])
                assert data == signed.entries[index]
                assert unb64(body["root"]) == signed.log.root_at(size)
                verify_inclusion(
                    index, size, leaf_hash(data), [unb64(p) for p in body["proof"]], unb64(body["root"])
                )
        # Without a size: the latest signed one, and the entry decoded.
        body = (await c.get("/log/v1/inclusion", params={"index": 22})).json()
        assert body["size"] == SIZE and unb64(body["root"]) == signed.log.root()
        entry = Entry.decode(signed.entries[22])
        assert body["entry"]["entry"]["received"] == entry.received == T0 + 22_000_000
        assert body["entry"]["entry"]["syslog"]["hostname"] == "web2"
        assert body["entry"]["entry"]["syslog"]["app_name"] == "cron"
        assert body["entry"]["entry"]["msg"] == "line 22"
        for old in sizes:
            for new in sizes:
                if old > new:
                    continue
                answer = await c.get("/log/v1/consistency", params={"old": old, "new": new})
                assert answer.status_code == 200
                body = answer.json()
                assert unb64(body["old_root"]) == signed.log.root_at(old)
                verify_consistency(
                    old,
                    new,
                    unb64(body["old_root"]),
                    unb64(body["new_root"]),
                    [unb64(p) for p in body["proof"]],
                )
        body = (await c.get("/log/v1/consistency", params={"old": 0})).json()
        assert body["new"] == SIZE and body["proof"] == []


async def test_entries_are_served_in_bounded_ranges(tmp_path: Path, signed: SignedLog) -> None:
    async with serving(tmp_path, signed.reader()) as url, httpx.AsyncClient(base_url=url) as c:
        body = (await c.get("/log/v1/entries", params={"start": 250, "end": 1250})).json()
        assert [e["index"] for e in body["entries"]] == list(range(250, 1250))
        assert [unb64(e["data"]) for e in body["entries"]] == signed.entries[250:1250]
        body = (await c.get("/log/v1/entries", params={"start": 1500})).json()
        assert body["end"] == SIZE and len(body["entries"]) == SIZE - 1500
        body = (await c.get("/log/v1/entries", params={"start": SIZE})).json()
        assert body["entries"] == []
        answer = await c.get("/log/v1/entries", params={"start": 0, "end": 1001})
        assert answer.status_code == 400 and "at most 1000" in answer.json()["error"]["message"]
        assert (await c.get("/log/v1/entries", params={"start": 1990, "end": 2000})).status_code == 404
        assert (await c.get("/log/v1/entries", params={"start": 10, "end": 9})).status_code == 400


def expected_matches(
    signed: SignedLog, host: str | None, app: str | None, since: int, until: int
) -> list[int]:
    out = []
    for i, data in enumerate(signed.entries):
        entry = Entry.decode(data)
        m = entry.message
        assert m is not None
        if host not in (None, m.hostname) or app not in (None, m.app_name):
            continue
        if since <= entry.received < until:
            out.append(i)
    return out[::-1]


async def test_search_by_time_host_and_app_with_paging(
    tmp_path: Path, signed: SignedLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    from appliance.web import _serve

    monkeypatch.setattr(_serve, "INDEX_INTERVAL", 0.2)  # the index loop's pace, for the test
    async with serving(tmp_path, signed.reader()) as url, httpx.AsyncClient(base_url=url) as c:
        body = (await c.get("/log/v1/search", params={"host": "web2", "app": "sshd", "limit": 1000})).json()
        wanted = expected_matches(signed, "web2", "sshd", 0, 2**63)
        assert [e["index"] for e in body["entries"]] == wanted and len(wanted) > 100
        assert body["next_before"] is None and body["scanned"] == [0, SIZE]
        # Times as RFC 3339 and as Unix seconds; [since, until).
        since = datetime.datetime.fromtimestamp((T0 + 100_000_000) / 1e6, datetime.UTC).isoformat()
        until = f"{(T0 + 300_000_000) // 1_000_000}"
        body = (await c.get("/log/v1/search", params={"since": since, "until": until, "limit": 1000})).json()
        assert [e["index"] for e in body["entries"]] == list(range(299, 99, -1))
        # Paging: limit 7, continuing from next_before, gives the same matches in the same order.
        found: list[int] = []
        before: int | None = None
        while True:
            params: dict[str, Any] = {"app": "cron", "limit": 7} | (
                {"before": before} if before is not None else {}
            )
            body = (await c.get("/log/v1/search", params=params)).json()
            found += [e["index"] for e in body["entries"]]
            before = body["next_before"]
            if before is None:
                break
        assert found == expected_matches(signed, None, "cron", 0, 2**63)
        body = (await c.get("/log/v1/search", params={"host": "nowhere"})).json()
        assert body["entries"] == [] and body["next_before"] is None
        # The web service keeps the search index up with the signed tree (7 full bundles).
        with trio.fail_after(10):
            while signed.reader().index.bundles < SIZE // 256:
                await trio.sleep(0.05)
        body = (await c.get("/log/v1/search", params={"host": "web2", "app": "sshd", "limit": 1000})).json()
        assert [e["index"] for e in body["entries"]] == wanted
    assert MAX_SCAN >= SIZE  # one request scans this whole log


def test_a_time_bounded_search_scans_only_its_minute_of_slack(
    signed: SignedLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Receive times grow along the log (entry i at T0 + i s): the bounds are found by binary search,
    and the scan covers [since - 60 s, until + 60 s) however long the log is."""
    from appliance.apps.log import reader as reader_module
    from appliance.apps.log.reader import SearchQuery

    monkeypatch.setattr(reader_module, "MAX_SCAN", 500)  # far fewer than the log's 1,999 entries
    reader = signed.reader()
    # What is not indexed is scanned (a served log was indexed by its web service: drop it).
    drop_index_from(reader.storage, 0)
    query = SearchQuery(since=T0 + 1_000_000_000, until=T0 + 1_200_000_000, limit=1000)
    body = reader.search(query)
    assert [e["index"] for e in body["entries"]] == list(range(1199, 999, -1))
    assert body["scanned"] == [940, 1260] and body["next_before"] is None
    # until alone: starts a minute after it; since alone: stops a minute before it.
    body = reader.search(SearchQuery(until=T0 + 10_000_000, limit=1000))
    assert body["scanned"] == [0, 70] and [e["index"] for e in body["entries"]] == list(range(9, -1, -1))
    body = reader.search(SearchQuery(since=T0 + 1_900_000_000, limit=1000))
    assert body["scanned"] == [1840, SIZE] and body["next_before"] is None
    assert [e["index"] for e in body["entries"]] == list(range(SIZE - 1, 1899, -1))
    # Outside the log's times: nothing scanned.
    assert reader.search(SearchQuery(since=T0 + 10**12, limit=10))["scanned"] == [SIZE, SIZE]
    assert reader.search(SearchQuery(until=T0 - 10**9, limit=10))["scanned"] == [0, 0]


@pytest.mark.parametrize(
    ("path", "status", "says"),
    [
        ("/log/v1/inclusion", 400, "'index' is required"),
        ("/log/v1/inclusion?index=-1", 400, "'index' must be an integer"),
        ("/log/v1/inclusion?index=abc", 400, "'index' must be an integer"),
        ("/log/v1/inclusion?index=01", 400, "'index' must be an integer"),
        ("/log/v1/inclusion?index=1e3", 400, "'index' must be an integer"),
        ("/log/v1/inclusion?index=99999999999999999999", 400, "'index' must be an integer"),
        ("/log/v1/inclusion?index=1&index=2", 400, "given twice"),
        ("/log/v1/inclusion?index=1&sizes=3", 400, "unknown query parameter 'sizes'"),
        ("/log/v1/inclusion?index=1&size=0", 400, "'size' must be an integer"),
        ("/log/v1/inclusion?index=1&size=2000", 404, "has 1999 entries"),
        ("/log/v1/inclusion?index=1999", 404, "not in a tree of 1999"),
        ("/log/v1/inclusion?index=5&size=5", 404, "not in a tree of 5"),
        ("/log/v1/inclusion?index=9223372036854775807", 404, "not in a tree"),
        ("/log/v1/consistency", 400, "'old' is required"),
        ("/log/v1/consistency?old=10&new=5", 400, "larger than new size"),
        ("/log/v1/consistency?old=10&new=2000", 404, "has 1999 entries"),
        ("/log/v1/consistency?old=2000", 400, "larger than new size"),
        ("/log/v1/entries?end=5", 400, "'start' is required"),
        ("/log/v1/entries?start=2000", 404, "has 1999 entries"),
        ("/log/v1/search?limit=0", 400, "'limit' must be an integer in 1..1000"),
        ("/log/v1/search?limit=1001", 400, "'limit' must be an integer in 1..1000"),
        ("/log/v1/search?since=yesterday", 400, "'since' must be Unix seconds"),
        ("/log/v1/search?until=2026-02-30T00:00:00Z", 400, "'until' must be Unix seconds"),
        ("/log/v1/search?host=a%20b", 400, "'host' must be 1 to 255 printable"),
        ("/log/v1/search?host=", 400, "'host' must be 1 to 255 printable"),
        ("/log/v1/search?app=" + "a" * 49, 400, "'app' must be 1 to 48 printable"),
        ("/log/v1/search?before=2000", 404, "has 1999 entries"),
    ],
)
async def test_bad_parameters_are_clear_400s_and_uncovered_sizes_404s(
    tmp_path: Path, signed: SignedLog, path: str, status: int, says: str
) -> None:
    async with serving(tmp_path, signed.reader()) as url, httpx.AsyncClient(base_url=url) as c:
        answer = await c.get(path)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["status"] == status and error["code"] == ("bad-request" if status == 400 else "not-found")
    assert says in error["message"], error["message"]


async def test_a_damaged_store_is_a_503_not_a_bad_proof(tmp_path: Path, signed: SignedLog) -> None:
    log = copy(signed, tmp_path / "log")
    tile = log.directory / "tile/0/002"
    data = bytearray(tile.read_bytes())
    data[5 * 32] ^= 1  # leaf 517
    tile.write_bytes(bytes(data))
    async with serving(tmp_path, log.reader()) as url, httpx.AsyncClient(base_url=url) as c:
        # The audit path of 516 holds leaf 517; the consistency proof from 600 the subtree [512, 576).
        assert (await c.get("/log/v1/inclusion", params={"index": 516})).status_code == 503
        assert (await c.get("/log/v1/consistency", params={"old": 600})).status_code == 503
        # Proofs that do not go through the damaged hash are right, and served.
        assert (await c.get("/log/v1/inclusion", params={"index": 517})).status_code == 200
        assert (await c.get("/log/v1/inclusion", params={"index": 5, "size": 500})).status_code == 200
        (log.directory / "tile/entries/000").write_bytes(b"\x00")
        assert (await c.get("/log/v1/entries", params={"start": 0, "end": 3})).status_code == 503
        assert (await c.get("/v1/health")).status_code == 200  # the rest of the service is fine


@pytest.mark.interop
async def test_go_reads_our_log_over_http_and_checks_our_proofs(
    tmp_path: Path,
    signed: SignedLog,
    logcheck: Path,  # noqa: F811
) -> None:
    """Go's note.Open, tlog.TileHashReader and CheckRecord/CheckTree over our /log/ (tests/go/logcheck)."""
    async with serving(tmp_path, signed.reader()) as url, httpx.AsyncClient(base_url=url) as c:
        inclusion = []
        consistency = []
        for size in SIZES:
            for index in sorted({0, size // 3, size - 1}):
                body = (await c.get("/log/v1/inclusion", params={"index": index, "size": size})).json()
                item = {"index": index, "size": size, "root": body["root"], "leaf": body["leaf_hash"]}
                inclusion.append(item | {"proof": body["proof"], "valid": True})
            for old in SIZES:
                if old <= size:
                    body = (await c.get("/log/v1/consistency", params={"old": old, "new": size})).json()
                    item = {
                        "old": old,
                        "new": size,
                        "old_root": body["old_root"],
                        "new_root": body["new_root"],
                    }
                    consistency.append(item | {"proof": body["proof"], "valid": True})
        request = {
            "vkeys": [signed.vkey],
            "note": "",  # Go fetches the checkpoint itself
            "tiles_dir": "",
            "tiles_url": f"{url}/log/",
            "size": SIZE,
            "root": b64(signed.log.root()),
            "inclusion": inclusion,
            "consistency": consistency,
        }
        result = await trio.run_process(
            [str(logcheck)],
            stdin=json.dumps(request).encode(),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert result.returncode == 0, result.stderr.decode()
    report = json.loads(result.stdout)
    assert report["origin"] == ORIGIN and report["signed_by"] == [
        f"{ORIGIN}+{signed.signer.verifier.key_id:08x}"
    ]
    assert report["tile_paths"] == [t.path for t in tiles_for_size(SIZE)]
    assert report["inclusion_checked"] == len(inclusion) and report["consistency_checked"] == len(consistency)


# -- The query parser ---------------------------------------------------------------------------------

SPEC = {"n": Int(), "small": Int(1, 1000), "t": Time(), "host": Name(255)}


@given(
    st.lists(
        st.tuples(st.sampled_from(["n", "small", "t", "host", "other", ""]), st.text(max_size=30)), max_size=6
    )
)
def test_the_query_parser_returns_its_kinds_or_says_what_is_wrong(items: list[tuple[str, str]]) -> None:
    try:
        out = parse_query(items, SPEC)
    except BadParameter as exc:
        assert "query parameter" in str(exc)
        return
    assert set(out) == {k for k, _ in items} and len(out) == len(items)
    for key, value in items:
        if key == "host":
            assert out[key] == value
        else:
            assert isinstance(out[key], int) and out[key] >= 0
        if key in ("n", "small"):
            assert str(out[key]) == value


@given(st.integers(0, (1 << 63) - 1))
def test_integers_parse_to_themselves(n: int) -> None:
    assert parse_query([("n", str(n))], SPEC) == {"n": n}
    with pytest.raises(BadParameter):
        parse_query([("n", f"0{n}")], SPEC)
    with pytest.raises(BadParameter):
        parse_query([("n", f"-{n}")], SPEC)


@given(
    st.datetimes(min_value=datetime.datetime(1970, 1, 2), max_value=datetime.datetime(9998, 12, 31)),
    st.integers(-23 * 60 - 59, 23 * 60 + 59),
    st.sampled_from(["T", "t"]),
)
def test_rfc3339_and_unix_times_parse_to_the_same_microseconds(
    moment: datetime.datetime, offset_minutes: int, t: str
) -> None:
    zone = datetime.timezone(datetime.timedelta(minutes=offset_minutes))
    aware = moment.replace(tzinfo=zone)
    micros = calendar.timegm(aware.utctimetuple()) * 1_000_000 + aware.microsecond
    if micros < 0:
        return
    text = aware.isoformat().replace("T", t)
    if aware.microsecond == 0:
        text = text.replace("+00:00", "Z")
    assert Time().parse("t", text) == micros
    seconds, fraction = divmod(micros, 1_000_000)
    unix = f"{seconds}.{fraction:06d}" if fraction else str(seconds)
    assert Time().parse("t", unix) == micros


def test_time_parsing_refuses_what_is_not_a_time() -> None:
    for text in [
        "",
        "1.",
        ".5",
        "01",
        "1.1234567",
        "-5",
        "2026-11-30",
        "2026-11-30T12:00:00",
        "2026-13-01T00:00:00Z",
        "2026-11-30T24:00:00Z",
        "2026-11-30T12:00:60Z",
        "2026-11-30T12:00:00+24:00",
        "1969-12-31T23:59:59Z",
        "2026-11-30 12:00:00Z",
        "２０２６-11-30T12:00:00Z",
    ]:
        with pytest.raises(BadParameter):
            Time().parse("t", text)
    assert Time().parse("t", "1970-01-01T01:00:00+01:00") == 0
    assert (
        Time().parse("t", "2026-11-30T12:00:00.5Z")
        == (calendar.timegm((2026, 11, 30, 12, 0, 0)) * 10**6) + 500_000
    )


@settings(max_examples=300)
@given(
    st.one_of(
        st.text(alphabet="tile/entries0123456789x.p-", max_size=30).map(lambda t: "tile/" + t),
        st.builds(
            lambda level, index, width: Tile(level, index, width).path,
            st.integers(0, 3),
            st.integers(0, 1100),
            st.integers(1, 256),
        ),
        st.builds(
            lambda index, width: f"tile/entries/{index:03d}.p/{width}", st.integers(0, 9), st.integers(0, 300)
        ),
    )
)
def test_a_path_gives_the_signed_trees_file_or_nothing(signed: SignedLog, path: str) -> None:
    found = signed.reader().resource(path)
    if found is None:
        return
    data, full = found
    assert data == (signed.directory / path).read_bytes()
    assert full == (".p/" not in path)


def test_unknown_origin_is_refused_when_reading(signed: SignedLog, tmp_path: Path) -> None:
    from appliance.apps.log.errors import LogDecodeError
    from appliance.apps.log.reader import LogReader
    from appliance.apps.log.tiles import PosixStorage

    reader = LogReader(
        PosixStorage(signed.directory), "log.example/other", [signer("log.example/other").verifier]
    )
    with pytest.raises(LogDecodeError):
        reader.latest()
    assert signed.reader().resource(Tile(0, 0).path) is not None
    assert ORIGIN in signed.notes[-1].decode()


def test_accept_encoding() -> None:
    for header in ["gzip", "gzip, deflate", "deflate, GZIP;q=0.5", "br;q=1.0, *", "x-gzip", " gzip ; q=1"]:
        assert accepts_gzip(header), header
    for header in ["", "identity", "deflate, br", "gzip;q=0", "gzip;q=0.0", "gzip;q=x", "*;q=0", "gzipx"]:
        assert not accepts_gzip(header), header


@pytest.mark.interop
async def test_go_proves_entries_in_older_checkpoints_after_their_partial_tiles_were_pruned(
    tmp_path: Path,
    signed: SignedLog,
    logcheck: Path,  # noqa: F811
) -> None:
    """Go's tlog.TileHashReader and ProveRecord/CheckRecord over our /log/ after pruning: a
    client holding an older checkpoint asks for its partial tiles and bundles, gets 404s for
    the pruned ones and reads the full tile's prefix instead (as Go's sumdb client does)."""
    pruned = copy(signed, tmp_path / "log")
    deleted = TileLog.open(PosixStorage(pruned.directory), ORIGIN).prune(SIZE)
    assert {"tile/0/002.p/47", "tile/entries/002.p/47", "tile/0/006.p/23"} <= set(deleted)
    older = []
    for note, size in zip(
        pruned.notes[:-1], [sum(BATCHES[: k + 1]) for k in range(len(BATCHES) - 1)], strict=True
    ):
        older.append({"note": note.decode(), "indexes": sorted({0, size // 2, size - 1})})
    async with serving(tmp_path, pruned.reader()) as url, httpx.AsyncClient(base_url=url) as c:
        assert (await c.get("/log/tile/0/002.p/47")).status_code == 404
        assert (await c.get("/log/tile/0/002")).status_code == 200
        request = {
            "vkeys": [pruned.vkey],
            "note": "",
            "tiles_dir": "",
            "tiles_url": f"{url}/log/",
            "size": SIZE,
            "root": b64(pruned.log.root()),
            "inclusion": [],
            "consistency": [],
            "older": older,
        }
        result = await trio.run_process(
            [str(logcheck)],
            stdin=json.dumps(request).encode(),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert result.returncode == 0, result.stderr.decode()
    report = json.loads(result.stdout)
    assert report["older_inclusion_checked"] == sum(len(o["indexes"]) for o in older)
    # Every partial Go asked for and did not get was pruned, and read from its full tile.
    fallbacks = set(report["full_fallbacks"])
    assert fallbacks and fallbacks <= set(deleted)
    assert {
        "tile/0/002.p/47",
        "tile/entries/002.p/47",
        "tile/0/006.p/23",
        "tile/entries/006.p/23",
    } <= fallbacks

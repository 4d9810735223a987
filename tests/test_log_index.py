"""The log's search index (appliance.apps.log.index): searches through it give what a brute-force
scan gives, with paging; it survives crashes and damage by rebuilding from the tiles, and is
never trusted over them."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from logread import ORIGIN, T0, signer

from appliance.apps.log import index as index_module
from appliance.apps.log import reader as reader_module
from appliance.apps.log.checkpoint import sign_checkpoint
from appliance.apps.log.index import LogIndex, drop_index_from
from appliance.apps.log.reader import CHECKPOINT_PATH, LogReader, SearchQuery
from appliance.apps.log.syslog import Entry, receive
from appliance.apps.log.tiles import Bundle, MemoryStorage, PosixStorage, Storage, TileLog, encode_bundle

HOSTS = ("web1", "web2", "db1", "a-host-with-a-long-name")
APPS = ("nginx", "sshd", "cron")
KEY = signer()


def make_entry(i: int, host: str | None, app: str | None, received: int) -> bytes:
    if host is None:
        raw = f"no pri, line {i}".encode()  # not syslog: no host, no app
    elif app is None:
        raw = f"<14>1 2026-11-30T12:00:00Z {host} - - - - line {i}".encode()
    else:
        raw = f"<14>1 2026-11-30T12:00:00Z {host} {app} {i} - - line {i}".encode()
    return receive(raw, received=received, transport="udp", peer="192.0.2.7:514").encode()


def make_log(storage: Storage, entries: list[bytes]) -> LogReader:
    log = TileLog.open(storage, ORIGIN)
    for start in range(0, len(entries), 700):
        log.append(entries[start : start + 700])
    storage.write(CHECKPOINT_PATH, sign_checkpoint(log.checkpoint(), [KEY]))
    return LogReader(storage, ORIGIN, [KEY.verifier])


def brute_force(entries: list[bytes], q: SearchQuery, end: int | None = None) -> list[int]:
    out = []
    for i, data in enumerate(entries[:end]):
        if q.matches(Entry.decode(data)):
            out.append(i)
    return out[::-1]


def page_all(reader: LogReader, q: SearchQuery) -> list[int]:
    found: list[int] = []
    before = q.before
    for _ in range(10_000):
        body = reader.search(SearchQuery(q.since, q.until, q.host, q.app, q.limit, before))
        got = [e["index"] for e in body["entries"]]
        assert len(got) <= q.limit
        assert all(a > b for a, b in itertools.pairwise(got))  # newest first
        if found and got:
            assert got[0] < found[-1]
        found += got
        before = body["next_before"]
        if before is None:
            return found
    raise AssertionError("paging did not end")


@st.composite
def logs(draw: st.DrawFn) -> tuple[list[bytes], int, bool]:
    size = draw(st.integers(0, 3 * 256 + 40))
    full = size >> 8
    indexed = draw(st.integers(0, full))
    whole = indexed == full
    names = draw(
        st.lists(
            st.tuples(st.sampled_from((*HOSTS, None)), st.sampled_from((*APPS, None))),
            min_size=size,
            max_size=size,
        )
    )
    steps = draw(st.lists(st.integers(0, 5_000_000), min_size=size, max_size=size))
    times = [T0 + sum(steps[: i + 1]) for i in range(size)] if size else []
    if whole and draw(st.booleans()):
        # Fully indexed: receive times may be in any order in the full bundles (a clock stepped
        # back); only the tail, which is scanned, must grow.
        times[: full * 256] = draw(st.permutations(times[: full * 256]))
    entries = [make_entry(i, h, a, times[i]) for i, (h, a) in enumerate(names)]
    return entries, indexed, whole


queries = st.builds(
    SearchQuery,
    since=st.none() | st.integers(T0, T0 + 3_000_000_000),
    until=st.none() | st.integers(T0, T0 + 4_000_000_000),
    host=st.none() | st.sampled_from((*HOSTS, "nowhere")),
    app=st.none() | st.sampled_from((*APPS, "ghost")),
    limit=st.sampled_from((1, 7, 100, 1000)),
)


@settings(max_examples=15, deadline=None)
@given(logs(), st.lists(queries, min_size=1, max_size=4), st.sampled_from((256, 512, 16_384)))
def test_a_search_through_the_index_finds_what_a_scan_finds(
    log: tuple[list[bytes], int, bool], qs: list[SearchQuery], max_scan: int
) -> None:
    entries, indexed, _ = log
    storage = MemoryStorage()
    reader = make_log(storage, entries)
    assert reader.update_index(max_bundles=indexed) == indexed
    assert reader.index.bundles == indexed and reader.index.problem is None
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reader_module, "MAX_SCAN", max_scan)
        for q in qs:
            assert page_all(reader, q) == brute_force(entries, q)
            # From an arbitrary `before`, too.
            before = len(entries) // 2
            assert page_all(
                reader, SearchQuery(q.since, q.until, q.host, q.app, q.limit, before)
            ) == brute_force(entries, q, before)


def test_the_index_makes_a_rare_host_cheap_to_find_in_a_large_log(monkeypatch: pytest.MonkeyPatch) -> None:
    """10,240 entries, one host in three bundles: a search reads those three only."""
    entries = [
        make_entry(i, "rare" if i in (300, 9000, 10_000) else HOSTS[i % 3], "nginx", T0 + i)
        for i in range(10_240)
    ]
    reader = make_log(MemoryStorage(), entries)
    assert reader.update_index() == 40
    reads: list[str] = []
    real = reader._read

    def counting(path: str) -> bytes:
        reads.append(path)
        return real(path)

    monkeypatch.setattr(reader, "_read", counting)
    body = reader.search(SearchQuery(host="rare", limit=1000))
    assert [e["index"] for e in body["entries"]] == [10_000, 9000, 300]
    assert body["next_before"] is None and body["scanned"] == [0, 10_240]
    assert sorted(p for p in reads if p.startswith("tile/entries/")) == [
        Bundle(1, 256).path,
        Bundle(35, 256).path,
        Bundle(39, 256).path,
    ]


@pytest.fixture
def small_segments(monkeypatch: pytest.MonkeyPatch) -> int:
    """Segments of 2 bundles, so that tests of a few thousand entries have several."""
    monkeypatch.setattr(index_module, "SEGMENT", 2)
    return 2


def test_the_index_is_written_in_segments_and_reloaded(tmp_path: Path, small_segments: int) -> None:
    SEGMENT = small_segments
    entries = [make_entry(i, HOSTS[i % 4], APPS[i % 3], T0 + i * 1000) for i in range(SEGMENT * 256 + 300)]
    storage = PosixStorage(tmp_path)
    reader = make_log(storage, entries)
    assert reader.update_index(max_bundles=3) == 3
    assert reader.update_index(max_bundles=10_000) == SEGMENT + 1 - 3
    assert (tmp_path / "index/seg/0").is_file() and (tmp_path / "index/tail").is_file()
    again = LogReader(PosixStorage(tmp_path), ORIGIN, [KEY.verifier])
    assert again.index.bundles == SEGMENT + 1
    assert again.update_index() == 0
    q = SearchQuery(host="db1", app="sshd", since=T0 + 5_000_000, until=T0 + 60_000_000, limit=1000)
    assert page_all(again, q) == brute_force(entries, q)


@pytest.mark.parametrize(
    "damage",
    ["delete-tail", "delete-index", "flip-tail", "cut-tail", "empty-tail", "flip-segment", "other-origin"],
)
def test_a_missing_or_damaged_index_is_rebuilt_from_the_tiles(
    tmp_path: Path, damage: str, small_segments: int
) -> None:
    """A crash leaves the old or the new file (atomic writes); anything else wrong with them
    (damage, another log's index) ends the index at the bad file and the rest is rebuilt."""
    SEGMENT = small_segments
    entries = [
        make_entry(i, HOSTS[i % 4], APPS[i % 3], T0 + i * 1000) for i in range((2 * SEGMENT + 1) * 256 + 88)
    ]
    storage = PosixStorage(tmp_path)
    reader = make_log(storage, entries)
    reader.update_index(max_bundles=10_000)
    full = 2 * SEGMENT + 1
    assert reader.index.bundles == full
    tail, seg = tmp_path / "index/tail", tmp_path / "index/seg/0"
    if damage == "delete-tail":
        tail.unlink()
    elif damage == "delete-index":
        drop_index_from(storage, 0)
    elif damage == "flip-tail":
        data = bytearray(tail.read_bytes())
        data[-3] ^= 1
        tail.write_bytes(bytes(data))
    elif damage == "cut-tail":
        tail.write_bytes(tail.read_bytes()[:40])
    elif damage == "empty-tail":
        tail.write_bytes(b"")
    elif damage == "flip-segment":
        data = bytearray(seg.read_bytes())
        data[100] ^= 1
        seg.write_bytes(bytes(data))
    elif damage == "other-origin":
        other = index_module._encode_file(
            "another.example/log", 0, LogIndex(storage, ORIGIN).records(SEGMENT)
        )
        seg.write_bytes(other)
    fresh = LogReader(PosixStorage(tmp_path), ORIGIN, [KEY.verifier])
    kept = fresh.index.bundles
    assert kept == {
        "delete-tail": 2 * SEGMENT,
        "cut-tail": 2 * SEGMENT,
        "empty-tail": 2 * SEGMENT,
        "flip-tail": 2 * SEGMENT,
    }.get(damage, 0)
    q = SearchQuery(host="web2", app="cron", limit=50)
    assert page_all(fresh, q) == brute_force(entries, q)  # the unindexed part is scanned
    assert fresh.update_index() == full - kept and fresh.index.bundles == full
    assert page_all(fresh, q) == brute_force(entries, q)
    # The reader that was open reloads the rewritten files.
    assert reader.index.bundles == full


def test_a_bundle_that_does_not_give_the_signed_root_is_not_indexed(tmp_path: Path) -> None:
    """The index is made only of bundles authenticated against the signed checkpoint: a bundle
    edited on disk (with its level-0 tile left alone, or rewritten to agree) stops it there."""
    entries = [make_entry(i, HOSTS[i % 4], APPS[i % 3], T0 + i * 1000) for i in range(5 * 256 + 10)]
    storage = MemoryStorage()
    reader = make_log(storage, entries)
    forged = list(entries[512:768])
    forged[5] = make_entry(517, "intruder", "sshd", T0 + 517_000)
    storage.write(Bundle(2, 256).path, encode_bundle(forged))
    assert reader.update_index() == 2
    assert reader.index.bundles == 2
    assert reader.index.problem is not None and "tile/entries/002" in reader.index.problem
    # The level-0 tile rewritten to agree with the forged bundle: still not the signed root.
    from appliance.apps.log.merkle import leaf_hash
    from appliance.apps.log.tiles import Tile

    storage.write(Tile(0, 2, 256).path, b"".join(leaf_hash(e) for e in forged))
    assert reader.update_index() == 0 and reader.index.problem is not None
    # Repaired: indexing goes on.
    storage.write(Bundle(2, 256).path, encode_bundle(entries[512:768]))
    storage.write(Tile(0, 2, 256).path, b"".join(leaf_hash(e) for e in entries[512:768]))
    assert reader.update_index() == 3 and reader.index.problem is None


def test_a_bundle_rewritten_after_it_was_indexed_cuts_the_index_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A search checks each bundle it reads against its record's digest: a bundle that changed
    since (a repair) is searched by scanning, and the index is cut back to before it."""
    entries = [make_entry(i, HOSTS[i % 4], APPS[i % 3], T0 + i * 1000) for i in range(6 * 256)]
    storage = MemoryStorage()
    reader = make_log(storage, entries)
    assert reader.update_index() == 6
    # What a damaged-then-repaired bundle looks like to the index: other bytes at bundle 3.
    changed = list(entries[768:1024])
    changed[0] = make_entry(768, "web1", "nginx", T0 + 768_001)
    storage.write(Bundle(3, 256).path, encode_bundle(changed))
    q = SearchQuery(host="web1", limit=1000)
    body = reader.search(q)
    assert reader.index.bundles == 3 and reader.update_index() == 0  # bundle 3 is not the signed one
    expected = brute_force(entries[:768] + changed + entries[1024:], q)
    assert [e["index"] for e in body["entries"]] == expected
    assert hashlib.sha256(storage.read("index/tail") or b"").digest()  # the tail was rewritten


def test_an_index_of_a_larger_tree_is_dropped(tmp_path: Path) -> None:
    """An index that covers more bundles than the signed tree has (a directory restored from an
    older copy, say) is not this tree's: it is dropped and rebuilt."""
    entries = [make_entry(i, HOSTS[i % 4], APPS[i % 3], T0 + i) for i in range(4 * 256)]
    big = PosixStorage(tmp_path / "big")
    make_log(big, entries).update_index()
    small = PosixStorage(tmp_path / "small")
    reader = make_log(small, entries[:600])
    small.write("index/tail", big.read("index/tail") or b"")
    assert reader.index.bundles == 4
    assert reader.update_index() == 2 and reader.index.bundles == 2
    q = SearchQuery(app="sshd", limit=1000)
    assert page_all(reader, q) == brute_force(entries[:600], q)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 3))
def test_index_files_open_or_say_what_is_wrong(data: bytes, first: int) -> None:
    """Any bytes as an index file: records, or LogDecodeError (fuzzed with and without a good digest)."""
    from appliance.apps.log.errors import LogDecodeError

    for candidate in (data, hashlib.sha256(data).digest() + data):
        try:
            records = index_module._decode_file(candidate, ORIGIN, first)
        except LogDecodeError:
            continue
        assert (
            index_module._decode_file(index_module._encode_file(ORIGIN, first, records), ORIGIN, first)
            == records
        )


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_an_entry_read_leniently_has_the_fields_of_its_strict_reading(data: bytes) -> None:
    """Any bytes: the lenient reading (for the index) never raises, and where the strict one
    accepts an entry, it gives the same receive time, host and app."""
    from appliance.apps.log.errors import LogDecodeError

    fields = index_module._fields(data)
    try:
        entry = Entry.decode(data)
    except LogDecodeError:
        return
    m = entry.message
    assert fields == (entry.received, m.hostname if m else None, m.app_name if m else None)


@given(st.sampled_from(HOSTS), st.sampled_from((*APPS, None)), st.integers(0, 2**62))
def test_real_entries_read_leniently_as_strictly(host: str, app: str | None, when: int) -> None:
    data = make_entry(1, host, app, when)
    entry = Entry.decode(data)
    assert entry.message is not None
    assert index_module._fields(data) == (when, host, entry.message.app_name)


def test_the_index_audit_names_a_forged_record_or_file_and_where_to_rebuild_from(
    tmp_path: Path, small_segments: int
) -> None:
    """A record with a good file digest that leaves a host out makes a search skip its bundle:
    the audit recomputes every record from its bundle and names the first one that differs."""
    entries = [
        make_entry(i, "rare" if i == 300 else HOSTS[i % 4], APPS[i % 3], T0 + i * 1000)
        for i in range(3 * 256 + 88)
    ]
    storage = PosixStorage(tmp_path)
    reader = make_log(storage, entries)
    size = len(entries)
    assert reader.update_index(max_bundles=10_000) == 3  # index/seg/0: bundles 0 and 1; tail: 2
    audit = functools.partial(index_module.audit_index, storage, ORIGIN)
    assert audit(size) == ([], None)
    q = SearchQuery(host="rare", limit=10)
    assert page_all(reader, q) == [300]
    # Bundle 1 (entry 300's) without the key of "rare", in a segment whose digest is right.
    records = LogIndex(storage, ORIGIN).records(3)
    honest = records[1]
    keys = [honest.keys[k : k + 8] for k in range(0, len(honest.keys), 8)]
    rare = index_module.host_key("rare")
    segment = tmp_path / "index/seg/0"

    def forge(record: index_module.BundleRecord) -> None:
        segment.write_bytes(index_module._encode_file(ORIGIN, 0, [records[0], record]))

    forge(dataclasses.replace(honest, keys=b"".join(k for k in keys if k != rare)))
    fresh = LogReader(PosixStorage(tmp_path), ORIGIN, [KEY.verifier])
    assert page_all(fresh, q) == []  # the attack: the search skips entry 300
    said = "the index's record of tile/entries/001 is not the bundle's (its {})"
    assert audit(size) == ([said.format("hosts and apps")], 1)
    # Receive times, a digest; a damaged file, a gap, records beyond the signed tree.
    forge(dataclasses.replace(honest, low=honest.low + 1))
    assert audit(size)[0] == [
        "the index's record of tile/entries/001 is not the bundle's (its receive times)"
    ]
    forge(dataclasses.replace(honest, digest=bytes(16)))
    assert audit(size)[0] == [said.format("digest")]
    forge(honest)
    assert audit(size) == ([], None)
    tail = tmp_path / "index/tail"
    good_tail = tail.read_bytes()
    tail.write_bytes(good_tail[:-1])
    lines, drop = audit(size)
    assert drop == 2 and lines == ["index/tail is damaged: its digest does not match its content"]
    tail.write_bytes(good_tail)
    assert audit(512) == (["the index has 3 records, the signed tree 2 full bundles"], 2)
    segment.rename(tmp_path / "index/seg/1")
    assert audit(size) == (["index/seg/1 follows a gap (no index/seg/0)"], 0)

"""Repairing a damaged copy of the log (appliance.apps.log.repair), in memory, no processes.

Server 1's copy is damaged (a bundle, a tile, or both, edited, cut short or deleted); the
audit (appliance.apps.log.verify.AuditReport) says what, and the sans-IO :class:`Repair`
fetches bundles from the other servers' copies through :func:`answer_request`, the answers
passing through a fake network that can drop or falsify them. A repair either restores every
file byte for byte (and the audit then passes) or writes nothing and says why.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from logread import entry, signer

from appliance.apps.log import merkle
from appliance.apps.log.checkpoint import Checkpoint
from appliance.apps.log.repair import Repair, answer_request, audit_copy, rebuild
from appliance.apps.log.replication import MAX_BATCH_BYTES
from appliance.apps.log.tiles import (
    STATE_PATH,
    Bundle,
    MemoryStorage,
    TileLog,
    decode_bundle,
    encode_bundle,
    new_bundles,
    tiles_for_size,
)
from appliance.apps.log.verify import AuditReport, LogVerifier

ORIGIN = "log.example/repair"
# Three full bundles and a partial one; tiles 0/000..0/002, 0/003.p/88 and 1/000.p/3.
SIZE = 3 * 256 + 88
ENTRIES = [entry(i) for i in range(SIZE)]


class StorageSource:
    def __init__(self, storage: MemoryStorage) -> None:
        self.storage = storage

    def get(self, path: str) -> bytes | None:
        return self.storage.read(path)


def honest_log(entries: list[bytes] = ENTRIES, batches: tuple[int, ...] = (100, SIZE - 100)) -> MemoryStorage:
    storage = MemoryStorage()
    log = TileLog.open(storage, ORIGIN)
    done = 0
    for count in batches:
        log.append(entries[done : done + count])
        done += count
    return storage


GOOD = honest_log()
SIGNED = Checkpoint(ORIGIN, SIZE, TileLog.open(GOOD, ORIGIN).root())
FILES = [t.path for t in tiles_for_size(SIZE)] + [b.path for b in new_bundles(0, SIZE)]


def copy_of(storage: MemoryStorage) -> MemoryStorage:
    other = MemoryStorage()
    other.files = dict(storage.files)
    return other


def audit(storage: MemoryStorage) -> AuditReport:
    return LogVerifier(StorageSource(storage), signer(ORIGIN).verifier).audit_report(SIGNED)


def flip(storage: MemoryStorage, path: str, offset: int) -> None:
    data = bytearray(storage.files[path])
    data[offset % len(data)] ^= 0x01
    storage.files[path] = bytes(data)


Answer = Callable[[dict[str, Any]], dict[str, Any] | None]


def run_repair(
    damaged: MemoryStorage, peers: dict[int, MemoryStorage], falsify: dict[int, Answer] | None = None
) -> Repair:
    """Server 1's repair over a fake network; a peer not in ``peers`` never answers."""
    falsify = falsify or {}
    repair = Repair(me=1, n=4, storage=damaged, origin=ORIGIN, report=audit(damaged), timeout=5.0)
    logs = {i: TileLog.open(s, ORIGIN) for i, s in peers.items()}
    now = 0.0
    repair.start(now)
    for _ in range(10_000):
        if repair.done:
            break
        out, repair.out = repair.out, []
        answered = False
        for to, message in out:
            assert message["log"] == "repair-req" and to != 1
            if to not in logs:
                continue
            answer: dict[str, Any] | None = answer_request(logs[to], message)
            assert answer is not None
            assert sum(map(len, answer["entries"])) <= MAX_BATCH_BYTES or len(answer["entries"]) == 1
            if to in falsify:
                answer = falsify[to](answer)
            if answer is not None:
                repair.receive(to, answer, now)
                answered = True
        if not answered:
            now += 6.0
            repair.tick(now)
    assert repair.done
    return repair


def repaired(storage: MemoryStorage, repair: Repair) -> None:
    """Write the repair as the node does, and check the copy is the good one again."""
    assert repair.files is not None, repair.failure
    TileLog(storage, ORIGIN, merkle.Frontier()).rewrite(repair.files)  # (open refuses a bad tail)
    assert audit(storage).ok
    assert {p: storage.files.get(p) for p in FILES} == {p: GOOD.files[p] for p in FILES}


def honest_peers() -> dict[int, MemoryStorage]:
    return {i: copy_of(GOOD) for i in (2, 3, 4)}


# --- The audit's findings as data ----------------------------------------------------------------


def test_a_good_copy_audits_clean_and_rebuilds_to_nothing() -> None:
    report = audit(GOOD)
    assert report.ok and report.entries_ok and report.tiles_ok and report.tiles_checked == 5
    assert report.message() == f"audit: the {SIZE} entries and 5 tiles give the signed root"
    assert rebuild(GOOD, ORIGIN, SIZE) == (SIGNED.root, {})


@pytest.mark.parametrize("path", ["tile/0/001", "tile/0/003.p/88", "tile/1/000.p/3"])
def test_a_wrong_tile_is_recomputed_from_the_entries_without_a_peer(path: str) -> None:
    damaged = copy_of(GOOD)
    flip(damaged, path, 40)
    report = audit(damaged)
    assert report.entries_ok and not report.tiles_ok and report.bad_bundles == ()
    assert [t.path for t in report.bad_tiles] == [path]
    repair = run_repair(damaged, {})  # no peer answers: none is asked
    assert repair.source is None and repair.passed == [] and list(repair.files or {}) == [path]
    repaired(damaged, repair)


def test_a_missing_or_short_tile_is_recomputed() -> None:
    damaged = copy_of(GOOD)
    del damaged.files["tile/0/002"]
    damaged.files["tile/1/000.p/3"] = damaged.files["tile/1/000.p/3"][:-1]
    report = audit(damaged)
    assert report.entries_ok
    assert sorted(t.path for t in report.bad_tiles) == ["tile/0/002", "tile/1/000.p/3"]
    assert "the log does not serve tile/0/002, which its signed tree of size 856 has" in report.lines
    repaired(damaged, run_repair(damaged, {}))


@pytest.mark.parametrize(
    "damage",
    ["flip", "cut", "delete", "extra"],
)
@pytest.mark.parametrize("index", [1, 3])  # a full bundle, the partial one
def test_a_wrong_bundle_is_fetched_from_a_peer(damage: str, index: int) -> None:
    damaged = copy_of(GOOD)
    bundle = Bundle(index, 256 if index < 3 else 88)
    if damage == "flip":
        flip(damaged, bundle.path, -1)
    elif damage == "cut":
        damaged.files[bundle.path] = damaged.files[bundle.path][:-3]
    elif damage == "delete":
        del damaged.files[bundle.path]
    else:  # one more entry on the end
        damaged.files[bundle.path] += encode_bundle([b"forged"])
    report = audit(damaged)
    assert not report.entries_ok and report.tiles_ok and report.bad_bundles == (bundle,)
    repair = run_repair(damaged, honest_peers())
    assert repair.source == 2 and repair.bad_peers == [] and list(repair.files or {}) == [bundle.path]
    assert "1 entry bundle(s) (tile/entries/" in repair.summary() and "from server 2" in repair.summary()
    repaired(damaged, repair)


def test_a_bundle_and_its_tile_edited_to_agree_are_found_above_and_repaired() -> None:
    damaged = copy_of(GOOD)
    bundle = Bundle(1)
    entries = decode_bundle(bundle, GOOD.files[bundle.path])
    entries[7] = b"an entry that was never logged"
    damaged.files[bundle.path] = encode_bundle(entries)
    tile = bytearray(GOOD.files["tile/0/001"])
    tile[7 * 32 : 8 * 32] = merkle.leaf_hash(entries[7])
    damaged.files["tile/0/001"] = bytes(tile)
    report = audit(damaged)
    assert not report.entries_ok and not report.tiles_ok
    assert report.bad_bundles == (bundle,)  # the level-1 hash over it differs, nothing below it
    repair = run_repair(damaged, honest_peers())
    assert sorted(repair.files or {}) == ["tile/0/001", "tile/entries/001"]
    repaired(damaged, repair)


def test_a_wrong_bundle_and_an_unrelated_wrong_tile_are_both_repaired() -> None:
    damaged = copy_of(GOOD)
    flip(damaged, "tile/entries/000", 100)
    flip(damaged, "tile/0/002", 3)
    report = audit(damaged)
    assert not report.entries_ok and not report.tiles_ok
    assert Bundle(0) in report.bad_bundles
    repaired(damaged, run_repair(damaged, honest_peers()))


def test_when_nothing_explains_the_root_every_bundle_is_fetched() -> None:
    # Everything rewritten consistently, as from other entries: only the signed root says no.
    forged = honest_log([*ENTRIES[:300], b"forged", *ENTRIES[301:]])
    damaged = copy_of(forged)
    report = audit(damaged)
    assert not report.entries_ok and not report.tiles_ok
    assert [b.index for b in report.bad_bundles] == [0, 1, 2, 3]
    repair = run_repair(damaged, honest_peers())
    assert sorted(repair.files or {}) == ["tile/0/001", "tile/1/000.p/3", "tile/entries/001"]
    repaired(damaged, repair)


def test_a_wrong_bundle_the_audit_cannot_locate_is_found_by_fetching_every_bundle() -> None:
    # The partial bundle is in no level-1 tile: edited with its level-0 tile recomputed, only the
    # root shows it; a second, located, wrong bundle hides that the audit's list is short.
    damaged = copy_of(GOOD)
    tail = Bundle(3, 88)
    entries = decode_bundle(tail, GOOD.files[tail.path])
    entries[5] = b"rewritten"
    damaged.files[tail.path] = encode_bundle(entries)
    tile = bytearray(GOOD.files["tile/0/003.p/88"])
    tile[5 * 32 : 6 * 32] = merkle.leaf_hash(entries[5])
    damaged.files["tile/0/003.p/88"] = bytes(tile)
    flip(damaged, "tile/entries/000", 50)
    assert audit(damaged).bad_bundles == (Bundle(0),)
    repair = run_repair(damaged, honest_peers(), {2: lie})
    assert repair.escalated and repair.source == 3
    assert [peer for peer, _ in repair.bad_peers] == [2]  # servers 3 and 4 were doubted, then cleared
    repaired(damaged, repair)


# --- Peers that lie, lack the entries, or are silent ---------------------------------------------------


def lie(answer: dict[str, Any]) -> dict[str, Any]:
    entries = list(answer["entries"])
    entries[0] = entries[0] + b" (falsified)"
    return {**answer, "entries": entries}


def test_a_lying_peer_is_named_and_the_next_one_repairs() -> None:
    damaged = copy_of(GOOD)
    flip(damaged, "tile/entries/002", 500)
    repair = run_repair(damaged, honest_peers(), {2: lie})
    assert [peer for peer, _ in repair.bad_peers] == [2]
    assert "tile/entries/002 do not give the signed root of size 856" in repair.bad_peers[0][1]
    assert repair.source == 3
    repaired(damaged, repair)


def test_a_malformed_answer_names_the_peer() -> None:
    damaged = copy_of(GOOD)
    flip(damaged, "tile/entries/002", 500)
    repair = run_repair(damaged, honest_peers(), {2: lambda a: {**a, "entries": "not a list"}})
    assert repair.bad_peers == [(2, "it sent a malformed repair message")] and repair.source == 3
    repaired(damaged, repair)


def test_no_peer_with_the_entries_leaves_the_copy_damaged_and_says_why() -> None:
    damaged = copy_of(GOOD)
    flip(damaged, "tile/entries/002", 500)
    before = dict(damaged.files)
    short = honest_log(ENTRIES[:300], (300,))  # server 3 has only the first 300 entries
    repair = run_repair(damaged, {2: copy_of(GOOD), 3: short}, {2: lie})  # server 4 is silent
    assert repair.files is None and repair.source is None
    assert repair.failure == (
        "no peer sent entries that give the signed root (server 2: its entries for tile/entries/002 do "
        "not give the signed root of size 856; server 3 does not have entries from 512; "
        "server 4 did not answer in 5 s)"
    )
    assert damaged.files == before


def test_a_peer_answers_in_frames_of_at_most_a_batch() -> None:
    big = [bytes([65 + i % 26]) * 60_000 for i in range(40)]  # 2.4 MB in one partial bundle
    good = honest_log(big, (40,))
    answer = answer_request(TileLog.open(good, ORIGIN), {"log": "repair-req", "start": 0, "end": 40})
    assert answer["start"] == 0 and len(answer["entries"]) == 17  # 17 x 60,000 <= 1 MiB < 18 x
    assert answer_request(TileLog.open(good, ORIGIN), {"start": 40, "end": 41})["entries"] == []
    with pytest.raises(Exception, match="repair-req: start and end"):
        answer_request(TileLog.open(good, ORIGIN), {"start": 3, "end": 2})


def test_a_rewrite_takes_tile_and_bundle_paths_only() -> None:
    storage = copy_of(GOOD)
    with pytest.raises(Exception, match="tile"):
        TileLog.open(storage, ORIGIN).rewrite({STATE_PATH: b"x"})
    assert storage.files == GOOD.files


# --- Any damage: repaired byte for byte, or reported; never a wrong log ---------------------------------

_DAMAGE = st.lists(
    st.tuples(
        st.sampled_from(FILES), st.sampled_from(["flip", "cut", "delete", "grow"]), st.integers(0, 10**6)
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(damage=_DAMAGE, liar=st.sampled_from([None, 2, 3]), silent=st.booleans())
def test_any_damage_is_repaired_or_reported(
    damage: list[tuple[str, str, int]], liar: int | None, silent: bool
) -> None:
    damaged = copy_of(GOOD)
    for path, how, at in damage:
        data = damaged.files.get(path)
        if not data:
            continue
        if how == "flip":
            flip(damaged, path, at)
        elif how == "cut":
            damaged.files[path] = data[: at % len(data)]
        elif how == "delete":
            del damaged.files[path]
        else:
            damaged.files[path] = data + bytes([at % 256]) * (1 + at % 40)
    if audit(damaged).ok:
        return  # the edits cancelled out
    peers = honest_peers()
    if silent:
        del peers[4]
    repair = run_repair(damaged, peers, {liar: lie} if liar else {})
    # One honest peer answers: the repair always succeeds, from it, and restores every file.
    assert repair.files is not None, repair.failure
    assert repair.source is None or repair.source != liar
    assert [peer for peer, _ in repair.bad_peers] in ([], [liar])
    repaired(damaged, repair)


# --- A server's own copy: its tree beyond the checkpoint, and partials of older sizes ------------

# Appended 100, 300, then the rest: older partials 0/000.p/100 and bundle (of a checkpoint at
# 100), 0/001.p/144 and bundle and 1/000.p/1 (of the signed size, 400); the tree's own size is
# SIZE, unsigned beyond 400.
SIGNED_AT = 400
TIP_LOG = honest_log(batches=(100, 300, SIZE - 400))
TIP = Checkpoint(ORIGIN, SIZE, TileLog.open(TIP_LOG, ORIGIN).root())
SIGNED_400 = Checkpoint(ORIGIN, SIGNED_AT, TileLog.open(TIP_LOG, ORIGIN).root_at(SIGNED_AT))
OLDER = [
    "tile/0/000.p/100",
    "tile/entries/000.p/100",
    "tile/0/001.p/144",
    "tile/entries/001.p/144",
    "tile/1/000.p/1",
]


def audit_tip(storage: MemoryStorage) -> AuditReport:
    checker = LogVerifier(StorageSource(storage), signer(ORIGIN).verifier)
    return audit_copy(checker, storage, SIGNED_400, TIP)


def run_tip_repair(damaged: MemoryStorage, peers: dict[int, MemoryStorage]) -> Repair:
    report = audit_tip(damaged)
    repair = Repair(me=1, n=4, storage=damaged, origin=ORIGIN, report=report, timeout=5.0)
    logs = {i: TileLog.open(s, ORIGIN) for i, s in peers.items()}
    repair.start(0.0)
    for _ in range(10_000):
        if repair.done:
            break
        out, repair.out = repair.out, []
        for to, message in out:
            repair.receive(to, answer_request(logs[to], message), 0.0)
    assert repair.done
    return repair


def test_the_tree_beyond_the_checkpoint_and_older_partials_are_audited() -> None:
    assert set(OLDER) <= set(TIP_LOG.files)
    report = audit_tip(TIP_LOG)
    assert report.ok and report.signed == (SIGNED_AT, SIGNED_400.root) and report.size == SIZE
    damaged = copy_of(TIP_LOG)
    flip(damaged, "tile/entries/003.p/88", 7)  # unsigned: beyond 400
    flip(damaged, "tile/0/000.p/100", 0)
    report = audit_tip(damaged)
    assert not report.ok and report.bad_bundles == (Bundle(3, 88),)
    assert report.bad_partials == ("tile/0/000.p/100",)
    assert report.message().startswith(f"audit of the tree of size {SIZE} (signed up to {SIGNED_AT}):")
    repair = run_tip_repair(damaged, {i: copy_of(TIP_LOG) for i in (2, 3, 4)})
    assert repair.files is not None and repair.source == 2
    assert repair.summary() == (
        "1 entry bundle(s) (tile/entries/003.p/88) from server 2 and 1 partial file(s) of older sizes "
        "(tile/0/000.p/100) from the tree's"
    )
    # A peer that has not reached our size lacks the entries, and is passed over.
    short = honest_log(batches=(100, 300, 500 - 400))
    damaged = copy_of(TIP_LOG)
    flip(damaged, "tile/entries/003.p/88", 7)
    repair = run_tip_repair(damaged, {2: short, 3: copy_of(TIP_LOG), 4: copy_of(TIP_LOG)})
    assert repair.source == 3 and repair.passed == ["server 2 does not have entries from 768"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    damage=st.lists(
        st.tuples(
            st.sampled_from(FILES + OLDER),
            st.sampled_from(["flip", "cut", "delete", "grow"]),
            st.integers(0, 10**6),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_any_damage_to_a_servers_own_copy_is_repaired_byte_for_byte(
    damage: list[tuple[str, str, int]],
) -> None:
    damaged = copy_of(TIP_LOG)
    for path, how, at in damage:
        data = damaged.files.get(path)
        if not data:
            continue
        if how == "flip":
            flip(damaged, path, at)
        elif how == "cut":
            damaged.files[path] = data[: at % len(data)]
        elif how == "delete":
            del damaged.files[path]
        else:
            damaged.files[path] = data + bytes([at % 256]) * (1 + at % 40)
    report = audit_tip(damaged)
    if report.ok:
        # The edits cancelled out, or only an older partial that may be missing went.
        for path in {p for p, _, _ in damage}:
            allowed = (TIP_LOG.files[path], None) if path in OLDER else (TIP_LOG.files[path],)
            assert damaged.files.get(path) in allowed, path
        return
    repair = run_tip_repair(damaged, {i: copy_of(TIP_LOG) for i in (2, 3, 4)})
    assert repair.files is not None, repair.failure
    TileLog(damaged, ORIGIN, merkle.Frontier()).rewrite(repair.files)
    assert audit_tip(damaged).ok
    assert {p: damaged.files.get(p) for p in FILES} == {p: TIP_LOG.files[p] for p in FILES}
    for path in OLDER:  # every older partial is right again, or (allowed) missing
        assert damaged.files.get(path) in (None, TIP_LOG.files[path]), path

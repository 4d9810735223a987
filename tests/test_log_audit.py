"""The server's audit beyond the latest signed tree's own files: partial files of older signed
sizes, the entries appended since the checkpoint, ``state/tree`` and the ``checkpoint`` file.

Four LogNodes joined by in-memory links (tests/test_log_node.py's Cluster), on disk. Their
log is signed at 270 and then at 300, and grows to 340 with no checkpoint: so each server
holds ``tile/0/001.p/14`` (of the checkpoint at 270), ``.p/44`` (the signed size's) and
``.p/84`` (its own tree's, unsigned), and the same for the bundles. Each kind of file is
edited on server 2's disk in turn: its audit names the file in a ``log-store-damaged`` alert
and puts back exactly the bytes the other servers hold.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import trio
from test_log_index import make_entry
from test_log_node import LOG_KEY, Cluster, sign_with_log_key

from appliance.apps.log import index as index_module
from appliance.apps.log.checkpoint import Verifier, open_checkpoint
from appliance.apps.log.index import LogIndex, host_key
from appliance.apps.log.reader import CHECKPOINT_PATH, LogReader, SearchQuery
from appliance.apps.log.repair import older_partials
from appliance.apps.log.tiles import STATE_PATH, MemoryStorage, TileLog
from appliance.protocols._core import AlertKind


def flip(path: Path, at: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 1
    path.write_bytes(bytes(data))


def cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:5])


async def test_each_kind_of_file_beyond_the_signed_tree_is_audited_alerted_and_repaired(
    tmp_path: Path,
) -> None:
    c = Cluster(tmp_path)
    alerts: list[Any] = []
    c.nodes[2]._on_alert = alerts.append
    public = bytes(LOG_KEY.verify_key)
    verifier = Verifier(c.nodes[1].tree.origin, public)

    def published(i: int) -> int:
        note = c.nodes[i].tree.storage.read(CHECKPOINT_PATH)
        return -1 if note is None else open_checkpoint(note, c.nodes[i].tree.origin, [verifier]).size

    mine, theirs = tmp_path / "log-2", tmp_path / "log-4"
    async with trio.open_nursery() as nursery:
        for i in c.nodes:
            nursery.start_soon(c.deliver, i)
            await nursery.start(c.nodes[i].run)
        async with trio.open_nursery() as signing:
            for i in c.nodes:
                await signing.start(
                    functools.partial(c.nodes[i].checkpoints, sign_with_log_key, public, interval=0.1)
                )
            await c.enter(0)
            assert await c.nodes[2].audit() and not alerts  # an empty log: nothing to find
            for size in (270, 300):
                with trio.fail_after(30):
                    await c.nodes[1].append([f"line {k}".encode() for k in range(c.nodes[1].size, size)])
                    while not all(published(i) == size for i in c.nodes):
                        await trio.sleep(0.05)
                if size == 270:
                    older_note = (mine / CHECKPOINT_PATH).read_bytes()
            signing.cancel_scope.cancel()  # no checkpoint from here on
        with trio.fail_after(30):
            await c.nodes[1].append([f"line {k}".encode() for k in range(300, 340)])
            while not all(n.size == 340 for n in c.nodes.values()):
                await trio.sleep(0.05)
        assert await c.nodes[2].audit() and not alerts
        files = [
            "tile/0/001.p/14",
            "tile/entries/001.p/14",
            "tile/0/001.p/44",
            "tile/entries/001.p/44",
            "tile/0/001.p/84",
            "tile/entries/001.p/84",
            "tile/1/000.p/1",
        ]
        assert all((mine / p).read_bytes() == (theirs / p).read_bytes() for p in files)
        state = (mine / STATE_PATH).read_bytes()
        note = (mine / CHECKPOINT_PATH).read_bytes()

        cases: list[tuple[str, Any, str]] = [
            # Partial files of older signed sizes.
            (
                "tile/0/001.p/14",
                flip,
                "tile/0/001.p/14 (an older size's partial tile) is not the first 14 hashes of "
                "tile/0/001.p/84",
            ),
            (
                "tile/entries/001.p/14",
                flip,
                "tile/entries/001.p/14 (an older size's partial bundle) is not the first 14 entries of "
                "tile/entries/001.p/84",
            ),
            # The signed size's own partials (the read side serves them).
            (
                "tile/entries/001.p/44",
                Path.unlink,
                "tile/entries/001.p/44 (the signed size's partial bundle) is missing",
            ),
            ("tile/0/001.p/44", cut, "tile/0/001.p/44 (the signed size's partial tile) is not the first 44"),
            # The entries and tiles appended since the checkpoint.
            (
                "tile/entries/001.p/84",
                flip,
                "tile/entries/001.p/84: entry 339 (number 83 in the bundle) does not hash to leaf 83 of "
                "tile/0/001.p/84 (the tiles give the signed root of size 300 and this server's root of "
                "size 340)",
            ),
            ("tile/0/001.p/84", cut, "tile/0/001.p/84 is 5 bytes, not 84 hashes of 32"),
            ("tile/1/000.p/1", flip, "tile/1/000.p/1: hash 0 (entries 0..255) is wrong"),
        ]
        for path, edit, said in cases:
            alerts.clear()
            edit(mine / path)
            with trio.fail_after(30):
                assert await c.nodes[2].audit(), path
            assert [a.kind for a in alerts] == [AlertKind.LOG_STORE_DAMAGED], path
            assert said in alerts[0].detail, alerts[0].detail
            assert (mine / path).read_bytes() == (theirs / path).read_bytes(), path
            assert c.nodes[2].damaged is None

        # state/tree, and the checkpoint file: rolled back to an older signed one, then garbage.
        for path, edit, said, right in [
            (
                STATE_PATH,
                lambda p: p.write_bytes(state.replace(b"340", b"339")),
                "state/tree differs from this server's tree (size 340): rewritten from the tree in memory",
                state,
            ),
            (
                CHECKPOINT_PATH,
                lambda p: p.write_bytes(older_note),
                "checkpoint differs from the signed checkpoint this server published (size 300): rewritten",
                note,
            ),
            (CHECKPOINT_PATH, Path.unlink, "checkpoint is missing (size 300)", note),
        ]:
            alerts.clear()
            edit(mine / path)
            with trio.fail_after(30):
                assert await c.nodes[2].audit(), path
            assert [a.kind for a in alerts] == [AlertKind.LOG_STORE_DAMAGED], path
            assert said in alerts[0].detail, alerts[0].detail
            assert (mine / path).read_bytes() == right

        # A checkpoint file that does not verify, found by a server with none in memory (as
        # after a restart): the peers' one takes its place.
        alerts.clear()
        c.nodes[2]._note = None
        (mine / CHECKPOINT_PATH).write_bytes(note.replace(b"340", b"341").replace(b"300", b"301"))
        with trio.fail_after(30):
            assert await c.nodes[2].audit()
        assert "checkpoint does not verify with the log's key" in alerts[0].detail
        assert (mine / CHECKPOINT_PATH).read_bytes() == (theirs / CHECKPOINT_PATH).read_bytes() == note
        nursery.cancel_scope.cancel()
    assert c.nodes[2].repairs == len(cases) + 4
    assert all((mine / p).read_bytes() == (theirs / p).read_bytes() for p in files)

    # Server 2 restarted: it takes the verified checkpoint file it finds as the one to expect.
    restarted = c.make(2)
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(restarted.checkpoints, sign_with_log_key, public, interval=60))
        assert restarted._note == note
        (mine / CHECKPOINT_PATH).write_bytes(older_note)
        with trio.fail_after(30):
            assert await restarted.audit()
        assert (mine / CHECKPOINT_PATH).read_bytes() == note and restarted.repairs == 1
        nursery.cancel_scope.cancel()


def test_older_partials_are_prefixes_of_the_trees_files_and_may_be_pruned() -> None:
    storage = MemoryStorage()
    log = TileLog.open(storage, "test.example/log")
    for count in (10, 20, 300, 40):  # partials of widths 10, 30, 74 (tile 1), 114
        log.append([f"e{log.size + k}".encode() for k in range(count)])
    assert older_partials(storage, 370, 330) == ({}, [])
    storage.files["tile/0/001.p/74"] = bytes(74 * 32)
    fixes, lines = older_partials(storage, 370, 330)
    assert (
        list(fixes) == ["tile/0/001.p/74"]
        and fixes["tile/0/001.p/74"] == storage.files["tile/0/001.p/114"][: 74 * 32]
    )
    assert lines == [
        "tile/0/001.p/74 (the signed size's partial tile) is not the first 74 hashes of tile/0/001.p/114"
    ]
    # A partial of a pruned position (the full tile is there) may be missing, even the signed size's.
    del storage.files["tile/0/000.p/10"], storage.files["tile/entries/000.p/30"]
    storage.files["tile/0/001.p/74"] = fixes["tile/0/001.p/74"]
    assert older_partials(storage, 370, 30) == ({}, [])
    # Widths beyond the audited size (appends since) are not looked at.
    log.append([b"more"])
    assert older_partials(storage, 370, 330) == ({}, [])


def test_a_wrong_tree_file_is_left_to_the_audit() -> None:
    storage = MemoryStorage()
    log = TileLog.open(storage, "test.example/log")
    log.append([b"a"] * 10)
    log.append([b"b"] * 10)
    storage.files["tile/0/000.p/20"] = b"short"
    storage.files["tile/0/000.p/10"] = bytes(320)
    # The tree's own tile is wrong: its older partials are checked after its repair, not now.
    assert older_partials(storage, 20, 10, skip={"tile/0/000.p/20"}) == ({}, [])
    assert older_partials(storage, 20, 10) == ({}, [])  # unreadable: nothing to compare with


async def test_the_audit_checks_the_search_index_alerts_and_rebuilds_it(tmp_path: Path) -> None:
    """Server 2's index has a forged record (a good file digest, a host left out, so that a
    search skips the bundle): its audit names it in a ``log-store-damaged`` alert and rebuilds
    the index from the authenticated bundles; the search finds the entry again."""
    c = Cluster(tmp_path)
    alerts: list[Any] = []
    node = c.nodes[2]
    node._on_alert = alerts.append
    public = bytes(LOG_KEY.verify_key)
    storage = node.tree.storage
    origin = node.tree.origin
    entries = [make_entry(i, "rare" if i == 300 else f"host{i % 4}", "app", 1_000 + i) for i in range(600)]
    async with trio.open_nursery() as nursery:
        await c.start_signing(nursery)
        with trio.fail_after(30):
            await c.nodes[1].append(entries)
            while node.checkpointed_size < 600:
                await trio.sleep(0.05)
        reader = LogReader(storage, origin, [Verifier(origin, public)])
        assert reader.update_index() == 2
        q = SearchQuery(host="rare", limit=10)
        assert [e["index"] for e in reader.search(q)["entries"]] == [300]
        assert await node.audit() and not alerts

        honest = LogIndex(storage, origin).records(2)
        rare = host_key("rare")
        keys = b"".join(
            k for k in (honest[1].keys[j : j + 8] for j in range(0, len(honest[1].keys), 8)) if k != rare
        )
        forged = [honest[0], dataclasses.replace(honest[1], keys=keys)]
        (tmp_path / "log-2" / "index" / "tail").write_bytes(index_module._encode_file(origin, 0, forged))
        assert LogReader(storage, origin, [Verifier(origin, public)]).search(q)["entries"] == []
        with trio.fail_after(30):
            assert await node.audit()
        nursery.cancel_scope.cancel()
    assert [a.kind for a in alerts] == [AlertKind.LOG_STORE_DAMAGED]
    assert alerts[0].detail == (
        "this server's search index differs from its entry bundles: the index's record of "
        "tile/entries/001 is not the bundle's (its hosts and apps) (dropped from bundle 1 and "
        "rebuilt from the bundles)"
    )
    assert LogIndex(storage, origin).records(2) == honest and node.damaged is None and node.repairs == 1
    assert [e["index"] for e in reader.search(q)["entries"]] == [300]

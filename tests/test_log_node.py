"""LogNode: the replicated log's trio glue, four nodes joined by in-memory links.

The channel identities and KeyTables are real (certificates issued by Ed25519 period keys),
so the vote-key announcements are checked as in ``pst serve``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from nacl.signing import SigningKey

from appliance.apps.log.checkpoint import Checkpoint, Verifier, open_checkpoint
from appliance.apps.log.guard import checkpoint_note
from appliance.apps.log.node import LOG_FRAME, LogNode, is_log_frame
from appliance.apps.log.reader import CHECKPOINT_PATH
from appliance.apps.log.tiles import PosixStorage, TileLog
from appliance.crypto import encoding
from appliance.net import channel_identity
from appliance.protocols._core import AlertKind

N, T = 4, 1


def period_seed(period: int, server: int) -> bytes:
    return bytes([period + 1, server]) * 16


def key_table(period: int) -> dict[int, bytes]:
    return {i: bytes(SigningKey(period_seed(period, i)).verify_key) for i in range(1, N + 1)}


class Cluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.nodes: dict[int, LogNode] = {}
        self.inbox: dict[int, trio.MemorySendChannel[tuple[int, bytes]]] = {}
        self.receivers: dict[int, trio.MemoryReceiveChannel[tuple[int, bytes]]] = {}
        self.tamper: dict[int, Any] = {}
        #: Frames lost on the way: (from, to, frame) -> dropped.
        self.drop: Callable[[int, int, bytes], bool] = lambda frm, to, data: False
        for i in range(1, N + 1):
            self.inbox[i], self.receivers[i] = trio.open_memory_channel(10_000)
            self.nodes[i] = self.make(i)

    def make(
        self,
        i: int,
        log: TileLog | None = None,
        rebuild: str | None = None,
        on_alert: Callable[[Any], None] = lambda alert: None,
    ) -> LogNode:
        """Server i's node on its directories (``log``: a tree opened already, ``rebuild``: why
        it is a new one, as :func:`appliance.apps.log.node.open_node` gives them)."""

        def send(to: int, data: bytes, frm: int = i) -> None:
            assert is_log_frame(data)
            if frm in self.tamper:
                data = self.tamper[frm](to, data)
            if not self.drop(frm, to, data):
                self.inbox[to].send_nowait((frm, data))

        if log is None:
            log = TileLog.open(PosixStorage(self.root / f"log-{i}"), "test.example/log")
        return LogNode(
            rebuild=rebuild,
            on_alert=on_alert,
            server_id=i,
            n=N,
            t=T,
            log=log,
            storage=PosixStorage(self.root / f"replica-{i}"),
            send=send,
            base_timeout=0.2,
            resend=0.5,
        )

    async def deliver(self, i: int) -> None:
        async for frm, data in self.receivers[i]:
            await self.nodes[i].frame(frm, data)

    async def start(self, nursery: trio.Nursery) -> None:
        """Every node running and delivering, all in period 0."""
        for i in self.nodes:
            nursery.start_soon(self.deliver, i)
            await nursery.start(self.nodes[i].run)
        await self.enter(0)

    async def start_signing(self, nursery: trio.Nursery) -> None:
        """:meth:`start`, with every node publishing checkpoints signed by LOG_KEY."""
        for i in self.nodes:
            nursery.start_soon(self.deliver, i)
            await nursery.start(self.nodes[i].run)
            sign = functools.partial(self.nodes[i].checkpoints, sign_with_log_key, bytes(LOG_KEY.verify_key))
            await nursery.start(functools.partial(sign, interval=0.1))
        await self.enter(0)

    async def enter(self, period: int, servers: list[int] | None = None) -> None:
        for i in servers or list(self.nodes):
            ident = channel_identity(i, period, period_seed(period, i))
            await self.nodes[i].identity(period, key_table(period), ident)


async def test_four_nodes_append_concurrently_and_hold_the_same_log(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    async with trio.open_nursery() as nursery:
        await c.start(nursery)
        with trio.fail_after(30):
            async with trio.open_nursery() as senders:
                for i in c.nodes:
                    for k in range(3):
                        senders.start_soon(
                            c.nodes[i].append, [f"server {i} line {k}.{j}".encode() for j in range(5)]
                        )
        with trio.fail_after(30):
            while len({n.size for n in c.nodes.values()}) != 1:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    trees = [await n.read_entries(0, n.size) for n in c.nodes.values()]
    assert all(t == trees[0] for t in trees) and len(trees[0]) == N * 3 * 5
    assert sorted(trees[0]) == sorted(
        f"server {i} line {k}.{j}".encode() for i in range(1, 5) for k in range(3) for j in range(5)
    )


async def test_a_vote_key_not_signed_by_the_servers_channel_key_is_refused(tmp_path: Path) -> None:
    c = Cluster(tmp_path)

    def forge(to: int, data: bytes) -> bytes:
        obj = encoding.decode(data[1:])
        if obj.get("log") == "vote-key":
            obj = {**obj, "key": bytes(32)}  # a key the channel key did not sign
        return LOG_FRAME + encoding.encode(obj)

    c.tamper[4] = forge
    async with trio.open_nursery() as nursery:
        await c.start(nursery)
        with trio.fail_after(30):
            await c.nodes[1].append([b"needs three of the four"])
        nursery.cancel_scope.cancel()
    keys = c.nodes[2].replica._keys[0].known
    assert sorted(keys) == [1, 2, 3]  # server 4's forged key never counted


async def test_the_log_moves_to_the_next_period_and_keeps_going(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    async with trio.open_nursery() as nursery:
        await c.start(nursery)
        with trio.fail_after(30):
            await c.nodes[1].append([b"period 0"])
        await c.enter(1)
        with trio.fail_after(30):
            await c.nodes[2].append([b"period 1"])
            while not all(n.replica.slot_period == 1 for n in c.nodes.values()):
                await c.nodes[3].append([b"more"])
        nursery.cancel_scope.cancel()
    for n in c.nodes.values():
        assert n.storage.list("replica/votekeys") == ["replica/votekeys/1"]


LOG_KEY = SigningKey(b"k" * 32)


async def test_a_server_a_period_behind_learns_its_vote_keys_and_catches_up_with_sync(
    tmp_path: Path,
) -> None:
    """Server 4 loses every announcement of the others' vote keys of period 1 while their
    committee is in period 1; they then move it on to period 2. They still announce their key of
    the period before their committee's, so server 4 checks period 1's decisions and catches up
    with ``sync`` (the state reports, the other way, are lost here). Before, they stopped
    announcing a period as soon as their committee left it: server 4 never learnt the keys."""
    c = Cluster(tmp_path)
    lost = {"announcements": True}

    def drop(frm: int, to: int, data: bytes) -> bool:
        if 4 not in (frm, to):
            return False
        obj = encoding.decode(data[1:])
        kind = obj.get("log") if isinstance(obj, dict) else None
        if kind in ("state", "state-req"):
            return True
        return lost["announcements"] and to == 4 and kind == "vote-key" and obj.get("period") == 1

    c.drop = drop
    async with trio.open_nursery() as nursery:
        await c.start(nursery)
        with trio.fail_after(30):
            await c.nodes[1].append([b"period 0"])
            await c.enter(1)
            while not all(n.replica.slot_period == 1 for n in c.nodes.values()):
                await trio.sleep(0.05)
            await c.enter(2)
            while not all(c.nodes[i].replica.slot_period == 2 for i in (1, 2, 3)):
                await trio.sleep(0.05)
            assert c.nodes[4].replica.slot_period == 1
            lost["announcements"] = False
            await c.nodes[2].append([b"period 2"])
            while c.nodes[4].size < 2 or c.nodes[4].replica.slot_period != 2:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert c.nodes[4].replica.caught_up == 0
    assert sorted(c.nodes[4].replica._keys[1].known) == [1, 2, 3, 4]


async def sign_with_log_key(text: str) -> bytes:
    """What the key-holder does with the log's FROST key, with a plain key instead."""
    body = Checkpoint.parse(text)
    return checkpoint_note(body, bytes(LOG_KEY.verify_key), LOG_KEY.sign(text.encode()).signature)


async def test_checkpoints_are_published_on_every_server_and_a_silent_coordinator_is_replaced(
    tmp_path: Path,
) -> None:
    c = Cluster(tmp_path)
    public = bytes(LOG_KEY.verify_key)
    async with trio.open_nursery() as nursery:
        for i in c.nodes:
            nursery.start_soon(c.deliver, i)
            await nursery.start(c.nodes[i].run)
            if i != 1:  # server 1, the coordinator of period 0, never asks
                await nursery.start(
                    functools.partial(c.nodes[i].checkpoints, sign_with_log_key, public, interval=0.1)
                )
        await c.enter(0)
        with trio.fail_after(30):
            await c.nodes[3].append([b"first", b"second", b"third"])
        with trio.fail_after(30):
            while not all(
                (note := n.tree.storage.read(CHECKPOINT_PATH)) is not None
                and open_checkpoint(note, n.tree.origin, [Verifier(n.tree.origin, public)]).size == 3
                for i, n in c.nodes.items()
                if i != 1
            ):
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert c.nodes[2].checkpointed == 3  # server 2 took over
    assert all(c.nodes[i].checkpointed == 0 for i in (3, 4))


async def test_an_audit_finds_an_entry_changed_on_disk_and_repairs_it_from_an_honest_peer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    c = Cluster(tmp_path)
    alerts: list[Any] = []
    c.nodes[2]._on_alert = alerts.append

    def lie(to: int, data: bytes) -> bytes:  # server 3 falsifies what it sends for a repair
        obj = encoding.decode(data[1:])
        if obj.get("log") == "repair" and obj["entries"]:
            obj["entries"][0] += b" (falsified)"
        return LOG_FRAME + encoding.encode(obj)

    c.tamper[3] = lie
    async with trio.open_nursery() as nursery:
        await c.start_signing(nursery)
        with trio.fail_after(30):
            await c.nodes[1].append([f"line {k}".encode() for k in range(300)])
            while c.nodes[2].checkpointed_size < 300:
                await trio.sleep(0.05)
        assert await c.nodes[2].audit()
        good = {p: (tmp_path / "log-4" / p).read_bytes() for p in ("tile/entries/000", "tile/0/001.p/44")}
        bundle = tmp_path / "log-2" / "tile" / "entries" / "000"
        data = bytearray(bundle.read_bytes())
        data[-1] ^= 1  # the last byte of entry 255
        bundle.write_bytes(bytes(data))
        (tmp_path / "log-2" / "tile" / "0" / "001.p" / "44").write_bytes(b"short")
        with caplog.at_level(logging.WARNING, logger="pst.log"), trio.fail_after(30):
            assert await c.nodes[2].audit()  # found, repaired (server 3 lies; server 4 does not)
        assert await c.nodes[3].audit()  # the others' copies are intact
        # Appends and the audit go on after the repair.
        with trio.fail_after(30):
            await c.nodes[2].append([b"after the repair"])
            while c.nodes[2].checkpointed_size < 301:
                await trio.sleep(0.05)
        assert await c.nodes[2].audit()
        nursery.cancel_scope.cancel()
    assert [a.kind for a in alerts] == [AlertKind.LOG_STORE_DAMAGED]
    assert "tile/0/000: hash 255 (entry 255) differs from its entries" in alerts[0].detail
    assert "tile/0/001.p/44 is 5 bytes, not 44 hashes of 32" in alerts[0].detail
    assert c.nodes[2].damaged is None and c.nodes[2].repairs == 1
    assert c.nodes[2].replication()["repairs"] == 1
    for path, content in good.items():
        assert (tmp_path / "log-2" / path).read_bytes() == content
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        m.startswith(
            "log: server 3 sent bad data to repair this server's copy of the log: its entries for "
            "tile/entries/000, tile/entries/001.p/44 do not give the signed root of size 300"
        )
        for m in warnings
    ), warnings
    assert any(
        "repaired this server's copy of the log: 1 entry bundle(s) (tile/entries/000) from server 4 and "
        "1 tile(s) (tile/0/001.p/44) recomputed from the entries" in m
        for m in warnings
    ), warnings


async def test_a_copy_no_peer_can_repair_stays_damaged_and_says_why(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    for i in (1, 3, 4):
        c.nodes[i].repair_timeout = 0.5
    public = bytes(LOG_KEY.verify_key)
    async with trio.open_nursery() as nursery:
        for i in (1, 2, 3):  # server 4 is down: a quorum of three logs the entries
            nursery.start_soon(c.deliver, i)
            await nursery.start(c.nodes[i].run)
            await nursery.start(
                functools.partial(c.nodes[i].checkpoints, sign_with_log_key, public, interval=0.1)
            )
        await c.enter(0, [1, 2, 3])
        with trio.fail_after(30):
            await c.nodes[1].append([f"line {k}".encode() for k in range(20)])
            while c.nodes[1].checkpointed_size < 20 or c.nodes[1].tree.storage.read(CHECKPOINT_PATH) is None:
                await trio.sleep(0.05)
        c.tamper[2] = c.tamper[3] = lambda to, data: b"\x00" + encoding.encode({"log": "nothing"})
        bundle = tmp_path / "log-1" / "tile" / "entries" / "000.p" / "20"
        bundle.write_bytes(bundle.read_bytes()[:-1])
        with trio.fail_after(30):
            assert not await c.nodes[1].audit()
        nursery.cancel_scope.cancel()
    assert c.nodes[1].damaged == (
        "this server's copy of the log is damaged and was not repaired: no peer sent entries that give "
        "the signed root (server 2 did not answer in 0.5 s; server 3 did not answer in 0.5 s; "
        "server 4 did not answer in 0.5 s)"
    )


async def test_an_idle_node_sleeps_until_its_next_timer(tmp_path: Path) -> None:
    """Review finding: the loop waited for a time.monotonic deadline on trio's clock (another
    origin) and spun ~2,000 rounds a second while idle. Idle, it wakes only for its timers."""
    c = Cluster(tmp_path)
    rounds = 0
    node = c.nodes[1]
    step = node._step

    def counting(inbox: list[tuple[int, Any]], now: float) -> list[tuple[int, dict[str, Any]]]:
        nonlocal rounds
        rounds += 1
        return step(inbox, now)

    node._step = counting  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        await c.start(nursery)
        with trio.fail_after(30):
            await node.append([b"one line"])
        await trio.sleep(0.5)  # the slot's last messages
        rounds = 0
        await trio.sleep(1.5)  # idle: timers of 0.2 s (agreement) and 0.5 s (resend)
        nursery.cancel_scope.cancel()
    assert rounds <= 30, f"{rounds} rounds in 1.5 s idle"


async def test_a_held_announcement_of_a_server_left_out_of_the_keytable_is_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Server 4 announces a vote key for period 1 before server 1 has period 1's KeyTable (held),
    and the KeyTable server 1 then gets leaves server 4 out (a recovering server the refresh
    completed without): the held announcement is refused as a bad message; server 1 goes on."""
    c = Cluster(tmp_path)
    async with trio.open_nursery() as nursery:
        await c.start(nursery)
        await c.enter(1, [4])
        with trio.fail_after(10):
            while not c.nodes[1]._early:
                await trio.sleep(0.01)
        without_4 = {i: k for i, k in key_table(1).items() if i != 4}
        with caplog.at_level(logging.WARNING, logger="pst.log"):
            for i in (1, 2, 3):
                await c.nodes[i].identity(1, without_4, channel_identity(i, 1, period_seed(1, i)))
        with trio.fail_after(30):
            await c.nodes[1].append([b"period 1 without server 4"])
        nursery.cancel_scope.cancel()
    assert "server 4 sent a bad message: vote key announcement" in caplog.text
    assert 4 not in c.nodes[1].replica._keys[1].known


async def test_publishing_a_checkpoint_prunes_the_partial_tiles_its_full_ones_supersede(
    tmp_path: Path,
) -> None:
    c = Cluster(tmp_path)
    public = bytes(LOG_KEY.verify_key)
    verifier = Verifier(c.nodes[1].tree.origin, public)

    def published(n: Any) -> int:
        note = n.tree.storage.read(CHECKPOINT_PATH)
        return -1 if note is None else open_checkpoint(note, n.tree.origin, [verifier]).size

    async with trio.open_nursery() as nursery:
        for i in c.nodes:
            nursery.start_soon(c.deliver, i)
            await nursery.start(c.nodes[i].run)
            await nursery.start(
                functools.partial(c.nodes[i].checkpoints, sign_with_log_key, public, interval=0.1)
            )
        await c.enter(0)
        for size, batch in ((3, [b"a", b"b", b"c"]), (303, [b"x%d" % i for i in range(300)])):
            with trio.fail_after(30):
                await c.nodes[3].append(batch)
            with trio.fail_after(30):
                while not all(published(n) == size for n in c.nodes.values()):
                    await trio.sleep(0.05)
            if size == 3:
                assert all(n.tree.storage.read("tile/0/000.p/3") is not None for n in c.nodes.values())
        nursery.cancel_scope.cancel()
    for n in c.nodes.values():
        # 303 entries: a full tile 0 supersedes the partials of size 3; the partial of 47 stays.
        assert n.tree.storage.read("tile/0/000.p/3") is None
        assert n.tree.storage.read("tile/entries/000.p/3") is None
        assert n.tree.storage.read("tile/0/000") is not None
        assert n.tree.storage.read("tile/0/001.p/47") is not None
        assert n.tree.read_entries(0, 3) == [b"a", b"b", b"c"]

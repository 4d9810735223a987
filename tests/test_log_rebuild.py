"""A copy of the log too damaged to open: set aside, alerted, rebuilt from the peers.

Four LogNodes joined by in-memory links (tests/test_log_node.py's Cluster), on disk. Server 2
is stopped, its log directory damaged so that the tree cannot be opened (a tile cut short, the
state record garbage, the ``state`` directory replaced by a file, the whole directory replaced
by a file), and started again through :func:`appliance.apps.log.node.open_node`, as ``pst
serve`` does: the damaged files are kept aside, a ``log-store-damaged`` alert names what
failed, the replica applies every slot again from the peers, the rebuilt tree gives the root
of the network's signed checkpoint, the audit passes, and the server takes entries again.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from test_log_node import LOG_KEY, Cluster, sign_with_log_key
from test_web import write_config

from appliance.apps.log.checkpoint import Checkpoint, Verifier, open_checkpoint
from appliance.apps.log.node import LogNode, open_node
from appliance.apps.log.reader import CHECKPOINT_PATH
from appliance.apps.log.tiles import STATE_PATH, PosixStorage, TileLog
from appliance.host import config as node_config
from appliance.node.run import open_log
from appliance.node.store import StateDir
from appliance.protocols._core import AlertKind

ORIGIN = "test.example/log"
PUBLIC = bytes(LOG_KEY.verify_key)
VERIFIER = Verifier(ORIGIN, PUBLIC)


def cut_tile(log: Path) -> None:
    tile = log / "tile" / "0" / "001.p" / "44"  # the frontier's level-0 tile at size 300
    tile.write_bytes(tile.read_bytes()[:100])


def garbage_state(log: Path) -> None:
    (log / STATE_PATH).write_bytes(b"\x00not a tree head\xff")


def state_dir_is_a_file(log: Path) -> None:  # the tree then reads as empty: the replica says not
    for f in (log / "state").iterdir():
        f.unlink()
    (log / "state").rmdir()
    (log / "state").write_bytes(b"a file")


def log_dir_is_a_file(log: Path) -> None:
    log.rename(log.with_name("elsewhere"))
    log.write_bytes(b"a file")


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "a tile cut short": (cut_tile, "tile/0/001.p/44 is 100 bytes, not 44 hashes"),
    "the state record garbage": (garbage_state, "state/tree is not a tree head"),
    "a directory replaced by a file": (
        state_dir_is_a_file,
        "the log holds 0 entries, the replica's record says 300",
    ),
    "the log directory replaced by a file": (log_dir_is_a_file, "is not a directory"),
}


def signed(node: LogNode) -> tuple[int, bytes] | None:
    note = node.tree.storage.read(CHECKPOINT_PATH)
    if note is None:
        return None
    body = open_checkpoint(note, ORIGIN, [VERIFIER])
    return body.size, body.root


async def run_node(node: LogNode, *, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
    """A server: its replica and its checkpoints, until the scope it hands back is cancelled."""
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            await nursery.start(functools.partial(node.checkpoints, sign_with_log_key, PUBLIC, interval=0.1))
            task_status.started(scope)


class Servers:
    """The Cluster's four servers, each of which can be stopped (its frames dropped) and
    started again with a new node."""

    def __init__(self, root: Path) -> None:
        self.c = Cluster(root)
        self.down: set[int] = set()
        self.c.drop = lambda frm, to, data: bool(self.down & {frm, to})
        self.scopes: dict[int, trio.CancelScope] = {}

    async def start(self, nursery: trio.Nursery) -> None:
        for i in self.c.nodes:
            nursery.start_soon(self.c.deliver, i)
            self.scopes[i] = await nursery.start(run_node, self.c.nodes[i])
        await self.c.enter(0)

    def stop(self, i: int) -> None:
        self.down.add(i)
        self.scopes[i].cancel()

    async def restart(self, nursery: trio.Nursery, node: LogNode) -> None:
        self.c.nodes[node.server_id] = node
        self.down.discard(node.server_id)
        self.scopes[node.server_id] = await nursery.start(run_node, node)
        await self.c.enter(0, [node.server_id])

    def reopen(self, alerts: list[Any]) -> LogNode:
        """Server 2's node made again over its directory as ``pst serve`` does (``open_node``)."""
        return open_node(
            self.c.root / "log-2", ORIGIN, lambda tree, why: self.c.make(2, tree, why, alerts.append)
        )

    async def grow(self, size: int) -> None:
        """Entries up to ``size``, and every server's checkpoint of it."""
        nodes = self.c.nodes
        with trio.fail_after(30):
            await nodes[1].append([f"line {k}".encode() for k in range(nodes[1].size, size)])
            while not all(signed(n) == (size, nodes[1].tree.root()) for n in nodes.values()):
                await trio.sleep(0.05)


@pytest.mark.parametrize("kind", list(DAMAGE))
async def test_a_copy_too_damaged_to_open_is_set_aside_alerted_and_rebuilt_from_the_peers(
    tmp_path: Path, kind: str
) -> None:
    damage, said = DAMAGE[kind]
    servers = Servers(tmp_path)
    c, mine = servers.c, tmp_path / "log-2"
    async with trio.open_nursery() as nursery:
        await servers.start(nursery)
        await servers.grow(300)
        before = {p.relative_to(mine) for p in mine.rglob("*") if p.is_file()}

        servers.stop(2)  # its directory is damaged; the others go on
        with trio.fail_after(30):
            await c.nodes[3].append([f"more {k}".encode() for k in range(20)])
        damage(mine)

        alerts: list[Any] = []
        node = servers.reopen(alerts)
        assert node.replica.rebuilding and not node.rebuilt.is_set()
        assert [a.kind for a in alerts] == [AlertKind.LOG_STORE_DAMAGED]
        assert said in alerts[0].detail and "rebuilt from its peers" in alerts[0].detail, alerts[0].detail
        await servers.restart(nursery, node)
        with trio.fail_after(60):
            await node.rebuilt.wait()
            while signed(node) != signed(c.nodes[1]) or node._unchecked is not None:
                await trio.sleep(0.05)
        assert node.tree.size == c.nodes[1].tree.size == 320
        assert node.tree.root() == c.nodes[1].tree.root()
        with trio.fail_after(30):
            assert await node.audit()
        assert node.damaged is None
        # It serves again: its entries go into the log, on every server.
        with trio.fail_after(30):
            assert await node.append([b"after the rebuild"]) == [320]
            while not all(n.tree.size == 321 for n in c.nodes.values()):
                await trio.sleep(0.05)
        assert len({n.tree.root() for n in c.nodes.values()}) == 1
        nursery.cancel_scope.cancel()
    assert [a.kind for a in alerts] == [AlertKind.LOG_STORE_DAMAGED]  # the one, at the start

    # The damaged files were kept, not deleted.
    if kind == "the log directory replaced by a file":
        kept = [p for p in tmp_path.iterdir() if p.name.startswith("log-2.damaged-")]
        assert len(kept) == 1 and kept[0].read_bytes() == b"a file"
    else:
        kept = [p for p in mine.iterdir() if p.name.startswith("damaged-")]
        assert len(kept) == 1  # every file is still there (one of them damaged)
        left = {p.relative_to(kept[0]) for p in kept[0].rglob("*") if p.is_file()}
        if kind == "a directory replaced by a file":
            before = before - {Path(STATE_PATH)} | {Path("state")}
        assert left == before
    assert not (tmp_path / "replica-2" / "replica" / "rebuild").exists()


def test_pst_serve_sets_a_log_it_cannot_open_aside_and_alerts(tmp_path: Path) -> None:
    """``open_log`` (what ``pst serve`` runs) with a damaged tree: the log is available (a new
    tree, rebuilt from the peers), the alert is in the server's alerts.jsonl, the files kept."""
    config = node_config.load(write_config(tmp_path, f'[log]\norigin = "{ORIGIN}"'))
    assert config.log is not None
    directory = config.log.directory
    TileLog.open(PosixStorage(directory), ORIGIN).append([b"one", b"two", b"three"])
    (directory / STATE_PATH).write_bytes(b"not a tree head")
    service = open_log(config, [], lambda to, data: None)
    node = service.sink
    assert isinstance(node, LogNode) and service.available and node.size == 0
    assert node.damaged is not None and "state/tree is not a tree head" in node.damaged
    alerts = StateDir(config.state_dir).serve_dir / "alerts.jsonl"
    said = [json.loads(line) for line in alerts.read_text().splitlines()]
    assert [a["kind"] for a in said] == ["log-store-damaged"]
    assert f"the log in {directory} could not be opened" in said[0]["detail"]
    (kept,) = [p for p in directory.iterdir() if p.name.startswith("damaged-")]
    assert (kept / STATE_PATH).read_bytes() == b"not a tree head"
    assert (kept / "tile" / "entries" / "000.p" / "3").is_file()


async def test_a_checkpoint_file_rolled_back_while_the_server_was_down_is_named_and_restored(
    tmp_path: Path,
) -> None:
    """Server 2's ``checkpoint`` is put back to an older signed one while it is down: at its
    start it names the rollback (its own copy of the last one it published says so) and writes
    the newer one back. With its own copy gone too, the peers' newer checkpoint takes its place
    soon after the start (no alert: nothing says this server had published it)."""
    servers = Servers(tmp_path)
    c = servers.c
    mine = tmp_path / "log-2"
    async with trio.open_nursery() as nursery:
        await servers.start(nursery)
        notes = {}
        for size in (270, 300):
            await servers.grow(size)
            notes[size] = (mine / CHECKPOINT_PATH).read_bytes()

        for own_copy in (True, False):
            servers.stop(2)
            (mine / CHECKPOINT_PATH).write_bytes(notes[270])  # a valid signed checkpoint, older
            if not own_copy:
                (tmp_path / "replica-2" / "replica" / "checkpoint").unlink()
            alerts: list[Any] = []
            node = c.make(2, on_alert=alerts.append)
            await servers.restart(nursery, node)
            if own_copy:  # named and restored at the start
                assert [a.kind for a in alerts] == [AlertKind.LOG_STORE_DAMAGED]
                assert alerts[0].detail == (
                    "this server's checkpoint file holds the signed checkpoint of size 270: rolled "
                    "back, but the last one this server published is of size 300 (replica/checkpoint "
                    "in its replica's state): written back"
                )
                assert (mine / CHECKPOINT_PATH).read_bytes() == notes[300]
                assert node.damaged is None and node.repairs == 1
            else:  # the peers' newer one, once they are heard
                with trio.fail_after(30):
                    while (mine / CHECKPOINT_PATH).read_bytes() != notes[300]:
                        await trio.sleep(0.05)
                assert alerts == []
            with trio.fail_after(30):
                assert await node.audit()
            assert (
                node.damaged is None and [a.kind for a in alerts] == [AlertKind.LOG_STORE_DAMAGED] * own_copy
            )
        nursery.cancel_scope.cancel()


async def test_a_rebuilt_copy_is_checked_against_the_checkpoint_the_server_last_published(
    tmp_path: Path,
) -> None:
    """The rebuilt tree must have the root of the server's own last checkpoint: one with another
    root (a fork only t+1 signers could sign; forged here with the test's log key) is alerted."""
    servers = Servers(tmp_path)
    fork = await sign_with_log_key(Checkpoint(ORIGIN, 300, bytes(32)).text())
    alerts: list[Any] = []
    async with trio.open_nursery() as nursery:
        await servers.start(nursery)
        await servers.grow(300)
        servers.stop(2)
        (tmp_path / "replica-2" / "replica" / "checkpoint").write_bytes(fork)
        garbage_state(tmp_path / "log-2")
        node = servers.reopen(alerts)
        await servers.restart(nursery, node)
        with trio.fail_after(60):
            await node.rebuilt.wait()
            while len(alerts) < 2:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert [a.kind for a in alerts] == [AlertKind.LOG_STORE_DAMAGED] * 2
    assert alerts[1].detail == (
        "this server's rebuilt copy of the log (size 300) does not have the root of the checkpoint "
        "of size 300 it last published (replica/checkpoint)"
    )

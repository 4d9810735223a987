"""StoreNode: the store's trio glue, four nodes joined by in-memory links, key-holders faked with
real TDH2 shares of a dealt store key (no processes, no sockets).

The channel identities and KeyTables are real, so the store sequence's vote-key announcements
are checked as in ``pst serve``."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nacl.public
import trio
from nacl.signing import SigningKey

from appliance.apps.store import model, persist
from appliance.apps.store.client import StoreKey, combine_answers, seal_write
from appliance.apps.store.model import Client, DataType, ReadRequest
from appliance.apps.store.node import StoreNode, answers_to_obj, is_store_frame
from appliance.crypto import local, tdh2
from appliance.crypto.groups import P256 as G
from appliance.crypto.secret import DeterministicSource, system_scalar_source
from appliance.net import channel_identity
from appliance.protocols._core import Alert

N, T = 4, 1
ALICE = Client("vault", b"alice")


def period_seed(period: int, server: int) -> bytes:
    return bytes([period + 1, server, 7]) * 8 + bytes(8)


def key_table(period: int) -> dict[int, bytes]:
    return {i: bytes(SigningKey(period_seed(period, i)).verify_key) for i in range(1, N + 1)}


class Net:
    def __init__(self, root: Path) -> None:
        rand = DeterministicSource(5, G.order)
        self.keys = local.run_dkg(G, N, T, rand).keys
        self.public = self.keys[1].public
        self.alerts: dict[int, list[Alert]] = {i: [] for i in range(1, N + 1)}
        self.inbox: dict[int, trio.MemorySendChannel[tuple[int, bytes]]] = {}
        self.receivers: dict[int, trio.MemoryReceiveChannel[tuple[int, bytes]]] = {}
        self.nodes: dict[int, StoreNode] = {}
        for i in range(1, N + 1):
            self.inbox[i], self.receivers[i] = trio.open_memory_channel(10_000)
        for i in range(1, N + 1):
            self.nodes[i] = self.make(root, i)

    def key_info(self) -> dict[str, Any]:
        return {"group": G.name, "n": N, "t": T, "period": 0, "commitment": self.public.commitment.encode(G)}

    def make(self, root: Path, i: int) -> StoreNode:
        def send(to: int, data: bytes, frm: int = i) -> None:
            assert is_store_frame(data)
            self.inbox[to].send_nowait((frm, data))

        async def store_key() -> Mapping[str, Any]:
            return self.key_info()

        async def store_share(parts: list[list[bytes]], reader: bytes, i: int = i) -> Mapping[str, Any]:
            rand = system_scalar_source(G.order)
            shares = []
            for kem, lbl in parts:
                share = tdh2.decryption_share(G, self.keys[i], tdh2.Ciphertext.decode(G, kem), rand, lbl)
                shares.append(tdh2.share_for_reader(G, share, reader))
            return {"period": 0, "commitment": self.public.commitment.encode(G), "shares": shares}

        return StoreNode(
            server_id=i,
            n=N,
            t=T,
            directory=root / f"store-{i}",
            send=send,
            store_key=store_key,
            store_share=store_share,
            on_alert=self.alerts[i].append,
            base_timeout=0.2,
        )

    async def deliver(self, i: int) -> None:
        async for frm, data in self.receivers[i]:
            await self.nodes[i].frame(frm, data)

    async def start(self, nursery: trio.Nursery) -> None:
        for i, node in self.nodes.items():
            nursery.start_soon(self.deliver, i)
            await nursery.start(node.run)
        for i, node in self.nodes.items():
            ident = channel_identity(i, 0, period_seed(0, i))
            await node.sequence.identity(0, key_table(0), ident)
        for node in self.nodes.values():
            await node.ready()

    async def until_applied(self, count: int) -> None:
        while not all(n.service is not None and n.service.applied >= count for n in self.nodes.values()):
            await trio.sleep(0.05)


async def test_four_nodes_order_writes_read_secrets_refuse_with_alerts_and_release(tmp_path: Path) -> None:
    net = Net(tmp_path)
    key = StoreKey.from_result(net.key_info())
    owner = nacl.public.PrivateKey(b"\x07" * 32)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(60):
            await net.start(nursery)
            # Writes at two servers, ordered by the network, applied everywhere alike.
            await net.nodes[1].write(
                model.WriteRequest("vault", "motd", DataType.PUBLIC_ONCE, 1, value=b"hi"), ALICE
            )
            secret = seal_write(
                key, "vault", "seed", DataType.SECRET_SINGLE, b"s3", reader=bytes(owner.public_key)
            )
            await net.nodes[2].write(secret, ALICE)
            await net.until_applied(2)
            assert len({n.status()["digest"] for n in net.nodes.values()}) == 1
            assert (await net.nodes[3].read_public("vault", "motd", ALICE)).value == b"hi"
            # The owner reads its secret through server 4: t+1 shares sealed to its key.
            request = ReadRequest("vault", "seed", 1, bytes(owner.public_key))
            record, answers = await net.nodes[4].read_secret(request, ALICE)
            assert sum(a.shares is not None for a in answers.values()) >= T + 1
            sealed, data_key = combine_answers(key, record, answers_to_obj(answers), owner)
            assert tdh2.open_sealed(sealed, data_key) == b"s3"
            # Another client of the application: refused by every server, each raising an alert
            # that names the server that asked and the client.
            _record, refused = await net.nodes[4].read_secret(request, Client("vault", b"mallory"))
            assert {a.code for a in refused.values()} == {model.NOT_PERMITTED}
            for i in (1, 2, 3, 4):
                (alert,) = net.alerts[i]
                assert alert.server == 4 and "vault/6d616c6c6f7279" in alert.detail
            # A StoreUntil item due in a second: the network releases it with nobody reading.
            until = time.time() + 1
            item = seal_write(
                key, "vault", "will", DataType.STORE_UNTIL, b"later", until_ms=int(until * 1000)
            )
            await net.nodes[3].write(item, ALICE)
            while not all(  # (a server that has not applied the write yet has no such item)
                n.service and getattr(n.service.state.records.get(("vault", "will")), "value", b"")
                for n in net.nodes.values()
            ):
                await trio.sleep(0.1)
            assert (await net.nodes[2].store_retrieve("vault", b"bob", "will", None))["record"][
                "value"
            ] == b"later"
        nursery.cancel_scope.cancel()
    # The state on disk is what the node held: a new node there starts from it.
    again = net.make(tmp_path, 2)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            await nursery.start(again.run)
            service = await again.ready()
            assert service.applied >= 4 and service.state.get("vault", "will").value == b"later"
        nursery.cancel_scope.cancel()


async def test_an_unreadable_state_is_rebuilt_from_the_operations(tmp_path: Path) -> None:
    net = Net(tmp_path)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(60):
            await net.start(nursery)
            await net.nodes[1].write(
                model.WriteRequest("vault", "a", DataType.PUBLIC_ONCE, 1, value=b"1"), ALICE
            )
            await net.until_applied(1)
        nursery.cancel_scope.cancel()
    digest = net.nodes[2].status()["digest"]
    (tmp_path / "store-2" / "state").write_bytes(b"garbage")
    again = net.make(tmp_path, 2)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            await nursery.start(again.run)
            await again.ready()
            while again.status()["digest"] != digest:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()


async def test_concurrent_writes_share_batches_in_order_and_a_snapshot_reopens(tmp_path: Path) -> None:
    """Many callers at one server: their writes go to the sequence in few batches (group commit),
    each caller's in its order, each answered with its own outcome; the snapshot written by the
    policy, then the sequence after it, give the same state at a restart."""
    net = Net(tmp_path)
    for node in net.nodes.values():
        node.snapshots = persist.SnapshotPolicy(every=50, interval=3600.0)

    def put(data_id: str, value: bytes) -> model.WriteRequest:
        return model.WriteRequest("vault", data_id, DataType.PUBLIC_ONCE, 1, value=value)

    results: dict[int, list[model.Record | model.Refused]] = {}

    async def caller(c: int) -> None:
        # The second write of "c{c}-0" is refused when applied (write-once), the others pass.
        requests = [put(f"c{c}-{k}", b"%d" % k) for k in range(10)] + [put(f"c{c}-0", b"again")]
        results[c] = await net.nodes[1].write_many(requests, ALICE)

    async with trio.open_nursery() as nursery:
        with trio.fail_after(60):
            await net.start(nursery)
            async with trio.open_nursery() as callers:
                for c in range(20):
                    callers.start_soon(caller, c)
            await net.until_applied(220)
            for c, outcomes in results.items():
                assert [(o.data_id, o.value) for o in outcomes[:10] if isinstance(o, model.Record)] == [
                    (f"c{c}-{k}", b"%d" % k) for k in range(10)
                ]
                assert isinstance(outcomes[10], model.Refused) and outcomes[10].code == model.EXISTS
            node = net.nodes[1]
            assert node.batched == 220 and node.batches < 20  # calls shared batches
            assert len({n.status()["digest"] for n in net.nodes.values()}) == 1
            while not all(n.snapshots.applied > 220 - 50 for n in net.nodes.values()):
                await trio.sleep(0.1)
            digest = node.status()["digest"]
        nursery.cancel_scope.cancel()
    again = net.make(tmp_path, 1)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            await nursery.start(again.run)
            service = await again.ready()
            assert service.applied == 220 and again.status()["digest"] == digest
            assert again.snapshots.applied > 170  # it opened the snapshot, then applied the rest
        nursery.cancel_scope.cancel()

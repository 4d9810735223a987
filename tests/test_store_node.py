"""StoreNode: the store's trio glue, four nodes joined by in-memory links, key-holders faked with
real TDH2 shares of a dealt store key (no processes, no sockets).

The channel identities and KeyTables are real, so the store sequence's vote-key announcements
are checked as in ``pst serve``."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import nacl.public
import pytest
import trio
from nacl.signing import SigningKey
from test_api import ME as API_ME
from test_api import FakeBackend as FakeApiBackend
from test_api import req as api_req

from appliance.apps.store import model, persist
from appliance.apps.store.client import StoreKey, combine_answers, seal_write
from appliance.apps.store.model import Client, DataType, ReadRequest
from appliance.apps.store.node import STORE_FRAME, StoreNode, answers_to_obj, is_store_frame
from appliance.apps.store.service import StoreService
from appliance.crypto import local, tdh2
from appliance.crypto.groups import P256 as G
from appliance.crypto.secret import DeterministicSource, system_scalar_source
from appliance.net import channel_identity
from appliance.protocols._core import Alert

N, T = 4, 1
ALICE = Client("vault", b"alice")
SCERT = SigningKey(b"\x09" * 32)  # stands for the group key: it signs the KeyTable


def signed_table(period: int) -> Any:
    """The KeyTable of ``period`` (the servers' period keys) signed by the group key."""
    from appliance.protocols.state import KeyEntry, KeyTable

    entries = {i: KeyEntry(k, bytes(32), bytes(64)) for i, k in key_table(period).items()}
    table = KeyTable(period, entries, {}, frozenset())
    return table.signed(bytes(SCERT.sign(table.payload()).signature))


def quorum(app: str, digest: bytes, voters: tuple[int, ...] = (1, 2, 3)) -> model.Quorum:
    """The approvals certificate of period 0 (the servers' period keys, their signed KeyTable)."""
    from appliance.protocols import approvals

    table = signed_table(0)
    ticket = approvals.ticket(b"v" * 32, 0, digest)
    rid = approvals.request_id(digest, ticket)
    votes = {
        j: bytes(SigningKey(period_seed(0, j)).sign(approvals.vote_payload(0, j, rid)).signature)
        for j in voters
    }
    return model.Quorum.from_obj(approvals.store_certificate(app, table, digest, ticket, votes))


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
        #: The signed KeyTable the key-holders give with the store key (the period mark's).
        self.table = b""
        #: Frames lost on the way: (from, to, frame) -> dropped.
        self.drop: Callable[[int, int, bytes], bool] = lambda frm, to, data: False
        for i in range(1, N + 1):
            self.inbox[i], self.receivers[i] = trio.open_memory_channel(10_000)
        for i in range(1, N + 1):
            self.nodes[i] = self.make(root, i)

    def key_info(self) -> dict[str, Any]:
        return {
            "group": G.name,
            "n": N,
            "t": T,
            "period": 0,
            "commitment": self.public.commitment.encode(G),
            "vcert": bytes(SCERT.verify_key),
            "table": self.table,
        }

    def make(self, root: Path, i: int) -> StoreNode:
        def send(to: int, data: bytes, frm: int = i) -> None:
            assert is_store_frame(data)
            if not self.drop(frm, to, data):
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
            await node.identity(0, key_table(0), ident)
        for node in self.nodes.values():
            await node.ready()

    async def start_with_a_write(self, nursery: trio.Nursery) -> None:
        """Start, and have ALICE's public write of ``a`` applied everywhere."""
        await self.start(nursery)
        await self.nodes[1].write(
            model.WriteRequest("vault", "a", DataType.PUBLIC_ONCE, 1, value=b"1"), ALICE
        )
        await self.until_applied(1)

    async def enter(self, period: int) -> None:
        """Every server enters ``period`` (the key-holder hands over its channel identity)."""
        for i, node in self.nodes.items():
            await node.sequence.identity(
                period, key_table(period), channel_identity(i, period, period_seed(period, i))
            )

    @contextlib.asynccontextmanager
    async def restarted(self, root: Path, i: int) -> AsyncIterator[Any]:
        """A new node on server ``i``'s directory (a restart), running alone: its service once ready."""
        again = self.make(root, i)
        async with trio.open_nursery() as nursery:
            with trio.fail_after(10):
                await nursery.start(again.run)
                yield await again.ready()
            nursery.cancel_scope.cancel()

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
    async with net.restarted(tmp_path, 2) as service:
        assert service.applied >= 4 and service.state.get("vault", "will").value == b"later"


async def test_a_random_joint_secret_from_the_servers_contributions(tmp_path: Path) -> None:
    """Server 1 gathers the servers' sealed contributions (each signed by its channel key); a
    quorum's certificate lets it be ordered; every server checks the proofs alike; a quorum
    reads it through server 3 and opens the HKDF of the contributions; a client alone cannot."""
    net = Net(tmp_path)
    key = StoreKey.from_result(net.key_info())
    reader = nacl.public.PrivateKey(b"\x08" * 32)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(60):
            await net.start(nursery)
            request = model.WriteRequest.decode(await net.nodes[1].store_contribute("vault", "dice"))
            assert len(request.sealed) >= T + 1 and set(request.proofs) == set(request.sealed)
            with pytest.raises(model.Refused, match="only by a quorum") as alone:
                await net.nodes[1].write(request, ALICE)
            assert alone.value.code == model.NOT_PERMITTED
            (refused_write,) = net.alerts[1]  # at the origin, naming the client; nothing ordered
            assert (
                refused_write.kind.value == "store-write-refused"
                and "vault/616c696365" in refused_write.detail
            )
            q = quorum("vault", request.digest())
            record = await net.nodes[1].write(request, Client("vault", b""), q)
            assert record.dtype == DataType.JOINT_SECRET and record.owner == b""
            await net.until_applied(1)
            assert len({n.status()["digest"] for n in net.nodes.values()}) == 1
            read = ReadRequest("vault", "dice", 1, bytes(reader.public_key))
            record, answers = await net.nodes[3].read_secret(
                read, Client("vault", b""), quorum("vault", read.digest())
            )
            opened = {}
            for part in sorted(record.sealed):
                sealed, data_key = combine_answers(key, record, answers_to_obj(answers), reader, part)
                opened[part] = tdh2.open_sealed(sealed, data_key)
            assert len(set(opened.values())) == len(opened)  # each server its own random value
            # a short quorum: refused at every server, each raising an alert naming the quorum
            _record, refused = await net.nodes[3].read_secret(
                read, Client("vault", b""), quorum("vault", read.digest(), (1, 2))
            )
            assert {a.code for a in refused.values()} == {model.NOT_PERMITTED}
            assert all(any("a quorum of vault" in a.detail for a in net.alerts[i]) for i in (1, 2, 3, 4))
        nursery.cancel_scope.cancel()


async def test_an_unreadable_state_is_rebuilt_from_the_operations(tmp_path: Path) -> None:
    net = Net(tmp_path)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(60):
            await net.start_with_a_write(nursery)
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
    each caller's in its order, each answered with its own outcome; the snapshot policy writes
    snapshots as the writes come; the snapshot, then the sequence after it, give the same state
    at a restart."""
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
            # No more snapshots: the 20 writes after the last one are only in the sequence (the
            # journal), so the restart below must open the snapshot and apply them again.
            for n in net.nodes.values():
                n.snapshots.every = 1 << 30
            taken = node.snapshots.applied
            more = await node.write_many([put(f"after-{k}", b"%d" % k) for k in range(20)], ALICE)
            assert all(isinstance(o, model.Record) for o in more)
            await net.until_applied(240)
            # (The status page's digest is computed at most every second while writes come:
            # its ``digest_applied`` may still be 220 here. The state's own digest is exact.)
            assert node.service is not None
            digest = node.service.digest().hex()
        nursery.cancel_scope.cancel()
    assert persist.load(node.state_path, G, net.public.public_key, T, 240).applied == taken
    again = net.make(tmp_path, 1)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            await nursery.start(again.run)
            service = await again.ready()
            assert service.applied == 240 and service.digest().hex() == digest
            assert again.status()["digest"] == digest and again.status()["digest_applied"] == 240
            # It opened the snapshot, then applied the rest from the sequence.
            assert again.snapshots.applied == taken and 220 - 50 < taken <= 220
            assert service.state.get("vault", "after-19").value == b"19"
        nursery.cancel_scope.cancel()


async def test_a_server_that_cannot_check_a_period_s_decisions_catches_up_and_its_write_completes(
    tmp_path: Path,
) -> None:
    """Server 4 never gets the vote-key announcements of servers 1 and 2 for period 1 (lost, as
    under load): it cannot check a commit QC of period 1 ('only 2 valid signatures'). The store
    is idle, so the slot of period 1 it misses (the committee moving on to period 2) holds no
    operation. Its catch-up must end all the same, and a write at server 4 complete: before,
    the catch-up asked for an empty range of entries for ever, server 4's sequence stayed
    behind and its client's write waited until the API's timeout."""
    from appliance.crypto import encoding

    def lost(frm: int, to: int, data: bytes) -> bool:
        if to != 4 or frm not in (1, 2) or data[:1] != STORE_FRAME:
            return False
        obj = encoding.decode(data[1:])
        return isinstance(obj, dict) and obj.get("log") == "vote-key" and obj.get("period") == 1

    net = Net(tmp_path)
    net.drop = lost
    async with trio.open_nursery() as nursery:
        with trio.fail_after(40):
            await net.start(nursery)
            await net.nodes[1].write(
                model.WriteRequest("vault", "a", DataType.PUBLIC_ONCE, 1, value=b"1"), ALICE
            )
            await net.enter(1)
            while not all(n.sequence.replica.slot_period == 1 for n in net.nodes.values()):
                await trio.sleep(0.05)
            await net.enter(2)
            replicas = [n.sequence.replica for n in net.nodes.values()]
            while not all(r.slot_period == 2 for r in replicas[:3]):
                await trio.sleep(0.05)
            r4 = replicas[3]
            # Server 4 is behind by a slot it cannot check: it catches up from the state t+1
            # servers report (it took that state, or at least agreed on it).
            while not (r4.caught_up or (r4._catchup is not None and r4._catchup.target is not None)):
                await trio.sleep(0.05)
        with trio.fail_after(20):
            record = await net.nodes[4].write(
                model.WriteRequest("vault", "b", DataType.PUBLIC_ONCE, 1, value=b"2"), ALICE
            )
            assert record.value == b"2"
            await net.until_applied(2)
        assert r4.caught_up >= 1 and r4.slot_period == 2
        assert len({n.status()["digest"] for n in net.nodes.values()}) == 1
        nursery.cancel_scope.cancel()


async def test_period_marks_move_the_sequence_and_an_old_certificate_is_refused_at_apply(
    tmp_path: Path,
) -> None:
    """The key-holders hand over period 4's signed KeyTable: one server puts its mark in the
    store's sequence and every server's sequence is at period 4. A quorum's certificate of
    period 0 is then refused by an honest origin before it is ordered (one alert, there), and
    when a faulty origin orders it all the same, it is refused when applied, at every server
    alike (more than MAX_QUORUM_AGE periods old), each raising an alert that names the writer
    and the reason."""
    from appliance.apps.store.service import MAX_QUORUM_AGE, Operation, PeriodMark, decode_entry

    net = Net(tmp_path)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(60):
            await net.start(nursery)
            assert all(n.service is not None and n.service.period == 0 for n in net.nodes.values())
            net.table = signed_table(4).encode()
            while not all(n.service is not None and n.service.period == 4 for n in net.nodes.values()):
                await trio.sleep(0.1)
            node = net.nodes[1]
            entries = await node.sequence.read_entries(0, node.sequence.size)
            assert 1 <= sum(isinstance(decode_entry(e), PeriodMark) for e in entries) <= 2
            assert MAX_QUORUM_AGE < 4
            request = model.WriteRequest("vault", "cfg", DataType.PUBLIC_RW, 1, value=b"old")
            certificate = quorum("vault", request.digest())
            with pytest.raises(model.Refused, match="of period 0, too old") as refused:
                await net.nodes[2].write(request, Client("vault", b""), certificate)
            assert refused.value.code == model.NOT_PERMITTED
            (at_origin,) = net.alerts[2]
            assert "asked to write vault/cfg" in at_origin.detail and not net.alerts[1]
            net.alerts[2].clear()
            # a faulty origin orders it all the same
            op = Operation(request, Client("vault", b""), int(time.time() * 1000), certificate)
            (index,) = await net.nodes[2].sequence.append([op.encode()])
            await net.until_applied(index + 1)
            assert all(
                n.service is not None and ("vault", "cfg") not in n.service.state.records
                for n in net.nodes.values()
            )
            assert len({n.service.digest() for n in net.nodes.values() if n.service is not None}) == 1
            # every server raised one alert naming the writer (the quorum) and the reason
            for i in (1, 2, 3, 4):
                (alert,) = net.alerts[i]
                assert alert.kind.value == "store-write-refused" and alert.server == i
                assert "a quorum of vault (period 0, 3 votes)'s write of vault/cfg" in alert.detail
                assert "refused when applied (not-permitted)" in alert.detail and "too old" in alert.detail
                assert net.nodes[i].status()["refused_writes"] == 1
        nursery.cancel_scope.cancel()
    # a restart applies the sequence again after its snapshot: no second alert
    async with net.restarted(tmp_path, 3) as service:
        assert service.period == 4 and ("vault", "cfg") not in service.state.records
    assert len(net.alerts[3]) == 1


async def test_a_restarted_server_says_not_ready_until_its_journal_is_applied_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restarted server whose replay of its journal has not reached what it held before it
    stopped answers "not ready yet" (StoreUnavailable, retryable, through the API as
    ``unavailable`` with ``retry_after_ms``), never its older state; then it serves the state
    it had."""
    from appliance.api import ApiCore
    from appliance.apps.store import node as node_module
    from appliance.apps.store.node import StoreUnavailable

    net = Net(tmp_path)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(60):
            await net.start(nursery)
            requests = [
                model.WriteRequest("vault", f"k{k}", DataType.PUBLIC_ONCE, 1, value=b"v") for k in range(5)
            ]
            await net.nodes[1].write_many(requests, ALICE)
            await net.until_applied(5)
        nursery.cancel_scope.cancel()
    before = net.nodes[2].service
    assert before is not None and before.applied == 5
    digest = before.digest()
    monkeypatch.setattr(node_module, "READY_WAIT", 0.1)
    again = net.make(tmp_path, 2)
    go = trio.Event()
    read_entries = again.sequence.read_entries

    async def slow(start: int, end: int) -> list[bytes]:
        await go.wait()  # the replay is held here
        return await read_entries(start, end)

    again.sequence.read_entries = slow  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        with trio.fail_after(20):
            await nursery.start(again.run)
            while again.service is None:
                await trio.sleep(0.05)
            with pytest.raises(StoreUnavailable, match=r"not ready yet.*\(0 of 5 operations\)") as err:
                await again.ready()
            assert err.value.retry_after == node_module.READY_RETRY
            core = ApiCore(FakeApiBackend(), data_store=again)
            handle = (await core.handle(api_req("register", name="vault", unique_id=b"alice"), API_ME))[
                "result"
            ]["handle"]
            r = await core.handle(api_req("retrieve", handle=handle, data_id="k0"), API_ME)
            assert r["error"]["code"] == "unavailable" and "not ready yet" in r["error"]["message"]
            assert r["error"]["retry_after_ms"] == 1000
            go.set()
            service = await again.ready()
            assert service.applied == 5 and service.digest() == digest
            r = await core.handle(api_req("retrieve", handle=handle, data_id="k4"), API_ME)
            assert r["result"]["record"]["value"] == b"v"
        nursery.cancel_scope.cancel()


async def test_servers_sign_their_digest_at_a_mark_and_a_changed_copy_stops_serving(tmp_path: Path) -> None:
    """The servers enter period 1 and its mark is put in the sequence: each signs its store
    digest (channel key of period 1) into the sequence; servers 1-3 are verified by t+1
    signers; server 4, whose copy was changed on disk before, is shown damaged by t+1
    signatures of another digest: an alert, and its store answers no more."""
    from appliance.apps.store.node import StoreUnavailable

    net = Net(tmp_path)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(60):
            await net.start_with_a_write(nursery)
            four = net.nodes[4].service
            assert four is not None
            four.state.put(model.Record("vault", "planted", DataType.PUBLIC_ONCE, b"x", 1, value=b"x"))
            for i, node in net.nodes.items():
                await node.identity(1, key_table(1), channel_identity(i, 1, period_seed(1, i)))
            net.table = signed_table(1).encode()
            honest = [net.nodes[i] for i in (1, 2, 3)]
            while not all(n.service is not None and n.service.verifier.verified >= 2 for n in honest):
                await trio.sleep(0.1)
            while four.verifier.damaged is None:
                await trio.sleep(0.1)
            assert four.verifier.verified == 0
            (alert,) = [a for a in net.alerts[4] if a.kind.value == "store-copy-damaged"]
            assert alert.server == 4 and "this copy of the store is damaged" in alert.detail
            with pytest.raises(StoreUnavailable, match=r"damaged.*must be rebuilt"):
                await net.nodes[4].ready()
            assert net.nodes[4].status()["damaged"] is True and net.nodes[1].status()["damaged"] is False
            assert net.nodes[1].status()["verified"] == net.nodes[1].service.verifier.mark_count  # type: ignore[union-attr]
        nursery.cancel_scope.cancel()


async def test_period_marks_alone_take_no_snapshot_of_a_whole_idle_state(tmp_path: Path) -> None:
    """The snapshot interval counts writes: a store that only gets a period's mark (and signed
    digests) since its last snapshot does not encode and write its whole state again."""
    net = Net(tmp_path)
    for node in net.nodes.values():
        node.snapshots = persist.SnapshotPolicy(every=10_000, interval=0.5)
    one = net.nodes[1]
    async with trio.open_nursery() as nursery:
        with trio.fail_after(60):
            await net.start_with_a_write(nursery)
            while one.snapshots.applied < 1:
                await trio.sleep(0.1)
            net.table = signed_table(4).encode()
            while not all(n.service is not None and n.service.period == 4 for n in net.nodes.values()):
                await trio.sleep(0.1)
            assert one.service is not None
            marked = one.service.applied
            await trio.sleep(3.0)  # three ticks of the snapshot task, interval long past
            assert marked > 1 and one.snapshots.applied == 1
            await one.write(model.WriteRequest("vault", "b", DataType.PUBLIC_ONCE, 1, value=b"2"), ALICE)
            while one.snapshots.applied <= marked:
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()


async def test_a_changed_snapshot_is_found_damaged_when_the_journal_is_applied_again(tmp_path: Path) -> None:
    """Servers sign their digests at period 1's mark; server 4 is stopped and its snapshot
    replaced by one with a planted record (of the operations before the mark). Restarted, it
    applies its journal again from the snapshot: at the mark its digest is not the one t+1
    servers signed, so it raises the alert and does not serve."""
    from appliance.apps.store.node import StoreUnavailable

    net = Net(tmp_path)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(60):
            await net.start_with_a_write(nursery)
            for i, node in net.nodes.items():
                await node.identity(1, key_table(1), channel_identity(i, 1, period_seed(1, i)))
            net.table = signed_table(1).encode()
            while not all(n.service is not None and n.service.verifier.verified for n in net.nodes.values()):
                await trio.sleep(0.1)
            (first,) = await net.nodes[4].sequence.read_entries(0, 1)
        nursery.cancel_scope.cancel()
    changed = StoreService(G, net.public.public_key, T)
    changed.apply(0, first)
    changed.state.put(model.Record("vault", "planted", DataType.PUBLIC_ONCE, b"x", 1, value=b"x"))
    persist.write(net.nodes[4].state_path, persist.Snapshot.of(changed))
    net.alerts[4].clear()
    again = net.make(tmp_path, 4)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(20):
            await nursery.start(again.run)
            while again.service is None or again.service.verifier.damaged is None:
                await trio.sleep(0.05)
            with pytest.raises(StoreUnavailable, match="this copy of the store is damaged"):
                await again.ready()
            assert [a.kind.value for a in net.alerts[4]] == ["store-copy-damaged"]
        nursery.cancel_scope.cancel()

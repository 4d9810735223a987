"""The store's local API operations (ApiCore, no sockets) over a one-server store: the request
checks, the store's codes as API errors, and a client's write and read through them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import nacl.public
import pytest
from test_api import ME, FakeBackend, FakeDistributed, req
from test_store_service import Group

from appliance.api import ApiCore, BackendRefused
from appliance.api._core import MAX_STORE_BATCH, Limits
from appliance.apps.store import model
from appliance.apps.store.client import StoreKey, open_answers, seal_write
from appliance.apps.store.model import Client, DataType, ReadRequest, Refused, WriteRequest
from appliance.apps.store.node import answers_to_obj
from appliance.apps.store.service import Operation, ReadAnswer, StoreService
from appliance.crypto import local, tdh2
from appliance.crypto.groups import ED25519 as G
from appliance.crypto.secret import DeterministicSource

NOW = 1_800_000_000.0


class OneServerStore:
    """A StoreBackend whose 'network' is four services applying each write at once; shares come
    from every server's key share, as the key-holders would make them."""

    def __init__(self) -> None:
        self.rand = DeterministicSource(11, G.order)
        self.keys = local.run_dkg(G, 4, 1, self.rand).keys
        self.public = self.keys[1].public
        self.services = {i: StoreService(G, self.public.public_key, 1) for i in self.keys}
        self.writes = 0

    async def store_key(self) -> Mapping[str, Any]:
        return {"group": G.name, "n": 4, "t": 1, "period": 2, "commitment": self.public.commitment.encode(G)}

    async def store_write(
        self, request: bytes, app: str, unique_id: bytes, quorum: bytes | None = None
    ) -> Mapping[str, Any]:
        q = model.Quorum.decode(quorum) if quorum is not None else None
        op = Operation(WriteRequest.decode(request), Client(app, unique_id), int(NOW * 1000), q)
        outcomes = [s.apply(self.writes, op.encode()) for s in self.services.values()]
        self.writes += 1
        if isinstance(outcomes[0], Refused):
            raise outcomes[0]
        return {
            "data_id": outcomes[0].data_id,
            "type": outcomes[0].dtype.value,
            "version": outcomes[0].version,
        }

    async def store_write_many(
        self, requests: list[bytes], app: str, unique_id: bytes
    ) -> list[Mapping[str, Any]]:
        out: list[Mapping[str, Any]] = []
        for request in requests:
            try:
                out.append(await self.store_write(request, app, unique_id))
            except Refused as exc:
                out.append({"code": exc.code, "message": str(exc)})
        return out

    async def store_contribute(self, app: str, data_id: str) -> bytes:
        return await self.contribute(app, data_id)  # type: ignore[attr-defined,no-any-return]

    async def store_retrieve(
        self, app: str, unique_id: bytes, data_id: str, reader: bytes | None, quorum: bytes | None = None
    ) -> Mapping[str, Any]:
        client: model.Requester = Client(app, unique_id)
        if quorum is not None:
            client = model.Quorum.decode(quorum)
        record = self.services[1].state.get(app, data_id)
        if not record.dtype.secret or reader is None:
            return {"record": record.to_obj()}
        answers = {}
        for i, service in self.services.items():
            try:
                parts = service.authorize(
                    ReadRequest(app, data_id, record.version, reader), client, lambda: NOW
                )
            except Refused as exc:
                answers[i] = ReadAnswer(b"r" * 16, code=exc.code, reason=exc.reason)
                continue
            shares = {
                part: tdh2.share_for_reader(
                    G,
                    tdh2.decryption_share(G, self.keys[i], tdh2.Ciphertext.decode(G, kem), self.rand, lbl),
                    reader,
                )
                for part, kem, lbl in parts
            }
            answers[i] = ReadAnswer(b"r" * 16, 2, tuple(self.public.commitment.encode(G)), shares)
        return {"record": record.to_obj(), "answers": answers_to_obj(answers)}


async def _contributions(store: OneServerStore, group: Group, app: str, data_id: str) -> bytes:
    """Servers 1 and 2's contributions, as their store nodes make them (period 3's channel keys)."""
    from appliance.net._tls import channel_certificate_der, channel_identity, channel_sign

    sealed, proofs = {}, {}
    for i in (1, 2):
        ident = channel_identity(i, 3, bytes([i, 3]) * 16)
        sealed[i], proofs[i] = model.contribute(
            G,
            store.public.public_key,
            app,
            data_id,
            1,
            i,
            bytes([i]) * 32,
            3,
            channel_certificate_der(ident),
            lambda payload, ident=ident: channel_sign(ident, payload),
            store.rand,
        )
    return WriteRequest(app, data_id, DataType.JOINT_SECRET, 1, sealed=sealed, proofs=proofs).encode()


class QuorumBackend(FakeDistributed):
    """Distributed applications whose quorum approves every ``store`` request (the certificate
    the approvals service would make, from four servers' period keys), or refuses them all."""

    def __init__(self, store: OneServerStore) -> None:
        super().__init__()
        self.group = Group()
        for service in store.services.values():
            service.authority = self.group.authority

    async def distributed_request(
        self, app: str, verifier: bytes, protocol: str, payload: bytes, timeout: float
    ) -> bytes:
        self.requests.append((app, verifier, protocol, payload, timeout))
        if self.refuse is not None:
            raise BackendRefused(self.refuse)
        assert protocol == "store"
        digest = model.decode_approval_payload(payload).digest()
        return self.group.quorum(app, digest).encode()


async def test_a_distributed_applications_quorum_writes_and_reads() -> None:
    store = OneServerStore()
    backend = QuorumBackend(store)
    core = ApiCore(backend, data_store=store)
    r = await core.handle(req("register_distributed", name="vault", password=b"pw"), ME)
    h = r["result"]["handle"]
    key = StoreKey.from_result((await core.handle(req("store_key", handle=h), ME))["result"])
    # public-rw: created and changed only through the quorum (the API asks for its certificate)
    v1 = WriteRequest("vault", "config", DataType.PUBLIC_RW, 1, value=b"v1")
    r = await core.handle(req("store_data", handle=h, request=v1.encode()), ME)
    assert r["result"] == {"data_id": "config", "type": "public-rw", "version": 1}
    assert [(a, p) for a, _v, p, _pl, _t in backend.requests] == [("vault", "store")]
    v2 = WriteRequest("vault", "config", DataType.PUBLIC_RW, 2, value=b"v2")
    assert (await core.handle(req("write", handle=h, request=v2.encode()), ME))["ok"] is True
    r = await core.handle(req("retrieve", handle=h, data_id="config"), ME)
    assert r["result"]["record"]["value"] == b"v2" and r["result"]["record"]["owner"] == b""
    # secret-dw-dr: written by the quorum, read by the quorum (the read approved for this reader)
    sealed = seal_write(key, "vault", "db", DataType.SECRET_DW_DR, b"k1")
    assert (await core.handle(req("store_data", handle=h, request=sealed.encode()), ME))["ok"] is True
    reader = nacl.public.PrivateKey(b"\x07" * 32)
    r = await core.handle(req("retrieve", handle=h, data_id="db", reader=bytes(reader.public_key)), ME)
    assert open_answers(key, r["result"]["record"], r["result"]["answers"], reader) == b"k1"
    read = model.decode_approval_payload(backend.requests[-1][3])
    assert read == ReadRequest("vault", "db", 1, bytes(reader.public_key))
    # joint-secret with a value the quorum specifies, read back by the quorum
    joint = seal_write(key, "vault", "joint", DataType.JOINT_SECRET, b"chosen")
    r = await core.handle(req("generate_joint_secret", handle=h, request=joint.encode()), ME)
    assert r["ok"] is True
    r = await core.handle(req("retrieve", handle=h, data_id="joint", reader=bytes(reader.public_key)), ME)
    assert open_answers(key, r["result"]["record"], r["result"]["answers"], reader) == b"chosen"
    # a random joint secret: servers' contributions, approved by the quorum, read by the quorum
    store.contribute = lambda app, data_id: _contributions(store, backend.group, app, data_id)  # type: ignore[attr-defined]
    r = await core.handle(req("generate_random_secret", handle=h, data_id="dice"), ME)
    assert r["result"] == {"data_id": "dice", "type": "joint-secret", "version": 1}
    r = await core.handle(req("retrieve", handle=h, data_id="dice", reader=bytes(reader.public_key)), ME)
    value = open_answers(key, r["result"]["record"], r["result"]["answers"], reader)
    assert value == model.joint_value({1: b"\x01" * 32, 2: b"\x02" * 32})
    # secret-sw-dr: one client writes (no quorum asked), the quorum reads
    asked = len(backend.requests)
    single = seal_write(key, "vault", "seed", DataType.SECRET_SW_DR, b"entropy")
    assert (await core.handle(req("store_data", handle=h, request=single.encode()), ME))["ok"] is True
    assert len(backend.requests) == asked
    r = await core.handle(req("retrieve", handle=h, data_id="seed", reader=bytes(reader.public_key)), ME)
    assert open_answers(key, r["result"]["record"], r["result"]["answers"], reader) == b"entropy"
    # a centralized client of the same application is one client: refused where a quorum is needed
    alone = await _handle(core)
    v3 = WriteRequest("vault", "config", DataType.PUBLIC_RW, 3, value=b"v3")
    r = await core.handle(req("write", handle=alone, request=v3.encode()), ME)
    assert r["error"]["code"] == "not-permitted" and "quorum" in r["error"]["message"]
    r = await core.handle(req("generate_random_secret", handle=alone, data_id="dice2"), ME)
    assert r["error"]["code"] == "not-permitted" and "not for one client" in r["error"]["message"]
    r = await core.handle(req("retrieve", handle=alone, data_id="db", reader=bytes(reader.public_key)), ME)
    assert {a["code"] for a in r["result"]["answers"].values()} == {"not-permitted"}
    # another application's quorum cannot write this one's data; a refused quorum is refused
    r = await core.handle(req("register_distributed", 9, name="other", password=b"pw"), ME)
    other = r["result"]["handle"]
    r = await core.handle(req("write", handle=other, request=v3.encode()), ME)
    assert r["error"]["code"] == "not-permitted" and "cannot write" in r["error"]["message"]
    backend.refuse = "no majority in time: 1 of 4 servers' clients approved, 3 needed"
    r = await core.handle(req("write", handle=h, request=v3.encode()), ME)
    assert r["error"]["code"] == "refused" and "1 of 4" in r["error"]["message"]
    assert store.services[1].state.get("vault", "config").version == 2


async def _handle(core: ApiCore, name: str = "vault", unique_id: bytes = b"alice") -> bytes:
    r = await core.handle(req("register", name=name, unique_id=unique_id), ME)
    handle: bytes = r["result"]["handle"]
    return handle


async def test_store_operations_through_the_api() -> None:
    store = OneServerStore()
    core = ApiCore(FakeBackend(), data_store=store)
    h = await _handle(core)
    key = StoreKey.from_result((await core.handle(req("store_key", handle=h), ME))["result"])
    put = WriteRequest("vault", "motd", DataType.PUBLIC_ONCE, 1, value=b"hello")
    r = await core.handle(req("store_data", 2, handle=h, request=put.encode()), ME)
    assert r["result"] == {"data_id": "motd", "type": "public-once", "version": 1}
    r = await core.handle(req("store_data", 3, handle=h, request=put.encode()), ME)
    assert r["ok"] is False and r["error"]["code"] == "exists"
    r = await core.handle(req("retrieve", 4, handle=h, data_id="motd"), ME)
    assert r["result"]["record"]["value"] == b"hello"
    # A secret, sealed by the client, opened from the servers' shares by the client.
    owner = nacl.public.PrivateKey(b"\x05" * 32)
    secret = seal_write(
        key, "vault", "seed", DataType.SECRET_SINGLE, b"s3cret", reader=bytes(owner.public_key)
    )
    assert (await core.handle(req("store_data", 5, handle=h, request=secret.encode()), ME))["ok"] is True
    r = await core.handle(req("retrieve", 6, handle=h, data_id="seed", reader=bytes(owner.public_key)), ME)
    assert open_answers(key, r["result"]["record"], r["result"]["answers"], owner) == b"s3cret"
    # Another application cannot name it: its ids are its own.
    other = await _handle(core, "other")
    r = await core.handle(req("retrieve", 7, handle=other, data_id="seed"), ME)
    assert r["error"]["code"] == model.NOT_FOUND


@pytest.mark.parametrize(
    ("op", "request_", "code", "words"),
    [
        (
            "store_until",
            WriteRequest("vault", "x", DataType.PUBLIC_ONCE, 1, value=b"v"),
            "bad-request",
            "store-until",
        ),
        (
            "write",
            WriteRequest("vault", "x", DataType.PUBLIC_ONCE, 1, value=b"v"),
            "bad-request",
            "public-rw",
        ),
        (
            "store_data",
            WriteRequest("vault", "x", DataType.PUBLIC_ONCE, 2, value=b"v"),
            "stale-version",
            "write",
        ),
        (
            "store_data",
            WriteRequest("other", "x", DataType.PUBLIC_ONCE, 1, value=b"v"),
            "not-permitted",
            "other",
        ),
        ("write", WriteRequest("vault", "x", DataType.PUBLIC_RW, 1, value=b"v"), "not-permitted", "quorum"),
    ],
)
async def test_store_requests_are_checked(op: str, request_: WriteRequest, code: str, words: str) -> None:
    core = ApiCore(FakeBackend(), data_store=OneServerStore())
    h = await _handle(core)
    r = await core.handle(req(op, handle=h, request=request_.encode()), ME)
    assert r["ok"] is False and r["error"]["code"] == code and words in r["error"]["message"]


async def test_no_store_key_and_undecodable_requests() -> None:
    core = ApiCore(FakeBackend())
    h = await _handle(core)
    r = await core.handle(req("store_key", handle=h), ME)
    assert r["error"]["code"] == "unavailable" and "--store" in r["error"]["message"]
    r = await core.handle(req("store_data", handle=h, request=b"\x00"), ME)
    assert r["error"]["code"] == "unavailable"
    core = ApiCore(FakeBackend(), data_store=OneServerStore())
    h = await _handle(core)
    r = await core.handle(req("store_data", handle=h, request=b"\xa0"), ME)
    assert r["error"]["code"] == "bad-request" and "request" in r["error"]["message"]


async def test_store_batch_answers_each_request_in_order() -> None:
    store = OneServerStore()
    core = ApiCore(FakeBackend(), data_store=store)
    h = await _handle(core)
    key = StoreKey.from_result((await core.handle(req("store_key", handle=h), ME))["result"])
    owner = nacl.public.PrivateKey(b"\x06" * 32)
    requests = [
        WriteRequest("vault", "a", DataType.PUBLIC_ONCE, 1, value=b"1").encode(),
        seal_write(key, "vault", "s", DataType.SECRET_SINGLE, b"x", reader=bytes(owner.public_key)).encode(),
        WriteRequest("vault", "a", DataType.PUBLIC_ONCE, 1, value=b"2").encode(),  # the second of one id
        b"\x00",  # not a request
        WriteRequest("vault", "b", DataType.PUBLIC_ONCE, 2, value=b"v").encode(),  # no 'write' of this type
        WriteRequest("other", "c", DataType.PUBLIC_ONCE, 1, value=b"v").encode(),  # another application's
    ]
    r = await core.handle(req("store_batch", 2, handle=h, requests=requests), ME)
    results = r["result"]["results"]
    assert results[0] == {"data_id": "a", "type": "public-once", "version": 1}
    assert results[1] == {"data_id": "s", "type": "secret-single", "version": 1}
    assert [x.get("code") for x in results[2:]] == ["exists", "bad-request", "bad-request", "not-permitted"]
    assert store.writes == 4  # the undecodable and the wrong-type requests never reached the store
    r = await core.handle(req("retrieve", 3, handle=h, data_id="a"), ME)
    assert r["result"]["record"]["value"] == b"1"
    r = await core.handle(req("store_batch", 4, handle=h, requests=[]), ME)
    assert r["error"]["code"] == "bad-request" and "requests" in r["error"]["message"]
    too_many = [requests[0]] * (MAX_STORE_BATCH + 1)
    r = await core.handle(req("store_batch", 5, handle=h, requests=too_many), ME)
    assert r["error"]["code"] == "bad-request" and str(MAX_STORE_BATCH) in r["error"]["message"]


async def test_store_writes_have_their_own_rate_limit_counted_per_request() -> None:
    core = ApiCore(FakeBackend(), data_store=OneServerStore(), limits=Limits(store_rate=0.001, store_burst=3))
    h = await _handle(core)
    batch = [WriteRequest("vault", f"k{i}", DataType.PUBLIC_ONCE, 1, value=b"v").encode() for i in range(3)]
    r = await core.handle(req("store_batch", 2, handle=h, requests=batch), ME)
    assert [x["version"] for x in r["result"]["results"]] == [1, 1, 1]
    one = WriteRequest("vault", "k9", DataType.PUBLIC_ONCE, 1, value=b"v").encode()
    r = await core.handle(req("store_data", 3, handle=h, request=one), ME)
    assert r["error"]["code"] == "quota" and "store rate limit" in r["error"]["message"]
    assert r["error"]["retry_after_ms"] > 0
    # Reads spend the registration's general bucket, not the writes'.
    r = await core.handle(req("retrieve", 4, handle=h, data_id="k0"), ME)
    assert r["result"]["record"]["value"] == b"v"

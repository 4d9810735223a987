"""The local API: sans-IO core (registrations, quotas, errors), trio Unix-socket server, sync client.

Server tests use real Unix sockets under tmp_path; the backend is an in-memory fake that
signs with a local Ed25519 key, so signatures are checked with ``cryptography``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import socket
import stat
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.api import (
    BAD_REQUEST,
    ERROR_CODES,
    NOT_PERMITTED,
    QUOTA,
    REFUSED,
    TOO_LARGE,
    UNAVAILABLE,
    UNKNOWN_HANDLE,
    UNKNOWN_REQUEST,
    ApiCore,
    ApiError,
    ApiServer,
    BackendRefused,
    BackendUnavailable,
    Limits,
    PeerCred,
    RegistrationStore,
    app_digest_payload,
    app_signing_payload,
    bind_unix,
    distributed_sign_payload,
    parse_request,
    serve_api,
)
from appliance.api._distributed import password_verifier
from appliance.crypto import encoding
from appliance.net import FrameStream, encode_frame


def load_module(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


CLIENTS = Path(__file__).resolve().parent.parent / "clients"
#: clients/pst_client.py: the command line over appliance.api.client.
pst_client = load_module("pst_client_appliance_cli", CLIENTS / "pst_client.py")


class FakeBackend:
    """Signs with a local Ed25519 key over the recommended domain-separated payload."""

    def __init__(self) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.public: Ed25519PublicKey = self.key.public_key()
        self.signed: list[tuple[str, bytes]] = []
        self.fail: BaseException | None = None
        self.delay = 0.0
        self.times: dict[int, float | None] = {1: 1_700_000_000.25, 2: None, 3: 1_700_000_001.0}
        self.state: dict[str, Any] = {"server": 1, "period": 7, "healthy": True, "last": 1.5}

    async def sign_digest(self, app: str, sha512: bytes) -> bytes:
        if self.fail is not None:
            raise self.fail
        self.signed.append((app, sha512))
        return self.key.sign(app_digest_payload(app, sha512))

    async def sign(self, app: str, message: bytes) -> bytes:
        if self.delay:
            await trio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        self.signed.append((app, message))
        return self.key.sign(app_signing_payload(app, message))

    async def get_time(self) -> Mapping[int, float | None]:
        if self.fail is not None:
            raise self.fail
        return self.times

    async def status(self) -> Mapping[str, Any]:
        if self.fail is not None:
            raise self.fail
        return self.state


ME = PeerCred(pid=os.getpid(), uid=os.getuid(), gid=os.getgid())
OTHER = PeerCred(pid=4242, uid=os.getuid() + 1, gid=os.getgid())


def req(op: str, rid: int = 1, **fields: Any) -> dict[str, Any]:
    return {"v": 1, "op": op, "id": rid, **fields}


def verify(backend: FakeBackend, app: str, message: bytes, signature: bytes) -> None:
    backend.public.verify(signature, app_signing_payload(app, message))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# Core -------------------------------------------------------------------------------------------


async def test_core_register_sign_verify() -> None:
    backend = FakeBackend()
    core = ApiCore(backend)
    r = await core.handle(req("register", name="VeriSign_CA", unique_id=b"x" * 16), ME)
    assert r["ok"] is True and r["id"] == 1
    handle = r["result"]["handle"]
    assert isinstance(handle, bytes) and len(handle) == 32
    r = await core.handle(req("sign", 2, handle=handle, message=b"hello"), ME)
    assert r == {"v": 1, "id": 2, "ok": True, "result": {"signature": r["result"]["signature"]}}
    verify(backend, "VeriSign_CA", b"hello", r["result"]["signature"])
    assert backend.signed == [("VeriSign_CA", b"hello")]
    # Only a digest of the handle is kept.
    assert handle not in core.registry.by_handle
    assert repr(handle) not in repr(core.registry)


async def test_signature_is_bound_to_application_name() -> None:
    backend = FakeBackend()
    core = ApiCore(backend)
    r = await core.handle(req("register", name="app-a", unique_id=b"1"), ME)
    sig = (await core.handle(req("sign", handle=r["result"]["handle"], message=b"m"), ME))["result"]
    with pytest.raises(Exception):  # noqa: B017 - cryptography's InvalidSignature
        verify(backend, "app-b", b"m", sig["signature"])
    # The payload is domain-separated: it is not the bare message.
    assert app_signing_payload("app-a", b"m") != b"m"
    assert app_signing_payload("app-a", b"m") != app_signing_payload("app-b", b"m")


async def test_reregister_adds_a_handle_and_keeps_count() -> None:
    """Registering the same (name, unique id, uid) again gives another handle and keeps the
    earlier ones: parallel runs of one application do not cut each other off."""
    core = ApiCore(FakeBackend(), limits=Limits(max_registrations=1))
    handles = []
    for _ in range(5):
        r = await core.handle(req("register", name="app", unique_id=b"u"), ME)
        handles.append(r["result"]["handle"])
    assert len(set(handles)) == 5
    for h in handles:
        assert (await core.handle(req("sign", handle=h, message=b"m"), ME))["ok"]
    # One registration however many handles: the quota of 1 is not exceeded.
    assert core.registry.per_uid[ME.uid] == 1 and len(core.registry.by_key) == 1
    # Releasing one handle leaves the others working.
    assert (await core.handle(req("unregister", handle=handles[0]), ME))["ok"]
    assert (await core.handle(req("sign", handle=handles[0], message=b"m"), ME))["error"][
        "code"
    ] == UNKNOWN_HANDLE
    assert (await core.handle(req("sign", handle=handles[1], message=b"m"), ME))["ok"]


async def test_name_owned_by_first_uid() -> None:
    core = ApiCore(FakeBackend())
    h = (await core.handle(req("register", name="app", unique_id=b"u"), ME))["result"]["handle"]
    r = await core.handle(req("register", name="app", unique_id=b"u"), OTHER)
    assert r["error"]["code"] == NOT_PERMITTED
    # Still refused after the owner unregistered: nobody takes over a released name.
    assert (await core.handle(req("unregister", handle=h), ME))["ok"]
    r = await core.handle(req("register", name="app", unique_id=b"v"), OTHER)
    assert r["error"]["code"] == NOT_PERMITTED
    # Another name is fine for the other uid.
    assert (await core.handle(req("register", name="other-app", unique_id=b"v"), OTHER))["ok"]


async def test_reserved_names() -> None:
    core = ApiCore(FakeBackend(), reserved={"syslog": OTHER.uid})
    r = await core.handle(req("register", name="syslog", unique_id=b"u"), ME)
    assert r["error"]["code"] == NOT_PERMITTED
    assert (await core.handle(req("register", name="syslog", unique_id=b"u"), OTHER))["ok"]


async def test_handle_of_another_uid_not_permitted() -> None:
    core = ApiCore(FakeBackend())
    h = (await core.handle(req("register", name="app", unique_id=b"u"), ME))["result"]["handle"]
    cases: list[tuple[str, dict[str, Any]]] = [("sign", {"message": b"m"}), ("unregister", {})]
    for op, extra in cases:
        r = await core.handle(req(op, handle=h, **extra), OTHER)
        assert r["error"]["code"] == NOT_PERMITTED
        assert h.hex() not in r["error"]["message"]
    assert (await core.handle(req("sign", handle=h, message=b"m"), ME))["ok"]


async def test_unregister_then_unknown() -> None:
    core = ApiCore(FakeBackend())
    h = (await core.handle(req("register", name="app", unique_id=b"u"), ME))["result"]["handle"]
    assert (await core.handle(req("unregister", handle=h), ME)) == {"v": 1, "id": 1, "ok": True, "result": {}}
    r = await core.handle(req("unregister", handle=h), ME)
    assert r["error"]["code"] == UNKNOWN_HANDLE
    assert ME.uid not in core.registry.per_uid


async def test_registration_quota() -> None:
    core = ApiCore(FakeBackend(), limits=Limits(max_registrations=16, control_burst=1000))
    for i in range(16):
        assert (await core.handle(req("register", name="app", unique_id=bytes([i])), ME))["ok"]
    r = await core.handle(req("register", name="app", unique_id=b"\xff"), ME)
    assert r["error"]["code"] == QUOTA
    # Other uids have their own quota.
    assert (await core.handle(req("register", name="app2", unique_id=b"\xff"), OTHER))["ok"]


async def test_name_quota() -> None:
    core = ApiCore(FakeBackend(), limits=Limits(max_names=3, control_burst=1000))
    for i in range(3):
        h = (await core.handle(req("register", name=f"n{i}", unique_id=b"u"), ME))["result"]["handle"]
        assert (await core.handle(req("unregister", handle=h), ME))["ok"]
    r = await core.handle(req("register", name="n3", unique_id=b"u"), ME)
    assert r["error"]["code"] == QUOTA
    assert (await core.handle(req("register", name="n0", unique_id=b"u"), ME))["ok"]


async def test_sign_rate_limit_token_bucket() -> None:
    clock = Clock()
    core = ApiCore(FakeBackend(), limits=Limits(sign_rate=2.0, sign_burst=3.0), clock=clock)
    h = (await core.handle(req("register", name="app", unique_id=b"u"), ME))["result"]["handle"]
    codes = [(await core.handle(req("sign", handle=h, message=b"m"), ME))["ok"] for _ in range(4)]
    assert codes == [True, True, True, False]
    r = await core.handle(req("sign", handle=h, message=b"m"), ME)
    assert r["error"]["code"] == QUOTA
    clock.now += 0.5  # one token back
    assert (await core.handle(req("sign", handle=h, message=b"m"), ME))["ok"]
    assert (await core.handle(req("sign", handle=h, message=b"m"), ME))["error"]["code"] == QUOTA
    # Re-registering does not refill the bucket.
    h2 = (await core.handle(req("register", name="app", unique_id=b"u"), ME))["result"]["handle"]
    assert (await core.handle(req("sign", handle=h2, message=b"m"), ME))["error"]["code"] == QUOTA


async def test_control_rate_limit() -> None:
    clock = Clock()
    core = ApiCore(FakeBackend(), limits=Limits(control_rate=1.0, control_burst=2.0), clock=clock)
    assert (await core.handle(req("get_time"), ME))["ok"]
    assert (await core.handle(req("status"), ME))["ok"]
    assert (await core.handle(req("get_time"), ME))["error"]["code"] == QUOTA
    assert (await core.handle(req("get_time"), OTHER))["ok"]


async def test_message_too_large() -> None:
    core = ApiCore(FakeBackend())
    h = (await core.handle(req("register", name="app", unique_id=b"u"), ME))["result"]["handle"]
    assert (await core.handle(req("sign", handle=h, message=b"a" * 65536), ME))["ok"]
    r = await core.handle(req("sign", handle=h, message=b"a" * 65537), ME)
    assert r["error"]["code"] == TOO_LARGE
    assert "message" in r["error"]["message"]


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        (req("sign", handle="x" * 32, message=b"m"), "handle"),
        (req("sign", handle=b"x" * 31, message=b"m"), "handle"),
        (req("sign", handle=b"x" * 32, message="m"), "message"),
        (req("sign", handle=b"x" * 32), "message"),
        (req("register", name=b"app", unique_id=b"u"), "name"),
        (req("register", name="", unique_id=b"u"), "name"),
        (req("register", name="a b", unique_id=b"u"), "name"),
        (req("register", name="app", unique_id=b""), "unique_id"),
        (req("register", name="app", unique_id=b"u" * 65), "unique_id"),
        (req("register", name="app", unique_id=b"u", extra=1), "extra"),
        (req("nope"), "op"),
        (req("get_time", rid=True), "id"),
        (req("get_time", rid=-1), "id"),
        ({"v": 2, "op": "get_time", "id": 1}, "v"),
        ({"op": "get_time", "id": 1}, "v"),
        ({"v": 1, "op": 3, "id": 1}, "op"),
    ],
)
async def test_bad_requests_name_the_field(obj: dict[str, Any], field: str) -> None:
    core = ApiCore(FakeBackend())
    r = await core.handle(obj, ME)
    assert r["ok"] is False and r["error"]["code"] == BAD_REQUEST
    assert repr(field) in r["error"]["message"]


async def test_backend_failures_are_unavailable_without_details(caplog: pytest.LogCaptureFixture) -> None:
    backend = FakeBackend()
    core = ApiCore(backend)
    h = (await core.handle(req("register", name="app", unique_id=b"u"), ME))["result"]["handle"]
    backend.fail = RuntimeError("secret share 0xdeadbeef leaked")
    with caplog.at_level(logging.DEBUG, logger="pst.api"):
        for obj in (req("sign", handle=h, message=b"m"), req("get_time"), req("status")):
            r = await core.handle(obj, ME)
            assert r["error"]["code"] == UNAVAILABLE
            assert "deadbeef" not in r["error"]["message"]
    assert "deadbeef" not in caplog.text
    assert h.hex() not in caplog.text
    backend.fail = BackendUnavailable("no quorum of servers")
    r = await core.handle(req("sign", handle=h, message=b"m"), ME)
    assert r["error"] == {"code": UNAVAILABLE, "message": "cannot sign now: no quorum of servers"}


async def test_get_time_and_status_encoding() -> None:
    backend = FakeBackend()
    backend.times[4] = float("nan")
    core = ApiCore(backend)
    r = await core.handle(req("get_time"), ME)
    assert r["result"]["times_us"] == {1: 1_700_000_000_250_000, 2: None, 3: 1_700_000_001_000_000, 4: None}
    r = await core.handle(req("status"), ME)
    assert r["result"]["status"] == {"server": 1, "period": 7, "healthy": True, "last": "1.5"}
    encoding.check_plain(r)
    backend.state = {"bad": object()}
    assert (await core.handle(req("status"), ME))["error"]["code"] == UNAVAILABLE


async def test_handle_frame_closes_on_undecodable() -> None:
    core = ApiCore(FakeBackend())
    for payload in (b"", b"\xff\x00garbage", encoding.encode([1, 2]), b"\xa1\x61v\xf9\x3c\x00"):
        out, close = await core.handle_frame(payload, ME)
        response = encoding.decode(out)
        assert close and response["error"]["code"] == BAD_REQUEST and response["id"] is None
    out, close = await core.handle_frame(encoding.encode(req("sign", 9, handle=b"", message=b"")), ME)
    assert not close and encoding.decode(out)["id"] == 9


# Fuzz -------------------------------------------------------------------------------------------

_plain = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.binary(max_size=40) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
_fields = st.sampled_from(["v", "op", "id", "name", "unique_id", "handle", "message", "x"])
_ops = st.sampled_from(["register", "sign", "unregister", "get_time", "status", "other"])
_requestish = st.fixed_dictionaries(
    {
        "v": st.sampled_from([1, 1, 1, 2, "1", True]),
        "op": _ops | _plain,
        "id": st.integers(-5, 2**64) | _plain,
    },
    optional={
        "name": st.text(max_size=140) | _plain,
        "unique_id": st.binary(max_size=70) | _plain,
        "handle": st.binary(min_size=31, max_size=33) | _plain,
        "message": st.binary(max_size=64) | _plain,
    },
) | st.dictionaries(_fields, _plain, max_size=6)


@settings(max_examples=400, deadline=None)
@given(_requestish)
def test_fuzz_parse_request_only_api_errors(obj: Any) -> None:
    try:
        request = parse_request(obj)
    except ApiError as exc:
        assert exc.code in ERROR_CODES and exc.message
    else:
        assert request.op in {"register", "sign", "unregister", "get_time", "status"}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200) | _requestish.map(encoding.encode) | _plain.map(encoding.encode))
def test_fuzz_handle_frame_always_answers(payload: bytes) -> None:
    core = ApiCore(FakeBackend())

    async def run() -> tuple[bytes, bool]:
        return await core.handle_frame(payload, ME)

    out, _ = trio.run(run)
    response = encoding.decode(out)
    assert response["v"] == 1 and isinstance(response["ok"], bool)
    if not response["ok"]:
        assert set(response["error"]) == {"code", "message"}
        assert response["error"]["code"] in ERROR_CODES


# Server -------------------------------------------------------------------------------------------


async def start(
    nursery: trio.Nursery, path: Path, backend: FakeBackend | None = None, **kwargs: Any
) -> tuple[ApiServer, FakeBackend]:
    backend = backend or FakeBackend()
    server: ApiServer = await nursery.start(functools.partial(serve_api, path, backend, **kwargs))
    return server, backend


class Raw:
    """A trio test client speaking frames directly."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.frames = FrameStream(stream, 1 << 22)

    @classmethod
    async def connect(cls, path: Path) -> Raw:
        return cls(await trio.open_unix_socket(str(path)))

    async def call(self, obj: dict[str, Any]) -> dict[str, Any]:
        await self.frames.send_frame(encoding.encode(obj))
        return await self.receive()

    async def receive(self) -> dict[str, Any]:
        with trio.fail_after(5):
            frame = await self.frames.receive_frame()
        assert frame is not None, "server closed the connection"
        response: dict[str, Any] = encoding.decode(frame)
        return response

    async def at_eof(self) -> bool:
        with trio.fail_after(5):
            try:
                return await self.stream.receive_some(1) == b""
            except trio.BrokenResourceError:
                return True


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "run" / "api.sock"


async def test_server_round_trip_and_peercred(nursery: trio.Nursery, sock_path: Path) -> None:
    server, backend = await start(nursery, sock_path)
    assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o660
    assert stat.S_IMODE(os.stat(sock_path.parent).st_mode) == 0o750
    raw = await Raw.connect(sock_path)
    r = await raw.call(req("register", 5, name="ts-client", unique_id=b"abc"))
    assert r["ok"] and r["id"] == 5
    handle = r["result"]["handle"]
    (reg,) = server.core.registry.by_key.values()
    assert (reg.uid, reg.pid) == (os.getuid(), os.getpid())
    r = await raw.call(req("sign", 6, handle=handle, message=b"log line"))
    verify(backend, "ts-client", b"log line", r["result"]["signature"])
    r = await raw.call(req("get_time", 7))
    assert r["result"]["times_us"][1] == 1_700_000_000_250_000
    assert (await raw.call(req("status", 8)))["result"]["status"]["period"] == 7
    # Pipelined requests are answered in order.
    await raw.stream.send_all(
        b"".join(encode_frame(encoding.encode(req("get_time", i))) for i in range(10, 14))
    )
    assert [(await raw.receive())["id"] for _ in range(4)] == [10, 11, 12, 13]
    await raw.stream.aclose()


async def test_server_errors_keep_serving(nursery: trio.Nursery, sock_path: Path) -> None:
    await start(nursery, sock_path)
    good = await Raw.connect(sock_path)
    h = (await good.call(req("register", name="app", unique_id=b"u")))["result"]["handle"]

    # Wrong types: a specific error, and the connection stays usable.
    bad = await Raw.connect(sock_path)
    r = await bad.call(req("sign", 3, handle=h, message="text"))
    assert (r["id"], r["error"]["code"]) == (3, BAD_REQUEST) and "'message'" in r["error"]["message"]
    r = await bad.call(req("sign", 4, handle=os.urandom(32), message=b"m"))
    assert r["error"]["code"] == UNKNOWN_HANDLE
    r = await bad.call(req("sign", 5, handle=h, message=b"m" * 70000))
    assert r["error"]["code"] == TOO_LARGE
    assert (await bad.call(req("sign", 6, handle=h, message=b"m")))["ok"]

    # Non-CBOR payload: bad-request, then the server closes.
    garbage = await Raw.connect(sock_path)
    await garbage.stream.send_all(encode_frame(b"\xff\xfe not cbor"))
    r = await garbage.receive()
    assert r["error"]["code"] == BAD_REQUEST and r["id"] is None
    assert await garbage.at_eof()

    # Valid CBOR, but not a map.
    notmap = await Raw.connect(sock_path)
    await notmap.stream.send_all(encode_frame(encoding.encode(["sign"])))
    assert (await notmap.receive())["error"]["code"] == BAD_REQUEST
    assert await notmap.at_eof()

    # A frame header announcing more than the limit: too-large before the payload.
    huge = await Raw.connect(sock_path)
    await huge.stream.send_all((10**6).to_bytes(4, "big") + b"xx")
    r = await huge.receive()
    assert r["error"]["code"] == TOO_LARGE
    assert await huge.at_eof()

    # A truncated frame, then EOF from the client.
    trunc = await Raw.connect(sock_path)
    await trunc.stream.send_all(b"\x00\x00\x01\x00abc")
    await trunc.stream.send_eof()
    r = await trunc.receive()
    assert r["error"]["code"] == BAD_REQUEST and "truncated" in r["error"]["message"]

    # Raw garbage that is not even a frame header, then EOF.
    short = await Raw.connect(sock_path)
    await short.stream.send_all(b"\x01")
    await short.stream.send_eof()
    assert (await short.receive())["error"]["code"] == BAD_REQUEST

    # The first client never noticed.
    r = await good.call(req("sign", 9, handle=h, message=b"still here"))
    assert r["ok"] and r["id"] == 9


async def test_server_many_clients_concurrently(nursery: trio.Nursery, sock_path: Path) -> None:
    _, backend = await start(nursery, sock_path)
    backend.delay = 0.05
    results: dict[int, bytes] = {}

    async def one(i: int) -> None:
        raw = await Raw.connect(sock_path)
        h = (await raw.call(req("register", name=f"app{i}", unique_id=b"u")))["result"]["handle"]
        results[i] = (await raw.call(req("sign", handle=h, message=str(i).encode())))["result"]["signature"]
        await raw.stream.aclose()

    with trio.fail_after(5):
        async with trio.open_nursery() as inner:
            for i in range(12):
                inner.start_soon(one, i)
    for i, sig in results.items():
        verify(backend, f"app{i}", str(i).encode(), sig)
    assert len(results) == 12


async def test_server_idle_timeout(nursery: trio.Nursery, sock_path: Path) -> None:
    await start(nursery, sock_path, idle_timeout=0.2)
    raw = await Raw.connect(sock_path)
    assert (await raw.call(req("get_time")))["ok"]
    # A partial frame is not activity.
    await raw.stream.send_all(b"\x00\x00")
    assert await raw.at_eof()


async def test_server_request_timeout(nursery: trio.Nursery, sock_path: Path) -> None:
    _, backend = await start(nursery, sock_path, request_timeout=0.1)
    raw = await Raw.connect(sock_path)
    h = (await raw.call(req("register", name="app", unique_id=b"u")))["result"]["handle"]
    backend.delay = 10
    r = await raw.call(req("sign", handle=h, message=b"m"))
    assert r["error"]["code"] == UNAVAILABLE


async def test_server_max_connections_per_uid(
    nursery: trio.Nursery, sock_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server, _ = await start(nursery, sock_path, max_connections_per_uid=2)
    a, b = await Raw.connect(sock_path), await Raw.connect(sock_path)
    assert (await a.call(req("get_time")))["ok"] and (await b.call(req("get_time")))["ok"]
    with caplog.at_level(logging.WARNING, logger="pst.api"):
        c = await Raw.connect(sock_path)
        error = (await c.receive())["error"]
        assert await c.at_eof()
    assert error["code"] == QUOTA
    assert f"uid {os.getuid()} already has 2 connections open, the limit per user" in error["message"]
    assert f"refused a connection of uid {os.getuid()} (pid " in caplog.text
    await a.stream.aclose()
    with trio.fail_after(5):
        while server.per_uid.get(os.getuid()) != 1:  # the server noticed the close
            await trio.sleep(0.01)
    d = await Raw.connect(sock_path)
    assert (await d.call(req("get_time")))["ok"]


async def test_server_global_cap_spares_the_operator(nursery: trio.Nursery, sock_path: Path) -> None:
    """Beyond max_connections, non-operator uids are refused; the operator (root or our uid) is
    still let in, so it can always list and revoke registrations."""
    core = ApiCore(FakeBackend(), operators=frozenset())  # nobody is the operator: we are counted
    server = ApiServer(core, max_connections=2, max_connections_per_uid=10)
    sock = await bind_unix(sock_path)
    nursery.start_soon(server.serve, sock)
    a, b = await Raw.connect(sock_path), await Raw.connect(sock_path)
    assert (await a.call(req("get_time")))["ok"] and (await b.call(req("get_time")))["ok"]
    c = await Raw.connect(sock_path)
    error = (await c.receive())["error"]
    assert error["code"] == QUOTA and "2 connections open, its limit" in error["message"]
    core.operators = frozenset({os.getuid()})  # now we are the operator: not counted
    d = await Raw.connect(sock_path)
    assert (await d.call(req("get_time")))["ok"]


async def test_server_replaces_stale_socket_and_cleans_up(sock_path: Path) -> None:
    sock_path.parent.mkdir(mode=0o755)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock_path))
    stale.close()  # the file stays, nobody listens: stale
    async with trio.open_nursery() as nursery:
        await start(nursery, sock_path)
        raw = await Raw.connect(sock_path)
        assert (await raw.call(req("get_time")))["ok"]
        # A second server must not steal a live socket.
        with pytest.raises(OSError):
            await start(nursery, sock_path)
        nursery.cancel_scope.cancel()
    assert not sock_path.exists()
    # An existing parent directory keeps its mode.
    assert stat.S_IMODE(os.stat(sock_path.parent).st_mode) == 0o755


async def test_server_refuses_to_replace_a_regular_file(sock_path: Path) -> None:
    sock_path.parent.mkdir()
    sock_path.write_text("important")
    async with trio.open_nursery() as nursery:
        with pytest.raises(FileExistsError):
            await start(nursery, sock_path)
    assert sock_path.read_text() == "important"


# Sync client ---------------------------------------------------------------------------------------


async def test_sync_client_against_server(nursery: trio.Nursery, sock_path: Path) -> None:
    server, backend = await start(nursery, sock_path)

    def session() -> tuple[bytes, dict[int, float | None], dict[str, Any]]:
        with pst_client.PstClient(sock_path) as client:
            client.register("syslog-host", "instance-1")
            sig: bytes = client.sign(b"entry 1")
            times: dict[int, float | None] = client.get_time()
            status: dict[str, Any] = client.status()
            with pytest.raises(pst_client.PstError) as err:
                client.sign(b"x" * 70000)
            assert err.value.code == TOO_LARGE
            with pytest.raises(pst_client.PstError) as err:
                client.sign(b"m", handle=os.urandom(32))
            assert err.value.code == UNKNOWN_HANDLE
            old = client.handle
            client.register("syslog-host", "instance-1")
            client.sign(b"m", handle=old)  # registering again keeps the earlier handle
            client.unregister(old)
            with pytest.raises(pst_client.PstError) as err:
                client.sign(b"m", handle=old)
            assert err.value.code == UNKNOWN_HANDLE
            # The handle outlives the connection.
            client.disconnect()
            client.sign(b"after reconnect")
            client.unregister()
            with pytest.raises(pst_client.PstError) as err:
                client.sign(b"m")
            assert err.value.code == UNKNOWN_HANDLE and "register first" in err.value.message
            client.register("syslog-host", "instance-1")
        # The end of the with block released the handle.
        return sig, times, status

    sig, times, status = await trio.to_thread.run_sync(session)
    verify(backend, "syslog-host", b"entry 1", sig)
    assert times == {1: 1_700_000_000.25, 2: None, 3: 1_700_000_001.0}
    assert status["period"] == 7 and status["last"] == "1.5"
    assert not server.core.registry.by_handle


async def test_sync_client_quota(nursery: trio.Nursery, sock_path: Path) -> None:
    await start(nursery, sock_path, limits=Limits(sign_rate=0.001, sign_burst=2))

    def session() -> list[str]:
        codes = []
        with pst_client.PstClient(sock_path) as client:
            client.register("app", b"u")
            for _ in range(3):
                try:
                    client.sign(b"m")
                    codes.append("ok")
                except pst_client.PstError as exc:
                    codes.append(exc.code)
        return codes

    assert await trio.to_thread.run_sync(session) == ["ok", "ok", QUOTA]


async def test_sync_client_distributed_and_restart(sock_path: Path, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    backend = FakeDistributed()
    group_key = backend.public.public_bytes(Encoding.Raw, PublicFormat.Raw)
    state = tmp_path / "state"

    def session() -> bytes:
        client = pst_client.PstClient(sock_path)
        try:
            handle: bytes = client.register_distributed("ledger", "pw")
            sig = client.request_distributed(b"entry 7")
            assert pst_client.verify_distributed(group_key, "ledger", b"entry 7", sig)
            assert not pst_client.verify_distributed(group_key, "other", b"entry 7", sig)
            (p,) = client.pending()
            assert (p.protocol, p.payload, p.servers, p.expires_in) == ("sign", b"p", (2, 3), 1.5)
            client.approve(p.request_id)
            with pytest.raises(pst_client.PstError) as err:
                client.deny(b"x" * 32)
            assert err.value.code == UNKNOWN_REQUEST
            backend.refuse = "a majority is out of reach: server 2: its client denied the request"
            with pytest.raises(pst_client.PstError) as err:
                client.request_distributed(b"entry 8")
            assert err.value.code == REFUSED and "server 2" in err.value.message
            backend.refuse = None
        finally:
            client.disconnect()  # not close(): that would release the registration
        return handle

    async with trio.open_nursery() as nursery:
        await start(nursery, sock_path, backend, state_dir=state)
        handle = await trio.to_thread.run_sync(session)
        nursery.cancel_scope.cancel()
    assert backend.decisions == [("ledger", password_verifier("ledger", b"pw"), b"r" * 32, True)]

    def after_restart() -> bytes:
        with pst_client.PstClient(sock_path) as client:
            return client.request_distributed(b"entry 9", handle=handle)

    async with trio.open_nursery() as nursery:  # a new server process on the same state directory
        await start(nursery, sock_path, backend, state_dir=state)
        sig = await trio.to_thread.run_sync(after_restart)
        nursery.cancel_scope.cancel()
    backend.public.verify(sig, distributed_sign_payload("ledger", b"entry 9"))


async def test_cli_distributed_request_and_approve(
    nursery: trio.Nursery, sock_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    backend = FakeDistributed()
    await start(nursery, sock_path, backend)
    (tmp_path / "pw").write_bytes(b"long random password\n")
    (tmp_path / "entry").write_bytes(b"entry 1")
    base = ["--socket", str(sock_path), "--name", "ledger", "--password-file", str(tmp_path / "pw")]
    assert await trio.to_thread.run_sync(pst_client.main, [*base, "request", str(tmp_path / "entry")]) == 0
    signature = bytes.fromhex(capsys.readouterr().out.strip())
    backend.public.verify(signature, distributed_sign_payload("ledger", b"entry 1"))
    assert backend.requests[0][1] == password_verifier("ledger", b"long random password")
    assert await trio.to_thread.run_sync(pst_client.main, [*base, "approve"]) == 0
    assert capsys.readouterr().out.split("\t")[:4] == [(b"r" * 32).hex(), "pending", "sign", "from 2,3"]
    assert await trio.to_thread.run_sync(pst_client.main, [*base, "approve", "--all", "--deny"]) == 0
    assert "\tdenied\t" in capsys.readouterr().out and backend.decisions[-1][3] is False
    no_password = ["--socket", str(sock_path), "--name", "ledger", "approve"]
    assert await trio.to_thread.run_sync(pst_client.main, no_password) == 1
    assert "--password-file" in capsys.readouterr().err


async def test_sync_client_no_server(tmp_path: Path) -> None:
    def call() -> str:
        try:
            pst_client.PstClient(tmp_path / "none.sock").get_time()
        except pst_client.PstError as exc:
            return str(exc.code)
        return "ok"

    assert await trio.to_thread.run_sync(call) == "connection"


async def test_cli_sign(
    nursery: trio.Nursery, sock_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server, backend = await start(nursery, sock_path, limits=Limits(control_burst=100))
    file = tmp_path / "msg.txt"
    file.write_bytes(b"sign me\n")
    argv = ["--socket", str(sock_path), "--name", "cli-app", "sign", str(file)]
    for _ in range(20):  # each run adds a handle and releases it on the way out: nothing builds up
        assert await trio.to_thread.run_sync(pst_client.main, argv) == 0
    lines = capsys.readouterr().out.split()
    assert len(lines) == 20
    assert not server.core.registry.by_key
    verify(backend, "cli-app", b"sign me\n", bytes.fromhex(lines[0]))
    # A file larger than a sign request may carry is hashed as it is read: the same signature.
    big = tmp_path / "big"
    big.write_bytes(b"x" * 700_000)
    argv = ["--socket", str(sock_path), "--name", "cli-app", "sign", str(big)]
    assert await trio.to_thread.run_sync(pst_client.main, argv) == 0
    verify(backend, "cli-app", b"x" * 700_000, bytes.fromhex(capsys.readouterr().out.strip()))
    assert await trio.to_thread.run_sync(pst_client.main, ["--socket", str(sock_path), "time"]) == 0
    assert "unknown" in capsys.readouterr().out


# Distributed applications (API side; the exchange between servers is in test_approvals.py) -------


class FakeDistributed(FakeBackend):
    """A backend that also serves distributed applications: one pending request, canned answers."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[str, bytes, str, bytes, float]] = []
        self.decisions: list[tuple[str, bytes, bytes, bool]] = []
        self.refuse: str | None = None

    async def distributed_request(
        self, app: str, verifier: bytes, protocol: str, payload: bytes, timeout: float
    ) -> bytes:
        self.requests.append((app, verifier, protocol, payload, timeout))
        if self.refuse is not None:
            raise BackendRefused(self.refuse)
        return self.key.sign(distributed_sign_payload(app, payload))

    async def distributed_pending(self, app: str, verifier: bytes) -> list[dict[str, Any]]:
        return [
            {
                "request_id": b"r" * 32,
                "protocol": "sign",
                "payload": b"p",
                "servers": [2, 3],
                "expires_in_ms": 1500,
            }
        ]

    async def distributed_decide(self, app: str, verifier: bytes, request_id: bytes, approve: bool) -> None:
        if request_id != b"r" * 32:
            raise BackendRefused("no request with this id is waiting", UNKNOWN_REQUEST)
        self.decisions.append((app, verifier, request_id, approve))


async def test_distributed_registration_keeps_only_the_verifier() -> None:
    backend = FakeDistributed()
    core = ApiCore(backend)
    r = await core.handle(req("register_distributed", name="ledger", password=b"pw"), ME)
    handle = r["result"]["handle"]
    reg = core.registry.by_handle[hashlib.sha256(b"pst/api/handle\x00" + handle).digest()]
    assert reg.verifier == password_verifier("ledger", b"pw") and reg.unique_id == b""
    assert b"pw" not in repr(core.registry).encode() and reg.verifier.hex() not in repr(core.registry)
    r = await core.handle(req("request", handle=handle, protocol="sign", payload=b"entry"), ME)
    backend.public.verify(r["result"]["signature"], distributed_sign_payload("ledger", b"entry"))
    assert backend.requests == [("ledger", reg.verifier, "sign", b"entry", core.request_wait)]
    # Registering again replaces the handle and the verifier.
    r = await core.handle(req("register_distributed", name="ledger", password=b"new"), ME)
    assert (await core.handle(req("pending", handle=handle), ME))["error"]["code"] == UNKNOWN_HANDLE
    assert len(core.registry.by_handle) == 1
    assert next(iter(core.registry.by_handle.values())).verifier == password_verifier("ledger", b"new")


async def test_distributed_operations_and_their_errors() -> None:
    backend = FakeDistributed()
    core = ApiCore(backend, limits=Limits(control_burst=100))
    h = (await core.handle(req("register_distributed", name="ledger", password=b"pw"), ME))["result"][
        "handle"
    ]
    central = (await core.handle(req("register", name="ledger", unique_id=b"u"), ME))["result"]["handle"]

    async def code(op: str, **fields: Any) -> str:
        r = await core.handle(req(op, **fields), ME)
        return "ok" if r["ok"] else str(r["error"]["code"])

    # A distributed handle cannot sign alone; a centralized one cannot make requests.
    assert await code("sign", handle=h, message=b"m") == NOT_PERMITTED
    assert await code("request", handle=central, protocol="sign", payload=b"m") == NOT_PERMITTED
    assert await code("pending", handle=central) == NOT_PERMITTED
    assert await code("request", handle=h, protocol="encrypt", payload=b"m") == BAD_REQUEST
    assert await code("request", handle=h, protocol="sign", payload=b"m" * 70000) == TOO_LARGE
    assert await code("approve", handle=h, request_id=b"short") == BAD_REQUEST
    assert await code("register_distributed", name="x", password=b"") == BAD_REQUEST
    assert await code("register_distributed", name="bad name", password=b"pw") == BAD_REQUEST
    # The name belongs to its first user, for distributed registrations too.
    r = await core.handle(req("register_distributed", name="ledger", password=b"pw"), OTHER)
    assert r["error"]["code"] == NOT_PERMITTED
    r = await core.handle(req("pending", handle=h), ME)
    assert r["result"]["requests"] == [
        {
            "request_id": b"r" * 32,
            "protocol": "sign",
            "payload": b"p",
            "servers": [2, 3],
            "expires_in_ms": 1500,
        }
    ]
    assert await code("approve", handle=h, request_id=b"r" * 32) == "ok"
    assert await code("deny", handle=h, request_id=b"r" * 32) == "ok"
    assert [d[3] for d in backend.decisions] == [True, False]
    assert await code("approve", handle=h, request_id=b"x" * 32) == UNKNOWN_REQUEST
    backend.refuse = "no majority in time: server 2: its client denied the request"
    r = await core.handle(req("request", handle=h, protocol="sign", payload=b"m"), ME)
    assert r["error"] == {"code": REFUSED, "message": backend.refuse}
    # Without a distributed backend the operations are unavailable, with a reason.
    plain = ApiCore(FakeBackend())
    r = await plain.handle(req("register_distributed", name="ledger", password=b"pw"), ME)
    assert r["error"]["code"] == UNAVAILABLE and "distributed" in r["error"]["message"]


# Registrations across restarts -----------------------------------------------------------------------


async def test_registrations_survive_a_restart(tmp_path: Path) -> None:
    store = RegistrationStore.in_state_dir(tmp_path)
    clock = Clock()
    limits = Limits(sign_rate=0.0001, sign_burst=3)
    backend = FakeDistributed()
    first = ApiCore(backend, limits=limits, store=store, clock=clock)
    central = (await first.handle(req("register", name="syslog", unique_id=b"u1"), ME))["result"]["handle"]
    dist = (await first.handle(req("register_distributed", name="ledger", password=b"pw"), ME))["result"]
    gone = (await first.handle(req("register", name="freed", unique_id=b"u2"), ME))["result"]["handle"]
    assert (await first.handle(req("unregister", handle=gone), ME))["ok"]
    for _ in range(2):
        assert (await first.handle(req("sign", handle=central, message=b"m"), ME))["ok"]
    first.flush()
    data = store.path.read_bytes()
    assert central not in data and dist["handle"] not in data and b"pw" not in data
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o640  # the key-holder reads it by group (privsep)

    second = ApiCore(backend, limits=limits, store=store, clock=clock)
    assert (await second.handle(req("sign", handle=central, message=b"m"), ME))["ok"]
    # The quota was not refilled by the restart: 3 tokens, 2 spent before, 1 now.
    assert (await second.handle(req("sign", handle=central, message=b"m"), ME))["error"]["code"] == QUOTA
    r = await second.handle(req("request", handle=dist["handle"], protocol="sign", payload=b"e"), ME)
    assert r["ok"] and backend.requests[-1][1] == password_verifier("ledger", b"pw")
    # Owners too: the freed name still belongs to its first user.
    r = await second.handle(req("register", name="freed", unique_id=b"u3"), OTHER)
    assert r["error"]["code"] == NOT_PERMITTED
    assert (await second.handle(req("sign", handle=gone, message=b"m"), ME))["error"][
        "code"
    ] == UNKNOWN_HANDLE


async def test_corrupt_registration_file_is_named_kept_aside_and_the_server_starts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = RegistrationStore.in_state_dir(tmp_path)
    store.path.parent.mkdir(parents=True)
    store.path.write_bytes(b"\xff not cbor")
    with caplog.at_level(logging.ERROR, logger="pst.api"):
        core = ApiCore(FakeBackend(), store=store)
    assert not core.registry.by_handle
    assert str(store.path) in caplog.text and "starting without registrations" in caplog.text
    assert store.path.with_name(store.path.name + ".corrupt").read_bytes() == b"\xff not cbor"
    assert (await core.handle(req("register", name="app", unique_id=b"u"), ME))["ok"]
    assert store.load().problems == [] and len(store.load().registrations) == 1


async def test_one_bad_registration_entry_is_skipped_and_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = RegistrationStore.in_state_dir(tmp_path)
    core = ApiCore(FakeBackend(), store=store)
    h = (await core.handle(req("register", name="good", unique_id=b"u"), ME))["result"]["handle"]
    obj = encoding.decode(store.path.read_bytes())
    good = obj["registrations"][0]
    obj["registrations"].append(dict(good, name="evil", handles=[dict(good["handles"][0], digest=b"short")]))
    store.path.write_bytes(encoding.encode(obj))
    with caplog.at_level(logging.ERROR, logger="pst.api"):
        again = ApiCore(FakeBackend(), store=store)
    assert f"{store.path}: registration 1: handle 0: bad or repeated handle digest" in caplog.text
    assert (await again.handle(req("sign", handle=h, message=b"m"), ME))["ok"]
    assert [r.name for r in again.registry.by_handle.values()] == ["good"]


async def test_pserver_backend_adapter(tmp_path: Path) -> None:
    from appliance.api import PServerBackend
    from appliance.protocols.signing import SigningRefused, is_protocol_payload

    key = Ed25519PrivateKey.generate()
    calls: list[bytes] = []

    async def sign_app(app: str, sha512: bytes) -> bytes:
        payload = app_digest_payload(app, sha512)  # what the key-holder builds
        calls.append(payload)
        if is_protocol_payload(payload):
            raise SigningRefused("refusing to sign a protocol payload on request")
        if payload.endswith(hashlib.sha512(b"slow").digest()):
            raise trio.TooSlowError
        return key.sign(payload)

    status_file = tmp_path / "status.json"
    backend = PServerBackend(sign_app, 2, servers=[1, 2, 3], status_file=status_file, clock=lambda: 5.0)
    core = ApiCore(backend)
    h = (await core.handle(req("register", name="app", unique_id=b"u"), ME))["result"]["handle"]
    sig = (await core.handle(req("sign", handle=h, message=b"m" * 65536), ME))["result"]["signature"]
    key.public_key().verify(sig, app_signing_payload("app", b"m" * 65536))
    assert not is_protocol_payload(calls[0]) and len(calls[0]) < 200
    # A client that submits a protocol payload as its message still gets an app-bound signature.
    protocol_obj = encoding.signing_payload("keytable", 1, "ctx", 3, {"x": 1})
    assert (await core.handle(req("sign", handle=h, message=protocol_obj), ME))["ok"]
    assert calls[-1] == app_signing_payload("app", protocol_obj)
    r = await core.handle(req("sign", handle=h, message=b"slow"), ME)
    assert r["error"]["code"] == UNAVAILABLE
    assert (await core.handle(req("get_time"), ME))["result"]["times_us"] == {1: None, 2: 5_000_000, 3: None}
    assert (await core.handle(req("status"), ME))["error"]["code"] == UNAVAILABLE
    status_file.write_text('{"status": "operational", "period": 3}')
    assert (await core.handle(req("status"), ME))["result"]["status"] == {
        "status": "operational",
        "period": 3,
    }


async def test_sign_digest_gives_the_signature_of_the_whole_message() -> None:
    """A client hashes a large file as it reads it; the group signs the very same payload."""
    backend = FakeBackend()
    core = ApiCore(backend)
    h = (await core.handle(req("register", name="app", unique_id=b"u"), ME))["result"]["handle"]
    message = b"m" * 100_000  # larger than a sign request may carry
    digest = hashlib.sha512(message).digest()
    sig = (await core.handle(req("sign_digest", handle=h, sha512=digest), ME))["result"]["signature"]
    verify(backend, "app", message, sig)
    assert app_digest_payload("app", digest) == app_signing_payload("app", message)
    bad = await core.handle(req("sign_digest", handle=h, sha512=digest[:32]), ME)
    assert bad["error"]["code"] == BAD_REQUEST and "64-byte SHA-512 digest" in bad["error"]["message"]


class FakeDSS(FakeBackend):
    """A backend with a DSS secret ``tsa`` (its 'signature' names what it signed)."""

    async def sign_dss(self, secret: str, message: bytes) -> bytes:
        if secret != "tsa":
            raise BackendUnavailable(f"the network has no DSS secret {secret!r}")
        return b"der:" + message

    async def dss_public_key(self, secret: str) -> bytes | None:
        return b"-----BEGIN PUBLIC KEY-----\n" if secret == "tsa" else None


async def test_dss_sign_is_for_the_operator_and_checks_its_message() -> None:
    core = ApiCore(FakeDSS())
    r = await core.handle(req("dss_sign", secret="tsa", message=b"m"), ME)
    assert r["ok"] and r["result"] == {"signature": b"der:m"}
    r = await core.handle(req("dss_sign", secret="tsa", message=b"m"), OTHER)
    assert r["error"]["code"] == NOT_PERMITTED
    r = await core.handle(req("dss_sign", secret="tsa", message=b"m" * (64 * 1024 + 1)), ME)
    assert r["error"]["code"] == "too-large"
    r = await core.handle(req("dss_sign", secret="other", message=b"m"), ME)
    assert r["error"]["code"] == "unavailable" and "no DSS secret" in r["error"]["message"]
    # The public key is public: anyone may read it; an unknown secret is named.
    r = await core.handle(req("dss_public_key", secret="tsa"), OTHER)
    assert r["ok"] and r["result"]["pem"].startswith(b"-----BEGIN PUBLIC KEY")
    r = await core.handle(req("dss_public_key", secret="nope"), OTHER)
    assert r["error"]["code"] == "unavailable" and "'nope'" in r["error"]["message"]
    # A backend without threshold DSS says so.
    r = await ApiCore(FakeBackend()).handle(req("dss_public_key", secret="tsa"), ME)
    assert r["error"]["code"] == "unavailable" and "no threshold DSS" in r["error"]["message"]

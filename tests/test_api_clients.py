"""The client libraries against a real API server (serve_api on a Unix socket, a fake backend
that signs with a local Ed25519 key): ``appliance.api.client`` and the separate distribution
``clients/python`` (pst-client: cbor2 and the standard library), with the same cases run
against both; ``pst api registrations``; the connection cap per uid with real uids; and
pst-client installed into a fresh virtual environment without the server.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import nacl.public
import pytest
import trio
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_api import CLIENTS, FakeBackend, load_module, req, verify
from test_store_api import OneServerStore, QuorumBackend

from appliance.api import (
    QUOTA,
    UNKNOWN_HANDLE,
    ApiServer,
    Limits,
    app_signing_payload,
    distributed_sign_payload,
    serve_api,
)
from appliance.api import client as appliance_client
from appliance.apps.store import model
from appliance.crypto import encoding

standalone = load_module("pst_client_standalone", CLIENTS / "python" / "pst_client.py")
LIBRARIES = {"appliance": appliance_client, "standalone": standalone}


@pytest.fixture(params=sorted(LIBRARIES))
def lib(request: pytest.FixtureRequest) -> ModuleType:
    module: ModuleType = LIBRARIES[request.param]
    return module


@pytest.fixture
def sock_path() -> Iterator[Path]:
    # Short, and reachable by other uids (tmp_path lies under a 0700 directory).
    where = Path(tempfile.mkdtemp(prefix="pst-api-"))
    os.chmod(where, 0o755)
    yield where / "api.sock"
    shutil.rmtree(where, ignore_errors=True)


async def start(nursery: trio.Nursery, path: Path, **kwargs: Any) -> tuple[ApiServer, FakeBackend]:
    backend = FakeBackend()
    server: ApiServer = await nursery.start(functools.partial(serve_api, path, backend, **kwargs))
    return server, backend


def pem(backend: FakeBackend) -> str:
    return backend.public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()


# Both libraries ---------------------------------------------------------------------------------------


async def test_documented_pattern_leaves_nothing_and_never_hits_the_quota(
    nursery: trio.Nursery, sock_path: Path, lib: ModuleType
) -> None:
    """register("my-app"), sign, exit: 40 runs with a quota of 2 registrations."""
    server, backend = await start(nursery, sock_path, limits=Limits(max_registrations=2, control_burst=1000))

    def run() -> bytes:
        with lib.PstClient(sock_path) as client:
            client.register("my-app")
            signature: bytes = client.sign(b"entry")
            return signature

    for _ in range(40):
        signature = await trio.to_thread.run_sync(run)
    verify(backend, "my-app", b"entry", signature)
    assert not server.core.registry.by_key and not server.core.registry.by_handle


async def test_parallel_clients_of_one_application_all_sign(
    nursery: trio.Nursery, sock_path: Path, lib: ModuleType
) -> None:
    """Eight clients register the same application and sign at the same time (the backend is
    slow, so their calls overlap); each finishing releases only its own handle."""
    server, backend = await start(nursery, sock_path, limits=Limits(control_burst=1000))
    backend.delay = 0.05
    barrier = threading.Barrier(8)

    def run(i: int) -> bytes:
        with lib.PstClient(sock_path) as client:
            client.register("batch")
            barrier.wait()
            signature: bytes = client.sign(f"file {i}".encode())
            barrier.wait()  # nobody releases before everybody signed
            return signature

    def all_of_them() -> list[bytes]:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            return list(pool.map(run, range(8)))

    signatures = await trio.to_thread.run_sync(all_of_them)
    for i, signature in enumerate(signatures):
        verify(backend, "batch", f"file {i}".encode(), signature)
    assert not server.core.registry.by_key


async def test_parallel_processes_of_the_standalone_command_line(
    nursery: trio.Nursery, sock_path: Path
) -> None:
    """Eight `pst-client sign` processes at once, as a script with xargs -P 8 would run them."""
    server, backend = await start(nursery, sock_path, limits=Limits(control_burst=1000))
    backend.delay = 0.05
    file = sock_path.parent / "data"
    file.write_bytes(b"x" * 200_000)
    argv = [sys.executable, str(CLIENTS / "python" / "pst_client.py"), "--socket", str(sock_path)]
    results: list[subprocess.CompletedProcess[bytes]] = []

    async def one() -> None:
        results.append(
            await trio.run_process([*argv, "sign", "--name", "batch", str(file)], capture_stdout=True)
        )

    async with trio.open_nursery() as inner:
        for _ in range(8):
            inner.start_soon(one)
    assert [r.returncode for r in results] == [0] * 8
    for r in results:
        verify(backend, "batch", b"x" * 200_000, bytes.fromhex(r.stdout.decode().strip()))
    assert not server.core.registry.by_key


async def test_a_lost_handle_is_registered_again_by_itself(
    nursery: trio.Nursery, sock_path: Path, lib: ModuleType
) -> None:
    _, backend = await start(nursery, sock_path, limits=Limits(control_burst=1000))

    def session() -> tuple[bytes, str]:
        with lib.PstClient(sock_path) as client:
            first = client.register("daemon", "instance-1")
            with lib.PstClient(sock_path) as operator:  # we are root or the server's user
                assert operator.revoke("daemon")["revoked"] == 1
            signature: bytes = client.sign(b"after the revocation")
            assert client.handle != first
            try:
                client.sign(b"m", handle=first)  # a handle the caller passed is never renewed
            except lib.PstError as exc:
                return signature, str(exc.code)
            return signature, "ok"

    signature, code = await trio.to_thread.run_sync(session)
    verify(backend, "daemon", b"after the revocation", signature)
    assert code == UNKNOWN_HANDLE


async def test_rate_limits_are_waited_out(nursery: trio.Nursery, sock_path: Path, lib: ModuleType) -> None:
    await start(nursery, sock_path, limits=Limits(sign_rate=50.0, sign_burst=1.0))

    def session() -> tuple[int, str, float | None]:
        with lib.PstClient(sock_path) as client:
            client.register("fast")
            signed = sum(1 for _ in range(5) if client.sign(b"m"))  # bursts of 1: the client waits
        with lib.PstClient(sock_path, quota_wait=0) as impatient:
            impatient.register("fast")
            impatient.sign(b"m")
            try:
                impatient.sign(b"m")
            except lib.PstError as exc:
                return signed, str(exc.code), exc.retry_after
        return signed, "ok", None

    signed, code, retry_after = await trio.to_thread.run_sync(session)
    assert signed == 5 and code == QUOTA and retry_after is not None and 0 < retry_after <= 0.02


async def test_sign_file_and_verify(nursery: trio.Nursery, sock_path: Path, lib: ModuleType) -> None:
    _, backend = await start(nursery, sock_path)
    content = bytes(range(256)) * 4000  # 1 MB: larger than a sign request may carry
    path = sock_path.parent / "big.bin"
    path.write_bytes(content)
    key = pem(backend)

    def session() -> tuple[bytes, bytes, bytes]:
        with lib.PstClient(sock_path) as client:
            client.register("archiver")
            by_path: bytes = client.sign_file(path)
            by_stream: bytes = client.sign_file(io.BytesIO(content))
        helper: bytes = lib.sign_file(str(path), "archiver", socket_path=sock_path)
        return by_path, by_stream, helper

    by_path, by_stream, helper = await trio.to_thread.run_sync(session)
    verify(backend, "archiver", content, by_path)
    for signature in (by_path, by_stream, helper):
        assert lib.verify(signature, "archiver", content, key)
        assert lib.verify(signature, "archiver", hashlib.sha512(content), key)
        with path.open("rb") as f:
            assert lib.verify(signature, "archiver", f, key)
        assert not lib.verify(signature, "other-app", content, key)
        assert not lib.verify(signature, "archiver", content + b"!", key)
    raw = backend.public.public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert lib.verify(by_path, "archiver", content, raw.hex())
    with pytest.raises(ValueError, match="PEM 'PUBLIC KEY'"):
        lib.verify(by_path, "archiver", content, "not a key")
    with pytest.raises(ValueError, match="64 bytes, not 63"):
        lib.verify(by_path[:63], "archiver", content, key)
    with pytest.raises(TypeError, match="message_or_digest"):
        lib.verify(by_path, "archiver", 17, key)


async def test_operator_calls_from_the_library(
    nursery: trio.Nursery, sock_path: Path, lib: ModuleType
) -> None:
    await start(nursery, sock_path)

    def session() -> tuple[list[Any], dict[str, Any]]:
        with lib.PstClient(sock_path) as app, lib.PstClient(sock_path) as second:
            app.register("my-app")
            second.register("my-app")
            with lib.PstClient(sock_path) as operator:
                listing: list[Any] = operator.registrations()
                revoked: dict[str, Any] = operator.revoke("my-app", os.getuid(), release_name=True)
            return listing, revoked

    listing, revoked = await trio.to_thread.run_sync(session)
    (info,) = listing
    assert (info.name, info.uid, info.kind, info.unique_id, info.handles) == (
        "my-app",
        os.getuid(),
        "centralized",
        b"default",
        2,
    )
    assert info.created <= info.last_used
    assert revoked == {"revoked": 1, "handles": 2, "released": True, "owner": os.getuid()}


async def test_public_store_data_from_both_libraries(
    nursery: trio.Nursery, sock_path: Path, lib: ModuleType
) -> None:
    """StoreData / Retrieve / Write of public data over a real socket (a one-server store); the
    standalone library refuses secret types, which need the in-package client's TDH2."""
    await nursery.start(functools.partial(serve_api, sock_path, FakeBackend(), data_store=OneServerStore()))

    def session() -> dict[str, Any]:
        out: dict[str, Any] = {}
        with lib.PstClient(sock_path) as client, lib.PstClient(sock_path) as other:
            client.register("vault", "alice")
            other.register("intruder")
            out["put"] = client.store_data("motd", b"hello")
            out["big"] = client.store_data("big", bytes(4096))
            out["get"] = client.retrieve("motd")
            out["record"] = client.store_record("big")
            for name, call in (
                ("again", lambda: client.store_data("motd", b"other")),
                ("rw", lambda: client.store_data("cfg", b"v1", "public-rw")),
                ("write", lambda: client.write("motd", b"v2", 2)),
                ("stranger", lambda: other.retrieve("motd")),
            ):
                with pytest.raises(lib.PstError) as err:
                    call()
                out[name] = err.value.code
            with appliance_client.PstClient(sock_path) as full:
                full.register("vault", "alice")
                full.store_data("seed", b"secret", "secret-single", reader=nacl.public.PrivateKey.generate())
            if lib is standalone:
                for call in (
                    lambda: client.retrieve("seed"),
                    lambda: client.store_data("k", b"x", "store-until"),
                ):
                    with pytest.raises(standalone.PstError, match="threshold decryption") as err:
                        call()
                    assert err.value.code == "not-supported"
                assert client.store_record("seed")["type"] == "secret-single"
        return out

    out = await trio.to_thread.run_sync(session)
    assert (out["put"], out["big"], out["get"]) == (1, 1, b"hello")
    assert (out["record"]["type"], out["record"]["v"], out["record"]["value"]) == (
        "public-once",
        1,
        bytes(4096),
    )
    assert (out["again"], out["rw"], out["write"], out["stranger"]) == (
        "exists",
        "not-permitted",
        "exists",
        "not-found",
    )


class WaitingStoreRequest(QuorumBackend):
    """A quorum that approves every store request (QuorumBackend), and one store write of
    another server's client waiting for ours (``pending``; decided with ``approve``/``deny``)."""

    WAITING = model.WriteRequest("vault", "limits", model.DataType.PUBLIC_RW, 1, value=b"max=3")

    async def distributed_pending(self, app: str, verifier: bytes) -> list[dict[str, Any]]:
        return [
            {
                "request_id": b"r" * 32,
                "protocol": "store",
                "payload": self.WAITING.approval_payload(),
                "servers": [2],
                "expires_in_ms": 9000,
            }
        ]


async def test_quorum_and_batch_store_operations_from_both_libraries(
    nursery: trio.Nursery, sock_path: Path, lib: ModuleType
) -> None:
    """A distributed client creates and changes public-rw data through the quorum, sees another
    client's waiting store request (what it asks) and approves it; a centralized client stores
    many items in one request, each answered in order; a distributed one cannot batch."""
    store = OneServerStore()
    backend = WaitingStoreRequest(store)
    await nursery.start(functools.partial(serve_api, sock_path, backend, data_store=store))

    def session() -> dict[str, Any]:
        out: dict[str, Any] = {}
        with lib.PstClient(sock_path) as d, lib.PstClient(sock_path) as c:
            d.register_distributed("vault", "open sesame")
            out["created"] = d.store_data("cfg", b"v1", "public-rw")
            out["changed"] = d.write("cfg", b"v2", 2)
            out["read"] = d.retrieve("cfg")
            (waiting,) = [p for p in d.pending() if p.protocol == "store"]
            out["waiting"] = waiting.store_request()
            d.approve(waiting.request_id)
            with pytest.raises(lib.PstError) as err:
                d.store_many([("x", b"1")])
            out["distributed batch"] = err.value.code
            c.register("vault", "alice")
            out["batch"] = c.store_many([("a", b"1"), ("b", b"2"), ("a", b"3")])
            out["b"] = c.retrieve("b")
        return out

    out = await trio.to_thread.run_sync(session)
    assert (out["created"], out["changed"], out["read"]) == (1, 2, b"v2")
    asked = [model.decode_approval_payload(payload) for _a, _v, _p, payload, _t in backend.requests]
    assert [(r.data_id, r.version) for r in asked] == [("cfg", 1), ("cfg", 2)]
    waiting = out["waiting"]
    if lib is standalone:
        assert (waiting["kind"], waiting["id"], waiting["type"], waiting["value"]) == (
            "write",
            "limits",
            "public-rw",
            b"max=3",
        )
    else:
        assert waiting == WaitingStoreRequest.WAITING
    assert backend.decisions == [("vault", backend.decisions[0][1], b"r" * 32, True)]
    assert out["distributed batch"] == "not-permitted"
    first, second, again = out["batch"]
    assert (first, second, out["b"]) == (1, 1, b"2")
    assert isinstance(again, lib.PstError) and again.code == "exists"


def test_pst_store_quorum_and_batch_commands(
    sock_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``pst store`` against a server's API socket: ``batch ID=FILE...`` (each outcome printed,
    exit 1 when one is refused), ``put``/``write`` of public-rw data with ``--password-file``
    (through the quorum), ``pending`` and ``approve --all`` of another client's store request;
    clear errors without a password or with a bad item. The same with the standalone
    ``pst-client store``."""
    from appliance import cli

    store = OneServerStore()
    backend = WaitingStoreRequest(store)
    password = tmp_path / "password"
    password.write_bytes(b"open sesame\n")
    values = {name: tmp_path / name for name in ("one", "two")}
    for name, path in values.items():
        path.write_bytes(name.encode())
    sock = ["--socket", str(sock_path), "--app", "vault"]
    quorum = [*sock, "--password-file", str(password)]

    lone = ["--name", "lone"]
    alone = [*lone, "--password-file", str(password)]
    commands: list[tuple[Any, list[str]]] = [
        (cli.main, ["store", *argv])
        for argv in (
            ["batch", *sock, f"a={values['one']}", f"b={values['two']}"],
            ["batch", *sock, f"a={values['two']}", f"c={values['one']}"],
            ["put", *quorum, "cfg", "--type", "public-rw", "--file", str(values["one"])],
            ["write", *quorum, "cfg", "2", "--file", str(values["two"])],
            ["pending", *quorum],
            ["approve", *quorum, "--all"],
            ["pending", *sock],
            ["batch", *sock, "no-file-here"],
        )
    ] + [
        (standalone.main, ["--socket", str(sock_path), "store", *argv])
        for argv in (
            ["batch", *lone, f"a={values['one']}", f"a={values['two']}"],
            ["put", *alone, "--type", "public-rw", "cfg", str(values["one"])],
            ["write", *alone, "cfg", "2", str(values["two"])],
            ["get", *lone, "cfg"],
            ["approve", *alone, "72" * 32],
            ["pending", *lone],
        )
    ]

    async def main() -> list[tuple[int, str, str]]:
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(serve_api, sock_path, backend, data_store=store))
            runs = []
            for command, argv in commands:
                code = await trio.to_thread.run_sync(command, argv)
                got = capsys.readouterr()
                runs.append((code, got.out, got.err))
            nursery.cancel_scope.cancel()
        return runs

    runs = trio.run(main)
    assert runs[0] == (
        0,
        "stored vault/a version 1 (public-once)\nstored vault/b version 1 (public-once)\n",
        "",
    )
    code, printed, _ = runs[1]
    assert code == 1 and "refused vault/a: exists:" in printed and "stored vault/c version 1" in printed
    assert runs[2][:2] == (0, "stored vault/cfg version 1 (public-rw)\n")
    assert runs[3][:2] == (0, "wrote vault/cfg version 2\n")
    assert store.services[1].state.get("vault", "cfg").value == b"two"
    code, printed, _ = runs[4]
    assert code == 0 and printed.startswith(
        ("72" * 32) + "\tpending\twrite vault/limits version 1 (public-rw)"
    )
    assert "value b'max=3'" in printed and "from servers 2" in printed
    assert runs[5][0] == 0 and "\tapproved\t" in runs[5][1]
    assert runs[6][0] == 2 and "give --password-file" in runs[6][2]
    assert runs[7][0] == 2 and "expected ID=FILE" in runs[7][2]
    code, printed, _ = runs[8]  # pst-client store batch: one refused
    assert code == 1 and printed.startswith("a\t1\na\trefused: exists: ")
    assert runs[9][:2] == (0, "stored cfg version 1\n") and runs[10][:2] == (0, "wrote cfg version 2\n")
    assert runs[11][:2] == (0, "two")
    assert runs[12][0] == 0 and runs[12][1].startswith(
        ("72" * 32) + "\tapproved\twrite vault/limits version 1"
    )
    assert [d[2:] for d in backend.decisions] == [(b"r" * 32, True)] * 2
    assert runs[13][0] == 2 and "give --password-file" in runs[13][2]


class _CountedKeys(OneServerStore):
    """A one-server store that counts the store-key requests (each one a trip to the key-holder)."""

    def __init__(self) -> None:
        super().__init__()
        self.key_asks = 0

    async def store_key(self) -> dict[str, Any]:
        self.key_asks += 1
        return dict(await super().store_key())


async def test_the_client_asks_the_store_key_once_for_its_secret_writes_and_reads(
    nursery: trio.Nursery, sock_path: Path
) -> None:
    """Sealing and opening use only what never changes of the store key (group, n, t, public key):
    a PstClient asks its server for it once, not before each secret write and read."""
    store = _CountedKeys()
    await nursery.start(functools.partial(serve_api, sock_path, FakeBackend(), data_store=store))
    owner = nacl.public.PrivateKey.generate()

    def session() -> list[bytes]:
        with appliance_client.PstClient(sock_path) as client:
            client.register("vault", "alice")
            client.store_data("a", b"first", "secret-single", reader=owner)
            client.store_many([("b", b"second"), ("c", b"third")], "secret-single", reader=owner)
            return [client.retrieve(name, reader=owner) for name in ("a", "b", "c")]

    assert await trio.to_thread.run_sync(session) == [b"first", b"second", b"third"]
    assert store.key_asks == 1


@given(st.text(max_size=20), st.text(max_size=20), st.binary(max_size=64), st.integers(1, 2**32))
@settings(max_examples=50, deadline=None)
def test_standalone_store_request_is_the_models_encoding(
    app: str, data_id: str, value: bytes, v: int
) -> None:
    sent: list[dict[str, Any]] = []
    client = standalone.PstClient("/nonexistent")
    client._registration = (app, b"default")
    client.handle = b"h" * 32
    client._call = lambda op, **fields: sent.append(fields) or {"version": v}  # type: ignore[method-assign]
    assert client.write(data_id, value, v) == v
    expected = model.WriteRequest(app, data_id, model.DataType.PUBLIC_RW, v, value=value).encode()
    assert sent[0]["request"] == expected


async def test_a_refused_connection_reports_the_servers_reason(
    nursery: trio.Nursery, sock_path: Path, lib: ModuleType
) -> None:
    """The server answers a refused connection at once and closes it; the client may find the
    socket closed while it still writes its request, and must report the server's answer, not
    a broken pipe (test_api_userns.py failed on that race before)."""
    server, _ = await start(nursery, sock_path, max_connections_per_uid=1)
    held = await trio.open_unix_socket(str(sock_path))
    with trio.fail_after(5):
        while server.per_uid.get(os.getuid()) != 1:  # the server took the connection
            await trio.sleep(0.01)

    def refused() -> tuple[str, str]:
        try:
            lib.PstClient(sock_path, quota_wait=0).get_time()
        except lib.PstError as exc:
            return str(exc.code), str(exc.message)
        return "ok", ""

    for _ in range(5):
        code, message = await trio.to_thread.run_sync(refused)
        assert code == QUOTA and "connections open, the limit per user" in message
    await held.aclose()


def test_the_standalone_library_falls_back_to_pynacl_and_says_what_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    signature = key.sign(app_signing_payload("app", b"m"))
    monkeypatch.setitem(sys.modules, "cryptography", None)  # import cryptography now fails
    monkeypatch.setitem(sys.modules, "cryptography.exceptions", None)
    assert standalone.verify(signature, "app", b"m", public)
    assert not standalone.verify(signature, "app", b"n", public)
    monkeypatch.setitem(sys.modules, "nacl", None)
    monkeypatch.setitem(sys.modules, "nacl.signing", None)
    monkeypatch.setitem(sys.modules, "nacl.exceptions", None)
    with pytest.raises(RuntimeError, match="needs the 'cryptography' or the 'PyNaCl' package"):
        standalone.verify(signature, "app", b"m", public)


_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,20}", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(_names, st.binary(max_size=300), st.integers(1, 2**62), st.binary(min_size=1, max_size=64))
def test_standalone_encodes_exactly_like_the_server(app: str, message: bytes, rid: int, uid: bytes) -> None:
    """cbor2's canonical mode in the standalone client and the server's codec give the same bytes:
    the payloads that are signed, and the requests the server decodes strictly."""
    digest = hashlib.sha512(message).digest()
    assert standalone.app_signing_payload(app, digest) == app_signing_payload(app, message)
    assert standalone.distributed_sign_payload(app, message) == distributed_sign_payload(app, message)
    for obj in (
        req("register", rid, name=app, unique_id=uid),
        req("sign", rid, handle=b"h" * 32, message=message),
        req("revoke", rid, name=app, uid=rid % 2**32, release_name=True),
    ):
        assert standalone._encode(obj) == encoding.encode(obj)


_plain = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.binary(max_size=20) | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)
_responses = st.fixed_dictionaries(
    {"v": st.sampled_from([1, 1, 2, True]), "id": st.sampled_from([1, 2, True]) | _plain},
    optional={
        "ok": st.booleans() | _plain,
        "result": _plain,
        "error": st.fixed_dictionaries(
            {"code": st.text(max_size=5) | _plain, "message": st.text(max_size=5) | _plain},
            optional={"retry_after_ms": st.integers(-5, 2**40) | _plain},
        )
        | _plain,
    },
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=100) | _responses.map(encoding.encode) | _plain.map(encoding.encode))
def test_fuzz_standalone_response_decoder(frame: bytes) -> None:
    """Whatever the socket delivers: a result map, or a PstError with a code and a message."""
    try:
        result = standalone.decode_response(frame, 1)
    except standalone.PstError as exc:
        assert exc.code and isinstance(exc.message, str)
        assert exc.retry_after is None or 0 < exc.retry_after < 2**31
    else:
        assert isinstance(result, dict)


def test_public_key_forms() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    key = Ed25519PrivateKey.generate().public_key()
    raw = key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    text = key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    assert load_pem_public_key(text) == key
    for lib in LIBRARIES.values():
        assert lib.public_key_bytes(text) == raw == lib.public_key_bytes(text.decode())
        assert lib.public_key_bytes(raw.hex()) == raw == lib.public_key_bytes(raw)
        with pytest.raises(ValueError, match="not an Ed25519"):
            rsa_like = text.decode().replace(text.decode().split("\n")[1], "MCowBQYDK2VxAyEA")
            lib.public_key_bytes(rsa_like)


# pst api registrations ------------------------------------------------------------------------------


async def test_pst_api_registrations_list_and_revoke(
    nursery: trio.Nursery, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from appliance import cli
    from appliance.host import config as node_config
    from appliance.node.cluster import init_cluster, node_dir

    root = tmp_path / "c"
    init_cluster(root, n=4, t=1, period_seconds=600, round_ms=30, progress=lambda _: None, log="off")
    sock = node_config.load(node_dir(root, 1) / "config.toml").api_socket
    server, _ = await start(nursery, sock)  # only server 1 runs

    def app() -> None:
        client = appliance_client.PstClient(sock)
        client.register("my-app")
        client.register("my-app", "worker-2")
        client.disconnect()  # the registrations stay

    await trio.to_thread.run_sync(app)

    async def pst(*argv: str) -> int:
        code: int = await trio.to_thread.run_sync(cli.main, list(argv))
        return code

    assert await pst("api", "registrations", "list", "--dir", str(root), "--node", "1") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"server 1 ({sock}): 2 registrations"
    assert out[1].split() == ["NAME", "UID", "KIND", "UNIQUE", "ID", "HANDLES", "AGE", "LAST", "USE"]
    assert out[2].split()[:5] == ["my-app", str(os.getuid()), "centralized", "default", "1"]
    assert out[3].split()[:5] == ["my-app", str(os.getuid()), "centralized", "worker-2", "1"]
    for digest in server.core.registry.by_handle:  # no handle digest is shown
        assert digest.hex() not in "\n".join(out)
    # Every server of the cluster: the three that do not run say so, and the exit status is 1.
    assert await pst("api", "registrations", "list", "--dir", str(root)) == 1
    captured = capsys.readouterr()
    assert "server 2 (" in captured.err and "connection: cannot connect" in captured.err
    assert (
        await pst(
            "api", "registrations", "list", "--config", str(node_dir(root, 1) / "config.toml"), "--json"
        )
        == 0
    )
    (report,) = json.loads(capsys.readouterr().out)
    assert [r["unique_id"] for r in report["registrations"]] == ["default", "worker-2"]
    assert report["owners"] == {"my-app": os.getuid()}

    argv = ["api", "registrations", "revoke", "my-app", "--config", str(node_dir(root, 1) / "config.toml")]
    assert await pst(*argv, "--uid", str(os.getuid() + 1)) == 1
    assert "server 1: no registration of 'my-app' of uid" in capsys.readouterr().out
    assert await pst(*argv, "--release-name") == 0
    out = capsys.readouterr().out
    assert "server 1: revoked 2 registration(s) of 'my-app' (2 handles)" in out
    assert f"the name 'my-app' is released (it belonged to uid {os.getuid()})" in out
    assert not server.core.registry.by_key and not server.core.registry.owners
    assert await pst("api", "registrations", "list", "--dir", str(root), "--node", "9") == 2
    assert "c: holds no server 9" in capsys.readouterr().err


# Real uids ---------------------------------------------------------------------------------------------

_HOLD = """
import os, socket, struct, sys
path, count, request, uid = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3]), int(sys.argv[4])
os.setgroups([]); os.setgid(uid); os.setuid(uid)  # the interpreter may live where uid cannot read
held = []
for _ in range(count):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    try:
        s.sendall(struct.pack(">I", len(request)) + request)
    except OSError:  # a refused connection: the server answered at once and closed
        pass
    size = struct.unpack(">I", s.recv(4, socket.MSG_WAITALL))[0]
    print(s.recv(size, socket.MSG_WAITALL).hex(), flush=True)
    held.append(s)
sys.stdin.read()  # hold the connections until the test closes our stdin
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run clients as other uids")
async def test_one_uid_at_its_connection_cap_does_not_lock_out_others(
    nursery: trio.Nursery, sock_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    server, _ = await start(nursery, sock_path, max_connections_per_uid=3, max_connections=5)
    os.chmod(sock_path, 0o666)
    request = encoding.encode(req("get_time")).hex()

    async def hold(uid: int, count: int) -> tuple[trio.Process, list[dict[str, Any]]]:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-I", "-c", _HOLD, str(sock_path), str(count), request, str(uid)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert proc.stdout is not None
        answers: list[dict[str, Any]] = []
        buffer = b""
        with trio.fail_after(20):
            while len(answers) < count:
                chunk = await proc.stdout.receive_some()
                assert chunk, "the client process ended early"
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                answers += [encoding.decode(bytes.fromhex(line.decode())) for line in lines]
        return proc, answers

    with caplog.at_level(logging.WARNING, logger="pst.api"):
        greedy, answers = await hold(4001, 4)  # one more than its cap
        assert [a["ok"] for a in answers] == [True, True, True, False]
        assert answers[3]["error"]["code"] == QUOTA
        assert "uid 4001 already has 3 connections open, the limit per user" in answers[3]["error"]["message"]
        assert "refused a connection of uid 4001 (pid " in caplog.text
        # Another uid is still served, up to the server's cap of 5 (3 + 2) ...
        other, answers = await hold(4002, 3)
        assert [a["ok"] for a in answers] == [True, True, False]
        assert "the server has 5 connections open, its limit" in answers[2]["error"]["message"]
        # ... and the operator always is.
        assert server.connections == 5
        raw = await trio.open_unix_socket(str(sock_path))
        frame = encoding.encode(req("registrations"))
        await raw.send_all(len(frame).to_bytes(4, "big") + frame)
        with trio.fail_after(5):
            data = b""
            while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:4], "big"):
                data += await raw.receive_some()
        response = encoding.decode(data[4:])
        assert response["ok"] and response["result"]["registrations"] == []
        await raw.aclose()
    for proc in (greedy, other):
        assert proc.stdin is not None
        await proc.stdin.aclose()
        await proc.wait()


# pst-client installed without the server -----------------------------------------------------------------


def _local_wheels(*names: str) -> Path | None:
    """A directory holding wheels of every package in ``names`` (the Debian package's build), if any."""
    roots = [Path(__file__).resolve().parent.parent / "build", Path(sys.prefix).resolve().parent / "build"]
    for root in roots:
        for folder in sorted(root.glob("deb-wheels/*")):
            if all(any(folder.glob(f"{n}-*.whl")) for n in names):
                return folder
    return None


@pytest.mark.slow
async def test_pst_client_installs_and_works_without_the_server(
    nursery: trio.Nursery, sock_path: Path
) -> None:
    """pip install clients/python into a fresh venv with cbor2 and PyNaCl only (no appliance, no
    cryptography, no trio): it signs through a real API server and verifies with PyNaCl."""
    venv = sock_path.parent / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    run = functools.partial(trio.run_process, env=env, cwd=sock_path.parent)  # no checkout on the path
    await run([sys.executable, "-m", "venv", str(venv)])
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "--quiet", "install"]
    wheels = _local_wheels("cbor2", "pynacl", "cffi", "pycparser")
    source = ["--no-index", "--find-links", str(wheels)] if wheels else []
    await run([*pip, *source, "cbor2", "pynacl"])
    source_copy = sock_path.parent / "pst-client-src"  # pip builds in the tree: keep ours clean
    shutil.copytree(CLIENTS / "python", source_copy, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    await run([*pip, "--no-deps", str(source_copy)])  # setuptools from PyPI, to build
    _, backend = await start(nursery, sock_path, limits=Limits(control_burst=1000))
    key = sock_path.parent / "group.pem"
    key.write_text(pem(backend))
    data = sock_path.parent / "report.bin"
    data.write_bytes(b"quarterly report\n" * 10_000)
    script = f"""
import importlib.util, sys
for absent in ("appliance", "cryptography", "trio"):
    assert importlib.util.find_spec(absent) is None, absent
import pst_client
with pst_client.PstClient({str(sock_path)!r}) as client:
    client.register("reports")
    sig = client.sign_file({str(data)!r})
key = open({str(key)!r}).read()
assert pst_client.verify(sig, "reports", open({str(data)!r}, "rb").read(), key)
assert not pst_client.verify(sig, "other", open({str(data)!r}, "rb").read(), key)
print(sig.hex())
"""
    done = await run([str(venv / "bin" / "python"), "-c", script], capture_stdout=True)
    verify(backend, "reports", data.read_bytes(), bytes.fromhex(done.stdout.decode().strip()))
    # The console script, then its verify.
    cli = str(venv / "bin" / "pst-client")
    done = await run(
        [cli, "--socket", str(sock_path), "sign", "--name", "reports", str(data)], capture_stdout=True
    )
    sig_file = sock_path.parent / "report.sig"
    sig_file.write_bytes(done.stdout)
    check = await run(
        [cli, "verify", "--key", str(key), "--app", "reports", str(data), str(sig_file)], capture_stdout=True
    )
    assert check.stdout.decode().startswith("OK: ")
    bad = await run(
        [cli, "verify", "--key", str(key), "--app", "other", str(data), str(sig_file)],
        capture_stdout=True,
        check=False,
    )
    assert bad.returncode == 1 and bad.stdout.decode().startswith("INVALID: ")


@pytest.mark.interop
async def test_openssl_verifies_what_pst_client_payload_prints(
    nursery: trio.Nursery, sock_path: Path
) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl")
    _, backend = await start(nursery, sock_path)
    data = sock_path.parent / "msg"
    data.write_bytes(b"hello openssl\n")
    signature = await trio.to_thread.run_sync(
        lambda: standalone.sign_file(str(data), "tool", socket_path=sock_path)
    )
    (sock_path.parent / "sig").write_bytes(signature)
    (sock_path.parent / "key.pem").write_text(pem(backend))
    payload = await trio.run_process(
        [sys.executable, str(CLIENTS / "python" / "pst_client.py"), "payload", "--app", "tool", str(data)],
        capture_stdout=True,
    )
    (sock_path.parent / "payload").write_bytes(payload.stdout)
    d = sock_path.parent
    result = await trio.run_process(
        [
            openssl,
            "pkeyutl",
            "-verify",
            "-pubin",
            "-inkey",
            str(d / "key.pem"),
            "-rawin",
            "-in",
            str(d / "payload"),
            "-sigfile",
            str(d / "sig"),
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    if b"rawin" in result.stderr and result.returncode != 0 and b"Unknown" in result.stderr:
        pytest.skip("this openssl has no -rawin")
    assert result.returncode == 0, result.stderr
    assert b"Signature Verified Successfully" in result.stdout

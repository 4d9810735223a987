"""The data storage API (paper §5.2, Table 4) through real `pst serve` processes.

One cluster for the module: four servers (n=4, t=1, periods of 5 s), C with a P-256 store key
(`pst cluster init --store`). Writes go through the servers' agreement (the store's replicated
sequence); secrets are sealed by the client library, and read back by threshold decryption: t+1
servers' decryption shares, each sealed to the reader's X25519 key, opened by the client.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import nacl.public
import pytest
from clusterutil import init_cluster, pst, start, status

from appliance.api.client import PstClient, PstError

APP = "vault"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("store") / "c"
    init_cluster(root, n=4, period=5, round_ms=100, extra=("--store",))
    up = pst("cluster", "up", "--dir", str(root), "--detach")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield root
    finally:
        pst("cluster", "down", "--dir", str(root))


_open: list[PstClient] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    """Each client holds a connection (a server caps them per user): closed after each test."""
    yield
    while _open:
        _open.pop().close()


def _client(root: Path, i: int, name: str = APP, unique_id: str = "default") -> PstClient:
    sock = root / f"node-{i}" / "api.sock"
    deadline = time.monotonic() + 30
    while True:
        try:
            client = PstClient(sock, timeout=40)
            _open.append(client)
            client.register(name, unique_id)
            return client
        except (PstError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def _retrying(call, *args, **kwargs):  # type: ignore[no-untyped-def]
    """While the network starts (no store key, channels not authenticated yet): try again."""
    deadline = time.monotonic() + 40
    while True:
        try:
            return call(*args, **kwargs)
        except PstError as exc:
            if exc.code != "unavailable" or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _wait_for_period(root: Path, period: int) -> None:
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        if all(int(r.get("period") or 0) >= period for r in status(root)):
            return
        time.sleep(0.3)
    raise AssertionError(f"no refresh to period {period}: {status(root)}")


def _http_status(root: Path, i: int) -> dict[str, object]:
    """Server i's /v1/status (its [http] listen address from its config)."""
    config = tomllib.loads((root / f"node-{i}" / "config.toml").read_text())
    with urllib.request.urlopen(f"http://{config['http']['listen']}/v1/status", timeout=10) as response:
        doc: dict[str, object] = json.loads(response.read())
    return doc


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in state  # a zombie nobody reaped has stopped


def _alerts(root: Path, kind: str) -> list[dict[str, object]]:
    found = []
    for path in sorted(root.glob("node-*/state/serve/alerts.jsonl")):
        for line in path.read_text().splitlines():
            obj = json.loads(line)
            if obj.get("kind") == kind:
                found.append({**obj, "at_node": path.parts[-4]})
    return found


def test_public_and_secret_data_are_stored_and_read_back_across_a_refresh(cluster: Path) -> None:
    owner = nacl.public.PrivateKey.generate()
    a = _client(cluster, 1)
    assert _retrying(a.store_data, "motd", b"hello from the network") == 1
    assert _retrying(a.store_data, "seed", b"kept secret by the network", "secret-single", reader=owner) == 1
    assert a.store_data("shared", b"for any quorum", "secret-sw-dr") == 1
    assert a.retrieve("motd") == b"hello from the network"
    assert _retrying(a.retrieve, "seed", reader=owner) == b"kept secret by the network"

    # Write-once is write-once, at every server (the agreed order applied everywhere).
    with pytest.raises(PstError) as exists:
        a.store_data("motd", b"changed")
    assert exists.value.code == "exists"

    # The same application's client at another server reads the public value; the owner's
    # registration at another server (same name, same unique id) reads its secret.
    b = _client(cluster, 3)
    deadline = time.monotonic() + 10
    while True:
        try:
            assert b.retrieve("motd") == b"hello from the network"
            break
        except PstError as exc:  # server 3 may not have applied the write yet
            if exc.code != "not-found" or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    first = int(status(cluster)[0].get("period") or 0)
    _wait_for_period(cluster, first + 1)
    assert _retrying(b.retrieve, "seed", reader=owner) == b"kept secret by the network"
    assert _retrying(a.retrieve, "motd") == b"hello from the network"
    # The quorum-read type: one client alone is refused at every server.
    with pytest.raises(PstError) as quorum:
        a.retrieve("shared")
    assert quorum.value.code == "not-permitted"
    # The refresh's period mark is in the store's sequence, and the servers' signed digests
    # at it verify every server's copy (t+1 signers agree with each one's own digest).
    deadline = time.monotonic() + 30
    while True:
        stores = [_http_status(cluster, i).get("store") or {} for i in (1, 2, 3, 4)]
        if all(int(s.get("period") or 0) > first and int(s.get("verified") or 0) > 0 for s in stores):
            break
        assert time.monotonic() < deadline, stores
        time.sleep(0.3)
    assert not any(s.get("damaged") for s in stores), stores


def test_another_applications_client_is_refused(cluster: Path) -> None:
    a = _client(cluster, 2)
    _retrying(a.store_data, "private-note", b"vault's own")
    other = _client(cluster, 2, name="intruder")
    with pytest.raises(PstError) as refused:
        other.retrieve("private-note")
    # Data ids are per application: another application does not even see the id.
    assert refused.value.code == "not-found"

    # Every server applied the same writes: their status pages show one store digest.
    deadline = time.monotonic() + 20
    while True:
        stores = [_http_status(cluster, i).get("store") or {} for i in (1, 2, 3, 4)]
        if len({s.get("digest") for s in stores}) == 1 and all(s.get("items") for s in stores):
            break
        assert time.monotonic() < deadline, stores
        time.sleep(0.3)


def test_a_secret_single_read_by_a_non_owner_is_refused_and_alerted(cluster: Path) -> None:
    owner = nacl.public.PrivateKey.generate()
    a = _client(cluster, 1, unique_id="alice")
    _retrying(a.store_data, "diary", b"only alice reads this", "secret-single", reader=owner)
    mallory = _client(cluster, 1, unique_id="mallory")
    with pytest.raises(PstError) as refused:
        mallory.retrieve("diary", reader=owner)  # even with the owner's key: not the owner
    assert refused.value.code == "not-permitted"
    assert "only its owner may read secret-single data" in refused.value.message
    alerts = [a for a in _alerts(cluster, "store-read-refused") if "diary" in str(a.get("detail"))]
    assert {a["at_node"] for a in alerts} >= {"node-1", "node-2", "node-3", "node-4"} - {"node-1"}
    assert all("6d616c6c6f7279" in str(a["detail"]) for a in alerts)  # names mallory


def test_store_until_is_refused_before_its_date_everywhere_and_released_by_the_network(
    cluster: Path,
) -> None:
    a = _client(cluster, 4)
    until = time.time() + 3600
    _retrying(a.store_until, "will", b"open in an hour", until)
    with pytest.raises(PstError) as early:
        a.retrieve("will")
    assert early.value.code == "too-early"
    for i in (1, 2, 3, 4):
        assert f"server {i}: read of {APP}/will: kept secret until" in early.value.message, (
            early.value.message
        )
    # One due in two seconds: nobody reads it; the network releases it by itself, and a client
    # of the application at another server then gets the value from that server's copy.
    _retrying(a.store_until, "soon", b"released at the date", time.time() + 2)
    c = _client(cluster, 3)
    deadline = time.monotonic() + 30

    def released() -> bool:
        try:
            return bool(c.store_record("soon").get("value"))
        except PstError as exc:  # server 3 has not applied the write yet
            assert exc.code == "not-found", exc
            return False

    while not released():
        assert time.monotonic() < deadline, "the StoreUntil item was not released"
        time.sleep(0.3)
    assert c.retrieve("soon") == b"released at the date"
    assert c.store_record("will").get("value") == b""  # the other one is still sealed


def _distributed(root: Path, i: int, name: str = "dvault", password: str = "open sesame") -> PstClient:
    sock = root / f"node-{i}" / "api.sock"
    client = PstClient(sock, timeout=40)
    _open.append(client)
    _retrying(client.register_distributed, name, password)
    return client


class _Approvers:
    """Clients of the distributed application at other servers that approve (or deny) every
    ``store`` request waiting for them, each in its own thread, until stopped; what they saw
    is kept."""

    def __init__(self, clients: list[PstClient], approve: bool = True) -> None:
        self.approve = approve
        self.seen: list[object] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(c,), daemon=True) for c in clients]

    def _run(self, client: PstClient) -> None:
        decided: set[bytes] = set()
        while not self._stop.is_set():
            try:
                for p in client.pending():
                    if p.protocol == "store" and p.request_id not in decided:
                        self.seen.append(p.store_request())
                        (client.approve if self.approve else client.deny)(p.request_id)
                        decided.add(p.request_id)
            except PstError:
                pass  # a request expired or decided meanwhile; a server briefly unavailable
            time.sleep(0.05)

    def __enter__(self) -> _Approvers:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)


def test_a_distributed_applications_quorum_writes_and_reads(cluster: Path) -> None:
    """public-rw, secret-dw-dr and a random joint secret written, and read, by a quorum: the clients at
    servers 2 and 3 approve what server 1's client asks (3 of 4 servers). The certificate
    travels in the agreed operation and every server's check gives one verdict (their store
    digests stay equal). Denied by the others, the request is refused naming them; a single
    client is refused where a quorum is needed; another application's quorum does not see the
    data. (Joint secrets and the next version of public-rw: tests/test_store_api.py.)"""
    d1, d2, d3 = (_distributed(cluster, i) for i in (1, 2, 3))
    reader = nacl.public.PrivateKey.generate()
    with _Approvers([d2, d3]) as approvers:
        assert _retrying(d1.store_data, "config", b"v1", "public-rw") == 1
        assert _retrying(d1.store_data, "db-key", b"k1", "secret-dw-dr") == 1
        assert _retrying(d1.retrieve, "db-key", reader=reader) == b"k1"
        # a random joint secret: t+1 or more servers' sealed contributions, approved, ordered
        assert _retrying(d1.generate_joint_secret, "dice") == 1
        assert len(set(d1.store_record("dice")["sealed"])) >= 2
        assert len(_retrying(d1.retrieve, "dice", reader=reader)) == 32
    kinds = {(type(r).__name__, r.data_id) for r in approvers.seen}  # type: ignore[attr-defined]
    assert {("WriteRequest", "config"), ("WriteRequest", "db-key"), ("ReadRequest", "db-key")} <= kinds
    assert d1.retrieve("config") == b"v1"
    # denied by the clients at servers 2 and 3: a majority is out of reach, refused at once
    with _Approvers([d2, d3], approve=False), pytest.raises(PstError) as denied:
        _retrying(d1.write, "config", b"v2", 2)
    assert denied.value.code == "refused" and "denied" in denied.value.message
    # a centralized client of the application is one client, where a quorum is needed
    alone = _client(cluster, 1, name="dvault")
    with pytest.raises(PstError) as single:
        alone.retrieve("db-key", reader=reader)
    assert single.value.code == "not-permitted" and "only by a quorum" in single.value.message
    # another application's quorum does not see the data
    o1 = _distributed(cluster, 1, name="dother")
    with pytest.raises(PstError) as other:
        o1.retrieve("db-key", reader=reader)
    assert other.value.code == "not-found"
    # One verdict everywhere: the servers that applied the same operations hold the same state
    # (a quorum of them at least; one may lag behind the sequence for a while).
    deadline = time.monotonic() + 20
    while True:
        stores = [_http_status(cluster, i).get("store") or {} for i in (1, 2, 3, 4)]
        latest = max(int(s.get("applied") or 0) for s in stores)
        level = [s.get("digest") for s in stores if s.get("applied") == latest]
        if len(level) >= 3:
            assert len(set(level)) == 1, stores
            break
        assert time.monotonic() < deadline, stores
        time.sleep(0.3)


def test_pst_store_command_line(cluster: Path, tmp_path: Path) -> None:
    """`pst store put` from standard input; `pst store get` of a secret prints nothing unless
    asked (--out FILE or --show-secret); with --out the value lands in a 0600 file."""
    where = ["--dir", str(cluster), "--node", "2", "--app", APP, "--unique-id", "cli"]
    key = tmp_path / "owner.key"

    def pst_store(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        argv = [sys.executable, "-m", "appliance.cli", "store", *args]
        return subprocess.run(argv, input=stdin, capture_output=True, timeout=60, check=False)

    put = pst_store(
        "put", *where, "cli-secret", "--type", "secret-single", "--key", str(key), stdin=b"s3cret"
    )
    assert put.returncode == 0, put.stdout + put.stderr
    assert b"stored vault/cli-secret version 1 (secret-single)" in put.stdout
    assert key.stat().st_mode & 0o777 == 0o600
    out = tmp_path / "value"
    get = pst_store("get", *where, "cli-secret", "--key", str(key), "--out", str(out))
    assert get.returncode == 0 and get.stdout == b"", get
    assert out.read_bytes() == b"s3cret" and out.stat().st_mode & 0o777 == 0o600
    with _client(cluster, 2, unique_id="cli") as c:
        assert c.store_kind("cli-secret") is True


def test_many_writes_in_one_request_and_a_killed_server_loses_none_it_acknowledged(cluster: Path) -> None:
    """``store_batch`` (the client's ``store_many``): many writes ordered together, each answered;
    then server 2 is killed with SIGKILL while a client writes batches through it: restarted, it
    has every write it acknowledged (its journal, the store's sequence, and its snapshot), and
    its store digest is the others' again."""
    owner = nacl.public.PrivateKey.generate()
    a = _client(cluster, 1, unique_id="batch")
    assert _retrying(a.store_many, [(f"p{k}", b"v%d" % k) for k in range(100)]) == [1] * 100
    sealed = [(f"s{k}", b"s%d" % k) for k in range(20)]
    assert _retrying(a.store_many, sealed, "secret-single", reader=owner) == [1] * 20
    again = _retrying(a.store_many, [("p0", b"x"), ("p100", b"new")])
    assert isinstance(again[0], PstError) and again[0].code == "exists" and again[1] == 1
    b = _client(cluster, 3, unique_id="batch")
    deadline = time.monotonic() + 15
    while True:  # server 3 may not have applied server 1's batch yet (not-found for a moment)
        try:
            assert _retrying(b.retrieve, "s7", reader=owner) == b"s7"
            break
        except PstError as exc:
            if exc.code != "not-found" or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert b.retrieve("p99") == b"v99"

    node = cluster / "node-2"
    c = _client(cluster, 2, unique_id="crash")
    acked: list[str] = []
    failed: list[BaseException] = []

    def writer() -> None:
        k = 0
        while True:
            try:
                results = c.store_many([(f"c{k + j}", b"c%d" % (k + j)) for j in range(25)])
            except PstError as exc:  # the server is gone (or not ready yet: then try again)
                if exc.code == "unavailable":
                    time.sleep(0.2)
                    continue
                failed.append(exc)
                return
            acked.extend(f"c{k + j}" for j, r in enumerate(results) if r == 1)
            k += 25

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while len(acked) < 100:
        assert time.monotonic() < deadline and thread.is_alive(), f"{len(acked)} writes acknowledged"
        time.sleep(0.05)
    pid = int((node / "server.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    thread.join(30)
    assert failed and not thread.is_alive()
    count = len(acked)
    start(node)
    d = _client(cluster, 2, unique_id="crash")
    for name in acked:
        assert _retrying(d.retrieve, name) == b"c" + name[1:].encode()
    deadline = time.monotonic() + 60
    while True:  # server 2 catches up with what the others decided after its end
        with contextlib.suppress(OSError):
            stores = [_http_status(cluster, i).get("store") or {} for i in (1, 2, 3, 4)]
            if len({s.get("digest") for s in stores}) == 1:
                break
        assert time.monotonic() < deadline, "server 2's store digest is not the others'"
        time.sleep(0.5)
    assert count >= 100


@pytest.mark.skipif(
    os.environ.get("PST_STORE_WIPE") != "1",
    reason="PST_STORE_WIPE=1: a restarted server often rejoins only after a refresh or two (10-60 s here)",
)
def test_a_wiped_servers_store_is_restored_from_its_peers(cluster: Path) -> None:
    """Server 2 loses its whole copy of the store (operations, replica state, saved state). At
    restart its replica catches up from the others (decided slots under their commit QCs, or the
    state t+1 servers report identically), it applies the operations again, and its store digest
    is then the others'; it serves the data again, and its rebuilt copy is verified by the
    digests t+1 servers signed at the period marks."""
    owner = nacl.public.PrivateKey.generate()
    a = _client(cluster, 1, unique_id="wipe")
    _retrying(a.store_data, "before-wipe", b"still here")
    _retrying(a.store_data, "sealed-before-wipe", b"and this", "secret-single", reader=owner)
    node = cluster / "node-2"
    pid = int((node / "server.pid").read_text())
    os.kill(pid, signal.SIGKILL)  # a crash (its key-holder follows: parent-death signal)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _running(pid):
        time.sleep(0.1)
    shutil.rmtree(node / "state" / "serve" / "store")
    start(node)
    deadline = time.monotonic() + 90  # it catches up once its channels are authenticated again
    while True:
        with contextlib.suppress(OSError):  # (server 2's status page is not up yet)
            stores = [_http_status(cluster, i).get("store") or {} for i in (1, 2, 3, 4)]
            if len({s.get("digest") for s in stores}) == 1 and stores[1].get("items"):
                break
        assert time.monotonic() < deadline, "server 2's store was not restored from its peers"
        time.sleep(0.3)
    b = _client(cluster, 2, unique_id="wipe")
    assert b.retrieve("before-wipe") == b"still here"
    assert _retrying(b.retrieve, "sealed-before-wipe", reader=owner) == b"and this"
    # What it rebuilt was checked against the digests t+1 servers signed at the period marks
    # it applied again (docs/store.md "Signed digests"): verified, not damaged.
    deadline = time.monotonic() + 30
    while not int(stores[1].get("verified") or 0):
        assert time.monotonic() < deadline, stores[1]
        time.sleep(0.3)
        stores[1] = _http_status(cluster, 2).get("store") or {}
    assert stores[1].get("damaged") is False

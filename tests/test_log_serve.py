"""The log inside `pst serve` (issue 11): the [log] config, the LogService, the API's log
operations, and a real 4-server cluster fed by util-linux `logger`, rsyslog's omrelp, a raw
RELP client and `pst log append`, read back with `pst log show` and `pst log tail`."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import select
import shutil
import signal
import socket
import ssl
import subprocess
import time
import tomllib
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio
from clusterutil import PST, RELP_PORT_OFFSET, SYSLOG_PORT_OFFSET, init_cluster, pst
from logutil import RELP_OPEN, relp_frame, rsyslog_config, self_signed
from test_web import write_config

from appliance.api import ApiCore, LogAdapter, PeerCred
from appliance.api._core import Limits as ApiLimits
from appliance.apps.log import index as index_module
from appliance.apps.log.index import LogIndex
from appliance.apps.log.ingest import Batcher, Limits, LocalSink, SinkError
from appliance.apps.log.service import Listener, LogService
from appliance.apps.log.syslog import Entry
from appliance.apps.log.tiles import STATE_PATH, PosixStorage
from appliance.host import config as node_config
from appliance.node.run import bind_log, open_log
from appliance.protocols.state import ConfigError

ORIGIN = "log.example/serve"
LOGGER = shutil.which("logger")
RSYSLOGD = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"


# --- The [log] section ----------------------------------------------------------------------------


def _config(tmp_path: Path, log: str) -> Path:
    """A one-server config (test_web's, genesis 0) with ``log`` as its [log] section."""
    return write_config(tmp_path, log)


def test_without_a_log_section_there_is_no_log(tmp_path: Path) -> None:
    assert node_config.load(_config(tmp_path, "")).log is None


def test_log_section_defaults(tmp_path: Path) -> None:
    config = node_config.load(_config(tmp_path, "[log]"))
    assert config.log is not None
    assert config.log.directory == tmp_path / "state" / "log"
    assert config.log.origin == "pst-0.invalid/log" == node_config.default_log_origin(config.constants)
    assert config.log.listen == {} and config.log.limits == {} and config.log.batching == {}
    assert config.log.cert is None and config.log.audit_interval == 600.0


def test_log_section_with_every_key(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    config = node_config.load(
        _config(
            tmp_path,
            f"""[log]
origin = "log.example.org/pst"
dir = "logs"
udp = "0.0.0.0:514"
tcp = "0.0.0.0:514"
relp = "[::1]:2514"
tls = "127.0.0.1:6514"
relp_tls = "127.0.0.1:2515"
cert = "{cert}"
key = "{key}"
max_message_size = 8192
max_connections = 10
messages_per_second = 5000
bytes_per_second = 1e6
relp_window = 4096
batch_entries = 100
batch_delay_ms = 2.5
audit_interval = 60
""",
        )
    )
    log = config.log
    assert log is not None and log.origin == "log.example.org/pst" and log.directory == tmp_path / "logs"
    assert log.listen == {
        "udp": ("0.0.0.0", 514),
        "tcp": ("0.0.0.0", 514),
        "relp": ("::1", 2514),
        "tls": ("127.0.0.1", 6514),
        "relp_tls": ("127.0.0.1", 2515),
    }
    assert log.limits == {
        "max_message_size": 8192,
        "max_connections": 10,
        "messages_per_second": 5000,
        "bytes_per_second": 1e6,
        "relp_window": 4096,
    }
    assert log.batching == {"batch_entries": 100, "batch_delay": 0.0025}
    assert log.audit_interval == 60.0
    Limits(**log.limits)  # the names are the ingest's
    node_config.check_log_tls(config)


@pytest.mark.parametrize(
    ("section", "error"),
    [
        ('port = "1"', "log.port is not a known key (known: audit_interval, batch_delay_ms, "),
        ('udp = "514"', "log.udp must be \"host:port\", got '514'"),
        ('tcp = "127.0.0.1:99999"', "log.tcp has an invalid port '99999'"),
        ('tls = "127.0.0.1:6514"', "log.tls needs log.cert and log.key (its TLS certificate)"),
        ('relp_tls = "127.0.0.1:6514"', "log.relp_tls needs log.cert and log.key"),
        ('cert = "CERT"', "log.cert and log.key go together: give both or neither"),
        ('key = "/nonexistent.pem"', "log.key: no such file /nonexistent.pem"),
        ('tcp = "127.0.0.1:514"\nrelp = "127.0.0.1:514"', "log.tcp and log.relp are the same TCP address"),
        ('origin = "a b"', "log.origin must be a name without spaces"),
        ('origin = "x+y"', "log.origin must be a name without spaces"),
        ("origin = 3", "log.origin must be a name"),
        ("dir = 3", "log.dir must be a directory path, got 3"),
        ("max_message_size = 100000", "log.max_message_size must be an integer in 480..64512, got 100000"),
        ("max_connections = 1.5", "log.max_connections must be an integer in 1..1000000, got 1.5"),
        ("messages_per_second = true", "log.messages_per_second must be a number"),
        ("batch_delay_ms = -1", "log.batch_delay_ms must be a number in 0..10000, got -1"),
        ("audit_interval = 0.5", "log.audit_interval must be a number in 1..604800, got 0.5"),
        ("[log.x]", "log.x is not a known key"),
    ],
)
def test_log_section_errors_name_the_key(tmp_path: Path, section: str, error: str) -> None:
    cert, _ = self_signed(tmp_path)
    path = _config(tmp_path, "[log]\n" + section.replace("CERT", str(cert)))
    with pytest.raises(ConfigError) as caught:
        node_config.load(path)
    assert str(caught.value).startswith(f"{path}: ") and error in str(caught.value)


def test_a_bad_syslog_certificate_is_refused_at_start(tmp_path: Path) -> None:
    cert, _ = self_signed(tmp_path)
    _, other_key = self_signed(tmp_path, stem="other")
    path = _config(tmp_path, f'[log]\ntls = "127.0.0.1:6514"\ncert = "{cert}"\nkey = "{other_key}"')
    with pytest.raises(ConfigError, match=r"log.cert / log.key: cannot load .* with .*other"):
        node_config.check_log_tls(node_config.load(path))


def test_a_port_that_cannot_be_bound_is_named(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = _config(tmp_path, f'[log]\nudp = "127.0.0.1:{port}"\ntcp = "127.0.0.1:{port}"')
        with pytest.raises(ConfigError, match=rf"log.tcp = '127.0.0.1:{port}': cannot bind: Address already"):
            bind_log(node_config.load(path))


# --- The service and the API's log operations (in process) ------------------------------------------

PEER = PeerCred(pid=4242, uid=1000, gid=1000)


class NoBackend:
    """The API's node backend, unused by the log operations."""

    async def sign(self, app: str, message: bytes) -> bytes:
        raise AssertionError

    sign_digest = sign

    async def get_time(self) -> Any:
        raise AssertionError

    async def status(self) -> Any:
        raise AssertionError

    async def random(self, nonce: bytes) -> Any:
        raise AssertionError


async def _call(core: ApiCore, op: str, **fields: Any) -> dict[str, Any]:
    return await core.handle({"v": 1, "id": 1, "op": op, **fields}, PEER)


@contextlib.asynccontextmanager
async def _service(directory: Path, **kwargs: Any) -> Any:
    service = LogService.open(directory, ORIGIN, **kwargs)
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        yield service
        await service.stop()
        nursery.cancel_scope.cancel()


async def test_log_append_through_the_api_is_durable_with_its_index(tmp_path: Path) -> None:
    async with _service(tmp_path / "log") as service:
        core = ApiCore(NoBackend(), log_backend=LogAdapter(service))  # type: ignore[arg-type]
        handle = (await _call(core, "register", name="my-app", unique_id=b"x"))["result"]["handle"]
        first = await _call(core, "log_append", handle=handle, messages=[b"<13>1 - h my-app - - - one"])
        assert first["result"] == {"indices": [0], "size": 1}
        more = await _call(core, "log_append", handle=handle, messages=[b"two", b"three"])
        assert more["result"] == {"indices": [1, 2], "size": 3}
        assert (await _call(core, "log_size"))["result"] == {"size": 3, "origin": ORIGIN, "verifier": None}
        read = (await _call(core, "log_entries", start=1, count=256))["result"]
        assert read["start"] == 1 and read["size"] == 3
        entries = [Entry.decode(e) for e in read["entries"]]
        assert [e.raw for e in entries] == [b"two", b"three"]
        assert {(e.transport, e.peer) for e in entries} == {("api", "uid 1000 app my-app")}
        assert entries[0].error is not None  # not syslog: kept, flagged
        assert (await _call(core, "log_entries", start=3, count=5))["result"]["entries"] == []
        # bounds and quotas
        errors = {
            "too many": await _call(core, "log_append", handle=handle, messages=[b"x"] * 65),
            "none": await _call(core, "log_append", handle=handle, messages=[]),
            "not bytes": await _call(core, "log_append", handle=handle, messages=["text"]),
            "too large": await _call(core, "log_append", handle=handle, messages=[b"x" * 65537]),
            "count": await _call(core, "log_entries", start=0, count=257),
            "start": await _call(core, "log_entries", start=-1, count=1),
            "handle": await _call(core, "log_append", handle=b"h" * 32, messages=[b"x"]),
        }
        codes = {k: v["error"]["code"] for k, v in errors.items()}
        assert codes == {
            "too many": "bad-request",
            "none": "bad-request",
            "not bytes": "bad-request",
            "too large": "too-large",
            "count": "bad-request",
            "start": "bad-request",
            "handle": "unknown-handle",
        }
        one_over = await _call(core, "log_append", handle=handle, messages=[b"x" * 64_513])
        assert one_over["error"]["code"] == "too-large" and "over 64512" in one_over["error"]["message"]
    # durable: a reopened store has the three entries
    assert LocalSink(tmp_path / "log", ORIGIN).size == 3


class InterleavingSink:
    """A sink that, like a replicated log, puts other entries between those of one batch."""

    def __init__(self) -> None:
        self.size = 0
        self.short = False

    async def append(self, entries: Sequence[bytes]) -> Sequence[int]:
        indices = [self.size + 2 * k for k in range(len(entries))]  # every other slot is someone else's
        self.size += 2 * len(entries)
        return indices[:-1] if self.short else indices


async def test_appends_get_the_indices_the_sink_gives() -> None:
    sink = InterleavingSink()
    batcher = Batcher(sink, batch_delay=0.05)
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        got: dict[str, list[int]] = {}

        async def append(name: str, count: int) -> None:
            got[name] = await batcher.append([name.encode()] * count)

        async with trio.open_nursery() as appends:  # both land in one batch
            appends.start_soon(append, "a", 2)
            appends.start_soon(append, "b", 3)
        assert sorted(got["a"] + got["b"]) == [0, 2, 4, 6, 8]
        assert got["a"] in ([0, 2], [6, 8])
        sink.short = True  # a sink that answers fewer indices than entries fails the batch
        with pytest.raises(SinkError, match="the sink gave 0 indices for 1 entries"):
            await batcher.append([b"c"])
        nursery.cancel_scope.cancel()


async def test_log_append_quota_per_registration(tmp_path: Path) -> None:
    async with _service(tmp_path / "log") as service:
        limits = ApiLimits(log_rate=1.0, log_burst=10.0)
        core = ApiCore(NoBackend(), limits=limits, log_backend=LogAdapter(service))  # type: ignore[arg-type]
        handle = (await _call(core, "register", name="chatty", unique_id=b"x"))["result"]["handle"]
        assert (await _call(core, "log_append", handle=handle, messages=[b"m"] * 10))["ok"]
        over = await _call(core, "log_append", handle=handle, messages=[b"m"])
        assert over["error"]["code"] == "quota" and over["error"]["retry_after_ms"] > 0
        assert "log rate limit of 'chatty' exceeded (at most 1 entries per second" in over["error"]["message"]
        assert service.size == 10


async def test_log_audit_is_for_the_operator_and_needs_a_replicated_log(tmp_path: Path) -> None:
    """``log_audit`` (``pst log audit``): refused to an application's uid; a log that is not
    replicated (a local store) has no checkpoints to audit against, and says so."""
    async with _service(tmp_path / "log") as service:
        core = ApiCore(NoBackend(), log_backend=LogAdapter(service))  # type: ignore[arg-type]
        answer = await _call(core, "log_audit")
        assert answer["error"]["code"] == "not-permitted", answer
        core = ApiCore(NoBackend(), log_backend=LogAdapter(service), operators=frozenset({PEER.uid}))  # type: ignore[arg-type]
        answer = await _call(core, "log_audit")
        assert answer["error"] == {
            "code": "unavailable",
            "message": "cannot audit the log now: this server's log is not replicated: "
            "it has no checkpoints to audit against",
        }


async def test_without_a_log_or_with_a_broken_one_the_api_says_why(tmp_path: Path) -> None:
    core = ApiCore(NoBackend())  # type: ignore[arg-type]
    answer = await _call(core, "log_size")
    assert answer["error"] == {
        "code": "unavailable",
        "message": "this server runs no log (no [log] section in its config)",
    }
    directory = tmp_path / "log"
    async with _service(directory) as service:
        await service.log_append("test", [b"a"])
    (directory / STATE_PATH).write_text("not a tree head\n")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        listener = Listener("tcp", "127.0.0.1", sock.getsockname()[1], sock)
        async with _service(directory, listeners=[listener]) as broken:
            assert not broken.available and broken.listening == {}
            assert sock.fileno() == -1  # closed: senders are refused, nothing is taken and lost
            core = ApiCore(NoBackend(), log_backend=LogAdapter(broken))  # type: ignore[arg-type]
            message = (await _call(core, "log_size"))["error"]["message"]
            assert message.startswith(f"cannot read the log now: the log in {directory} cannot be opened: ")
            status = broken.status()
            assert status["state"] == "unavailable" and str(directory) in status["error"]


async def test_stopping_appends_what_was_read_and_sends_relp_serverclose(tmp_path: Path) -> None:
    listeners = []
    for transport in ("tcp", "relp"):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        listeners.append(Listener(transport, "127.0.0.1", sock.getsockname()[1], sock))
    # A long batch delay: the entries are still queued when the stop comes.
    service = LogService.open(tmp_path / "log", ORIGIN, listeners=listeners, batching={"batch_delay": 30.0})
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        assert set(service.listening) == {"tcp", "relp"}
        tcp = await trio.open_tcp_stream("127.0.0.1", listeners[0].port)
        await tcp.send_all(b"<13>1 - h app - - - over tcp\n")
        relp = await trio.open_tcp_stream("127.0.0.1", listeners[1].port)
        await relp.send_all(RELP_OPEN + relp_frame(2, "syslog", b"<13>1 - h app - - - over relp"))
        with trio.fail_after(5):
            while service.batcher is None or service.batcher.queued < 2:
                await trio.sleep(0.01)
        with trio.fail_after(5):
            await service.stop()
        received = b""
        with trio.fail_after(5):
            while chunk := await relp.receive_some(4096):
                received += chunk
        assert received.endswith(b"2 rsp 6 200 OK\n0 serverclose 0\n"), received
        with trio.fail_after(5):
            assert await tcp.receive_some(10) == b""  # closed by the server
        assert service.size == 2 and service.status()["state"] == "stopping"
        nursery.cancel_scope.cancel()
    sink = LocalSink(tmp_path / "log", ORIGIN)
    assert sorted(Entry.decode(e).transport for e in sink.log.read_entries(0, 2)) == ["relp", "tcp"]


async def test_the_log_figures_in_the_status_document_and_metrics(tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from appliance.web._metrics import Metrics
    from appliance.web._view import API_NAME, LocalView, Sources, clean_peer_document

    config = node_config.load(_config(tmp_path, ""))
    async with _service(tmp_path / "log") as service:
        await service.log_append("uid 0 app t", [b"<13>1 - h t - - - x", b"y"])
        sources = Sources(
            server_id=1,
            constants=config.constants,
            status_file=tmp_path / "status.json",
            alerts_file=tmp_path / "alerts.jsonl",
            log_status=service.status,
        )
        local = LocalView(sources)
        document = local.document()
        log = document["log"]
        assert (log["state"], log["origin"], log["size"], log["api_appended"]) == ("running", ORIGIN, 2, 2)
        assert log["ingest"]["unparsed"] == 0 and log["listening"] == {}
        families = {
            f.name: f for f in text_string_to_metric_families(Metrics(sources, local, None).render().decode())
        }
        assert families["pst_log_size"].samples[0].value == 2.0
        assert families["pst_log_entries"].samples[0].value == 2.0  # pst_log_entries_total
        assert families["pst_log_up"].samples[0].value == 1.0
    # A peer's document: only known fields of known types are passed on.
    peer = {
        "api": API_NAME,
        "server": 2,
        "now": 1.0,
        "log": {"size": "9", "state": "evil", "x": 1, "ingest": []},
    }
    cleaned = clean_peer_document(peer)["log"]
    assert cleaned["size"] is None and cleaned["state"] is None and "x" not in cleaned
    assert clean_peer_document({"api": API_NAME, "server": 2, "now": 1.0})["log"] is None
    # Without a log: no log figures at all.
    quiet = Sources(
        server_id=1, constants=config.constants, status_file=tmp_path / "s", alerts_file=tmp_path / "a"
    )
    assert LocalView(quiet).document()["log"] is None
    assert "pst_log" not in Metrics(quiet, LocalView(quiet), None).render().decode()


async def test_pst_serves_log_from_its_config_over_tls(tmp_path: Path) -> None:
    """What pst serve does with a [log] section (bind_log, then open_log), with TLS and RELP over TLS."""
    cert, key = self_signed(tmp_path)
    with socket.socket() as one, socket.socket() as two:  # two free ports (0 is no port for a config)
        one.bind(("127.0.0.1", 0))
        two.bind(("127.0.0.1", 0))
        free = one.getsockname()[1], two.getsockname()[1]
    path = _config(
        tmp_path,
        f'[log]\norigin = "{ORIGIN}"\ntls = "127.0.0.1:{free[0]}"\nrelp_tls = "127.0.0.1:{free[1]}"\n'
        f'cert = "{cert}"\nkey = "{key}"\nbatch_delay_ms = 1',
    )
    config = node_config.load(path)
    service = open_log(config, bind_log(config))
    client = ssl.create_default_context(cafile=str(cert))
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        ports = {t: int(a.rsplit(":", 1)[1]) for t, a in service.listening.items()}
        tls = await trio.open_ssl_over_tcp_stream("127.0.0.1", ports["tls"], ssl_context=client)
        await tls.send_all(b"<13>1 - h tls-app - - - over tls\n")
        relp = await trio.open_ssl_over_tcp_stream("127.0.0.1", ports["relp_tls"], ssl_context=client)
        await relp.send_all(RELP_OPEN + relp_frame(2, "syslog", b"<13>1 - h relp-app - - - over relp-tls"))
        answers = b""
        with trio.fail_after(10):
            while b"2 rsp 6 200 OK" not in answers:
                answers += await relp.receive_some(4096)
            while service.size < 2:
                await trio.sleep(0.01)
        await service.stop()
        nursery.cancel_scope.cancel()
    entries = [Entry.decode(e) for e in LocalSink(tmp_path / "state" / "log", ORIGIN).log.read_entries(0, 2)]
    assert sorted(e.transport for e in entries) == ["relp-tls", "tls"]


# --- A cluster of real servers ---------------------------------------------------------------------------


def _ports(root: Path, node: int) -> dict[str, int]:
    log = tomllib.loads((root / f"node-{node}" / "config.toml").read_text())["log"]
    return {t: int(log[t].rsplit(":", 1)[1]) for t in ("udp", "tcp", "relp")}


def _wait(condition: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _show(root: Path, *args: str) -> list[dict[str, Any]]:
    out = pst("log", "show", "--dir", str(root), "--node", "1", "--json", *args)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def _logger(port: int, *args: str) -> None:
    assert LOGGER is not None
    subprocess.run([LOGGER, "-n", "127.0.0.1", "-P", str(port), *args], check=True, timeout=10)


def _pid(root: Path, node: int) -> int:
    return int((root / f"node-{node}" / "server.pid").read_text())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@contextlib.contextmanager
def _rsyslogd(directory: Path, relp_port: int, lines: list[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    directory.mkdir()
    source = directory / "input.log"
    source.write_bytes(b"".join(line + b"\n" for line in lines))
    config = rsyslog_config(
        directory, source, [f'action(type="omrelp" target="127.0.0.1" port="{relp_port}")']
    )
    with (directory / "rsyslogd.out").open("wb") as out:
        process = subprocess.Popen(
            [RSYSLOGD, "-n", "-f", str(config), "-i", str(directory / "rsyslogd.pid")], stdout=out, stderr=out
        )
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.skipif(LOGGER is None, reason="util-linux logger is needed")
def test_a_cluster_logs_what_logger_rsyslog_and_the_api_send(tmp_path: Path) -> None:
    root = tmp_path / "c"
    init_cluster(root, n=4, period=600, round_ms=80, log="key")
    text = (root / "node-1" / "config.toml").read_text()
    assert "\n[log]\norigin = " in text and "\ndir = " not in text  # the default directory: state/log
    ports = _ports(root, 1)
    base = ports["udp"] - SYSLOG_PORT_OFFSET - 1
    assert ports == {
        "udp": base + SYSLOG_PORT_OFFSET + 1,
        "tcp": ports["udp"],
        "relp": base + RELP_PORT_OFFSET + 1,
    }
    up = pst("cluster", "up", "--dir", str(root), "--detach")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        server_log = (root / "node-1" / "server.log").read_text()
        for transport in ("udp", "tcp", "relp"):
            assert f"syslog {transport} listening on 127.0.0.1:{ports[transport]}" in server_log
        started = time.time()

        # util-linux logger, RFC 5424 over UDP and over TCP (octet-counted)
        _logger(ports["udp"], "-d", "--rfc5424", "-t", "udp-app", "hello over udp")
        _logger(ports["tcp"], "-T", "--octet-count", "--rfc5424", "-t", "tcp-app", "hello over tcp")
        # garbage on the syslog TCP port, left open, does not stop the next sender
        with socket.create_connection(("127.0.0.1", ports["tcp"])) as garbage:
            garbage.sendall(b"999999999999 \x00\xff not syslog at all\n")
            _logger(ports["tcp"], "-T", "--rfc5424", "-t", "tcp-app", "after the garbage")
            _wait(lambda: len(_show(root, "--since", "10m", "--app", "tcp-app")) == 2, "the second tcp line")
        # the API, through pst log append
        appended = pst("log", "append", "--dir", str(root), "--node", "1", "--app", "api-app", "from the api")
        assert appended.returncode == 0, appended.stderr
        index = int(appended.stdout.split()[2])
        # a raw RELP session
        with socket.create_connection(("127.0.0.1", ports["relp"]), timeout=10) as relp:
            relp.sendall(RELP_OPEN + relp_frame(2, "syslog", b"<13>1 - relphost relp-app - - - over relp"))
            answers = b""
            while b"2 rsp" not in answers:
                answers += relp.recv(4096)
            assert b"2 rsp 6 200 OK\n" in answers

        entries = _show(root, "--since", str(started - 1))
        by_app = {e["app"]: e for e in entries}
        assert {"udp-app", "tcp-app", "api-app", "relp-app"} <= set(by_app)
        assert (by_app["udp-app"]["transport"], by_app["udp-app"]["message"]) == ("udp", "hello over udp")
        assert by_app["tcp-app"]["transport"] == "tcp"
        assert by_app["api-app"]["index"] == index and by_app["api-app"]["transport"] == "api"
        assert by_app["api-app"]["peer"] == f"uid {os.getuid()} app api-app"
        assert by_app["api-app"]["host"] == socket.gethostname()
        assert by_app["relp-app"]["host"] == "relphost"
        assert any(e["error"] for e in entries)  # the garbage, kept and flagged
        assert [e["message"] for e in _show(root, "--since", "10m", "--host", "relphost")] == ["over relp"]
        assert _show(root, "--since", "1m", "--app", "nobody") == []

        if shutil.which(RSYSLOGD) or os.path.exists(RSYSLOGD):  # rsyslog's omrelp, acknowledged once durable
            lines = [b"rsyslog line %d" % i for i in range(50)]
            with _rsyslogd(tmp_path / "rsyslog", ports["relp"], lines):
                _wait(
                    lambda: len(_show(root, "--since", "10m", "--app", "pst-test")) == 50, "rsyslog's lines"
                )
            got = [
                e["message"].removesuffix("\n") for e in _show(root, "--since", "10m", "--app", "pst-test")
            ]
            assert got == [line.decode() for line in lines]

        tail = pst("log", "tail", "--dir", str(root), "--node", "1", "-n", "2")
        assert tail.returncode == 0 and len(tail.stdout.splitlines()) == 2, tail.stderr
        size = int(tail.stdout.splitlines()[-1].split()[0]) + 1

        # the status document, /metrics
        metrics = _http(root, "/metrics").decode()
        assert f"pst_log_size {float(size)}" in metrics and "pst_log_received_total" in metrics
        assert "pst_log_slot " in metrics and "pst_log_store_damaged 0.0" in metrics
        document = json.loads(_http(root, "/v1/status"))
        assert document["log"]["size"] == size and document["log"]["ingest"]["framing_errors"] >= 1
        assert document["log"]["listening"] == {t: f"127.0.0.1:{p}" for t, p in ports.items()}

        # SIGTERM: a clean stop; a restart keeps every entry and takes new ones
        pid = _pid(root, 1)
        os.kill(pid, signal.SIGTERM)
        _wait(lambda: not _alive(pid), "server 1 to stop")
        stopped = (root / "node-1" / "server.log").read_text()
        assert f"log: stopped with {size} entries" in stopped
        again = pst("cluster", "up", "--dir", str(root), "--detach")
        assert again.returncode == 0, again.stdout + again.stderr
        assert len(_show(root, "--since", str(started - 1))) == size
        _logger(ports["udp"], "-d", "--rfc5424", "-t", "udp-app", "after the restart")
        _wait(lambda: len(_show(root, "--since", "10m", "--app", "udp-app")) == 2, "a line after the restart")
        follow = subprocess.Popen(
            [*PST, "log", "tail", "--dir", str(root), "--node", "1", "-n", "0", "-f"],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            time.sleep(1.0)
            _logger(ports["tcp"], "-T", "--rfc5424", "-t", "follow-app", "followed")
            assert follow.stdout is not None
            assert select.select([follow.stdout], [], [], 10)[0], "pst log tail -f printed nothing"
            assert "follow-app  followed" in follow.stdout.readline()
        finally:
            follow.terminate()
            follow.wait(timeout=10)
        # Replication: every server holds the same log, and a checkpoint signed by the log's key
        # covers it on each of them (pst log verify checks one server's copy, tile by tile).
        total = len(_show(root, "--since", str(started - 1)))
        for i in (2, 3, 4):
            _wait(lambda i=i: _checkpoint_size(root, i) == total, f"server {i}'s checkpoint of {total}")
        vkey = json.loads(_http(root, "/v1/status"))["log"]["verifier"]
        url = "http://" + tomllib.loads((root / "node-3" / "config.toml").read_text())["http"]["listen"]
        audit = pst("log", "verify", "--key", vkey, "--url", url, "--audit")
        assert audit.returncode == 0, audit.stdout + audit.stderr
    finally:
        pst("cluster", "down", "--dir", str(root))


def _checkpoint_size(root: Path, i: int) -> int:
    note = root / f"node-{i}" / "state" / "log" / "checkpoint"
    return int(note.read_text().splitlines()[1]) if note.exists() else -1


def _http(root: Path, path: str) -> bytes:
    import urllib.request

    url = tomllib.loads((root / "node-1" / "config.toml").read_text())["http"]["listen"]
    with urllib.request.urlopen(f"http://{url}{path}", timeout=10) as answer:
        data: bytes = answer.read()
    return data


def test_pst_serve_refuses_a_log_port_it_cannot_bind(tmp_path: Path) -> None:
    root = tmp_path / "c"
    init_cluster(root, n=4, period=600, round_ms=80, log="key")
    port = _ports(root, 1)["tcp"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        out = subprocess.run(
            [*PST, "serve", "--config", str(root / "node-1" / "config.toml")],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert out.returncode == 2
    assert f"log.tcp = '127.0.0.1:{port}': cannot bind: Address already in use" in out.stderr


def test_a_bundle_edited_on_one_servers_disk_is_repaired_from_the_others(tmp_path: Path) -> None:
    """Issue 11 §3 "Tamper": server 3's audit (every 2 s here) finds an entry bundle edited on its
    disk, raises log-store-damaged, fetches the bundle from a peer over the servers' channels, and
    its copy is byte for byte server 1's again; `pst log verify --audit` against it passes."""
    root = tmp_path / "c"
    init_cluster(root, n=4, period=600, round_ms=80, log="key")
    config = root / "node-3" / "config.toml"
    config.write_text(config.read_text().replace("\n[log]\n", "\n[log]\naudit_interval = 2\n", 1))
    up = pst("cluster", "up", "--dir", str(root), "--detach")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        for k in range(3):
            out = pst("log", "append", "--dir", str(root), "--node", "1", "--app", "tamper", f"line {k}")
            assert out.returncode == 0, out.stderr
        _wait(lambda: _checkpoint_size(root, 3) == 3, "server 3's checkpoint of 3 entries")
        logs = {i: root / f"node-{i}" / "state" / "log" for i in (1, 3)}
        bundle = "tile/entries/000.p/3"
        good = (logs[1] / bundle).read_bytes()
        assert (logs[3] / bundle).read_bytes() == good
        assert good.count(b"line 1") == 1
        (logs[3] / bundle).write_bytes(good.replace(b"line 1", b"line X"))

        def alerts() -> list[dict[str, Any]]:  # the key-holder's file, then pst serve's own
            files = [root / "node-3" / "state" / d / "alerts.jsonl" for d in ("public", "serve")]
            return [json.loads(line) for f in files if f.exists() for line in f.read_text().splitlines()]

        _wait(lambda: any(a["kind"] == "log-store-damaged" for a in alerts()), "server 3's alert", 30)
        _wait(lambda: (logs[3] / bundle).read_bytes() == good, "the repaired bundle", 30)
        damaged = [a for a in alerts() if a["kind"] == "log-store-damaged"]
        assert damaged[0]["server"] == 3 and bundle in damaged[0]["detail"], damaged
        repaired = f"log: repaired this server's copy of the log: 1 entry bundle(s) ({bundle}) from server"
        _wait(lambda: repaired in (root / "node-3" / "server.log").read_text(), "the repair's log line", 30)
        vkey = json.loads(_http(root, "/v1/status"))["log"]["verifier"]
        url = "http://" + tomllib.loads(config.read_text())["http"]["listen"]
        audit = pst("log", "verify", "--key", vkey, "--url", url, "--audit")
        assert audit.returncode == 0, audit.stdout + audit.stderr
        with urllib.request.urlopen(f"{url}/v1/status", timeout=10) as answer:
            status = json.loads(answer.read())["log"]["replication"]
        assert status["damaged"] is None and status["repairs"] == 1
        assert status["lag_seconds"] == 0.0  # caught up: no peer is ahead
        # `pst log audit`: the operator asks server 2 (no periodic audit soon) to audit now; a
        # bundle edited on its disk is repaired before the command returns.
        out = pst("log", "audit", "--dir", str(root), "--node", "2")
        assert out.returncode == 0 and "OK: this server's copy of the log passed its audit" in out.stdout, out
        node2 = root / "node-2" / "state" / "log" / bundle
        node2.write_bytes(good.replace(b"line 2", b"line Y"))
        out = pst("log", "audit", "--dir", str(root), "--node", "2")
        assert out.returncode == 0 and "repairs so far: 1" in out.stdout, out.stdout + out.stderr
        assert node2.read_bytes() == good
        # Its state record and its checkpoint file, edited: named in an alert and put back.
        for name in ("state/tree", "checkpoint"):
            path = root / "node-2" / "state" / "log" / name
            before = path.read_bytes()
            path.write_bytes(before.replace(b"\n3\n", b"\n2\n", 1))
            out = pst("log", "audit", "--dir", str(root), "--node", "2")
            assert out.returncode == 0, out.stdout + out.stderr
            assert path.read_bytes() == before, name
            said = [json.loads(a) for a in (root / "node-2" / "state" / "serve" / "alerts.jsonl").open()]
            assert any(
                a["detail"].startswith(f"this server's copy of the log is damaged: {name} ") for a in said
            )
    finally:
        pst("cluster", "down", "--dir", str(root))


def test_a_server_whose_log_cannot_be_opened_rebuilds_it_from_the_others(tmp_path: Path) -> None:
    """Real servers: server 2 is stopped, its `state/tree` made garbage, and started again while
    the others took more entries. It keeps the damaged files, alerts, rebuilds its copy from the
    others, publishes their signed checkpoint, and passes `pst log audit`."""
    root = tmp_path / "c"
    init_cluster(root, n=4, period=600, round_ms=80, log="key")
    port = _ports(root, 1)["tcp"]
    log2 = root / "node-2" / "state" / "log"

    def send(lines: range) -> None:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"".join(b"<13>1 - host app - - - line %d\n" % k for k in lines))

    def checkpoints(*nodes: int) -> set[bytes | None]:
        notes = [root / f"node-{i}" / "state" / "log" / "checkpoint" for i in nodes]
        return {p.read_bytes() if p.exists() else None for p in notes}

    up = pst("cluster", "up", "--dir", str(root), "--detach")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        send(range(300))
        _wait(lambda: all(_checkpoint_size(root, i) == 300 for i in (1, 2, 3, 4)), "checkpoints of 300", 60)
        pid = _pid(root, 2)
        os.kill(pid, signal.SIGTERM)
        _wait(lambda: not _alive(pid), "server 2 to stop")
        (log2 / "state" / "tree").write_bytes(b"garbage")
        send(range(300, 320))
        _wait(lambda: all(_checkpoint_size(root, i) == 320 for i in (1, 3, 4)), "checkpoints of 320", 60)
        again = pst("cluster", "up", "--dir", str(root), "--detach")
        log_tail = (root / "node-2" / "server.log").read_text()[-3000:]
        assert again.returncode == 0, again.stdout + again.stderr + log_tail
        _wait(lambda: len(checkpoints(1, 2)) == 1, "server 2's rebuilt copy and checkpoint", 90)
        said = [json.loads(a) for a in (root / "node-2" / "state" / "serve" / "alerts.jsonl").open()]
        damaged = [a for a in said if a["kind"] == "log-store-damaged"]
        assert len(damaged) == 1 and f"the log in {log2} could not be opened" in damaged[0]["detail"], said
        (kept,) = [p for p in log2.iterdir() if p.name.startswith("damaged-")]
        assert (kept / "state" / "tree").read_bytes() == b"garbage"
        assert (kept / "tile" / "entries" / "001.p" / "44").is_file()
        server_log = (root / "node-2" / "server.log").read_text()
        assert "log: this server's copy of the log was rebuilt from its peers: " in server_log
        assert "log: this server's rebuilt copy of the log (" in server_log  # a checkpoint matched
        out = pst("log", "audit", "--dir", str(root), "--node", "2")
        assert out.returncode == 0 and "OK: this server's copy of the log passed its audit" in out.stdout, out
        send(range(320, 321))
        _wait(lambda: all(_checkpoint_size(root, i) == 321 for i in (1, 2, 3, 4)), "checkpoints of 321", 60)
        # Its search index (made by its web service), audited: no false alarm; then a record
        # forged with a good file digest: alerted and rebuilt by `pst log audit`.
        _wait(lambda: (log2 / "index" / "tail").exists(), "server 2's search index", 60)
        out = pst("log", "audit", "--dir", str(root), "--node", "2")
        assert out.returncode == 0 and "OK: this server's copy of the log passed its audit" in out.stdout, out
        origin = tomllib.loads((root / "node-2" / "config.toml").read_text())["log"]["origin"]
        honest = LogIndex(PosixStorage(log2), origin).records(1)
        forged = [dataclasses.replace(honest[0], keys=b"")]
        (log2 / "index" / "tail").write_bytes(index_module._encode_file(origin, 0, forged))
        out = pst("log", "audit", "--dir", str(root), "--node", "2")
        assert out.returncode == 0, out.stdout + out.stderr
        said = [json.loads(a) for a in (root / "node-2" / "state" / "serve" / "alerts.jsonl").open()]
        assert "the index's record of tile/entries/000 is not the bundle's" in said[-1]["detail"], said
        assert LogIndex(PosixStorage(log2), origin).records(1) == honest
    finally:
        pst("cluster", "down", "--dir", str(root))

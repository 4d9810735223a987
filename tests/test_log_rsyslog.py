"""rsyslog (Debian's rsyslog, rsyslog-relp and rsyslog-gnutls) forwarding to the ingest: omfwd over
TCP in both framings, and omrelp, including a RELP session whose server is killed with SIGKILL and
restarted; omfwd over TLS (the gtls driver) and omrelp over TLS, trusting a CA, and refusing a
server its CA does not certify."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import trio
from logutil import ORIGIN, eventually, root_of, rsyslog_config, running_ingest, stored
from tlsutil import ca_and_server, self_signed

from appliance.apps.log.ingest import LocalSink
from appliance.apps.log.syslog import Entry
from appliance.host.config import server_tls_context

RSYSLOGD = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"
HAVE_OMRELP = any(Path("/usr/lib").glob("*/rsyslog/omrelp.so"))
HAVE_GTLS = any(Path("/usr/lib").glob("*/rsyslog/lmnsd_gtls.so"))

pytestmark = pytest.mark.skipif(
    not (os.path.exists(RSYSLOGD) and HAVE_OMRELP),
    reason="rsyslogd and omrelp are needed (Debian packages rsyslog and rsyslog-relp; `make deps`)",
)

PROTOCOL23 = 'template="RSYSLOG_SyslogProtocol23Format"'  # RFC 5424, as rsyslog writes it
RETRY = 'action.resumeRetryCount="-1" action.resumeInterval="1"'


def _lines(count: int) -> list[bytes]:
    return [b"line %d of the file" % i for i in range(count)]


def _input(directory: Path, count: int) -> Path:
    path = directory / "input.log"
    path.write_bytes(b"".join(line + b"\n" for line in _lines(count)))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Rsyslogd:
    """rsyslogd in the foreground with its own configuration and pid file, stopped on exit.

    Asynchronous: while rsyslogd shuts down it waits for RELP acknowledgements from the
    server, which runs in this very event loop.
    """

    def __init__(self, directory: Path, actions: list[str], count: int) -> None:
        self.directory = directory
        self.config = rsyslog_config(directory, _input(directory, count), actions)
        self.log = directory / "rsyslogd.out"

    async def __aenter__(self) -> Rsyslogd:
        command = [RSYSLOGD, "-n", "-f", str(self.config), "-i", str(self.directory / "rsyslogd.pid")]
        with self.log.open("wb") as out:
            self.process = await trio.lowlevel.open_process(command, stdout=out, stderr=out)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.process.terminate()
        with trio.move_on_after(5):
            await self.process.wait()
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _by_peer(entries: list[Entry]) -> dict[tuple[str, str], list[Entry]]:
    groups: dict[tuple[str, str], list[Entry]] = {}
    for entry in entries:
        groups.setdefault((entry.transport, entry.peer), []).append(entry)
    return groups


async def test_rsyslog_forwards_over_tcp_in_both_framings_and_over_relp(tmp_path: Path) -> None:
    count = 300
    sink = LocalSink(tmp_path / "log", ORIGIN)
    async with running_ingest(sink) as ingest:
        tcp, relp = ingest.ports["tcp"], ingest.ports["relp"]
        actions = [
            f'action(type="omfwd" target="127.0.0.1" port="{tcp}" protocol="tcp" '
            f'TCP_Framing="octet-counted" {PROTOCOL23})',
            # rsyslog's default forwarding format is RFC 3164 with LF framing.
            f'action(type="omfwd" target="127.0.0.1" port="{tcp}" protocol="tcp")',
            f'action(type="omrelp" target="127.0.0.1" port="{relp}" {PROTOCOL23})',
        ]
        async with Rsyslogd(tmp_path, actions, count) as rsyslogd:
            await eventually(
                lambda: sink.log.size == 3 * count, 10, "every line from rsyslog over the three actions"
            )
    data = stored(tmp_path / "log")
    assert root_of(data) == sink.log.root()
    entries = [Entry.decode(e) for e in data]
    groups = _by_peer(entries)
    assert sorted(t for t, _ in groups) == ["relp", "tcp", "tcp"]
    formats = set()
    for group in groups.values():
        messages = [e.message for e in group]
        assert all(m is not None and m.app_name == "pst-test" and m.facility == 16 for m in messages)
        fmt = {m.format for m in messages if m is not None}
        assert len(fmt) == 1
        formats |= fmt
        # rsyslog's RFC 5424 template ends each message with an LF (inside the frame).
        assert [e.msg.removesuffix(b"\n") for e in group] == _lines(count)
    assert formats == {"rfc5424", "rfc3164"}
    assert "error" not in rsyslogd.output.lower(), rsyslogd.output


def _logged(directory: Path) -> int:
    """The durable size of the log in ``directory`` (its state record), 0 before the first append."""
    try:
        return int((directory / "state" / "tree").read_text().split("\n")[1])
    except FileNotFoundError:
        return 0


async def _start_server(directory: Path, port: int, batch_delay: float) -> subprocess.Popen[str]:
    command = [sys.executable, str(Path(__file__).with_name("log_ingest_server.py")), str(directory), ORIGIN]
    command += ["--relp", str(port), "--batch-entries", "64", "--batch-delay", str(batch_delay)]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    assert server.stdout is not None
    line = await trio.to_thread.run_sync(server.stdout.readline)
    assert line.startswith("ready "), line
    assert json.loads(line[6:]) == {"relp": port}
    return server


@pytest.mark.slow
async def test_relp_loses_no_message_when_the_server_is_killed_and_restarted(tmp_path: Path) -> None:
    count = 2000
    port = _free_port()
    directory = tmp_path / "log"
    actions = [f'action(type="omrelp" target="127.0.0.1" port="{port}" {PROTOCOL23} {RETRY})']
    # Slow batches at first (64 entries every 50 ms) so that the kill lands in the middle of the stream.
    server = await _start_server(directory, port, 0.05)
    try:
        async with Rsyslogd(tmp_path, actions, count):
            await eventually(lambda: _logged(directory) >= count // 5, 10, "a fifth of the lines")
            server.send_signal(signal.SIGKILL)
            await trio.to_thread.run_sync(server.wait)
            at_kill = _logged(directory)
            assert at_kill < count, "the kill came after the last message: slow the server down"
            server = await _start_server(directory, port, 0.005)
            await eventually(lambda: _logged(directory) >= count, 15, "every line after the restart")
            await trio.sleep(0.3)  # anything rsyslog still resends
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait()
    entries = [Entry.decode(e) for e in stored(directory)]
    seen = Counter(e.msg.removesuffix(b"\n") for e in entries)
    missing = [line for line in _lines(count) if line not in seen]
    duplicates = sum(n - 1 for n in seen.values())
    print(f"killed at {at_kill} of {count} entries; {len(entries)} stored, {duplicates} resent twice, 0 lost")
    assert not missing, f"{len(missing)} lines lost, first {missing[:3]}"
    assert set(seen) == set(_lines(count))
    # A message is resent only if it was durable but not yet acknowledged when the server died:
    # at most a window (128) of them.
    assert duplicates <= 128


# --- TLS ------------------------------------------------------------------------------------------

LOG_NAME = "log.example.test"  # the name in the ingest's certificate, which rsyslog checks

needs_gtls = pytest.mark.skipif(
    not HAVE_GTLS, reason="rsyslog's gtls driver is needed (Debian package rsyslog-gnutls; `make deps`)"
)


def _tls_actions(directory: Path, ports: dict[str, int], ca: Path, name: str = LOG_NAME) -> list[str]:
    """omfwd over TLS (RFC 5425: octet-counted) and omrelp over TLS, trusting only ``ca`` and
    accepting only a server certificate for ``name``.

    omfwd needs no certificate of its own. librelp (1.11) falls back to anonymous TLS, which the
    ingest refuses ("no shared cipher"), unless it has one: omrelp gets a self-signed one, which
    it never sends (the ingest asks for none).
    """
    client_cert, client_key = self_signed(directory, "host.example.test", stem="client")
    return [
        f'action(type="omfwd" target="127.0.0.1" port="{ports["tls"]}" protocol="tcp" '
        f'TCP_Framing="octet-counted" StreamDriver="gtls" StreamDriverMode="1" '
        f'StreamDriverAuthMode="x509/name" StreamDriverPermittedPeers="{name}" '
        f'StreamDriver.CAFile="{ca}" {PROTOCOL23})',
        f'action(type="omrelp" target="127.0.0.1" port="{ports["relp-tls"]}" tls="on" '
        f'tls.caCert="{ca}" tls.authMode="name" tls.permittedPeer=["{name}"] '
        f'tls.myCert="{client_cert}" tls.myPrivKey="{client_key}" {PROTOCOL23})',
    ]


def _ingest_context(tmp_path: Path) -> tuple[Path, object]:
    """The CA a host trusts, and the ingest's TLS context as pst serve makes it from [log] cert and key."""
    ca, cert, key = ca_and_server(tmp_path, LOG_NAME, stem="syslog")
    return ca, server_tls_context(cert, key, "log", tmp_path / "config.toml")


@needs_gtls
async def test_rsyslog_forwards_over_tls_and_relp_over_tls(tmp_path: Path) -> None:
    count = 300
    ca, context = _ingest_context(tmp_path)
    sink = LocalSink(tmp_path / "log", ORIGIN)
    async with running_ingest(sink, ssl_context=context) as ingest:
        actions = _tls_actions(tmp_path, ingest.ports, ca)
        async with Rsyslogd(tmp_path, actions, count) as rsyslogd:
            await eventually(lambda: sink.log.size == 2 * count, 10, "every line over TLS and RELP over TLS")
            await trio.sleep(0.2)  # anything more would be a duplicate
    data = stored(tmp_path / "log")
    assert len(data) == 2 * count
    groups = _by_peer([Entry.decode(e) for e in data])
    assert sorted(t for t, _ in groups) == ["relp-tls", "tls"]
    for group in groups.values():
        assert all(e.message is not None and e.message.format == "rfc5424" for e in group)
        assert [e.msg.removesuffix(b"\n") for e in group] == _lines(count)
    assert "error" not in rsyslogd.output.lower(), rsyslogd.output


@needs_gtls
@pytest.mark.parametrize(
    ("case", "omfwd_says", "omrelp_says"),
    [
        ("another CA", "certificate invalid: signer not found", "certificate validation failed"),
        ("another name", "peer name not authorized", "no permited name found"),  # sic
    ],
    ids=["another-ca", "another-name"],
)
async def test_rsyslog_over_tls_delivers_nothing_to_a_server_it_does_not_trust(
    tmp_path: Path, case: str, omfwd_says: str, omrelp_says: str
) -> None:
    count = 50
    ca, context = _ingest_context(tmp_path)
    name = LOG_NAME
    if case == "another CA":  # a CA that certifies the same name, not the ingest's
        ca, _, _ = ca_and_server(tmp_path, LOG_NAME, stem="other")
    else:  # the right CA, but rsyslog permits another name
        name = "other.example.test"
    sink = LocalSink(tmp_path / "log", ORIGIN)
    async with running_ingest(sink, ssl_context=context) as ingest:
        actions = _tls_actions(tmp_path, ingest.ports, ca, name)
        async with Rsyslogd(tmp_path, actions, count) as rsyslogd:
            await eventually(
                lambda: omfwd_says in rsyslogd.output and omrelp_says in rsyslogd.output,
                10,
                f"rsyslog refusing the ingest's certificate ({case})",
            )
            await trio.sleep(1)
            assert sink.log.size == 0
    assert sink.log.size == 0, rsyslogd.output

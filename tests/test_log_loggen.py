"""syslog-ng's load generator ``loggen`` (Debian's syslog-ng-core, extracted by ``make deps`` into
.venv/loggen with the wrapper .venv/bin/loggen) sending to the ingest over TCP: RFC 5424 with octet
counting (``-P``) and BSD messages with LF framing, on two connections at once; and RFC 5424 over
TLS (``--use-ssl``)."""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import trio
from logutil import ORIGIN, eventually, root_of, running_ingest, stored
from tlsutil import self_signed

from appliance.apps.log.ingest import LocalSink
from appliance.apps.log.syslog import Entry
from appliance.host.config import server_tls_context


def find_loggen() -> str | None:
    """The wrapper of `make deps` in this tree's venv or the running interpreter's, else PATH."""
    for venv in (Path(__file__).parents[1] / ".venv", Path(sys.prefix)):
        candidate = venv / "bin" / "loggen"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("loggen")


LOGGEN = find_loggen()

pytestmark = pytest.mark.skipif(
    LOGGEN is None,
    reason="loggen is needed: .venv/bin/loggen, which `make deps` extracts from Debian's syslog-ng-core",
)

# loggen's body: "seq: 0000000042, thread: 0001, runid: ..., stamp: ... PADDPADD..."
_SEQ = re.compile(rb"seq: ([0-9]{10}), thread: ([0-9]{4}), ")
# loggen's closing report (stderr): "average rate = 3948.45 msg/sec, count=2000, time=0.5, ..."
_REPORT = re.compile(r"average rate = [0-9.]+ msg/sec, count=([0-9]+),")


@pytest.mark.parametrize(
    ("flags", "fmt", "transport"),
    [
        (["--inet", "--stream", "-P"], "rfc5424", "tcp"),
        (["--inet", "--stream"], "rfc3164", "tcp"),
        (["--use-ssl", "-P"], "rfc5424", "tls"),  # loggen's TLS plugin instead of its socket one
    ],
    ids=["rfc5424-octet-counted", "bsd-lf-framed", "tls-rfc5424"],
)
async def test_loggen_every_message_once_in_order(
    tmp_path: Path, flags: list[str], fmt: str, transport: str
) -> None:
    assert LOGGEN is not None
    per_connection, connections = 1000, 2  # loggen's -n counts per connection
    total = per_connection * connections
    sink = LocalSink(tmp_path / "log", ORIGIN)
    context = None
    if transport == "tls":  # loggen checks no certificate: any will do
        cert, key = self_signed(tmp_path, stem="syslog")
        context = server_tls_context(cert, key, "log", tmp_path / "config.toml")
    async with running_ingest(sink, ssl_context=context) as ingest:
        command = [LOGGEN, *flags, "--rate", "1000000", "--number", str(per_connection)]
        command += ["--active-connections", str(connections), "127.0.0.1", str(ingest.ports[transport])]
        done = await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False)
        output = (done.stdout + done.stderr).decode(errors="replace")
        assert done.returncode == 0, output
        report = _REPORT.search(output)
        assert report is not None, output
        assert int(report.group(1)) == total, output
        await eventually(lambda: sink.log.size >= total, 10, f"the {total} messages loggen reports sent")
        await trio.sleep(0.1)  # anything more would be a duplicate
    data = stored(tmp_path / "log")
    assert root_of(data) == sink.log.root()
    assert len(data) == total
    entries = [Entry.decode(e) for e in data]
    by_peer: dict[str, list[Entry]] = {}
    for entry in entries:
        assert entry.transport == transport
        assert entry.error is None and not entry.truncated
        assert entry.message is not None and entry.message.format == fmt, entry.raw
        assert entry.message.pri == 38, entry.raw
        if fmt == "rfc5424":
            assert entry.message.app_name == "prg00000", entry.raw
        else:
            # loggen's BSD timestamp (2026-11-30T16:00:47) has no offset: neither RFC 3164 nor
            # RFC 3339. rsyslog's parser then takes the tag up to the first colon (programname
            # 2026-11-30T16, checked with rsyslogd 8.2302), and so does ours.
            assert entry.message.app_name == entry.raw[4:17].decode(), entry.raw
        by_peer.setdefault(entry.peer, []).append(entry)
    assert len(by_peer) == connections
    threads = set()
    for group in by_peer.values():
        seqs = []
        for entry in group:
            m = _SEQ.search(entry.msg)
            assert m is not None, entry.raw
            seqs.append(int(m.group(1)))
            threads.add(m.group(2))
        # One loggen thread per connection: its sequence numbers, each once, in order.
        assert seqs == list(range(per_connection))
    assert len(threads) == connections
    if fmt == "rfc5424":
        # loggen marks its RFC 5424 MSG as UTF-8 with a BOM, and counts each frame's octets.
        assert all(e.message is not None and e.message.bom for e in entries)
        assert {e.size for e in entries} == {len(entries[0].raw)}

"""Syslog ingest over UDP, TCP, TLS and RELP into the tile log, with real clients on loopback."""

from __future__ import annotations

import logging
import shutil
import socket
import ssl
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio
from logutil import (
    ORIGIN,
    RECEIVED,
    RELP_OPEN,
    RelpResponses,
    decoded,
    eventually,
    relp_frame,
    root_of,
    running_ingest,
    self_signed,
    stored,
)

from appliance.apps.log.ingest import Batcher, Limits, LocalSink, SinkError
from appliance.apps.log.syslog import Entry, receive


def _expected(raw: bytes, transport: str, peer: str, size: int | None = None) -> bytes:
    return receive(raw, received=RECEIVED, transport=transport, peer=peer, size=size).encode()


def _octets(msg: bytes) -> bytes:
    return b"%d %s" % (len(msg), msg)


async def _send_tcp(port: int, data: bytes) -> str:
    """Send ``data`` on a new connection and close it; returns our address as the server names it."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    peer = f"127.0.0.1:{stream.socket.getsockname()[1]}"
    async with stream:
        await stream.send_all(data)
    return peer


# --- Real clients: util-linux logger ---------------------------------------------------------------


@pytest.mark.skipif(shutil.which("logger") is None, reason="util-linux logger is not installed")
async def test_logger_messages_land_exactly_in_the_log(tmp_path: Path) -> None:
    sink = LocalSink(tmp_path / "log", ORIGIN)
    cases = [
        ("udp", ["--udp", "--rfc5424"], "one over udp"),
        ("udp", ["--udp", "--rfc3164"], "two over udp, bsd"),
        ("tcp", ["--tcp", "--octet-count", "--rfc5424"], "three\nover two lines, octet-counted"),
        ("tcp", ["--tcp", "--rfc3164"], "four over tcp, lf-framed"),
        ("tcp", ["--tcp", "--rfc5424", "--sd-id", "origin@32473", "--sd-param", 'ip="192.0.2.1"'], "five"),
    ]
    sent: dict[bytes, tuple[str, str, list[str]]] = {}
    async with running_ingest(sink) as ingest:
        for transport, args, text in cases:
            command = ["logger", "--server", "127.0.0.1", "--port", str(ingest.ports[transport]), *args]
            command += ["--stderr", "-t", "pst-test", "-p", "local3.notice", text]
            result = await trio.run_process(command, capture_stderr=True)
            raw = result.stderr.removesuffix(b"\n")  # --stderr prints what logger sent (the frame)
            if "--octet-count" in args:
                count, _, raw = raw.partition(b" ")
                assert int(count) == len(raw)
            sent[raw] = (transport, text, args)
        await eventually(lambda: sink.log.size == len(cases), what="every logger message in the log")
    data = stored(tmp_path / "log")
    assert root_of(data) == sink.log.root()
    for entry_bytes in data:
        entry = Entry.decode(entry_bytes)
        transport, text, args = sent.pop(entry.raw)
        assert entry.peer.startswith("127.0.0.1:") and entry_bytes == _expected(
            entry.raw, transport, entry.peer
        )
        m = entry.message
        assert m is not None and m.format == ("rfc5424" if "--rfc5424" in args else "rfc3164")
        assert (m.facility, m.severity, m.app_name, entry.msg) == (19, 5, "pst-test", text.encode())
        if "--sd-id" in args:
            assert ("origin@32473", (("ip", "192.0.2.1"),)) in [(e.id, e.params) for e in m.structured_data]
    assert not sent


# --- Exact entries from a known sender -------------------------------------------------------------


async def test_a_tcp_stream_is_stored_entry_for_entry(tmp_path: Path) -> None:
    messages = [
        b'<13>1 2026-11-30T09:15:11Z host app 42 ID7 [x@1 k="v\\""] \xef\xbb\xbfoctet-counted\nwith LF',
        b"<14>Nov 30 09:15:11 host app[1]: lf-framed",
        b"\x00\xffgarbage that is not syslog",
        b"<15>1 - - - - - - " + b"y" * 70_000,  # over the limit: cut and flagged
    ]
    stream = _octets(messages[0]) + messages[1] + b"\n" + messages[2] + b"\n" + _octets(messages[3])
    sink = LocalSink(tmp_path / "log", ORIGIN)
    async with running_ingest(sink) as ingest:
        peer = await _send_tcp(ingest.ports["tcp"], stream)
        await eventually(lambda: sink.log.size == 4)
        assert ingest.server.stats.unparsed == 1 and ingest.server.stats.truncated == 1
    expected = [_expected(m, "tcp", peer, len(m)) for m in messages]
    assert stored(tmp_path / "log") == expected and sink.log.root() == root_of(expected)
    entries = decoded(sink)
    assert entries[2].unparsed and entries[2].raw == messages[2]
    assert entries[3].truncated and entries[3].size == len(messages[3])


async def test_tls_and_relp_over_tls(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, stem="syslog")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(cert))
    sink = LocalSink(tmp_path / "log", ORIGIN)
    async with running_ingest(sink, ssl_context=server_context) as ingest:
        # A client that does not speak TLS is logged and dropped; the port goes on serving.
        await _send_tcp(ingest.ports["tls"], b"<13>plain text on the TLS port\n")
        tls = await trio.open_ssl_over_tcp_stream(
            "127.0.0.1", ingest.ports["tls"], ssl_context=client_context
        )
        peer = f"127.0.0.1:{tls.transport_stream.socket.getsockname()[1]}"  # type: ignore[attr-defined]
        await tls.send_all(_octets(b"<13>1 - - - - - - over tls") + b"<13>second\n")
        await tls.aclose()
        await eventually(lambda: sink.log.size == 2)
        relp = await trio.open_ssl_over_tcp_stream(
            "127.0.0.1", ingest.ports["relp-tls"], ssl_context=client_context
        )
        responses = RelpResponses(relp)
        await relp.send_all(
            RELP_OPEN + relp_frame(2, "syslog", b"<13>over relp and tls") + relp_frame(3, "close")
        )
        assert [await responses.next() for _ in range(3)] == [
            (1, "rsp", b"200 OK\nrelp_version=0\nrelp_software=pst-appliance\ncommands=syslog"),
            (2, "rsp", b"200 OK"),
            (3, "rsp", b""),
        ]
        await relp.aclose()
    assert sink.log.size == 3
    assert stored(tmp_path / "log")[:2] == [
        _expected(b"<13>1 - - - - - - over tls", "tls", peer),
        _expected(b"<13>second", "tls", peer),
    ]
    assert decoded(sink)[2].transport == "relp-tls"


# --- RELP: acknowledged only once durable ----------------------------------------------------------


class GatedSink:
    """A LocalSink whose appends wait for the test to open the gate."""

    def __init__(self, inner: LocalSink) -> None:
        self.inner = inner
        self.gate = trio.Event()
        self.fail = False

    async def append(self, entries: Sequence[bytes]) -> Sequence[int]:
        await self.gate.wait()
        if self.fail:
            raise OSError("disk on fire")
        return await self.inner.append(entries)


async def test_relp_acknowledges_a_message_only_once_it_is_durable(tmp_path: Path) -> None:
    sink = GatedSink(LocalSink(tmp_path / "log", ORIGIN))
    async with running_ingest(sink) as ingest:
        stream = await trio.open_tcp_stream("127.0.0.1", ingest.ports["relp"])
        responses = RelpResponses(stream)
        messages = [b"<13>1 - - - - - - message %d" % i for i in range(3)]
        await stream.send_all(
            RELP_OPEN + b"".join(relp_frame(i + 2, "syslog", m) for i, m in enumerate(messages))
        )
        assert (await responses.next())[:2] == (1, "rsp")  # type: ignore[index]
        with trio.move_on_after(0.3) as waited:
            await responses.next()
        assert waited.cancelled_caught, "a message was acknowledged before it was stored"
        assert sink.inner.log.size == 0
        sink.gate.set()
        for i in range(3):
            assert await responses.next() == (i + 2, "rsp", b"200 OK")
            assert sink.inner.log.size >= i + 1  # durable before its 200 OK
        await stream.send_all(relp_frame(5, "close"))
        assert await responses.next() == (5, "rsp", b"")
        assert await responses.next() is None
    assert [Entry.decode(e).raw for e in stored(tmp_path / "log")] == messages


async def test_relp_never_acknowledges_a_message_the_log_failed_to_store(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sink = GatedSink(LocalSink(tmp_path / "log", ORIGIN))
    sink.fail = True
    sink.gate.set()
    async with running_ingest(sink) as ingest:
        stream = await trio.open_tcp_stream("127.0.0.1", ingest.ports["relp"])
        responses = RelpResponses(stream)
        await stream.send_all(RELP_OPEN + relp_frame(2, "syslog", b"<13>lost?"))
        assert (await responses.next())[:2] == (1, "rsp")  # type: ignore[index]
        with trio.fail_after(5):
            assert await responses.next() is None  # closed, no 200: the client will resend
    assert "closing without acknowledging" in caplog.text and "disk on fire" in caplog.text


async def test_relp_window_stops_reading_until_acknowledgements(tmp_path: Path) -> None:
    sink = GatedSink(LocalSink(tmp_path / "log", ORIGIN))
    async with running_ingest(sink, Limits(relp_window=4)) as ingest:
        stream = await trio.open_tcp_stream("127.0.0.1", ingest.ports["relp"])
        responses = RelpResponses(stream)
        await stream.send_all(
            RELP_OPEN + b"".join(relp_frame(t, "syslog", b"<13>m%d" % t) for t in range(2, 12))
        )
        await responses.next()
        await trio.sleep(0.2)
        assert ingest.server.stats.entries == 4  # the window: the rest waits in the socket
        sink.gate.set()
        assert [(await responses.next())[0] for _ in range(10)] == list(range(2, 12))  # type: ignore[index]
        await stream.aclose()


# --- Bad input and limits --------------------------------------------------------------------------


async def test_garbage_on_each_port_does_not_stop_other_senders(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "pst.log.ingest")
    sink = LocalSink(tmp_path / "log", ORIGIN)
    garbage = bytes(range(256)) * 4
    async with running_ingest(sink) as ingest:
        good = await trio.open_tcp_stream("127.0.0.1", ingest.ports["tcp"])
        await good.send_all(b"<13>good 1\n")
        relp = await trio.open_tcp_stream("127.0.0.1", ingest.ports["relp"])
        relp_peer = f"127.0.0.1:{relp.socket.getsockname()[1]}"
        await relp.send_all(garbage)
        responses = RelpResponses(relp)
        assert await responses.next() == (0, "serverclose", b"")
        assert await responses.next() is None
        await _send_tcp(ingest.ports["tcp"], garbage)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.sendto(garbage[:300], ("127.0.0.1", ingest.ports["udp"]))
        await good.send_all(b"<13>good 2\n")
        await good.aclose()
        await eventually(lambda: any(e.msg == b"good 2" for e in decoded(sink)))
    entries = decoded(sink)
    assert [e.msg for e in entries if e.transport == "tcp" and e.msg.startswith(b"good")] == [
        b"good 1",
        b"good 2",
    ]
    assert any(e.transport == "udp" and e.unparsed and e.raw == garbage[:300] for e in entries)
    assert b"".join(e.raw for e in entries if e.transport == "tcp" and not e.msg.startswith(b"good")) == (
        garbage.replace(b"\n", b"")
    )
    assert f"syslog relp {relp_peer}: a frame starts with a 1 to 9 digit TXNR" in caplog.text


async def test_udp_over_the_rate_of_a_source_is_dropped_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sink = LocalSink(tmp_path / "log", ORIGIN)
    async with running_ingest(sink, Limits(messages_per_second=10, burst_seconds=1)) as ingest:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            for i in range(50):
                udp.sendto(b"<13>datagram %d" % i, ("127.0.0.1", ingest.ports["udp"]))
        await eventually(lambda: ingest.server.stats.udp_dropped + sink.log.size >= 50)
        assert 10 <= sink.log.size <= 12 and ingest.server.stats.udp_dropped == 50 - sink.log.size
    assert "syslog udp 127.0.0.1: over 10 messages" in caplog.text


async def test_a_tcp_sender_over_its_rate_is_slowed_not_dropped(tmp_path: Path) -> None:
    sink = LocalSink(tmp_path / "log", ORIGIN)
    async with running_ingest(sink, Limits(messages_per_second=200, burst_seconds=0.1)) as ingest:
        start = trio.current_time()
        stream = await trio.open_tcp_stream("127.0.0.1", ingest.ports["tcp"])
        for i in range(3):
            await stream.send_all(b"".join(b"<13>m%d\n" % (20 * i + j) for j in range(20)))
            await trio.sleep(0.01)
        await eventually(lambda: sink.log.size == 60)
        assert trio.current_time() - start >= 0.15  # 60 messages at 200/s, 20 at once: 0.2 s
        assert ingest.server.stats.throttled >= 1
        await stream.aclose()


async def test_connections_over_the_limit_are_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sink = LocalSink(tmp_path / "log", ORIGIN)
    async with running_ingest(sink, Limits(max_connections=1)) as ingest:
        first = await trio.open_tcp_stream("127.0.0.1", ingest.ports["tcp"])
        await first.send_all(b"<13>first\n")
        await eventually(lambda: ingest.server.stats.connections == 1)
        second = await trio.open_tcp_stream("127.0.0.1", ingest.ports["tcp"])
        with trio.fail_after(5):
            assert await second.receive_some(10) == b""
        await first.send_all(b"<13>still here\n")
        await first.aclose()
        await eventually(lambda: sink.log.size == 2)
    assert ingest.server.stats.refused_connections == 1 and "refused, 1 connections already" in caplog.text


# --- The batcher ---------------------------------------------------------------------------------


class RecordingSink:
    def __init__(self) -> None:
        self.batches: list[list[bytes]] = []
        self.fail_next = False

    async def append(self, entries: Sequence[bytes]) -> Sequence[int]:
        await trio.sleep(0.01)
        if self.fail_next:
            self.fail_next = False
            raise OSError("no space left")
        self.batches.append(list(entries))
        size = sum(len(b) for b in self.batches)
        return range(size - len(entries), size)


async def test_batches_hold_up_to_n_entries_and_a_failed_one_does_not_block_the_next() -> None:
    sink = RecordingSink()
    batcher = Batcher(sink, batch_entries=10, batch_delay=0.05, max_queued=30)
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        first = await batcher.submit([b"a%d" % i for i in range(10)])  # full: appended at once
        await first.durable()
        assert sink.batches == [[b"a%d" % i for i in range(10)]]
        sink.fail_next = True
        failed = await batcher.submit([b"lost"])
        with pytest.raises(SinkError, match="no space left"):
            await failed.durable()
        later = await batcher.submit([b"b"])
        start = trio.current_time()
        await later.durable()
        assert sink.batches[-1] == [b"b"] and trio.current_time() - start >= 0.04  # waited for the delay
        nursery.cancel_scope.cancel()
    assert batcher.failures == 1 and batcher.appended == 11

"""The network layer: framing (with a fuzzed decoder), period certificates, TLS 1.3 and PeerNetwork.

PeerNetwork tests use real sockets on 127.0.0.1 with free ports chosen at the start.
"""

from __future__ import annotations

import datetime
import gc
import hashlib
import logging
import random
import socket
import ssl
import weakref
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from typing import Any

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.crypto import encoding
from appliance.net import (
    EVERYONE,
    FrameDecoder,
    FrameStream,
    FramingError,
    Hello,
    HelloError,
    PeerCertificateError,
    PeerNetwork,
    PeerState,
    anonymous_client_context,
    anonymous_server_context,
    certificate_period,
    channel_identity,
    check_peer,
    client_context,
    encode_frame,
    period_certificate,
    server_context,
    trust_anchor,
    trust_anchors_pem,
)

FAST: dict[str, Any] = {"backoff_min": 0.02, "backoff_max": 0.2, "handshake_timeout": 2.0}


def seed_of(server: int, period: int, tag: str = "") -> bytes:
    return hashlib.sha256(f"test seed {server} {period} {tag}".encode()).digest()


def public_of(seed: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()


def key_table(ids: Iterable[int], period: int) -> dict[int, bytes]:
    return {i: public_of(seed_of(i, period)) for i in ids}


def free_ports(k: int) -> list[int]:
    socks = []
    for _ in range(k):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def addresses_for(ids: Iterable[int]) -> dict[int, tuple[str, int]]:
    ids = list(ids)
    return {i: ("127.0.0.1", p) for i, p in zip(ids, free_ports(len(ids)), strict=True)}


async def eventually(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.01)


class Inbox:
    """Collects (peer, payload) pairs per receiving server."""

    def __init__(self) -> None:
        self.got: dict[int, list[tuple[int, bytes]]] = defaultdict(list)

    def handler(self, me: int) -> Callable[[int, bytes], Any]:
        async def on_frame(peer: int, data: bytes) -> None:
            self.got[me].append((peer, data))

        return on_frame


@asynccontextmanager
async def mesh(
    running: Iterable[int],
    table_ids: Iterable[int] | None = None,
    period: int = 0,
    inbox: Inbox | None = None,
    options: dict[int, dict[str, Any]] | None = None,
    addresses: dict[int, tuple[str, int]] | None = None,
) -> AsyncIterator[dict[int, PeerNetwork]]:
    running = list(running)
    ids = list(table_ids) if table_ids is not None else running
    addresses = addresses or addresses_for(ids)
    keys = key_table(ids, period)
    nets: dict[int, PeerNetwork] = {}
    async with AsyncExitStack() as stack:
        for i in running:
            opts: dict[str, Any] = dict(FAST)
            opts.update((options or {}).get(i, {}))
            if inbox is not None:
                opts["on_frame"] = inbox.handler(i)
            net = PeerNetwork(i, addresses, period, keys, seed_of(i, period), **opts)
            nets[i] = await stack.enter_async_context(net)
        yield nets


async def raw_anonymous(
    port: int, local: str | None = None
) -> tuple[trio.SSLStream[trio.SocketStream], FrameStream]:
    """An unauthenticated client of 127.0.0.1:``port``, from the loopback address ``local`` if given."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port, local_address=local)
    stream = trio.SSLStream(tcp, anonymous_client_context(), server_hostname="server-1.pst")
    await stream.do_handshake()
    return stream, FrameStream(stream)


async def raw_tls(
    port: int, me: int, period: int, seed: bytes, keys: dict[int, bytes]
) -> tuple[trio.SSLStream[trio.SocketStream], FrameStream]:
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, client_context(me, period, seed, keys), server_hostname="server-1.pst")
    await stream.do_handshake()
    return stream, FrameStream(stream)


async def closed_by_peer(frames: FrameStream) -> bool:
    """True once the peer closed (EOF or a broken TLS stream), within a few seconds."""
    with trio.fail_after(5):
        try:
            return await frames.receive_frame() is None
        except (trio.BrokenResourceError, FramingError):
            return True


# -- framing -----------------------------------------------------------------------------------


def test_decoder_splits_and_joins_chunks() -> None:
    payloads = [b"", b"a", b"hello world", bytes(range(256)) * 10]
    wire = b"".join(encode_frame(p) for p in payloads)
    for step in (1, 3, 7, len(wire)):
        dec = FrameDecoder()
        out: list[bytes] = []
        for k in range(0, len(wire), step):
            out += dec.feed(wire[k : k + step])
        dec.eof()
        assert out == payloads
        assert dec.buffered == 0


def test_decoder_refuses_oversized_length_before_payload() -> None:
    dec = FrameDecoder(max_frame_size=100)
    assert dec.feed(encode_frame(b"x" * 100)) == [b"x" * 100]
    with pytest.raises(FramingError, match="frame length 101 exceeds the limit of 100"):
        dec.feed((101).to_bytes(4, "big"))
    with pytest.raises(FramingError, match="exceeds"):  # the decoder stays failed
        dec.feed(b"")
    with pytest.raises(FramingError, match="exceeds"):
        encode_frame(b"x" * 101, 100)


def test_decoder_truncated_at_eof() -> None:
    dec = FrameDecoder()
    dec.feed(b"\x00\x00")
    with pytest.raises(FramingError, match=r"truncated at EOF.*frame header \(2 of 4"):
        dec.eof()
    dec = FrameDecoder()
    dec.feed(encode_frame(b"abcdef")[:-2])
    with pytest.raises(FramingError, match=r"truncated at EOF.*\(4 of 6 payload bytes\)"):
        dec.eof()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=20), st.integers(0, 64))
def test_decoder_fuzz_only_frames_or_framing_error(chunks: list[bytes], limit: int) -> None:
    dec = FrameDecoder(max_frame_size=limit)
    total = 0
    try:
        for chunk in chunks:
            for frame in dec.feed(chunk):
                assert len(frame) <= limit
                total += 4 + len(frame)
        dec.eof()
    except FramingError:
        return
    assert total == sum(len(c) for c in chunks)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=10), st.lists(st.integers(1, 50), min_size=1))
def test_decoder_roundtrip_any_split(payloads: list[bytes], cuts: list[int]) -> None:
    wire = b"".join(encode_frame(p) for p in payloads)
    dec = FrameDecoder(max_frame_size=40)
    out: list[bytes] = []
    pos = 0
    k = 0
    while pos < len(wire):
        step = cuts[k % len(cuts)]
        out += dec.feed(wire[pos : pos + step])
        pos += step
        k += 1
    dec.eof()
    assert out == payloads


def test_decoder_limit_next_bounds_one_frame_only() -> None:
    dec = FrameDecoder(max_frame_size=1000)
    dec.limit_next(8, "hello frame")
    wire = encode_frame(b"hi") + encode_frame(b"y" * 500)  # a small hello, then a larger frame
    assert dec.feed(wire) == [b"hi", b"y" * 500]
    dec.limit_next(8, "hello frame")
    with pytest.raises(FramingError, match="hello frame length 9 exceeds the limit of 8 bytes"):
        dec.feed((9).to_bytes(4, "big"))  # refused from the header alone
    with pytest.raises(ValueError, match="limit must be in"):
        FrameDecoder(max_frame_size=4).limit_next(5)


def test_hello_roundtrip_and_errors() -> None:
    hello = Hello(3, 7)
    assert Hello.decode(hello.encode()) == hello
    assert encoding.decode(hello.encode()) == {"v": 1, "server": 3, "period": 7}
    with pytest.raises(HelloError, match=r"hello: cbor: indefinite length or reserved value"):
        Hello.decode(b"\xff\xfe garbage")
    with pytest.raises(HelloError, match="unsupported version 2"):
        Hello.decode(encoding.encode({"v": 2, "server": 3, "period": 7}))
    with pytest.raises(HelloError, match="wrong fields"):
        Hello.decode(encoding.encode({"v": 1, "server": 3}))
    with pytest.raises(HelloError, match="invalid server"):
        Hello.decode(encoding.encode({"v": 1, "server": 0, "period": 7}))
    with pytest.raises(HelloError, match="exceeds"):
        Hello.decode(b"\x00" * 1000)


# -- certificates --------------------------------------------------------------------------------


def test_period_certificate_fields() -> None:
    seed = seed_of(2, 5)
    start = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
    cert = period_certificate(2, 5, seed, not_before=start)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "pst-server-2"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["server-2.pst"]
    assert certificate_period(cert) == 5
    assert cert.not_valid_before_utc < start < cert.not_valid_after_utc
    public = cert.public_key()
    assert isinstance(public, type(Ed25519PrivateKey.generate().public_key()))
    assert public.public_bytes_raw() == public_of(seed)
    public.verify(cert.signature, cert.tbs_certificate_bytes)  # signed with the period key itself
    anchor = trust_anchor(2, 5, public_of(seed))
    assert cert.issuer == anchor.subject
    assert anchor == trust_anchor(2, 5, public_of(seed))  # deterministic
    assert "BEGIN CERTIFICATE" in trust_anchors_pem(5, key_table([1, 2], 5))


def test_check_peer_names_the_problem() -> None:
    keys = key_table([1, 2, 3], 4)
    der = period_certificate(3, 4, seed_of(3, 4)).public_bytes(encoding=_der())
    check_peer(der, 3, 4, keys)
    with pytest.raises(PeerCertificateError, match=r"server 2: .*it is server 3's"):
        check_peer(der, 2, 4, keys)
    with pytest.raises(PeerCertificateError, match="server 9 has no key"):
        check_peer(der, 9, 4, keys)
    stranger = period_certificate(3, 4, seed_of(3, 4, "evil")).public_bytes(encoding=_der())
    with pytest.raises(PeerCertificateError, match="no key of the table issued it"):
        check_peer(stranger, 3, 4, keys)
    old = period_certificate(3, 3, seed_of(3, 4)).public_bytes(encoding=_der())
    with pytest.raises(PeerCertificateError, match="for period 3, not period 4"):
        check_peer(old, 3, 4, keys)
    with pytest.raises(PeerCertificateError, match="no peer certificate"):
        check_peer(None, 3, 4, keys)


def test_channel_certificates_are_issued_by_the_period_key() -> None:
    """The network-facing process presents a channel key certified by the period key."""
    keys = key_table([1, 2, 3], 4)
    ident = channel_identity(3, 4, seed_of(3, 4))
    assert "PRIVATE" not in repr(ident)
    cert = x509.load_pem_x509_certificate(ident.cert_pem)
    der = cert.public_bytes(encoding=_der())
    assert cert.public_key().public_bytes_raw() != keys[3]  # type: ignore[union-attr]
    check_peer(der, 3, 4, keys)
    with pytest.raises(PeerCertificateError, match=r"server 1: .*it is server 3's"):
        check_peer(der, 1, 4, keys)
    forged = channel_identity(3, 4, seed_of(3, 4, "evil"))
    with pytest.raises(PeerCertificateError, match="no key of the table issued it"):
        check_peer(x509.load_pem_x509_certificate(forged.cert_pem).public_bytes(encoding=_der()), 3, 4, keys)


async def test_networks_keyed_with_channel_identities_talk() -> None:
    ids = [1, 2]
    keys = key_table(ids, 0)
    addresses = {i: ("127.0.0.1", port) for i, port in zip(ids, free_ports(2), strict=True)}
    got: list[tuple[int, bytes]] = []

    async def on_frame(peer: int, data: bytes) -> None:
        got.append((peer, data))

    ident = {i: channel_identity(i, 0, seed_of(i, 0)) for i in ids}
    async with (
        PeerNetwork(1, addresses, 0, keys, ident[1], on_frame=on_frame, **FAST) as a,
        PeerNetwork(2, addresses, 0, keys, ident[2], on_frame=on_frame, **FAST) as b,
    ):
        with trio.fail_after(10):
            await a.wait_connected()
            await b.wait_connected()
            a.send(2, b"over a channel key")
            b.send(1, b"and back")
            while len(got) < 2:
                await trio.sleep(0.01)
    assert sorted(got) == [(1, b"over a channel key"), (2, b"and back")]
    with pytest.raises(ValueError, match="not issued by our key"):
        PeerNetwork(1, addresses, 0, keys, ident[2])


def _der() -> Any:
    from cryptography.hazmat.primitives.serialization import Encoding

    return Encoding.DER


# -- PeerNetwork ---------------------------------------------------------------------------------


async def test_four_peers_exchange_and_broadcast() -> None:
    inbox = Inbox()
    async with mesh([1, 2, 3, 4], inbox=inbox) as nets:
        with trio.fail_after(5):
            for net in nets.values():
                await net.wait_connected()
        for i, net in nets.items():
            for j in nets:
                if j != i:
                    net.send(j, f"{i}->{j}".encode())
            net.send(EVERYONE, f"all from {i}".encode())
        expected = {
            j: sorted(
                [(i, f"{i}->{j}".encode()) for i in nets if i != j]
                + [(i, f"all from {i}".encode()) for i in nets if i != j]
            )
            for j in nets
        }
        await eventually(lambda: all(len(inbox.got[j]) == len(expected[j]) for j in nets))
        assert {j: sorted(inbox.got[j]) for j in nets} == expected
        for i, net in nets.items():
            for j in nets:
                if j != i:
                    info = net.connection_info(j)
                    assert info is not None and info.tls_version == "TLSv1.3" and info.period == 0
        # per-peer order is preserved
        nets[1].send(2, b"first")
        nets[1].send(2, b"second")
        await eventually(lambda: inbox.got[2][-2:] == [(1, b"first"), (1, b"second")])


async def test_incoming_channel_delivery_and_aclose() -> None:
    addresses = addresses_for([1, 2])
    keys = key_table([1, 2], 0)
    async with (
        PeerNetwork(1, addresses, 0, keys, seed_of(1, 0), **FAST) as a,
        PeerNetwork(2, addresses, 0, keys, seed_of(2, 0), **FAST) as b,
    ):
        with trio.fail_after(5):
            await a.wait_connected()
            await b.wait_connected()
            a.send(2, b"ping")
            assert await b.incoming.receive() == (1, b"ping")
            b.send(EVERYONE, b"pong")
            assert await a.incoming.receive() == (2, b"pong")
        await a.aclose()
        with trio.fail_after(2):
            async for _ in a.incoming:  # closed: iteration ends
                pass
        assert a.dropped(2) == 0
        a.send(2, b"late")  # dropped, never raises nor blocks
        assert a.dropped(2) == 1


async def test_tls_is_1_3_only() -> None:
    keys = key_table([1, 2, 3], 0)
    async with mesh([1, 2], table_ids=[1, 2, 3]) as nets:
        port = nets[1].listen_port
        assert port is not None
        stream, frames = await raw_tls(port, 3, 0, seed_of(3, 0), keys)
        assert stream.version() == "TLSv1.3"
        ssl_object = stream._ssl_object  # the stdlib SSLObject under trio's stream
        assert ssl_object.version() == "TLSv1.3"
        await frames.send_frame(Hello(3, 0).encode())
        answer = await frames.receive_frame()
        assert answer is not None and Hello.decode(answer) == Hello(1, 0)
        await eventually(lambda: 3 in nets[1].incoming_peers())
        await stream.aclose()
        # a client that offers TLS 1.2 at most cannot connect
        ctx = client_context(3, 0, seed_of(3, 0), keys)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        old = trio.SSLStream(tcp, ctx, server_hostname="server-1.pst")
        with pytest.raises(trio.BrokenResourceError):
            await old.do_handshake()
        await trio.aclose_forcefully(old)


async def test_certificate_key_not_in_table_is_rejected(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="appliance.net")
    addresses = addresses_for([1, 2, 3, 4])
    inbox = Inbox()
    async with mesh([1, 2, 3], table_ids=[1, 2, 3, 4], inbox=inbox, addresses=addresses) as nets:
        # Mallory runs at server 4's address with a key that is not server 4's table entry.
        evil = seed_of(4, 0, "mallory")
        mallory_keys = {**key_table([1, 2, 3], 0), 4: public_of(evil)}
        async with PeerNetwork(4, addresses, 0, mallory_keys, evil, **FAST) as mallory:
            with trio.fail_after(5):
                await nets[1].wait_connected([2, 3])
            await eventually(
                lambda: (
                    any(r.server == 4 and r.direction == "outgoing" for r in nets[1].rejections)
                    and any(r.direction == "incoming" for r in nets[1].rejections)
                )
            )
            out = next(r for r in nets[1].rejections if r.server == 4 and r.direction == "outgoing")
            assert "certificate" in out.reason
            inc = next(r for r in nets[1].rejections if r.direction == "incoming")
            assert inc.address.startswith("127.0.0.1:") and "TLS" in inc.reason
            assert 4 not in nets[1].connected_peers() | nets[1].incoming_peers()
            assert nets[1].state(4) is not PeerState.UP and not nets[1].is_authenticated(4)
            assert mallory.connected_peers() == frozenset()
            # Mallory's certificate is refused, but she may still talk unauthenticated, flagged so.
            await eventually(lambda: 4 in nets[1].unauthenticated_peers())
            assert not nets[1].is_authenticated(4) and mallory.incoming_peers() == frozenset()
            nets[2].send(1, b"still fine")
            await eventually(lambda: (2, b"still fine") in inbox.got[1])
    assert "connection to server 4 at 127.0.0.1" in caplog.text
    assert "rejected connection from 127.0.0.1:" in caplog.text


async def test_peer_claiming_another_id_is_rejected(caplog: pytest.LogCaptureFixture) -> None:
    keys = key_table([1, 2, 3], 0)
    async with mesh([1, 2], table_ids=[1, 2, 3]) as nets:
        port = nets[1].listen_port
        assert port is not None
        # server 3 holds a valid key of the table but claims to be server 2
        stream, frames = await raw_tls(port, 3, 0, seed_of(3, 0), keys)
        await frames.send_frame(Hello(2, 0).encode())
        assert await closed_by_peer(frames)
        await trio.aclose_forcefully(stream)
        # ... or claims to be server 1 itself
        stream, frames = await raw_tls(port, 3, 0, seed_of(3, 0), keys)
        await frames.send_frame(Hello(1, 0).encode())
        assert await closed_by_peer(frames)
        await trio.aclose_forcefully(stream)
        await eventually(lambda: len(nets[1].rejections) >= 2)
        claimed_2, claimed_1 = list(nets[1].rejections)[-2:]
        assert claimed_2.server == 2 and "it is server 3's" in claimed_2.reason
        assert claimed_1.server == 1 and "claims to be us" in claimed_1.reason
        assert nets[1].incoming_peers() == {2}  # the honest server 2 is untouched
    assert "rejected connection from server 2 at 127.0.0.1:" in caplog.text


async def test_garbage_before_hello_is_rejected() -> None:
    keys = key_table([1, 2, 3], 0)
    async with mesh([1, 2], table_ids=[1, 2, 3]) as nets:
        port = nets[1].listen_port
        assert port is not None
        # garbage instead of a TLS ClientHello
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        await tcp.send_all(b"GET / HTTP/1.0\r\n\r\n" + bytes(range(256)))
        with trio.fail_after(5):
            while await tcp.receive_some(1024):
                pass
        await tcp.aclose()
        # TLS fine, then a garbage frame instead of the hello
        stream, frames = await raw_tls(port, 3, 0, seed_of(3, 0), keys)
        await frames.send_frame(b"\xde\xad\xbe\xef")
        assert await closed_by_peer(frames)
        await trio.aclose_forcefully(stream)
        # TLS fine, then bytes that do not even frame (a huge length) and EOF
        stream, frames = await raw_tls(port, 3, 0, seed_of(3, 0), keys)
        await stream.send_all(b"\xff\xff\xff\xffgarbage")
        assert await closed_by_peer(frames)
        await trio.aclose_forcefully(stream)
        await eventually(lambda: len(nets[1].rejections) >= 3)
        reasons = [r.reason for r in nets[1].rejections]
        assert any(r.startswith("before its hello: TLS") for r in reasons), reasons
        assert any("bad hello" in r for r in reasons), reasons
        assert any("exceeds the limit" in r for r in reasons), reasons
        assert 3 not in nets[1].incoming_peers()
        assert nets[1].incoming_peers() == {2}


async def test_oversized_hello_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hello is read with a 256-byte bound: a 4 KiB one is refused from its header."""
    decoded: list[int] = []
    real_decode = Hello.decode

    def spy(data: bytes) -> Hello:
        decoded.append(len(data))
        return real_decode(data)

    monkeypatch.setattr(Hello, "decode", staticmethod(spy))
    keys = key_table([1, 2, 3], 0)
    async with mesh([1, 2], table_ids=[1, 2, 3]) as nets:
        with trio.fail_after(5):
            await nets[1].wait_connected([2])
        port = nets[1].listen_port
        assert port is not None
        big = b"\xa4" + b"x" * 4095  # 4 KiB that would start a CBOR map: never looked at
        # unauthenticated, the whole 4 KiB frame sent
        stream, frames = await raw_anonymous(port)
        await frames.send_frame(big)
        assert await closed_by_peer(frames)
        await trio.aclose_forcefully(stream)
        # authenticated, only the header and 100 bytes sent: the server does not wait for the rest
        stream, frames = await raw_tls(port, 3, 0, seed_of(3, 0), keys)
        await stream.send_all((4096).to_bytes(4, "big") + big[:100])
        assert await closed_by_peer(frames)
        await trio.aclose_forcefully(stream)
        await eventually(lambda: len(nets[1].rejections) >= 2)
        for rejection in list(nets[1].rejections)[-2:]:
            assert rejection.direction == "incoming" and rejection.server is None
            assert rejection.reason == "bad hello: hello frame length 4096 exceeds the limit of 256 bytes"
        assert decoded and max(decoded) <= 256  # only the peers' real hellos were decoded
        assert nets[1].incoming_peers() == {2}


async def test_oversized_frame_closes_only_that_connection() -> None:
    inbox = Inbox()
    async with mesh([1, 2, 3], inbox=inbox, options={1: {"max_frame_size": 1024}}) as nets:
        with trio.fail_after(5):
            for net in nets.values():
                await net.wait_connected()
        nets[2].send(1, b"x" * 2000)  # within 2's limit, beyond 1's
        await eventually(lambda: any(r.server == 2 for r in nets[1].rejections))
        rejection = next(r for r in nets[1].rejections if r.server == 2)
        assert "frame length 2000 exceeds the limit of 1024" in rejection.reason
        nets[3].send(1, b"from 3")
        await eventually(lambda: (3, b"from 3") in inbox.got[1])
        # server 2 reconnects and small frames flow again
        await eventually(lambda: nets[2].state(1) is PeerState.UP and 2 in nets[1].incoming_peers())
        nets[2].send(1, b"small again")
        await eventually(lambda: (2, b"small again") in inbox.got[1])
        assert (2, b"x" * 2000) not in inbox.got[1]


async def test_rekey_closes_old_connections_and_new_ones_work() -> None:
    inbox = Inbox()
    ids = [1, 2, 3]
    async with mesh(ids, table_ids=[1, 2, 3, 4], inbox=inbox) as nets:
        with trio.fail_after(5):
            for net in nets.values():
                await net.wait_connected(i for i in ids if i != net.me)
        port = nets[1].listen_port
        assert port is not None
        old_keys = key_table([1, 2, 3, 4], 0)
        stream, frames = await raw_tls(port, 4, 0, seed_of(4, 0), old_keys)
        await frames.send_frame(Hello(4, 0).encode())
        assert await frames.receive_frame() is not None
        await eventually(lambda: 4 in nets[1].incoming_peers())

        new_keys = key_table([1, 2, 3], 1)  # server 4 left the table
        old_contexts = [weakref.ref(net._creds.server_ctx) for net in nets.values() if net._creds is not None]
        assert len(old_contexts) == len(nets)
        for i, net in nets.items():
            net.rekey(1, new_keys, seed_of(i, 1))
        assert await closed_by_peer(frames)  # the period-0 connection is gone
        await trio.aclose_forcefully(stream)
        with trio.fail_after(5):
            for net in nets.values():
                await net.wait_connected(i for i in ids if i != net.me)
        for i, net in nets.items():
            assert net.period == 1
            assert net.state(4) is PeerState.DOWN
            for j in ids:
                if j != i:
                    info = net.connection_info(j)
                    assert info is not None and info.period == 1
        gc.collect()
        assert all(ref() is None for ref in old_contexts)  # period-0 private keys are released
        nets[3].send(EVERYONE, b"period 1")
        await eventually(lambda: (3, b"period 1") in inbox.got[1] and (3, b"period 1") in inbox.got[2])
        # period-0 credentials no longer get in
        with pytest.raises(trio.BrokenResourceError):
            stream, frames = await raw_tls(port, 2, 0, seed_of(2, 0), old_keys)
            await frames.send_frame(Hello(2, 0).encode())
            await frames.receive_frame()
        with pytest.raises(ValueError, match="already in period 1"):
            nets[1].rekey(1, new_keys, seed_of(1, 1))
        with pytest.raises(ValueError, match="not our entry"):
            nets[1].rekey(2, new_keys, seed_of(1, 2))


async def test_send_never_blocks_and_drops_with_reason(caplog: pytest.LogCaptureFixture) -> None:
    # server 3's address accepts TCP but never speaks TLS: 1's connection to it stays
    # CONNECTING, so frames queue up to the bound and the rest are dropped.
    silent = trio.socket.socket()
    await silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    addresses = addresses_for([1, 2])
    addresses[3] = ("127.0.0.1", silent.getsockname()[1])
    options = {1: {"queue_size": 2, "startup_grace": 0.0}}
    async with mesh([1], table_ids=[1, 2, 3], addresses=addresses, options=options) as nets:
        net = nets[1]
        assert net.state(3) is PeerState.CONNECTING
        for _ in range(5):
            net.send(3, b"x")
        assert net.dropped(3) == 3
        assert "dropped a frame to server 3: its send queue is full (2 frames)" in caplog.text
        # server 2 has no listener at all: after the first failed attempt frames are dropped
        await eventually(lambda: net.state(2) is PeerState.DOWN)
        net.send(2, b"y")
        assert net.dropped(2) == 1
        assert "dropped a frame to server 2: unreachable" in caplog.text
        with pytest.raises(ValueError, match="exceeds the limit"):
            net.send(2, b"z" * (net.max_frame_size + 1))
        with pytest.raises(ValueError, match="unknown server 9"):
            net.send(9, b"z")
    silent.close()


async def test_frames_to_a_peer_that_starts_later_wait_in_its_queue() -> None:
    # Servers started together dial each other before all of them listen; server 2 sends to 1
    # while 1 is not up yet, and the frames arrive once it is (they used to be dropped, and a
    # server whose announcement was lost started its first refresh as recovering).
    inbox = Inbox()
    addresses = addresses_for([1, 2])
    async with mesh([2], table_ids=[1, 2], inbox=inbox, addresses=addresses) as nets:
        await eventually(lambda: nets[2].state(1) is PeerState.DOWN)
        nets[2].send(1, b"sent before server 1 listened")
        assert nets[2].dropped(1) == 0
        async with mesh([1], table_ids=[1, 2], inbox=inbox, addresses=addresses):
            await eventually(lambda: (2, b"sent before server 1 listened") in inbox.got[1])


# -- unauthenticated connections -----------------------------------------------------------------


async def _tls_trial(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> tuple[str, bytes | None]:
    """One handshake and echo through stdlib ssl: ("ok" | the server's error, client cert DER)."""
    outcome: list[tuple[str, bytes | None]] = []

    async def handler(tcp: trio.SocketStream) -> None:
        stream = trio.SSLStream(tcp, server_ctx, server_side=True)
        try:
            await stream.do_handshake()
            await stream.send_all(await stream.receive_some(100))
            outcome.append(("ok", stream.getpeercert(binary_form=True)))
        except trio.BrokenResourceError as exc:
            outcome.append((str(exc.__cause__), None))
        finally:
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, handler, 0)
        port = listeners[0].socket.getsockname()[1]
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        client = trio.SSLStream(tcp, client_ctx, server_hostname="server-1.pst")
        with trio.fail_after(5):
            try:
                await client.do_handshake()
                assert client.version() == "TLSv1.3"
                await client.send_all(b"ping")
                await client.receive_some(100)
            except trio.BrokenResourceError:
                pass
            await trio.aclose_forcefully(client)
            while not outcome:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    return outcome[0]


async def test_cert_optional_still_rejects_bad_certificates_and_admits_none() -> None:
    """The OpenSSL behaviour the unauthenticated path relies on (stdlib ssl, CERT_OPTIONAL)."""
    keys = key_table([1, 2], 0)
    server_ctx = server_context(1, 0, seed_of(1, 0), keys)
    assert server_ctx.verify_mode is ssl.CERT_OPTIONAL
    good, der = await _tls_trial(server_ctx, client_context(2, 0, seed_of(2, 0), keys))
    assert good == "ok" and der is not None
    check_peer(der, 2, 0, keys)
    # (a) a certificate whose key is not in the table still fails the handshake (the clients
    # here do not verify the server, so that only the server's verification is at stake)
    evil = seed_of(2, 0, "evil")
    evil_ctx = client_context(2, 0, evil, {**keys, 2: public_of(evil)})
    evil_ctx.verify_mode = ssl.CERT_NONE
    bad, der = await _tls_trial(server_ctx, evil_ctx)
    assert "certificate verify failed" in bad and der is None
    # ... and so does one of another period's table
    stale_ctx = client_context(2, 5, seed_of(2, 5), key_table([1, 2], 5))
    stale_ctx.verify_mode = ssl.CERT_NONE
    stale, _ = await _tls_trial(server_ctx, stale_ctx)
    assert "certificate verify failed" in stale
    # (b) no certificate at all: the handshake succeeds, unauthenticated
    anonymous, der = await _tls_trial(server_ctx, anonymous_client_context())
    assert anonymous == "ok" and der is None
    ctx = anonymous_client_context()
    assert ctx.verify_mode is ssl.CERT_NONE and not ctx.check_hostname
    assert ctx.minimum_version is ctx.maximum_version is ssl.TLSVersion.TLSv1_3


async def test_recovering_peer_talks_unauthenticated_then_rekeys(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="appliance.net")
    ids = [1, 2, 3, 4]
    addresses = addresses_for(ids)
    inbox = Inbox()
    async with mesh([1, 2, 3], table_ids=ids, inbox=inbox, addresses=addresses) as nets:
        with pytest.raises(ValueError, match="together"):
            PeerNetwork(4, addresses, 0, None, None)
        async with PeerNetwork(4, addresses, on_frame=inbox.handler(4), **FAST) as lost:
            assert lost.recovering and lost.period is None
            with trio.fail_after(5):
                await lost.wait_reachable()
                for net in nets.values():
                    await net.wait_reachable([4])
                    await net.wait_connected([j for j in nets if j != net.me])
            for i, net in nets.items():
                net.send(4, f"{i} to 4".encode())
                lost.send(i, f"4 to {i}".encode())
            await eventually(
                lambda: (
                    sorted(inbox.got[4]) == [(i, f"{i} to 4".encode()) for i in nets]
                    and all((4, f"4 to {i}".encode()) in inbox.got[i] for i in nets)
                )
            )
            for i, net in nets.items():
                assert not net.is_authenticated(4) and 4 in net.unauthenticated_peers()
                assert not lost.is_authenticated(i) and lost.state(i) is PeerState.ANONYMOUS
                assert all(net.is_authenticated(j) for j in nets if j != i)
                assert net.unauthenticated_peers() == {4}
                infos = net.connections(4) + lost.connections(i)
                assert infos and all(not c.authenticated and c.tls_version == "TLSv1.3" for c in infos)
            assert lost.connected_peers() == lost.incoming_peers() == frozenset()
            assert "not authenticated" in caplog.text  # the normal servers fell back, and said so
            # broadcast from the recovering server reaches everyone
            lost.send(EVERYONE, b"hello all")
            await eventually(lambda: all((4, b"hello all") in inbox.got[i] for i in nets))

            # It recovered its period key: from now on it connects authenticated.
            with pytest.raises(ValueError, match="not our entry"):
                lost.rekey(0, key_table(ids, 0), seed_of(4, 9))
            lost.rekey(0, key_table(ids, 0), seed_of(4, 0))
            assert not lost.recovering and lost.period == 0
            with trio.fail_after(5):
                await lost.wait_connected()
                for net in nets.values():
                    await net.wait_connected()
            await eventually(lambda: all(net.is_authenticated(4) for net in nets.values()))
            assert all(lost.is_authenticated(i) for i in nets)
            info = lost.connection_info(1)
            assert info is not None and info.authenticated and info.period == 0
            lost.send(1, b"authenticated now")
            nets[1].send(4, b"welcome back")
            await eventually(
                lambda: (4, b"authenticated now") in inbox.got[1] and (1, b"welcome back") in inbox.got[4]
            )


async def test_stale_peer_falls_back_to_unauthenticated(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="appliance.net")
    ids = [1, 2, 3, 4]
    addresses = addresses_for(ids)
    inbox = Inbox()
    async with mesh([1, 2, 3], table_ids=ids, period=1, inbox=inbox, addresses=addresses) as nets:
        # server 4 missed the refresh to period 1: it still holds period 0's table and key
        stale = PeerNetwork(
            4, addresses, 0, key_table(ids, 0), seed_of(4, 0), on_frame=inbox.handler(4), **FAST
        )
        async with stale:
            with trio.fail_after(5):
                await stale.wait_reachable()
                for net in nets.values():
                    await net.wait_reachable([4])
            for i, net in nets.items():
                net.send(4, f"{i} to 4".encode())
                stale.send(i, f"4 to {i}".encode())
            await eventually(
                lambda: (
                    len(inbox.got[4]) == 3 and all((4, f"4 to {i}".encode()) in inbox.got[i] for i in nets)
                )
            )
            assert sorted(inbox.got[4]) == [(i, f"{i} to 4".encode()) for i in nets]
            for i, net in nets.items():
                assert not net.is_authenticated(4) and not stale.is_authenticated(i)
                assert 4 not in net.incoming_peers() | net.connected_peers()
                assert all(net.is_authenticated(j) for j in nets if j != i)
            for c in stale.connections(1) + nets[1].connections(4):
                assert not c.authenticated and c.tls_version == "TLSv1.3"
            warnings = [
                r for r in caplog.records if r.levelno == logging.WARNING and "not authenticated" in r.message
            ]
            assert any("server 4:" in r.message for r in warnings)  # the stale one's side
            assert any("to server 4" in r.message for r in warnings)  # the others' side
            stale_warnings = [r for r in warnings if r.message.startswith("server 4:")]
            assert len(stale_warnings) <= 3 * 2  # once per peer and change of reason, not per attempt
            # its refresh catches up
            stale.rekey(1, key_table(ids, 1), seed_of(4, 1))
            with trio.fail_after(5):
                await stale.wait_connected()
                for net in nets.values():
                    await net.wait_connected()
            assert all(net.is_authenticated(4) for net in nets.values())
            assert all(stale.is_authenticated(i) for i in nets)


async def test_a_period_change_is_logged_at_info_not_warning(caplog: pytest.LogCaptureFixture) -> None:
    """Servers re-key a moment apart: the fallbacks, refusals and drops in between are routine."""
    caplog.set_level(logging.INFO, logger="appliance.net")
    ids = [1, 2, 3]
    inbox = Inbox()
    refreshing = [True]  # what pst serve's window says: the refresh of period 1 is under way
    options = {i: {"transition": lambda: refreshing[0]} for i in ids}
    async with mesh(ids, inbox=inbox, options=options) as nets:
        with trio.fail_after(5):
            for net in nets.values():
                await net.wait_connected()
        caplog.clear()
        nets[1].rekey(1, key_table(ids, 1), seed_of(1, 1))  # 2 and 3 are still in period 0
        await eventually(lambda: "server 1: connection to server 2" in caplog.text)
        for i in (2, 3):
            nets[1].send(i, b"ahead")
            nets[i].send(1, b"behind")
        await trio.sleep(0.3)
        refreshing[0] = False  # server 1's own rekey keeps its grace; 2 and 3 now re-key too
        for i in (2, 3):
            nets[i].rekey(1, key_table(ids, 1), seed_of(i, 1))
        with trio.fail_after(5):
            for net in nets.values():
                await net.wait_connected()
        assert all(net.is_authenticated(j) for net in nets.values() for j in ids if j != net.me)
    routine = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any(
        "server 1: connection to server 2 at 127.0.0.1" in m and m.endswith("(a period change is under way)")
        for m in routine
    )
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_unauthenticated_rules_and_replies() -> None:
    inbox = Inbox()
    options = {1: {"max_unauthenticated": 1}}
    async with mesh([1, 2], table_ids=[1, 2, 3, 4], inbox=inbox, options=options) as nets:
        with trio.fail_after(5):
            await nets[1].wait_connected([2])
        port = nets[1].listen_port
        assert port is not None
        # claiming server 2, which is connected authenticated: refused, 2 untouched
        stream, frames = await raw_anonymous(port)
        assert stream.version() == "TLSv1.3"
        await frames.send_frame(Hello(2, 0).encode())
        assert await closed_by_peer(frames)
        await trio.aclose_forcefully(stream)
        rejection = nets[1].rejections[-1]
        assert rejection.server == 2 and "authenticated connection" in rejection.reason
        assert nets[1].incoming_peers() == {2} and nets[1].is_authenticated(2)
        # claiming server 3 (which does not run): admitted unauthenticated, both ways
        first, first_frames = await raw_anonymous(port)
        await first_frames.send_frame(Hello(3, 0).encode())
        answer = await first_frames.receive_frame()
        assert answer is not None and Hello.decode(answer) == Hello(1, 0)
        await first_frames.send_frame(b"from the first")
        await eventually(lambda: (3, b"from the first") in inbox.got[1])
        assert nets[1].unauthenticated_peers() == {3} and not nets[1].is_authenticated(3)
        nets[1].send(3, b"reply over its connection")  # our own dial to 3 fails: no listener
        with trio.fail_after(5):
            assert await first_frames.receive_frame() == b"reply over its connection"
        # a second one claiming 3 replaces the first
        second, second_frames = await raw_anonymous(port)
        await second_frames.send_frame(Hello(3, 0).encode())
        assert await second_frames.receive_frame() is not None
        assert await closed_by_peer(first_frames)
        await trio.aclose_forcefully(first)
        await second_frames.send_frame(b"from the second")
        await eventually(lambda: (3, b"from the second") in inbox.got[1])
        # the cap (1 here): one claiming 4 is refused while 3's is open
        third, third_frames = await raw_anonymous(port)
        await third_frames.send_frame(Hello(4, 0).encode())
        assert await closed_by_peer(third_frames)
        await trio.aclose_forcefully(third)
        assert "too many unauthenticated connections" in nets[1].rejections[-1].reason
        assert nets[1].unauthenticated_peers() == {3}
        await trio.aclose_forcefully(second)
        await eventually(lambda: nets[1].unauthenticated_peers() == frozenset())
        nets[1].send(3, b"nobody there")  # 3's connection is gone and our dial fails: dropped
        await eventually(lambda: nets[1].dropped(3) >= 1)


async def test_unauthenticated_hello_only_from_the_claimed_servers_address() -> None:
    """An impostor cannot take a server's id unless it speaks from that server's configured IP."""
    addresses = addresses_for([1, 2])
    addresses[3] = ("127.0.0.2", free_ports(1)[0])  # server 3 lives at another loopback address
    inbox = Inbox()
    async with mesh([1, 2], table_ids=[1, 2, 3], inbox=inbox, addresses=addresses) as nets:
        with trio.fail_after(5):
            await nets[1].wait_connected([2])
        port = nets[1].listen_port
        assert port is not None
        # server 3 is down; an impostor at 127.0.0.1 claims its id: refused, naming both
        stream, frames = await raw_anonymous(port)
        await frames.send_frame(Hello(3, 0).encode())
        assert await closed_by_peer(frames)
        await trio.aclose_forcefully(stream)
        rejection = next(r for r in reversed(nets[1].rejections) if r.direction == "incoming")
        assert rejection.server == 3 and rejection.address.startswith("127.0.0.1:")
        assert rejection.reason == (
            "unauthenticated hello claiming server 3 from 127.0.0.1, "
            "which is not server 3's configured address 127.0.0.2"
        )
        assert nets[1].unauthenticated_peers() == frozenset()
        # the rule compares IPs, not ports: from 127.0.0.2 (any port) the claim is admitted, flagged
        stream, frames = await raw_anonymous(port, local="127.0.0.2")
        await frames.send_frame(Hello(3, 0).encode())
        answer = await frames.receive_frame()
        assert answer is not None and Hello.decode(answer) == Hello(1, 0)
        await frames.send_frame(b"from 3's address")
        await eventually(lambda: (3, b"from 3's address") in inbox.got[1])
        assert nets[1].unauthenticated_peers() == {3} and not nets[1].is_authenticated(3)
        await trio.aclose_forcefully(stream)
        await eventually(lambda: nets[1].unauthenticated_peers() == frozenset())
        # the real server 3, recovering (no keys), dials from the address it listens on: admitted
        async with PeerNetwork(3, addresses, on_frame=inbox.handler(3), **FAST) as lost:
            with trio.fail_after(5):
                await lost.wait_reachable()
            lost.send(EVERYONE, b"3 is back")
            nets[2].send(3, b"welcome")
            await eventually(
                lambda: (
                    all((3, b"3 is back") in inbox.got[i] for i in nets) and (2, b"welcome") in inbox.got[3]
                )
            )

            def admitted(net: PeerNetwork) -> bool:  # 3's own connection, from 127.0.0.2
                return any(c.direction == "incoming" for c in net.connections(3))

            await eventually(lambda: all(admitted(net) for net in nets.values()))
            assert all(not r.reason.startswith("unauthenticated hello") for r in nets[2].rejections)


async def test_routing_prefers_our_outgoing_connection_over_an_unauthenticated_incoming_one() -> None:
    """Frames to a peer we reach ourselves never go to whoever claims its id on a connection to us."""
    addresses = addresses_for([1, 4])
    got_by_4: list[bytes] = []

    async def recovering_4(tcp: trio.SocketStream) -> None:  # server 4 without keys, as the wire sees it
        stream = trio.SSLStream(tcp, anonymous_server_context(4), server_side=True)
        frames = FrameStream(stream)
        try:
            assert await frames.receive_frame() is not None  # the dialer's hello
            await frames.send_frame(Hello(4, 0).encode())
            while (frame := await frames.receive_frame()) is not None:
                got_by_4.append(frame)
        except (trio.BrokenResourceError, FramingError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        server_4 = trio.CancelScope()

        async def serve_4(task_status: trio.TaskStatus[Any]) -> None:
            with server_4:
                await trio.serve_tcp(recovering_4, addresses[4][1], host="127.0.0.1", task_status=task_status)

        await nursery.start(serve_4)
        async with mesh([1], table_ids=[1, 4], addresses=addresses) as nets:
            net = nets[1]
            port = net.listen_port
            assert port is not None
            await eventually(lambda: net.state(4) is PeerState.ANONYMOUS)  # our own, unauthenticated
            # an impostor at server 4's IP claims 4 on a connection to us: admitted, flagged
            stream, frames = await raw_anonymous(port)
            await frames.send_frame(Hello(4, 0).encode())
            assert await frames.receive_frame() is not None
            await eventually(lambda: any(c.direction == "incoming" for c in net.connections(4)))
            net.send(4, b"for server 4")
            await eventually(lambda: got_by_4 == [b"for server 4"])  # over our outgoing connection
            # server 4 goes away and our dial fails: now the incoming connection is the only route
            server_4.cancel()
            await eventually(lambda: net.state(4) is PeerState.DOWN)
            net.send(4, b"no other way")
            with trio.fail_after(5):
                assert await frames.receive_frame() == b"no other way"  # the first frame it ever got
            await trio.aclose_forcefully(stream)
        nursery.cancel_scope.cancel()


async def test_an_impostor_at_rekey_gets_no_frame_meant_for_the_peer() -> None:
    """Issue 9 item 5: in the window between our rekey and the peer's, someone at the peer's own
    address claims its id on an unauthenticated connection. Frames to the peer wait for (or go
    over) a connection we made ourselves to its configured address; the impostor gets none."""
    inbox = Inbox()
    async with mesh([1, 2], table_ids=[1, 2], inbox=inbox) as nets:
        with trio.fail_after(5):
            await nets[1].wait_connected([2])
            await nets[2].wait_connected([1])
        port = nets[1].listen_port
        assert port is not None
        new_keys = key_table([1, 2], 1)
        nets[1].rekey(1, new_keys, seed_of(1, 1))  # server 2 is still in period 0
        stream, frames = await raw_anonymous(port)  # from 127.0.0.1: server 2's configured address
        await frames.send_frame(Hello(2, 0).encode())
        got_by_impostor: list[bytes] = []

        async def listen() -> None:
            with suppress(trio.BrokenResourceError, FramingError):
                while (frame := await frames.receive_frame()) is not None:
                    got_by_impostor.append(frame)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(listen)
            for k in range(20):
                nets[1].send(2, b"frame %d" % k)
                await trio.sleep(0.01)
            nets[2].rekey(1, new_keys, seed_of(2, 1))
            await eventually(lambda: len([d for s, d in inbox.got[2] if s == 1]) >= 20)
            nursery.cancel_scope.cancel()
        await trio.aclose_forcefully(stream)
        assert [d for s, d in inbox.got[2] if s == 1] == [b"frame %d" % k for k in range(20)]
        assert not any(f.startswith(b"frame") for f in got_by_impostor), got_by_impostor


async def _idle_flood(
    port: int, sources: Iterable[str], per_source: int
) -> tuple[list[trio.SocketStream], list[int]]:
    """Open ``per_source`` idle TCP connections (no TLS) from each loopback address in ``sources``.

    Returns them and a one-element counter of those the server has closed so far (watched by
    tasks in the caller's nursery, see :func:`_watch_closed`).
    """
    flood = []
    for source in sources:
        for _ in range(per_source):
            flood.append(await trio.open_tcp_stream("127.0.0.1", port, local_address=source))
    return flood, [0]


async def _watch_closed(tcp: trio.SocketStream, closed: list[int]) -> None:
    with suppress(trio.BrokenResourceError):
        while await tcp.receive_some(1024):
            pass
    closed[0] += 1


async def test_idle_flood_from_one_source_does_not_lock_out_a_peer() -> None:
    """64 idle TCP connections from one address take 4 handshake slots, not all 64."""
    addresses = addresses_for([1, 2])
    options = {1: {"handshake_timeout": 60.0}}  # the flood is not timed out during the test
    async with mesh([1], table_ids=[1, 2], addresses=addresses, options=options) as nets:
        net = nets[1]
        port = net.listen_port
        assert port is not None
        flood, closed = await _idle_flood(port, ["127.0.0.5"], 64)
        async with trio.open_nursery() as nursery:
            for tcp in flood:
                nursery.start_soon(_watch_closed, tcp, closed)
            await eventually(lambda: closed[0] == 60)  # beyond 4 from one source: closed at once
            # server 2 (re)starts while the 4 others still wait: it connects both ways
            keys = key_table([1, 2], 0)
            async with PeerNetwork(2, addresses, 0, keys, seed_of(2, 0), **FAST) as late:
                with trio.fail_after(5):
                    await late.wait_connected()
                    await net.wait_connected()
            assert closed[0] == 60  # the 4 admitted ones are still open (idle, within the timeout)
            nursery.cancel_scope.cancel()
        for tcp in flood:
            await trio.aclose_forcefully(tcp)


async def test_idle_flood_from_many_sources_leaves_the_peers_their_slots() -> None:
    """Handshake slots are kept for the configured peers' addresses."""
    addresses = addresses_for([1, 2])
    options = {1: {"handshake_timeout": 60.0}}
    async with mesh([1], table_ids=[1, 2], addresses=addresses, options=options) as nets:
        net = nets[1]
        port = net.listen_port
        assert port is not None
        # 16 addresses, 4 connections each (within the per-source limit): 64, the global limit
        flood, closed = await _idle_flood(port, [f"127.0.1.{k}" for k in range(1, 17)], 4)
        async with trio.open_nursery() as nursery:
            for tcp in flood:
                nursery.start_soon(_watch_closed, tcp, closed)
            await eventually(lambda: closed[0] == 4)  # 60 taken by strangers, 4 kept for server 2
            keys = key_table([1, 2], 0)
            async with PeerNetwork(2, addresses, 0, keys, seed_of(2, 0), **FAST) as late:
                with trio.fail_after(5):
                    await late.wait_connected()
                    await net.wait_connected()
            nursery.cancel_scope.cancel()
        for tcp in flood:
            await trio.aclose_forcefully(tcp)


async def test_idle_connections_are_closed_after_the_handshake_timeout() -> None:
    """No TLS, or TLS and no hello: closed once the handshake timeout is over (a slot comes back)."""
    options = {1: {"handshake_timeout": 0.3}}
    async with mesh([1], table_ids=[1, 2], options=options) as nets:
        port = nets[1].listen_port
        assert port is not None
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        stream, frames = await raw_anonymous(port)
        closed = [0]
        with trio.fail_after(5):
            await _watch_closed(tcp, closed)
            assert await closed_by_peer(frames)
        await trio.aclose_forcefully(tcp)
        await trio.aclose_forcefully(stream)
        await eventually(lambda: len(nets[1].rejections) >= 2)
        assert [r.reason for r in nets[1].rejections][-2:] == ["no TLS handshake and hello in time"] * 2
        assert nets[1]._slots.pending == 0


def test_refusal_log_one_line_per_source_and_interval() -> None:
    from appliance.net._peers import _RefusalLog

    limiter = _RefusalLog(interval=10.0, max_sources=2)
    assert limiter.admit("10.0.0.1", 0.0) == ("10.0.0.1", 0)
    assert limiter.admit("10.0.0.1", 1.0) is None  # within its window: counted, not logged
    assert limiter.admit("10.0.0.1", 9.9) is None
    assert limiter.admit("10.0.0.2", 5.0) == ("10.0.0.2", 0)  # another source has its own window
    assert limiter.admit("10.0.0.1", 10.0) == ("10.0.0.1", 2)  # next window: the count goes with it
    # at the bound, new sources share one entry while the tracked ones are in their window
    assert limiter.admit("10.0.0.3", 11.0) == ("other sources", 0)
    assert limiter.admit("10.0.0.4", 12.0) is None
    assert limiter.admit("10.0.0.1", 12.0) is None  # a tracked source keeps its own entry
    # once the windows are over, tracked sources are forgotten and new ones get their own
    assert limiter.admit("10.0.0.5", 40.0) == ("10.0.0.5", 0)


async def test_refused_connections_are_logged_once_per_source(caplog: pytest.LogCaptureFixture) -> None:
    """A flood of refused connections from one address gives one warning, not one per connection."""
    addresses = addresses_for([1, 2])
    addresses[3] = ("127.0.0.2", free_ports(1)[0])
    options = {1: {"handshake_timeout": 60.0, "refusal_log_interval": 3600.0}}
    async with mesh([1], table_ids=[1, 2, 3], addresses=addresses, options=options) as nets:
        net = nets[1]
        port = net.listen_port
        assert port is not None
        flood, closed = await _idle_flood(port, ["127.0.0.6"], 24)
        async with trio.open_nursery() as nursery:
            for tcp in flood:
                nursery.start_soon(_watch_closed, tcp, closed)
            await eventually(lambda: closed[0] == 20)
            # two impostors from 127.0.0.1 claiming server 3: both in the rejections, one line
            for _ in range(2):
                stream, frames = await raw_anonymous(port)
                await frames.send_frame(Hello(3, 0).encode())
                assert await closed_by_peer(frames)
                await trio.aclose_forcefully(stream)
            nursery.cancel_scope.cancel()
        for tcp in flood:
            await trio.aclose_forcefully(tcp)
        claims = [r for r in net.rejections if r.server == 3 and r.direction == "incoming"]
        assert len(claims) == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    from_6 = [m for m in warnings if "rejected connection from 127.0.0.6:" in m]
    assert len(from_6) == 1 and "too many handshakes in progress from 127.0.0.6 (at most 4)" in from_6[0]
    from_1 = [m for m in warnings if "rejected connection from server 3 at 127.0.0.1:" in m]
    assert len(from_1) == 1 and "not server 3's configured address 127.0.0.2" in from_1[0]


async def test_peer_configured_by_host_name_is_resolved_for_admission() -> None:
    addresses = addresses_for([1])
    addresses[3] = ("localhost", free_ports(1)[0])
    async with mesh([1], table_ids=[1, 3], addresses=addresses) as nets:
        port = nets[1].listen_port
        assert port is not None
        stream, frames = await raw_anonymous(port, local="127.0.0.2")  # not localhost's IP
        await frames.send_frame(Hello(3, 0).encode())
        assert await closed_by_peer(frames)
        await trio.aclose_forcefully(stream)
        rejection = nets[1].rejections[-1]
        assert rejection.server == 3 and rejection.address.startswith("127.0.0.2:")
        assert "from 127.0.0.2, which is not server 3's configured address localhost (" in rejection.reason
        assert "127.0.0.1" in rejection.reason  # what the name resolved to
        stream, frames = await raw_anonymous(port)  # from 127.0.0.1: localhost
        await frames.send_frame(Hello(3, 0).encode())
        assert await frames.receive_frame() is not None
        await eventually(lambda: 3 in nets[1].unauthenticated_peers())
        await trio.aclose_forcefully(stream)


def test_remembered_peer_certificates_are_per_claimed_server() -> None:
    """The per-period cache of checked peer certificates never lets a certificate pass for
    another server than the one it was checked for, nor one that failed."""
    from appliance.net._peers import _Credentials

    ids = [1, 2, 3]
    keys = key_table(ids, 4)
    creds = _Credentials.build(1, 4, keys, seed_of(1, 4))
    cert_2 = period_certificate(2, 4, seed_of(2, 4)).public_bytes(serialization.Encoding.DER)
    for _ in range(2):
        creds.check_peer(cert_2, 2)
        with pytest.raises(PeerCertificateError, match="it is server 2's"):
            creds.check_peer(cert_2, 3)
    assert creds.checked == {(cert_2, 2)}


async def test_staggered_rekeys_end_with_every_connection_authenticated() -> None:
    """Servers re-keying a few ms apart used to leave an unauthenticated connection for a whole
    period: a server ahead fell back to an anonymous dial, and when the peer's authenticated
    connection came in before that dial was up, nothing upgraded it (is_authenticated stayed
    False, so the log and the store ignored the peer). Now the dial upgrades at once."""
    ids = [1, 2, 3, 4]
    rng = random.Random(5)
    async with mesh(ids) as nets:
        with trio.fail_after(5):
            for net in nets.values():
                await net.wait_connected()
        for period in range(1, 9):
            keys = key_table(ids, period)
            order = rng.sample(ids, len(ids))
            for i in order:
                nets[i].rekey(period, keys, seed_of(i, period))
                await trio.sleep(rng.uniform(0, 0.03))
            await eventually(
                lambda: all(
                    net.is_authenticated(j) and net.state(j) is PeerState.UP
                    for net in nets.values()
                    for j in net.peers
                )
            )
        assert all(net.handshakes["outgoing authenticated"] >= 8 * 3 for net in nets.values())

"""The key-holder link of the network-facing process (appliance/node/link.py), against socket pairs.

Regression tests for two defects a review found: the largest frame a peer may send must cross the
link (it used to crash `pst serve`), and a first key-holder that dies before naming its identity
must not leave `pst serve` waiting forever (the zygote's next child is served).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import trio

from appliance.net import ChannelIdentity
from appliance.net._framing import DEFAULT_MAX_FRAME_SIZE, FrameStream, encode_frame
from appliance.node.keyholder import MAX_LINK_FRAME, decode_msg, encode_msg
from appliance.node.link import KeyHolderLink


async def _no_identity(period: int | None, keys: Mapping[int, bytes], ident: ChannelIdentity | None) -> None:
    return None


async def test_the_largest_peer_frame_crosses_the_link() -> None:
    ours, child_end = socket.socketpair()
    link = KeyHolderLink(None, on_send=lambda _to, _data: None, on_identity=_no_identity)  # type: ignore[arg-type]
    child = FrameStream(trio.SocketStream(trio.socket.from_stdlib_socket(child_end)), MAX_LINK_FRAME)
    got: list[bytes] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(link._session, trio.SocketStream(trio.socket.from_stdlib_socket(ours)))
        link.deliver(2, b"small")
        link.deliver(2, b"x" * DEFAULT_MAX_FRAME_SIZE)  # as large as the peer network allows
        with trio.fail_after(10):
            while len(got) < 2:
                frame = await child.receive_frame()
                assert frame is not None
                got.append(decode_msg(frame, "test")["data"])
        nursery.cancel_scope.cancel()
    assert [len(d) for d in got] == [5, DEFAULT_MAX_FRAME_SIZE]


async def test_a_key_holder_dying_before_its_identity_does_not_hang_pst_serve() -> None:
    ours, zygote_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    seen: list[int | None] = []

    async def on_identity(
        period: int | None, keys: Mapping[int, bytes], ident: ChannelIdentity | None
    ) -> None:
        seen.append(period)

    link = KeyHolderLink(None, on_send=lambda _to, _data: None, on_identity=on_identity)  # type: ignore[arg-type]
    first, first_end = socket.socketpair()  # says hello, then dies
    socket.send_fds(zygote_end, [b"child 1"], [first.fileno()])
    first.close()
    first_end.sendall(encode_frame(encode_msg("hello", pid=1, hardening={})))
    first_end.close()
    second, second_end = socket.socketpair()  # the zygote's next child names its identity
    socket.send_fds(zygote_end, [b"child 2"], [second.fileno()])
    second.close()
    second_end.sendall(
        encode_frame(encode_msg("hello", pid=2, hardening={}))
        + encode_frame(encode_msg("identity", period=None))
    )
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            await nursery.start(link.run, os.getpid() + 10_000_000, ours)
        nursery.cancel_scope.cancel()
    assert seen == [None] and link.children == 2 and link.child_pid == 2
    second_end.close()
    zygote_end.close()


async def test_a_refusal_s_code_crosses_the_link() -> None:
    """A key-holder method refusing with a code (a timestamp whose genTime went stale: the
    coordinator acts on the code, never on the text) gives ``pst serve`` a SigningRefused with
    that code; a refusal without one gives None."""
    from typing import Any

    from appliance.node.keyholder import _Child
    from appliance.protocols.signing import SigningRefused

    async def stale(args: dict[str, Any]) -> bytes:
        raise SigningRefused("this server now refuses the timestamp: ...", code="own-check/time-off")

    async def plain(args: dict[str, Any]) -> bytes:
        raise SigningRefused("no presignature in stock")

    child = _Child.__new__(_Child)  # only its call handling: the methods and the outbox
    child.methods = {"stale": stale, "plain": plain}
    child.outbox, out_receive = trio.open_memory_channel[bytes](10)
    ours, child_end = socket.socketpair()
    link = KeyHolderLink(None, on_send=lambda _to, _data: None, on_identity=_no_identity)  # type: ignore[arg-type]
    child_stream = FrameStream(trio.SocketStream(trio.socket.from_stdlib_socket(child_end)), MAX_LINK_FRAME)
    got: dict[str, str | None] = {}

    async def serve_calls() -> None:
        while True:
            frame = await child_stream.receive_frame()
            assert frame is not None
            await child._call(decode_msg(frame, "test"))
            await child_stream.send_frames([out_receive.receive_nowait()])

    async def ask(method: str) -> None:
        try:
            await link.call(method, 5.0)
        except SigningRefused as exc:
            got[method] = exc.code

    async with trio.open_nursery() as nursery:
        nursery.start_soon(link._session, trio.SocketStream(trio.socket.from_stdlib_socket(ours)))
        nursery.start_soon(serve_calls)
        with trio.fail_after(10):
            await ask("stale")
            await ask("plain")
        nursery.cancel_scope.cancel()
    assert got == {"stale": "own-check/time-off", "plain": None}

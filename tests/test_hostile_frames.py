"""Hostile frames at a real server, from an outsider on an unauthenticated connection.

A server that is down leaves its id free for an unauthenticated connection (that is how a
server without keys rejoins), so anyone who can reach the port can send frames under that id.
They must cost the key-holder nothing it cannot bound: a CBOR tag that cbor2 would decode
natively at quadratic cost (a tag-30 rational of two big integers) is refused before cbor2
reads it, and early frames for the next period are kept within a fixed byte budget.
"""

from __future__ import annotations

import os
import signal
import time
import tomllib
from pathlib import Path

import cbor2
import pytest
import trio
from clusterutil import init_cluster, pst, status

from appliance.crypto import encoding
from appliance.net import FrameStream, anonymous_client_context
from appliance.net._framing import Hello

pytestmark = pytest.mark.slow


def _listen_port(node: Path) -> int:
    cfg = tomllib.loads((node / "config.toml").read_text())
    return int(str(cfg["server"]["listen"]).rsplit(":", 1)[1])


def _stop(node: Path) -> None:
    pid = int((node / "server.pid").read_text())
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"server {node.name} did not stop")


def _rational_frame(size: int) -> bytes:
    """A tag-30 rational of two random integers: ``size`` bytes that cbor2 would reduce by gcd."""
    half = size // 2 - 16
    a = int.from_bytes(os.urandom(half), "big") | 1
    b = int.from_bytes(os.urandom(half), "big") | 1
    return bytes(cbor2.dumps(cbor2.CBORTag(30, [a, b])))


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


async def _send_as(port: int, claimed: int, frames: list[bytes]) -> None:
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, anonymous_client_context(), server_hostname="server-1.pst")
    with trio.fail_after(20):
        await stream.do_handshake()
        out = FrameStream(stream)
        await out.send_frame(Hello(claimed, 0).encode())
        for frame in frames:
            await out.send_frame(frame)
        await trio.sleep(1.0)  # let the server read them before we hang up
        await stream.aclose()


def test_tag_30_frames_and_an_early_frame_flood_cost_a_key_holder_nothing(tmp_path: Path) -> None:
    root = tmp_path / "c"
    init_cluster(root, n=4, period=600, round_ms=80)
    assert pst("cluster", "up", "--dir", str(root), "--detach").returncode == 0
    try:
        _stop(root / "node-4")
        node = root / "node-1"
        rows = {int(str(r["server"])): r for r in status(root)}
        keyholder = int(rows[1]["keyholder"]["pid"])  # type: ignore[index]
        before = _rss_kib(keyholder)
        # Three ~500 KB rationals (cbor2 alone needs seconds for each), then 60 frames of
        # 400 KB for the next period: early frames, kept only up to a fixed byte budget.
        early = encoding.encode({"period": 1, "phase": "ann", "body": os.urandom(400_000)})
        frames = [_rational_frame(500_000) for _ in range(3)] + [early] * 60
        trio.run(_send_as, _listen_port(node), 4, frames)
        grown = _rss_kib(keyholder) - before

        out = pst("refresh", "--now", "--dir", str(root))  # exit status 1: server 4 is stopped
        assert "node-4: stopped" in out.stdout and "None" not in out.stdout, out.stdout + out.stderr
        rows = {int(str(r["server"])): r for r in status(root)}
        for i in (1, 2, 3):
            last = rows[i]["last_refresh"]
            assert isinstance(last, dict) and last["period"] == 1 and last["status"] == "operational", rows[i]
        log = (node / "server.log").read_text()
        assert "server 4: message: cbor: tag 30 not allowed" in log, log[-3000:]
        # The early frames were 24 MB; the key-holder kept at most its 4 MiB budget of them.
        assert grown < 16 * 1024, f"key-holder grew by {grown} KiB"
    finally:
        pst("cluster", "down", "--dir", str(root))

"""The fault-injecting TCP proxy (tests/netproxy.py) on plain TCP echo servers, then a real cluster."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
from netproxy import (
    Addr,
    FaultProxy,
    LinkStats,
    _lookup,
    cluster_source_identifier,
    proc_source_identifier,
    rewrite_cluster_listens,
)

ANY = ("127.0.0.1", 0)


@contextlib.contextmanager
def echo_server() -> Iterator[Addr]:
    """A threaded TCP echo server on 127.0.0.1; yields its address."""
    listener = socket.create_server(ANY)
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                    if not data:
                        return
                    conn.sendall(data)
                except OSError:
                    return

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[:2]
    finally:
        stop.set()
        listener.close()


@contextlib.contextmanager
def proxied(n: int = 1, seed: int = 1, **kwargs: object) -> Iterator[FaultProxy]:
    """A proxy for servers 1..n, each an echo server."""
    with contextlib.ExitStack() as stack:
        targets = [stack.enter_context(echo_server()) for _ in range(n)]
        proxy = FaultProxy({i: (ANY, t) for i, t in enumerate(targets, 1)}, seed, **kwargs)  # type: ignore[arg-type]
        with proxy:
            yield proxy


def dial(proxy: FaultProxy, dst: int, source_host: str = "127.0.0.1") -> socket.socket:
    s = socket.create_connection(proxy.addresses[dst], timeout=5, source_address=(source_host, 0))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def ping(s: socket.socket, data: bytes = b"ping") -> bytes:
    s.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def assert_reset(s: socket.socket) -> None:
    """The proxy reset this connection (not a clean close)."""
    with pytest.raises(ConnectionResetError):
        s.sendall(b"x")
        s.recv(10)


def assert_refused(proxy: FaultProxy, dst: int, source_host: str = "127.0.0.1") -> None:
    """A new connection is reset: at connect (the reset can beat it) or at the first exchange."""
    with pytest.raises(ConnectionResetError), dial(proxy, dst, source_host) as s:
        s.sendall(b"x")
        s.recv(10)


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_bytes_arrive_intact_and_in_order_under_delay_and_jitter() -> None:
    with proxied() as proxy:
        proxy.set_delay(0.02, 0.015)
        sent = [f"{k:05d}|".encode() * (1 + k % 7) for k in range(300)]
        received = bytearray()
        with dial(proxy, 1) as s:

            def read() -> None:
                while len(received) < sum(map(len, sent)):
                    chunk = s.recv(65536)
                    if not chunk:
                        return
                    received.extend(chunk)

            reader = threading.Thread(target=read)
            reader.start()
            for k, data in enumerate(sent):
                s.sendall(data)
                if k % 3 == 0:  # separate chunks, closer together than the jitter
                    time.sleep(0.001)
            reader.join(timeout=20)
        assert bytes(received) == b"".join(sent)
        total = sum(map(len, sent))
        eventually(lambda: proxy.stats().between(None, 1).bytes == total)
        stats = proxy.stats()
        assert stats.between(1, None).bytes == total  # the echo, flowing back
        assert stats.between(None, 1).chunks > 10  # many chunks, so jitter could have reordered them
        assert stats.total.dropped == stats.total.cut == 0


def test_the_delay_is_applied_both_ways() -> None:
    with proxied() as proxy, dial(proxy, 1) as s:
        assert ping(s) == b"ping"
        proxy.set_delay(0.1)
        start = time.monotonic()
        assert ping(s) == b"ping"
        assert time.monotonic() - start >= 0.2
        proxy.set_delay(0.1, 0.05)
        start = time.monotonic()
        for _ in range(3):
            assert ping(s) == b"ping"
        assert time.monotonic() - start >= 3 * 2 * 0.05


def test_delay_per_destination() -> None:
    with proxied(2) as proxy, dial(proxy, 1) as s1, dial(proxy, 2) as s2:
        proxy.set_delay(0.15, dst=1)
        start = time.monotonic()
        assert ping(s1) == b"ping"
        assert time.monotonic() - start >= 0.15  # towards 1; the echo back is not delayed
        assert ping(s2) == b"ping"


def test_most_specific_rule_wins() -> None:
    rules = {(None, None): "any", (None, 2): "to 2", (3, None): "from 3", (3, 2): "3 to 2"}
    assert _lookup(rules, 3, 2, "-") == "3 to 2"
    assert _lookup(rules, 1, 2, "-") == "to 2"
    assert _lookup(rules, 3, 1, "-") == "from 3"
    assert _lookup(rules, None, 1, "-") == "any"
    assert _lookup({(3, 2): "x"}, None, 2, "-") == "-"  # an unknown source matches only "any"


def test_partition_cuts_and_refuses_then_heal_restores() -> None:
    with proxied(2) as proxy:
        s1, s2 = dial(proxy, 1), dial(proxy, 2)
        with s1, s2:
            assert ping(s1) == b"ping" and ping(s2) == b"ping"
            eventually(lambda: len(proxy.connections()) == 2)
            assert proxy.partition(1) == 1
            assert_reset(s1)
            assert ping(s2) == b"ping"  # the other server is not affected
        assert_refused(proxy, 1)
        stats = proxy.stats().to(1)
        assert stats.cut == 1 and stats.refused == 1 and stats.connections == 1
        proxy.heal(1)
        with dial(proxy, 1) as healed:
            assert ping(healed) == b"ping"


def test_partition_by_source_cuts_only_that_source() -> None:
    """With an identify callback, partition(2) also cuts what 2 dials (here: by source address)."""
    hosts = {"127.0.0.2": 2, "127.0.0.3": 3}
    with proxied(1, identify=lambda client, _proxy: hosts.get(client[0])) as proxy:
        from_2, from_3 = dial(proxy, 1, "127.0.0.2"), dial(proxy, 1, "127.0.0.3")
        with from_2, from_3:
            assert ping(from_2) == b"ping" and ping(from_3) == b"ping"
            assert sorted(proxy.connections()) == [(2, 1), (3, 1)]
            assert proxy.partition(2) == 1
            assert_reset(from_2)
            assert ping(from_3) == b"ping"
        assert_refused(proxy, 1, "127.0.0.2")
        eventually(lambda: proxy.stats().between(3, 1).chunks == 2)
        stats = proxy.stats()
        assert stats.between(2, 1).refused == 1 and stats.between(2, 1).cut == 1
        assert stats.between(3, 1) == LinkStats(bytes=8, chunks=2, connections=1)  # two pings
        proxy.heal(2)
        proxy.set_delay(0.1, src=2, dst=1)
        with dial(proxy, 1, "127.0.0.2") as healed:
            start = time.monotonic()
            assert ping(healed) == b"ping"
            assert time.monotonic() - start >= 0.1


def test_blackhole_stalls_and_heal_delivers_in_order() -> None:
    with proxied() as proxy, dial(proxy, 1) as s:
        assert ping(s) == b"ping"
        assert proxy.partition(1, mode="blackhole") == 0
        s.sendall(b"held ")
        s.sendall(b"back")
        s.settimeout(0.3)
        with pytest.raises(TimeoutError):
            s.recv(10)
        s.settimeout(5)
        proxy.heal(1)
        got = b""
        while len(got) < 9:
            got += s.recv(10)
        assert got == b"held back"


def test_drop_resets_connections() -> None:
    with proxied(seed=7) as proxy:
        proxy.set_drop(1.0)
        with dial(proxy, 1) as s:
            assert_reset(s)  # the connection is made, the first chunk resets it
        assert proxy.stats().to(1).dropped == 1
        proxy.set_drop(0.2)
        survived = resets = 0
        for _ in range(20):
            with dial(proxy, 1) as s:
                try:
                    for _ in range(3):
                        assert ping(s) == b"ping"
                    survived += 1
                except ConnectionResetError:
                    resets += 1
        assert survived > 0 and resets > 0
        eventually(lambda: proxy.stats().to(1).dropped == 1 + resets)


def test_unreachable_target_resets_the_dialer() -> None:
    with socket.create_server(ANY) as closed:
        target = closed.getsockname()[:2]
    with FaultProxy({1: (ANY, target)}, seed=0) as proxy:
        assert_refused(proxy, 1)
        assert proxy.stats().to(1).failed == 1


def test_close_cuts_connections_and_stops_listening() -> None:
    with echo_server() as target:
        proxy = FaultProxy({1: (ANY, target)}, seed=0)
        s = dial(proxy, 1)
        assert ping(s) == b"ping"
        proxy.close()
        assert_reset(s)
        s.close()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(proxy.addresses[1], timeout=5).close()
        with pytest.raises(RuntimeError, match="closed"):
            proxy.set_delay(0.1)


def test_a_taken_listen_port_fails_at_once() -> None:
    with socket.create_server(ANY) as taken, pytest.raises(RuntimeError, match="did not start"):
        FaultProxy({1: (taken.getsockname()[:2], ("127.0.0.1", 9))}, seed=0)


def test_bad_fault_settings_are_refused() -> None:
    with proxied() as proxy:
        with pytest.raises(ValueError):
            proxy.set_delay(0.01, 0.02)
        with pytest.raises(ValueError):
            proxy.set_drop(1.5)


def test_proc_identifier_names_the_process_that_dialed() -> None:
    with proxied(identify=proc_source_identifier(lambda: {7: os.getpid()})) as proxy, dial(proxy, 1) as s:
        assert ping(s) == b"ping"
        assert proxy.connections() == [(7, 1)]
    with proxied(identify=proc_source_identifier(lambda: {7: 1})) as proxy, dial(proxy, 1) as s:
        assert ping(s) == b"ping"
        assert proxy.connections() == [(None, 1)]


async def test_usable_from_a_trio_test() -> None:
    with proxied() as proxy:
        proxy.set_delay(0.05)
        stream = await trio.open_tcp_stream(*proxy.addresses[1])
        async with stream:
            start = trio.current_time()
            await stream.send_all(b"trio")
            assert await stream.receive_some(10) == b"trio"
            assert trio.current_time() - start >= 0.1
            proxy.partition(1)
            with pytest.raises(trio.BrokenResourceError):
                await stream.send_all(b"x")
                await stream.receive_some(10)


def test_rewrite_cluster_listens_keeps_c(tmp_path: Path) -> None:
    from appliance.host import config as node_config
    from appliance.node.cluster import config_text, node_dir
    from appliance.protocols.state import Constants

    peers = {i: f"127.0.0.1:{7100 + i}" for i in (1, 2, 3, 4)}
    c = Constants(n=4, t=1, period_length=30, delta=0.1, genesis=1.0, peers=peers)
    for i in c.ids:
        node_dir(tmp_path, i).mkdir()
        (node_dir(tmp_path, i) / "config.toml").write_text(config_text(tmp_path, i, c, 7100))
    links = rewrite_cluster_listens(tmp_path)
    assert set(links) == {1, 2, 3, 4}
    for i, (peer, listen) in links.items():
        cfg = node_config.load(node_dir(tmp_path, i) / "config.toml")
        assert peer == ("127.0.0.1", 7100 + i) and cfg.listen == listen != peer
        assert cfg.constants == c
    assert len({listen for _, listen in links.values()}) == 4


# --- a real cluster behind the proxy ------------------------------------------------------


def last_refresh(row: dict[str, object]) -> int | None:
    last = row.get("last_refresh")
    period = last.get("period") if isinstance(last, dict) else None
    return period if isinstance(period, int) else None


def test_cluster_refreshes_behind_proxy(tmp_path: Path) -> None:
    """Four `pst serve` processes, every peer connection through the proxy (30 ± 20 ms each way)."""
    from clusterutil import STARTUP_ALERTS, alert_kinds, init_cluster, pst, status

    root = tmp_path / "c"
    init_cluster(root, n=4, period=5, round_ms=100)
    links = rewrite_cluster_listens(root)
    with FaultProxy(links, seed=3, identify=cluster_source_identifier(root)) as proxy:
        proxy.set_delay(0.03, 0.02)
        try:
            up = pst("cluster", "up", "--dir", str(root), "--detach")
            assert up.returncode == 0, up.stdout + up.stderr
            seen: dict[int, set[int]] = {i: set() for i in links}  # refreshes each server finished
            deadline = time.monotonic() + 40
            rows = status(root)
            while time.monotonic() < deadline and min(map(len, seen.values())) < 2:
                time.sleep(0.3)
                rows = status(root)
                for i, row in enumerate(rows, 1):
                    if (period := last_refresh(row)) is not None:
                        seen[i].add(period)
            assert min(map(len, seen.values())) >= 2, (seen, rows)
            assert all(r["running"] and r["status"] == "operational" for r in rows), rows
            assert len({r["keytable_fingerprint"] for r in rows}) == 1
            assert alert_kinds(root) <= STARTUP_ALERTS, alert_kinds(root)
            # Every server dialed every other through the proxy, and the proxy knew who dialed.
            dialed = {link for link, st in proxy.stats().links.items() if st.connections}
            assert dialed >= {(i, j) for i in links for j in links if i != j}, dialed
        finally:
            pst("cluster", "down", "--dir", str(root))

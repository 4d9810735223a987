"""sd_notify: messages reach a real datagram socket (path or abstract), watchdog pings, no-op alone."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from clusterutil import PST, init_cluster

from appliance.node.sdnotify import Notifier, socket_address, watchdog_interval


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound where systemd's would be, and its $NOTIFY_SOCKET value."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    yield sock, str(path)
    sock.close()


@pytest.fixture
def abstract_listener() -> Iterator[tuple[socket.socket, str]]:
    name = f"pst-test-notify-{os.getpid()}-{os.urandom(4).hex()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    yield sock, "@" + name
    sock.close()


def pending(sock: socket.socket) -> list[bytes]:
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096))
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(5)
    return out


def test_ready_with_status_is_one_datagram(listener: tuple[socket.socket, str]) -> None:
    sock, address = listener
    notifier = Notifier.from_env({"NOTIFY_SOCKET": address})
    assert notifier.enabled
    assert notifier.ready("server 3: period 7, serving")
    assert sock.recv(4096) == b"READY=1\nSTATUS=server 3: period 7, serving"


def test_status_watchdog_and_stopping(listener: tuple[socket.socket, str]) -> None:
    sock, address = listener
    notifier = Notifier(address)
    assert notifier.status("refreshing period 8")
    assert notifier.ping()
    assert notifier.stopping("SIGTERM received")
    assert sock.recv(4096) == b"STATUS=refreshing period 8"
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=SIGTERM received"


def test_abstract_namespace_address(abstract_listener: tuple[socket.socket, str]) -> None:
    sock, address = abstract_listener
    assert socket_address(address).startswith("\0")
    assert Notifier.from_env({"NOTIFY_SOCKET": address}).ready()
    assert sock.recv(4096) == b"READY=1"


def test_a_newline_in_a_status_cannot_forge_another_assignment(listener: tuple[socket.socket, str]) -> None:
    sock, address = listener
    assert Notifier(address).status("bad peer\nREADY=1")
    assert sock.recv(4096) == b"STATUS=bad peer READY=1"


def test_without_notify_socket_everything_is_a_no_op() -> None:
    notifier = Notifier.from_env({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert notifier.watchdog is None
    assert not notifier.ready("x")
    assert not notifier.ping()
    assert not notifier.stopping()


def test_a_relative_notify_socket_is_refused_not_guessed() -> None:
    assert not Notifier.from_env({"NOTIFY_SOCKET": "notify"}).enabled
    with pytest.raises(ValueError, match="NOTIFY_SOCKET"):
        socket_address("notify")


def test_a_vanished_socket_is_reported_not_raised(tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "gone"))
    assert notifier.enabled
    assert not notifier.ready()


def test_from_env_can_unset_the_variables_for_children(listener: tuple[socket.socket, str]) -> None:
    _, address = listener
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid()), "X": "1"}
    notifier = Notifier.from_env(env, unset=True)
    assert notifier.enabled
    assert notifier.watchdog == 2.0
    assert env == {"X": "1"}


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4243"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "me"}, None),
    ],
)
def test_watchdog_interval_is_half_the_timeout_for_the_right_process(
    env: dict[str, str], expected: float | None
) -> None:
    assert watchdog_interval(env, pid=4242) == expected


async def test_watchdog_task_pings_every_half_timeout(
    listener: tuple[socket.socket, str], autojump_clock: trio.testing.MockClock
) -> None:
    sock, address = listener
    notifier = Notifier.from_env({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "10000000"})
    assert notifier.watchdog == 5.0
    async with trio.open_nursery() as nursery:
        await nursery.start(notifier.run_watchdog)
        await trio.sleep(12.0)  # pings at 0, 5 and 10 s of virtual time
        nursery.cancel_scope.cancel()
    assert pending(sock) == [b"WATCHDOG=1"] * 3


async def test_watchdog_task_returns_at_once_without_a_watchdog(listener: tuple[socket.socket, str]) -> None:
    sock, address = listener
    with trio.fail_after(1):
        async with trio.open_nursery() as nursery:
            await nursery.start(Notifier(address).run_watchdog)
    assert pending(sock) == []


def test_pst_serve_tells_systemd_it_is_ready_pings_and_stopping(
    tmp_path: Path, listener: tuple[socket.socket, str]
) -> None:
    """A real `pst serve` started as systemd would start a Type=notify unit with WatchdogSec=2."""
    sock, address = listener
    init_cluster(tmp_path / "c", n=4, period=60, round_ms=100)
    env = {**os.environ, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "2000000"}
    config = tmp_path / "c" / "node-1" / "config.toml"
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen([*PST, "serve", "--config", str(config)], env=env, stderr=log)
    sock.settimeout(30)  # generous: the 2 cores are shared; messages normally arrive within a second
    try:
        messages = []
        while not any(m.startswith(b"READY=1") for m in messages):
            messages.append(sock.recv(4096))
        ready = next(m for m in messages if m.startswith(b"READY=1"))
        api = tmp_path / "c" / "node-1" / "api.sock"
        assert ready == f"READY=1\nSTATUS=server 1: serving, local API on {api}".encode()
        while sock.recv(4096) != b"WATCHDOG=1":  # pinged every second
            pass
        proc.send_signal(signal.SIGTERM)
        while (message := sock.recv(4096)) == b"WATCHDOG=1":
            pass
        assert message == b"STOPPING=1\nSTATUS=SIGTERM received"
        assert proc.wait(timeout=30) == 0, (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()

"""Proactively secure links (paper §5.4) through real `pst serve` processes, across refreshes.

Four servers (n=4, t=1, periods of 5 s). Clients of application "tunnel" at servers 1 and 3
exchange messages with the client library; a message goes over the servers' period channels
and lands in the destination's inbox. Messages are sent before and after refreshes, and one is
sent while nobody receives through a refresh: all arrive, once, with the period they arrived in.
A server without a client of the application refuses with that reason.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from clusterutil import running_cluster, status

from appliance.api.client import PstClient, PstError

APP = "tunnel"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with running_cluster(tmp_path_factory.mktemp("links") / "c", n=4, period=5, round_ms=100) as root:
        yield root


def _client(root: Path, i: int, name: str = APP) -> PstClient:
    sock = root / f"node-{i}" / "api.sock"
    deadline = time.monotonic() + 30
    while True:
        try:
            client = PstClient(sock, timeout=40)
            client.register(name)
            return client
        except (PstError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def _send(client: PstClient, to: int, data: bytes) -> None:
    """Send, retrying while the network is still starting (channels not yet authenticated)."""
    deadline = time.monotonic() + 40
    while True:
        try:
            client.send(to, data, timeout=5)
            return
        except PstError as exc:
            if exc.code != "unavailable" or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _wait_for_period(root: Path, period: int) -> None:
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        rows = status(root)
        if all(int(r.get("period") or 0) >= period for r in rows):
            return
        time.sleep(0.3)
    raise AssertionError(f"no refresh to period {period}: {status(root)}")


def test_clients_of_one_application_talk_across_refreshes(cluster: Path) -> None:
    a, b = _client(cluster, 1), _client(cluster, 3)
    _send(a, 3, b"hello from server 1")
    got = b.receive(wait=5)
    assert [(m.sender, m.data) for m in got] == [(1, b"hello from server 1")]
    first_period = got[0].period
    assert isinstance(first_period, int)

    b.send(1, b"and back from server 3")
    (answer,) = a.receive(wait=5)
    assert (answer.sender, answer.data) == (3, b"and back from server 3")

    # Sent, then not received while the servers refresh: still there afterwards, once.
    _send(a, 3, b"waiting through a refresh")
    _wait_for_period(cluster, first_period + 2)
    _send(a, 3, b"after two refreshes")
    got = b.receive(wait=5)
    assert [m.data for m in got] == [b"waiting through a refresh", b"after two refreshes"]
    assert got[1].period is not None and got[1].period >= first_period + 2
    assert b.receive() == []


def test_a_server_without_a_client_of_the_application_refuses(cluster: Path) -> None:
    a = _client(cluster, 1)
    other = _client(cluster, 2, name="someone-else")
    with pytest.raises(PstError) as refused:
        _send(a, 2, b"is anyone there?")
    assert refused.value.code == "refused"
    assert f"no client of {APP!r} is registered at server 2" in refused.value.message
    assert other.receive() == []
    with pytest.raises(PstError) as bad:
        a.send(9, b"nowhere")
    assert bad.value.code == "refused" and "server 9 is not another server" in bad.value.message

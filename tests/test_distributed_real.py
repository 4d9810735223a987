"""Distributed applications (paper §5.1) through real `pst serve` processes and their key-holders.

Four servers (n=4, t=1, a majority is 3). One client of application "ledger" next to each of
servers 1, 2 and 4, registered with the same name and password; a client on server 3 with a
wrong password. Client 1 asks for a signature; clients 2 and 4 see the request pending and
approve it; client 1 gets the group's signature, which verifies under Vcert for that
application. A request nobody approves is refused.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from clusterutil import running_cluster

from appliance.api.client import PstClient, PstError, verify_distributed
from appliance.node.store import StateDir
from appliance.protocols.state import SCERT


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with running_cluster(tmp_path_factory.mktemp("dist") / "c", n=4, period=20, round_ms=100) as root:
        yield root


def _client(root: Path, i: int) -> PstClient:
    sock = root / f"node-{i}" / "api.sock"
    deadline = time.monotonic() + 20
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return PstClient(sock, timeout=40)


def _register(client: PstClient, password: str) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            client.register_distributed("ledger", password)
            return
        except PstError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def test_a_majority_of_clients_gets_a_group_signature(cluster: Path) -> None:
    vcert = StateDir(cluster / "node-1" / "state").load().public.sharings[SCERT].public_key
    c1, c2, c3, c4 = (_client(cluster, i) for i in (1, 2, 3, 4))
    _register(c1, "correct horse")
    _register(c2, "correct horse")
    _register(c3, "wrong password")
    _register(c4, "correct horse")
    payload = b"entry 17: 2026-11-24 the ledger closes"

    approved: dict[PstClient, bytes] = {}

    def approver(client: PstClient) -> None:  # clients 2 and 4 approve what they see pending
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and client not in approved:
            for req in client.pending():
                if req.payload == payload:
                    client.approve(req.request_id)
                    approved[client] = req.request_id
            time.sleep(0.2)

    threads = [threading.Thread(target=approver, args=(c,)) for c in (c2, c4)]
    for thread in threads:
        thread.start()
    try:
        signature = c1.request_distributed(payload)
    finally:
        for thread in threads:
            thread.join()
    assert set(approved) == {c2, c4}, "clients 2 and 4 did not both see the request"
    assert verify_distributed(vcert, "ledger", payload, signature)
    assert not verify_distributed(vcert, "another-app", payload, signature)
    # The client with the wrong password never sees the request: its server refused it.
    assert all(req.payload != payload for req in c3.pending())


def test_a_request_nobody_approves_is_refused(cluster: Path) -> None:
    c1 = _client(cluster, 1)
    _register(c1, "correct horse")
    with pytest.raises(PstError) as info:
        c1.request_distributed(b"nobody approves this")
    assert info.value.code in ("refused", "unavailable"), info.value

"""Distributed applications (paper §5.1) through real `pst serve` processes and their key-holders.

Four servers (n=4, t=1, a majority is 3). One client of application "ledger" next to each of
servers 1, 2 and 4, registered with the same name and password; a client on server 3 with a
wrong password. Client 1 asks for a signature; clients 2 and 4 see the request pending and
approve it; client 1 gets the group's signature, which verifies under Vcert for that
application. A request nobody approves is refused.

The second option of §5.1, certificates: every server trusts a CA made with the openssl command
line (``[server] distributed_ca``); components 1, 2 and 4 of application "escrow" register with
one-time certificates from it and reach a majority the same way; a certificate for another
server, and one used before, are refused by the real servers.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from clusterutil import init_cluster, pst
from cryptography.hazmat.primitives import serialization

from appliance.api._certreg import client_uri
from appliance.api.client import PstClient, PstError, verify_distributed
from appliance.node.store import StateDir
from appliance.protocols.state import SCERT

T = TypeVar("T")


def _openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _client_certificate(root: Path, name: str, index: int, server: int, tag: str) -> tuple[bytes, Any]:
    """A key and a one-time certificate from the operator's client CA, made with openssl."""
    ca = root / "clients-ca"
    _openssl(ca, "genpkey", "-algorithm", "ed25519", "-out", f"{tag}.key")
    _openssl(ca, "req", "-new", "-key", f"{tag}.key", "-subj", f"/CN={name} {index}", "-out", f"{tag}.csr")
    (ca / f"{tag}.ext").write_text(f"subjectAltName=URI:{client_uri(name, index, server)}\n")
    issue = ["-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1", "-extfile", f"{tag}.ext"]
    _openssl(ca, "x509", "-req", "-in", f"{tag}.csr", *issue, "-out", f"{tag}.pem")
    key = serialization.load_pem_private_key((ca / f"{tag}.key").read_bytes(), None)
    return (ca / f"{tag}.pem").read_bytes(), key


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("dist") / "c"
    init_cluster(root, n=4, period=20, round_ms=100)
    ca = root / "clients-ca"
    ca.mkdir()
    _openssl(ca, "genpkey", "-algorithm", "ed25519", "-out", "ca.key")
    ca_args = [
        "-subj",
        "/CN=Escrow clients CA",
        "-days",
        "30",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
    ]
    _openssl(ca, "req", "-x509", "-new", "-key", "ca.key", *ca_args, "-out", "ca.pem")
    for config in root.glob("node-*/config.toml"):
        text = config.read_text()
        config.write_text(text.replace("[server]\n", f'[server]\ndistributed_ca = "{ca / "ca.pem"}"\n', 1))
    up = pst("cluster", "up", "--dir", str(root), "--detach")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield root
    finally:
        pst("cluster", "down", "--dir", str(root))


def _client(root: Path, i: int) -> PstClient:
    sock = root / f"node-{i}" / "api.sock"
    deadline = time.monotonic() + 20
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return PstClient(sock, timeout=40)


def _while_refreshing(call: Callable[[], T], timeout: float = 30.0) -> T:
    """``call()``, again while the server answers that it is not operational: during a refresh
    (every 20 s here) a server briefly holds no share to serve distributed requests with."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except PstError as exc:
            transient = "not operational" in exc.message or "a refresh replaced" in exc.message
            if exc.code != "unavailable" or not transient or time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def _approved_request(
    requester: PstClient, payload: bytes, approvers: dict[int, PstClient], approved: dict[int, bytes]
) -> bytes:
    """``requester``'s distributed request for ``payload``, while each approver approves it once it
    sees it pending (``approved``: approver -> request id). An approver's call that fails (a
    refresh, a slow server) is retried until the request is over; a request that still fails
    reports what the approvers met."""
    done = threading.Event()
    errors: list[str] = []

    def approve(i: int, client: PstClient) -> None:
        while not done.is_set() and i not in approved:
            try:
                for req in client.pending():
                    if req.payload == payload:
                        client.approve(req.request_id)
                        approved[i] = req.request_id
            except PstError as exc:
                errors.append(f"client {i}: {exc.code}: {exc.message}")
            done.wait(0.2)

    threads = [threading.Thread(target=approve, args=item) for item in approvers.items()]
    for thread in threads:
        thread.start()
    try:
        return _while_refreshing(lambda: requester.request_distributed(payload))
    except PstError as exc:
        raise AssertionError(f"{exc}; the approvers met: {errors[-10:]}") from exc
    finally:
        done.set()
        for thread in threads:
            thread.join()


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

    approved: dict[int, bytes] = {}
    # clients 2 and 4 approve what they see pending
    signature = _approved_request(c1, payload, {2: c2, 4: c4}, approved)
    assert set(approved) == {2, 4}, "clients 2 and 4 did not both see the request"
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


def test_certified_components_reach_a_majority_and_certificates_are_one_time(cluster: Path) -> None:
    vcert = StateDir(cluster / "node-1" / "state").load().public.sharings[SCERT].public_key
    clients = {i: _client(cluster, i) for i in (1, 2, 3, 4)}
    certs = {i: _client_certificate(cluster, "escrow", i, i, f"c{i}") for i in (1, 2, 4)}
    deadline = time.monotonic() + 20
    for i, (pem, key) in certs.items():
        while True:
            try:
                clients[i].register_certified(pem, key, server=i)
                break
            except PstError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
    # Server 3 refuses component 2's certificate (another server), and server 1 its used one.
    wrong, wrong_key = _client_certificate(cluster, "escrow", 2, 2, "c2-again")
    with pytest.raises(PstError) as info:
        clients[3].register_certified(wrong, wrong_key, server=3)
    assert info.value.code == "not-permitted" and "the certificate is for server 2, this is server 3" in str(
        info.value
    )
    with pytest.raises(PstError) as info:
        PstClient(cluster / "node-1" / "api.sock").register_certified(*certs[1], server=1)
    assert info.value.code == "not-permitted" and "registered before" in str(info.value)

    payload = b"release escrowed key 7"
    approved: dict[int, bytes] = {}
    signature = _approved_request(clients[1], payload, {i: clients[i] for i in (2, 4)}, approved)
    assert sorted(approved) == [2, 4]
    assert verify_distributed(vcert, "escrow", payload, signature)

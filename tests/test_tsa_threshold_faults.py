"""Threshold mode across refreshes, with one server stopped and with a recovering one (issue 12
§3), real processes: one 4-server cluster (t = 1), the P-256 secret ``tsa`` and
the CA key ``ca`` in C, ``[tsa] mode = "threshold"`` on every server. Every token is signed by
t+1 servers from presignatures, each checking the TSTInfo and that the certificate is the
group's TSA certificate; curl posts what ``openssl ts -query`` made, and ``openssl ts -verify
-queryfile q.tsq -CAfile root.pem`` (the group root only) accepts every reply
(tests/test_ca_tsa_faults.py's ``Cluster``, which does the same for period-key mode).

1. All up: tokens from servers 1 and 3.
2. A refresh (``pst refresh --now``: the presignatures wiped, a new TSA certificate): a token
   from server 2.
3. Server 4 stopped (SIGTERM): two tokens from servers 1-3.
4. Server 4's shares wiped (its period key kept) and restarted: recovering until the next
   refresh; two tokens from servers 1-3 meanwhile.
5. The refresh that recovers it (asked for, up to three: the first after its restart went on
   without it in two of four runs): tokens from server 4 and from servers 1-3.

With server 4 away exactly 2t+1 servers are left, and every presign session needs all three to
answer: on a loaded machine one coordinator (server 3) made no presignature for over a minute
(23 sessions failed) while the others did. So in those phases a token is asked of each of
servers 1-3 in turn until one grants it (docs/tsa.md, "Not done yet").

Every serial is distinct, the tokens carry at least three TSA certificates (one per KeyTable
period: the key stays the network's), and no signer refused an honest coordinator's certificate
(no ``timestamp-outside-policy`` alert). On a loaded machine a proposal may reach a signer more
than the stated accuracy of 1 s old: it is refused without an alert when it is at most 10 s
later than that (``LateTime``, docs/tsa.md), with a ``timestamp-time-off`` alert beyond.

The refreshes are asked for rather than left to a short period: with 20 s periods, server 4
missed a refresh while it was stopped on a loaded machine, came back with a stale period key,
and was left out of every following KeyTable (``own-key-missing-from-keytable`` for four
periods): a refresh-protocol problem, reported, not this test's subject.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from clusterutil import alert_kinds, free_base_port, pst, start, status
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from test_ca_tsa_faults import Cluster, _stop, run

from appliance.apps.tsa import rfc3161
from appliance.crypto import encoding
from appliance.host.files import atomic_write
from appliance.node.cluster import init_cluster
from appliance.protocols.state import CA_SECRET, SCERT

POLICY = "1.3.6.1.4.1.99999.1.3"
PERIOD = 600.0  # refreshes are asked for (pst refresh --now): see the module doc

pytestmark = [pytest.mark.interop, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    folder = tmp_path_factory.mktemp("tsa-threshold-faults")
    root = folder / "cluster"
    init_cluster(
        root,
        n=4,
        t=1,
        period_seconds=PERIOD,
        round_ms=80,
        base_port=free_base_port(4),
        progress=lambda _line: None,
        secrets={SCERT: "ed25519", CA_SECRET: "ed25519", "tsa": "p256"},
        log="off",
    )
    for i in range(1, 5):  # the same [ca] and [tsa] on every server
        config = root / f"node-{i}" / "config.toml"
        config.write_text(
            config.read_text()
            + '\n[ca]\ntsa_names = ["tsa.example.org"]\n'
            + f'\n[tsa]\nmode = "threshold"\npolicy = "{POLICY}"\n'
        )
    (folder / "data.txt").write_bytes(b"stamped by t+1 servers while one is away\n")
    made = run("openssl", "ts", "-query", "-data", folder / "data.txt", "-cert", "-out", folder / "q.tsq")
    assert made.returncode == 0, made.stderr
    up = pst("cluster", "up", "--dir", str(root), "--detach")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        deadline = time.monotonic() + 60
        while True:  # asked again while the root is being made (the first seconds)
            got = pst("ca", "root", "--dir", str(root), "--node", "1", "--wait", "30")
            if got.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        assert got.returncode == 0, got.stdout + got.stderr
        (folder / "root.pem").write_text(got.stdout)
        yield Cluster(root, folder)
    finally:
        pst("cluster", "down", "--dir", str(root))


def _periods(cluster: Cluster) -> dict[int, int]:
    """Each running server's KeyTable period."""
    return {
        int(str(r["server"])): int(str(r["period"]))
        for r in status(cluster.root)
        if r.get("period") is not None
    }


def test_threshold_tokens_across_refreshes_a_stopped_and_a_recovering_server(cluster: Cluster) -> None:
    t0 = time.monotonic()
    serials: list[int] = []
    certificates: set[bytes] = set()
    issuers: list[int] = []

    def mark(what: str) -> None:
        print(f"{time.monotonic() - t0:6.1f} s  {what}: {cluster.states()} periods {_periods(cluster)}")

    def token(*servers: int) -> int:
        """A token from the first of ``servers`` (asked in turn) that grants one, verified by
        ``openssl ts -verify -queryfile q.tsq -CAfile root.pem``; the server that issued it."""
        query = cluster.folder / "q.tsq"
        end = time.monotonic() + 120
        while True:
            for i in servers:
                reply = cluster.folder / f"r{i}.tsr"
                out = run(
                    "curl", "-sS", "-H", "Content-Type: application/timestamp-query",
                    "--data-binary", f"@{query}", "-o", reply, "-w", "%{http_code}", f"{cluster.url(i)}/tsa",
                )  # fmt: skip
                response = rfc3161.decode_response(reply.read_bytes()) if out.stdout == "200" else None
                if response is not None and response.token is not None:
                    verify = run(
                        "openssl",
                        "ts",
                        "-verify",
                        "-queryfile",
                        query,
                        "-in",
                        reply,
                        "-CAfile",
                        cluster.root_pem,
                    )
                    assert "Verification: OK" in verify.stdout, verify.stdout + verify.stderr
                    assert response.tst_info is not None
                    serials.append(rfc3161.decode_tst_info(response.tst_info).serial)
                    (tsa,) = pkcs7.load_der_pkcs7_certificates(response.token)  # the TSA certificate
                    certificates.add(tsa.public_bytes(serialization.Encoding.DER))
                    issuers.append(i)
                    return i
                if response is not None:
                    print(f"server {i}: {response.text}")
            assert time.monotonic() < end, f"no token from servers {servers} in 120 s"
            time.sleep(0.5)

    def refresh(servers: tuple[int, ...]) -> bool:
        """``pst refresh --now``; True once ``servers`` are operational in a later period."""
        before = {i: _periods(cluster).get(i, -1) for i in servers}
        out = pst("refresh", "--now", "--dir", str(cluster.root))
        end = time.monotonic() + 30
        while time.monotonic() < end:
            periods, states = _periods(cluster), cluster.states()
            if all(periods.get(i, -1) > before[i] and states.get(i) == "operational" for i in servers):
                return True
            time.sleep(0.3)
        print(out.stdout, out.stderr)
        return False

    token(1)
    token(3)
    mark("all up")

    # A refresh: the presignatures are wiped, the shares of tsa and ca renewed, the TSA
    # certificate renewed (the key stays the network's).
    assert refresh((1, 2, 3, 4)), cluster.states()
    token(2)
    mark("after a refresh")

    node4 = cluster.node(4)
    _stop(node4)
    token(1, 2, 3)
    token(2, 3, 1)
    mark("server 4 stopped")

    # Its shares wiped (the attacker deleted them); its period key kept, as bench/network.py does.
    period_file = node4 / "state" / "private" / "period.cbor"
    obj = encoding.decode(period_file.read_bytes())
    assert obj["shares"], "server 4 had no shares to lose"
    obj["shares"] = {}
    atomic_write(period_file, encoding.encode(obj), private=True)
    start(node4)
    deadline = time.monotonic() + 30
    while cluster.states().get(4) != "recovering" and time.monotonic() < deadline:
        time.sleep(0.3)
    assert cluster.states()[4] == "recovering", cluster.states()
    token(1, 2, 3)
    token(3, 1, 2)
    assert cluster.states()[4] == "recovering"
    mark("server 4 recovering")

    # The refresh that recovers it. The first one after its restart went on without it in two
    # of four runs (own-key-missing-from-keytable): its code check ran before its announcement,
    # fixed since (docs/design.md, docs/tsa.md). Up to three are still asked for.
    for _ in range(3):
        assert refresh((1, 2, 3)), cluster.states()
        if cluster.states()[4] == "operational":
            break
        time.sleep(2.0)  # (its key-holder restarts with the new KeyTable)
        if cluster.states()[4] == "operational":
            break
    assert cluster.states()[4] == "operational", cluster.states()
    token(4)
    token(2, 1, 3)
    mark("server 4 recovered")

    assert len(set(serials)) == len(serials) == 9
    assert len(certificates) >= 3  # one TSA certificate per KeyTable period, at least three periods
    kinds = alert_kinds(cluster.root)
    print("issued by servers", issuers, "alerts:", sorted(kinds))
    assert "timestamp-outside-policy" not in kinds

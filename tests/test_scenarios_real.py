"""Attack scenarios A and B against a real cluster of `pst serve` processes on loopback.

(C, D and E run in the deterministic simulation with hundreds of seeds, and E also as the
chaos test against real processes.)
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from clusterutil import free_base_port, pst, status

from appliance.crypto import shamir
from appliance.crypto.groups import ED25519
from appliance.node.store import StateDir
from appliance.protocols.state import SCERT


@pytest.fixture
def cluster(tmp_path: Path):  # type: ignore[no-untyped-def]
    root = tmp_path / "c"
    base = free_base_port(4)
    init = pst(
        "cluster",
        "init",
        "--nodes",
        "4",
        "--threshold",
        "1",
        "--dir",
        str(root),
        "--period",
        "600",
        "--round-ms",
        "60",
        "--base-port",
        str(base),
    )
    assert init.returncode == 0, init.stderr
    assert pst("cluster", "up", "--dir", str(root), "--detach").returncode == 0
    yield root
    pst("cluster", "down", "--dir", str(root))


def share(root: Path, i: int) -> int:
    private = StateDir(root / f"node-{i}" / "state").load().private
    assert private is not None
    return private.shares[SCERT].value


def refresh_now(root: Path) -> None:
    out = pst("refresh", "--now", "--dir", str(root))
    assert out.returncode == 0, out.stdout + out.stderr


def test_scenario_a_secrets_copied_before_a_refresh_are_worthless_after_it(cluster: Path) -> None:
    vcert = StateDir(cluster / "node-1" / "state").load().public.sharings[SCERT].public_key
    stolen = share(cluster, 1)  # the attacker copies server 1's whole private data, then leaves
    refresh_now(cluster)
    fresh = {i: share(cluster, i) for i in (1, 2, 3, 4)}
    for j in (2, 3, 4):
        mixed = shamir.interpolate({1: stolen, j: fresh[j]}, ED25519.order)
        assert ED25519.mul_base(mixed) != vcert
    assert ED25519.mul_base(shamir.interpolate({2: fresh[2], 3: fresh[3]}, ED25519.order)) == vcert


def test_scenario_b_corrupted_public_data_and_deleted_shares_heal_without_an_operator(cluster: Path) -> None:
    vcert = StateDir(cluster / "node-1" / "state").load().public.sharings[SCERT].public_key
    node = cluster / "node-3"
    pst("cluster", "down", "--dir", str(cluster))
    m = node / "state" / "public" / "M.cbor"
    data = bytearray(m.read_bytes())
    data[len(data) // 2] ^= 0x55  # the attacker edits the invariant information M
    m.write_bytes(bytes(data))
    (node / "state" / "public" / "keytable.cbor").write_bytes(b"garbage")
    for f in (node / "state" / "private").iterdir():
        f.unlink()  # ... and deletes the shares and period keys
    assert pst("cluster", "up", "--dir", str(cluster), "--detach").returncode == 0
    refresh_now(cluster)
    deadline = time.monotonic() + 30
    rows = status(cluster)
    while time.monotonic() < deadline and not all(r["status"] == "operational" for r in rows):
        time.sleep(0.5)
        rows = status(cluster)
    assert all(r["status"] == "operational" for r in rows), rows
    loaded = StateDir(node / "state").load()
    assert loaded.problems == [] and loaded.public.m is not None and loaded.public.m.vcert == vcert
    assert ED25519.mul_base(share(cluster, 3)) == loaded.public.sharings[SCERT].verification_share(ED25519, 3)

"""Attack scenarios A and B against a real cluster of `pst serve` processes on loopback.

(C, D and E run in the deterministic simulation with hundreds of seeds, and E also as the
chaos test against real processes.)
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from clusterutil import init_cluster, pst, start, status

from appliance.crypto import shamir
from appliance.crypto.groups import ED25519
from appliance.node.store import StateDir
from appliance.protocols.state import SCERT


@pytest.fixture
def cluster(tmp_path: Path):  # type: ignore[no-untyped-def]
    root = tmp_path / "c"
    init_cluster(root, n=4, period=600, round_ms=80)
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
    # The refresh decides on the first n-t key announcements; if server 3's came later (it was
    # still connecting), it stays recovering for that period and heals at the next one.
    for _ in range(3):
        out = pst("refresh", "--now", "--dir", str(cluster))
        if out.returncode == 0:
            break
        assert "server 3: recovering" in out.stdout, out.stdout + out.stderr
    assert out.returncode == 0, out.stdout + out.stderr
    deadline = time.monotonic() + 30
    rows = status(cluster)
    while time.monotonic() < deadline and not all(r["status"] == "operational" for r in rows):
        time.sleep(0.5)
        rows = status(cluster)
    assert all(r["status"] == "operational" for r in rows), rows
    loaded = StateDir(node / "state").load()
    assert loaded.problems == [] and loaded.public.m is not None and loaded.public.m.vcert == vcert
    assert ED25519.mul_base(share(cluster, 3)) == loaded.public.sharings[SCERT].verification_share(ED25519, 3)


def _without_log(config: str) -> str:
    """The config without its [log] section."""
    out, skipping = [], False
    for line in config.splitlines(keepends=True):
        if line.startswith("["):
            skipping = line.strip() == "[log]" or line.startswith("[log.")
        if not skipping:
            out.append(line)
    return "".join(out)


def restart_as(node: Path, argv: list[str]) -> None:
    import os
    import signal
    import subprocess
    import sys

    pid = int((node / "server.pid").read_text())
    os.kill(pid, signal.SIGTERM)
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except OSError:
            break
        time.sleep(0.05)
    with open(node / "server.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    (node / "server.pid").write_text(f"{proc.pid}\n")
    api = node / "api.sock"
    for _ in range(200):
        if api.exists():
            break
        time.sleep(0.05)


def alerts_seen(root: Path, by: list[int]) -> set[tuple[str, int]]:
    import json

    out = set()
    for i in by:
        path = root / f"node-{i}" / "state" / "public" / "alerts.jsonl"
        for line in path.read_text().splitlines() if path.exists() else []:
            a = json.loads(line)
            out.add((a["kind"], a["server"]))
    return out


@pytest.mark.parametrize("fault", ["bad-share", "false-complaint"])
def test_scenario_d_a_malicious_server_is_named_and_the_refresh_completes(cluster: Path, fault: str) -> None:
    faulty = cluster / "node-4"
    script = str(Path(__file__).parent / "faulty_serve.py")
    restart_as(
        faulty, [script, "serve", "--config", str(faulty / "config.toml"), "--fault", fault, "--victim", "2"]
    )
    before = {r["server"]: r["keytable_fingerprint"] for r in status(cluster)}
    out = pst("refresh", "--now", "--dir", str(cluster))
    assert "server 1: operational" in out.stdout, out.stdout + out.stderr
    rows = {r["server"]: r for r in status(cluster)}
    for i in (1, 2, 3):
        assert rows[i]["status"] == "operational" and rows[i]["keytable_fingerprint"] != before[i]
    kind = "bad-share" if fault == "bad-share" else "false-complaint"
    assert {(kind, 4)} <= alerts_seen(cluster, [1, 2, 3])
    assert all(server == 4 for _kind, server in alerts_seen(cluster, [1, 2, 3]))


def test_scenario_c_an_impostor_with_a_stolen_period_key_raises_an_alert(
    cluster: Path, tmp_path: Path
) -> None:
    """The attacker copies server 2's private data and runs a server of its own as server 2."""
    import os
    import shutil
    import signal
    import subprocess
    import sys

    real = cluster / "node-2"
    impostor = tmp_path / "impostor"
    impostor.mkdir()
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    text = (real / "config.toml").read_text()
    listen = next(line for line in text.splitlines() if line.startswith("listen = "))
    text = text.replace(listen, f'listen = "127.0.0.1:{port}"')
    text = text.replace(str(real / "state"), str(impostor / "state"))
    text = text.replace(str(real / "api.sock"), str(impostor / "api.sock"))
    text = text.replace(str(real / "rom"), str(impostor / "rom"))
    (impostor / "config.toml").write_text(_without_log(text))  # the real one holds its syslog ports

    def steal_and_start() -> subprocess.Popen[bytes]:
        """Copy server 2's data as it is now (this period's key) and run it as a second server 2."""
        shutil.rmtree(impostor / "state", ignore_errors=True)
        (impostor / "api.sock").unlink(missing_ok=True)
        shutil.copytree(real / "state", impostor / "state")
        shutil.copy(real / "rom", impostor / "rom")
        proc = start(impostor)
        for _ in range(200):
            if (impostor / "api.sock").exists():
                break
            time.sleep(0.05)
        # let it connect to the others as server 2 (its HTTP service's start holds its loop ~1 s)
        time.sleep(3.0)
        return proc

    def stop(proc: subprocess.Popen[bytes]) -> None:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)

    # The impostor and server 2 compete for server 2's connection slot at the others (their
    # connections flap many times a second), so the impostor's announcement may miss the refresh.
    # Then its stolen key is of a period that is over: the attacker steals again and retries.
    proc = steal_and_start()
    try:
        for attempt in range(4):
            if attempt:
                stop(proc)
                proc = steal_and_start()
            request_file = cluster / "node-1" / "refresh-request.json"
            request_file.unlink(missing_ok=True)
            refresh = subprocess.Popen(
                [sys.executable, "-m", "appliance.cli", "refresh", "--now", "--dir", str(cluster)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for _ in range(250):  # the impostor joins the same refresh, at the same start time
                if request_file.exists():
                    break
                time.sleep(0.02)
            (impostor / "refresh-request.json").write_text(request_file.read_text())
            os.kill(proc.pid, signal.SIGUSR1)
            refresh.communicate(timeout=120)
            seen = alerts_seen(cluster, [1, 3, 4])
            if ("conflicting-key-announcements", 2) in seen:
                break
        tail = "\n".join((impostor / "server.log").read_text(errors="replace").splitlines()[-30:])
        assert ("conflicting-key-announcements", 2) in seen, f"{seen}; the impostor's log ends:\n{tail}"
        assert all(server == 2 for _kind, server in seen)
    finally:
        stop(proc)
    # With the impostor gone, the next refresh heals server 2.
    out = pst("refresh", "--now", "--dir", str(cluster))
    assert out.returncode == 0, out.stdout + out.stderr
    assert all(r["status"] == "operational" for r in status(cluster))

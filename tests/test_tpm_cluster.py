"""Scenario C against real processes whose ROMs are TPMs (issue 8): four `pst serve` processes on
loopback, each with its own swtpm holding Vstart and its announcement key. The attacker wipes
server 2's disk and runs a server of its own as server 2 (the same code, a copy of its ROM's
Vstart, but not its TPM), which announces keys for server 2 in the clear, as a recovering server
does. Server 2 recovers at the first refresh anyway, and the others name the impostor.

(An attacker holding server 2's *current* period key also holds its channel key: its
authenticated connections then keep the wiped server's unauthenticated ones out until the next
KeyTable, so that server recovers one refresh later; docs/security.md says so.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from clusterutil import free_base_port, pst, start, status
from test_rom import Swtpm

from appliance.boot.rom import SimulatedRom
from appliance.boot.tpm import TpmRom
from appliance.host.config import DEFAULT_NV_INDEX
from appliance.node.cluster import init_cluster
from appliance.node.store import StateDir

pytestmark = pytest.mark.slow


@pytest.fixture
def tpm_cluster(tmp_path: Path) -> Iterator[tuple[Path, dict[int, Swtpm]]]:
    tpms = {i: Swtpm(tmp_path / f"swtpm-{i}") for i in range(1, 5)}
    for tpm in tpms.values():
        tpm.start()
    root = tmp_path / "c"
    try:
        init_cluster(
            root,
            n=4,
            t=1,
            period_seconds=600,
            round_ms=80,
            base_port=free_base_port(4),
            progress=lambda _line: None,
            log="off",
            tpm={i: tpm.tcti for i, tpm in tpms.items()},
        )
        up = pst("cluster", "up", "--dir", str(root), "--detach")
        assert up.returncode == 0, up.stdout + up.stderr
        yield root, tpms
    finally:
        pst("cluster", "down", "--dir", str(root))
        for tpm in tpms.values():
            tpm.stop()


def _alerts(root: Path, by: list[int]) -> list[dict[str, object]]:
    out = []
    for i in by:
        path = root / f"node-{i}" / "state" / "public" / "alerts.jsonl"
        out += [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return out


def _stop(pid: int) -> None:
    os.kill(pid, signal.SIGTERM)
    for _ in range(200):
        try:
            os.kill(pid, 0)
        except OSError:
            return
        time.sleep(0.05)


def _wait_for(path: Path) -> None:
    for _ in range(200):
        if path.exists():
            return
        time.sleep(0.05)


def test_a_wiped_tpm_server_recovers_at_the_first_refresh_despite_an_impostor(
    tpm_cluster: tuple[Path, dict[int, Swtpm]], tmp_path: Path
) -> None:
    root, tpms = tpm_cluster
    real = root / "node-2"
    m = StateDir(real / "state").load().public.m
    assert m is not None and sorted(m.ann_keys) == [1, 2, 3, 4]  # every ROM is a TPM
    # A first refresh: every announcement is TPM-signed, and accepted.
    out = pst("refresh", "--now", "--dir", str(root))
    assert out.returncode == 0, out.stdout + out.stderr
    assert all(r["status"] == "operational" for r in status(root))
    assert not _alerts(root, [1, 2, 3, 4])
    # The attacker copies server 2's public data (M, the KeyTable: public anyway), wipes its disk
    # and runs its own server 2 (same code, no TPM, no private data).
    impostor = tmp_path / "impostor"
    shutil.copytree(real / "state", impostor / "state")
    for f in (impostor / "state" / "private").iterdir():
        if f.is_file():
            f.unlink()
    SimulatedRom(impostor / "rom").provision(TpmRom(DEFAULT_NV_INDEX, tpms[2].tcti).read_vstart())
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    text = (real / "config.toml").read_text()
    listen = next(line for line in text.splitlines() if line.startswith("listen = "))
    rom = text[text.index("[rom]") : text.index("[network]")]
    text = text.replace(listen, f'listen = "127.0.0.1:{port}"', 1)
    text = text.replace(rom, f'[rom]\nbackend = "simulated"\npath = "{impostor / "rom"}"\n\n')
    text = text.replace(str(real / "state"), str(impostor / "state"))
    text = text.replace(str(real / "api.sock"), str(impostor / "api.sock"))
    (impostor / "config.toml").write_text(text)
    _stop(int((real / "server.pid").read_text()))
    for sub in ("private", "public"):
        for f in (real / "state" / sub).iterdir():
            if f.is_file():
                f.unlink()
    start(real)  # server 2 again: nothing but its ROM (the TPM) and its code
    _wait_for(real / "api.sock")
    proc = start(impostor)
    _wait_for(impostor / "api.sock")
    time.sleep(3.0)  # both connect to the others as server 2

    # The impostor joins each refresh; server 2 must be operational after it, and the impostor named.
    # (The two compete for server 2's connection slot at the others, so an announcement of either
    # may miss a refresh: then the next one. A full run once saw three refreshes in a row missed:
    # up to five are tried. That competition is a limit of today's channels: docs/security.md.)
    try:
        named = False
        for attempt in range(5):  # noqa: B007 - reported below
            request = root / "node-1" / "refresh-request.json"
            request.unlink(missing_ok=True)
            refresh = subprocess.Popen(
                [sys.executable, "-m", "appliance.cli", "refresh", "--now", "--dir", str(root)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for _ in range(250):
                if request.exists():
                    break
                time.sleep(0.02)
            period = json.loads(request.read_text())["period"]
            (impostor / "refresh-request.json").write_text(request.read_text())
            os.kill(proc.pid, signal.SIGUSR1)
            deadline = time.monotonic() + 30  # the others finish; server 2 may have missed it
            while time.monotonic() < deadline:
                rows = {r["server"]: r for r in status(root)}
                done = [
                    i for i, r in rows.items() if (r.get("last_refresh") or {}).get("period", -1) >= period
                ]  # type: ignore[union-attr]
                if set(done) >= {1, 3, 4} and (2 in done or time.monotonic() > deadline - 20):
                    break
                time.sleep(0.5)
            refresh.kill()
            refresh.communicate()
            named = any(
                a["kind"] == "conflicting-key-announcements"
                and a["server"] == 2
                and "impostor" in str(a["detail"])
                for a in _alerts(root, [1, 3, 4])
            )
            rows = {r["server"]: r for r in status(root)}
            if named and rows[2]["status"] == "operational":
                break
        print(f"server 2 operational after refresh {attempt + 1}")
        tail = "\n".join((impostor / "server.log").read_text(errors="replace").splitlines()[-20:])
        log_text = (impostor / "server.log").read_text(errors="replace")
        # The impostor is named whenever its announcement reached the others over server 2's
        # connection. When the real server 2 held every connection slot for all three refreshes
        # (seen once: the others closed each of the impostor's connections, and its log shows its
        # frames to all three dropped after the last refresh request), its announcement never
        # arrived and there is nothing to name; the recovery is what counts then.
        # Drops are logged once per peer and reason (then at DEBUG), so a log that shows not even a
        # new connection since the last refresh request is shut out too.
        last = log_text.rsplit("refresh of period", 1)[-1]
        shut_out = all(f"dropped a frame to server {i}: unreachable" in last for i in (1, 3, 4)) or not any(
            f"connected to server {i}" in last for i in (1, 3, 4)
        )
        assert named or shut_out, f"the impostor was not named; its log ends:\n{tail}"
        assert rows[2]["status"] == "operational", rows
        assert all(r["status"] == "operational" for r in rows.values()), rows
        # Every alert of the others is about server 2 (the impostor's announcements); none at all
        # when the impostor was shut out.
        about = {a["server"] for a in _alerts(root, [1, 3, 4])}
        assert about == {2} if named else about <= {2}, about
    finally:
        _stop(proc.pid)
    loaded = StateDir(real / "state").load()
    assert loaded.public.m is not None and loaded.public.m.ann_keys == m.ann_keys
    assert loaded.private is not None

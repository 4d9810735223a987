"""Case (B) of the rejoin work with real processes (docs/design.md, "A recovering server's code
check"): a server stopped across a refresh comes back with a stale period key (the KeyTable it
holds is one refresh old) and its shares wiped. The simulation family ``stale-wiped`` covers
the timings; here four `pst serve` processes on loopback (t = 1):

1. All up; a group signature through the API verifies with ``openssl pkeyutl``.
2. Server 4 stopped (SIGTERM); servers 1-3 refresh (``pst refresh --now``) without it.
3. Its shares wiped (the attacker deleted them), its old period key kept; restarted: recovering.
4. Refreshes are asked for (up to three) until it is operational again. As a recovering server
   it checks its installed code against the C in force (off its loop, "code check ok" in its
   log) before it takes its recovery values.
5. One KeyTable, the group public key unchanged, and a new signature verifies with OpenSSL
   against the public key printed before.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
from clusterutil import init_cluster, pst, start, status
from test_ca_tsa_faults import _stop

from appliance.api import app_signing_payload
from appliance.crypto import encoding
from appliance.host.files import atomic_write

pytestmark = pytest.mark.slow


def _rows(root: Path) -> dict[int, dict[str, object]]:
    return {int(str(r["server"])): r for r in status(root)}


def _wait(root: Path, what: str, ok: object, timeout: float = 30.0) -> dict[int, dict[str, object]]:
    deadline = time.monotonic() + timeout
    rows = _rows(root)
    while not ok(rows):  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what}: {rows}"
        time.sleep(0.3)
        rows = _rows(root)
    return rows


def _operational(rows: dict[int, dict[str, object]], servers: tuple[int, ...]) -> bool:
    return all(rows.get(i, {}).get("status") == "operational" for i in servers)


def _period(rows: dict[int, dict[str, object]], i: int) -> int:
    p = rows.get(i, {}).get("period")
    return p if isinstance(p, int) else -1


def _signature_verifies(root: Path, tmp: Path, name: str) -> str:
    """Sign a document through the API; ``openssl pkeyutl -verify`` must accept it. The PEM key."""
    doc = tmp / f"{name}.txt"
    doc.write_bytes(f"document {name}".encode())
    for _attempt in range(10):  # a key-holder child between two periods answers "not operational"
        signed = pst("sign", "--dir", str(root), "--out", str(tmp / f"{name}.sig"), str(doc))
        if signed.returncode == 0 or "not operational" not in signed.stderr:
            break
        time.sleep(0.5)
    assert signed.returncode == 0, signed.stdout + signed.stderr
    pem = pst("pubkey", "--dir", str(root), "--pem")
    assert pem.returncode == 0, pem.stderr
    (tmp / f"{name}.pem").write_text(pem.stdout)
    (tmp / f"{name}.payload").write_bytes(app_signing_payload("pst-cli", doc.read_bytes()))
    openssl = shutil.which("openssl")
    assert openssl is not None
    cmd = [openssl, "pkeyutl", "-verify", "-pubin", "-inkey", str(tmp / f"{name}.pem"), "-rawin"]
    cmd += ["-in", str(tmp / f"{name}.payload"), "-sigfile", str(tmp / f"{name}.sig")]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=30)
    assert "Signature Verified Successfully" in result.stdout, result.stdout + result.stderr
    return pem.stdout


def _serving(node: Path) -> int:
    """How many times the server of ``node`` has started serving (its status page's log line)."""
    return (node / "server.log").read_text().count(": status page on ")


def test_a_server_back_with_a_stale_key_and_wiped_shares_recovers(tmp_path: Path) -> None:
    root = tmp_path / "c"
    init_cluster(root, n=4, period=600, round_ms=80)  # refreshes are asked for (pst refresh --now)
    try:
        up = pst("cluster", "up", "--dir", str(root), "--detach")
        assert up.returncode == 0, up.stdout + up.stderr
        rows = _wait(root, "all operational", lambda r: len(r) == 4 and _operational(r, (1, 2, 3, 4)))
        pem = _signature_verifies(root, tmp_path, "before")
        key = {r["group_public_key"] for r in rows.values()}
        assert len(key) == 1

        node4 = root / "node-4"
        stale = _period(rows, 4)
        _stop(node4)
        out = pst("refresh", "--now", "--dir", str(root))
        assert out.returncode in (0, 1), out.stdout + out.stderr
        _wait(root, "1-3 refreshed", lambda r: all(_period(r, i) > stale for i in (1, 2, 3)))

        period_file = node4 / "state" / "private" / "period.cbor"
        obj = encoding.decode(period_file.read_bytes())
        assert obj["shares"] and obj["period"] == stale, obj.get("period")
        obj["shares"] = {}  # the attacker deleted its shares; its period key (now stale) stays
        atomic_write(period_file, encoding.encode(obj), private=True)
        served = _serving(node4)
        start(node4)
        # SIGUSR1 (pst refresh --now) ends a pst serve that has not opened its signal receiver
        # yet, which it does just before its status page starts: wait for that page.
        deadline = time.monotonic() + 60
        while _serving(node4) == served:
            assert time.monotonic() < deadline, "server 4 did not come back"
            time.sleep(0.3)
        _wait(root, "4 back, recovering", lambda r: r.get(4, {}).get("status") == "recovering")

        for _ in range(3):
            pst("refresh", "--now", "--dir", str(root))
            rows = _wait(root, "1-3 operational", lambda r: _operational(r, (1, 2, 3)))
            if _operational(_rows(root), (4,)):
                break
            time.sleep(2.0)  # its key-holder child restarts with the new KeyTable
            if _operational(_rows(root), (4,)):
                break
        rows = _wait(root, "4 operational again", lambda r: _operational(r, (1, 2, 3, 4)), timeout=10)
        assert _period(rows, 4) > stale + 1
        assert {r["group_public_key"] for r in rows.values()} == key
        for _ in range(20):  # a snapshot may fall between two servers' decisions
            if len({r["keytable_fingerprint"] for r in rows.values()}) == 1:
                break
            time.sleep(0.25)
            rows = _rows(root)
        assert len({r["keytable_fingerprint"] for r in rows.values()}) == 1, rows
        assert _signature_verifies(root, tmp_path, "after") == pem
        log = (node4 / "server.log").read_text()
        assert "code check ok" in log and "(off the loop)" in log, log[-3000:]
    finally:
        pst("cluster", "down", "--dir", str(root))

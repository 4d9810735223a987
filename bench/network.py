"""Network benchmark: wall time of a full refresh, one process per server. Prints JSON.

For each n: a local cluster (t the largest the network allows, n >= 3t+1) refreshes once
normally; then one server is stopped, its shares are wiped (its period key is kept, so
its channels still authenticate), it is restarted, and the next refresh recovers it.
The refresh time is what the servers measure themselves (status.json, last_refresh: from
the period's start to the signed KeyTable, across the key-holder child that retires at the
decision). With ``--delay MS --jitter MS`` every peer connection goes through the
fault-injecting proxy of the tests (tests/netproxy.py), each chunk delayed by delay +- jitter.
Usage: .venv/bin/python bench/network.py [--sizes 4 7 16] [--delay 50 --jitter 40]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from appliance.boot import bootstrap
from appliance.crypto import encoding
from appliance.host.files import atomic_write
from appliance.protocols.state import max_threshold

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from netproxy import FaultProxy, cluster_source_identifier, rewrite_cluster_listens

PST = [sys.executable, "-m", "appliance.cli"]
#: Only the first agreement view's timeout (8 x delta, at least 0.5 s); nothing waits for it
#: when the network behaves.
ROUND_MS = 100


def pst(*args: str, ok: tuple[int, ...] = (0,)) -> str:
    out = subprocess.run([*PST, *args], capture_output=True, text=True, timeout=120, check=False)
    if out.returncode not in ok:
        raise RuntimeError(f"pst {' '.join(args)}: {out.stdout}{out.stderr}")
    return out.stdout


def statuses(root: Path) -> list[dict[str, Any]]:
    # Exit status 1 says a server is not operational (recovering, behind, stopped): that is what
    # the benchmark watches, not a failure of the command.
    rows: list[dict[str, Any]] = json.loads(pst("status", "--dir", str(root), "--json", ok=(0, 1)))
    return rows


def wait_period(root: Path, period: int, timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = statuses(root)
        if all((r.get("last_refresh") or {}).get("period", -1) >= period for r in rows):
            return rows
        time.sleep(0.3)
    raise RuntimeError(f"period {period} not reached in {timeout} s: {statuses(root)}")


def wipe_shares(node: Path) -> None:
    path = node / "state" / "private" / "period.cbor"
    obj = encoding.decode(path.read_bytes())
    obj["shares"] = {}
    atomic_write(path, encoding.encode(obj), private=True)


def bench(n: int, base_port: int, delay_ms: float, jitter_ms: float, log_mode: str = "key") -> dict[str, Any]:
    t = max_threshold(n)
    round_ms = ROUND_MS
    # Long enough that the stopped server, restarted a second after a refresh ended, is up before
    # the next one starts (at n=16 on 2 cores a start takes ~4 s and a refresh ~5 s).
    period = max(5.0, n * 1.0) + delay_ms / 1000 * 30
    root = Path(tempfile.mkdtemp(prefix=f"pst-bench-{n}-"))
    shutil.rmtree(root)
    pst(
        "cluster",
        "init",
        "--nodes",
        str(n),
        "--threshold",
        str(t),
        "--dir",
        str(root),
        "--period",
        f"{period:g}",
        "--round-ms",
        str(round_ms),
        "--base-port",
        str(base_port),
        "--log",
        log_mode,
    )
    proxy = None
    if delay_ms:
        links = rewrite_cluster_listens(root)
        proxy = FaultProxy(links, seed=n, identify=cluster_source_identifier(root))
        proxy.set_delay(delay_ms / 1000, jitter_ms / 1000)
    try:
        pst("cluster", "up", "--dir", str(root), "--detach")
        first = statuses(root)
        p0 = max(r.get("period") or 0 for r in first)
        rows = wait_period(root, p0 + 1, period * 3)
        first_refresh = max(r["last_refresh"]["duration_s"] for r in rows)
        # Steady state: the second refresh after start (connections up, key-holders warm).
        rows = wait_period(root, p0 + 2, period * 3)
        normal = max(r["last_refresh"]["duration_s"] for r in rows)
        victim = root / f"node-{n}"
        pid = int((victim / "server.pid").read_text())
        os.kill(pid, 15)
        time.sleep(1.0)
        wipe_shares(victim)
        with open(victim / "server.log", "ab") as log:
            proc = subprocess.Popen(  # as `pst cluster up` starts it: measured first, isolated
                bootstrap.command("serve", "--config", str(victim / "config.toml")),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        (victim / "server.pid").write_text(f"{proc.pid}\n")
        time.sleep(1.0)
        p1 = max(r["last_refresh"]["period"] for r in rows)
        rows = wait_period(root, p1 + 1, period * 3)
        recovered = next(r for r in rows if r["server"] == n)
        with_recovery = max(r["last_refresh"]["duration_s"] for r in rows)
        time.sleep(1.0)  # the key-holders that retired after the refresh have rewritten status.json
        rows = statuses(root)
        tables = {r["keytable_fingerprint"] for r in rows}
        return {
            "n": n,
            "t": t,
            "log": log_mode,
            "delay_ms": delay_ms,
            "jitter_ms": jitter_ms,
            "period_s": period,
            "first_refresh_after_start_s": first_refresh,
            "refresh_s": normal,
            "refresh_with_recovery_s": with_recovery,
            "recovered_server_status": recovered["status"],
            "all_operational": all(r["status"] == "operational" for r in rows),
            "one_keytable": len(tables) == 1,
            "keytables": sorted(str(x) for x in tables),
        }
    finally:
        subprocess.run([*PST, "cluster", "down", "--dir", str(root)], capture_output=True, check=False)
        if proxy is not None:
            proxy.close()
        subprocess.run(["pkill", "-f", f"{root}/node-"], check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="*", default=[4, 5, 7, 10, 16])
    parser.add_argument("--delay", type=float, default=0.0, help="ms per chunk through the proxy (0: none)")
    parser.add_argument("--jitter", type=float, default=0.0, help="ms of uniform jitter around --delay")
    parser.add_argument("--base-port", type=int, default=27100)
    parser.add_argument(
        "--log", choices=["key", "group", "off"], default="key", help="pst cluster init --log (default key)"
    )
    args = parser.parse_args()
    results = []
    for k, n in enumerate(args.sizes):
        print(f"n={n} ...", file=sys.stderr, flush=True)
        results.append(bench(n, args.base_port + 100 * k, args.delay, args.jitter, args.log))
    report = {
        "benchmark": "network",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
        },
        "results": results,
        "see_also": "bench/signing.py: group-key signing latency and throughput through the local API",
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Group-key signing through the local API: latency p50/p99 and throughput. Prints JSON.

Starts a local cluster (n=5, t=1 by default) whose period is long enough that no refresh
interferes, then signs through the servers' Unix-socket APIs with the real client.
Registrations are spread so that the per-application rate limit (50/s) is not what is
measured. Usage: .venv/bin/python bench/signing.py [--nodes 5 --threshold 1 --count 400]
(n >= 3t+1: t=2 needs --nodes 7.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from appliance.api.client import PstClient
from appliance.host import config as node_config

PST = [sys.executable, "-m", "appliance.cli"]


def pst(*args: str) -> None:
    out = subprocess.run([*PST, *args], capture_output=True, text=True, timeout=120, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"pst {' '.join(args)}: {out.stdout}{out.stderr}")


def latency(sockets: list[str], count: int) -> list[float]:
    clients = []
    for k, path in enumerate(sockets * 2):
        c = PstClient(path)
        c.register(f"bench-latency-{k}", b"bench")
        clients.append(c)
    times = []
    for k in range(count):
        c = clients[k % len(clients)]
        start = time.perf_counter()
        c.sign(f"message {k}".encode())
        times.append((time.perf_counter() - start) * 1000)
        time.sleep(0.02)  # stay under every rate limit: this measures latency, not load
    for c in clients:
        c.close()
    return times


def throughput(sockets: list[str], threads: int, per_thread: int) -> float:
    errors: list[str] = []

    def worker(k: int) -> None:
        with PstClient(sockets[k % len(sockets)]) as c:
            c.register(f"bench-load-{k}", b"bench")
            for j in range(per_thread):
                try:
                    c.sign(f"load {k} {j}".encode())
                except Exception as exc:  # report, do not hide
                    errors.append(str(exc))

    pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    start = time.perf_counter()
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} signing errors, first: {errors[0]}")
    return threads * per_thread / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--threshold", type=int, default=1)
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--base-port", type=int, default=28100)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="pst-bench-sign-")) / "c"
    pst(
        "cluster",
        "init",
        "--nodes",
        str(args.nodes),
        "--threshold",
        str(args.threshold),
        "--dir",
        str(root),
        "--period",
        "3600",
        "--round-ms",
        "50",
        "--base-port",
        str(args.base_port),
    )
    try:
        pst("cluster", "up", "--dir", str(root), "--detach")
        sockets = [
            str(node_config.load(root / f"node-{i}" / "config.toml").api_socket)
            for i in range(1, args.nodes + 1)
        ]
        time.sleep(1.0)
        print("latency ...", file=sys.stderr, flush=True)
        lat = latency(sockets[:1], args.count)
        print("throughput ...", file=sys.stderr, flush=True)
        one_server = throughput(sockets[:1], 8, 60)
        all_servers = throughput(sockets, 10, 60)
    finally:
        subprocess.run([*PST, "cluster", "down", "--dir", str(root)], capture_output=True, check=False)
    q = statistics.quantiles(lat, n=100)
    report: dict[str, Any] = {
        "benchmark": "signing",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
        },
        "n": args.nodes,
        "t": args.threshold,
        "latency_ms": {"p50": round(q[49], 2), "p99": round(q[98], 2), "count": len(lat)},
        "throughput_per_s": {
            "one_server_api_8_clients": round(one_server, 1),
            "all_servers_apis_10_clients": round(all_servers, 1),
        },
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

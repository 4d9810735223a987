"""Storage benchmark (issue 14 §4): a real local cluster, n=4 t=1. Prints JSON (one object).

`pst cluster init --store GROUP` (four `pst serve` processes with their key-holders, TLS between
them, the store's writes agreed through its replicated sequence), then for each level of stored
secrets (default 0, 10,000, 100,000): the store is filled up to that many ``secret-single`` items
(sealed by the client library, 64-byte values, spread over applications of 10,000 items each,
the network's quota) by ``--writers`` client threads across the four servers, each sending
``--batch`` writes per request (``store_batch``, the client library's ``store_many``; 1: one
``store_data`` per write), which gives the store rate; ``--single`` more writes one per request
from one client (the latency of a lone write; in an application of their own); then the refresh
time as the servers measure it (status: from the period's start to the signed KeyTable), the
median over the next ``--refreshes`` refreshes of the four servers; then ``--reads`` reads of one
secret through another server (threshold decryption: t+1 shares sealed to the reader, combined by
the client), which gives the retrieve latency. Usage:

    .venv/bin/python bench/storage.py [--counts 0 10000 100000] [--group ed25519|p256]
        [--period 10] [--writers 8] [--batch 200] [--single 200] [--reads 30] [--refreshes 3]
        [--keep DIR]

Not a test (it takes minutes); docs/performance.md "Stored secrets" has the figures.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import nacl.public

from appliance.api.client import PstClient, PstError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from clusterutil import free_base_port

PST = [sys.executable, "-m", "appliance.cli"]
PER_APP = 10_000  # the network's quota of items per application (model.Quotas.max_records)
VALUE = bytes(range(64))


def pst(*args: str) -> str:
    out = subprocess.run([*PST, *args], capture_output=True, text=True, timeout=300, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"pst {' '.join(args)}: {out.stdout}{out.stderr}")
    return out.stdout


def statuses(root: Path) -> list[dict[str, Any]]:
    """`pst status --json` (its exit status is 1 while a server is not operational: still read)."""
    out = subprocess.run(
        [*PST, "status", "--dir", str(root), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if out.returncode not in (0, 1) or not out.stdout.startswith("["):
        raise RuntimeError(f"pst status: {out.stdout}{out.stderr}")
    rows: list[dict[str, Any]] = json.loads(out.stdout)
    return rows


def store_status(root: Path, i: int) -> dict[str, Any]:
    """Server i's store status (its /v1/status page, at the [http] listen address of its config)."""
    config = tomllib.loads((root / f"node-{i}" / "config.toml").read_text())
    with urllib.request.urlopen(f"http://{config['http']['listen']}/v1/status", timeout=10) as response:
        store: dict[str, Any] = json.loads(response.read()).get("store") or {}
    return store


#: Entries the store's sequence gets each period with no write (a mark, n=4 signed digests),
#: two periods' worth: a snapshot this close to the top holds every write.
PERIOD_ENTRIES = 2 * (1 + 4)


def settle(root: Path, timeout: float) -> tuple[dict[int, dict[str, Any]], list[int]]:
    """Wait until the four servers applied the same operations and wrote their snapshot of them
    (the store's background work after a fill is done), or, after ``timeout``, at least n - t = 3
    of them: every server's last status, and the servers still behind then."""
    deadline = time.monotonic() + timeout
    while True:
        stores: dict[int, dict[str, Any]] = {}
        for i in (1, 2, 3, 4):
            try:
                stores[i] = store_status(root, i)
            except OSError:
                stores[i] = {}
        top = max(int(s.get("applied") or 0) for s in stores.values())
        # (a mark and signed digests after the last write take no snapshot of their own: at most
        # PERIOD_ENTRIES to replay)
        done = [
            i
            for i, s in stores.items()
            if s.get("applied") == top and int(s.get("snapshot") or 0) >= top - PERIOD_ENTRIES
        ]
        if len(done) == 4 or (len(done) >= 3 and time.monotonic() > deadline):
            return stores, sorted(set(stores) - set(done))
        if time.monotonic() > deadline + 120:
            raise RuntimeError(f"the store did not settle: {stores}")
        time.sleep(1.0)


def last_period(root: Path) -> int:
    return min(int((r.get("last_refresh") or {}).get("period", -1)) for r in statuses(root))


def refresh_times(root: Path, count: int, timeout: float) -> list[float]:
    """The durations (seconds) at every server of the next ``count`` refreshes after now."""
    start = last_period(root)
    seen: dict[int, dict[int, float]] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for r in statuses(root):
            last = r.get("last_refresh") or {}
            period = int(last.get("period", -1))
            if period > start and last.get("status") == "operational":
                seen.setdefault(period, {})[int(r["server"])] = float(last["duration_s"])
        complete = sorted(p for p, by in seen.items() if len(by) == 4)
        if len(complete) >= count:
            return sorted(d for p in complete[:count] for d in seen[p].values())
        time.sleep(0.3)
    raise RuntimeError(f"{count} refreshes after period {start} not seen in {timeout} s: {seen}")


def client(root: Path, server: int, app: str, unique_id: str) -> PstClient:
    deadline = time.monotonic() + 60
    while True:
        try:
            c = PstClient(root / f"node-{server}" / "api.sock", timeout=60)
            c.register(app, unique_id)
            return c
        except (PstError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def retrying(call: Any, *args: Any, patience: float = 300.0, **kwargs: Any) -> Any:
    """While the network starts or re-keys a channel (``unavailable``): try again, for up to
    ``patience`` seconds. A write answered ``unavailable`` may have been agreed all the same:
    ``exists`` on a retry is done."""
    deadline = time.monotonic() + patience  # (a request may wait 30 s for its answer)
    retried = False
    while True:
        try:
            return call(*args, **kwargs)
        except PstError as exc:
            if retried and exc.code == "exists":
                return None
            if exc.code != "unavailable" or time.monotonic() > deadline:
                raise
            retried = True
            time.sleep(0.2)


def chunks(start: int, stop: int, batch: int) -> list[range]:
    """Items start..stop-1 in runs of at most ``batch`` that stay within one application."""
    out = []
    k = start
    while k < stop:
        end = min(stop, k + batch, (k // PER_APP + 1) * PER_APP)
        out.append(range(k, end))
        k = end
    return out


def store_run(c: PstClient, run: range, owner: nacl.public.PrivateKey) -> None:
    """Store the items of ``run`` (one request, or one per item); every one stored, or raise."""
    if len(run) == 1:
        retrying(c.store_data, f"s{run[0]}", VALUE, "secret-single", reader=owner)
        return
    todo = list(run)
    deadline = time.monotonic() + 120
    while todo:
        items = [(f"s{k}", VALUE) for k in todo]
        results = retrying(c.store_many, items, "secret-single", reader=owner, patience=40.0)
        # An item whose first try was agreed though the answer was lost comes back 'exists'.
        failed = [
            (k, r)
            for k, r in zip(todo, results, strict=True)
            if isinstance(r, PstError) and r.code != "exists"
        ]
        if any(r.code != "unavailable" for _k, r in failed) or time.monotonic() > deadline:
            raise RuntimeError(f"store_many: {failed[:3]}")
        todo = [k for k, _r in failed]


def fill(
    root: Path, start: int, stop: int, writers: int, batch: int, owner: nacl.public.PrivateKey
) -> dict[str, Any]:
    """Store secrets number start..stop-1 (item k: application bench-{k // PER_APP}), ``batch``
    per request."""
    lock = threading.Lock()
    todo = iter(chunks(start, stop, batch))
    latencies: list[float] = []

    def worker(w: int) -> None:
        clients: dict[tuple[str, int], PstClient] = {}
        server = 1 + w % 4
        try:
            while True:
                with lock:
                    run = next(todo, None)
                if run is None:
                    return
                app = f"bench-{run[0] // PER_APP}"
                t0 = time.perf_counter()
                for moves in range(12):
                    if (app, server) not in clients:
                        clients[(app, server)] = client(root, server, app, "bench")
                    try:
                        store_run(clients[(app, server)], run, owner)
                        break
                    except (PstError, RuntimeError) as exc:
                        # A server that cannot apply now (behind, recovering): as a client with
                        # several servers would, write through the next one.
                        print(f"writer {w}: server {server}: {str(exc)[:120]}; next server", file=sys.stderr)
                        if moves == 11:
                            raise
                        clients.pop((app, server)).close()
                        server = server % 4 + 1
                latencies.append(time.perf_counter() - t0)
        finally:
            for c in clients.values():
                c.close()

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(writers) as pool:
        for f in [pool.submit(worker, w) for w in range(writers)]:
            f.result()
    elapsed = time.perf_counter() - t0
    done = stop - start
    return {
        "stored": done,
        "seconds": round(elapsed, 2),
        "per_second": round(done / elapsed, 1) if done else None,
        "batch": batch,
        "request_latency_p50_ms": round(statistics.median(latencies) * 1000, 2) if latencies else None,
    }


def reads(root: Path, count: int, owner: nacl.public.PrivateKey) -> dict[str, Any]:
    """Read secret s0 ``count`` times through server 3 (written through server 1)."""
    reader = client(root, 3, "bench-0", "bench")
    try:
        times = []
        for _ in range(count):
            t0 = time.perf_counter()
            value = retrying(reader.retrieve, "s0", reader=owner)
            times.append(time.perf_counter() - t0)
            assert value == VALUE, "a stored secret read back wrong"
    finally:
        reader.close()
    times.sort()
    return {
        "reads": count,
        "p50_ms": round(statistics.median(times) * 1000, 1),
        "p90_ms": round(times[int(0.9 * (len(times) - 1))] * 1000, 1),
    }


def resume(args: argparse.Namespace) -> None:
    """Start a kept cluster again (its servers open their snapshots and apply the rest of their
    sequences), then time the level it holds: the refreshes, and reads of a secret stored now."""
    root = args.resume / "c"
    t0 = time.perf_counter()
    pst("cluster", "up", "--dir", str(root), "--detach")
    try:
        stores, behind = settle(root, 300)
        level: dict[str, Any] = {
            "secrets": max(int(s.get("items") or 0) for s in stores.values()),
            "resumed": True,
            "reopened_s": round(time.perf_counter() - t0, 1),
            "behind": {i: stores[i].get("applied") for i in behind},
        }
        refresh_times(root, 1, 180)  # warm-up
        durations = refresh_times(root, args.refreshes, args.refreshes * args.period * 4 + 60)
        level["refresh_s"] = {
            "median": round(statistics.median(durations), 3),
            "min": round(durations[0], 3),
            "max": round(durations[-1], 3),
            "samples": len(durations),
        }
        owner = nacl.public.PrivateKey.generate()
        probe = client(root, 1, "bench-probe", "bench")
        try:
            retrying(probe.store_data, "s0", VALUE, "secret-single", reader=owner)
        finally:
            probe.close()
        reader = client(root, 3, "bench-probe", "bench")
        try:
            times = []
            for _ in range(args.reads):
                t1 = time.perf_counter()
                assert retrying(reader.retrieve, "s0", reader=owner) == VALUE
                times.append(time.perf_counter() - t1)
        finally:
            reader.close()
        times.sort()
        level["retrieve"] = {
            "reads": len(times),
            "p50_ms": round(statistics.median(times) * 1000, 1),
            "p90_ms": round(times[int(0.9 * (len(times) - 1))] * 1000, 1),
        }
        print(json.dumps(level, indent=2))
    finally:
        subprocess.run([*PST, "cluster", "down", "--dir", str(root)], capture_output=True, check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[0, 10_000, 100_000])
    parser.add_argument("--group", choices=("ed25519", "p256"), default="ed25519")
    parser.add_argument("--period", type=float, default=10.0)
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=200, help="writes per request (1: store_data)")
    parser.add_argument("--single", type=int, default=200, help="lone writes timed at each level")
    parser.add_argument("--reads", type=int, default=30)
    parser.add_argument("--refreshes", type=int, default=3)
    parser.add_argument("--keep", type=Path, default=None, help="cluster directory (kept)")
    parser.add_argument(
        "--resume",
        type=Path,
        default=None,
        help="a kept directory: start its cluster again and time one level",
    )
    args = parser.parse_args()
    if args.resume is not None:
        resume(args)
        return
    if sorted(args.counts) != args.counts:
        parser.error("--counts: increasing levels")
    base = args.keep or Path(tempfile.mkdtemp(prefix="pst-storage-"))
    root = base / "c"
    pst(
        "cluster", "init", "--store", args.group, "--log", "off", "--nodes", "4", "--threshold", "1",
        "--dir", str(root), "--period", f"{args.period:g}", "--round-ms", "100",
        "--base-port", str(free_base_port(4)),
    )  # fmt: skip
    pst("cluster", "up", "--dir", str(root), "--detach")
    owner = nacl.public.PrivateKey.generate()  # the owner of every item (one unique id)
    levels = []
    try:
        refresh_times(root, 2, 180)  # warm-up: the first refreshes after start are slower
        stored = 0
        for count in args.counts:
            if count > stored:
                writes = fill(root, stored, count, args.writers, args.batch, owner)
                stored = count
            else:
                writes = None
            level: dict[str, Any] = {"secrets": stored, "store": writes}
            if writes is not None:
                t0 = time.perf_counter()
                stores, behind = settle(root, 180)  # snapshots every 10,000 operations or 60 s
                level["settled_s"] = round(time.perf_counter() - t0, 1)
                level["behind"] = {i: stores[i].get("applied") for i in behind}
                level["batches"] = {
                    i: [s.get("batches"), s.get("batched")] for i, s in stores.items()
                }  # per server: batches of writes it sent, operations in them
            if stored and args.single:
                # Lone writes, one per request from one client (in an application of their own).
                base = 10**9 + len(levels) * args.single
                single = fill(root, base, base + args.single, 1, 1, owner)
                level["single_write"] = {
                    "per_second": single["per_second"],
                    "latency_p50_ms": single["request_latency_p50_ms"],
                }
            durations = refresh_times(root, args.refreshes, args.refreshes * args.period * 4 + 60)
            level["refresh_s"] = {
                "median": round(statistics.median(durations), 3),
                "min": round(durations[0], 3),
                "max": round(durations[-1], 3),
                "samples": len(durations),
            }
            if stored:
                level["retrieve"] = reads(root, args.reads, owner)
            levels.append(level)
            print(json.dumps(level), file=sys.stderr, flush=True)
    finally:
        subprocess.run([*PST, "cluster", "down", "--dir", str(root)], capture_output=True, check=False)
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)
    print(
        json.dumps(
            {
                "bench": "storage",
                "n": 4,
                "t": 1,
                "group": args.group,
                "period_s": args.period,
                "writers": args.writers,
                "batch": args.batch,
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                "date": time.strftime("%Y-%m-%d", time.gmtime()),
                "levels": levels,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

"""Period certificates through the local API (issue 13 §5): certificates/s and p50/p99 latency.

Starts a local cluster (n=4, t=1 by default, the ``ca`` key in C, the replicated secure log on,
a period of an hour so no refresh interferes) with one ``[ca.apps]`` profile per benchmark
application, then asks for certificates with the real client, both ways: the server makes the
key (``certificate()``) and the client sends a CSR (``certificate(csr=...)``; the CSR is made
before the clock starts). Each certificate is a threshold Ed25519 signature of the ``ca`` key
(each signer decodes and checks the TBSCertificate) and an entry in the secure log, appended
before the answer. Latency: one client, one request at a time. Throughput: several clients in
threads (32 by default), spread over the servers and applications so that the per-application rate limit
(50/s) is not what is measured. Prints JSON. Usage:
    .venv/bin/python bench/keys.py [--nodes 4 --threshold 1 --count 320 --threads 32 --log key]
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

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.api.client import PstClient
from appliance.host import config as node_config

PST = [sys.executable, "-m", "appliance.cli"]
APPS = 16


def pst(*args: str) -> None:
    out = subprocess.run([*PST, *args], capture_output=True, text=True, timeout=120, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"pst {' '.join(args)}: {out.stdout}{out.stderr}")


def csr() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench")])
    request = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return request.public_bytes(serialization.Encoding.PEM)


def one(client: PstClient, with_csr: bytes | None) -> float:
    start = time.perf_counter()
    issued = client.certificate(csr=with_csr) if with_csr is not None else client.certificate()
    elapsed = (time.perf_counter() - start) * 1000
    assert issued.certificate.startswith(b"-----BEGIN CERTIFICATE-----")
    return elapsed


def latency(socket: str, count: int, use_csr: bool) -> list[float]:
    csrs = [csr() if use_csr else None for _ in range(count)]
    clients = []
    for k in range(4):  # four applications in turn: under their rate limits without pausing
        c = PstClient(socket)
        c.register(f"bench-{k}", b"latency")
        clients.append(c)
    times = [one(clients[k % 4], csrs[k]) for k in range(count)]
    for c in clients:
        c.close()
    return times


def throughput(sockets: list[str], threads: int, per_thread: int, use_csr: bool) -> tuple[float, list[float]]:
    errors: list[str] = []
    latencies: list[float] = []
    csrs = [[csr() if use_csr else None for _ in range(per_thread)] for _ in range(threads)]
    ready = threading.Barrier(threads + 1)

    def worker(k: int) -> None:
        with PstClient(sockets[k % len(sockets)]) as c:
            c.register(f"bench-{(k + 4) % APPS}", b"load")
            ready.wait()
            for request in csrs[k]:
                try:
                    latencies.append(one(c, request))
                except Exception as exc:  # report, do not hide
                    errors.append(str(exc))

    pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for th in pool:
        th.start()
    ready.wait()
    start = time.perf_counter()
    for th in pool:
        th.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} certificate errors, first: {errors[0]}")
    return threads * per_thread / elapsed, latencies


def summary(samples: list[float]) -> dict[str, float]:
    q = statistics.quantiles(samples, n=100, method="inclusive")
    return {"p50_ms": round(q[49], 2), "p99_ms": round(q[98], 2), "count": len(samples)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--threshold", type=int, default=1)
    parser.add_argument("--count", type=int, default=320)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--base-port", type=int, default=28300)
    parser.add_argument("--log", default="key", help="pst cluster init --log (key, group or off)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="pst-bench-keys-")) / "c"
    pst(
        "cluster", "init", "--ca", "--log", args.log, "--nodes", str(args.nodes),
        "--threshold", str(args.threshold), "--dir", str(root), "--period", "3600",
        "--round-ms", "50", "--base-port", str(args.base_port),
    )  # fmt: skip
    profiles = "\n[ca]\n" + "".join(
        f'[ca.apps.bench-{k}]\nnames = ["bench-{k}.example.org"]\n' for k in range(APPS)
    )
    for i in range(1, args.nodes + 1):
        config = root / f"node-{i}" / "config.toml"
        config.write_text(config.read_text() + profiles)
    report: dict[str, Any] = {
        "benchmark": "keys",
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
        },
        "n": args.nodes,
        "t": args.threshold,
        "log": args.log,
    }
    try:
        pst("cluster", "up", "--dir", str(root), "--detach")
        sockets = [
            str(node_config.load(root / f"node-{i}" / "config.toml").api_socket)
            for i in range(1, args.nodes + 1)
        ]
        deadline = time.monotonic() + 60
        while True:  # operational, and the group root made (the first certificate waits for it)
            try:
                with PstClient(sockets[0]) as c:
                    c.register("bench-0", b"warmup")
                    c.certificate()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        # Where a certificate's time goes: the same cluster's plain group signature, and one
        # append of a certificate-sized record to the secure log (what each issuance adds).
        with PstClient(sockets[0]) as c:
            c.register("bench-parts", b"parts")
            record = b"<110>1 2026-11-30T00:00:00.000Z pst-server-1 pst-ca - CERT - " + b"M" * 750
            sign_ms, append_ms = [], []
            for k in range(min(args.count, 100)):
                start = time.perf_counter()
                c.sign(f"bench {k}".encode())
                sign_ms.append((time.perf_counter() - start) * 1000)
                if args.log != "off":
                    start = time.perf_counter()
                    c.log_append([record])
                    append_ms.append((time.perf_counter() - start) * 1000)
            report["parts"] = {"group_signature": summary(sign_ms)}
            if append_ms:
                report["parts"]["log_append_one_record"] = summary(append_ms)
        for mode, use_csr in (("generated", False), ("csr", True)):
            print(f"{mode}: latency ...", file=sys.stderr, flush=True)
            lat = latency(sockets[0], args.count, use_csr)
            print(f"{mode}: throughput ...", file=sys.stderr, flush=True)
            per_thread = max(10, args.count // args.threads)
            rate, loaded = throughput(sockets, args.threads, per_thread, use_csr)
            report[mode] = {
                "sequential_latency": summary(lat),
                "sequential_per_s": round(1000 * len(lat) / sum(lat), 1),
                "concurrent_per_s": round(rate, 1),
                "concurrent_threads": args.threads,
                "concurrent_latency": summary(loaded),
            }
    finally:
        subprocess.run([*PST, "cluster", "down", "--dir", str(root)], capture_output=True, check=False)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

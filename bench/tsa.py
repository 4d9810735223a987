"""Timestamping benchmark: prints JSON (one object) with tokens/s and per-token latencies in ms.

One process, one core: the RFC 3161 codec (pyasn1) and the authority's core with a local P-256
key (the "period-key" mode's signer, and a single-key TSA), request bytes in, reply bytes out;
no HTTP, no threshold signing. Also, as the peer, ``openssl ts -reply`` (one process per reply,
as a shell-scripted TSA would run it).

With ``--cluster``, a real local cluster (n=4, t=1, `pst cluster init`, 12 processes) per mode
instead: "threshold" (every token signed by t+1 servers with the P-256 secret ``tsa``, each
checking it) and "period-key" (``cert = "period"``: each server signs alone with a key the group
certified for the period). Tokens over HTTP (httpx, keep-alive): one at a time with a pause
between (the presignature stock refilled: the latency "while the stock lasts"), then
``--concurrency`` requests in flight spread over the four servers for ``--seconds`` (sustained:
granted tokens/s, and how many were refused with systemFailure). Each phase also gives the CPU
per granted token of the `pst serve` processes, of their key-holders and zygotes, and of the
client (this process), and the run the load average before and after. No secure log
(``--log off``): its append would be measured too. Usage:
    .venv/bin/python bench/tsa.py [--quick]
    .venv/bin/python bench/tsa.py --cluster [--seconds 20] [--concurrency 8] [--modes threshold,period-key]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance.apps.tsa import rfc3161
from appliance.apps.tsa.authority import Authority, MemorySerialStore, SerialAllocator

POLICY = "1.3.6.1.4.1.99999.1.1"


def stand_in() -> tuple[x509.Certificate, x509.Certificate, ec.EllipticCurvePrivateKey]:
    """An Ed25519 root and a P-256 TSA certificate (EKU timeStamping, critical)."""
    root_key = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench root")])
    now = dt.datetime.now(dt.UTC)
    validity = (now - dt.timedelta(days=1), now + dt.timedelta(days=1))
    root = (
        x509.CertificateBuilder(name, name, root_key.public_key(), 1, *validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(root_key, None)
    )
    key = ec.generate_private_key(ec.SECP256R1())
    tsa_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench TSA")])
    tsa = (
        x509.CertificateBuilder(tsa_name, name, key.public_key(), 2, *validity)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.TIME_STAMPING]), critical=True)
        .sign(root_key, None)
    )
    return root, tsa, key


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    cut = statistics.quantiles(ordered, n=100, method="inclusive")
    return {"p50_ms": round(cut[49], 4), "p99_ms": round(cut[98], 4)}


def per_call(fn: Callable[[], Any], count: int) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return times


def bench_ours(count: int) -> dict[str, Any]:
    _root, tsa, key = stand_in()
    chain = rfc3161.SigningChain(tsa.public_bytes(serialization.Encoding.DER))
    algorithm = ec.ECDSA(hashes.SHA256())

    def sign(data: bytes) -> bytes:
        return key.sign(data, algorithm)

    authority = Authority(
        policy=POLICY,
        accuracy=rfc3161.Accuracy(1),
        clock=lambda: dt.datetime.now(dt.UTC),
        serials=SerialAllocator(1, MemorySerialStore(), block=1 << 20),
        chain=chain,
    )
    requests = [
        rfc3161.encode_request("sha256", os.urandom(32), nonce=int.from_bytes(os.urandom(8)), cert_req=True)
        for _ in range(count)
    ]
    for request in requests[:20]:  # warm up
        assert authority.issue(request, sign).record is not None
    iterator = iter(requests)
    latencies = per_call(lambda: authority.issue(next(iterator), sign), count)
    out: dict[str, Any] = {
        "tokens": count,
        "tokens_per_s": round(1000 * count / sum(latencies), 1),
        **percentiles(latencies),
    }
    # Where a token's time goes (median of each step, ms)
    request = requests[0]
    decoded = rfc3161.decode_request(request)
    info = rfc3161.TSTInfo(
        POLICY, decoded.hash_algorithm, decoded.digest, 7, dt.datetime.now(dt.UTC), None, 1
    )
    der = rfc3161.encode_tst_info(info)
    to_sign = rfc3161.signed_attributes(der, chain)
    signature = sign(to_sign)
    token = rfc3161.build_token(der, chain, signature, include_certs=True)
    steps = {
        "decode_request": lambda: rfc3161.decode_request(request),
        "encode_tst_info": lambda: rfc3161.encode_tst_info(info),
        "signed_attributes": lambda: rfc3161.signed_attributes(der, chain),
        "ecdsa_sign": lambda: sign(to_sign),
        "ecdsa_verify": lambda: chain.public_key.verify(signature, to_sign, algorithm),
        "build_token": lambda: rfc3161.build_token(der, chain, signature, include_certs=True),
        "granted_response": lambda: rfc3161.granted_response(token),
        "check_proposal": lambda: authority.check_proposal(der),
    }
    out["steps_ms"] = {
        name: round(statistics.median(per_call(fn, max(50, count // 10))), 4) for name, fn in steps.items()
    }
    return out


OPENSSL_CNF = """
[ tsa ]
default_tsa = tsa_config
[ tsa_config ]
serial = {dir}/serial
crypto_device = builtin
signer_cert = {dir}/tsa.pem
signer_key = {dir}/tsa.key
signer_digest = sha256
default_policy = {policy}
digests = sha256, sha384, sha512
accuracy = secs:1
ordering = no
tsa_name = no
ess_cert_id_chain = no
ess_cert_id_alg = sha256
"""


def bench_openssl(count: int) -> dict[str, Any]:
    _root, tsa, key = stand_in()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "tsa.pem").write_bytes(tsa.public_bytes(serialization.Encoding.PEM))
        (folder / "tsa.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        (folder / "serial").write_text("01\n")
        (folder / "ts.cnf").write_text(OPENSSL_CNF.format(dir=folder, policy=POLICY))
        (folder / "q.tsq").write_bytes(
            rfc3161.encode_request("sha256", os.urandom(32), nonce=5, cert_req=True)
        )
        command = [
            "openssl", "ts", "-reply", "-config", str(folder / "ts.cnf"),
            "-queryfile", str(folder / "q.tsq"), "-out", str(folder / "r.tsr"),
        ]  # fmt: skip
        latencies = per_call(lambda: subprocess.run(command, check=True, capture_output=True), count)
        granted = rfc3161.decode_response((folder / "r.tsr").read_bytes()).status is rfc3161.Status.GRANTED
    return {
        "replies": count,
        "granted": granted,
        "tokens_per_s": round(1000 * count / sum(latencies), 1),
        **percentiles(latencies),
    }


SERVER = """
import datetime as dt, sys, trio
from pathlib import Path
from hypercorn.config import Config
from hypercorn.trio import serve
from starlette.applications import Starlette
from appliance.apps.tsa.authority import Authority, MemorySerialStore, SerialAllocator
from appliance.apps.tsa.service import load_period_key
from appliance.apps.tsa.rfc3161 import Accuracy
from appliance.host.config import TsaConfig
from appliance.web._tsa import local_signer, timestamp_route

folder = Path(sys.argv[1])
key = load_period_key(TsaConfig("period-key", sys.argv[3], folder / "tsa.pem", folder / "tsa.key"), folder)
authority = Authority(policy=sys.argv[3], accuracy=Accuracy(1), clock=lambda: dt.datetime.now(dt.UTC),
                      serials=SerialAllocator(1, MemorySerialStore(), block=1 << 20), chain=key.chain)
app = Starlette(routes=[timestamp_route(authority, local_signer(key.sign))])
config = Config()
config.bind = [f"127.0.0.1:{sys.argv[2]}"]
config.accesslog = None
config.errorlog = None
trio.run(serve, app, config)
"""


def bench_http(count: int, concurrency: int) -> dict[str, Any]:
    """The route on a real hypercorn (trio worker) in its own process, period-key signer; the
    client (httpx, keep-alive, ``concurrency`` requests in flight) in this one: one core each."""
    import socket

    import httpx
    import trio

    _root, tsa, key = stand_in()
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as probe:
        folder = Path(tmp)
        (folder / "tsa.pem").write_bytes(tsa.public_bytes(serialization.Encoding.PEM))
        (folder / "tsa.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        server = subprocess.Popen([sys.executable, "-c", SERVER, tmp, str(port), POLICY])
        try:
            result: dict[str, Any] = trio.run(
                _load, f"http://127.0.0.1:{port}/tsa", count, concurrency, httpx, server.pid
            )
            return result
        finally:
            server.terminate()
            server.wait(timeout=10)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cluster_cpu(serve_pids: list[int]) -> dict[str, float]:
    """CPU seconds so far of the cluster's ``pst serve`` processes and of their descendants
    (zygotes and key-holders), from /proc; a process that already exited is not counted."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    serve = keyholders = 0.0
    for pid in serve_pids:
        serve += cpu_seconds(pid)
        todo = list(children.get(pid, []))
        while todo:
            child = todo.pop()
            try:
                keyholders += cpu_seconds(child)
            except OSError:
                continue
            todo += children.get(child, [])
    return {"serve": serve, "keyholders": keyholders}


def _cpu_per_token(before: dict[str, float], after: dict[str, float], client: float, tokens: int) -> Any:
    """CPU ms per granted token over a phase, by kind of process (the client is this process)."""
    if not tokens:
        return None
    per = {k: round((after[k] - before[k]) * 1000 / tokens, 2) for k in before}
    return {**per, "client": round(client * 1000 / tokens, 2)}


async def _load(url: str, count: int, concurrency: int, httpx: Any, server_pid: int) -> dict[str, Any]:
    import trio

    headers = {"content-type": "application/timestamp-query"}
    body = rfc3161.encode_request("sha256", os.urandom(32), nonce=9, cert_req=True)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=10) as client:
        for _ in range(100):  # wait for the server, then warm up
            try:
                await client.post(url, content=body, headers=headers)
                break
            except httpx.TransportError:
                await trio.sleep(0.1)
        latencies: list[float] = []
        remaining = count

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                start = time.perf_counter()
                answer = await client.post(url, content=body, headers=headers)
                latencies.append((time.perf_counter() - start) * 1000)
                assert answer.status_code == 200 and answer.content[:9] != b""

        start, server_cpu, own_cpu = time.perf_counter(), cpu_seconds(server_pid), time.process_time()
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
        elapsed = time.perf_counter() - start
        server_cpu = cpu_seconds(server_pid) - server_cpu
        own_cpu = time.process_time() - own_cpu
    return {
        "server_cpu_ms_per_token": round(1000 * server_cpu / len(latencies), 3),
        "client_cpu_ms_per_token": round(1000 * own_cpu / len(latencies), 3),
        "requests": len(latencies),
        "concurrency": concurrency,
        "tokens_per_s": round(len(latencies) / elapsed, 1),
        **percentiles(latencies),
    }


def bench_cluster(mode: str, seconds: float, concurrency: int, base_port: int) -> dict[str, Any]:
    """A 4-server cluster whose [tsa] is ``mode``: sequential latency, then sustained load."""
    import httpx
    import trio

    from appliance.host import config as node_config
    from appliance.host.nodes import PID_FILE
    from appliance.node.cluster import init_cluster
    from appliance.protocols.state import CA_SECRET, SCERT

    pst = [sys.executable, "-m", "appliance.cli"]
    root = Path(tempfile.mkdtemp(prefix=f"pst-bench-tsa-{mode}-")) / "c"
    secrets = {SCERT: "ed25519", CA_SECRET: "ed25519", "tsa": "p256"}
    init_cluster(
        root, n=4, t=1, period_seconds=3600.0, round_ms=50, base_port=base_port,
        progress=lambda _line: None, secrets=secrets, log="off",
    )  # fmt: skip
    section = 'mode = "threshold"' if mode == "threshold" else 'mode = "period-key"\ncert = "period"'
    for i in range(1, 5):
        config = root / f"node-{i}" / "config.toml"
        config.write_text(
            config.read_text()
            + f'\n[ca]\ntsa_names = ["tsa.example.org"]\n\n[tsa]\n{section}\npolicy = "{POLICY}"\n'
        )
    urls = [f"{node_config.load(root / f'node-{i}' / 'config.toml').http.url}/tsa" for i in range(1, 5)]
    subprocess.run([*pst, "cluster", "up", "--dir", str(root), "--detach"], check=True, capture_output=True)
    pids = [int((root / f"node-{i}" / PID_FILE).read_text()) for i in range(1, 5)]
    load_before = os.getloadavg()[0]
    try:
        result: dict[str, Any] = trio.run(_cluster_load, urls, seconds, concurrency, httpx, pids)
    finally:
        subprocess.run([*pst, "cluster", "down", "--dir", str(root)], capture_output=True, check=False)
    load = [round(load_before, 1), round(os.getloadavg()[0], 1)]
    return {"mode": mode, "n": 4, "t": 1, "load_average_1min_before_after": load, **result}


async def _cluster_load(
    urls: list[str], seconds: float, concurrency: int, httpx: Any, pids: list[int]
) -> dict[str, Any]:
    import trio

    headers = {"content-type": "application/timestamp-query"}
    body = rfc3161.encode_request("sha256", os.urandom(32), nonce=9, cert_req=True)
    limits = httpx.Limits(max_connections=4 * concurrency, max_keepalive_connections=4 * concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=20) as client:
        reasons: dict[str, int] = {}

        async def post(url: str) -> bool:
            answer = await client.post(url, content=body, headers=headers)
            if answer.status_code != 200:
                reasons[f"HTTP {answer.status_code}"] = reasons.get(f"HTTP {answer.status_code}", 0) + 1
                return False
            reply = rfc3161.decode_response(answer.content)
            if reply.tst_info is None:
                why = (reply.text or "")[:90]
                reasons[why] = reasons.get(why, 0) + 1
            return reply.tst_info is not None

        deadline = time.monotonic() + 90
        for url in urls:  # every server up, its certificate and first presignatures there
            while True:
                try:
                    if await post(url):
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{url}: no token within 90 s")
                await trio.sleep(0.5)
        sequential: list[float] = []
        reasons.clear()
        cpu0, client0 = cluster_cpu(pids), time.process_time()
        for k in range(40):
            await trio.sleep(0.25)  # the stock refills between tokens
            start = time.perf_counter()
            if await post(urls[k % len(urls)]):
                sequential.append((time.perf_counter() - start) * 1000)
        sequential_refused = dict(reasons)
        client_cpu = time.process_time() - client0
        sequential_cpu = _cpu_per_token(cpu0, cluster_cpu(pids), client_cpu, len(sequential))
        reasons.clear()
        latencies: list[float] = []
        refused = 0
        stop = time.monotonic() + seconds

        async def worker(url: str) -> None:
            nonlocal refused
            while time.monotonic() < stop:
                start = time.perf_counter()
                if await post(url):
                    latencies.append((time.perf_counter() - start) * 1000)
                else:
                    refused += 1

        start = time.perf_counter()
        cpu0, client0 = cluster_cpu(pids), time.process_time()
        async with trio.open_nursery() as nursery:
            for k in range(concurrency):
                nursery.start_soon(worker, urls[k % len(urls)])
        elapsed = time.perf_counter() - start
        sustained_cpu = _cpu_per_token(cpu0, cluster_cpu(pids), time.process_time() - client0, len(latencies))
    return {
        "sequential_with_stock": {
            "tokens": len(sequential),
            "refused": sequential_refused,
            **percentiles(sequential),
            "cpu_ms_per_token": sequential_cpu,
        },
        "sustained": {
            "seconds": round(elapsed, 1),
            "concurrency": concurrency,
            "tokens": len(latencies),
            "refused_system_failure": refused,
            "refused_why": reasons,
            "tokens_per_s": round(len(latencies) / elapsed, 1),
            **(percentiles(latencies) if len(latencies) >= 2 else {}),
            "cpu_ms_per_token": sustained_cpu,
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens (a smoke run)")
    parser.add_argument("--cluster", action="store_true", help="real 4-server clusters, one per mode")
    parser.add_argument("--modes", default="threshold,period-key")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--base-port", type=int, default=28500)
    args = parser.parse_args()
    if args.cluster:
        runs = [
            bench_cluster(mode, args.seconds, args.concurrency, args.base_port)
            for mode in args.modes.split(",")
        ]
        machine = {"python": platform.python_version(), "cpus": os.cpu_count()}
        json.dump({"machine": machine, "clusters": runs}, sys.stdout, indent=2)
        print()
        return 0
    count = 300 if args.quick else 3000
    ours = bench_ours(count)
    peer = bench_openssl(30 if args.quick else 200)
    http = bench_http(300 if args.quick else 5000, 8)
    result = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "ours_single_key": ours,
        "ours_http_hypercorn": http,
        "openssl_ts_reply_per_process": peer,
        "ratio_ours_to_openssl": round(ours["tokens_per_s"] / peer["tokens_per_s"], 1),
    }
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

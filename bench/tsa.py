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
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
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
        x509.CertificateBuilder(name, tsa_name, key.public_key(), 2, *validity)  # issuer, subject
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
    cpu = time.process_time()
    latencies = per_call(lambda: authority.issue(next(iterator), sign), count)
    cpu = time.process_time() - cpu
    out: dict[str, Any] = {
        "tokens": count,
        "tokens_per_s": round(1000 * count / sum(latencies), 1),
        "cpu_ms_per_token": round(1000 * cpu / count, 4),
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
from appliance.apps.tsa.authority import Authority, MemorySerialStore, SerialAllocator
from appliance.apps.tsa.service import load_period_key
from appliance.apps.tsa.rfc3161 import Accuracy
from appliance.host.config import HttpConfig, TsaConfig
from appliance.protocols.state import Constants
from appliance.web import WebService
from appliance.web._tsa import local_signer, timestamp_route
from appliance.web._view import Sources

folder, port, policy = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
key = load_period_key(TsaConfig("period-key", policy, folder / "tsa.pem", folder / "tsa.key"), folder)
authority = Authority(policy=policy, accuracy=Accuracy(1), clock=lambda: dt.datetime.now(dt.UTC),
                      serials=SerialAllocator(1, MemorySerialStore(), block=1 << 20), chain=key.chain)
public = folder / "public"
public.mkdir()
(public / "status.json").write_text("{}")
(public / "alerts.jsonl").write_text("")
url = f"http://127.0.0.1:{port}"
sources = Sources(server_id=1, constants=Constants(n=4, t=1, period_length=3600, delta=0.1),
                  status_file=public / "status.json", alerts_file=public / "alerts.jsonl",
                  peer_urls={1: url}, own_url=url)
# The HTTP service of pst serve (hypercorn's trio worker, the guard, the raw /tsa handler)
service = WebService(sources, HttpConfig(listen=("127.0.0.1", port)),
                     tsa=timestamp_route(authority, local_signer(key.sign)))
if sys.argv[4] == "floor":  # hypercorn alone, as configured there: one fixed reply to every POST
    from hypercorn.trio import serve
    from appliance.apps.tsa import rfc3161
    query = rfc3161.encode_request("sha256", bytes(32), nonce=1, cert_req=True)
    reply = authority.issue(query, key.sign).body
    headers = [(b"content-type", b"application/timestamp-reply"), (b"content-length", b"%d" % len(reply))]
    start = {"type": "http.response.start", "status": 200, "headers": headers}
    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
        elif scope["type"] == "http":
            while (await receive()).get("more_body"):
                pass
            await send(start)
            await send({"type": "http.response.body", "body": reply})
    trio.run(serve, app, service.hypercorn_config())
else:
    trio.run(service.run)
"""


def bench_http(
    count: int, concurrency: int, load: str = "httpx", seconds: float = 10.0, app: str = "tsa"
) -> dict[str, Any]:
    """Our single-key TSA over HTTP: ``pst serve``'s HTTP service (hypercorn's trio worker, the
    /tsa route) in its own process, period-key signer; the load from httpx in this process
    (keep-alive, ``concurrency`` requests in flight, ``count`` requests) or from wrk
    (``concurrency`` connections for ``seconds``). ``app="floor"``: hypercorn alone, configured
    the same, answering one fixed reply to every POST (what the HTTP server itself costs)."""
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
        server = subprocess.Popen([sys.executable, "-c", SERVER, tmp, str(port), POLICY, app])
        url = f"http://127.0.0.1:{port}/tsa"
        try:
            if load == "wrk":
                trio.run(_wait_for, [url], httpx)
                root = folder / "root.pem"
                root.write_bytes(_root.public_bytes(serialization.Encoding.PEM))
                root = root if app == "tsa" else None  # the floor's fixed reply answers no query
                return wrk_load([url], seconds, concurrency, folder, root, [server.pid])
            result: dict[str, Any] = trio.run(_load, url, count, concurrency, httpx, server.pid)
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


#: wrk's script: POST the query in $TSQ; count the replies that are not granted; keep the first
#: reply of each thread and one in 500 (up to 4 per thread) in the folder $KEEP for openssl.
WRK_SCRIPT = r"""
local f = assert(io.open(os.getenv("TSQ"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/timestamp-query"
local threads = {}
local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("id", counter)
  table.insert(threads, thread)
end
bad, seen, kept = 0, 0, 0
function response(status, headers, body)
  seen = seen + 1
  -- granted: TimeStampResp SEQUENCE (long length), then PKIStatusInfo { 0 }
  if status ~= 200 or not body:find("^\48\130..\48\3\2\1\0") then
    bad = bad + 1
  elseif kept < 4 and (seen == 1 or seen % 500 == 0) then
    kept = kept + 1
    local out = assert(io.open(string.format("%s/r-%d-%d.tsr", os.getenv("KEEP"), id, kept), "wb"))
    out:write(body)
    out:close()
  end
end
function done(summary, latency, requests)
  local total = 0
  for _, t in ipairs(threads) do total = total + t:get("bad") end
  io.write(string.format("NOT_GRANTED %d\n", total))
  io.write(string.format("LATENCY_US %d %d\n", latency:percentile(50), latency:percentile(99)))
  io.write(string.format("REQUESTS %d ERRORS %d\n", summary.requests,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.status
    + summary.errors.timeout))
end
"""


def process_tree_cpu(pids: list[int]) -> dict[int, float]:
    """User + system CPU seconds of each live process under ``pids`` (themselves included)."""
    out: dict[int, float] = {}
    todo = list(pids)
    while todo:
        pid = todo.pop()
        try:
            out[pid] = cpu_seconds(pid)
            for task in Path(f"/proc/{pid}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return out


def wrk_load(
    urls: list[str], seconds: float, connections: int, folder: Path, root_pem: Path | None, pids: list[int]
) -> dict[str, Any]:
    """``wrk`` against each URL at once (one thread, ``connections`` connections each, for
    ``seconds``), POSTing one query ``openssl ts -query`` made; the replies wrk kept checked
    with ``openssl ts -verify -queryfile`` against ``root_pem``; the CPU the processes under
    ``pids`` (the servers) and wrk used, per token."""
    (folder / "data.txt").write_bytes(os.urandom(64))
    query = folder / "q.tsq"
    subprocess.run(
        ["openssl", "ts", "-query", "-data", folder / "data.txt", "-sha256", "-cert", "-out", query],
        check=True, capture_output=True,
    )  # fmt: skip
    script = folder / "post.lua"
    script.write_text(WRK_SCRIPT)
    keep = folder / "kept"
    # What the servers spend with no request (their rounds, peers, status files), over 5 s
    idle, idle_wall = process_tree_cpu(pids), time.perf_counter()
    time.sleep(5)
    idle_after = process_tree_cpu(pids)
    idle_rate = sum(idle_after[p] - idle[p] for p in idle_after if p in idle) / (
        time.perf_counter() - idle_wall
    )
    children = os.times()
    before, wall = process_tree_cpu(pids), time.perf_counter()
    runs = []
    for k, url in enumerate(urls):
        (keep / str(k)).mkdir(parents=True, exist_ok=True)
        runs.append(
            subprocess.Popen(
                ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "-s", str(script), url],
                stdout=subprocess.PIPE,
                text=True,
                env={**os.environ, "TSQ": str(query), "KEEP": str(keep / str(k))},
            )
        )
    outputs = [run.communicate(timeout=seconds + 60)[0] for run in runs]
    wall = time.perf_counter() - wall
    after = process_tree_cpu(pids)
    reaped = os.times()  # wrk's CPU: this process's children reaped meanwhile
    wrk_cpu = (
        reaped.children_user + reaped.children_system - children.children_user - children.children_system
    )
    requests = not_granted = errors = 0
    p50s, p99s = [], []
    for text in outputs:
        for line in text.splitlines():
            words = line.split()
            if words[:1] == ["NOT_GRANTED"]:
                not_granted += int(words[1])
            elif words[:1] == ["LATENCY_US"]:
                p50s.append(int(words[1]) / 1000)
                p99s.append(int(words[2]) / 1000)
            elif words[:1] == ["REQUESTS"]:
                requests += int(words[1])
                errors += int(words[3])
    server_cpu = sum(after[p] - before[p] for p in after if p in before)
    granted = requests - not_granted
    kept = sorted(keep.glob("*/*.tsr")) if root_pem is not None else []
    verified = 0
    for reply in kept:
        done = subprocess.run(
            ["openssl", "ts", "-verify", "-queryfile", query, "-in", reply, "-CAfile", root_pem],
            capture_output=True, text=True,
        )  # fmt: skip
        verified += "Verification: OK" in done.stdout
    return {
        "load": f"wrk -t1 -c{connections} per server",
        "servers": len(urls),
        "seconds": round(wall, 1),
        "requests": requests,
        "granted": granted,
        "not_granted": not_granted,
        "socket_errors": errors,
        "tokens_per_s": round(granted / wall, 1),
        "p50_ms_per_server": p50s,
        "p99_ms_per_server": p99s,
        "server_cpu_ms_per_token": round(1000 * server_cpu / max(granted, 1), 3),
        # what the servers spent with no request, in the 5 s before the load (CPU s per s): their
        # rounds and peers. Not subtracted: under load that work is crowded out, not added.
        "server_idle_cpu_s_per_s": round(idle_rate, 3),
        "wrk_cpu_ms_per_token": round(1000 * wrk_cpu / max(granted, 1), 3),
        "sample_verified_by_openssl": f"{verified} of {len(kept)}" if root_pem is not None else "not checked",
    }


async def _wait_for(urls: list[str], httpx: Any) -> None:
    """Until every URL grants a token (at most 90 s)."""
    headers = {"content-type": "application/timestamp-query"}
    body = rfc3161.encode_request("sha256", os.urandom(32), nonce=9, cert_req=True)
    async with httpx.AsyncClient(timeout=10) as client:

        async def post(url: str) -> bool:
            answer = await client.post(url, content=body, headers=headers)
            return rfc3161.decode_response(answer.content).tst_info is not None

        await _until_granted(urls, post, httpx)


async def _until_granted(urls: list[str], post: Callable[[str], Awaitable[bool]], httpx: Any) -> None:
    """Until ``post`` got a token from every URL (at most 90 s)."""
    import trio

    deadline = time.monotonic() + 90
    for url in urls:
        while True:
            try:
                if await post(url):
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url}: no token within 90 s")
            await trio.sleep(0.5)


def bench_cluster(
    mode: str, seconds: float, concurrency: int, base_port: int, load: str = "httpx"
) -> dict[str, Any]:
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
    up = subprocess.run(
        [*pst, "cluster", "up", "--dir", str(root), "--detach"], capture_output=True, text=True
    )
    load_before = os.getloadavg()[0]
    try:
        if up.returncode != 0:
            raise RuntimeError(f"pst cluster up failed:\n{up.stdout}{up.stderr}")
        pids = [int((root / f"node-{i}" / PID_FILE).read_text()) for i in range(1, 5)]
        if load == "wrk":
            trio.run(_wait_for, urls, httpx)
            root_pem = root / "root.pem"
            root_pem.write_bytes(httpx.get(urls[0].removesuffix("/tsa") + "/ca/root.pem").content)
            out = wrk_load(urls, seconds, concurrency, root.parent, root_pem, pids)
            return {"mode": mode, "n": 4, "t": 1, "sustained": out}
        result: dict[str, Any] = trio.run(_cluster_load, urls, seconds, concurrency, httpx, pids)
    finally:
        subprocess.run([*pst, "cluster", "down", "--dir", str(root)], capture_output=True, check=False)
    loads = [round(load_before, 1), round(os.getloadavg()[0], 1)]
    return {"mode": mode, "n": 4, "t": 1, "load_average_1min_before_after": loads, **result}


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

        # every server up, its certificate and first presignatures there
        await _until_granted(urls, post, httpx)
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
    parser.add_argument(
        "--load",
        choices=("httpx", "wrk"),
        default="httpx",
        help="the load generator over HTTP: httpx in this process, or wrk (C, little CPU per request; "
        "with --cluster: wrk against each server, and in the same run the single-key peers)",
    )
    args = parser.parse_args()
    if args.load == "wrk" and shutil.which("wrk") is None:
        print("bench/tsa.py --load wrk needs wrk (Debian package wrk: apt-get install wrk)", file=sys.stderr)
        return 2
    machine = {"python": platform.python_version(), "cpus": os.cpu_count(), "load_average": os.getloadavg()}
    if args.cluster:
        runs = [
            bench_cluster(mode, args.seconds, args.concurrency, args.base_port, args.load)
            for mode in args.modes.split(",")
        ]
        out: dict[str, Any] = {"machine": machine, "clusters": runs}
        if args.load == "wrk":  # the single-key peers in the same run, and the ratios
            single = bench_http(0, args.concurrency, "wrk", args.seconds)
            peer = bench_openssl(100)
            out["ours_single_key_http"] = single
            out["hypercorn_alone_fixed_reply"] = bench_http(0, args.concurrency, "wrk", args.seconds, "floor")
            out["openssl_ts_reply_per_process"] = peer
            for run in runs:
                rate = run["sustained"]["tokens_per_s"]
                run["ratio_to_ours_single_key_http"] = round(rate / single["tokens_per_s"], 2)
                run["ratio_to_openssl_ts_reply"] = round(rate / peer["tokens_per_s"], 1)
        out["machine"]["load_average_after"] = os.getloadavg()
        json.dump(out, sys.stdout, indent=2)
        print()
        return 0
    count = 300 if args.quick else 3000
    ours = bench_ours(count)
    peer = bench_openssl(30 if args.quick else 200)
    http = bench_http(300 if args.quick else 5000, 8, args.load, 5 if args.quick else args.seconds)
    floor = bench_http(300 if args.quick else 5000, 8, args.load, 5 if args.quick else args.seconds, "floor")
    result = {
        "machine": {**machine, "platform": platform.platform()},
        "ours_single_key": ours,
        "ours_http_hypercorn": http,
        "hypercorn_alone_fixed_reply": floor,
        "openssl_ts_reply_per_process": peer,
        "ratio_ours_to_openssl": round(ours["tokens_per_s"] / peer["tokens_per_s"], 1),
    }
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Crypto-core benchmark: prints JSON (one object) with timings in milliseconds.

Compute only, one process, all parties simulated in turn. Usage:
    .venv/bin/python bench/crypto.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from appliance.crypto import dss, frost, local
from appliance.crypto.groups import DSA2048, ED25519, P256
from appliance.crypto.secret import system_scalar_source

SIZES = [4, 5, 7, 10, 16]


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """Median wall time in ms over ``repeat`` runs, and the last result."""
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), result


def max_t(n: int, honest_majority: bool) -> int:
    # FROST, DKG, refresh: t < n. DSS (degree-2t products): n >= 2t + 1.
    return (n - 1) // 2 if honest_majority else n - 1


def bench_size(n: int, repeat: int) -> dict[str, Any]:
    out: dict[str, Any] = {"n": n}
    rand = system_scalar_source(ED25519.order)
    t = max_t(n, honest_majority=False)
    out["t_ed25519"] = t
    out["dkg_ms"], result = timed(lambda: local.run_dkg(ED25519, n, t, rand), max(1, repeat // 5))
    keys = result.keys
    signers = sorted(keys)[: t + 1]
    message = b"benchmark message"

    min_signers = t + 1
    packages = {i: frost.KeyPackage(i, keys[i].share.value, keys[i].public_key, min_signers) for i in keys}
    public = frost.PublicKeyPackage(
        keys[1].public_key, {i: keys[1].public.verification_share(ED25519, i) for i in keys}, min_signers
    )

    def frost_round() -> tuple[float, float]:
        nonces = {i: frost.commit(packages[i], os.urandom(64)) for i in signers}
        commitments = [nonces[i].commitment for i in signers]
        t0 = time.perf_counter()
        shares = [frost.sign(packages[i], nonces[i], message, commitments) for i in signers]
        t1 = time.perf_counter()
        frost.aggregate_and_identify(public, commitments, message, shares)
        t2 = time.perf_counter()
        return (t1 - t0) * 1000 / len(signers), (t2 - t1) * 1000

    runs = [frost_round() for _ in range(repeat)]
    out["frost_signers"] = len(signers)
    out["frost_sign_per_signer_ms"] = statistics.median(r[0] for r in runs)
    out["frost_aggregate_ms"] = statistics.median(r[1] for r in runs)
    out["frost_sign_plus_aggregate_ms"] = out["frost_sign_per_signer_ms"] + out["frost_aggregate_ms"]
    current = keys

    def refresh() -> None:
        nonlocal current
        current = local.run_refresh(ED25519, current, rand)  # wipes the previous period's shares

    out["refresh_one_secret_ms"], _ = timed(refresh, max(1, repeat // 5))
    out["t_recovery"] = n - 2  # recovery needs t+1 helpers besides the lost server
    fresh = local.run_dkg(ED25519, n, n - 2, rand).keys
    helpers = {i: k for i, k in fresh.items() if i != n}
    out["recovery_one_share_ms"], _ = timed(
        lambda: local.run_recovery(ED25519, helpers, n, rand), max(1, repeat // 5)
    )
    for group in (DSA2048, P256):
        td = max_t(n, honest_majority=True)
        grand = system_scalar_source(group.order)
        gkeys = local.run_dkg(group, n, td, grand).keys
        key_public = gkeys[1].public
        out[f"dss_{group.name}_t"] = td
        presign_times, online = [], []
        for k in range(max(1, repeat // 5)):
            start = time.perf_counter()
            presigs = dss.run_presign(group, gkeys, grand, sid=f"bench/{n}/{k}".encode()).presignatures
            presign_times.append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            dss.run_sign(group, presigs, message, key_public)
            online.append((time.perf_counter() - start) * 1000)
        out[f"dss_{group.name}_presign_ms"] = statistics.median(presign_times)
        out[f"dss_{group.name}_online_sign_ms"] = statistics.median(online)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--sizes", type=int, nargs="*", default=SIZES)
    args = parser.parse_args()
    repeat = 5 if args.quick else 25
    report = {
        "benchmark": "crypto",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
        },
        "results": [],
    }
    for n in args.sizes:
        print(f"n={n} ...", file=sys.stderr, flush=True)
        report["results"].append(bench_size(n, repeat))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

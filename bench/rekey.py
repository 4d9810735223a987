"""Period-change benchmark of the transport: TLS handshakes and CPU per server per rekey. Prints JSON.

n PeerNetworks in one process on 127.0.0.1, keyed with channel identities as ``pst serve``
keys them. Each period change: every server re-keys at a random moment within ``--spread-ms``
(seeded), sends one frame to every peer right after its own rekey, and the change is over when
every ordered pair holds an authenticated connection again and every frame arrived. With
``--late-ms`` one server (the last) re-keys that much later than the others (a server behind
that still finishes its refresh). Reported per server and period change: the TLS handshakes
begun (both sides: ``PeerNetwork.handshakes``), by outcome, and the process CPU (all n servers
run in this process, so CPU / n is one server's share); the wall time to the end of the change
(at most 5 s for the connections, and 2 s more when a frame was lost), the frames that never
arrived (dropped at the change), and the ordered pairs still not authenticated both ways then. Usage:
    PYTHONPATH=$PWD .venv/bin/python bench/rekey.py [--sizes 4 7] [--periods 10] [--spread-ms 100]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.net import EVERYONE, ChannelIdentity, PeerNetwork, channel_identity

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from netproxy import free_ports


def public_key(seed: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()


async def rekey_later(
    net: PeerNetwork, delay: float, period: int, keys: dict[int, bytes], ident: ChannelIdentity
) -> None:
    await trio.sleep(delay)
    net.rekey(period, keys, ident)
    net.send(EVERYONE, b"period %d from %d" % (period, net.me))


def period_credentials(ids: list[int], period: int) -> tuple[dict[int, bytes], dict[int, ChannelIdentity]]:
    seeds = {i: os.urandom(32) for i in ids}
    keys = {i: public_key(s) for i, s in seeds.items()}
    return keys, {i: channel_identity(i, period, s) for i, s in seeds.items()}


async def run(n: int, periods: int, spread: float, late: float, seed: int) -> dict[str, Any]:
    ids = list(range(1, n + 1))
    addresses = {i: ("127.0.0.1", p) for i, p in zip(ids, free_ports(n), strict=True)}
    creds = [period_credentials(ids, p) for p in range(periods + 1)]
    got: dict[int, set[tuple[int, bytes]]] = {i: set() for i in ids}

    def handler(me: int) -> Any:
        async def on_frame(peer: int, data: bytes) -> None:
            got[me].add((peer, data))

        return on_frame

    rng = random.Random(seed)
    changes: list[dict[str, Any]] = []
    async with AsyncExitStack() as stack:
        keys, idents = creds[0]
        nets = {
            i: await stack.enter_async_context(
                PeerNetwork(i, addresses, 0, keys, idents[i], on_frame=handler(i), backoff_max=1.0)
            )
            for i in ids
        }
        with trio.fail_after(30):
            for net in nets.values():
                await net.wait_connected()
        for period in range(1, periods + 1):
            keys, idents = creds[period]
            order = ids[:]
            rng.shuffle(order)
            at = sorted(rng.uniform(0, spread) for _ in ids)
            if late:
                at[-1] = at[-2] + late if n > 1 else late
            before = {i: Counter(net.handshakes) for i, net in nets.items()}
            cpu0, wall0 = time.process_time(), time.monotonic()
            async with trio.open_nursery() as nursery:
                for i, delay in zip(order, at, strict=True):
                    nursery.start_soon(rekey_later, nets[i], delay, period, keys, idents[i])
            want = {i: {(j, b"period %d from %d" % (period, j)) for j in ids if j != i} for i in ids}
            with trio.move_on_after(5.0):
                for net in nets.values():
                    await net.wait_connected()
            with trio.move_on_after(2.0):  # a frame dropped at the change never comes
                while any(not want[i] <= got[i] for i in ids):
                    await trio.sleep(0.005)
            cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
            lost = sum(len(want[i] - got[i]) for i in ids)
            if os.environ.get("REKEY_DEBUG"):  # which (sender, receiver) pairs, in which rekey order
                missing = [(j, i) for i in ids for (j, _) in want[i] - got[i]]
                print("lost", period, order, missing, file=sys.stderr)
            unauthenticated = sum(not net.is_authenticated(j) for net in nets.values() for j in net.peers)
            kinds: Counter[str] = Counter()
            for i, net in nets.items():
                kinds.update(net.handshakes - before[i])
            change = {"cpu_s": cpu, "wall_s": wall, "kinds": kinds, "lost": lost}
            changes.append({**change, "unauthenticated": unauthenticated})
    total: Counter[str] = Counter()
    for c in changes:
        total.update(c["kinds"])
    per = periods * n
    handshakes = total.total() / per
    cpu_ms = statistics.mean(c["cpu_s"] for c in changes) * 1000 / n
    return {
        "n": n,
        "periods": periods,
        "spread_ms": spread * 1000,
        "late_ms": late * 1000,
        "handshakes_per_server_per_change": round(handshakes, 2),
        "minimum": 2 * (n - 1),
        "by_outcome": {k: round(v / per, 2) for k, v in sorted(total.items())},
        "cpu_ms_per_server_per_change": round(cpu_ms, 2),
        "cpu_ms_per_handshake_upper_bound": round(cpu_ms / handshakes, 3) if handshakes else None,
        "frames_lost": sum(c["lost"] for c in changes),
        "pairs_not_authenticated_after_change": sum(c["unauthenticated"] for c in changes),
        "frames_sent": periods * n * (n - 1),
        "wall_ms_median": round(statistics.median(c["wall_s"] for c in changes) * 1000, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 7])
    parser.add_argument("--periods", type=int, default=10)
    parser.add_argument("--spread-ms", type=float, default=100.0)
    parser.add_argument("--late-ms", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    spread, late = args.spread_ms / 1000, args.late_ms / 1000
    results = [trio.run(run, n, args.periods, spread, late, args.seed) for n in args.sizes]
    load = os.getloadavg()
    print(
        json.dumps(
            {
                "benchmark": "rekey",
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "load_average": [round(x, 2) for x in load],
                "python": sys.version.split()[0],
                "machine": platform.machine(),
                "results": results,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()

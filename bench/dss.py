"""Threshold DSS over the network protocol (protocols/dss_signing.py): prints JSON (one object).

Sans-IO in one process: n DSSSigningServices exchange their real (signed, encoded) messages
through an in-memory queue with no delay, so the figures are the protocol's compute for all
servers together on one core (no network time, no channel encryption). Server 1 coordinates and
fills its stock; then it signs messages one after another from that stock. Usage:
    .venv/bin/python bench/dss.py [--nodes 4] [--threshold 1] [--group p256|dsa2048]
                                  [--presignatures 32] [--batch 8] [--signatures 32] [--in-flight 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections import deque
from typing import Any

from nacl.signing import SigningKey

from appliance.crypto import dss, encoding
from appliance.crypto.keyshare import KeyShare
from appliance.crypto.secret import SecretScalar
from appliance.protocols import dss_signing
from appliance.protocols._core import Outgoing, Signer
from appliance.protocols.dss_signing import DSSSigningService
from appliance.protocols.state import SCERT, Constants
from appliance.sim.setup import make_network, seeded_bytes


class Bus:
    """Delivers every message at once, in order; counts messages and bytes."""

    def __init__(self, services: dict[int, DSSSigningService[Any]]) -> None:
        self.services = services
        self.queue: deque[tuple[int, int, bytes]] = deque()
        self.now = 0.0
        self.messages = 0
        self.bytes = 0
        self.busy = True

    def _post(self, sender: int, out: list[Outgoing]) -> None:
        for o in out:
            self.queue.append((o.to, sender, o.data))
            self.messages += 1
            self.bytes += len(o.data)

    def step(self) -> None:
        # Time moves on by 0.1 ms while messages flow, and by 10 ms (a node's tick) when the
        # last step sent nothing, so that waiting out a timer costs few idle ticks.
        self.now += 1e-4 if self.busy else 1e-2
        before = self.messages
        for i, s in self.services.items():
            self._post(i, s.tick(self.now))
        while self.queue:
            to, sender, data = self.queue.popleft()
            service = self.services[to]
            service.receive(sender, encoding.decode(data, max_size=512 * 1024), self.now)
            self._post(to, service.drain())
        self.busy = self.messages != before


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--threshold", type=int, default=1)
    ap.add_argument("--group", default="p256", choices=["p256", "dsa2048"])
    ap.add_argument("--presignatures", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--signatures", type=int, default=32)
    ap.add_argument("--in-flight", type=int, default=1, help="requests made at once (batched per peer)")
    args = ap.parse_args()
    c = Constants(
        n=args.nodes,
        t=args.threshold,
        period_length=3600.0,
        delta=0.1,
        secrets={SCERT: "ed25519", "tsa": args.group},
    )
    group = c.group("tsa")
    setups = make_network(c, 1)
    dss_signing.BATCH = args.batch
    dss_signing.LOW_WATER = args.presignatures
    services: dict[int, DSSSigningService[Any]] = {}
    for i, setup in setups.items():
        table = setup.public.key_table
        assert table is not None
        share = setup.private.shares["tsa"]
        services[i] = DSSSigningService(
            me=i,
            t=c.t,
            table=table,
            group=group,
            key=KeyShare(i, SecretScalar(share.value, group.order), setup.public.sharings["tsa"]),
            signer=Signer(SigningKey(setup.private.signing_seed)),
            rand=seeded_bytes(f"bench/{i}".encode()),
            service="sign/tsa",
            coordinate=i == 1,
        )
    bus = Bus(services)
    coordinator = services[1]
    # Tables built once per process (G's, the Pedersen H's) and once per period (each
    # server's for its verification share X_i, the base of its w proofs) are set up before
    # the timing starts: steady state. The per-period part is timed on its own.
    group.mul_base(1)
    dss._hgen(group)
    t0 = time.process_time()
    for i, service in services.items():
        group.precompute(service.key.public.verification_share(group, i))
    table_cpu = time.process_time() - t0

    start, cpu = time.perf_counter(), time.process_time()
    while coordinator.stock < args.presignatures:
        bus.step()
        if bus.now > 100:
            sys.exit("presigning does not progress")
    presign_s, presign_cpu = time.perf_counter() - start, time.process_time() - cpu
    made = coordinator.made
    presign_messages, presign_bytes = bus.messages, bus.bytes

    dss_signing.LOW_WATER = 0  # no refill while we time the online signatures
    latencies = []
    bus.messages = bus.bytes = 0
    public_key = coordinator.public_key
    sign_cpu, sign_wall = time.process_time(), time.perf_counter()
    total = min(args.signatures, coordinator.stock)
    for first in range(0, total, args.in_flight):
        messages = {k: f"token {k}".encode() for k in range(first, min(total, first + args.in_flight))}
        t0 = time.perf_counter()
        rids = {coordinator.request(m, bus.now): m for m in messages.values()}
        while not all(rid in coordinator.done or rid in coordinator.failed for rid in rids):
            bus.step()
        latencies += [(time.perf_counter() - t0) * 1000] * len(rids)
        for rid, message in rids.items():
            sig = coordinator.done.pop(rid)
            assert dss.verify_with_cryptography(group, public_key, message, sig.der)
    for _ in range(200):  # the discards that wait to ride in a batch go too
        if not any(getattr(s, "_deferred", None) for s in services.values()):
            break
        bus.step()
    sign_wall = time.perf_counter() - sign_wall
    signatures = len(latencies)
    sign_cpu = time.process_time() - sign_cpu  # (includes the final verification with cryptography)
    result = {
        "bench": "dss",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "n": c.n,
        "t": c.t,
        "group": args.group,
        "batch": args.batch,
        "presignatures": made,
        "presign_seconds": round(presign_s, 3),
        "presign_cpu_seconds": round(presign_cpu, 3),
        "presignatures_per_s": round(made / presign_s, 2),
        "presign_ms_each_all_servers": round(1000 * presign_s / made, 1),
        "presign_cpu_ms_each_all_servers": round(1000 * presign_cpu / made, 1),
        "period_setup_cpu_ms_all_servers": round(1000 * table_cpu, 1),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "presign_messages_each": round(presign_messages / made, 1),
        "presign_bytes_each": round(presign_bytes / made),
        "signatures": signatures,
        "in_flight": args.in_flight,
        "signatures_per_s": round(signatures / sign_wall, 1),
        "sign_ms_p50": round(statistics.median(latencies), 2),
        "sign_cpu_ms_each_all_servers": round(1000 * sign_cpu / signatures, 2),
        "sign_ms_max": round(max(latencies), 2),
        "sign_messages_each": round(bus.messages / signatures, 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

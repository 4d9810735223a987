"""The store's per-period entries (docs/store.md "Signed digests"): CPU time to apply a period
mark and a server's signed digest, and their sizes. Each period adds one mark and n signed
digests to the store's sequence, applied by every server.

Compute only, one process, n=4; prints JSON (one object). Usage:
    .venv/bin/python bench/store_marks.py [--items N] [--repeat R]

``mark_apply_cpu_us``: StoreService.apply of a mark (the KeyTable's group signature checked,
the digest of a state of ``--items`` records, all changed since the last digest: the worst
case); ``attestation_apply_cpu_us``: apply of one signed digest (channel certificate and
signature checked against the mark's KeyTable). Medians of per-run CPU time (process_time).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from nacl.signing import SigningKey

from appliance.apps.store import model
from appliance.apps.store.attest import Attestation, attestation_payload
from appliance.apps.store.service import PeriodMark, StoreService
from appliance.crypto import local
from appliance.crypto.groups import P256
from appliance.crypto.secret import DeterministicSource
from appliance.net._tls import channel_certificate_der, channel_identity, channel_sign
from appliance.protocols.state import KeyEntry, KeyTable

N, T, PERIOD = 4, 1, 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1000, help="records in the state (default 1000)")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    public = local.run_dkg(P256, N, T, DeterministicSource(1, P256.order)).keys[1].public
    group_key = SigningKey(b"g" * 32)
    seeds = {i: bytes([i, PERIOD]) * 16 for i in range(1, N + 1)}
    entries = {i: KeyEntry(bytes(SigningKey(s).verify_key), bytes(32), bytes(64)) for i, s in seeds.items()}
    table = KeyTable(PERIOD, entries, {}, frozenset())
    table = table.signed(bytes(group_key.sign(table.payload()).signature))
    mark = PeriodMark(table.encode()).encode()
    marks, attests = [], []
    attestation = b""
    for _ in range(args.repeat):
        service = StoreService(P256, public.public_key, T)
        service.authority = model.Authority(bytes(group_key.verify_key), N)
        for k in range(args.items):
            service.state.put(
                model.Record("bench", f"id-{k}", model.DataType.PUBLIC_ONCE, b"u", 1, value=b"v" * 64)
            )
        start = time.process_time()
        service.apply(0, mark)
        marks.append(time.process_time() - start)
        count, digest = service.verifier.mark_count, service.verifier.mark_digest
        for i, seed in seeds.items():
            ident = channel_identity(i, PERIOD, seed)
            sig = channel_sign(ident, attestation_payload(count, digest, PERIOD, i))
            attestation = Attestation(count, digest, PERIOD, i, channel_certificate_der(ident), sig).encode()
            start = time.process_time()
            service.apply(service.applied, attestation)
            attests.append(time.process_time() - start)
        assert service.verifier.verified == count
    print(
        json.dumps(
            {
                "n": N,
                "items": args.items,
                "repeat": args.repeat,
                "mark_apply_cpu_us": round(statistics.median(marks) * 1e6),
                "attestation_apply_cpu_us": round(statistics.median(attests) * 1e6),
                "mark_bytes": len(mark),
                "attestation_bytes": len(attestation),
                "load_average": os.getloadavg()[0],
            }
        )
    )


if __name__ == "__main__":
    main()

"""Store benchmark (issue 14): the TDH2 operations behind a stored secret, per second, on one core.

Compute only, one process, n=4 t=1 by default; prints JSON (one object). Usage:
    .venv/bin/python bench/store.py [--quick] [--group ed25519|p256] [--size BYTES]

seal: encapsulate and encrypt one value (the writer); check: check_ciphertext of a decoded
ciphertext; decode_then_check: Sealed.decode then check_ciphertext, from the bytes;
decode_checked: the same in one step, as every server runs it on every write and before every
share (the points are checked by the check's own multiplications); share: a decryption share
with its proof, the check included (each of t+1 servers, per read), sealed to the reader;
combine: verify t+1 shares and interpolate (the reader); open: decrypt the value; write:
StoreState.apply_write of a secret (at every server).
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

import nacl.public

from appliance.apps.store import model
from appliance.crypto import local, tdh2
from appliance.crypto.groups import ED25519, P256, Group
from appliance.crypto.secret import system_scalar_source

GROUPS: dict[str, Group[Any]] = {"ed25519": ED25519, "p256": P256}


def rate(fn: Callable[[], Any], repeat: int) -> tuple[float, float]:
    """(median ms, operations per second from the median) over ``repeat`` runs."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    median = statistics.median(times)
    return round(median, 4), round(1000 / median, 1)


class _View:
    period, majority = 1, 3

    def now(self) -> float:
        return time.time()

    def verifier(self, app: str) -> bytes | None:
        return None

    def vote_valid(self, voter: int, rid: bytes, sig: bytes) -> bool:
        return False


def bench(group: Group[Any], n: int, t: int, size: int, repeat: int) -> dict[str, Any]:
    rand = system_scalar_source(group.order)
    keys = local.run_dkg(group, n, t, rand).keys
    public = keys[1].public
    value = os.urandom(size)
    reader = nacl.public.PrivateKey.generate()
    reader_key = bytes(reader.public_key)
    label = b"bench/app/id/1"
    sealed = tdh2.seal(group, public.public_key, label, value, rand)
    ct = sealed.kem
    # a new ciphertext for each decode, as a server sees writes (no point of it decoded before)
    fresh = iter(
        [tdh2.seal(group, public.public_key, label, value, rand).encode(group) for _ in range(2 * repeat)]
    )
    signers = sorted(keys)[: t + 1]
    shares = {i: tdh2.decryption_share(group, keys[i], ct, rand) for i in signers}
    key = tdh2.combine(group, public, ct, shares)
    out: dict[str, Any] = {"group": group.name, "n": n, "t": t, "value_bytes": size}
    ops: dict[str, Callable[[], Any]] = {
        "seal": lambda: tdh2.seal(group, public.public_key, label, value, rand),
        "check": lambda: tdh2.check_ciphertext(group, ct, label),
        # from the bytes a server holds: decode then check, and the one-step decode_checked
        "decode_then_check": lambda: tdh2.check_ciphertext(
            group, tdh2.Sealed.decode(group, next(fresh)).kem, label
        ),
        "decode_checked": lambda: tdh2.decode_checked(group, next(fresh), label),
        "share": lambda: tdh2.share_for_reader(
            group, tdh2.decryption_share(group, keys[1], ct, rand, label), reader_key
        ),
        "combine": lambda: tdh2.combine(group, public, ct, shares),
        "open": lambda: tdh2.open_sealed(sealed, key),
    }
    state = model.StoreState(group, public.public_key, t, model.Quotas(max_records=10**9, max_bytes=2**62))
    counter = [0]

    def write() -> None:
        counter[0] += 1
        bare = model.WriteRequest("bench", f"id{counter[0]}", model.DataType.SECRET_SW_DR, 1)
        blob = model.seal_value(group, public.public_key, bare, value, rand)
        request = model.WriteRequest("bench", bare.data_id, bare.dtype, 1, sealed={0: blob})
        start = time.perf_counter()
        state.apply_write(request, model.Client("bench", b"writer"), _View())
        write_times.append((time.perf_counter() - start) * 1000)

    write_times: list[float] = []
    for name, fn in ops.items():
        out[f"{name}_ms"], out[f"{name}_per_s"] = rate(fn, repeat)
    for _ in range(repeat):
        write()
    out["write_ms"] = round(statistics.median(write_times), 4)
    out["write_per_s"] = round(1000 / out["write_ms"], 1)
    read_ms = out["share_ms"] + out["combine_ms"] + out["open_ms"]
    out["read_compute_ms"] = round(read_ms, 4)  # one server's share, then the reader's work
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--group", choices=sorted(GROUPS), nargs="*", default=["ed25519"])
    parser.add_argument("--size", type=int, default=1024, help="bytes of each stored value")
    parser.add_argument("-n", type=int, default=4)
    parser.add_argument("-t", type=int, default=1)
    args = parser.parse_args()
    repeat = 20 if args.quick else 200
    report: dict[str, Any] = {
        "benchmark": "store",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
        },
        "results": [bench(GROUPS[g], args.n, args.t, args.size, repeat) for g in args.group],
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The latency of a lone Retrieve of a secret (issue 14 §4: p50 <= 20 ms). Prints JSON (one object).

A real local cluster as `bench/storage.py` makes it (n=4 t=1, `--store ed25519`, TLS on
loopback), one `secret-single` item written through server 1, then ``--reads`` lone reads of it
through server 3, one at a time (after one read to warm up): threshold decryption by t+1 servers,
shares sealed to the reader, opened by the client library. Usage:

    .venv/bin/python bench/store_read.py [--reads 40]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nacl.public

sys.path.insert(0, str(Path(__file__).resolve().parent))
from storage import PST, VALUE, PstError, client, free_base_port, pst, refresh_times, retrying


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reads", type=int, default=40)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="pst-read-"))
    root = base / "c"
    pst(
        "cluster", "init", "--store", "ed25519", "--log", "off", "--nodes", "4", "--threshold", "1",
        "--dir", str(root), "--period", "10", "--round-ms", "100", "--base-port", str(free_base_port(4)),
    )  # fmt: skip
    pst("cluster", "up", "--dir", str(root), "--detach")
    try:
        refresh_times(root, 1, 180)
        owner = nacl.public.PrivateKey.generate()
        writer = client(root, 1, "bench-read", "bench")
        retrying(writer.store_data, "s0", VALUE, "secret-single", reader=owner)
        writer.close()
        reader = client(root, 3, "bench-read", "bench")
        for _ in range(100):  # until server 3 has applied the write
            try:
                retrying(reader.retrieve, "s0", reader=owner)
                break
            except PstError:
                time.sleep(0.2)
        times = []
        for _ in range(args.reads):
            t0 = time.perf_counter()
            if retrying(reader.retrieve, "s0", reader=owner) != VALUE:
                raise RuntimeError("a stored secret read back wrong")
            times.append((time.perf_counter() - t0) * 1000)
        reader.close()
    finally:
        subprocess.run([*PST, "cluster", "down", "--dir", str(root)], capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)
    times.sort()
    print(
        json.dumps(
            {
                "bench": "store_read",
                "reads": args.reads,
                "p50_ms": round(statistics.median(times), 1),
                "p90_ms": round(times[int(0.9 * (len(times) - 1))], 1),
                "min_ms": round(times[0], 1),
                "load": [round(x, 1) for x in os.getloadavg()],
                "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            }
        )
    )


if __name__ == "__main__":
    main()

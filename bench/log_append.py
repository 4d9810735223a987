"""Tile store benchmark: ``TileLog.append`` on disk and in memory, one process. Prints JSON.

Appends batches of 1,024 and of 4,096 real entries (RFC 5424 messages of ~250 bytes as the
ingest stores them) to a ``PosixStorage`` log in a fresh directory under ``--dir`` (default:
the system's temporary directory; give one on the disk the server uses), and reports entries/s
and CPU microseconds per entry; then the CPU per entry of the same appends in memory
(``MemoryStorage``: the hashing and tile arithmetic alone, the best of five runs).

Usage: .venv/bin/python bench/log_append.py [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from appliance.apps.log.syslog import receive
from appliance.apps.log.tiles import MemoryStorage, PosixStorage, TileLog

ORIGIN = "bench.example/append"


def entries(count: int) -> list[bytes]:
    return [
        receive(
            f"<14>1 2026-11-30T12:00:00Z host{i % 50} app{i % 8} {i} - - bench line {i} ".encode()
            + b"x" * 120,
            received=1_764_504_000_000_000 + i,
            transport="tcp",
            peer="192.0.2.7:514",
        ).encode()
        for i in range(count)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    batch = entries(4096)
    out: dict[str, object] = {}
    for size, rounds in ((1024, 40), (4096, 12)):
        with tempfile.TemporaryDirectory(dir=args.dir, prefix="pst-bench-append-") as tmp:
            log = TileLog.open(PosixStorage(Path(tmp)), ORIGIN)
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(rounds):
                log.append(batch[:size])
            n = size * rounds
            out[f"disk_batches_of_{size}"] = {
                "entries_per_second": round(n / (time.perf_counter() - wall)),
                "cpu_us_per_entry": round((time.process_time() - cpu) / n * 1e6, 2),
            }
    best = []
    for _ in range(5):
        log = TileLog.open(MemoryStorage(), ORIGIN)
        cpu = time.process_time()
        for _ in range(10):
            log.append(batch[:4000])
        best.append((time.process_time() - cpu) / 40_000 * 1e6)
    out["memory_batches_of_4000_cpu_us_per_entry"] = round(min(best), 2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

"""Log search benchmark: the index over host, app and time against the scan. Prints JSON.

Builds a log of ``--entries`` real entries (RFC 5424 messages from 50 hosts and 8 apps, one
entry a millisecond, and one ``rare`` host in ``--rare`` entries spread over the log) in a
directory (``PosixStorage``, as the server keeps it), signs a checkpoint, and measures:

* ``index_build``: entries/s of :meth:`LogReader.update_index` from nothing (reads each bundle,
  authenticates it against the signed root, decodes its entries, writes the index files);
* ``search_rare_host``: the time to find every entry of the rare host through the index
  (one request with ``limit`` 1,000), and the requests and time a scan needs without it
  (paging with ``next_before``, :data:`MAX_SCAN` entries a request);
* ``search_common_window``: host and app of common entries within a 10-minute window, with and
  without the index.

Usage: .venv/bin/python bench/log_index.py [--entries 262144] [--rare 20]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nacl.signing

from appliance.apps.log.checkpoint import Signer, sign_checkpoint
from appliance.apps.log.index import drop_index_from
from appliance.apps.log.reader import CHECKPOINT_PATH, LogReader, SearchQuery
from appliance.apps.log.syslog import receive
from appliance.apps.log.tiles import MemoryStorage, PosixStorage, TileLog

ORIGIN = "bench.example/log"
T0 = 1_764_504_000_000_000


def build(directory: Path, count: int, rare: int) -> tuple[PosixStorage, Signer]:
    key = nacl.signing.SigningKey(b"\x01" * 32)
    signer = Signer(ORIGIN, bytes(key.verify_key), lambda m: bytes(key.sign(m).signature))
    memory = MemoryStorage()
    log = TileLog.open(memory, ORIGIN)
    rare_at = {count * (k + 1) // (rare + 1) for k in range(rare)}
    batch = []
    for i in range(count):
        host = "rare" if i in rare_at else f"host{i % 50}"
        raw = f"<14>1 2026-11-30T12:00:00Z {host} app{i % 8} {i} - - bench line {i} padding padding".encode()
        batch.append(receive(raw, received=T0 + i * 1000, transport="tcp", peer="192.0.2.7:514").encode())
        if len(batch) == 4096:
            log.append(batch)
            batch = []
    if batch:
        log.append(batch)
    for path, data in memory.files.items():
        file = directory / path
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(data)
    storage = PosixStorage(directory)
    storage.write(CHECKPOINT_PATH, sign_checkpoint(log.checkpoint(), [signer]))
    return storage, signer


def timed_search(reader: LogReader, query: SearchQuery) -> dict[str, Any]:
    start = time.perf_counter()
    requests, found, before = 0, 0, None
    while True:
        body = reader.search(
            SearchQuery(query.since, query.until, query.host, query.app, query.limit, before)
        )
        requests += 1
        found += len(body["entries"])
        before = body["next_before"]
        if before is None:
            break
    return {"seconds": round(time.perf_counter() - start, 4), "requests": requests, "found": found}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--entries", type=int, default=262_144)
    parser.add_argument("--rare", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pst-bench-index-") as tmp:
        storage, signer = build(Path(tmp), args.entries, args.rare)
        reader = LogReader(storage, ORIGIN, [signer.verifier])
        rare = SearchQuery(host="rare", limit=1000)
        window = SearchQuery(
            host="host7",
            app="app7",
            since=T0 + args.entries * 500,
            until=T0 + args.entries * 500 + 600_000_000,
            limit=1000,
        )
        scan_rare = timed_search(reader, rare)
        scan_window = timed_search(reader, window)
        start = time.perf_counter()
        while reader.update_index(1024):
            pass
        build_s = time.perf_counter() - start
        index_rare = timed_search(reader, rare)
        index_window = timed_search(reader, window)
        files = sorted(p for p in Path(tmp, "index").rglob("*") if p.is_file())
        result = {
            "machine": f"{platform.machine()}, {platform.release()}, Python {sys.version.split()[0]}",
            "entries": args.entries,
            "index_build": {
                "seconds": round(build_s, 2),
                "entries_per_second": round(args.entries / build_s),
                "bundles": reader.index.bundles,
                "bytes_on_disk": sum(p.stat().st_size for p in files),
                "files": len(files),
            },
            "search_rare_host": {"index": index_rare, "scan": scan_rare},
            "search_common_window": {"index": index_window, "scan": scan_window},
        }
        drop_index_from(storage, 0)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Run the syslog ingest into a LocalSink, as its own process, for tests that kill it.

    python tests/log_ingest_server.py DIR ORIGIN [--tcp PORT] [--relp PORT] [--udp PORT]
                                      [--batch-entries N] [--batch-delay S]

Prints one line, ``ready {"tcp": port, ...}``, once every server listens.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import trio

from appliance.apps.log.ingest import Batcher, IngestServer, LocalSink


async def main(args: argparse.Namespace) -> None:
    sink = LocalSink(Path(args.dir), args.origin)
    batcher = Batcher(sink, batch_entries=args.batch_entries, batch_delay=args.batch_delay)
    server = IngestServer(batcher)
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        ports = {}
        servers = {"udp": server.serve_udp, "tcp": server.serve_tcp, "relp": server.serve_relp}
        for kind, serve in servers.items():
            port = getattr(args, kind)
            if port is not None:
                ports[kind] = await nursery.start(serve, "127.0.0.1", port)
        print("ready " + json.dumps(ports), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("dir")
    parser.add_argument("origin")
    for kind in ("udp", "tcp", "relp"):
        parser.add_argument(f"--{kind}", type=int)
    parser.add_argument("--batch-entries", type=int, default=256)
    parser.add_argument("--batch-delay", type=float, default=0.005)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    trio.run(main, parser.parse_args())

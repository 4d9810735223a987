"""A recovering server's code check off the key-holder's loop: thread or forked process?

The check (``boot.check.code_mismatches``: walk the environment, hash what changed) runs while
a trio loop keeps a 1 ms ticker going, as the key-holder's loop keeps serving messages. For
each way of running it, prints the check's wall time and CPU time and how late the ticker got
(its largest and 99th-percentile lateness, and how many ticks ran): JSON, one object.

``warm``: the process has hashed the environment before (the key-holder child inherits the
digests its parent computed); ``cold``: it has not (a freshly started process: every file is
hashed again; the files themselves are in the page cache either way). As in a server started
by the bootstrap, no bytecode cache is read (``sys.pycache_prefix`` is ``/dev/null``), so the
check compiles nothing; ``--bytecode`` checks the caches too (what a check run under pytest does:
one compilation per cached module when cold).

Usage: .venv/bin/python bench/codecheck.py [--repeat N]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from appliance.boot import bootstrap, manifest
from appliance.boot.check import code_mismatches, store_manifest
from appliance.boot.manifest import Manifest, environment
from appliance.protocols.state import Constants


def _cold() -> None:
    bootstrap.DIGESTS.clear()
    manifest._verified.clear()


def _check(c: Constants, state: Path) -> int:
    return len(code_mismatches(c, state))


async def _ticker(lates: list[float], stop: trio.Event) -> None:
    while not stop.is_set():
        due = time.perf_counter() + 0.001
        await trio.sleep(0.001)
        lates.append(max(0.0, time.perf_counter() - due))


async def _in_fork(fn: Callable[[], int]) -> int:
    """``fn`` in a forked child (it inherits this process's digests); its result over a pipe."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(r)
            os.write(w, str(fn()).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        await trio.lowlevel.wait_readable(r)
        data = os.read(r, 64)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    return int(data)


async def _measure(mode: str, c: Constants, state: Path) -> dict[str, float]:
    lates: list[float] = []
    stop = trio.Event()
    fn = lambda: _check(c, state)  # noqa: E731
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_ticker, lates, stop)
        await trio.sleep(0.05)
        lates.clear()
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        if mode == "inline":
            fn()
            await trio.sleep(0)
        elif mode == "thread":
            await trio.to_thread.run_sync(fn, abandon_on_cancel=True)
        else:
            await _in_fork(fn)
        wall = time.perf_counter() - start
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        stop.set()
    cpu = (cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime) + (
        kids1.ru_utime + kids1.ru_stime - kids0.ru_utime - kids0.ru_stime
    )
    ordered = sorted(lates) or [0.0]
    return {
        "wall_ms": wall * 1000,
        "cpu_ms": cpu * 1000,
        "ticks": len(lates),
        "max_late_ms": ordered[-1] * 1000,
        "p99_late_ms": ordered[int(0.99 * (len(ordered) - 1))] * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--bytecode", action="store_true", help="check the bytecode caches too")
    args = parser.parse_args()
    if not args.bytecode:
        sys.pycache_prefix = bootstrap.NO_BYTECODE
    built = Manifest.build_environment(environment())
    c = dataclasses.replace(Constants(n=4, t=1, period_length=60, delta=0.05), code_digest=built.digest())
    results: dict[str, Any] = {"files": len(built), "load_average": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        (state / "public").mkdir()
        store_manifest(state, built)
        assert _check(c, state) == 0, "the installed code should match its own manifest"
        for cache in ("warm", "cold"):
            for mode in ("inline", "thread", "fork"):
                runs = []
                for _ in range(args.repeat):
                    if cache == "cold":
                        _cold()
                    else:
                        _check(c, state)
                    runs.append(trio.run(_measure, mode, c, state))
                print(cache, mode, runs, file=sys.stderr)
                results[f"{cache}/{mode}"] = {
                    k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]
                }
    results["load_average_after"] = os.getloadavg()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""CPU seconds per seed of the simulation's families (tests/test_simulation.py): prints JSON.

One process, one family after another, seeds 0..N-1 of each (the setups of period 0 are cached
across families, as in the test suite's pool workers). CPU time of this process, not wall time,
so the figures hold on a loaded machine. ``total_at`` projects the CPU of every family at the
seed counts `make test` runs (500 per family; ``--behaviour`` for the ten Byzantine behaviours
alone). Usage:
    .venv/bin/python bench/sim.py [--seeds 10] [--behaviour 500] [--families honest,silent]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

from appliance.sim import scenarios

#: The families of tests/test_simulation.py, with whether each is a Byzantine behaviour alone.
FAMILIES = [
    *((f, False) for f in scenarios.SEEDED_FAMILIES),
    *((f, False) for f in ("tpm-impostor", "late-recovering", "wiped-restart", "stale-wiped")),
    *((f, True) for f in scenarios.BYZANTINE),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10, help="seeds 0..N-1 of each family")
    parser.add_argument("--first", type=int, default=0, help="first seed")
    parser.add_argument("--families", default="", help="comma-separated (default: all of the suite's)")
    parser.add_argument("--runs", type=int, default=500, help="seeds per family in the projection")
    parser.add_argument("--behaviour", type=int, default=500, help="seeds per behaviour in the projection")
    args = parser.parse_args()
    wanted = set(args.families.split(",")) if args.families else None
    per_seed: dict[str, float] = {}
    projected = 0.0
    for family, behaviour in FAMILIES:
        if wanted is not None and family not in wanted:
            continue
        start = time.process_time()
        for seed in range(args.first, args.first + args.seeds):
            result = scenarios.run_seed((family, seed))
            if result is not None:
                print(f"FAILED: {result}", file=sys.stderr)
        per_seed[family] = round((time.process_time() - start) / args.seeds, 4)
        projected += per_seed[family] * (args.behaviour if behaviour else args.runs)
    print(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "loadavg": os.getloadavg(),
                "python": platform.python_version(),
                "seeds": [args.first, args.first + args.seeds],
                "cpu_s_per_seed": per_seed,
                "projected_cpu_s": {
                    "runs": args.runs,
                    "behaviour": args.behaviour,
                    "total": round(projected),
                },
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()

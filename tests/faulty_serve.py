"""Run one PServer that misbehaves on purpose (for the attack-scenario tests only).

    python tests/faulty_serve.py serve --config CONFIG --fault bad-share --victim 2

The fault is injected by swapping the refresh engine class for one of the Byzantine
engines of the simulation; the production code has no fault switch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from appliance.node.run import serve
from appliance.protocols import core
from appliance.sim import adversaries


def main() -> int:
    parser = argparse.ArgumentParser()
    # "serve": so that pst refresh and pst status take it for the node's pst serve (host.nodes.serves)
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("--config", required=True)
    parser.add_argument("--fault", choices=["bad-share", "false-complaint"], required=True)
    parser.add_argument("--victim", type=int, default=1)
    args = parser.parse_args()
    if args.fault == "bad-share":
        core.PeriodRefresh = type("Liar", (adversaries.BadDealingEngine,), {"victim": args.victim})  # type: ignore[misc]
    else:
        core.PeriodRefresh = adversaries.FalseComplaintEngine  # type: ignore[misc]
    return serve(Path(args.config))


if __name__ == "__main__":
    sys.exit(main())

"""The ``pst`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from appliance import __version__


def _cmd_demo(args: argparse.Namespace) -> int:
    from appliance.demo import run_crypto_demo

    return run_crypto_demo(n=args.nodes, t=args.threshold)


def _cmd_sim(args: argparse.Namespace) -> int:
    from appliance.sim import scenarios

    if args.list:
        for name in scenarios.FAMILIES:
            seeded = " (run with 500 seeds by make test)" if name in scenarios.SEEDED_FAMILIES else ""
            print(f"{name}{seeded}")
        return 0
    if args.scenario is None:
        print("pst sim: give --scenario NAME (see --list)", file=sys.stderr)
        return 2
    try:
        result = scenarios.FAMILIES[args.scenario](args.seed)
    except KeyError:
        print(
            f"pst sim: unknown scenario {args.scenario!r}; known: {', '.join(scenarios.FAMILIES)}",
            file=sys.stderr,
        )
        return 2
    c = result.constants
    print(f"scenario {result.name} seed {args.seed}: n={c.n} t={c.t}, {result.periods} period(s)")
    print(f"faulty servers: {sorted(result.faulty) or 'none'}; {result.sim.sent} messages sent")
    for event in result.sim.trace:
        print(f"  {event}")
    for i, server in sorted(result.servers.items()):
        for period, outcome in sorted(server.outcomes.items()):
            why = f" ({outcome.failure})" if outcome.failure else ""
            print(f"server {i} period {period}: {outcome.status.value}{why}")
            for alert in outcome.alerts:
                print(f"    {alert}")
        if args.verbose:
            for reason in server.rejected[:20]:
                print(f"    rejected: {reason}")
    try:
        scenarios.check(result)
    except scenarios.ScenarioFailure as exc:
        print(f"FAILED: {exc}")
        return 1
    print("OK: every invariant holds")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pst",
        description=(
            "Proactive Security Toolkit appliance: n servers jointly hold the group's keys "
            "as threshold shares and refresh them every period."
        ),
    )
    parser.add_argument("--version", action="version", version=f"pst {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="run the crypto core in one process: DKG, FROST and DSS signatures, refresh, recovery",
    )
    demo.add_argument("--nodes", type=int, default=5, help="number of servers n (default 5)")
    demo.add_argument("--threshold", type=int, default=1, help="threshold t (default 1)")
    demo.set_defaults(func=_cmd_demo)
    sim = sub.add_parser("sim", help="replay one deterministic simulation of the refresh protocol")
    sim.add_argument("--scenario", help="scenario family (see --list)")
    sim.add_argument("--seed", type=int, default=0, help="the seed to replay (default 0)")
    sim.add_argument("--list", action="store_true", help="list the scenario families")
    sim.add_argument("--verbose", action="store_true", help="also print rejected messages")
    sim.set_defaults(func=_cmd_sim)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        result: int = args.func(args)
    except BrokenPipeError:  # e.g. `pst sim ... | head`
        sys.stderr.close()
        return 0
    return result


if __name__ == "__main__":
    sys.exit(main())

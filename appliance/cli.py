"""The ``pst`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from appliance import __version__


def _cmd_demo(args: argparse.Namespace) -> int:
    from appliance.demo import run_crypto_demo

    return run_crypto_demo(n=args.nodes, t=args.threshold)


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())

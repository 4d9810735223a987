"""The operator's ``pst api`` commands: ``pst api registrations list|revoke``.

They talk to the running server through its API socket (operations ``registrations`` and
``revoke``), which serves them only to root and to the server's own uid (``SO_PEERCRED``);
see :mod:`appliance.api._core` for why not through the registration file. Which server:
``--config FILE`` (one server), or ``--dir D`` for a cluster made by ``pst cluster init``
(every server, or ``--node I``).

``list`` prints, per server, each registration's name, uid, kind, unique id, number of live
handles, age and last use, and the names owned without a live registration; never a handle
or a verifier. ``revoke NAME [--uid U] [--release-name]`` ends those registrations (the
application may register again: it is no ban; it frees the user's quota) and, with
``--release-name``, lets another user take the name.

Exit status: 0 done; 1 a server could not be reached or refused, or nothing matched; 2 a
bad config or usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

EXIT_FAILED = 1
EXIT_USAGE = 2


def _servers(args: argparse.Namespace, command: str) -> list[tuple[int, Path]] | None:
    """(server id, API socket) of the chosen servers; None after printing why there are none."""
    from appliance.host.nodes import nodes_of
    from appliance.protocols.state import ConfigError

    try:
        return [(node.server, node.config().api_socket) for node in nodes_of(args)]
    except ConfigError as exc:
        print(f"pst {command}: {exc}", file=sys.stderr)
        return None


def _shown_id(unique_id: bytes) -> str:
    """A unique id as text if it is printable ASCII, else ``hex:...``."""
    if unique_id and all(0x21 <= b < 0x7F for b in unique_id):
        return unique_id.decode("ascii")
    return "hex:" + unique_id.hex()


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _table(result: Mapping[str, Any]) -> list[str]:
    now = result["now_ms"] / 1000
    regs = result["registrations"]
    rows = [("NAME", "UID", "KIND", "UNIQUE ID", "HANDLES", "AGE", "LAST USE")]
    for r in regs:
        rows.append(
            (
                r["name"],
                str(r["uid"]),
                r["kind"],
                _shown_id(r["unique_id"]) if r["unique_id"] else "-",
                str(r["handles"]),
                _ago(now - r["created_ms"] / 1000),
                _ago(now - r["last_used_ms"] / 1000) + " ago",
            )
        )
    lines: list[str] = []
    if regs:
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    live = {r["name"] for r in regs}
    idle = sorted((n, u) for n, u in result["owners"].items() if n not in live)
    if idle:
        lines.append("  names owned without a registration: " + ", ".join(f"{n} (uid {u})" for n, u in idle))
    return lines


def cmd_list(args: argparse.Namespace) -> int:
    from appliance.api.client import PstClient, PstError

    servers = _servers(args, "api registrations list")
    if servers is None:
        return EXIT_USAGE
    failed = False
    report = []
    for server, sock in servers:
        try:
            with PstClient(sock, timeout=10) as client:
                result = client.request("registrations")
        except PstError as exc:
            failed = True
            report.append({"server": server, "socket": str(sock), "error": f"{exc.code}: {exc.message}"})
            if not args.json:
                print(f"server {server} ({sock}): {exc.code}: {exc.message}", file=sys.stderr)
            continue
        report.append({"server": server, "socket": str(sock), **result})
        if not args.json:
            count = len(result["registrations"])
            print(f"server {server} ({sock}): {count} registration{'' if count == 1 else 's'}")
            for line in _table(result):
                print(line)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True, default=lambda b: _shown_id(b)))
    return EXIT_FAILED if failed else 0


def cmd_revoke(args: argparse.Namespace) -> int:
    from appliance.api.client import PstClient, PstError

    servers = _servers(args, "api registrations revoke")
    if servers is None:
        return EXIT_USAGE
    failed, done = False, False
    whose = f" of uid {args.uid}" if args.uid is not None else ""
    for server, sock in servers:
        try:
            with PstClient(sock, timeout=10) as client:
                result = client.revoke(args.name, args.uid, release_name=args.release_name)
        except PstError as exc:
            failed = True
            print(f"server {server} ({sock}): {exc.code}: {exc.message}", file=sys.stderr)
            continue
        revoked, owner = result.get("revoked", 0), result.get("owner")
        if revoked:
            done = True
            handles = result.get("handles", 0)
            what = f"{revoked} registration(s) of {args.name!r}{whose} ({handles} handles)"
            print(f"server {server}: revoked {what}")
        else:
            print(f"server {server}: no registration of {args.name!r}{whose}")
        if result.get("released"):
            done = True
            print(f"server {server}: the name {args.name!r} is released (it belonged to uid {owner})")
        elif args.release_name:
            why = "nobody owns it" if owner is None else f"it belongs to uid {owner}"
            print(f"server {server}: the name {args.name!r} is not released: {why}")
    if not done and not failed:
        print(f"pst api registrations revoke: nothing to revoke for {args.name!r}{whose}", file=sys.stderr)
    return 0 if done and not failed else EXIT_FAILED


def _where(parser: argparse.ArgumentParser) -> None:
    from appliance.host.nodes import add_node_options

    add_node_options(parser, node=True)


def add_commands(sub: Any) -> None:
    """Register ``api`` on the ``pst`` subparsers."""
    api = sub.add_parser("api", help="the local API of applications: registrations (operator)")
    asub = api.add_subparsers(dest="api_command", metavar="WHAT", required=True)
    regs = asub.add_parser(
        "registrations",
        help="list or revoke the applications' registrations (root or the server's user)",
    )
    rsub = regs.add_subparsers(dest="registrations_command", metavar="ACTION", required=True)
    listing = rsub.add_parser(
        "list", help="name, uid, kind, unique id, handles, age and last use of every registration"
    )
    _where(listing)
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(func=cmd_list)
    revoke = rsub.add_parser(
        "revoke", help="end an application's registrations now (frees the user's quota; no ban)"
    )
    _where(revoke)
    revoke.add_argument("name", help="the application name")
    revoke.add_argument("--uid", type=int, help="only the registrations of this uid")
    revoke.add_argument(
        "--release-name",
        action="store_true",
        help="also let the name go: the next user to register it owns it (and signs under it)",
    )
    revoke.set_defaults(func=cmd_revoke)

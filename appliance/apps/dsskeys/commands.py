"""``pst dss keygen|sign|pubkey``: an application's threshold DSS keys from the command line.

``keygen NAME`` makes key NAME of the application (``--app``, client ``--unique-id``) and
prints its PEM public key (or writes it to ``--out``); ``sign NAME`` signs ``--file`` (or
standard input) and writes the DER signature to ``--out``; ``pubkey NAME`` prints the PEM.
``openssl dgst -sha256 -verify pub.pem -signature sig.der FILE`` checks a signature.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

#: Seconds ``sign`` keeps asking while the network cannot sign yet (no presignature, a refresh).
UNAVAILABLE_WAIT = 30.0


def add_dss_commands(sub: Any) -> None:
    from appliance.host.nodes import add_node_options

    dssp = sub.add_parser("dss", help="an application's threshold DSS keys: keygen, sign, pubkey (local API)")
    dsub = dssp.add_subparsers(dest="dss_command", metavar="ACTION", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        add_node_options(p, node=True)
        p.add_argument("--app", default="pst-cli", help="the application the key belongs to")
        p.add_argument("--unique-id", default="default", help="this client's unique id (the key's owner)")
        p.add_argument("name", metavar="NAME", help="the key's name in the application")

    keygen = dsub.add_parser("keygen", help="GenerateDSSKey: a new key of the application; prints its PEM")
    common(keygen)
    keygen.add_argument("--group", default="p256", choices=["p256", "dsa2048"], help="default p256 (ECDSA)")
    keygen.add_argument("--out", help="write the PEM public key to this file")
    keygen.set_defaults(func=_cmd_dss)
    sign = dsub.add_parser("sign", help="GenerateDSASignature: sign a file (SHA-256) with the key")
    common(sign)
    sign.add_argument("--file", help="the message (default: standard input)")
    sign.add_argument("--out", required=True, help="the DER signature's file")
    sign.set_defaults(func=_cmd_dss)
    pubkey = dsub.add_parser("pubkey", help="the key's PEM public key")
    common(pubkey)
    pubkey.add_argument("--out", help="write the PEM to this file")
    pubkey.set_defaults(func=_cmd_dss)


def _socket(args: argparse.Namespace) -> Path | None:
    from appliance.host.nodes import nodes_of

    nodes = nodes_of(args)
    if args.config is None and args.node is None:
        nodes = [n for n in nodes if n.pid() is not None][:1]
    if not nodes:
        print(f"pst dss {args.dss_command}: no server of the cluster is running", file=sys.stderr)
        return None
    return nodes[0].config().api_socket


def _write_or_print(data: bytes, out: str | None) -> None:
    if out is None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        Path(out).write_bytes(data)


def _cmd_dss(args: argparse.Namespace) -> int:
    from appliance.api.client import PstClient, PstError

    command = args.dss_command
    try:
        sock = _socket(args)
        if sock is None:
            return 1
        with PstClient(sock, timeout=60) as client:
            client.register(args.app, args.unique_id)
            if command == "keygen":
                _write_or_print(client.generate_dss_key(args.name, args.group), args.out)
            elif command == "pubkey":
                _write_or_print(client.dss_key_public_key(args.name), args.out)
            else:
                message = Path(args.file).read_bytes() if args.file else sys.stdin.buffer.read()
                deadline = time.monotonic() + UNAVAILABLE_WAIT
                while True:
                    try:
                        signature = client.dss_sign_with_key(args.name, message)
                        break
                    except PstError as exc:
                        if exc.code != "unavailable" or time.monotonic() > deadline:
                            raise
                        time.sleep(0.5)
                Path(args.out).write_bytes(signature)
                print(f"signature by {args.app}/{args.name} written to {args.out}", file=sys.stderr)
    except PstError as exc:
        print(f"pst dss {command}: {exc.code}: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"pst dss {command}: {exc}", file=sys.stderr)
        return 2
    return 0

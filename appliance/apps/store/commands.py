"""``pst store put|get|write|until|joint``: the data storage API from the command line.

Values come from ``--file`` or standard input. A secret's value is never printed unless asked:
``get`` of a secret writes it to ``--out FILE`` (mode 0600) or, with ``--show-secret``, to
standard output. The X25519 key of a ``secret-single`` item's owner is kept in ``--key FILE``
(made, mode 0600, if it does not exist): only it can open the item's shares later.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import nacl.public

#: Seconds ``get`` keeps trying while too few servers can give a share (a refresh under way).
UNAVAILABLE_WAIT = 30.0
#: The types ``put`` takes (StoreUntil and joint secrets have their own commands).
WRITE_TYPES = ["public-once", "public-rw", "secret-single", "secret-sw-dr", "secret-dw-dr"]


def add_store_commands(sub: Any) -> None:
    from appliance.host.nodes import add_node_options

    storep = sub.add_parser(
        "store", help="the data storage API (Table 4): put, get, write, until, joint (a server's local API)"
    )
    ssub = storep.add_subparsers(dest="store_command", metavar="ACTION", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        add_node_options(p, node=True)
        p.add_argument("--app", default="pst-cli", help="the application (data ids are per application)")
        p.add_argument("--unique-id", default="default", help="this client's unique id (the owner)")
        p.add_argument("--key", help="the owner's X25519 key file (secret-single; made if missing)")

    def value(p: argparse.ArgumentParser) -> None:
        p.add_argument("--file", help="the value (default: standard input)")

    put = ssub.add_parser("put", help="StoreData: a new item (version 1)")
    common(put)
    put.add_argument("data_id", metavar="ID")
    value(put)
    put.add_argument("--type", default="public-once", choices=WRITE_TYPES, help="default public-once")
    put.set_defaults(func=_cmd_store)
    get = ssub.add_parser("get", help="Retrieve: a public value, or a secret opened from t+1 shares")
    common(get)
    get.add_argument("data_id", metavar="ID")
    get.add_argument("--out", help="write the value to this file (mode 0600) instead of printing it")
    get.add_argument("--show-secret", action="store_true", help="print a secret value on standard output")
    get.set_defaults(func=_cmd_store)
    write = ssub.add_parser("write", help="Write: the next version of read/write data (a quorum's)")
    common(write)
    write.add_argument("data_id", metavar="ID")
    write.add_argument("version", type=int, metavar="VERSION")
    value(write)
    write.add_argument("--type", default="public-rw", choices=["public-rw", "secret-dw-dr"])
    write.set_defaults(func=_cmd_store)
    until = ssub.add_parser("until", help="StoreUntil: a secret nobody can read before DATE")
    common(until)
    until.add_argument("data_id", metavar="ID")
    until.add_argument("date", metavar="DATE", help="Unix seconds, or ISO 8601 (UTC unless it says)")
    value(until)
    until.set_defaults(func=_cmd_store)
    joint = ssub.add_parser("joint", help="GenerateJointSecret with a specified value (a quorum's)")
    common(joint)
    joint.add_argument("data_id", metavar="ID")
    value(joint)
    joint.set_defaults(func=_cmd_store)


def parse_date(text: str) -> float:
    """Unix seconds, or an ISO 8601 time (UTC unless it names a zone); ValueError otherwise."""
    try:
        return float(text)
    except ValueError:
        pass
    when = dt.datetime.fromisoformat(text)
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def _read_value(args: argparse.Namespace) -> bytes:
    if args.file is not None and args.file != "-":
        return Path(args.file).read_bytes()
    return sys.stdin.buffer.read()


def _owner_key(path: str | None, create: bool) -> nacl.public.PrivateKey | None:
    import nacl.public

    if path is None:
        return None
    p = Path(path)
    if p.exists():
        raw = p.read_bytes()
        if len(raw) != 32:
            raise ValueError(f"{p}: not an X25519 private key (32 bytes)")
        return nacl.public.PrivateKey(raw)
    if not create:
        raise ValueError(f"{p}: no such key file")
    key = nacl.public.PrivateKey.generate()
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(bytes(key))
    return key


def _socket(args: argparse.Namespace) -> Path | None:
    from appliance.host.nodes import nodes_of

    nodes = nodes_of(args)
    if args.config is None and args.node is None:
        nodes = [n for n in nodes if n.pid() is not None][:1]
    if not nodes:
        print(f"pst store {args.store_command}: no server of the cluster is running", file=sys.stderr)
        return None
    return nodes[0].config().api_socket


def _cmd_store(args: argparse.Namespace) -> int:
    from appliance.api.client import PstClient, PstError

    command = args.store_command
    try:
        sock = _socket(args)
        if sock is None:
            return 1
        key = _owner_key(args.key, create=command == "put")
        with PstClient(sock, timeout=60) as client:
            client.register(args.app, args.unique_id)
            if command == "put":
                if args.type == "secret-single" and key is None:
                    raise ValueError("a secret-single item needs the owner's --key FILE")
                version = client.store_data(args.data_id, _read_value(args), args.type, reader=key)
                print(f"stored {args.app}/{args.data_id} version {version} ({args.type})")
            elif command == "write":
                version = client.write(args.data_id, _read_value(args), args.version, args.type)
                print(f"wrote {args.app}/{args.data_id} version {version}")
            elif command == "until":
                when = parse_date(args.date)
                client.store_until(args.data_id, _read_value(args), when)
                date = dt.datetime.fromtimestamp(when, dt.UTC).isoformat()
                print(f"stored {args.app}/{args.data_id} until {date}")
            elif command == "joint":
                client.generate_joint_secret(args.data_id, _read_value(args))
                print(f"stored joint secret {args.app}/{args.data_id}")
            else:
                return _get(client, args, key)
    except PstError as exc:
        print(f"pst store {command}: {exc.code}: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"pst store {command}: {exc}", file=sys.stderr)
        return 2
    return 0


def _get(client: Any, args: argparse.Namespace, key: nacl.public.PrivateKey | None) -> int:
    from appliance.api.client import PstError

    secret = client.store_kind(args.data_id)
    if secret and args.out is None and not args.show_secret:
        print(
            f"pst store get: {args.app}/{args.data_id} is secret: give --out FILE or --show-secret",
            file=sys.stderr,
        )
        return 2
    deadline = time.monotonic() + UNAVAILABLE_WAIT
    while True:  # no t+1 shares now (servers refreshing or recovering): a little later
        try:
            data = client.retrieve(args.data_id, reader=key)
            break
        except PstError as exc:
            if exc.code != "unavailable" or time.monotonic() > deadline:
                raise
            time.sleep(1.0)
    if args.out is not None:
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        print(f"{len(data)} bytes written to {args.out}", file=sys.stderr)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    return 0

"""``pst store put|get|write|until|joint|batch|pending|approve``: the data storage API from the
command line.

Values come from ``--file`` or standard input. A secret's value is never printed unless asked:
``get`` of a secret writes it to ``--out FILE`` (mode 0600) or, with ``--show-secret``, to
standard output. The X25519 key of a ``secret-single`` item's owner is kept in ``--key FILE``
(made, mode 0600, if it does not exist): only it can open the item's shares later.

A distributed application's quorum operations: with ``--password-file FILE`` the command
registers as this server's client of the distributed application ``--app`` (same name and
password at every server); its ``put --type public-rw|secret-dw-dr``, ``write``, ``joint`` and
its ``get`` of a quorum-read secret then wait until a strict majority of the application's
clients asked for or approved the same request. The other clients list the waiting store
requests with ``pending`` and decide them with ``approve ID... | --all [--deny]``. ``batch``
stores many new items (``ID=FILE`` pairs) in one request, ordered together.
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
#: The types ``batch`` takes: those one client writes (store_batch is a centralized client's).
BATCH_TYPES = ["public-once", "secret-single", "secret-sw-dr", "store-until"]


def add_store_commands(sub: Any) -> None:
    storep = sub.add_parser(
        "store",
        help="the data storage API (Table 4): put, get, write, until, joint, batch, pending, approve "
        "(a server's local API)",
    )
    ssub = storep.add_subparsers(dest="store_command", metavar="ACTION", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        where = p.add_mutually_exclusive_group(required=True)
        where.add_argument("--dir", help="a cluster made by pst cluster init (its first running server)")
        where.add_argument("--config", help="one server's TOML config (e.g. /etc/pst/server.toml)")
        where.add_argument("--socket", help="a server's API socket (e.g. /run/pst/api.sock)")
        p.add_argument("--node", type=int, help="with --dir: this server")
        p.add_argument("--app", default="pst-cli", help="the application (data ids are per application)")
        p.add_argument("--unique-id", default="default", help="this client's unique id (the owner)")
        p.add_argument("--key", help="the owner's X25519 key file (secret-single; made if missing)")
        p.add_argument(
            "--password-file",
            help="register as this server's client of the distributed application --app (the "
            "password is this file's first line; - for standard input): quorum types are then "
            "approved by a majority of its clients",
        )

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
    joint = ssub.add_parser(
        "joint", help="GenerateJointSecret: a specified value, or --random (a quorum's: --password-file)"
    )
    common(joint)
    joint.add_argument("data_id", metavar="ID")
    value(joint)
    joint.add_argument(
        "--random", action="store_true", help="t+1 servers' random contributions (no value read)"
    )
    joint.set_defaults(func=_cmd_store)
    batch = ssub.add_parser(
        "batch",
        help="StoreData of many new items in one request (ordered together); prints each one's "
        "outcome, exits 1 if any was refused",
    )
    common(batch)
    batch.add_argument("items", nargs="+", metavar="ID=FILE", help="an item's id and the file of its value")
    batch.add_argument(
        "--type",
        default="public-once",
        choices=BATCH_TYPES,
        help="default public-once (a client's types: a quorum approves one request at a time)",
    )
    batch.add_argument("--until", metavar="DATE", help="store-until: the release date (as for until)")
    batch.set_defaults(func=_cmd_store)
    pending = ssub.add_parser(
        "pending", help="the store requests of the application's other clients waiting for ours"
    )
    common(pending)
    pending.set_defaults(func=_cmd_store)
    approve = ssub.add_parser(
        "approve", help="approve (or --deny) waiting store requests of the application's other clients"
    )
    common(approve)
    approve.add_argument("ids", nargs="*", metavar="ID", help="hex request ids, as pending prints them")
    approve.add_argument("--all", action="store_true", help="every waiting store request")
    approve.add_argument("--deny", action="store_true", help="deny instead of approve")
    approve.set_defaults(func=_cmd_store)


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

    if args.socket is not None:
        return Path(args.socket)
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
        key = _owner_key(args.key, create=command in ("put", "batch"))
        with PstClient(sock, timeout=60) as client:
            if args.password_file is not None:
                client.register_distributed(args.app, _password(args.password_file))
            elif command in ("pending", "approve"):
                raise ValueError(
                    "pending and approve are for a distributed application: give --password-file"
                )
            else:
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
                client.generate_joint_secret(args.data_id, None if args.random else _read_value(args))
                print(f"stored joint secret {args.app}/{args.data_id}")
            elif command == "batch":
                return _batch(client, args, key)
            elif command in ("pending", "approve"):
                return _decide(client, args)
            else:
                return _get(client, args, key)
    except PstError as exc:
        print(f"pst store {command}: {exc.code}: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"pst store {command}: {exc}", file=sys.stderr)
        return 2
    return 0


def _password(path: str) -> bytes:
    if path == "-":
        line = sys.stdin.buffer.readline()
    else:
        with open(path, "rb") as f:
            line = f.readline()
    password = line.rstrip(b"\r\n")
    if not password:
        raise ValueError(f"{path}: no password on its first line")
    return password


def _batch(client: Any, args: argparse.Namespace, key: nacl.public.PrivateKey | None) -> int:
    """``batch ID=FILE...``: one store_batch request; each item's outcome on its own line."""
    items: list[tuple[str, bytes]] = []
    for item in args.items:
        data_id, sep, file = item.partition("=")
        if not sep or not data_id or not file:
            raise ValueError(f"{item!r}: expected ID=FILE")
        items.append((data_id, Path(file).read_bytes()))
    if args.type == "secret-single" and key is None:
        raise ValueError("secret-single items need the owner's --key FILE")
    if (args.type == "store-until") != (args.until is not None):
        raise ValueError("--until DATE goes with --type store-until, and only there")
    until = parse_date(args.until) if args.until is not None else None
    results = client.store_many(items, args.type, reader=key, until=until)
    refused = 0
    for (data_id, _value), result in zip(items, results, strict=True):
        if isinstance(result, int):
            print(f"stored {args.app}/{data_id} version {result} ({args.type})")
        else:
            refused += 1
            print(f"refused {args.app}/{data_id}: {result.code}: {result.message}")
    return 1 if refused else 0


def _decide(client: Any, args: argparse.Namespace) -> int:
    """``pending``: list the waiting store requests; ``approve``: decide the chosen ones."""
    from appliance.crypto.errors import DecodeError

    chosen = {i.lower() for i in getattr(args, "ids", [])}
    deciding = args.store_command == "approve"
    if deciding and not chosen and not args.all:
        raise ValueError("approve: name request ids (as pending prints them) or give --all")
    for p in client.pending():
        if p.protocol != "store":
            continue
        try:
            request = p.store_request()
        except DecodeError as exc:
            what = f"(not a store request: {exc})"
        else:
            kind = "write" if hasattr(request, "dtype") else "read"
            what = f"{kind} {request.app}/{request.data_id} version {request.version}"
            if kind == "write":
                what += f" ({request.dtype.value})"
                if not request.dtype.secret:
                    what += f" value {request.value[:32]!r}" + ("..." if len(request.value) > 32 else "")
        verdict = "pending"
        if deciding and (args.all or p.request_id.hex() in chosen):
            (client.deny if args.deny else client.approve)(p.request_id)
            verdict = "denied" if args.deny else "approved"
            chosen.discard(p.request_id.hex())
        servers = ",".join(str(i) for i in p.servers)
        expires = f"expires in {p.expires_in:.0f} s"
        print(f"{p.request_id.hex()}\t{verdict}\t{what}\tfrom servers {servers}\t{expires}")
    if deciding and chosen:
        print(f"pst store approve: no waiting store request {', '.join(sorted(chosen))}", file=sys.stderr)
        return 1
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

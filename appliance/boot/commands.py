"""The ``pst`` commands of the boot path: ``check``, ``manifest`` and ``upgrade``.

``pst check --config F`` runs :func:`appliance.boot.check.boot_check` and prints every
check; exit status 0 if the server may boot, 1 with the reason if not, 2 for an unusable
config. ``pst manifest`` prints the digest of the installed code's manifest (what goes in
``network.code_digest``) and can write the manifest. ``pst upgrade approve`` and ``pst
upgrade install`` are the operator's side of :mod:`appliance.boot.upgrade`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

EXIT_REFUSED = 1
EXIT_USAGE = 2


def _load_config(path: str, command: str) -> Any:
    from appliance.host import config as node_config
    from appliance.protocols.state import ConfigError

    try:
        return node_config.load(Path(path))
    except ConfigError as exc:
        print(f"pst {command}: {exc}", file=sys.stderr)
        return None


def cmd_check(args: argparse.Namespace) -> int:
    from appliance.boot.check import BootRefused, boot_check

    config = _load_config(args.config, "check")
    if config is None:
        return EXIT_USAGE
    try:
        report = boot_check(config, strict=args.strict)
    except BootRefused as exc:
        _check_private_state(config, exc.report)
        for line in exc.report.lines():
            print(line)
        print(f"pst check: BOOT REFUSED: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    _check_private_state(config, report)
    for line in report.lines():
        print(line)
    verdict = "may boot" if not report.warnings else f"may boot, with {len(report.warnings)} warning(s)"
    print(f"server {config.server_id} {verdict}")
    return 0


def _check_private_state(config: Any, report: Any) -> None:
    """The private state: a warning if it exists but cannot be read or decoded (pst serve would
    raise a private-state-unreadable alert, set it aside and start recovering)."""
    from appliance.boot.check import OK, WARN
    from appliance.node.store import StateDir

    store = StateDir(config.state_dir)
    problem = store.private_problem()
    if problem is not None:
        report.add(
            "private state",
            WARN,
            f"{problem}: pst serve will set it aside and start recovering (its shares come back "
            "from the others at the next refresh); if it should be readable, fix its owner and mode "
            "(the server's user, 0600 in a 0700 directory)",
        )
    elif (store.private_dir / "period.cbor").exists():
        report.add("private state", OK, f"{store.private_dir / 'period.cbor'} reads and decodes")
    for path in store.set_aside():
        report.add("private state", WARN, f"{path}: set aside as unusable; inspect it, then erase it")


def cmd_manifest(args: argparse.Namespace) -> int:
    """The digest of the environment's manifest (format 2), or of one package directory (--root).

    Started by ``bin/pst``, the environment's manifest is computed by
    :mod:`appliance.boot.bootstrap` before anything of the environment runs; this is the same
    computation for a ``pst`` started otherwise.
    """
    from appliance.boot.manifest import Manifest, ManifestError, environment
    from appliance.host.files import atomic_write

    try:
        if args.root:
            manifest = Manifest.build(Path(args.root))
            what = f"under {args.root}"
        else:
            layout = environment()
            manifest = Manifest.build_environment(layout)
            what = f"in {layout.describe()}"
    except ManifestError as exc:
        print(f"pst manifest: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    if args.out:
        atomic_write(Path(args.out), manifest.encode())
    print(f"{len(manifest)} files {what}", file=sys.stderr)
    print(manifest.digest().hex())
    return 0


def _certified(config: Any, command: str) -> Any:
    """(M, chain, C in force) of a server whose M is valid; None (after printing why) otherwise."""
    from appliance.boot.check import read_vstart
    from appliance.boot.rom import RomError
    from appliance.boot.upgrade import apply_chain, read_chain
    from appliance.crypto.errors import DecodeError
    from appliance.protocols.state import InvariantInfo

    public_dir = config.state_dir / "public"
    try:
        vstart, _ = read_vstart(config)
        m = InvariantInfo.decode((public_dir / "M.cbor").read_bytes())
    except (RomError, OSError, DecodeError) as exc:
        print(f"pst upgrade {command}: no usable ROM and M: {exc}", file=sys.stderr)
        return None
    problem = m.check(config.server_id, vstart)
    if problem is not None:
        print(f"pst upgrade {command}: this server's M is not valid ({problem})", file=sys.stderr)
        return None
    chain, why = read_chain(public_dir)
    current, applied, step = apply_chain(m, chain)
    if why is not None or step is not None:  # certificates authenticate themselves: drop the bad ones
        print(
            f"pst upgrade {command}: ignoring the invalid rest of the stored chain: {why or step}",
            file=sys.stderr,
        )
    return m, chain[:applied], current


def cmd_upgrade_approve(args: argparse.Namespace) -> int:
    from appliance.boot.manifest import Manifest
    from appliance.boot.upgrade import APPROVAL_FILE, UpgradeError, propose
    from appliance.crypto.errors import DecodeError
    from appliance.host.files import atomic_write

    config = _load_config(args.config, "upgrade approve")
    if config is None:
        return EXIT_USAGE
    try:
        manifest = Manifest.decode(Path(args.manifest).read_bytes())
    except (OSError, DecodeError) as exc:
        print(f"pst upgrade approve: {args.manifest}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    certified = _certified(config, "approve")
    if certified is None:
        return EXIT_REFUSED
    _, _, current = certified
    try:
        upgrade = propose(current, manifest)
    except UpgradeError as exc:
        print(f"pst upgrade approve: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    path = config.state_dir / "public" / APPROVAL_FILE
    atomic_write(path, upgrade.encode())
    print(f"server {config.server_id} approves the upgrade to code {manifest.digest().hex()}")
    print(f"  ({len(manifest)} files; replaces code {current.code_digest.hex()[:16]}..)")
    print(f"  upgrade fingerprint {upgrade.fingerprint()}: compare it with the other operators")
    print(f"  approval written to {path}; this server's signing service now contributes to it")
    return 0


def cmd_upgrade_install(args: argparse.Namespace) -> int:
    from appliance.boot.upgrade import (
        APPROVAL_FILE,
        UPGRADES_FILE,
        Upgrade,
        UpgradeError,
        add_to_chain,
        encode_chain,
        read_approval,
    )
    from appliance.crypto.errors import DecodeError
    from appliance.host.files import atomic_write

    config = _load_config(args.config, "upgrade install")
    if config is None:
        return EXIT_USAGE
    try:
        upgrade = Upgrade.decode(Path(args.certificate).read_bytes())
    except (OSError, DecodeError) as exc:
        print(f"pst upgrade install: {args.certificate}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    certified = _certified(config, "install")
    if certified is None:
        return EXIT_REFUSED
    m, chain, _ = certified
    try:
        new_chain = add_to_chain(m, chain, upgrade)
    except UpgradeError as exc:
        print(f"pst upgrade install: {args.certificate}: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    public_dir = config.state_dir / "public"
    atomic_write(public_dir / UPGRADES_FILE, encode_chain(new_chain))
    approval = read_approval(public_dir)
    if approval is not None and approval.payload() == upgrade.payload():
        (public_dir / APPROVAL_FILE).unlink(missing_ok=True)
    print(f"server {config.server_id}: upgrade {upgrade.fingerprint()} installed (signed by the group key)")
    print(f'  set code_digest = "{upgrade.constants.code_digest.hex()}" in [network] of {config.path},')
    print("  install the new code and restart the server now (from the next refresh on, a server still")
    print("  running the old code stops); `pst check` tells whether it may boot")
    return 0


def cmd_upgrade_sign(args: argparse.Namespace) -> int:
    """Ask the running server for the network's signature on the approved upgrade."""
    from appliance.api.client import PstClient, PstError

    config = _load_config(args.config, "upgrade sign")
    if config is None:
        return EXIT_USAGE
    print("asking the network to sign the approved upgrade (needs t+1 approving operators) ...", flush=True)
    try:
        with PstClient(config.api_socket, timeout=60) as client:
            certificate = client.upgrade_sign()
    except (PstError, OSError) as exc:
        print(f"pst upgrade sign: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    Path(args.out).write_bytes(certificate)
    print(f"signed upgrade written to {args.out}; install it on every server with pst upgrade install")
    return 0


def add_commands(sub: Any) -> None:
    """Register ``check``, ``manifest`` and ``upgrade`` on the ``pst`` subparsers."""
    check = sub.add_parser("check", help="run the boot checks (ROM, M, C, code manifest) for one server")
    check.add_argument("--config", required=True, help="the server's TOML config")
    check.add_argument(
        "--strict",
        action="store_true",
        help="also refuse a server without a valid M or a C without code digest",
    )
    check.set_defaults(func=cmd_check)
    manifest = sub.add_parser(
        "manifest",
        help="the digest of this environment's manifest: venv, site-packages, appliance (for code_digest)",
    )
    manifest.add_argument(
        "--root",
        help="list one package directory instead (manifest format 1: the environment is not covered)",
    )
    manifest.add_argument("--out", help="also write the manifest (CBOR) to this file")
    manifest.set_defaults(func=cmd_manifest)
    upgrade = sub.add_parser("upgrade", help="approve or install a network-signed code upgrade")
    usub = upgrade.add_subparsers(dest="upgrade_command", metavar="ACTION", required=True)
    approve = usub.add_parser(
        "approve", help="approve, on this server, the upgrade to the code of a manifest"
    )
    approve.add_argument("--config", required=True)
    approve.add_argument("--manifest", required=True, help="the new code's manifest (pst manifest --out)")
    approve.set_defaults(func=cmd_upgrade_approve)
    install = usub.add_parser("install", help="store a network-signed upgrade certificate on this server")
    install.add_argument("--config", required=True)
    install.add_argument("--certificate", required=True, help="the signed upgrade [Scert(U), U]")
    install.set_defaults(func=cmd_upgrade_install)
    signer = usub.add_parser(
        "sign", help="have the running network sign the upgrade approved here (t+1 operators must approve)"
    )
    signer.add_argument("--config", required=True)
    signer.add_argument("--out", required=True, help="where to write the signed upgrade [Scert(U), U]")
    signer.set_defaults(func=cmd_upgrade_sign)

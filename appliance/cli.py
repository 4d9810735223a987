"""The ``pst`` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from appliance import __version__
from appliance.boot import bootstrap


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.crypto:
        from appliance.demo import run_crypto_demo

        return run_crypto_demo(n=args.nodes, t=args.threshold)
    from appliance.protocols.state import ConfigError, check_size

    try:
        check_size(args.nodes, args.threshold)  # before any directory is made or server started
    except ConfigError as exc:
        print(f"pst demo: {exc}", file=sys.stderr)
        return 2
    return _network_demo(args)


def _network_demo(args: argparse.Namespace) -> int:
    import tempfile
    import time

    from appliance.node.cluster import init_cluster

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="pst-demo-"))
    print(f"== Proactive Security Toolkit demo: {args.nodes} servers, threshold t={args.threshold}")
    print(f"   cluster directory: {root}")
    init_cluster(
        root,
        n=args.nodes,
        t=args.threshold,
        period_seconds=args.period,
        round_ms=args.round_ms,
        base_port=args.base_port,
        progress=lambda line: print(f"   {line}", flush=True),
    )
    nodes = _cluster_nodes(root)
    _start_clear_of_a_boundary(nodes)
    for node in nodes:
        _start_node(node)
    print(f"== {len(nodes)} servers started (one process each, TLS 1.3 between them on 127.0.0.1)")
    print(f"   status page: {_status_page(nodes[0])}   (every server has one; see `pst status`)")
    print(f"   every {args.period:g} s they refresh: new period keys, a KeyTable signed with the group key,")
    print("   fresh shares of the group key; the group public key never changes.")
    print("   Each server's shares live only in its key-holder process, replaced after every refresh;")
    print("   the ROMs are simulated (read-only files), the code is checked against the manifest in C.")
    print("   In another terminal:")
    print(f"     .venv/bin/pst status --dir {root}")
    print(f"     .venv/bin/pst alerts --dir {root}")
    print(f"     .venv/bin/pst pubkey --dir {root} --pem")
    print(f"     .venv/bin/pst check --config {root}/node-1/config.toml   # the boot checks of server 1")
    print(f"     kill -9 $(cat {root}/node-3/server.pid)   # crash a server: the others go on, it restarts")
    print("   Ctrl-C stops the demo.")
    seen: dict[int, object] = {}
    try:
        while True:
            time.sleep(1.0)
            _reap()
            for node in nodes:
                if not _alive(_pid(node)):
                    print(
                        f"   {node.name} is not running: restarting it from its state directory", flush=True
                    )
                    _start_node(node)
                st = _read_status(node)
                last = st.get("last_refresh") or {}
                key = last.get("period")
                server = int(node.name.split("-")[1])
                if key is not None and seen.get(server) != key:
                    seen[server] = key
                    print(
                        f"   server {server}: period {key} {last.get('status')} (refresh took "
                        f"{last.get('duration_s')} s), KeyTable {st.get('keytable_fingerprint')}",
                        flush=True,
                    )
    except KeyboardInterrupt:
        print("\n== stopping the servers ...")
        _stop_nodes(nodes)
        print(f"   stopped. Logs and state stay in {root}")
    return 0


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


def _cluster_nodes(root: Path) -> list[Path]:
    nodes = sorted(root.glob("node-*"), key=lambda p: int(p.name.split("-")[1]))
    if not nodes:
        raise SystemExit(f"pst: {root} holds no cluster (run: pst cluster init --dir {root})")
    return nodes


def _cmd_init(args: argparse.Namespace) -> int:
    import logging

    import trio

    from appliance.host import config as node_config
    from appliance.node.ceremony import CeremonyError, run_init
    from appliance.protocols.state import ConfigError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("appliance.net").setLevel(logging.WARNING)
    try:
        config = node_config.load(Path(args.config))
        outcome = trio.run(run_init, config, Path(args.sstart), args.start_at)
    except (ConfigError, CeremonyError) as exc:
        print(f"pst init: {exc}", file=sys.stderr)
        return 2
    for alert in outcome.alerts:
        print(f"pst init: {alert}", file=sys.stderr)
    if not outcome.ok:
        print(f"pst init: initialization failed: {outcome.failure}", file=sys.stderr)
        return 1
    assert outcome.public is not None and outcome.public.m is not None
    print(f"server {config.server_id} initialized; Vcert {outcome.public.m.vcert.hex()}; Sstart erased")
    return 0


def _network_ceremony(args: argparse.Namespace) -> int:
    import subprocess
    import time

    from appliance.node.cluster import prepare_network_ceremony

    root = Path(args.dir)
    prepare_network_ceremony(
        root,
        n=args.nodes,
        t=args.threshold,
        period_seconds=args.period,
        round_ms=args.round_ms,
        base_port=args.base_port,
        progress=lambda line: print(line, flush=True),
    )
    start = time.time() + 4.0
    print(
        f"initialization (Table 3) over the network: {args.nodes} `pst init` processes start together ...",
        flush=True,
    )
    procs = {}
    for node in _cluster_nodes(root):
        argv = bootstrap.command(
            "init",
            "--config",
            str(node / "config.toml"),
            "--sstart",
            str(node / "sstart"),
            "--start-at",
            repr(start),
        )
        with open(node / "init.log", "wb") as log:
            procs[node] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    failed = 0
    for node, proc in procs.items():
        code = proc.wait(timeout=300)
        line = (node / "init.log").read_text().strip().splitlines()
        print(f"  {node.name}: {line[-1] if line else '(no output)'}")
        failed += code != 0
    if failed:
        print(f"pst cluster init: {failed} servers failed to initialize; see their init.log", file=sys.stderr)
        return 1
    return 0


def _cmd_cluster_init(args: argparse.Namespace) -> int:
    from appliance.node.cluster import init_cluster
    from appliance.protocols.state import ConfigError, check_size

    try:
        check_size(args.nodes, args.threshold)  # before anything is written
    except ConfigError as exc:
        print(f"pst cluster init: {exc}", file=sys.stderr)
        return 2
    if args.network_ceremony:
        try:
            code = _network_ceremony(args)
        except ConfigError as exc:
            print(f"pst cluster init: {exc}", file=sys.stderr)
            return 2
        if code == 0:
            print(f"cluster ready in {args.dir}: start it with `pst cluster up --dir {args.dir}`")
        return code
    try:
        init_cluster(
            Path(args.dir),
            n=args.nodes,
            t=args.threshold,
            period_seconds=args.period,
            round_ms=args.round_ms,
            base_port=args.base_port,
            progress=lambda line: print(line, flush=True),
        )
    except ConfigError as exc:
        print(f"pst cluster init: {exc}", file=sys.stderr)
        return 2
    print(f"cluster ready in {args.dir}: start it with `pst cluster up --dir {args.dir}`")
    return 0


def _read_status(node: Path) -> dict[str, Any]:
    path = node / "state" / "public" / "status.json"
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        why = "not started yet" if isinstance(exc, FileNotFoundError) else f"{path}: {exc}"
        return {"server": int(node.name.split("-")[1]), "status": "unknown", "error": why}
    return data


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _cmd_status(args: argparse.Namespace) -> int:
    rows = []
    for node in _cluster_nodes(Path(args.dir)):
        st = _read_status(node)
        st["running"] = _alive(_pid(node))
        st["alerts"] = sum(len(path.read_text().splitlines()) for path in _alert_files(node) if path.exists())
        st["url"] = _status_page(node)
        rows.append(st)
    # Exit status 1 unless every server runs and is operational (for scripts and monitoring).
    healthy = all(st["running"] and st.get("status") == "operational" for st in rows) and bool(rows)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0 if healthy else 1
    print(f"{'server':>6}  {'running':7}  {'period':>6}  {'status':11}  ", end="")
    print(f"{'last refresh':22}  {'alerts':>6}  keytable")
    for st in rows:
        last = st.get("last_refresh") or {}
        when = f"p{last.get('period')} in {last.get('duration_s')} s" if last else "-"
        print(
            f"{st.get('server', '?'):>6}  {'yes' if st['running'] else 'no':7}  {st.get('period')!s:>6}  "
            f"{st.get('status', '?'):11}  {when:22}  {st['alerts']:>6}  {st.get('keytable_fingerprint')}"
        )
    keys = {st.get("group_public_key") for st in rows if st.get("group_public_key")}
    print(f"group public key: {', '.join(sorted(k for k in keys if k)) or 'unknown'}")
    if rows and rows[0].get("rom"):
        print(f"ROM: {rows[0]['rom'].split(':')[0]}")
    if rows:
        print(f"status page: {rows[0]['url']}")
    return 0 if healthy else 1


def _alert_files(node: Path) -> list[Path]:
    from appliance.node.store import StateDir

    return StateDir(node / "state").alert_files()


def _cmd_alerts(args: argparse.Namespace) -> int:
    found = False
    for node in _cluster_nodes(Path(args.dir)):
        lines: list[dict[str, Any]] = []
        for path in _alert_files(node):
            if not path.exists():
                continue
            for line in path.read_text().splitlines():
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    continue
        for a in sorted(lines, key=lambda a: a.get("time") or 0):
            found = True
            print(
                f"seen by server {node.name.split('-')[1]}: ALERT {a['kind']}: server {a['server']}, "
                f"period {a['period']}: {a['detail']}"
            )
    if not found:
        print("no alerts")
    return 0


def _cmd_pubkey(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from appliance.node.store import StateDir

    for node in _cluster_nodes(Path(args.dir)):
        loaded = StateDir(node / "state").load()
        if loaded.public.m is None:
            continue
        vcert = loaded.public.m.vcert
        if args.pem:
            pem = Ed25519PublicKey.from_public_bytes(vcert).public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            sys.stdout.write(pem.decode())
        else:
            print(vcert.hex())
        return 0
    print("pst pubkey: no server holds a valid M", file=sys.stderr)
    return 1


def _cmd_serve(args: argparse.Namespace) -> int:
    from appliance.node.run import serve

    return serve(Path(args.config))


def _pid(node: Path) -> int | None:
    """The pid in node/server.pid, if that process runs with this node's config file.

    A pid file outlives its process (a reboot, a copied directory): the number may then name an
    unrelated process, which `cluster down` must never signal."""
    try:
        pid = int((node / "server.pid").read_text())
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    config = f"{node.name}/config.toml".encode()
    return pid if any(a.endswith(config) for a in args) else None


def _start_clear_of_a_boundary(nodes: list[Path]) -> None:
    """Start a whole local cluster just after a period boundary, not just before one.

    A server that starts less than its warm-up before a period skips that refresh; servers
    started a few hundred milliseconds apart around that moment would disagree on whether to
    take part. Started just after a boundary, every one of them takes part in the next refresh.
    """
    import time

    from appliance.host import config as node_config

    if not nodes:
        return
    c = node_config.load(nodes[0] / "config.toml").constants
    now = time.time()
    boundary = c.period_start(c.period_at(now) + 1)
    if boundary - now < 2.0 and c.period_length > 2.5:
        print(
            f"   waiting {boundary - now:.1f} s for the period boundary, "
            "so that every server joins the same refresh"
        )
        time.sleep(boundary - now + 0.05)


def _start_node(node: Path) -> int:
    import subprocess

    log = open(node / "server.log", "ab")  # noqa: SIM115 - handed to the child process
    proc = subprocess.Popen(  # isolated, and measured before anything of the environment runs
        bootstrap.command("serve", "--config", str(node / "config.toml")),
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    (node / "server.pid").write_text(f"{proc.pid}\n")
    return proc.pid


def _stop_nodes(nodes: list[Path], timeout: float = 10.0) -> None:
    import signal
    import time

    pids = {node: _pid(node) for node in nodes}
    for pid in pids.values():
        if _alive(pid):
            os.kill(pid, signal.SIGTERM)  # type: ignore[arg-type]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids.values()):
        _reap()
        time.sleep(0.1)
    for node, pid in pids.items():
        if _alive(pid):
            print(f"server in {node} did not stop in {timeout:g} s: killing it", file=sys.stderr)
            os.kill(pid, signal.SIGKILL)  # type: ignore[arg-type]
        (node / "server.pid").unlink(missing_ok=True)
    _reap()


def _reap() -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def _cmd_cluster_up(args: argparse.Namespace) -> int:
    import time

    from appliance.host import config as node_config
    from appliance.protocols.state import ConfigError

    root = Path(args.dir)
    nodes = _cluster_nodes(root)
    broken = []
    for node in nodes:
        try:
            node_config.load(node / "config.toml")
        except (ConfigError, OSError) as exc:
            print(f"{node.name}: not started: {exc}", file=sys.stderr)
            broken.append(node)
    nodes = [n for n in nodes if n not in broken]
    if not any(_alive(_pid(node)) for node in nodes):
        _start_clear_of_a_boundary(nodes)
    for node in nodes:
        if _alive(_pid(node)):
            print(f"{node.name}: already running (pid {_pid(node)})")
            continue
        print(f"{node.name}: starting (log: {node / 'server.log'})", flush=True)
        _start_node(node)
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:  # ready = the local API socket is there
        _reap()
        waiting = [n for n in nodes if _alive(_pid(n)) and not _node_socket(n).exists()]
        if not waiting:
            break
        time.sleep(0.2)
    dead = [n.name for n in broken] + [n.name for n in nodes if not _alive(_pid(n))]
    if dead:
        # The others are left running: a server that fails to start does not stop the network.
        print(
            f"pst cluster up: {', '.join(dead)} not running (see above, or their server.log); "
            f"{len(nodes) + len(broken) - len(dead)} other servers left running",
            file=sys.stderr,
        )
        return 1
    print(f"{len(nodes)} servers running. `pst status --dir {root}` shows them;")
    print(f"the status page: {_status_page(nodes[0])}")
    print(f"`pst cluster down --dir {root}` stops them.")
    if args.detach:
        return 0
    print("Ctrl-C stops the cluster.")
    try:
        while True:
            time.sleep(5.0)
            _reap()
            for node in nodes:
                if not _alive(_pid(node)):
                    print(f"{node.name} exited; restarting it", flush=True)
                    _start_node(node)
    except KeyboardInterrupt:
        print("\nstopping the cluster ...")
        _stop_nodes(nodes)
    return 0


def _cmd_cluster_down(args: argparse.Namespace) -> int:
    nodes = _cluster_nodes(Path(args.dir))
    running = [n for n in nodes if _alive(_pid(n))]
    if not running:
        print(f"no server of the cluster in {args.dir} is running")
        for node in nodes:
            (node / "server.pid").unlink(missing_ok=True)
        return 0
    _stop_nodes(nodes)
    print(f"{len(running)} servers stopped")
    return 0


def _cmd_refresh(args: argparse.Namespace) -> int:
    import signal
    import time

    if not args.now:
        print("pst refresh: only --now is supported (periods otherwise follow the clock)", file=sys.stderr)
        return 2
    root = Path(args.dir)
    nodes = _cluster_nodes(root)
    periods = [p for p in (_read_status(n).get("period") for n in nodes) if isinstance(p, int)]
    if not periods:
        print("pst refresh: no server reports a period yet; is the cluster up?", file=sys.stderr)
        return 1
    period, start = max(periods) + 1, time.time() + 2.0
    sent = 0
    for node in nodes:
        pid = _pid(node)
        if not _alive(pid):
            print(f"{node.name}: not running, skipped", file=sys.stderr)
            continue
        (node / "refresh-request.json").write_text(json.dumps({"period": period, "start": start}))
        os.kill(pid, signal.SIGUSR1)  # type: ignore[arg-type]
        sent += 1
    print(f"refresh of period {period} requested from {sent} servers; waiting for it ...", flush=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        time.sleep(0.5)
        rows = [_read_status(n) for n in nodes]
        done = [r for r in rows if (r.get("last_refresh") or {}).get("period", -1) >= period]
        stopped = [n.name for n in nodes if not _alive(_pid(n))]
        if len(done) == sent or (stopped and len(done) + len(stopped) >= sent):
            for r in done:
                last = r.get("last_refresh") or {}
                print(f"  server {r.get('server')}: {last.get('status')} in {last.get('duration_s')} s")
            for name in stopped:
                print(f"  {name}: stopped (see its server.log)")
            ok = all((r.get("last_refresh") or {}).get("status") == "operational" for r in done)
            return 0 if ok and not stopped else 1
    print("pst refresh: timed out waiting for the refresh", file=sys.stderr)
    return 1


def _status_page(node: Path) -> str:
    """The URL of a server's status page (its [http] section), or why there is none."""
    from appliance.host import config as node_config
    from appliance.protocols.state import ConfigError

    try:
        http = node_config.load(node / "config.toml").http
    except ConfigError as exc:
        return f"unknown ({exc})"
    return f"{http.url}/" if http.enabled else "none (http.enabled = false)"


def _node_socket(node: Path) -> Path:
    from appliance.host import config as node_config

    return node_config.load(node / "config.toml").api_socket


def _cmd_sign(args: argparse.Namespace) -> int:
    from appliance.api import client as client_mod

    # Any size: the file is hashed as it is read, and the group signs the same payload as for the
    # whole content (docs/api.md: {"dom", "app", "sha512"}), so memory stays bounded.
    try:
        if args.file == "-":
            digest = client_mod.sha512_of(sys.stdin.buffer)
        else:
            with open(args.file, "rb") as f:
                digest = client_mod.sha512_of(f)
    except OSError as exc:
        print(f"pst sign: {args.file}: {exc.strerror}", file=sys.stderr)
        return 2
    nodes = _cluster_nodes(Path(args.dir))
    node = next((n for n in nodes if _alive(_pid(n))), None)
    if node is None:
        print("pst sign: no server of the cluster is running", file=sys.stderr)
        return 1
    client = client_mod.PstClient(str(_node_socket(node)))
    try:
        client.register(args.app, b"pst-cli")
        signature = client.sign_digest(digest)
    except client_mod.PstError as exc:
        print(f"pst sign: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    if args.out:
        Path(args.out).write_bytes(signature)
    print(signature.hex())
    return 0


def _signature_bytes(raw: bytes) -> bytes | None:
    """A signature file's 64 bytes: raw, or hex with surrounding whitespace (what `pst sign` prints)."""
    if len(raw) == 64:
        return raw
    try:
        text = raw.decode("ascii").strip()
        value = bytes.fromhex(text)
    except (UnicodeDecodeError, ValueError):
        return None
    return value if len(value) == 64 else None


def _cmd_verify(args: argparse.Namespace) -> int:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from appliance.api import app_digest_payload
    from appliance.api.client import sha512_of
    from appliance.node.store import StateDir

    try:
        with open(args.file, "rb") as f:
            digest = sha512_of(f)
        raw = Path(args.signature).read_bytes()
    except OSError as exc:
        print(f"pst verify: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    signature = _signature_bytes(raw)
    if signature is None:
        print(
            f"pst verify: {args.signature}: expected a signature of 64 bytes, or 128 hex digits "
            f"(surrounding whitespace allowed), found {len(raw)} bytes",
            file=sys.stderr,
        )
        return 2
    for node in _cluster_nodes(Path(args.dir)):
        m = StateDir(node / "state").load().public.m
        if m is None:
            continue
        try:
            Ed25519PublicKey.from_public_bytes(m.vcert).verify(
                signature, app_digest_payload(args.app, digest)
            )
        except InvalidSignature:
            print(f"INVALID: not a signature of the group key on {args.file} for application {args.app!r}")
            return 1
        print(f"OK: signed by the group key {m.vcert.hex()[:16]}.. for application {args.app!r}")
        return 0
    print("pst verify: no server holds a valid M", file=sys.stderr)
    return 1


def _cmd_rom(args: argparse.Namespace) -> int:
    from appliance.boot.backends import open_rom
    from appliance.boot.rom import RomError
    from appliance.host import config as node_config
    from appliance.protocols.state import ConfigError

    try:
        config = node_config.load(Path(args.config))
        rom = open_rom(config)
    except (ConfigError, RomError) as exc:
        print(f"pst rom: {exc}", file=sys.stderr)
        return 2
    try:
        if args.rom_command == "show":
            vstart = rom.read_vstart()
            print(rom.describe())
            print(f"Vstart {vstart.hex()}")
            return 0
        return _rom_provision(args, config.state_dir / "sstart", rom)
    except RomError as exc:
        print(f"pst rom {args.rom_command}: {exc}", file=sys.stderr)
        return 1


def _rom_provision(args: argparse.Namespace, sstart: Path, rom: Any) -> int:
    """Vstart from --vstart, or from the Sstart seed on erasable disk (made here if there is none)."""
    from nacl.signing import SigningKey

    from appliance.boot.rom import RomError
    from appliance.host.files import atomic_write, erase

    created = False
    if args.vstart is not None:
        try:
            vstart = bytes.fromhex(args.vstart)
        except ValueError:
            vstart = b""
        if len(vstart) != 32:
            print("pst rom provision: --vstart must be 64 hex digits (32 bytes)", file=sys.stderr)
            return 2
    else:
        if sstart.exists():
            seed = bytearray(sstart.read_bytes())
            if len(seed) != 32:
                print(f"pst rom provision: {sstart}: a start key seed is 32 bytes", file=sys.stderr)
                return 2
        else:
            seed = bytearray(os.urandom(32))
            atomic_write(sstart, bytes(seed), private=True)
            created = True
        vstart = bytes(SigningKey(bytes(seed)).verify_key)
        seed[:] = bytes(len(seed))
    try:
        print(rom.provision(vstart))
    except RomError:
        if created:
            erase(sstart)
        raise
    print(f"Vstart {vstart.hex()}")
    if args.vstart is None:
        made = "made and written to" if created else "read from"
        print(f"Sstart (the start private key) {made} {sstart}; `pst init --sstart {sstart}` erases it")
    return 0


def _add_api_commands(sub: Any) -> None:
    from appliance.api.commands import add_commands

    add_commands(sub)  # api registrations list|revoke


THRESHOLD_HELP = (
    "threshold t: the faulty servers tolerated per period; n >= 3t+1, so t=1 for 4 to 6 servers, "
    "t=2 for 7 to 9 (default 1)"
)


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
        help="run a local network of servers that refresh every period (--crypto: the crypto core alone)",
    )
    demo.add_argument("--nodes", type=int, default=5, help="number of servers n (default 5)")
    demo.add_argument("--threshold", type=int, default=1, help=THRESHOLD_HELP)
    demo.add_argument("--crypto", action="store_true", help="the in-process crypto walk-through instead")
    demo.add_argument("--dir", help="cluster directory (default: a new temporary directory)")
    demo.add_argument("--period", type=float, default=30.0, help="period length in seconds (default 30)")
    demo.add_argument("--round-ms", type=int, default=100, help="round length in ms (default 100)")
    demo.add_argument(
        "--base-port",
        type=int,
        default=7100,
        help="server i listens on base+i, its status page on base+100+i (default 7100)",
    )
    demo.set_defaults(func=_cmd_demo)
    sim = sub.add_parser("sim", help="replay one deterministic simulation of the refresh protocol")
    sim.add_argument("--scenario", help="scenario family (see --list)")
    sim.add_argument("--seed", type=int, default=0, help="the seed to replay (default 0)")
    sim.add_argument("--list", action="store_true", help="list the scenario families")
    sim.add_argument("--verbose", action="store_true", help="also print rejected messages")
    sim.set_defaults(func=_cmd_sim)

    cluster = sub.add_parser("cluster", help="a local cluster of servers on loopback")
    csub = cluster.add_subparsers(dest="cluster_command", metavar="ACTION", required=True)
    cinit = csub.add_parser("init", help="write configs, simulated ROMs and period-0 state for n servers")
    cinit.add_argument("--nodes", type=int, default=5, help="number of servers n (default 5)")
    cinit.add_argument("--threshold", type=int, default=1, help=THRESHOLD_HELP)
    cinit.add_argument("--dir", required=True, help="directory to create")
    cinit.add_argument("--period", type=float, default=30.0, help="period length in seconds (default 30)")
    cinit.add_argument("--round-ms", type=int, default=100, help="protocol round length in ms (default 100)")
    cinit.add_argument(
        "--base-port",
        type=int,
        default=7100,
        help="server i listens on base+i, its status page on base+100+i (default 7100)",
    )
    cinit.add_argument(
        "--network-ceremony",
        action="store_true",
        help="run the initialization (Table 3) over the network, one `pst init` process per server",
    )
    cinit.set_defaults(func=_cmd_cluster_init)
    cup = csub.add_parser("up", help="start every server of the cluster (one process each)")
    cup.add_argument("--dir", required=True)
    cup.add_argument("--detach", action="store_true", help="return once the servers are running")
    cup.set_defaults(func=_cmd_cluster_up)
    cdown = csub.add_parser("down", help="stop every server of the cluster")
    cdown.add_argument("--dir", required=True)
    cdown.set_defaults(func=_cmd_cluster_down)
    init = sub.add_parser("init", help="initialize this server with the others (Table 3), over the network")
    init.add_argument("--config", required=True, help="the server's TOML config")
    init.add_argument(
        "--sstart", required=True, help="file holding this server's start key seed (erased after)"
    )
    init.add_argument(
        "--start-at", type=float, required=True, help="agreed Unix time at which all servers start"
    )
    init.set_defaults(func=_cmd_init)
    serve = sub.add_parser(
        "serve", help="run one PServer in the foreground (what systemd and cluster up run)"
    )
    serve.add_argument("--config", required=True, help="the server's TOML config")
    serve.set_defaults(func=_cmd_serve)
    from appliance.boot.commands import add_commands

    add_commands(sub)  # check, manifest, upgrade
    _add_api_commands(sub)

    status = sub.add_parser("status", help="per server: period, status, last refresh, alerts, KeyTable")
    status.add_argument("--dir", required=True)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=_cmd_status)
    alerts = sub.add_parser("alerts", help="every alert the servers raised")
    alerts.add_argument("--dir", required=True)
    alerts.set_defaults(func=_cmd_alerts)
    pubkey = sub.add_parser("pubkey", help="the group public key Vcert")
    pubkey.add_argument("--dir", required=True)
    pubkey.add_argument("--pem", action="store_true", help="as SubjectPublicKeyInfo PEM")
    pubkey.set_defaults(func=_cmd_pubkey)
    refresh = sub.add_parser("refresh", help="start a refresh now instead of at the next period boundary")
    refresh.add_argument("--now", action="store_true", help="start it in two seconds on every server")
    refresh.add_argument("--dir", required=True)
    refresh.set_defaults(func=_cmd_refresh)
    sign = sub.add_parser("sign", help="sign a file with the group key, through a server's local API")
    sign.add_argument("--dir", required=True)
    sign.add_argument("--app", default="pst-cli", help="application name the signature is bound to")
    sign.add_argument("--out", help="also write the 64-byte signature to this file")
    sign.add_argument("file", help="the file to sign (- for standard input)")
    sign.set_defaults(func=_cmd_sign)
    verify = sub.add_parser("verify", help="check a group-key signature made with pst sign")
    verify.add_argument("--dir", required=True)
    verify.add_argument("--app", default="pst-cli")
    verify.add_argument("file")
    verify.add_argument("signature", help="file holding the 64-byte signature (or its hex)")
    verify.set_defaults(func=_cmd_verify)
    rom = sub.add_parser("rom", help="the ROM holding Vstart (simulated, TPM 2.0 or read-only block device)")
    rsub = rom.add_subparsers(dest="rom_command", metavar="ACTION", required=True)
    rprov = rsub.add_parser("provision", help="write Vstart into the ROM, once (a second write fails)")
    rprov.add_argument("--config", required=True, help="the server's TOML config ([rom] section)")
    rsrc = rprov.add_mutually_exclusive_group(required=True)
    rsrc.add_argument("--vstart", help="Vstart as 64 hex digits")
    rsrc.add_argument(
        "--from-state",
        action="store_true",
        help="Vstart of the Sstart seed in STATE_DIR/sstart (a fresh one is made if there is none)",
    )
    rprov.set_defaults(func=_cmd_rom)
    rshow = rsub.add_parser("show", help="the ROM backend and the Vstart it holds (refuses a writable ROM)")
    rshow.add_argument("--config", required=True, help="the server's TOML config ([rom] section)")
    rshow.set_defaults(func=_cmd_rom)
    return parser


def _reexec_isolated(argv: Sequence[str] | None) -> None:
    """Run a server command through the bootstrap when pst was started some other way.

    ``python -m appliance.cli serve`` or pip's ``pst`` script let PYTHONPATH and site-packages
    (``.pth`` files, sitecustomize) run before us; the same process then starts again as
    ``python -I -S bootstrap.py``, which measures the environment before any of it runs.
    (What ran before this point could have prevented it: start servers with bin/pst.)
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if argv is None and args and args[0] in bootstrap.MEASURED and not bootstrap.started_isolated():
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, bootstrap.command(*args))


def main(argv: Sequence[str] | None = None) -> int:
    _reexec_isolated(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("pst: a command is required (pst --help lists them)", file=sys.stderr)
        return 2
    from appliance.protocols.state import ConfigError

    try:
        result: int = args.func(args)
    except BrokenPipeError:  # e.g. `pst sim ... | head`
        sys.stderr.close()
        return 0
    except ConfigError as exc:  # one line naming the file and the key, never a traceback
        print(f"pst {args.command}: {exc}", file=sys.stderr)
        return 2
    return result


if __name__ == "__main__":
    sys.exit(main())

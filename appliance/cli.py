"""The ``pst`` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance import __version__
from appliance.boot import bootstrap

if TYPE_CHECKING:
    from appliance.host.nodes import Node


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.crypto:
        from appliance.demo import run_crypto_demo

        return run_crypto_demo(n=args.nodes, t=args.threshold)
    from appliance.node.cluster import check_ports
    from appliance.protocols.state import ConfigError, check_size

    try:
        check_size(args.nodes, args.threshold)  # before any directory is made or server started
        check_ports(args.nodes, args.base_port)
    except ConfigError as exc:
        print(f"pst demo: {exc}", file=sys.stderr)
        return 2
    return _network_demo(args)


def _network_demo(args: argparse.Namespace) -> int:
    import signal
    import tempfile
    import time

    from appliance.node.cluster import SYSLOG_PORT_OFFSET, init_cluster

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
        ca=True,
    )
    nodes = _cluster_nodes(root)
    for node in nodes:  # the group CA's policy, and each server a timestamping authority
        config = node.config_path
        config.write_text(config.read_text() + DEMO_CA_SECTIONS)
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
    syslog = args.base_port + SYSLOG_PORT_OFFSET + 1
    print(f"     logger -n 127.0.0.1 -P {syslog} -T --rfc5424 hello   # syslog into server 1's log")
    print(f"     .venv/bin/pst log tail --dir {root} --node 1 -f")
    print("   Ctrl-C stops the demo.")
    seen: dict[int, object] = {}

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM stops the servers as Ctrl-C does

    signal.signal(signal.SIGTERM, stop)
    try:
        _demo_log(root, nodes[0], syslog)
        _demo_ca(root, nodes[0])
        while True:
            time.sleep(1.0)
            _reap()
            for node in nodes:
                if not _alive(node.pid()):
                    print(
                        f"   {node.name} is not running: restarting it from its state directory", flush=True
                    )
                    _start_node(node)
                st = node.status()
                last = st.get("last_refresh") or {}
                key = last.get("period")
                server = node.server
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


#: What the demo adds to every server's config: the CA's policy (names of the timestamping
#: authority and of the application "demo-tunnel"), and the authority itself with period keys.
DEMO_CA_SECTIONS = """
[ca]
tsa_names = ["tsa.demo.example"]

[ca.apps.demo-tunnel]
names = ["tunnel.demo.example"]

[tsa]
mode = "period-key"
policy = "1.3.6.1.4.1.32473.1.1"
cert = "period"
"""


def _demo_ca(root: Path, node: Node) -> None:
    """The group's CA on the demo network: its root, a timestamp that `openssl ts -verify`
    accepts against it, and an application's period certificate renewed after a refresh."""
    import subprocess
    import time
    import urllib.request

    from appliance.api.client import PstClient, PstError

    def pst_cmd(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "appliance.cli", *argv],
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )

    def openssl(*argv: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["openssl", *map(str, argv)], capture_output=True, text=True, timeout=30, check=False
        )

    print("== the group's certificate authority: a root no single server can sign with", flush=True)
    deadline = time.monotonic() + 60  # the first refresh may be under way: signing waits for it
    while True:
        got = pst_cmd("ca", "root", "--dir", str(root), "--node", str(node.server), "--wait", "60")
        if got.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    if got.returncode != 0:
        print(f"   no group root yet: {got.stderr.strip()[:200]}")
        return
    root_pem = root / "ca-root.pem"
    root_pem.write_text(got.stdout)
    subject = openssl("x509", "-in", root_pem, "-noout", "-subject").stdout.strip()
    print(f"   {subject} (threshold Ed25519 key 'ca'), saved to {root_pem}")

    data = root / "demo-document.txt"
    data.write_text("a document that existed at this time\n")
    query, reply = root / "demo.tsq", root / "demo.tsr"
    openssl("ts", "-query", "-data", data, "-sha256", "-cert", "-out", query)
    url = _status_page(node).rstrip("/") + "/tsa"
    granted = False
    deadline = time.monotonic() + 60
    while not granted and time.monotonic() < deadline:
        request = urllib.request.Request(
            url, data=query.read_bytes(), headers={"Content-Type": "application/timestamp-query"}
        )
        try:
            with urllib.request.urlopen(request, timeout=20) as answer:
                reply.write_bytes(answer.read())
        except OSError:
            time.sleep(1.0)
            continue
        granted = "Status: Granted" in openssl("ts", "-reply", "-in", reply, "-text").stdout
        if not granted:
            time.sleep(1.0)  # the authority's first period certificate is on its way
    if not granted:
        print("   no timestamp after 60 s; skipping the timestamping demo")
    else:
        verify = openssl("ts", "-verify", "-data", data, "-in", reply, "-CAfile", root_pem)
        verdict = verify.stdout.strip().splitlines()[-1] if verify.stdout.strip() else verify.stderr.strip()
        print(f"   RFC 3161 timestamp from server {node.server} (its period key, certified by the group):")
        print(f"   openssl ts -verify -data {data.name} -in {reply.name} -CAfile {root_pem.name}: {verdict}")

    print("   a period certificate for the application 'demo-tunnel' (what pst-keys keeps current):")
    client = PstClient(
        node.directory / "api.sock" if node.directory else node.config().api_socket, timeout=60
    )
    try:
        client.register("demo-tunnel")
        first = client.certificate(names=["tunnel.demo.example"])
        (root / "demo-tunnel-1.pem").write_bytes(first.certificate)
        _show_certificate(node, first)
        refreshed = pst_cmd("refresh", "--now", "--dir", str(root))
        if refreshed.returncode != 0:
            print(f"     pst refresh --now: {refreshed.stderr.strip()[:200]}")
            return
        second = client.certificate(names=["tunnel.demo.example"])
        (root / "demo-tunnel-2.pem").write_bytes(second.certificate)
        _show_certificate(node, second)
        for name in ("demo-tunnel-1.pem", "demo-tunnel-2.pem"):
            check = openssl("verify", "-CAfile", root_pem, root / name)
            said = check.stdout.strip() or check.stderr.strip()
            print(f"     openssl verify -CAfile {root_pem.name} {name}: {said}")
    except PstError as exc:
        print(f"     no certificate: {exc}")
    finally:
        client.close()
    print("   every token and certificate issued is also an entry of the secure log:")
    print(f"     .venv/bin/pst log show --dir {root} --since 1h --app pst-ca", flush=True)


def _show_certificate(node: Node, issued: Any) -> None:
    period = node.status().get("period")
    print(f"     period {period}: serial {_serial(issued.certificate)}, valid until {_utc(issued.not_after)}")


def _serial(pem: bytes) -> str:
    from cryptography import x509

    return f"{x509.load_pem_x509_certificate(pem).serial_number:x}"[:16] + "..."


def _utc(when: int) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(when, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _demo_log(root: Path, node: Node, syslog: int) -> None:
    """The log on the demo network: a few lines sent with util-linux ``logger`` to server 1, the
    signed checkpoint that covers them, and ``pst log verify`` checking them from the HTTP tiles."""
    import re
    import shutil
    import subprocess
    import time

    print("== the secure log: every server holds it; t+1 servers sign its checkpoints", flush=True)
    log_file = (node.directory or node.state_dir.parent) / "server.log"
    key = None
    deadline = time.monotonic() + 60
    while key is None and time.monotonic() < deadline:
        text = log_file.read_text(errors="replace") if log_file.exists() else ""
        found = re.search(r"log: checkpoints are signed with (\S+)", text)
        key = found.group(1) if found else None
        time.sleep(0.2)
    if key is None:
        print(f"   server 1 names no log key after 60 s (see {log_file}); skipping the log's demo")
        return
    lines = [f"demo line {k}: hello from pst demo" for k in (1, 2, 3)]
    logger = shutil.which("logger")
    for line in lines:
        if logger is not None:
            argv = [logger, "-n", "127.0.0.1", "-P", str(syslog), "-T", "--rfc5424", "-t", "pst-demo", line]
            subprocess.run(argv, check=False, timeout=10)
        else:  # no util-linux: the same RFC 5424 message, octet-counted over TCP
            import socket

            msg = f"<13>1 - {socket.gethostname()} pst-demo - - - {line}".encode()
            with socket.create_connection(("127.0.0.1", syslog), timeout=10) as sock:
                sock.sendall(str(len(msg)).encode() + b" " + msg)
    sent = "logger --rfc5424 over TCP" if logger is not None else "TCP (no logger here)"
    print(f"   sent {len(lines)} lines to server 1 with {sent}: {lines[0]!r}, ...", flush=True)
    log_config = node.config().log
    log_dir = log_config.directory if log_config is not None else node.state_dir / "log"
    checkpoint = log_dir / "checkpoint"
    size = 0
    deadline = time.monotonic() + 60
    while size < len(lines) and time.monotonic() < deadline:
        try:
            size = int(checkpoint.read_text().splitlines()[1])
        except (OSError, IndexError, ValueError):
            size = 0
        time.sleep(0.2)
    if size < len(lines):
        print(f"   no signed checkpoint covers them after 60 s (see {log_file})")
        return
    url = _status_page(node).rstrip("/")
    print(f"   a checkpoint of size {size} is signed (the log's key: {key}):")
    for line in checkpoint.read_text().splitlines():
        print(f"     | {line}")
    verify = [sys.executable, "-m", "appliance.cli", "log", "verify", "--key", key, "--url", url]
    for extra, what in ((["--index", "0"], "the first line is in the log"), (["--audit"], "the whole log")):
        out = subprocess.run([*verify, *extra], capture_output=True, text=True, timeout=60, check=False)
        result = (out.stdout.strip() or out.stderr.strip()).splitlines()
        verdict = "verified" if out.returncode == 0 else f"FAILED (exit {out.returncode})"
        print(f"   pst log verify {' '.join(extra)}: {verdict}: {what}; {result[-1] if result else ''}")
    print(f"   yourself: .venv/bin/pst log verify --key {key} --url {url} --audit", flush=True)


def _cmd_sim(args: argparse.Namespace) -> int:
    from appliance.sim import scenarios

    if args.list:
        for name in scenarios.FAMILIES:
            seeded = " (run with 200 seeds by make test)" if name in scenarios.SEEDED_FAMILIES else ""
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


def _cluster_nodes(root: Path) -> list[Node]:
    """The servers of a cluster directory (a ConfigError, exit 2, if it holds none)."""
    from appliance.host.nodes import cluster_nodes

    return cluster_nodes(root)


def _nodes(args: argparse.Namespace) -> list[Node]:
    """The servers ``--dir`` or ``--config`` name (appliance.host.nodes)."""
    from appliance.host.nodes import nodes_of

    return nodes_of(args)


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
        log=args.log,
        ca=args.ca,
        store=args.store,
        dss_keys=args.dss_keys,
    )
    start = time.time() + 4.0
    print(
        f"initialization (Table 3) over the network: {args.nodes} `pst init` processes start together ...",
        flush=True,
    )
    procs = {}
    for node in (n.directory for n in _cluster_nodes(root) if n.directory is not None):
        argv = bootstrap.command(
            "init",
            "--config",
            str(node / "config.toml"),
            "--sstart",
            str(node / "sstart"),
            "--start-at",
            repr(start),
        )
        log = os.open(node / "init.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            procs[node] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        finally:
            os.close(log)
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
    from appliance.node.cluster import check_ports, init_cluster
    from appliance.protocols.state import ConfigError, check_size

    try:
        check_size(args.nodes, args.threshold)  # before anything is written
        check_ports(args.nodes, args.base_port)
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
            log=args.log,
            ca=args.ca,
            store=args.store,
            dss_keys=args.dss_keys,
        )
    except ConfigError as exc:
        print(f"pst cluster init: {exc}", file=sys.stderr)
        return 2
    print(f"cluster ready in {args.dir}: start it with `pst cluster up --dir {args.dir}`")
    return 0


def _takes_signal(pid: int, signum: int) -> bool:
    """Does process ``pid`` catch or ignore ``signum`` (so that sending it cannot end it)?"""
    try:
        fields = dict(
            line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
        )
        mask = int(fields["SigCgt"], 16) | int(fields["SigIgn"], 16)
    except (OSError, KeyError, ValueError):
        return False
    return bool(mask >> (signum - 1) & 1)


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except PermissionError:  # another user's process (a deployed server runs as user pst)
        return True
    except OSError:
        return False
    return True


def _alert_lines(node: Node) -> list[str]:
    """The lines of a server's alert files, the key-holder's and pst serve's (privsep), oldest
    first (none if it has none or they cannot be read)."""
    from appliance.node.store import StateDir

    lines: list[tuple[float, str]] = []
    for path in StateDir(node.state_dir).alert_files():
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError):
            continue
        for line in text.splitlines():
            try:
                when = float(json.loads(line).get("time") or 0)
            except (ValueError, TypeError, AttributeError):
                when = 0.0
            lines.append((when, line))
    return [line for _, line in sorted(lines, key=lambda x: x[0])]


def _cmd_status(args: argparse.Namespace) -> int:
    import time

    from appliance.host import config as node_config

    rows = []
    for node in _nodes(args):
        st = node.status()
        st["running"] = _alive(node.pid())
        # An operational server whose newest KeyTable is older than the previous period signs with
        # shares no refresh renewed: say so (the web page judges it the same way).
        try:
            constants = node_config.load(node.config_path).constants
            missed = constants.periods_missed(int(st["period"]), time.time())
        except (OSError, ValueError, TypeError, KeyError):
            missed = 0
        if st.get("status") == "operational" and missed:
            st["status"], st["periods_missed"] = "behind", missed
        st["alerts"] = len(_alert_lines(node))
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


def _cmd_alerts(args: argparse.Namespace) -> int:
    found = False
    for node in _nodes(args):
        for line in _alert_lines(node):
            try:
                a = json.loads(line)
                shown = f"ALERT {a['kind']}: server {a['server']}, period {a['period']}: {a['detail']}"
            except (ValueError, TypeError, KeyError):
                continue
            found = True
            print(f"seen by server {node.server}: {shown}")
    if not found:
        print("no alerts")
    return 0


def _cmd_pubkey(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from appliance.node.store import StateDir

    for node in _nodes(args):
        loaded = StateDir(node.state_dir).load()
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


def _start_clear_of_a_boundary(nodes: list[Node]) -> None:
    """Start a whole local cluster just after a period boundary, not just before one.

    A server that starts less than its warm-up before a period skips that refresh; servers
    started a few hundred milliseconds apart around that moment would disagree on whether to
    take part. Started just after a boundary, every one of them takes part in the next refresh.
    """
    import time

    from appliance.host import config as node_config

    if not nodes:
        return
    c = node_config.load(nodes[0].config_path).constants
    now = time.time()
    boundary = c.period_start(c.period_at(now) + 1)
    if boundary - now < 2.0 and c.period_length > 2.5:
        print(
            f"   waiting {boundary - now:.1f} s for the period boundary, "
            "so that every server joins the same refresh"
        )
        time.sleep(boundary - now + 0.05)


def _open_log(path: Path) -> int:
    """``server.log`` for appending, readable by its owner only (it names peers, addresses and
    applications); one made by an earlier version with a wider mode is narrowed."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
    except OSError:
        os.close(fd)
        raise
    return fd


def _start_node(node: Node) -> int:
    import subprocess

    assert node.log_file is not None and node.pid_file is not None  # a node of a local cluster
    log = _open_log(node.log_file)
    try:
        proc = subprocess.Popen(  # isolated, and measured before anything of the environment runs
            bootstrap.command("serve", "--config", str(node.config_path)),
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    finally:
        os.close(log)
    node.pid_file.write_text(f"{proc.pid}\n")
    return proc.pid


def _stop_nodes(nodes: list[Node], timeout: float = 10.0) -> None:
    import signal
    import time

    pids = {node: node.pid() for node in nodes}
    for pid in pids.values():
        if _alive(pid):
            os.kill(pid, signal.SIGTERM)  # type: ignore[arg-type]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids.values()):
        _reap()
        time.sleep(0.1)
    for node, pid in pids.items():
        if _alive(pid):
            print(f"{node.name} did not stop in {timeout:g} s: killing it", file=sys.stderr)
            os.kill(pid, signal.SIGKILL)  # type: ignore[arg-type]
        if node.pid_file is not None:
            node.pid_file.unlink(missing_ok=True)
    _reap()


def _reap(ended: dict[int, int] | None = None) -> None:
    """Collect the servers we started that ended (``ended``: pid -> exit status, as waitpid's)."""
    try:
        while True:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if not pid:
                break
            if ended is not None:
                ended[pid] = status
    except ChildProcessError:
        pass


def _how_it_ended(status: int | None) -> str:
    if status is None:
        return ""
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        import signal

        return f" (killed by {signal.Signals(-code).name})"
    return f" (exit status {code})"


def _cmd_cluster_up(args: argparse.Namespace) -> int:
    import time

    from appliance.protocols.state import ConfigError

    root = Path(args.dir)
    nodes = _cluster_nodes(root)
    broken = []
    for node in nodes:
        try:
            node.config()
        except (ConfigError, OSError) as exc:
            print(f"{node.name}: not started: {exc}", file=sys.stderr)
            broken.append(node)
    nodes = [n for n in nodes if n not in broken]
    started: dict[str, int] = {}
    ended: dict[int, int] = {}
    if not any(_alive(node.pid()) for node in nodes):
        _start_clear_of_a_boundary(nodes)
    for node in nodes:
        if _alive(node.pid()):
            print(f"{node.name}: already running (pid {node.pid()})")
            continue
        print(f"{node.name}: starting (log: {node.log_file})", flush=True)
        started[node.name] = _start_node(node)
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:  # ready = the local API socket is there
        _reap(ended)
        waiting = [n for n in nodes if _alive(n.pid()) and not _node_socket(n).exists()]
        if not waiting:
            break
        time.sleep(0.2)
    _reap(ended)
    dead = [n.name for n in broken] + [
        n.name + _how_it_ended(ended.get(started.get(n.name, -1))) for n in nodes if not _alive(n.pid())
    ]
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
                if not _alive(node.pid()):
                    print(f"{node.name} exited; restarting it", flush=True)
                    _start_node(node)
    except KeyboardInterrupt:
        print("\nstopping the cluster ...")
        _stop_nodes(nodes)
    return 0


def _cmd_cluster_down(args: argparse.Namespace) -> int:
    nodes = _cluster_nodes(Path(args.dir))
    running = [n for n in nodes if _alive(n.pid())]
    if not running:
        print(f"no server of the cluster in {args.dir} is running: nothing to stop")
        for node in nodes:
            if node.pid_file is not None:
                node.pid_file.unlink(missing_ok=True)
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
    from appliance.node.run import refresh_request_path

    nodes = _nodes(args)
    periods = [p for p in (n.status().get("period") for n in nodes) if isinstance(p, int)]
    if not periods:
        print("pst refresh: no server reports a period yet; is it running?", file=sys.stderr)
        return 1
    period = max(periods) + 1
    start = args.at if args.at is not None else time.time() + 2.0
    ahead = start - time.time()
    if not 0 < ahead < 3600:
        when = f"{-ahead:.1f} s ago" if ahead <= 0 else f"{ahead:.0f} s ahead"
        print(f"pst refresh: --at {start!r} is {when}; give a time within the next hour", file=sys.stderr)
        return 2
    sent = 0
    for node in nodes:
        pid = node.pid()
        if not _alive(pid):
            print(f"{node.name}: not running, skipped", file=sys.stderr)
            continue
        refresh_request_path(node.config()).write_text(json.dumps({"period": period, "start": start}))
        assert pid is not None
        if _takes_signal(pid, signal.SIGUSR1):
            os.kill(pid, signal.SIGUSR1)
        else:  # still starting: SIGUSR1 would end it; it reads the request once it serves
            print(f"{node.name}: starting; it reads the request once it serves", file=sys.stderr)
        sent += 1
    if args.config is not None:  # one server of a deployed network: the others are asked alike
        print(f"refresh of period {period} at {start!r} requested; every server needs the same --at")
    servers = f"{sent} server{'' if sent == 1 else 's'}"
    print(f"refresh of period {period} requested from {servers}; waiting for it ...", flush=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        time.sleep(0.5)
        rows = [n.status() for n in nodes]
        done = [r for r in rows if (r.get("last_refresh") or {}).get("period", -1) >= period]
        stopped = [n for n in nodes if not _alive(n.pid())]
        if len(done) == sent or (stopped and len(done) + len(stopped) >= sent):
            for r in done:
                last = r.get("last_refresh") or {}
                print(f"  server {r.get('server')}: {last.get('status')} in {last.get('duration_s')} s")
            for node in stopped:
                print(f"  {node.name}: stopped (see {node.log_file or 'its journal'})")
            ok = all((r.get("last_refresh") or {}).get("status") == "operational" for r in done)
            return 0 if ok and not stopped else 1
    print("pst refresh: timed out waiting for the refresh", file=sys.stderr)
    return 1


def _status_page(node: Node) -> str:
    """The URL of a server's status page (its [http] section), or why there is none."""
    from appliance.protocols.state import ConfigError

    try:
        http = node.config().http
    except ConfigError as exc:
        return f"unknown ({exc})"
    return f"{http.url}/" if http.enabled else "none (http.enabled = false)"


def _node_socket(node: Node) -> Path:
    return node.config().api_socket


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
    nodes = _nodes(args)
    # --config: that server's socket (the client says why if nothing answers there);
    # --dir: the servers of the cluster that run, in turn.
    running = nodes if args.config is not None else [n for n in nodes if _alive(n.pid())]
    if not running:
        print("pst sign: no server of the cluster is running", file=sys.stderr)
        return 1
    try:
        signature = _sign_digest(running, args.app, digest)
    except client_mod.PstError as exc:
        print(f"pst sign: {exc}", file=sys.stderr)
        return 1
    if args.out:
        Path(args.out).write_bytes(signature)
    print(signature.hex())
    return 0


#: How long pst sign keeps asking while the servers answer ``unavailable``: between a refresh's
#: decision and its signed KeyTable (well under a second) no server holds a usable share.
SIGN_RETRY_SECONDS = 10.0


def _sign_digest(nodes: list[Node], app: str, digest: bytes) -> bytes:
    """The group's signature through the first of ``nodes`` that can sign, retrying ``unavailable``."""
    import time

    from appliance.api import client as client_mod

    deadline = time.monotonic() + SIGN_RETRY_SECONDS
    attempt = 0
    while True:
        node = nodes[attempt % len(nodes)]
        attempt += 1
        try:
            with client_mod.PstClient(str(_node_socket(node))) as client:
                client.register(app, b"pst-cli")
                return client.sign_digest(digest)
        except client_mod.PstError as exc:
            if exc.code != "unavailable" or time.monotonic() >= deadline:
                raise
        time.sleep(0.2 if attempt % len(nodes) == 0 else 0.0)


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


def _public_key_file(path: str) -> bytes:
    """The group public key in ``path``: PEM (``pst pubkey --pem``) or 64 hex digits (``pst pubkey``)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    from appliance.protocols.state import ConfigError

    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    if raw.lstrip().startswith(b"-----BEGIN"):
        try:
            key = load_pem_public_key(raw)
        except (ValueError, TypeError):
            raise ConfigError(f"{path}: not a readable PEM public key") from None
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError(f"{path}: not an Ed25519 public key (the group key is one)")
        return key.public_bytes_raw()
    try:
        value = bytes.fromhex(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        value = b""
    if len(value) != 32:
        raise ConfigError(
            f"{path}: expected the group public key as PEM (pst pubkey --pem) or 64 hex digits (pst pubkey)"
        )
    return value


def _group_key(args: argparse.Namespace) -> bytes | None:
    """Vcert from --pubkey (offline), or from the M of the first server that holds a valid one."""
    from appliance.node.store import StateDir

    if args.pubkey is not None:
        return _public_key_file(args.pubkey)
    for node in _nodes(args):
        m = StateDir(node.state_dir).load().public.m
        if m is not None:
            return m.vcert
    return None


def _cmd_verify(args: argparse.Namespace) -> int:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from appliance.api import APP_SIGN_DOMAIN, app_digest_payload
    from appliance.api.client import sha512_of

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
    vcert = _group_key(args)
    if vcert is None:
        print("pst verify: no server holds a valid M (or give the key: --pubkey FILE)", file=sys.stderr)
        return 1
    # What pst sign and the API's sign/sign_digest have the group sign (docs/api.md).
    payload = (
        f'{{"dom": "{APP_SIGN_DOMAIN}", "app": {json.dumps(args.app)}, "sha512": SHA-512 of {args.file}}}'
    )
    try:
        Ed25519PublicKey.from_public_bytes(vcert).verify(signature, app_digest_payload(args.app, digest))
    except InvalidSignature:
        print(f"INVALID: not a signature of the group key on {args.file} for application {args.app!r}")
        print(f"  (checked as an application signature: the payload {payload})")
        return 1
    print(f"OK: signed by the group key {vcert.hex()[:16]}.. for application {args.app!r}")
    print(f"  (an application signature: the group key signed {payload})")
    return 0


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
        return _rom_provision(args, config.state_dir / "sstart", rom, config)
    except RomError as exc:
        print(f"pst rom {args.rom_command}: {exc}", file=sys.stderr)
        return 1


def _rom_provision(args: argparse.Namespace, sstart: Path, rom: Any, config: Any = None) -> int:
    """Vstart from --vstart, or from the Sstart seed on erasable disk (made here if there is none);
    where the ROM is a TPM, the announcement key too (kept at its persistent handle)."""
    from nacl.signing import SigningKey

    from appliance.boot.backends import announcement_key
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
    key = announcement_key(config) if config is not None else None
    if key is not None:
        # While the owner hierarchy has no authorization yet: kept at a persistent handle, so
        # that the key still signs once the operator has set one (tpm2_changeauth -c owner).
        print(key.persist())
        print(f"announcement key (in M at init) {key.public_key().hex()}")
    if args.vstart is None:
        made = "made and written to" if created else "read from"
        print(f"Sstart (the start private key) {made} {sstart}; `pst init --sstart {sstart}` erases it")
    return 0


def _cmd_log_verify(args: argparse.Namespace) -> int:
    from appliance.apps.log.verify import run

    return run(
        args.key,
        url=args.url,
        directory=None if args.dir is None else Path(args.dir),
        index=args.index,
        entry=None if args.entry is None else Path(args.entry),
        old=None if args.old is None else Path(args.old),
        audit=args.audit,
        out=print,
        err=lambda line: print(line, file=sys.stderr, flush=True),
    )


def _add_log_verify(lsub: Any) -> None:
    verify = lsub.add_parser(
        "verify",
        help="check the log's signed checkpoint, an entry's inclusion, consistency, or every tile",
        description=(
            "Fetches the log's latest checkpoint (from a server's /log/ or a log directory) and checks "
            "its signature with KEY, then each check asked for, from the tiles, against the signed "
            "root only. Exit status 0: verified; 1: a check failed (FAILED: names what); 2: the "
            "check could not run (no answer, unreadable file, bad key)."
        ),
    )
    verify.add_argument(
        "--key", required=True, help="the log's verifier key (name+keyid+base64), or a file holding it"
    )
    where = verify.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a server, e.g. http://127.0.0.1:8080 (the log is under /log/)")
    where.add_argument("--dir", help="a log directory (its checkpoint and tile/ files)")
    verify.add_argument("--index", type=int, help="check that the entry at this index is in the log")
    verify.add_argument("--entry", help="check that this file's bytes are an entry of the log")
    verify.add_argument("--old", help="check that this older signed checkpoint is a prefix of the latest")
    verify.add_argument(
        "--audit", action="store_true", help="fetch every tile and entry and recompute the tree"
    )
    verify.set_defaults(func=_cmd_log_verify)


# pst log -------------------------------------------------------------------------------------

#: ``pst log append`` sends at most this many messages, and about this many bytes, per request.
LOG_APPEND_BATCH = 64
LOG_APPEND_BYTES = 60_000
#: ``pst log show`` starts this many seconds before ``--since`` (receive times may step back a little).
LOG_SHOW_SLACK = 60.0


def _log_socket(args: argparse.Namespace) -> Path | None:
    """The API socket of the server asked (``--config``; ``--dir`` with ``--node``, else the
    first server of the cluster that runs); None after saying why there is none."""
    from appliance.host.nodes import nodes_of

    nodes = nodes_of(args)
    if args.config is None and getattr(args, "node", None) is None:
        nodes = [n for n in nodes if _alive(n.pid())][:1]
    if not nodes:
        print(f"pst log {args.log_command}: no server of the cluster is running", file=sys.stderr)
        return None
    return _node_socket(nodes[0])


def _log_messages(args: argparse.Namespace) -> list[bytes]:
    """What ``pst log append`` sends: TEXT, or each line of standard input (``-`` or nothing),
    as RFC 5424 messages from this host and ``--app`` (``--raw``: the bytes as they are)."""
    import socket
    import time

    from appliance.apps.log.syslog import build_rfc5424

    if args.text is not None and args.text != "-":
        texts = [args.text.encode("utf-8")]
    else:
        texts = [line.rstrip(b"\r\n") for line in sys.stdin.buffer]
        texts = [t for t in texts if t]
    if args.raw:
        return texts
    host = "".join(c for c in socket.gethostname() if 32 < ord(c) < 127)[:255] or None
    app = args.app[:48]
    out = []
    for text in texts:
        stamp = (
            time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{time.time_ns() // 1000 % 1_000_000:06d}Z"
        )
        out.append(build_rfc5424(13, stamp, host, app, str(os.getpid()), None, msg=text))
    return out


def _cmd_log_append(args: argparse.Namespace) -> int:
    from appliance.api.client import PstClient, PstError

    messages = _log_messages(args)
    if not messages:
        print("pst log append: nothing to append (no TEXT, and no line on standard input)", file=sys.stderr)
        return 2
    sock = _log_socket(args)
    if sock is None:
        return 1
    batches: list[list[bytes]] = [[]]
    for message in messages:
        last = batches[-1]
        if last and (len(last) >= LOG_APPEND_BATCH or sum(map(len, last)) + len(message) > LOG_APPEND_BYTES):
            batches.append([])
        batches[-1].append(message)
    try:
        with PstClient(sock) as client:
            client.register(args.app, b"pst-log")
            for batch in batches:
                indices, size = client.log_append(batch)
                for index in indices:
                    print(f"appended entry {index}")
    except PstError as exc:
        print(f"pst log append: {exc}", file=sys.stderr)
        return 1
    print(f"log size {size}")
    return 0


def _print_entries(start: int, entries: list[bytes], args: argparse.Namespace, since_us: int | None) -> None:
    from appliance.apps.log import show

    for offset, data in enumerate(entries):
        entry = show.decode(data)
        index = start + offset
        if entry is None:
            if since_us is None and args.host is None and args.app is None:
                print(
                    json.dumps({"index": index, "error": "not a log entry"})
                    if args.json
                    else f"{index}  (not a log entry)"
                )
            continue
        if not show.matches(entry, since_us=since_us, host=args.host, app=args.app):
            continue
        print(
            json.dumps(show.entry_json(index, entry)) if args.json else show.entry_line(index, entry),
            flush=True,
        )


def _print_range(client: Any, start: int, end: int, args: argparse.Namespace, since_us: int | None) -> int:
    """Print entries [start, end) page by page; where the log ended (it may end sooner)."""
    while start < end:
        entries = client.log_entries(start, min(256, end - start))
        if not entries:
            break
        _print_entries(start, entries, args, since_us)
        start += len(entries)
    return start


def _cmd_log_tail(args: argparse.Namespace) -> int:
    import time

    from appliance.api.client import PstClient, PstError

    if args.lines < 0:
        print("pst log tail: -n must be 0 or more", file=sys.stderr)
        return 2
    sock = _log_socket(args)
    if sock is None:
        return 1
    args.host = args.app = None
    try:
        with PstClient(sock) as client:
            size, _ = client.log_size()
            done = _print_range(client, max(0, size - args.lines), size, args, None)
            while args.follow:
                time.sleep(0.5)
                size, _ = client.log_size()
                done = _print_range(client, done, size, args, None)
    except PstError as exc:
        print(f"pst log tail: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


def _cmd_log_audit(args: argparse.Namespace) -> int:
    """Ask a server to audit its copy of the log now (operator only): re-hash every entry and
    tile up to its latest checkpoint, alert and repair from its peers what differs."""
    from appliance.api.client import PstClient, PstError

    sock = _log_socket(args)
    if sock is None:
        return 1
    try:
        with PstClient(sock, timeout=args.timeout) as client:
            result = client.log_audit()
    except PstError as exc:
        print(f"pst log audit: {exc}", file=sys.stderr)
        return 1
    size = result.get("checkpoint_size")
    if result["ok"]:
        what = f"up to its checkpoint of {size} entries" if size else "(nothing signed to audit yet)"
        print(
            f"OK: this server's copy of the log passed its audit {what}; repairs so far: {result['repairs']}"
        )
        return 0
    print(f"FAILED: {result.get('damaged') or 'the audit failed'}", file=sys.stderr)
    return 1


def _first_since(client: Any, size: int, since_us: int) -> int:
    """The first index whose receive time is at least ``since_us`` (binary search: receive
    times grow along the log, up to the slack the caller leaves)."""
    from appliance.apps.log import show

    low, high = 0, size
    while low < high:
        mid = (low + high) // 2
        entries = client.log_entries(mid, 1)
        entry = show.decode(entries[0]) if entries else None
        if entry is not None and entry.received < since_us:
            low = mid + 1
        else:
            high = mid
    return low


def _cmd_log_show(args: argparse.Namespace) -> int:
    import time

    from appliance.api.client import PstClient, PstError
    from appliance.apps.log import show

    try:
        since = show.parse_since(args.since, time.time())
    except ValueError as exc:
        print(f"pst log show: {exc}", file=sys.stderr)
        return 2
    sock = _log_socket(args)
    if sock is None:
        return 1
    since_us = int(since * 1_000_000)
    try:
        with PstClient(sock) as client:
            size, _ = client.log_size()
            start = _first_since(client, size, since_us - int(LOG_SHOW_SLACK * 1_000_000))
            _print_range(client, start, size, args, since_us)
    except PstError as exc:
        print(f"pst log show: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_ts_request(args: argparse.Namespace) -> int:
    """``pst ts request``: a timestamp token for a file or a digest from a server's local API,
    written as a .tsr that ``openssl ts -reply``/``-verify`` read."""
    import hashlib
    import secrets

    from appliance.api.client import PstClient, PstError
    from appliance.apps.tsa import rfc3161

    algorithm = rfc3161.HASHES_BY_NAME.get(args.hash)
    if algorithm is None:
        print(f"pst ts request: --hash must be one of {', '.join(rfc3161.HASHES_BY_NAME)}", file=sys.stderr)
        return 2
    if args.file is not None:
        try:
            with open(args.file, "rb") as f:
                digest = hashlib.file_digest(f, args.hash).digest()
        except OSError as exc:
            print(f"pst ts request: {args.file}: {exc.strerror}", file=sys.stderr)
            return 1
    else:
        try:
            digest = bytes.fromhex(args.digest)
        except ValueError:
            print("pst ts request: --digest must be hexadecimal", file=sys.stderr)
            return 2
        if len(digest) != algorithm.size:
            print(
                f"pst ts request: a {args.hash} digest has {algorithm.size} bytes, not {len(digest)}",
                file=sys.stderr,
            )
            return 2
    nonce = secrets.randbits(64)
    cert_req = not args.no_cert
    from appliance.host.nodes import nodes_of

    nodes = nodes_of(args)
    if args.config is None and args.node is None:
        nodes = [n for n in nodes if _alive(n.pid())][:1]
    if not nodes:
        print("pst ts request: no server of the cluster is running", file=sys.stderr)
        return 1
    try:
        with PstClient(str(_node_socket(nodes[0]))) as client:
            body = client.timestamp(digest, args.hash, nonce=nonce, cert_req=cert_req)
    except PstError as exc:
        print(f"pst ts request: {exc}", file=sys.stderr)
        return 1
    try:
        reply = rfc3161.decode_response(body)
    except rfc3161.TokenDecodeError as exc:
        print(f"pst ts request: the server's reply does not decode: {exc}", file=sys.stderr)
        return 1
    if reply.tst_info is None:
        failures = ", ".join(f.name for f in sorted(reply.failures)) or "none given"
        print(f"pst ts request: refused ({failures}): {reply.text}", file=sys.stderr)
        return 1
    info = rfc3161.decode_tst_info(reply.tst_info)
    if info.nonce != nonce or info.digest != digest:
        print("pst ts request: the token is not for this request (nonce or digest differ)", file=sys.stderr)
        return 1
    Path(args.out).write_bytes(body)
    if args.query_out is not None:
        Path(args.query_out).write_bytes(
            rfc3161.encode_request(args.hash, digest, nonce=nonce, cert_req=cert_req)
        )
    print(f"{args.out}: serial {info.serial:x}, genTime {rfc3161.format_gen_time(info.gen_time)}")
    return 0


def _add_ts_commands(sub: Any) -> None:
    from appliance.host.nodes import add_node_options

    tsp = sub.add_parser("ts", help="the timestamping authority (RFC 3161) through a server's local API")
    tsub = tsp.add_subparsers(dest="ts_command", metavar="ACTION", required=True)
    request = tsub.add_parser(
        "request", help="a token for a file or a digest, written as a .tsr (openssl ts -verify reads it)"
    )
    add_node_options(request, node=True)
    what = request.add_mutually_exclusive_group(required=True)
    what.add_argument("--file", help="the file to timestamp (hashed here; it does not leave this host)")
    what.add_argument("--digest", help="its digest, in hexadecimal")
    request.add_argument("--hash", default="sha256", help="sha256 (default), sha384 or sha512")
    request.add_argument("--out", required=True, help="where to write the TimeStampResp (.tsr)")
    request.add_argument(
        "--query-out", help="also write the equivalent TimeStampReq (.tsq), for openssl ts -verify -queryfile"
    )
    request.add_argument("--no-cert", action="store_true", help="leave the TSA certificate out of the token")
    request.set_defaults(func=_cmd_ts_request)


def _add_log_commands(sub: Any) -> None:
    from appliance.host.nodes import add_node_options

    logp = sub.add_parser(
        "log", help="the append-only log: append, tail, show (a server's local API); verify (anyone)"
    )
    lsub = logp.add_subparsers(dest="log_command", metavar="ACTION", required=True)
    where = "with --dir: --node I, or the first server that runs"
    append = lsub.add_parser(
        "append", help="append TEXT (or each line of standard input) to the log; prints each entry's index"
    )
    add_node_options(append, node=True)
    append.add_argument("text", nargs="?", metavar="TEXT|-", help="the message (default -: standard input)")
    append.add_argument("--app", default="pst-cli", help="the application name registered and in the message")
    append.add_argument("--raw", action="store_true", help="send the bytes as they are (no RFC 5424 header)")
    append.set_defaults(func=_cmd_log_append)
    tail = lsub.add_parser("tail", help=f"the last entries of a server's log ({where})")
    add_node_options(tail, node=True)
    tail.add_argument("-n", "--lines", type=int, default=10, help="how many (default 10)")
    tail.add_argument("-f", "--follow", action="store_true", help="then print new entries as they come")
    tail.add_argument("--json", action="store_true", help="one JSON object per entry")
    tail.set_defaults(func=_cmd_log_tail)
    showp = lsub.add_parser("show", help=f"entries received since a time, by host and application ({where})")
    add_node_options(showp, node=True)
    showp.add_argument(
        "--since", required=True, help="Unix seconds, ISO 8601 (UTC unless it says) or 90s/10m/2h/3d ago"
    )
    showp.add_argument("--host", help="only entries whose syslog HOSTNAME is this")
    showp.add_argument("--app", help="only entries whose syslog APP-NAME (or tag) is this")
    showp.add_argument("--json", action="store_true", help="one JSON object per entry")
    showp.set_defaults(func=_cmd_log_show)
    auditp = lsub.add_parser(
        "audit",
        help="a server re-hashes its copy of the log against its latest checkpoint now, and repairs "
        f"it from its peers if it differs (operator only; {where})",
    )
    add_node_options(auditp, node=True)
    auditp.add_argument(
        "--timeout", type=float, default=600.0, help="seconds to wait for the audit (default 600)"
    )
    auditp.set_defaults(func=_cmd_log_audit)
    _add_log_verify(lsub)


def _cmd_ca_root(args: argparse.Namespace) -> int:
    """The group root certificate (PEM) from a server's HTTP service (made on first need)."""
    import httpx

    from appliance.host.nodes import nodes_of
    from appliance.protocols.state import ConfigError

    verify: Any = True
    if args.url is not None:
        url = args.url.rstrip("/")
    else:
        try:
            nodes = nodes_of(args)
            config = nodes[0].config()
        except (ConfigError, IndexError) as exc:
            print(f"pst ca root: {exc or 'no server'}", file=sys.stderr)
            return 2
        url = config.http.url
        if config.http.ca is not None:
            import ssl

            verify = ssl.create_default_context(cafile=str(config.http.ca))
    import time

    deadline = time.monotonic() + args.wait
    while True:  # a server just started opens its HTTP service a moment after its API socket
        try:
            answer = httpx.get(f"{url}/ca/root.pem", timeout=30.0, verify=verify, trust_env=False)
            break
        except httpx.ConnectError as exc:
            if time.monotonic() >= deadline:
                print(f"pst ca root: {url}: {exc}", file=sys.stderr)
                return 1
            time.sleep(0.2)
        except httpx.HTTPError as exc:
            print(f"pst ca root: {url}: {exc}", file=sys.stderr)
            return 1
    if answer.status_code != 200:
        print(
            f"pst ca root: {url}/ca/root.pem: HTTP {answer.status_code}: {answer.text[:300]}", file=sys.stderr
        )
        return 1
    sys.stdout.write(answer.text)
    return 0


def _add_ca_commands(sub: Any) -> None:
    cap = sub.add_parser("ca", help="the group's certificate authority (the threshold key 'ca' of C)")
    csub = cap.add_subparsers(dest="ca_command", metavar="ACTION", required=True)
    root = csub.add_parser(
        "root",
        help="print the group root certificate (PEM), from a server's HTTP service (--dir: --node I, "
        "default the first server; or --url)",
    )
    group = root.add_mutually_exclusive_group(required=True)
    group.add_argument("--dir", help="a cluster made by pst cluster init")
    group.add_argument("--config", help="one server's TOML config")
    group.add_argument("--url", help="a server's HTTP base URL (e.g. http://127.0.0.1:7180)")
    root.add_argument("--node", type=int, help="with --dir: this server")
    root.add_argument(
        "--wait", type=float, default=10.0, help="seconds to wait for the server's HTTP service (default 10)"
    )
    root.set_defaults(func=_cmd_ca_root)


def _add_api_commands(sub: Any) -> None:
    from appliance.api.commands import add_commands

    add_commands(sub)  # api registrations list|revoke


THRESHOLD_HELP = (
    "threshold t: the faulty servers tolerated per period; n >= 3t+1, so t=1 for 4 to 6 servers, "
    "t=2 for 7 to 9 (default 1)"
)


def build_parser() -> argparse.ArgumentParser:
    from appliance.host.nodes import add_node_options

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
        help="server i listens on base+i, its status page on base+100+i, its syslog (UDP, TCP) on "
        "base+200+i and RELP on base+300+i (default 7100)",
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
        help="server i listens on base+i, its status page on base+100+i, its syslog (UDP, TCP) on "
        "base+200+i and RELP on base+300+i (default 7100)",
    )
    cinit.add_argument(
        "--network-ceremony",
        action="store_true",
        help="run the initialization (Table 3) over the network, one `pst init` process per server",
    )
    cinit.add_argument(
        "--log",
        choices=["key", "group", "off"],
        default="key",
        help="the append-only log: checkpoints signed by a key of its own in C (default), by the "
        "group key, or no log (every secret of C adds to each refresh)",
    )
    cinit.add_argument(
        "--ca",
        action="store_true",
        help="a certificate authority key 'ca' in C: the group root certificate and the leaves its "
        "policy allows ([ca] in the configs; docs/ca.md)",
    )
    cinit.add_argument(
        "--store",
        nargs="?",
        const="p256",
        choices=["p256", "ed25519"],
        help="a store key 'store' in C (TDH2 on P-256 by default, or ed25519): the data storage "
        "API, pst store (docs/store.md)",
    )
    cinit.add_argument(
        "--dss-keys",
        type=lambda text: [g for g in text.split(",") if g],
        default=[],
        metavar="GROUPS",
        help="per-application DSS keys (pst dss; needs --store): p256, dsa2048 or p256,dsa2048, "
        "each adding the secret appkeys-<group> to C (docs/dsskeys.md)",
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
    _add_log_commands(sub)
    _add_ts_commands(sub)
    from appliance.apps.store.commands import add_store_commands

    add_store_commands(sub)
    from appliance.apps.dsskeys.commands import add_dss_commands

    add_dss_commands(sub)
    _add_ca_commands(sub)

    status = sub.add_parser(
        "status",
        help="per server: period, status, last refresh, alerts, KeyTable (exit 1 unless all operational)",
    )
    add_node_options(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=_cmd_status)
    alerts = sub.add_parser("alerts", help="every alert the servers raised")
    add_node_options(alerts)
    alerts.set_defaults(func=_cmd_alerts)
    pubkey = sub.add_parser("pubkey", help="the group public key Vcert")
    add_node_options(pubkey)
    pubkey.add_argument("--pem", action="store_true", help="as SubjectPublicKeyInfo PEM")
    pubkey.set_defaults(func=_cmd_pubkey)
    refresh = sub.add_parser("refresh", help="start a refresh now instead of at the next period boundary")
    refresh.add_argument("--now", action="store_true", help="start it in two seconds on every server")
    add_node_options(refresh)
    refresh.add_argument(
        "--at",
        type=float,
        help="start it at this Unix time instead (with --config, give every server the same time)",
    )
    refresh.set_defaults(func=_cmd_refresh)
    sign = sub.add_parser("sign", help="sign a file with the group key, through a server's local API")
    add_node_options(sign)
    sign.add_argument("--app", default="pst-cli", help="application name the signature is bound to")
    sign.add_argument("--out", help="also write the 64-byte signature to this file")
    sign.add_argument("file", help="the file to sign (- for standard input)")
    sign.set_defaults(func=_cmd_sign)
    verify = sub.add_parser(
        "verify",
        help="check an application signature made with pst sign (or the API's sign) on a file",
        description=(
            "Checks that SIGNATURE is the group key's Ed25519 signature of the application payload "
            '{"dom": "pst/app-signed/v1", "app": APP, "sha512": SHA-512(FILE)} in canonical CBOR '
            "(docs/api.md), what pst sign and the local API's sign and sign_digest have signed. "
            "The group public key comes from --pubkey (offline: no server, no state directory), "
            "or from the certified M of a server given by --dir or --config."
        ),
    )
    where = verify.add_mutually_exclusive_group(required=True)
    where.add_argument("--dir", help="a cluster made by pst cluster init")
    where.add_argument("--config", help="one server's TOML config (e.g. /etc/pst/server.toml)")
    where.add_argument(
        "--pubkey", help="the group public key: pst pubkey --pem (or its hex) saved to a file; offline"
    )
    verify.add_argument("--app", default="pst-cli", help="the application name the signature is bound to")
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

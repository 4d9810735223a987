"""Helpers for tests that run real clusters of `pst serve` processes."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

PST = [sys.executable, "-m", "appliance.cli"]


#: `pst cluster init` puts server i's HTTP service on base + 100 + i, its syslog (UDP and TCP) on
#: base + 200 + i and its RELP on base + 300 + i (appliance.node.cluster).
HTTP_PORT_OFFSET = 100
SYSLOG_PORT_OFFSET = 200
RELP_PORT_OFFSET = 300


def _free(port: int, kind: socket.SocketKind = socket.SOCK_STREAM) -> bool:
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_base_port(n: int) -> int:
    """A base port with every port of the cluster free: base+1..base+n (the servers),
    base+101..base+100+n (their HTTP), base+201..base+200+n (syslog, TCP and UDP) and
    base+301..base+300+n (RELP).

    The scan starts at a place of this process's own, so that two test runs on one machine
    rarely pick the same ports between one's check and its servers' bind. Every port is below
    Linux's ephemeral range (32768 and up by default): there, the outgoing connections of other
    tests (and of the cluster itself) take ports the kernel chooses, and one of them took a
    server's port between the check and the bind ("Address already in use" at `cluster up`).
    """
    top = min(32768, _ephemeral_start()) - 400  # base + 300 + n stays below it
    bases = list(range(20000, top, 97))
    first = (os.getpid() * 7919) % len(bases)
    for base in bases[first:] + bases[:first]:
        offsets = (0, HTTP_PORT_OFFSET, SYSLOG_PORT_OFFSET, RELP_PORT_OFFSET)
        ports = [base + offset + i for offset in offsets for i in range(1, n + 1)]
        udp = [base + SYSLOG_PORT_OFFSET + i for i in range(1, n + 1)]
        if all(_free(p) for p in ports) and all(_free(p, socket.SOCK_DGRAM) for p in udp):
            return base
    raise RuntimeError("no free ports")


def pst(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PST, *args], capture_output=True, text=True, timeout=60, check=False)


_STATUS_LOCK = threading.Lock()


def status(root: Path) -> list[dict[str, object]]:
    """`pst status --json`, run in this process: the tests poll it every fraction of a second, and
    a new Python process per poll (~0.3 s of CPU) took a good part of a core from the servers
    under test. `pst status` itself is tested as a command in test_cluster.py."""
    from appliance import cli

    out, err = io.StringIO(), io.StringIO()
    with _STATUS_LOCK, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["status", "--dir", str(root), "--json"])  # 1 while one is not operational
    text = out.getvalue()
    assert code in (0, 1) and text.startswith("["), text + err.getvalue()
    rows: list[dict[str, object]] = json.loads(text)
    return rows


def init_cluster(
    root: Path, *, n: int, period: float, round_ms: int, extra: tuple[str, ...] = (), log: str = "off"
) -> None:
    """`pst cluster init` with t = 1 on free ports; fails the test with pst's output if it fails.
    ``log``: ``--log`` (default off: the tests of other things run without the log)."""
    out = pst(
        "cluster",
        "init",
        *extra,
        "--log",
        log,
        "--nodes",
        str(n),
        "--threshold",
        "1",
        "--dir",
        str(root),
        "--period",
        f"{period:g}",
        "--round-ms",
        str(round_ms),
        "--base-port",
        str(free_base_port(n)),
    )
    assert out.returncode == 0, out.stdout + out.stderr


@contextlib.contextmanager
def running_cluster(root: Path, *, n: int, period: float, round_ms: int) -> Iterator[Path]:
    """`pst cluster init` and `pst cluster up --detach`; `pst cluster down` afterwards."""
    init_cluster(root, n=n, period=period, round_ms=round_ms)
    up = pst("cluster", "up", "--dir", str(root), "--detach")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield root
    finally:
        pst("cluster", "down", "--dir", str(root))


#: Raised, truthfully, when a server of a cluster that has just started comes up too late for the
#: first refresh (its warm-up): not a sign of an attack, which is what the tests below look for.
STARTUP_ALERTS = frozenset({"server-missed-refresh"})


def alert_kinds(root: Path) -> set[str]:
    """Every alert kind any server of the cluster at ``root`` raised (both alert files)."""
    kinds = set()
    for node in sorted(root.glob("node-*")):
        for name in ("public", "serve"):
            path = node / "state" / name / "alerts.jsonl"
            if path.exists():
                for line in path.read_text().splitlines():
                    with contextlib.suppress(ValueError, AttributeError):
                        kinds.add(str(json.loads(line).get("kind")))
    return kinds


def start(node: Path) -> subprocess.Popen[bytes]:
    """Start the server of ``node`` alone (``pst serve``, its output appended to server.log)."""
    with open(node / "server.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "appliance.cli", "serve", "--config", str(node / "config.toml")],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    (node / "server.pid").write_text(f"{proc.pid}\n")
    return proc

"""Log benchmark: entries/s made durable on a quorum and covered by a signed checkpoint. Prints JSON.

A local cluster of n servers (one process each, ``pst cluster init/up``). ``--senders`` TCP
senders (RFC 6587 octet counting, RFC 5424 messages of ``--size`` bytes) send ``--messages``
messages in all, sender k to server k mod n + 1, as fast as TCP lets them. Measured:

Before the clock starts, one message goes to each server and the run waits for a checkpoint that
covers them (the cluster's first slot, vote keys and first signing, about 1.7 s after the start,
are not in the figures).

* ``entries_per_second``: messages / (time from the first send to the first checkpoint, published
  on server 1, whose size covers them all): ordered by the servers' agreement, durable on a
  quorum, applied on every server that voted, and signed by t+1 servers' guards;
* ``cluster_cpu_us_per_entry``: CPU time (user + system) of all the cluster's processes from
  the first send to that checkpoint, per message: what decides the rate on an idle machine, and
  far steadier than the rate when other work shares the machine;
* ``checkpoint_interval_ms``: p50/p99 of the time between successive checkpoints on server 1
  while the load lasts (the coordinator asks for one every 0.8 s while the tree grows);
* ``entry_to_checkpoint_ms``: p50/p99, over samples of the senders' progress, of the time from
  the moment c messages had been sent to the first checkpoint of size >= c (messages of
  different senders interleave, so this is the latency of "that many", not of one entry);
  ``entry_to_checkpoint_after_first_ms`` the same (and the max) for what was sent after the first
  checkpoint appeared: the steady state, without the cluster's first slot and signing;
* ``rsyslog``: the same senders into rsyslogd (imtcp -> omfile, no fsync, no replication) on
  this machine, the peer to compare with: messages / time until the file holds them all.

``--sender loggen`` sends with syslog-ng's ``loggen`` (.venv/bin/loggen, which ``make deps``
extracts from Debian's syslog-ng-core) instead of the Python threads: one loggen process per server
with ``--active-connections`` = the senders aimed at it, RFC 5424 (``-P``) with octet counting,
``--messages / --senders`` messages per connection. Each result then also has ``loggen``: per
process its closing report (``rate``: messages/s as loggen measures it) and ``send_rate``:
messages / the time until every loggen process had exited. loggen checks its threads every half
second, so both are floors for short runs (a run that ends within the first half second reports
count / 0.5 s). loggen reports its count every half second from about its second second on, and
at its end, so ``entry_to_checkpoint_ms`` is coarse with it, and null for a load that ends sooner.

With ``--rate R`` the Python senders are paced to R messages/s together, so that the latency rows
measure the path of an entry at a rate the servers sustain rather than the queue in front of them.

Usage: .venv/bin/python bench/log.py [--n 4] [--senders 1 4] [--messages 50000] [--size 200]
       [--sender python|loggen|relp] [--rate R]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

PST = [sys.executable, "-m", "appliance.cli"]
RSYSLOGD = "/usr/sbin/rsyslogd"
LOGGEN = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "loggen"


def pst(*args: str) -> str:
    out = subprocess.run([*PST, *args], capture_output=True, text=True, timeout=300, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"pst {' '.join(args)}: {out.stdout}{out.stderr}")
    return out.stdout


def message(sender: int, k: int, size: int) -> bytes:
    head = f"<13>1 2026-01-01T00:00:00Z benchhost bench {sender} - - ".encode()
    body = f"message {k} ".encode()
    body += b"x" * max(0, size - len(head) - len(body))
    msg = head + body
    return str(len(msg)).encode() + b" " + msg


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


class Senders:
    """``count`` threads sending ``total`` messages in all to ``ports`` (sender k to ports[k % len])."""

    def __init__(self, ports: list[int], count: int, total: int, size: int, rate: float = 0.0) -> None:
        self.ports, self.count, self.total, self.size = ports, count, total, size
        self.rate = rate  # messages/s of all senders together (0: as fast as TCP lets them)
        self.start = 0.0
        self.sent = [0] * count
        self.progress: list[tuple[float, int]] = []  # (time, messages sent by all)
        self.errors: list[str] = []

    def _send(self, k: int) -> None:
        share = self.total // self.count + (1 if k < self.total % self.count else 0)
        try:
            with socket.create_connection(("127.0.0.1", self.ports[k % len(self.ports)]), timeout=60) as sock:
                batch = []
                for i in range(share):
                    batch.append(message(k, i, self.size))
                    if len(batch) == 100 or i == share - 1:
                        sock.sendall(b"".join(batch))
                        self.sent[k] += len(batch)
                        batch = []
                        if self.rate:  # paced: the k-th sender's share of the rate
                            due = self.start + self.sent[k] * self.count / self.rate
                            time.sleep(max(0.0, due - time.monotonic()))
        except OSError as exc:
            self.errors.append(f"sender {k}: {exc}")

    def run(self) -> float:
        threads = [threading.Thread(target=self._send, args=(k,), daemon=True) for k in range(self.count)]
        start = self.start = time.monotonic()
        for thread in threads:
            thread.start()

        def sample() -> None:
            while any(t.is_alive() for t in threads):
                self.progress.append((time.monotonic(), sum(self.sent)))
                time.sleep(0.05)
            self.progress.append((time.monotonic(), sum(self.sent)))

        threading.Thread(target=sample, daemon=True).start()
        return start


class LoggenSenders:
    """The load of :class:`Senders` from syslog-ng's loggen: one process per port, with as many
    connections as senders aimed at it (sender k to ports[k % len]), ``total / count`` each."""

    _COUNT = re.compile(r"count=([0-9]+)")
    _REPORT = re.compile(r"average rate = ([0-9.]+) msg/sec, count=([0-9]+), time=([0-9.]+)")

    def __init__(self, ports: list[int], count: int, total: int, size: int) -> None:
        if total % count:
            raise ValueError(f"loggen sends the same number on each connection: {total} messages for {count}")
        self.connections: dict[int, int] = {}
        for k in range(count):
            port = ports[k % len(ports)]
            self.connections[port] = self.connections.get(port, 0) + 1
        self.per_connection, self.size = total // count, size
        self.sent: dict[int, int] = {}
        self.progress: list[tuple[float, int]] = []  # (time, messages sent by all)
        self.errors: list[str] = []
        self.reports: list[dict[str, Any]] = []
        self.threads: list[threading.Thread] = []
        self.start = 0.0
        self.finished: float | None = None

    def _run(self, port: int) -> None:
        command = [str(LOGGEN), "--inet", "--stream", "--syslog-proto", "--rate", "100000000"]
        command += ["--size", str(self.size), "--number", str(self.per_connection)]
        command += ["--active-connections", str(self.connections[port]), "127.0.0.1", str(port)]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert process.stdout is not None
        lines = []
        for line in process.stdout:  # loggen's stderr: "count=N, rate = R msg/sec" as it goes
            lines.append(line.strip())
            report = self._REPORT.search(line)
            if report is not None:
                self.reports.append(
                    {
                        "port": port,
                        "connections": self.connections[port],
                        "count": int(report.group(2)),
                        "rate": float(report.group(1)),
                        "seconds": float(report.group(3)),
                    }
                )
            got = self._COUNT.search(line)
            if got is not None:
                self.sent[port] = int(got.group(1))
        if process.wait() != 0 or self.sent.get(port) != self.per_connection * self.connections[port]:
            self.errors.append(f"loggen to port {port} (exit {process.returncode}): {' | '.join(lines[-3:])}")

    def run(self) -> float:
        start = time.monotonic()
        self.threads = threads = [
            threading.Thread(target=self._run, args=(p,), daemon=True) for p in self.connections
        ]
        for thread in threads:
            thread.start()

        def sample() -> None:
            while any(t.is_alive() for t in threads):
                self.progress.append((time.monotonic(), sum(self.sent.values())))
                time.sleep(0.05)
            self.finished = time.monotonic()
            self.progress.append((self.finished, sum(self.sent.values())))

        threading.Thread(target=sample, daemon=True).start()
        self.start = start
        return start

    def summary(self) -> dict[str, Any]:
        """What loggen reported, once every loggen process has exited (at most 60 s more)."""
        for thread in self.threads:
            thread.join(timeout=60)
        for _ in range(100):
            if self.finished is not None:
                break
            time.sleep(0.01)
        sent = sum(self.sent.values())
        elapsed = None if self.finished is None else self.finished - self.start
        return {
            "processes": sorted(self.reports, key=lambda r: r["port"]),
            "sent": sent,
            "send_rate": None if not elapsed else round(sent / elapsed),
        }


class RelpSenders:
    """The load of :class:`Senders` over RELP: one rsyslogd per sender (imfile reads a file of its
    share of the messages, omrelp with a window of 1,024 forwards them to ports[k % len], the
    servers' RELP ports). rsyslog says nothing of its progress, so there are no latency samples;
    the throughput is the messages over the time to the checkpoint covering them all."""

    def __init__(self, ports: list[int], count: int, total: int, size: int, work: Path) -> None:
        self.ports, self.count, self.total, self.size, self.work = ports, count, total, size, work
        self.progress: list[tuple[float, int]] = []
        self.errors: list[str] = []
        self.processes: list[subprocess.Popen[bytes]] = []

    def run(self) -> float:
        configs = []
        for k in range(self.count):
            directory = self.work / f"relp-sender-{k}"
            directory.mkdir(parents=True, exist_ok=True)
            share = self.total // self.count + (1 if k < self.total % self.count else 0)
            source = directory / "input.log"
            # imfile takes each line as a message and sends it with rsyslog's own header.
            source.write_bytes(
                b"".join(message(k, i, self.size).split(b" ", 1)[1] + b"\n" for i in range(share))
            )
            config = directory / "rsyslog.conf"
            config.write_text(
                f'global(workDirectory="{directory}")\n'
                'module(load="imfile")\nmodule(load="omrelp")\n'
                f'input(type="imfile" File="{source}" Tag="bench:" ruleset="forward")\n'
                'ruleset(name="forward" queue.type="LinkedList" queue.size="200000" '
                'queue.dequeueBatchSize="1024") {\n'
                f'  action(type="omrelp" target="127.0.0.1" port="{self.ports[k % len(self.ports)]}" '
                'windowSize="1024" action.resumeRetryCount="-1")\n}\n'
            )
            configs.append((directory, config))
        start = time.monotonic()
        for directory, config in configs:
            self.processes.append(
                subprocess.Popen(
                    [RSYSLOGD, "-n", "-f", str(config), "-i", str(directory / "pid")],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        return start

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.wait(timeout=10)


def make_senders(
    kind: str, ports: list[int], count: int, total: int, size: int, rate: float = 0.0
) -> Senders | LoggenSenders:
    if kind == "loggen":
        return LoggenSenders(ports, count, total, size)
    return Senders(ports, count, total, size, rate)


def warm_up(ports: list[int], note: Path, size: int) -> int:
    """One message to each server, then wait for a checkpoint covering them: the cluster's first
    slot, vote keys and first signing are then behind us, not in the figures. Returns the size."""
    for k, port in enumerate(ports):
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.sendall(message(1000 + k, 0, size))
    deadline = time.monotonic() + 120
    while checkpoint_size(note) < len(ports):
        if time.monotonic() > deadline:
            raise RuntimeError("the cluster did not checkpoint the warm-up messages within 120 s")
        time.sleep(0.05)
    return checkpoint_size(note)


def checkpoint_size(path: Path) -> int:
    try:
        return int(path.read_text().splitlines()[1])
    except (OSError, IndexError, ValueError):
        return 0


def cluster_cpu_split(root: Path) -> tuple[float, float]:
    """CPU seconds (user + system) used so far by the processes of the cluster in ``root`` (every
    process whose command line names one of its servers' configs: pst serve, its zygote and its
    key-holder). Per entry, the figure that decides the rate on an idle machine, and much less
    sensitive than the rate to other work on a shared one."""
    ticks = os.sysconf("SC_CLK_TCK")
    mark = f"{root}/node-".encode()
    user = system = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if mark not in (proc / "cmdline").read_bytes():
                continue
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11])  # utime, stime (fields 14 and 15 of stat)
        system += int(fields[12])
    return user / ticks, system / ticks


def run_cluster(
    n: int, senders: int, total: int, size: int, work: Path, sender: str = "python", rate: float = 0.0
) -> dict[str, Any]:
    root = work / f"cluster-{senders}"
    pst("cluster", "init", "--dir", str(root), "--nodes", str(n), "--period", "3600", "--round-ms", "100")
    pst("cluster", "up", "--dir", str(root), "--detach")
    relp_load: RelpSenders | None = None
    try:
        ports = []
        for i in range(1, n + 1):
            config = tomllib.loads((root / f"node-{i}" / "config.toml").read_text())
            ports.append(int(config["log"]["tcp"].rsplit(":", 1)[1]))
        note = root / "node-1" / "state" / "log" / "checkpoint"
        base = warm_up(ports, note, size)
        load: Senders | LoggenSenders | RelpSenders
        if sender == "relp":
            relp = [
                int(
                    tomllib.loads((root / f"node-{i}" / "config.toml").read_text())["log"]["relp"].rsplit(
                        ":", 1
                    )[1]
                )
                for i in range(1, n + 1)
            ]
            load = relp_load = RelpSenders(relp, senders, total, size, work / f"relp-{senders}")
        else:
            load = make_senders(sender, ports, senders, total, size, rate)
        cpu_before = cluster_cpu_split(root)
        start = load.run()
        seen: list[tuple[float, int]] = []
        deadline = start + max(120.0, total / 500)
        while time.monotonic() < deadline:
            got = max(0, checkpoint_size(note) - base)
            if not seen or got != seen[-1][1]:
                seen.append((time.monotonic(), got))
            if got >= total:
                break
            time.sleep(0.01)
        done = seen[-1][0] if seen and seen[-1][1] >= total else None
        cpu_after = cluster_cpu_split(root)
        user, system = cpu_after[0] - cpu_before[0], cpu_after[1] - cpu_before[1]
        cpu = user + system
        intervals = [(b[0] - a[0]) * 1000 for a, b in itertools.pairwise(seen) if a[1] > 0]
        latencies: list[float] = []
        # Sent once the first checkpoint was out: the cluster's first slot and first signing
        # (vote keys, FROST nonces, the checkpoint loop's first tick) are behind it.
        steady: list[float] = []
        first_checkpoint = next((t for t, s in seen if s > 0), None)
        for when, count in load.progress[::4]:
            covered = next((t for t, s in seen if s >= count and t >= when), None)
            if count and covered is not None:
                latencies.append((covered - when) * 1000)
                if first_checkpoint is not None and when >= first_checkpoint:
                    steady.append((covered - when) * 1000)
        result = {
            "senders": senders,
            "rate": rate or None,
            "messages": total,
            "covered": seen[-1][1] if seen else 0,
            "seconds": None if done is None else round(done - start, 3),
            "entries_per_second": None if done is None else round(total / (done - start)),
            "cluster_cpu_us_per_entry": round(cpu / total * 1e6, 1),
            "cluster_cpu_us_per_entry_user_system": [
                round(user / total * 1e6, 1),
                round(system / total * 1e6, 1),
            ],
            "checkpoints": len(seen),
            "checkpoint_interval_ms": {"p50": percentile(intervals, 50), "p99": percentile(intervals, 99)},
            "entry_to_checkpoint_ms": {"p50": percentile(latencies, 50), "p99": percentile(latencies, 99)},
            "entry_to_checkpoint_after_first_ms": {
                "p50": percentile(steady, 50),
                "p99": percentile(steady, 99),
                "max": max(steady, default=None),
            },
            "sender_errors": load.errors,
        }
        if isinstance(load, LoggenSenders):
            result["loggen"] = load.summary()
        return result
    finally:
        if relp_load is not None:
            relp_load.stop()
        pst("cluster", "down", "--dir", str(root))


def run_rsyslog(
    senders: int, total: int, size: int, work: Path, sender: str = "python"
) -> dict[str, Any] | None:
    if not os.path.exists(RSYSLOGD):
        return None
    directory = work / f"rsyslog-{senders}"
    directory.mkdir()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = directory / "out.log"
    config = directory / "rsyslog.conf"
    config.write_text(
        f'global(workDirectory="{directory}")\n'
        'module(load="imtcp")\n'
        f'input(type="imtcp" address="127.0.0.1" port="{port}")\n'
        f'action(type="omfile" file="{out}" template="RSYSLOG_FileFormat")\n'
    )
    process = subprocess.Popen(
        [RSYSLOGD, "-n", "-f", str(config), "-i", str(directory / "pid")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        load = make_senders(sender, [port], senders, total, size)
        start = load.run()
        deadline = start + 120
        lines = 0
        while time.monotonic() < deadline:
            try:
                lines = out.read_bytes().count(b"\n")
            except OSError:
                lines = 0
            if lines >= total:
                break
            time.sleep(0.01)
        elapsed = time.monotonic() - start
        result: dict[str, Any] = {
            "senders": senders,
            "messages": total,
            "written": lines,
            "entries_per_second": round(total / elapsed) if lines >= total else None,
        }
        if isinstance(load, LoggenSenders):
            result["loggen"] = load.summary()
        return result
    finally:
        process.terminate()
        process.wait(timeout=10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--senders", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--size", type=int, default=200, help="bytes per message")
    parser.add_argument(
        "--sender",
        choices=["python", "loggen", "relp"],
        default="python",
        help="who sends: threads of this script (default), syslog-ng's loggen (.venv/bin/loggen), "
        "or rsyslog over RELP (one rsyslogd per sender; the rsyslog peer then gets the python senders)",
    )
    parser.add_argument(
        "--rate", type=float, default=0.0, help="messages/s of all senders together (python senders only)"
    )
    args = parser.parse_args()
    if args.rate and args.sender != "python":
        parser.error("--rate paces the python senders only")
    if args.sender == "loggen":
        if not os.access(LOGGEN, os.X_OK):
            parser.error(
                f"--sender loggen needs {LOGGEN}: run `make deps` (it extracts Debian's syslog-ng-core)"
            )
        if any(args.messages % s for s in args.senders):
            parser.error(
                "--sender loggen sends the same number on each connection: "
                "--messages must divide by each --senders"
            )
    work = Path(tempfile.mkdtemp(prefix="pst-bench-log-"))
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "n": args.n,
        "message_size": args.size,
        "sender": args.sender,
        "cluster": [],
        "rsyslog": [],
    }
    try:
        for senders in args.senders:
            print(f"cluster, {senders} sender(s) ...", file=sys.stderr, flush=True)
            results["cluster"].append(
                run_cluster(args.n, senders, args.messages, args.size, work, args.sender, args.rate)
            )
            print(f"rsyslog, {senders} sender(s) ...", file=sys.stderr, flush=True)
            peer_sender = "python" if args.sender == "relp" else args.sender
            results["rsyslog"].append(run_rsyslog(senders, args.messages, args.size, work, peer_sender))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
